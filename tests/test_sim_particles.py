"""sim.particles: simulated particle stacks vs independent recomputation and RELION's relion_project output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import irfft2_centered
from cryopipe.core.geometry import euler_to_matrix, random_orientations
from cryopipe.core.projector import Projector
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import ImageReader, MrcStack, read_mrc
from cryopipe.io.star import read_star
from cryopipe.sim.particles import (
    JUNK_CONTAMINATION,
    JUNK_EMPTY,
    JUNK_LABEL,
    JUNK_NONE,
    estimate_particle_radius,
    particle_images,
    random_ctf_parameters,
    simulate_particles,
)

APIX = 3.0


@pytest.fixture(scope="module")
def ref_map(relion_dir):
    vol, apix = read_mrc(relion_dir / "ref_map.mrc")
    assert apix == pytest.approx(APIX)
    return vol


def _ctf_columns(df, idx=slice(None)):
    cols = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor"]
    out = {}
    for c in cols:
        v = df[c].to_numpy()[idx] if c in df else np.full(len(df), 0.0 if c != "rlnCtfScalefactor" else 1.0)[idx]
        out[c] = torch.tensor(np.array(v), dtype=torch.float32)
    return out


@pytest.mark.parametrize("name,with_ctf", [("proj_ctf", True), ("proj_noctf", False)])
def test_particle_images_match_relion_project(relion_dir, ref_map, name, with_ctf):
    """Our image formation at RELION's rows reproduces relion_project's stack (same map, pad 2, trilinear)."""
    df = read_star(relion_dir / f"{name}.star")["particles"]
    theirs = MrcStack(relion_dir / f"{name}.mrcs")[:]
    proj = Projector(torch.as_tensor(ref_map), pad=2)
    angles = torch.as_tensor(df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), dtype=torch.float32)
    origins = torch.as_tensor(df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / APIX, dtype=torch.float32)
    ours = particle_images(proj, angles, origins, APIX, _ctf_columns(df) if with_ctf else None).numpy()
    for a, b in zip(ours, theirs):
        cc = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert cc > 0.999, cc
        assert float((a * b).sum() / (a * a).sum()) == pytest.approx(1.0, abs=0.01)


def test_random_geometry_distributions():
    rng = np.random.default_rng(5)
    ang = random_orientations(20000, rng).numpy()
    assert ang[:, 0].min() >= 0 and ang[:, 0].max() < 360 and ang[:, 2].max() < 360
    # uniform on SO(3): cos(tilt) uniform on [-1, 1] (mean 0, variance 1/3)
    ct = np.cos(np.radians(ang[:, 1]))
    assert abs(ct.mean()) < 0.02 and np.var(ct) == pytest.approx(1 / 3, abs=0.01)
    ctf = random_ctf_parameters(5000, rng, (8000, 20000), 1000)
    assert ctf["rlnDefocusU"].min() >= 8000 and ctf["rlnDefocusU"].max() <= 20000
    assert np.abs(ctf["rlnDefocusU"] - ctf["rlnDefocusV"]).max() <= 1000 + 1e-9
    assert ctf["rlnDefocusV"].min() >= 8000 and ctf["rlnDefocusV"].max() <= 20000
    assert ctf["rlnDefocusAngle"].min() >= 0 and ctf["rlnDefocusAngle"].max() < 180


def test_particle_radius_of_enolase(ref_map):
    # atomic model: max radius 37.3 Å = 12.4 px; the band-limited map at 10 % of its maximum reaches ~38 Å
    assert estimate_particle_radius(ref_map) * APIX == pytest.approx(37.3, abs=2.0)


def test_noise_free_stack_equals_ctf_projection_of_truth(tmp_path, ref_map):
    """snr=inf: every written image is CTF · projection at the truth angles/origins, recomputed independently."""
    res = simulate_particles(ref_map, 70, APIX, math.inf, tmp_path / "sim", seed=11, max_shift_A=9.0,
                             phase_shift_range=(0, 90), bfactor_range=(0, 150), batch_size=16, images_per_stack=30,
                             device="cpu")
    assert len(res.stack_paths) == 3 and res.noise_sigma == 0.0
    star = read_star(res.star_path)
    truth = read_star(res.truth_path)["particles"]
    main = star["particles"]
    assert "rlnAngleRot" not in main and "rlnOriginXAngst" not in main  # truth stays out of the main file
    assert list(main["rlnImageName"]) == list(truth["rlnImageName"])
    opt = star["optics"].iloc[0]
    assert opt["rlnImagePixelSize"] == APIX and opt["rlnImageSize"] == 48 and opt["rlnImageDimensionality"] == 2
    assert truth["rlnOriginXAngst"].abs().max() <= 9.0 and truth["rlnPhaseShift"].max() > 10
    imgs = ImageReader(main["rlnImageName"], root_dir=res.star_path.parent).read(np.arange(len(main)))
    # independent recomputation: projector + CTF, origin shift by -origin (design.md)
    proj = Projector(torch.as_tensor(ref_map), pad=2)
    rot = euler_to_matrix(*[torch.tensor(truth[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")])
    origin_px = torch.tensor(truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / APIX)
    ctf = ctf_2d(48, APIX, *[torch.tensor(truth[c].to_numpy()) for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")],
                 voltage=300, cs=2.7, amplitude_contrast=0.1,
                 phase_shift=torch.tensor(truth["rlnPhaseShift"].to_numpy()),
                 bfactor=torch.tensor(truth["rlnCtfBfactor"].to_numpy()))
    expected = irfft2_centered(proj.project(rot.float(), -origin_px.float()) * ctf, 48).numpy()
    scale = np.abs(expected).max()
    assert np.abs(imgs - expected).max() < 1e-4 * scale
    # the written truth map is the input volume
    np.testing.assert_array_equal(read_mrc(res.map_path)[0], ref_map)


def test_measured_snr_matches_request(tmp_path, ref_map):
    kw = dict(seed=3, batch_size=64, device="cpu", signal_radius_px=12.5)
    clean = simulate_particles(ref_map, 200, APIX, math.inf, tmp_path / "clean", **kw)
    noisy = simulate_particles(ref_map, 200, APIX, 0.1, tmp_path / "noisy", **kw)
    a = MrcStack(clean.stack_paths[0])[:].astype(np.float64)
    b = MrcStack(noisy.stack_paths[0])[:].astype(np.float64)
    noise = b - a
    c = np.arange(48) - 24
    disc = (c[:, None] ** 2 + c[None, :] ** 2) <= 12.5 ** 2
    signal_var = a[:, disc].var()
    snr = signal_var / noise.var()
    assert snr == pytest.approx(0.1, rel=0.10)
    assert abs(noise.mean()) < 0.02 * noise.std()
    # white: the noise is uncorrelated between neighbouring pixels
    assert abs(np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]) < 0.02
    # same seed -> same geometry in both files
    t1, t2 = read_star(clean.truth_path)["particles"], read_star(noisy.truth_path)["particles"]
    np.testing.assert_array_equal(t1["rlnAngleRot"], t2["rlnAngleRot"])


def test_junk_particles_and_truth_in_main(tmp_path, ref_map):
    res = simulate_particles(ref_map, 100, APIX, math.inf, tmp_path / "junk", seed=7, frac_empty=0.2,
                             frac_contamination=0.1, truth_in_main=True, dtype="float16", device="cpu")
    star = read_star(res.star_path)["particles"]
    truth = read_star(res.truth_path)["particles"]
    assert "rlnAngleRot" in star and JUNK_LABEL not in star
    labels = truth[JUNK_LABEL].to_numpy()
    assert (labels == JUNK_EMPTY).sum() == 20 and (labels == JUNK_CONTAMINATION).sum() == 10
    assert MrcStack(res.stack_paths[0]).mode == 12
    imgs = MrcStack(res.stack_paths[0])[:]
    sig = math.sqrt(res.signal_variance)
    assert np.all(imgs[labels == JUNK_EMPTY] == 0)
    cont = imgs[labels == JUNK_CONTAMINATION]
    assert np.all(cont.max(axis=(1, 2)) > 1.5 * sig) and np.all(cont.min(axis=(1, 2)) >= -1e-3)
    good = imgs[labels == JUNK_NONE]
    assert np.all(good.std(axis=(1, 2)) > 0.1 * sig) and np.all(good.min(axis=(1, 2)) < 0)  # CTF'd particles


def test_bad_input(tmp_path, ref_map):
    with pytest.raises(CryopipeError, match="SNR"):
        simulate_particles(ref_map, 10, APIX, 0.0, tmp_path / "x", device="cpu")
    with pytest.raises(CryopipeError, match="junk fractions"):
        simulate_particles(ref_map, 10, APIX, 1.0, tmp_path / "x", frac_empty=0.8, frac_contamination=0.5)
    with pytest.raises(CryopipeError, match="cube"):
        simulate_particles(ref_map[:, :, :40], 10, APIX, 1.0, tmp_path / "x")


def test_views_option_draws_only_given_views(tmp_path):
    """``views=``: every true particle has one of the given (rot, tilt) views, psi free; junk rows get view 0."""

    from cryopipe.io.star import read_star
    from cryopipe.sim.atomic import load_model, potential_map
    from cryopipe.sim.particles import VIEW_LABEL, simulate_particles

    vol = potential_map(load_model("3enl"), 32, 3.0)
    r = simulate_particles(vol, 60, 3.0, 0.1, tmp_path, views=[[0, 0], [90, 90], [45, 60]], frac_empty=0.2, seed=2)
    t = read_star(r.truth_path)["particles"]
    good = t[t.cryopipeJunkType == 0]
    assert set(zip(good.rlnAngleRot.round(6), good.rlnAngleTilt.round(6))) == {(0, 0), (90, 90), (45, 60)}
    assert set(good[VIEW_LABEL]) == {1, 2, 3} and (t[VIEW_LABEL][t.cryopipeJunkType != 0] == 0).all()
    assert good.rlnAnglePsi.std() > 50  # psi still uniform
