"""Particle extraction: RELION 5.0.1 fixtures (mic/), simulated micrographs, re-extraction geometry, job errors."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
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
