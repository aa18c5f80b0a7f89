"""Multi-particle refinement (cryopipe.mpr, `cryopipe mpr`): exact gradients, recovery of injected errors on a tiny
simulated tilt series, the gold standard, and M's refusal to refine the CTF of a low-resolution species."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cryopipe.cli import main as cli_main
from cryopipe.core.geometry import angular_distance
from cryopipe.errors import CryopipeError
from cryopipe.io.tomo_particles import read_tomo_particles
from cryopipe.io.tomography import read_tomograms
from cryopipe.mpr.driver import MprOptions, Stage, make_species, prepare_tilt_series, run_mpr, species_mask
from cryopipe.mpr.forward import make_band
from cryopipe.mpr.optimise import pair_centres, score_and_gradient, tilt_series_score
from cryopipe.mpr.parameters import TiltSeriesParameters
from cryopipe.mpr.reconstruct import reconstruct_halves
from cryopipe.tomo.particle_sets import particles_per_tilt_series

BOX = 24


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """One tilt series of 12 particles of 3ENL at 6 Å (21 tilts ±60°, SNR 5) whose metadata carry per-tilt shift
    errors (sd 5 Å) and particle pose errors (4 Å, 4°); half-maps reconstructed at that metadata (box 24), and
    half-maps reconstructed at the true metadata (references as good as the data allow)."""
    from cryopipe.jobs.simulate import build_volume
    from cryopipe.sim.tiltseries import Perturbations, simulate_tilt_series

    here = tmp_path_factory.mktemp("mpr")
    cwd = os.getcwd()
    os.chdir(here)
    try:
        vol, apix = build_volume("3enl", None, 6.0)
        simulate_tilt_series(vol, apix, "sim", n_tomograms=1, particles_per_tomogram=12, image_size=(256, 256),
                             thickness_A=400.0, tilt_step=6.0, snr=5.0, device="cpu", seed=3,
                             defocus_range=(20000.0, 30000.0),
                             perturbations=Perturbations(tilt_shift_A=5.0, particle_angle_deg=4.0,
                                                         particle_shift_A=4.0))
        tomos = read_tomograms("sim/tomograms.star")
        parts = read_tomo_particles("sim/particles.star", tomos)
        g = next(particles_per_tilt_series(parts, tomos))
        data = prepare_tilt_series(g.tilt_series, g.positions_px, g.orientations, g.half_sets, BOX, 1.0)
        h1, h2, _ = reconstruct_halves([data], BOX, 1.0)
        ttomos = read_tomograms("sim/truth/tomograms.star")
        tg = next(particles_per_tilt_series(read_tomo_particles("sim/truth/particles.star", ttomos), ttomos))
        truth = prepare_tilt_series(tg.tilt_series, tg.positions_px, tg.orientations, tg.half_sets, BOX, 1.0)
        t1, t2, _ = reconstruct_halves([truth], BOX, 1.0)
        yield {"dir": here, "tomos": tomos, "parts": parts, "data": data, "half1": h1, "half2": h2, "apix": apix,
               "true_half1": t1, "true_half2": t2}
    finally:
        os.chdir(cwd)


def _errors(datas, here):
    """RMS errors vs the truth: particle positions (Å, mean removed: the gauge), particle angles (°), tilt shifts
    (Å), per-tilt stage angles (°) and defocus (Å)."""
    ttomos = read_tomograms(here / "sim/truth/tomograms.star")
    tparts = read_tomo_particles(here / "sim/truth/particles.star", ttomos)
    d = datas["TS_01"]
    ts = ttomos["TS_01"]
    dp = (d.positions.numpy() - tparts.positions_px(ttomos)) * d.pixel_size
    dp -= dp.mean(0)
    ang = angular_distance(d.orientations, torch.from_numpy(tparts.orientations())).numpy()
    sh = d.shifts.numpy() - ts.shifts_angst()
    return {"positions": float(np.sqrt((dp ** 2).sum(1).mean())), "angles": float(np.sqrt((ang ** 2).mean())),
            "shifts": float(np.sqrt((sh ** 2).sum(1).mean()))}


def test_gradient_matches_finite_differences(sim):
    """The batch-accumulated autograd gradient of −NCC·P (batches of 7 pairs) equals central differences of the
    score for every parameter group, at a random non-zero point, in float64."""
    data = sim["data"]
    data = type(data)(**{**data.__dict__, "pairs": data.pairs[::6], "warp": torch.zeros(len(data.angles), 2, 2, 2,
                                                                                       dtype=torch.float64)})
    mask = species_mask(None, BOX, sim["apix"], 120.0, 12.0)
    species = make_species(sim["half1"], sim["half2"], mask, 1.0, dtype=torch.float64)
    band = make_band(data, species, k_max=BOX * sim["apix"] / 14.0)
    centres = pair_centres(data)
    gen = torch.Generator().manual_seed(1)
    params = TiltSeriesParameters.zeros(len(data.positions), len(data.angles), (2, 2))
    for t in params.__dict__.values():
        t.copy_(0.3 * torch.randn(t.shape, generator=gen, dtype=torch.float64))
    groups = ("poses", "shifts", "imagewarp", "stageangles", "ctf")
    tensors = params.for_groups(groups)
    loss = score_and_gradient(data, species, band, params, groups, centres, batch_pairs=7)
    assert torch.isclose(loss, torch.tensor(-len(data.pairs) * tilt_series_score(
        data, species, band, params, groups, centres, 1000) / 100, dtype=torch.float64), rtol=1e-9)
    n_pairs = len(data.pairs)
    h = 1e-4
    checked = 0
    for t in tensors:
        grad = t.grad.clone()
        flat = t.detach().view(-1)
        picks = torch.randperm(flat.numel(), generator=gen)[:3]
        for i in picks.tolist():
            if abs(float(grad.view(-1)[i])) < 1e-6:
                continue
            old = float(flat[i])
            flat[i] = old + h
            up = tilt_series_score(data, species, band, params, groups, centres, 1000)
            flat[i] = old - h
            down = tilt_series_score(data, species, band, params, groups, centres, 1000)
            flat[i] = old
            fd = -n_pairs * (up - down) / (2 * h) / 100
            assert abs(fd - float(grad.view(-1)[i])) <= 2e-3 * abs(fd) + 1e-5, (t.shape, i, fd, float(grad.view(-1)[i]))
            checked += 1
    assert checked >= 10


def test_refinement_reduces_errors_of_each_group(sim):
    """poses + per-tilt shifts, 2 sub-iterations against half-maps from the true metadata: the RMS error of each
    injected group vs the truth drops (shifts to < 1/2, positions and angles to < 3/4), the score rises and the
    masked FSC resolution of the half-maps reconstructed after refinement beats the one at the input metadata."""
    opts = MprOptions(stages=[Stage(("poses", "shifts"), 2)], resolution_A=14.0, lbfgs_iterations=8,
                      batch_pairs=256)
    res = run_mpr(sim["parts"], sim["tomos"], sim["true_half1"], sim["true_half2"], sim["apix"], None, 120.0, opts,
                  log=lambda m: None)
    before = _errors({"TS_01": sim["data"]}, sim["dir"])
    after = _errors(res.data, sim["dir"])
    assert after["shifts"] < 0.5 * before["shifts"], (before, after)
    assert after["positions"] < 0.75 * before["positions"], (before, after)
    assert after["angles"] < 0.75 * before["angles"], (before, after)
    assert all(s["score_after"] > s["score_before"] for s in res.stats)
    assert res.resolution_after < res.resolution_before


def test_defocus_grid_search_keeps_each_tilts_best_offset(sim):
    """The exhaustive per-tilt defocus search (±1000 Å, 100 Å steps) on data with per-tilt defocus errors of
    ±600 Å: every tilt ends at an offset of the grid whose NCC (its own pairs) is at least that of no change, the
    offsets are written into the ``ctf`` group's mean defocus, tilts without pairs keep theirs. (It does not claim
    recovery: 12 particles per tilt at 14 Å pin a tilt's defocus only to several hundred Å, see the report of
    issue 13.)"""
    from dataclasses import replace

    from cryopipe.mpr.forward import bake, pair_sums
    from cryopipe.mpr.optimise import cached_slices, defocus_grid_search

    data = sim["data"]
    gen = torch.Generator().manual_seed(4)
    error = 600.0 * torch.sign(torch.randn(len(data.angles), generator=gen, dtype=torch.float64))
    wrong = data.defocus.clone()
    wrong[:, :2] += error[:, None]
    data = replace(data, defocus=wrong)
    species = make_species(sim["true_half1"], sim["true_half2"], species_mask(None, BOX, sim["apix"], 120.0, 14.0),
                           1.0)
    band = make_band(data, species, k_max=BOX * sim["apix"] / 14.0)
    centres = pair_centres(data)
    params = TiltSeriesParameters.zeros(len(data.positions), len(data.angles), (1, 1))
    offsets = torch.arange(-10, 11, dtype=torch.float64) * 100.0
    best = defocus_grid_search(data, species, band, params, ("ctf",), centres, offsets,
                               cache=cached_slices(data, species, band, centres, 256))
    found = bake(data, params, ("ctf",)).defocus[:, :2].mean(1) - sim["data"].defocus[:, :2].mean(1)
    assert torch.allclose(found, error + best)
    F = len(data.angles)
    used = torch.bincount(data.pairs[:, 1], minlength=F) > 0

    def per_tilt_ncc(p):
        s = torch.zeros(F, 3, dtype=torch.float64).index_add_(
            0, data.pairs[:, 1], pair_sums(data, species, band, p, slice(0, None), centres))
        return s[:, 0] / (s[:, 1] * s[:, 2]).sqrt()

    with torch.no_grad():
        at_best = per_tilt_ncc(params)
        at_zero = per_tilt_ncc(TiltSeriesParameters.zeros(len(data.positions), F, (1, 1)))
    assert torch.all(at_best[used] >= at_zero[used] - 1e-9)
    assert bool((best[used] != 0).any()) and torch.all(best[~used] == 0)


def test_rounds_refine_against_half_maps_of_the_refined_metadata(sim):
    """rounds=2: the second round's references are the half-maps reconstructed after round 1 (its log line gives
    their masked FSC), its limit follows that FSC (resolution_A 0; never worse here), and its sub-iteration starts
    from round 1's metadata, so its score beats round 1's first score."""
    opts = MprOptions(stages=[Stage(("shifts",), 1)], lbfgs_iterations=3, rounds=2, reconstruct=False)
    lines = []
    res = run_mpr(sim["parts"], sim["tomos"], sim["half1"], sim["half2"], sim["apix"], None, 120.0, opts,
                  log=lines.append)
    assert [s["round"] for s in res.stats] == [1, 2]
    assert any(line.startswith("round 2/2: references reconstructed") for line in lines)
    assert res.stats[1]["resolution_A"] <= res.stats[0]["resolution_A"]
    assert res.stats[1]["score_before"] > res.stats[0]["score_before"]


def test_gold_standard_each_particle_sees_its_own_half_map(sim):
    """With half-map 2 replaced by zeros, particles of half set 2 get exactly zero gradient (they only ever see
    their own, empty, map) while half-1 particles do not; and a reconstruction puts nothing of half set 1 into
    half-map 2."""
    data = sim["data"]
    mask = species_mask(None, BOX, sim["apix"], 120.0, 12.0)
    species = make_species(sim["half1"], torch.zeros_like(sim["half2"]), mask, 1.0)
    band = make_band(data, species, k_max=8.0)
    params = TiltSeriesParameters.zeros(len(data.positions), len(data.angles))
    params.for_groups(("poses",))
    score_and_gradient(data, species, band, params, ("poses",), pair_centres(data), batch_pairs=64)
    g = params.particle_shifts.grad.abs().sum(1) + params.particle_angles.grad.abs().sum(1)
    halves = data.half_sets
    assert float(g[halves == 2].max()) == 0.0
    assert float(g[halves == 1].min()) > 0.0
    only1 = type(data)(**{**data.__dict__, "pairs": data.pairs[halves[data.pairs[:, 0]] == 1]})
    h1, h2, _ = reconstruct_halves([only1], BOX, 1.0)
    assert float(h2.abs().max()) == 0.0 and float(h1.abs().max()) > 0.0


def test_ctf_refinement_refused_below_minresolution(sim):
    """A species at ~20 Å with --ctf_minresolution 8: the function raises, the command fails with one line and
    writes nothing; with a lenient limit the same command runs (--iter 0 baseline only here)."""
    opts = MprOptions(stages=[Stage(("poses", "ctf"), 1)], ctf_minresolution=8.0)
    with pytest.raises(CryopipeError, match="ctf_minresolution"):
        run_mpr(sim["parts"], sim["tomos"], sim["half1"], sim["half2"], sim["apix"], None, 120.0, opts,
                log=lambda m: None)
    from cryopipe.io.mrc import write_mrc

    here = sim["dir"]
    write_mrc(here / "h1.mrc", sim["half1"].numpy(), sim["apix"])
    write_mrc(here / "h2.mrc", sim["half2"].numpy(), sim["apix"])
    common = ["mpr", "--i", str(here / "sim/particles.star"), "--tomograms", str(here / "sim/tomograms.star"),
              "--half1", str(here / "h1.mrc"), "--half2", str(here / "h2.mrc"), "--diameter", "120"]
    assert cli_main(common + ["--o", str(here / "refused"), "--stage", "poses,ctf", "--iter", "1"]) == 1
    assert not (here / "refused" / "particles.star").exists()
    assert cli_main(common + ["--o", str(here / "base"), "--iter", "0"]) == 0
    assert (here / "base" / "fsc.star").exists() and (here / "base" / "half1_iter0.mrc").exists()
    assert not (here / "base" / "particles.star").exists()
    # a short geometry run through the command: every output, FSC before and after, one log line per sub-iteration
    assert cli_main(common + ["--o", str(here / "run"), "--stage", "shifts,imagewarp", "--iter", "1", "--lbfgs_iter",
                              "2", "--warp_grid", "2", "2", "--resolution", "14"]) == 0
    for name in ("particles.star", "particles_relion30.star", "tomograms.star", "tilt_series/TS_01.star",
                 "image_warp.star", "half1.mrc", "half2.mrc", "fsc.png", "mpr_stats.json"):
        assert (here / "run" / name).exists(), name
    from cryopipe.io.star import read_star

    fsc_table = read_star(here / "run" / "fsc.star")["fsc"]
    assert {"cryopipeFscMaskedBefore", "cryopipeFscMaskedAfter"} <= set(fsc_table.columns)
    log = (here / "run" / "mpr_log.txt").read_text()
    assert log.count("sub-iteration 1/1") == 1 and "score" in log


def test_mpr_is_a_project_job(sim, tmp_path, monkeypatch):
    """Without --o, ``cryopipe mpr`` makes a new MultiParticle/job001/ in the project here, entered in
    default_pipeline.star as process cryopipe.mpr with its inputs, job.star and the success marker (baseline run)."""
    from cryopipe.io.mrc import write_mrc
    from cryopipe.pipeline.project import read_pipeline

    here = sim["dir"]
    write_mrc(tmp_path / "h1.mrc", sim["half1"].numpy(), sim["apix"])
    write_mrc(tmp_path / "h2.mrc", sim["half2"].numpy(), sim["apix"])
    monkeypatch.chdir(tmp_path)
    assert cli_main(["mpr", "--i", str(here / "sim/particles.star"), "--tomograms", str(here / "sim/tomograms.star"),
                     "--half1", "h1.mrc", "--half2", "h2.mrc", "--diameter", "120", "--iter", "0"]) == 0
    job = tmp_path / "MultiParticle" / "job001"
    for name in ("job.star", "note.txt", "run.out", "RELION_JOB_EXIT_SUCCESS", "fsc.star", "half1_iter0.mrc"):
        assert (job / name).exists(), name
    pipe = read_pipeline(tmp_path / "default_pipeline.star")
    proc = pipe.process("MultiParticle/job001/")
    assert proc is not None and proc.type_label == "cryopipe.mpr"
    assert any(n.endswith("h1.mrc") for n in pipe.inputs_of("MultiParticle/job001/"))


def test_refined_metadata_round_trips_through_relion_files(sim, tmp_path):
    """Refined poses, per-tilt angles, shifts and defocus written as RELION 5 particles + tomograms STARs read back
    to the same geometry (positions to 1e-6 px, orientations, per-tilt values), and the 3.0 table has the same
    coordinates."""
    from cryopipe.io.star import read_star, write_star
    from cryopipe.io.tomo_particles import write_tomo_particles
    from cryopipe.io.tomography import write_tomograms
    from cryopipe.mpr.driver import relion30_table, updated_particles, updated_tomograms

    opts = MprOptions(stages=[Stage(("poses", "shifts", "stageangles", "ctf"), 1)], resolution_A=14.0,
                      lbfgs_iterations=2, ctf_minresolution=99.0, reconstruct=False)
    res = run_mpr(sim["parts"], sim["tomos"], sim["half1"], sim["half2"], sim["apix"], None, 120.0, opts,
                  log=lambda m: None)
    d = res.data["TS_01"]
    assert float((d.angles - sim["data"].angles).abs().max()) > 1e-4
    write_tomograms(tmp_path / "tomograms.star", updated_tomograms(sim["tomos"], res.data), tmp_path / "ts")
    write_tomo_particles(tmp_path / "particles.star", updated_particles(sim["parts"], sim["tomos"], res.data))
    write_star(tmp_path / "p30.star", {"": relion30_table(res.data)}, version=None)
    tomos = read_tomograms(tmp_path / "tomograms.star")
    g = next(particles_per_tilt_series(read_tomo_particles(tmp_path / "particles.star", tomos), tomos))
    back = prepare_tilt_series(g.tilt_series, g.positions_px, g.orientations, g.half_sets, BOX, 1.0)
    assert torch.allclose(back.positions, d.positions, atol=1e-6)
    assert torch.allclose(back.orientations, d.orientations, atol=1e-8)
    for name in ("angles", "shifts", "defocus"):
        assert torch.allclose(getattr(back, name), getattr(d, name), atol=1e-6), name
    t30 = next(iter(read_star(tmp_path / "p30.star").values()))
    xyz = t30[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(float)
    assert np.allclose(xyz, d.positions.numpy(), atol=1e-6)
    # --first_tilts 5: only pairs in the 5 lowest-dose tilts
    few = prepare_tilt_series(g.tilt_series, g.positions_px, g.orientations, g.half_sets, BOX, 1.0, first_tilts=5)
    lowest = set(torch.argsort(back.pre_exposure)[:5].tolist())
    assert set(few.pairs[:, 1].tolist()) <= lowest and len(few.pairs) >= 5 * len(few.positions) // 2


def test_updated_particles_keep_origins_and_subtomogram_angles(relion_tomo_dir):
    """RELION 5 fixture particles (non-zero origins, subtomogram angles, two hands) written back unchanged by
    updated_particles: same positions and orientations after re-reading, origins and subtomogram angles kept."""
    from cryopipe.mpr.driver import updated_particles

    fx = relion_tomo_dir
    cwd = os.getcwd()
    os.chdir(fx)
    try:
        tomos = read_tomograms("tomograms.star")
        parts = read_tomo_particles("particles.star", tomos)
        datas = {g.tilt_series.name: prepare_tilt_series(g.tilt_series, g.positions_px, g.orientations, g.half_sets,
                                                         32, 1.0, load_images=False)
                 for g in particles_per_tilt_series(parts, tomos)}
        out = updated_particles(parts, tomos, datas)
        assert np.allclose(out.positions_px(tomos), parts.positions_px(tomos), atol=1e-8)
        assert np.allclose(out.orientations(), parts.orientations(), atol=1e-8)
        for lab in ("rlnOriginXAngst", "rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt"):
            assert np.array_equal(out.particles[lab].to_numpy(), parts.particles[lab].to_numpy())
    finally:
        os.chdir(cwd)


def test_alternate_refines_tilt_groups_then_poses(sim, monkeypatch):
    """Issue 13's fix: with ``alternate`` (the default) the per-tilt groups are refined first with the poses frozen,
    then the poses with the tilt groups frozen (each L-BFGS block evaluates only its own gradients), and the score
    rises; ``alternate=False`` refines all groups in every evaluation (the old joint form)."""
    import cryopipe.mpr.optimise as optimise

    data = sim["data"]
    mask = species_mask(None, BOX, sim["apix"], 120.0, 12.0)
    species = make_species(sim["half1"], sim["half2"], mask, 1.0, dtype=torch.float64)
    seen = []
    original = optimise.score_and_gradient

    def recording(data_, species_, band_, params_, groups_, *args, **kwargs):
        seen.append((params_.particle_angles.requires_grad, params_.tilt_shifts.requires_grad,
                     params_.tilt_angles.requires_grad))
        return original(data_, species_, band_, params_, groups_, *args, **kwargs)

    monkeypatch.setattr(optimise, "score_and_gradient", recording)
    groups = ("poses", "shifts", "stageangles")
    params = TiltSeriesParameters.zeros(len(data.positions), len(data.angles))
    stats = optimise.refine_tilt_series(data, species, params, groups, BOX * sim["apix"] / 20.0, lbfgs_iterations=3)
    assert stats.score_after > stats.score_before
    tilts_only, poses_only = (False, True, True), (True, False, False)
    first_poses = next(i for i, s in enumerate(seen) if s == poses_only)
    assert first_poses > 0 and all(s == tilts_only for s in seen[:first_poses]), seen
    assert all(s == poses_only for s in seen[first_poses:]), seen
    seen.clear()
    optimise.refine_tilt_series(data, species, TiltSeriesParameters.zeros(len(data.positions), len(data.angles)),
                                groups, BOX * sim["apix"] / 20.0, lbfgs_iterations=3, alternate=False)
    assert seen and all(s == (True, True, True) for s in seen), seen


def test_joint_flag_reaches_the_options(sim, tmp_path, monkeypatch):
    """``--joint`` switches the default alternation (tilt groups, then poses) off: the job passes
    ``alternate=False`` to the refinement, and without the flag ``alternate=True``."""
    import cryopipe.jobs.mpr as job
    from cryopipe.io.mrc import write_mrc

    here = sim["dir"]
    write_mrc(tmp_path / "h1.mrc", sim["half1"].numpy(), sim["apix"])
    write_mrc(tmp_path / "h2.mrc", sim["half2"].numpy(), sim["apix"])
    monkeypatch.chdir(tmp_path)
    seen = []
    real_run_mpr = job.run_mpr

    def recording_run_mpr(*args, **kwargs):
        seen.append(next(a for a in args if isinstance(a, MprOptions)).alternate)
        return real_run_mpr(*args, **kwargs)

    monkeypatch.setattr(job, "run_mpr", recording_run_mpr)
    base = ["mpr", "--i", str(here / "sim/particles.star"), "--tomograms", str(here / "sim/tomograms.star"),
            "--half1", "h1.mrc", "--half2", "h2.mrc", "--diameter", "120", "--iter", "0"]
    assert cli_main(base + ["--o", "A/"]) == 0
    assert cli_main(base + ["--o", "B/", "--joint"]) == 0
    assert seen == [True, False]
