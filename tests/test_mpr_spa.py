"""Multi-particle refinement of single particles (cryopipe.mpr.spa, `cryopipe mpr` without tomograms): per-particle
defocus and per-optics-group beam tilt recovered on a small simulated set, written as RELION does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryopipe.cli import main as cli_main
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import write_mrc
from cryopipe.io.particles import read_particles, write_particles
from cryopipe.io.star import read_star
from cryopipe.mpr.driver import Stage
from cryopipe.mpr.spa import check_spa_stages

BEAM_TILT = (1.0, -0.6)  # mrad
DEFOCUS_ERROR_A = 500.0


@pytest.fixture(scope="module")
def spa(tmp_path_factory):
    """80 particles of 3ENL at 2 Å (box 48, SNR 2, defocus 0.8–2 µm) with a beam tilt of (1.0, −0.6) mrad that
    the STAR does not know, and per-particle defocus errors (sd 500 Å). Half-maps from 300 other particles of the
    same optics, reconstructed at their true metadata (with so few particles, half-maps of the refined particles
    themselves would hold each particle's own image at its wrong parameters and pull it back; bench_mpr_spa
    refines against those)."""
    from cryopipe.jobs.simulate import build_volume
    from cryopipe.mpr.reconstruct import reconstruct_halves
    from cryopipe.mpr.spa import prepare_particles
    from cryopipe.sim.particles import simulate_particles

    here = tmp_path_factory.mktemp("mpr_spa")
    vol, apix = build_volume("3enl", 48, 2.0)
    kw = dict(max_shift_A=3.0, defocus_range=(8000.0, 20000.0), astigmatism_A=500.0, beam_tilt_mrad=BEAM_TILT,
              truth_in_main=True, write_map=False, device="cpu")
    sim = simulate_particles(vol, 80, apix, 2.0, here / "data", seed=1, **kw)
    ref = simulate_particles(vol, 300, apix, 2.0, here / "ref", seed=2, **kw)
    p = read_particles(sim.star_path)
    err = np.random.default_rng(5).normal(0.0, DEFOCUS_ERROR_A, len(p))
    p.particles["rlnDefocusU"] += err
    p.particles["rlnDefocusV"] += err
    p.particles["rlnRandomSubset"] = np.arange(len(p)) % 2 + 1
    write_particles(here / "data" / "perturbed.star", p)
    data, _ = prepare_particles(read_particles(ref.truth_path), 48, 1.0, here / "ref")  # beam tilt demodulated
    h1, h2, _ = reconstruct_halves([data], 48, 1.0, snr=1.0)
    write_mrc(here / "half1.mrc", h1.numpy(), apix)
    write_mrc(here / "half2.mrc", h2.numpy(), apix)
    truth = read_particles(sim.truth_path).particles
    return {"dir": here, "star": here / "data" / "perturbed.star", "err": err,
            "truth_defocus": truth[["rlnDefocusU", "rlnDefocusV"]].to_numpy(float).mean(1), "truth_star": sim.truth_path,
            "half1": h1, "half2": h2, "apix": apix}


def test_spa_defocus_and_beam_tilt_recovered(spa):
    """One `cryopipe mpr` run (defocus + beam tilt, 2 sub-iterations; images read from disk in 3 sets of <= 32
    particles that share the beam tilt) on the perturbed set: the RMS error of the
    per-particle mean defocus vs truth falls below 25 % of the injected 500 Å (seen: 461 -> 46 Å), the beam-tilt
    error below 10 % of the injected 1.17 mrad (seen: (1.007, −0.600)), and the masked FSC resolution of the
    particles' half-maps improves (seen: 5.65 -> 4.17 Å)."""
    d = spa["dir"]
    assert cli_main(["mpr", "--i", str(spa["star"]), "--half1", str(d / "half1.mrc"), "--half2",
                     str(d / "half2.mrc"), "--diameter", "80", "--o", str(d / "out"), "--stage", "defocus,beamtilt",
                     "--iter", "2", "--lbfgs_iter", "6", "--ctf_minresolution", "10", "--device", "cpu",
                     "--spa_images_per_set", "32"]) == 0
    out = read_particles(d / "out" / "particles.star")
    mean = out.particles[["rlnDefocusU", "rlnDefocusV"]].to_numpy(float).mean(1)
    before = float(np.sqrt(np.mean(spa["err"] ** 2)))
    after = float(np.sqrt(np.mean((mean - spa["truth_defocus"]) ** 2)))
    assert after < 0.25 * before, (before, after)
    bt = out.optics[["rlnBeamTiltX", "rlnBeamTiltY"]].to_numpy(float)[0]
    bt_err = float(np.hypot(*(bt - np.array(BEAM_TILT))))
    assert bt_err < 0.1 * float(np.hypot(*BEAM_TILT)), bt
    general = read_star(d / "out" / "fsc.star")["general"]
    assert float(general["cryopipeResolutionAfter"]) < float(general["cryopipeResolutionBefore"])
    print(f"defocus RMS {before:.0f} -> {after:.0f} Å, beam tilt {bt}, FSC {general['cryopipeResolutionBefore']} -> "
          f"{general['cryopipeResolutionAfter']}")
    assert (d / "out" / "half1.mrc").exists() and (d / "out" / "mpr_log.txt").exists()


def test_spa_refuses_tilt_series_groups(spa, tmp_path):
    assert cli_main(["mpr", "--i", str(spa["star"]), "--half1", str(spa["dir"] / "half1.mrc"),
                     "--half2", str(spa["dir"] / "half2.mrc"), "--diameter", "80", "--o", str(tmp_path / "o"),
                     "--stage", "poses,imagewarp", "--iter", "1"]) != 0
    assert not (tmp_path / "o").exists()
    with pytest.raises(CryopipeError, match="tilt series only"):
        check_spa_stages([Stage(("defocus", "shifts"), 1)])


def test_spa_beam_tilt_per_micrograph_and_sets(spa):
    """--beamtilt_per_micrograph: one beam-tilt group per rlnMicrographName, written back per particle (each
    particle its micrograph's value; the optics table unchanged); particle sets rebuild the whole data set, and
    shared_beam_tilt makes the sets' values one again, weighted by how many of a group's particles each holds."""
    import torch

    from cryopipe.mpr.spa import joined_subsets, particle_subset, prepare_particles, shared_beam_tilt, \
        updated_spa_particles

    p = read_particles(spa["star"])
    p.particles["rlnMicrographName"] = [f"Micrographs/m{i // 20}.mrc" for i in range(len(p))]  # 4 micrographs
    mics = p.particles["rlnMicrographName"].astype(str).to_numpy()
    data, ids = prepare_particles(p, 48, 1.0, spa["dir"] / "data", beam_tilt_per_micrograph=True, load_images=False)
    assert len(ids) == len(np.unique(mics)) > 1 and data.beam_tilt.shape == (len(ids), 2)
    rows = [np.arange(0, 30), np.arange(30, len(p))]
    parts = [particle_subset(data, r) for r in rows]
    assert torch.equal(joined_subsets(data, parts).defocus, data.defocus)
    parts[0] = type(parts[0])(**{**parts[0].__dict__, "beam_tilt": parts[0].beam_tilt + 1.0})
    sets = {"a": parts[0], "b": parts[1]}
    shared_beam_tilt(sets)
    counts = torch.stack([torch.bincount(d.beam_group, minlength=len(ids)) for d in parts]).double()
    expected = data.beam_tilt + (counts[0] / counts.sum(0))[:, None]
    assert torch.allclose(sets["a"].beam_tilt, expected) and torch.allclose(sets["b"].beam_tilt, expected)
    data.beam_tilt = torch.arange(2 * len(ids), dtype=torch.float64).reshape(-1, 2)
    out = updated_spa_particles(p, data, beam_tilt_per_micrograph=True)
    first = {m: i for i, m in enumerate(ids)}
    want = data.beam_tilt.numpy()[[first[m] for m in mics]]
    assert np.allclose(out.particles[["rlnBeamTiltX", "rlnBeamTiltY"]].to_numpy(float), want)
    assert out.optics.equals(p.optics)


def test_spa_magnification_and_aberrations_recovered(spa):
    """Single particles (the fixture's 80, at their true metadata incl. the beam tilt) whose images carry a trefoil
    (FT × exp(iφ), 0.64 / 0.4 rad at 5 Å), or whose metadata carry an anisotropic magnification (0.6 %) or 4th-order
    symmetric terms: refining ``oddzernike``, ``magnification`` or ``evenzernike`` alone at 5 Å recovers each within
    the stated fraction of the injected error (vector / Frobenius norm), and the beam tilt refined with the trefoil
    stays within 0.2 mrad of the truth (well seen at 5 Å). The magnification is injected into the metadata, not the
    images: these 48-px boxes at 0.8–2 µm defocus hold an aliased CTF (ring spacing below a Fourier pixel at 5 Å),
    which resampling the images scrambles; and it is kept small because at 5 Å the CTF phase is ~30 rad, so a 2 %
    error would be ~1 rad, beyond a local optimiser's basin."""
    from dataclasses import replace

    import torch
    from test_mpr_groups import _aberrated

    from cryopipe.mpr.driver import make_species, species_mask
    from cryopipe.mpr.forward import zero_parameters
    from cryopipe.mpr.optimise import refine_tilt_series
    from cryopipe.mpr.parameters import MAG_UNIT, even_from_fourth_order, odd_from_trefoil
    from cryopipe.mpr.spa import prepare_particles

    data, _ = prepare_particles(read_particles(spa["truth_star"]), 48, 1.0, spa["dir"] / "data")
    species = make_species(spa["half1"], spa["half2"], species_mask(None, 48, spa["apix"], 80.0, 5.0), 1.0)
    k_max = 48 * spa["apix"] / 5.0

    def refine(d, group):
        params = zero_parameters(d)
        refine_tilt_series(d, species, params, (group,), k_max, lbfgs_iterations=12)
        return params

    E = torch.tensor([[0.006, 0.003], [-0.002, -0.004]], dtype=torch.float64)
    p = refine(replace(data, mag_matrix=torch.eye(2, dtype=torch.float64) + E), "magnification")
    mag_residual = MAG_UNIT * p.magnification + E
    t0 = torch.tensor([0.08, -0.05], dtype=torch.float64)
    p = refine(replace(data, images=_aberrated(data.images, odd_from_trefoil(t0), data.pixel_size)), "oddzernike")
    trefoil_residual, bt = p.trefoil - t0, p.beam_tilt
    e0 = torch.tensor([0.03, -0.04, 0.05, 0.03, -0.03], dtype=torch.float64)
    p = refine(replace(data, even_zernike=even_from_fourth_order(e0)), "evenzernike")
    even_residual = p.fourth_order + e0
    print("SPA residuals: magnification", mag_residual.tolist(), "trefoil", trefoil_residual.tolist(), "beam tilt",
          bt.tolist(), "4th order", even_residual.tolist())
    assert float(mag_residual.norm()) < 0.35 * float(E.norm())  # seen: 22 %
    assert float(trefoil_residual.norm()) < 0.2 * float(t0.norm())  # seen: 5 %
    assert float(bt.abs().max()) < 0.2
    assert float(even_residual.norm()) < 0.25 * float(e0.norm())  # seen: 8 %


def test_spa_optics_groups_written_to_the_optics_table(spa, tmp_path):
    """`cryopipe mpr` on single particles with magnification + oddzernike + evenzernike writes rlnMagMat00..11,
    rlnOddZernike (6 values) and rlnEvenZernike (9 values) into the optics table, keeps rlnBeamTiltX/Y there, and
    reads them back (prepare_particles); particles of two optics groups are refused for these groups."""
    from cryopipe.mpr.driver import MprOptions, parse_vector
    from cryopipe.mpr.spa import prepare_particles, run_mpr_spa

    d = spa["dir"]
    assert cli_main(["mpr", "--i", str(spa["star"]), "--half1", str(d / "half1.mrc"), "--half2", str(d / "half2.mrc"),
                     "--diameter", "80", "--o", str(tmp_path / "out"), "--stage",
                     "magnification,oddzernike,evenzernike", "--iter", "1", "--lbfgs_iter", "3", "--tolerance", "0",
                     "--ctf_minresolution", "10", "--device", "cpu"]) == 0
    out = read_particles(tmp_path / "out" / "particles.star")
    o = out.optics.iloc[0]
    assert len(parse_vector(o["rlnOddZernike"], "odd", "t")) == 6 and len(parse_vector(o["rlnEvenZernike"], "e", "t")) == 9
    assert {"rlnMagMat00", "rlnMagMat11", "rlnBeamTiltX"} <= set(out.optics.columns)
    back, _ = prepare_particles(out, 48, 1.0, d / "data", load_images=False)
    assert back.mag_matrix is not None and abs(float(back.mag_matrix[0, 0]) - float(o["rlnMagMat00"])) < 1e-8
    two = read_particles(spa["star"])
    extra = two.optics.iloc[[0]].copy()
    extra["rlnOpticsGroup"] = 2
    two.optics = pd.concat([two.optics, extra], ignore_index=True)
    two.particles["rlnOpticsGroup"] = np.arange(len(two.particles)) % 2 + 1
    with pytest.raises(CryopipeError, match="optics groups"):
        run_mpr_spa(two, spa["half1"], spa["half2"], spa["apix"], None, 80.0,
                    MprOptions(stages=[Stage(("oddzernike",), 1)], ctf_minresolution=10.0), log=lambda m: None)
