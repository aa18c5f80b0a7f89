"""refine3d on tomographic particles, both of RELION's forms (3D pseudo-subtomograms and 2D stacks), on the shared
engine: a small simulated tilt-series data set with perturbed particle poses, refined through the real command line
from `subtomo`'s optimisation set; the refined map is closer to the truth than a reconstruction at the perturbed
poses, the poses get better, and the output STAR files follow RELION's tomography layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.cli import main as cli_main
from cryopipe.core.fsc import fsc
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.star import read_star
from cryopipe.io.tomo_particles import read_optimisation_set, read_tomo_particles
from cryopipe.io.tomography import read_tomograms

REFINE_COLUMNS = ["rlnGroupNumber", "rlnClassNumber", "rlnNormCorrection", "rlnRandomSubset",
                  "rlnLogLikeliContribution", "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples"]


@pytest.fixture(scope="module", params=["3d", "2d"])
def refined(request, tmp_path_factory):
    """32 particles of 3ENL (24³ at 6 Å) in two tilt series (21 tilts ±60°, SNR 5), main files with 6° / 4 Å pose
    errors; subtomo (box 32 → crop 24, bin 1; ``--stack2d`` for the 2D form) then refine3d --ios (one
    local-search iteration and the final one; ``--sigma_tilt`` is accepted, and as in RELION not used by local
    searches)."""
    import os

    from cryopipe.jobs.simulate import build_volume
    from cryopipe.sim.tiltseries import Perturbations, simulate_tilt_series

    here = tmp_path_factory.mktemp("refine_tomo")
    cwd = os.getcwd()
    os.chdir(here)
    try:
        vol, apix = build_volume("3enl", None, 6.0)
        sim = simulate_tilt_series(vol, apix, "Simulate", n_tomograms=2, particles_per_tomogram=16,
                                   image_size=(320, 288), thickness_A=400.0, tilt_range=(-60.0, 60.0),
                                   tilt_step=6.0, snr=5.0, device="cpu", seed=3, defocus_range=(20000.0, 30000.0),
                                   perturbations=Perturbations(particle_angle_deg=6.0, particle_shift_A=4.0))
        write_mrc("truth.mrc", np.asarray(vol, dtype=np.float32), apix)
        stack2d = ["--stack2d"] if request.param == "2d" else []
        assert cli_main(["subtomo", "--i", "Simulate/optimisation_set.star", "--b", "32", "--crop", "24", "--bin",
                         "1", "--o", "Subtomo"] + stack2d) == 0
        assert cli_main(["refine3d", "--ios", "Subtomo/optimisation_set.star", "--ref", "truth.mrc", "--o",
                         "Refine3D/run", "--iter", "2", "--healpix_order", "3", "--sigma_ang", "5", "--offset_range",
                         "2", "--offset_step", "1", "--particle_diameter", "110", "--ini_high", "25",
                         "--sigma_tilt", "30"]) == 0
    finally:
        os.chdir(cwd)
    return here, sim, np.asarray(vol, dtype=np.float32), request.param


def _orientations(star, tomograms) -> torch.Tensor:
    return torch.as_tensor(read_tomo_particles(star, read_tomograms(tomograms)).orientations())


def _angle_errors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    tr = torch.einsum("bij,bij->b", A, B)
    return torch.rad2deg(torch.acos(((tr - 1.0) / 2.0).clamp(-1.0, 1.0)))


def test_refinement_improves_map_and_poses(refined):
    from cryopipe.jobs.reconstruct_particle import reconstruct_particle

    here, sim, truth, _ = refined
    rec, apix = read_mrc(here / "Refine3D" / "run_class001.mrc")
    assert rec.shape == (24, 24, 24) and apix == pytest.approx(6.0)
    ours = fsc(torch.from_numpy(rec), torch.from_numpy(truth)).numpy()
    before = reconstruct_particle(here / sim.particles_star, here / sim.tomograms_star, box=32, crop=24,
                                  device="cpu", progress=False)
    base = fsc(torch.as_tensor(before.merged).float(), torch.from_numpy(truth)).numpy()
    # 18–13 Å (shells 8–11 of 24 at 6 Å): the perturbed poses lose the signal, the refined ones keep it
    assert ours[8:12].min() > 0.75 and ours[8:12].mean() > base[8:12].mean() + 0.15, (ours.round(2), base.round(2))
    truth_A = _orientations(here / sim.truth_particles_star, here / sim.truth_tomograms_star)
    start = _angle_errors(_orientations(here / sim.particles_star, here / sim.tomograms_star), truth_A)
    after = _angle_errors(_orientations(here / "Refine3D" / "run_data.star", here / sim.tomograms_star), truth_A)
    assert float(after.median()) < float(start.median()), (float(after.median()), float(start.median()))


def test_outputs_follow_relions_tomography_layout(refined, relion_tomo_dir):
    """run_data.star: RELION's subtomo particles layout (general block, the optics columns, the particle columns in
    the fixture's order) plus relion_refine's columns; run_optimisation_set.star: the particles, tomograms and the
    two half maps, for the next job."""
    here, _, _, form = refined
    ours = read_star(here / "Refine3D" / "run_data.star")
    fixture = read_star(relion_tomo_dir / "Subtomo_bin2" / "particles.star")
    assert int(ours["general"]["rlnTomoSubTomosAre2DStacks"]) == (form == "2d")
    assert list(ours["optics"].columns) == list(fixture["optics"].columns)
    assert int(ours["optics"]["rlnImageDimensionality"].iloc[0]) == (2 if form == "2d" else 3)
    cols = list(ours["particles"].columns)
    # the 2D form names its visible tilts instead of a weights volume (RELION 5's --stack2d layout)
    expected = [c if c != "rlnCtfImage" or form == "3d" else "rlnTomoVisibleFrames"
                for c in fixture["particles"].columns]
    assert cols[:len(expected)] == expected
    assert set(REFINE_COLUMNS) <= set(cols)
    assert (ours["particles"]["rlnOriginZAngst"].abs() > 0).any()  # 3D offsets were refined
    entries = read_optimisation_set(here / "Refine3D" / "run_optimisation_set.star", root=here)
    assert entries["rlnTomoParticlesFile"] == here / "Refine3D" / "run_data.star"
    assert entries["rlnTomoReferenceMap1File"] == here / "Refine3D" / "run_half1_class001_unfil.mrc"
    assert entries["rlnTomoReferenceMap2File"] == here / "Refine3D" / "run_half2_class001_unfil.mrc"
    assert entries["rlnTomoTomogramsFile"].name == "tomograms.star"
    for key in read_optimisation_set(relion_tomo_dir / "optimisation_set.star", root=relion_tomo_dir):
        assert key in entries


def _mrc_header(path) -> dict:
    """The layout fields of an MRC header (dimensions, mode, start, sampling, cell, angles, axis order, space
    group, extended header, origin, MAP stamp)."""
    h = np.fromfile(path, dtype=np.int32, count=256)
    f = h.view(np.float32)
    return {"n": tuple(int(v) for v in h[0:3]), "mode": int(h[3]), "start": tuple(int(v) for v in h[4:7]),
            "sampling": tuple(int(v) for v in h[7:10]), "voxel": tuple(float(f[10 + i] / h[7 + i]) for i in range(3)),
            "angles": tuple(float(v) for v in f[13:16]), "axes": tuple(int(v) for v in h[16:19]),
            "ispg": int(h[22]), "nsymbt": int(h[23]), "origin": tuple(float(v) for v in f[49:52]),
            "map": bytes(h[52:53].view(np.uint8))}


def test_run_log_and_subtomogram_headers(refined, relion_tomo_dir):
    """The run log states the peak memory per batch and the angle prior; the pseudo-subtomograms the refinement
    read have the fixture's MRC header layout: data ``crop³`` float32 at the binned pixel size, weights FFTW half
    layout ``(crop/2+1) × crop × 2·crop`` with voxel ``1/pixel size``, same mode, axis order, start, angles,
    origin and extended header as RELION's ``Subtomo_bin2`` files. (Not compared: the space group, 1 in ours
    as MRC2014 volumes, 0 in RELION's; RELION does not read it.)"""
    here, _, _, form = refined
    log = (here / "Refine3D" / "run.out").read_text()
    assert "peak memory per batch" in log and "σ_tilt 30" in log
    if form == "2d":
        return
    star = read_star(here / "Refine3D" / "run_data.star")["particles"]
    ours_d = _mrc_header(here / star["rlnImageName"].iloc[0])
    ours_w = _mrc_header(here / star["rlnCtfImage"].iloc[0])
    ref = relion_tomo_dir / "Subtomo_bin2" / "Subtomograms" / "TS_01"
    rel_d, rel_w = _mrc_header(ref / "1_data.mrc"), _mrc_header(ref / "1_weights.mrc")
    crop, apix = 24, 6.0
    assert ours_d["n"] == (crop,) * 3 and ours_w["n"] == (crop // 2 + 1, crop, 2 * crop)
    assert ours_d["voxel"] == pytest.approx((apix,) * 3) and ours_w["voxel"] == pytest.approx((1 / apix,) * 3)
    rc = rel_d["n"][0]  # RELION's crop, 8 Å voxels: the same relations
    assert rel_w["n"] == (rc // 2 + 1, rc, 2 * rc) and rel_w["voxel"] == pytest.approx((1 / 8.0,) * 3)
    for ours, rel in ((ours_d, rel_d), (ours_w, rel_w)):
        for key in ("mode", "start", "angles", "axes", "nsymbt", "origin", "map"):
            assert ours[key] == rel[key], (key, ours[key], rel[key])
        assert ours["sampling"] == ours["n"]


def test_continue_resumes_a_tomographic_run(refined, monkeypatch):
    """``refine3d --continue run_it001_optimiser.star`` of a tomographic run: the stored half models, sampling
    state and the last _data.star (tomography layout) give the same final iteration as the uninterrupted run
    (measured: maps equal to 1e-8 relative) and the same outputs for the next job (run_data.star,
    run_optimisation_set.star naming the tomograms)."""
    here, _, _, form = refined
    monkeypatch.chdir(here)
    assert cli_main(["refine3d", "--continue", "Refine3D/run_it001_optimiser.star", "--o", "Continued/run",
                     "--iter", "2"]) == 0
    ours, _ = read_mrc(here / "Continued" / "run_class001.mrc")
    base, _ = read_mrc(here / "Refine3D" / "run_class001.mrc")
    assert np.abs(ours - base).max() <= 1e-4 * np.abs(base).max()
    a = read_star(here / "Continued" / "run_data.star")["particles"]
    b = read_star(here / "Refine3D" / "run_data.star")["particles"]
    assert list(a.columns) == list(b.columns)
    entries = read_optimisation_set(here / "Continued" / "run_optimisation_set.star", root=here)
    assert entries["rlnTomoParticlesFile"] == here / "Continued" / "run_data.star"
    assert entries["rlnTomoTomogramsFile"].name == "tomograms.star"
    assert "continuing from Refine3D/run_it001_optimiser.star" in (here / "Continued" / "run.out").read_text()
