"""Particle extraction: RELION 5.0.1 fixtures (mic/), simulated micrographs, re-extraction geometry, job errors."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryopipe.errors import CryopipeError
from cryopipe.extraction import (
    background_mask,
    default_bg_radius,
    extract_particles,
    extract_windows,
    flush_float16_subnormals,
    normalise,
    output_pixel_size,
    reextract_geometry,
    relion_round,
    remove_dust,
    rewindow_images,
)


# ----------------------------------------------------------------------------------------------- helpers


def _read_mic(relion_dir) -> torch.Tensor:
    with mrcfile.open(relion_dir / "mic" / "Micrographs" / "mic001.mrc", permissive=True) as m:
        assert m.header.mode == 12
        return torch.from_numpy(np.asarray(m.data, dtype=np.float32).copy())


def _read_stack(path) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32).copy()


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


# ------------------------------------------------------------------- (a) RELION fixture, core functions


@pytest.mark.parametrize("star,stack", [
    ("particles_truth.star", "Extract_truth/Micrographs/mic001.mrcs"),
    ("particles_autopick_thr3.star", "Extract_autopick_thr3/Micrographs/mic001.mrcs"),
])
def test_core_matches_relion_stack(relion_dir, star, stack):
    """--extract_size 64 --norm --bg_radius 24 --invert_contrast reproduces relion_preprocess to float precision.

    The autopick set has fractional coordinates (truncation rule) and particles whose box crosses the
    micrograph edge (x = 9.97: edge replication)."""
    mic = flush_float16_subnormals(_read_mic(relion_dir))
    parts = starfile.read(relion_dir / "mic" / star)["particles"]
    coords = torch.tensor(parts[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy())
    ours = extract_particles(mic, coords, 64, norm=True, bg_radius=24, invert=True).numpy()
    ref = _read_stack(relion_dir / "mic" / stack)
    assert ours.shape == ref.shape
    assert _corr(ours, ref).min() >= 0.98
    assert np.abs(ours - ref).max() < 1e-4
    # boxes crossing the edge are really exercised by the autopick set
    x0 = np.trunc(coords[:, 0].numpy()) - 32
    if "autopick" in star:
        assert (x0 < 0).any()


def test_float16_subnormal_flush_is_what_relion_does(relion_dir):
    """Without flushing float16 subnormals (|v| < 2^-14) a few pixels differ from RELION by ~1e-4 (after
    normalisation); with it the result is exact. This pins the reason for flush_float16_subnormals."""
    mic = _read_mic(relion_dir)
    parts = starfile.read(relion_dir / "mic" / "particles_truth.star")["particles"]
    coords = torch.tensor(parts[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy())
    ref = _read_stack(relion_dir / "mic" / "Extract_truth" / "Micrographs" / "mic001.mrcs")
    raw = extract_particles(mic, coords, 64, norm=True, bg_radius=24, invert=True).numpy()
    flushed = extract_particles(flush_float16_subnormals(mic), coords, 64, norm=True, bg_radius=24,
                                invert=True).numpy()
    assert np.abs(raw - ref).max() > 1e-5
    assert np.abs(flushed - ref).max() < 1e-6


def test_particle_centre_is_coordinate(relion_dir):
    """Extracted truth particles are centred: the (inverted, normalised) particle's centre of mass of the
    low-passed positive density lies within ~1.5 px of the box centre N//2 on average."""
    mic = flush_float16_subnormals(_read_mic(relion_dir))
    truth = starfile.read(relion_dir / "mic" / "Micrographs" / "mic001_truth.star")
    coords = torch.tensor(truth[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy())
    imgs = extract_particles(mic, coords, 64, norm=True, bg_radius=24, invert=True)
    avg = imgs.mean(0)  # average of 25 differently oriented particles: a centred blob
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    w = (avg - avg[background_mask(64, 24)].mean()).clamp_min(0)
    cy, cx = float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())
    assert abs(cx - 32) < 1.5 and abs(cy - 32) < 1.5


# --------------------------------------------------------------------- windowing / per-image operations


def test_window_edge_replication_and_truncation():
    mic = torch.arange(20 * 30, dtype=torch.float32).reshape(20, 30)  # value = 30*y + x
    coords = torch.tensor([[2.9, 3.2], [28.0, 18.99], [-0.5, 10.0]])
    w = extract_windows(mic, coords, 8)
    # particle 0: (long)2.9 = 2, (long)3.2 = 3 -> box x in [-2, 5], y in [-1, 6], clamped
    xs = np.clip(np.arange(-2, 6), 0, 29)
    ys = np.clip(np.arange(-1, 7), 0, 19)
    np.testing.assert_array_equal(w[0].numpy(), (30 * ys[:, None] + xs[None, :]).astype(np.float32))
    # particle 1 crosses the right and bottom edges
    xs = np.clip(np.arange(24, 32), 0, 29)
    ys = np.clip(np.arange(14, 22), 0, 19)
    np.testing.assert_array_equal(w[1].numpy(), (30 * ys[:, None] + xs[None, :]).astype(np.float32))
    # (long)(-0.5) = 0 (truncation toward zero, not floor)
    xs = np.clip(np.arange(-4, 4), 0, 29)
    np.testing.assert_array_equal(w[2, 4].numpy(), (30 * 10 + xs).astype(np.float32))
    with pytest.raises(CryopipeError, match="completely outside"):
        extract_windows(mic, torch.tensor([[50.0, 5.0]]), 8, name="m.mrc")


def test_rewindow_and_helpers():
    img = torch.arange(36.0).reshape(1, 6, 6)
    small = rewindow_images(img, 4)
    np.testing.assert_array_equal(small[0].numpy(), img[0, 1:5, 1:5].numpy())
    big = rewindow_images(img, 8)
    assert big[0, 4, 4] == img[0, 3, 3] and big[0, 0, 0] == 0 and big[0, 1:7, 1:7].equal(img[0])
    assert default_bg_radius(128) == 48                         # RELION GUI: 75 % of the box diameter
    assert default_bg_radius(256, scale=64) == 24               # scaled to the output box
    assert default_bg_radius(64, bg_diameter=50) == 25
    assert default_bg_radius(100, scale=30, bg_diameter=75) == 11  # 37.5*0.3 = 11.25 -> int
    assert output_pixel_size(1.0, 256, 64) == 4.0 and output_pixel_size(3.0, 64) == 3.0
    np.testing.assert_array_equal(relion_round(torch.tensor([0.5, -0.5, 1.5, -2.5, 0.49])).numpy(),
                                  [1, -1, 2, -3, 0])
    with pytest.raises(CryopipeError, match="bg_radius"):
        background_mask(64, 33)


def test_rescale_keeps_values_and_pixel_scale():
    """Fourier rescale 64 -> 32 of a smooth image equals the smooth function sampled at the coarser grid."""
    n, m = 64, 32
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float64) - n // 2,
                            torch.arange(n, dtype=torch.float64) - n // 2, indexing="ij")
    img = (2.0 + torch.exp(-(xx ** 2 + yy ** 2) / (2 * 6.0 ** 2))).unsqueeze(0)
    out = extract_particles(img[0], torch.tensor([[32.0, 32.0]]), n, scale=m)
    yy2, xx2 = torch.meshgrid(torch.arange(m, dtype=torch.float64) - m // 2,
                              torch.arange(m, dtype=torch.float64) - m // 2, indexing="ij")
    expect = 2.0 + torch.exp(-((2 * xx2) ** 2 + (2 * yy2) ** 2) / (2 * 6.0 ** 2))
    assert out.shape == (1, m, m)
    assert float((out[0].double() - expect).abs().max()) < 1e-3


# ------------------------------------------------------------- (b) normalisation on a noise micrograph


def test_normalised_background_statistics_on_noise_micrograph():
    """White noise on a tilted, offset micrograph: after --norm (with ramp) every particle's background has
    mean 0 and σ 1, and the pooled pixels of all boxes have mean 0 ± 0.02 and σ 1 ± 0.02 (the ramp is gone)."""
    g = torch.Generator().manual_seed(5)
    h = w = 1024
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    mic = 7.0 + 0.01 * xx - 0.02 * yy + 2.5 * torch.randn(h, w, generator=g)
    coords = torch.rand(150, 2, generator=g) * 900 + 60
    imgs = extract_particles(mic, coords, 64, norm=True, bg_radius=24)
    bg = background_mask(64, 24)
    per_mean = imgs[:, bg].double().mean(1)
    per_std = imgs[:, bg].double().std(1, unbiased=False)
    assert per_mean.abs().max() < 1e-6 and (per_std - 1).abs().max() < 1e-6
    assert abs(float(imgs.double().mean())) < 0.02
    assert abs(float(imgs.double().std()) - 1) < 0.02
    # without the ramp subtraction the gradient (±0.7 σ across the box) stays in: a clear failure
    no_ramp = extract_particles(mic, coords, 64, norm=True, bg_radius=24, ramp=False)
    corner_diff = (no_ramp[:, -8:, :8].mean((1, 2)) - no_ramp[:, :8, -8:].mean((1, 2))).mean()
    assert float(corner_diff) < -0.5


def test_normalise_constant_image_is_skipped_and_dust_removal():
    const = torch.full((2, 32, 32), 3.0)
    # σ = 0: left unnormalised (RELION warns and skips); with the ramp the fitted plane (= 3) is still removed
    np.testing.assert_array_equal(normalise(const, 10, ramp=False).numpy(), const.numpy())
    assert float(normalise(const, 10).abs().max()) < 1e-12
    g = torch.Generator().manual_seed(0)
    img = torch.randn(4, 64, 64, generator=g)
    img[:, 10, 10] = 50.0   # white dust
    img[:, 40, 50] = -50.0  # black dust
    bg = background_mask(64, 24)
    out = remove_dust(img, bg, white_sigma=5, black_sigma=5, generator=torch.Generator().manual_seed(1))
    assert float(out[:, 10, 10].abs().max()) < 6 and float(out[:, 40, 50].abs().max()) < 6
    assert int((out != img).sum()) == 8  # only the dust pixels were replaced
    again = remove_dust(img, bg, white_sigma=5, black_sigma=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)       # seeded
    only_white = remove_dust(img, bg, white_sigma=5, black_sigma=-1, generator=torch.Generator().manual_seed(1))
    assert float(only_white[:, 40, 50].max()) == -50.0
    normed = normalise(img, 24, white_dust=5, black_dust=5, generator=torch.Generator().manual_seed(1))
    assert float(normed.abs().max()) < 6


# ------------------------------------------------ (c) noise-free micrograph with known centred projections


def test_extracted_particles_equal_centred_projections(relion_dir):
    """Place centred RELION projections (proj_noctf, shifted back by their origins) at known integer positions
    of an empty micrograph; extraction at those coordinates returns the projections (also at fractional
    coordinates, which are truncated), and the normalised extraction correlates ≥ 0.99 with them."""
    from cryopipe.core.fourier import shift_images

    meta = starfile.read(relion_dir / "proj_noctf.star")
    meta = meta["particles"] if isinstance(meta, dict) else meta
    proj = torch.from_numpy(_read_stack(relion_dir / "proj_noctf.mrcs")[:12]).double()
    origins = torch.tensor(meta[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[:12]) / 3.0
    centred = shift_images(proj, origins)  # observation = shift(P, -o)  =>  P = shift(obs, +o)
    n = proj.shape[-1]
    mic = torch.zeros(400, 300, dtype=torch.float64)
    pos = torch.tensor([[40 + 70 * (i % 4), 40 + 80 * (i // 4)] for i in range(12)])  # (x, y)
    for i in range(12):  # test set-up only: paste the images
        x, y = int(pos[i, 0]), int(pos[i, 1])
        mic[y - n // 2:y + n - n // 2, x - n // 2:x + n - n // 2] += centred[i]
    got = extract_windows(mic, pos.double() + torch.tensor([0.7, 0.3]), n)
    assert float((got - centred).abs().max()) < 1e-12
    normed = extract_particles(mic, pos.double(), n, norm=True, bg_radius=18)
    assert _corr(normed.numpy(), centred.numpy()).min() >= 0.99


# ---------------------------------------------------------------------------- (d) re-extraction geometry


def test_reextraction_recentres_to_the_pixel():
    """A particle with origin o (px) at coordinate c re-extracted with --recenter gives the image extracted at
    c − o, to the pixel; sub-pixel remainders stay as origins; without --recenter nothing changes."""
    g = torch.Generator().manual_seed(3)
    mic = torch.randn(300, 300, generator=g, dtype=torch.float64)
    c = torch.tensor([[100.0, 120.0], [150.0, 90.0], [200.3, 210.6], [80.0, 80.0]])
    o_px = torch.tensor([[3.0, -5.0], [-7.0, 2.0], [1.4, -2.6], [2.5, -2.5]])
    apix = 1.5
    new_c, new_o = reextract_geometry(c, o_px * apix, torch.full((4,), apix), torch.full((4,), apix), recenter=True)
    expect_c = c - relion_round(o_px.double())
    torch.testing.assert_close(new_c, expect_c)
    torch.testing.assert_close(new_o / apix, o_px.double() - relion_round(o_px.double()))
    assert new_c[3].tolist() == [77.0, 83.0]  # RELION ROUND: half away from zero
    a = extract_windows(mic, new_c[:2], 32)
    b = extract_windows(mic, c[:2] - o_px[:2], 32)
    assert torch.equal(a, b)
    # particle centre (coordinate − origin) is invariant
    torch.testing.assert_close(new_c - new_o / apix, c.double() - o_px.double())
    same_c, same_o = reextract_geometry(c, o_px * apix, torch.full((4,), apix), torch.full((4,), apix))
    torch.testing.assert_close(same_c, c.double())
    torch.testing.assert_close(same_o, (o_px * apix).double())
    zc, zo = reextract_geometry(c, o_px * apix, apix, apix, reset_offsets=True)
    assert torch.equal(zo, torch.zeros_like(zo)) and torch.equal(zc, c.double())


def test_reextraction_binned_particles_and_recenter_point(relion_dir):
    """Refined at 2× binning (6 Å) re-extracted from 3 Å micrographs: origins convert to micrograph pixels.
    With --recenter_x/y/z the origins first become those of relion_star_handler --center (fixture)."""
    cin = starfile.read(relion_dir / "center_in.star")["particles"]
    cout = starfile.read(relion_dir / "center_out.star")["particles"]
    ang = torch.tensor(cin[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    o_in = torch.tensor(cin[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    o_ref = torch.tensor(cout[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    c = torch.full((len(cin), 2), 500.0)
    pytest.importorskip("cryopipe.core.geometry")
    new_c, new_o = reextract_geometry(c, o_in, 3.0, 3.0, angles_deg=ang, recenter=True,
                                      recenter_xyz=(2, -1, 3))
    # the centre (coordinate − origin) in micrograph px equals RELION's re-centred centre
    torch.testing.assert_close(new_c - new_o / 3.0, c - o_ref / 3.0, atol=1e-4, rtol=0)
    assert float(new_o.abs().max()) <= 1.5 + 1e-9  # |remainder| <= 0.5 px
    # binned refinement: particle pixel 6 Å, micrograph 3 Å -> an origin of 2 particle px = 4 micrograph px
    b_c, b_o = reextract_geometry(torch.tensor([[100.0, 100.0]]), torch.tensor([[12.0, -6.0]]), 6.0, 3.0)
    torch.testing.assert_close(b_o, torch.tensor([[12.0, -6.0]], dtype=torch.float64))  # Å unchanged
    b_c, b_o = reextract_geometry(torch.tensor([[100.0, 100.0]]), torch.tensor([[12.0, -6.0]]), 6.0, 3.0,
                                  recenter=True)
    torch.testing.assert_close(b_c, torch.tensor([[96.0, 102.0]], dtype=torch.float64))
    assert float(b_o.abs().max()) == 0.0
    with pytest.raises(CryopipeError, match="rlnOriginXAngst"):
        reextract_geometry(c, None, 3.0, 3.0, recenter=True)
    with pytest.raises(CryopipeError, match="rlnAngleRot"):
        reextract_geometry(c, o_in, 3.0, 3.0, recenter=True, recenter_xyz=(1, 0, 0))


def test_extraction_of_simulated_micrograph_gives_the_projections(relion_dir):
    """cryopipe.sim.micrographs renders projections of ref_map (no CTF, no noise) at known coordinates; extracting
    at those coordinates returns each projection (corr ≥ 0.99; boxes do not overlap, so in fact exactly)."""
    sim = pytest.importorskip("cryopipe.sim.micrographs")
    from cryopipe.core.fourier import irfft2_centered
    from cryopipe.core.geometry import euler_to_matrix
    from cryopipe.core.projector import Projector

    with mrcfile.open(relion_dir / "ref_map.mrc", permissive=True) as m:
        vol = torch.from_numpy(np.asarray(m.data, dtype=np.float32).copy())
    rng = np.random.default_rng(11)
    shape = (400, 500)
    coords = sim.place_particles(12, shape, min_distance_px=70, edge_px=30, rng=rng)
    angles = torch.tensor(rng.uniform(0, 180, size=(len(coords), 3)), dtype=torch.float32)
    proj = Projector(vol)
    mic = sim.render_projections(proj, angles, torch.from_numpy(coords), shape)
    truth = irfft2_centered(proj.project(euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]), None), 48)
    got = extract_windows(mic, torch.from_numpy(coords).double(), 48)
    assert len(coords) >= 8
    assert _corr(got.numpy(), truth.numpy()).min() >= 0.99
    assert float((got - truth).abs().max()) < 1e-5 * float(truth.abs().max()) + 1e-6


# ------------------------------------------------------------------------------ the `cryopipe extract` job


@pytest.fixture()
def mic_project(relion_dir, tmp_path, monkeypatch):
    """A project directory holding the mic/ fixture inputs (micrograph, CTF STAR, coordinate lists)."""
    import shutil

    src = relion_dir / "mic"
    (tmp_path / "Micrographs").mkdir()
    for f in ("Micrographs/mic001.mrc", "Micrographs/mic001_truth.star", "micrographs_ctf.star",
              "coords_truth_list.star", "AutoPick_thr3/autopick.star",
              "AutoPick_thr3/Micrographs/mic001_autopick.star"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, tmp_path / f)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cli(*argv) -> int:
    """Run the job as `cryopipe extract ...` does (its own parser, so other jobs' modules are not imported);
    user errors are reported as the CLI does: one line on stderr, status 1."""
    import argparse
    import sys

    from cryopipe.cli import JOBS
    from cryopipe.jobs import extract as job

    assert JOBS["extract"] == "cryopipe.jobs.extract"
    parser = argparse.ArgumentParser(prog="cryopipe extract")
    job.add_arguments(parser)
    try:
        return job.main(parser.parse_args(list(argv)))
    except CryopipeError as exc:
        print(f"cryopipe extract: error: {exc}", file=sys.stderr)
        return 1


def _compare_with_relion_star(ours_path, ref_path, ref_prefix, our_prefix):
    ours = starfile.read(ours_path)
    ref = starfile.read(ref_path)
    op, rp = ours["particles"], ref["particles"]
    assert set(op.columns) == set(rp.columns), set(op.columns) ^ set(rp.columns)
    assert len(op) == len(rp)
    for col in rp.columns:
        if col == "rlnImageName":
            oi = op[col].str.partition("@")
            ri = rp[col].str.partition("@")
            np.testing.assert_array_equal(oi[0].astype(int), ri[0].astype(int))
            assert (oi[2] == ri[2].str.replace(ref_prefix, our_prefix, regex=False)).all()
        elif not pd.api.types.is_numeric_dtype(rp[col]):
            assert (op[col].astype(str) == rp[col].astype(str)).all(), col
        else:
            np.testing.assert_allclose(op[col].to_numpy(float), rp[col].to_numpy(float), rtol=0, atol=1e-6,
                                       err_msg=col)
    oo, ro = ours["optics"], ref["optics"]
    assert set(oo.columns) == set(ro.columns)
    for col in ro.columns:
        assert (oo[col].astype(str) == ro[col].astype(str)).all() if not pd.api.types.is_numeric_dtype(ro[col]) else \
            np.allclose(oo[col].to_numpy(float), ro[col].to_numpy(float)), col


@pytest.mark.parametrize("coords,ref_star,ref_dir", [
    ("coords_truth_list.star", "particles_truth.star", "Extract_truth/"),
    ("AutoPick_thr3/autopick.star", "particles_autopick_thr3.star", "Extract_autopick_thr3/"),
])
def test_job_reproduces_relion_extraction(relion_dir, mic_project, coords, ref_star, ref_dir):
    rc = _cli("--i", "micrographs_ctf.star", "--coord_list", coords, "--o", "Extract/job002/", "--extract",
              "--extract_size", "64", "--norm", "--bg_radius", "24", "--invert_contrast")
    assert rc == 0
    job = mic_project / "Extract" / "job002"
    stack = job / "Micrographs" / "mic001.mrcs"
    ours = _read_stack(stack)
    ref = _read_stack(relion_dir / "mic" / ref_dir / "Micrographs" / "mic001.mrcs")
    assert ours.shape == ref.shape
    assert _corr(ours, ref).min() >= 0.98
    assert np.abs(ours - ref).max() < 1e-4
    with mrcfile.open(stack, header_only=True) as m:
        assert m.header.mode == 2 and float(m.voxel_size.x) == pytest.approx(3.0) and int(m.header.ispg) == 0
    _compare_with_relion_star(job / "particles.star", relion_dir / "mic" / ref_star, ref_dir, "Extract/job002/")
    assert (job / "Micrographs" / "mic001_extract.star").exists()
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    pipe = starfile.read(mic_project / "default_pipeline.star")
    procs = pipe["pipeline_processes"]
    row = procs[procs["rlnPipeLineProcessName"] == "Extract/job002/"]
    assert row["rlnPipeLineProcessTypeLabel"].iloc[0] == "relion.extract"
    assert row["rlnPipeLineProcessStatusLabel"].iloc[0] == "Succeeded"
    nodes = pipe["pipeline_nodes"]
    assert "Extract/job002/particles.star" in set(nodes["rlnPipeLineNodeName"])


def test_job_float16_scale_and_continue(relion_dir, mic_project):
    rc = _cli("--i", "micrographs_ctf.star", "--coord_list", "coords_truth_list.star", "--o", "Extract/job003/",
              "--extract_size", "64", "--scale", "32", "--norm", "--invert_contrast", "--float16")
    assert rc == 0
    job = mic_project / "Extract" / "job003"
    stack = job / "Micrographs" / "mic001.mrcs"
    with mrcfile.open(stack, header_only=True) as m:
        assert m.header.mode == 12 and float(m.voxel_size.x) == pytest.approx(6.0)
    data = starfile.read(job / "particles.star")
    assert float(data["optics"]["rlnImagePixelSize"].iloc[0]) == 6.0
    assert int(data["optics"]["rlnImageSize"].iloc[0]) == 32
    imgs = _read_stack(stack)
    assert imgs.shape == (25, 32, 32)
    # default background radius: 75 % of the box, scaled: int(0.375 * 64 * 32/64) = 12
    bg = background_mask(32, 12).numpy()
    assert np.abs(imgs[:, bg].mean(1)).max() < 2e-3 and np.abs(imgs[:, bg].std(1) - 1).max() < 2e-3
    # the same computation in memory (float16 rounding only)
    mic = flush_float16_subnormals(_read_mic(relion_dir))
    coords = torch.tensor(data["particles"][["rlnCoordinateX", "rlnCoordinateY"]].to_numpy())
    expect = extract_particles(mic, coords, 64, scale=32, norm=True, bg_radius=12, invert=True).numpy()
    assert np.abs(imgs - expect).max() < 5e-3
    # --continue: the micrograph is kept, not re-extracted
    mtime = stack.stat().st_mtime_ns
    rc = _cli("--i", "micrographs_ctf.star", "--coord_list", "coords_truth_list.star", "--o", "Extract/job003/",
              "--extract_size", "64", "--scale", "32", "--norm", "--invert_contrast", "--float16", "--continue")
    assert rc == 0
    assert stack.stat().st_mtime_ns == mtime
    assert len(starfile.read(job / "particles.star")["particles"]) == 25


def test_job_reextraction_recenters(relion_dir, mic_project):
    """Refined particles with origins o (px) re-extracted with --recenter: coordinates c − o, images equal to
    extraction at c − o (to the pixel), origins 0, angles and CTF kept."""
    rc = _cli("--i", "micrographs_ctf.star", "--coord_list", "coords_truth_list.star", "--o", "Extract/job002/",
              "--extract_size", "64", "--norm", "--bg_radius", "24", "--invert_contrast")
    assert rc == 0
    data = starfile.read(mic_project / "Extract/job002/particles.star")
    parts = data["particles"]
    rng = np.random.default_rng(4)
    o_px = rng.integers(-6, 7, size=(len(parts), 2)).astype(float)
    parts["rlnOriginXAngst"] = o_px[:, 0] * 3.0
    parts["rlnOriginYAngst"] = o_px[:, 1] * 3.0
    parts["rlnDefocusU"] = 20000.0  # refined CTF: must be kept
    starfile.write({"optics": data["optics"], "particles": parts}, mic_project / "run_data.star")
    rc = _cli("--i", "micrographs_ctf.star", "--reextract_data_star", "run_data.star", "--recenter",
              "--o", "Extract/job004/", "--extract_size", "64", "--norm", "--bg_radius", "24", "--invert_contrast")
    assert rc == 0
    out = starfile.read(mic_project / "Extract/job004/particles.star")["particles"]
    c = parts[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    np.testing.assert_allclose(out[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), c - o_px)
    assert np.abs(out[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()).max() == 0
    np.testing.assert_allclose(out["rlnAngleRot"], parts["rlnAngleRot"])
    assert (out["rlnDefocusU"] == 20000.0).all()
    imgs = _read_stack(mic_project / "Extract/job004/Micrographs/mic001.mrcs")
    mic = flush_float16_subnormals(_read_mic(relion_dir))
    expect = extract_particles(mic, torch.tensor(c - o_px), 64, norm=True, bg_radius=24, invert=True).numpy()
    assert np.abs(imgs - expect).max() < 1e-6
    pipe = starfile.read(mic_project / "default_pipeline.star")["pipeline_processes"]
    assert "relion.extract.reextract" in set(pipe["rlnPipeLineProcessTypeLabel"])


def test_job_bad_input_one_line_error_and_no_output(mic_project, capsys):
    (mic_project / "bad_list.star").write_text(
        "\ndata_coordinate_files\n\nloop_\n_rlnMicrographName #1\n_rlnMicrographCoordinates #2\n"
        "Micrographs/mic999.mrc Micrographs/mic001_truth.star\n")
    rc = _cli("--i", "micrographs_ctf.star", "--coord_list", "bad_list.star", "--extract_size", "64", "--norm")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "mic999.mrc" in err and "not in" in err
    rc = _cli("--i", "micrographs_ctf.star", "--coord_list", "coords_truth_list.star", "--extract_size", "63")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "63" in err and "even" in err
    rc = _cli("--i", "micrographs_ctf.star", "--coord_list", "coords_truth_list.star", "--extract_size", "64",
              "--norm", "--bg_radius", "40")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "bg_radius" in err
    from cryopipe.io.mrc import mrc_info

    _, ny, nx = mrc_info(mic_project / "Micrographs" / "mic001.mrc").shape
    too_big = 2 * max(nx, ny)
    rc = _cli("--i", "micrographs_ctf.star", "--coord_list", "coords_truth_list.star", "--extract_size", str(too_big))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and f"smaller than --extract_size {too_big}" in err
    assert not (mic_project / "Extract").exists()
    assert not (mic_project / "default_pipeline.star").exists()


def test_job_coord_dir_and_fom_threshold(relion_dir, mic_project):
    """--coord_dir/--coord_suffix finds AutoPick_thr3/Micrographs/mic001_autopick.star; --minimum_pick_fom keeps
    picks with FOM above it; the kept images equal RELION's for the same picks."""
    rc = _cli("--i", "micrographs_ctf.star", "--coord_dir", "AutoPick_thr3", "--coord_suffix", "_autopick.star",
              "--o", "Extract/job005/", "--extract_size", "64", "--norm", "--bg_radius", "24", "--invert_contrast",
              "--minimum_pick_fom", "0.5")
    assert rc == 0
    ref_parts = starfile.read(relion_dir / "mic" / "particles_autopick_thr3.star")["particles"]
    keep = (ref_parts["rlnAutopickFigureOfMerit"] > 0.5).to_numpy()
    out = starfile.read(mic_project / "Extract/job005/particles.star")["particles"]
    assert len(out) == keep.sum() and 0 < keep.sum() < len(ref_parts)
    np.testing.assert_allclose(out["rlnAutopickFigureOfMerit"], ref_parts["rlnAutopickFigureOfMerit"][keep])
    ours = _read_stack(mic_project / "Extract/job005/Micrographs/mic001.mrcs")
    ref = _read_stack(relion_dir / "mic" / "Extract_autopick_thr3" / "Micrographs" / "mic001.mrcs")[keep]
    assert np.abs(ours - ref).max() < 1e-4


def test_python_api_plain_output_dir(relion_dir, mic_project):
    from cryopipe.extraction.plan import ExtractOptions
    from cryopipe.extraction.run import extract

    path, n = extract("micrographs_ctf.star", "out/", coord_list="coords_truth_list.star",
                      options=ExtractOptions(extract_size=64, norm=True, bg_radius=24, invert_contrast=True))
    assert n == 25 and Path(path).resolve() == (mic_project / "out" / "particles.star").resolve()
    parts = starfile.read(path)["particles"]
    assert parts["rlnImageName"].iloc[0] == "00000001@out/Micrographs/mic001.mrcs"
    ref = _read_stack(relion_dir / "mic" / "Extract_truth" / "Micrographs" / "mic001.mrcs")
    assert np.abs(_read_stack(mic_project / "out/Micrographs/mic001.mrcs") - ref).max() < 1e-4
    assert not (mic_project / "default_pipeline.star").exists()
