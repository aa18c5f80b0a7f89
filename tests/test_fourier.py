"""Tests for cryopipe.core.fourier: conventions, Fourier crop/pad (fourier_rescale), low/high-pass filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.core.fourier import (
    fourier_rescale,
    highpass,
    irfft2_centered,
    irfft3_centered,
    lowpass,
    lowpass_map,
    lowpass_weights,
    phase_shift_2d,
    radius_2d,
    radius_3d,
    resolution_shell,
    rfft2_centered,
    rfft3_centered,
)


def _bandlimited(shape: tuple[int, ...], kmax: float, seed: int = 0, ndim: int | None = None) -> torch.Tensor:
    """Random real array whose centred FT is zero for |k| >= kmax (Fourier pixels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    n = shape[-1]
    if (ndim or len(shape)) == 2:
        ft = rfft2_centered(x)
        ft = ft * (radius_2d(n, dtype=torch.float64) < kmax)
        return irfft2_centered(ft, n)
    ft = rfft3_centered(x)
    ft = ft * (radius_3d(n, dtype=torch.float64) < kmax)
    return irfft3_centered(ft, n)


def test_centre_is_phase_origin():
    n = 10
    img = torch.zeros(n, n, dtype=torch.float64)
    img[n // 2, n // 2] = 1.0
    ft = rfft2_centered(img)
    assert torch.allclose(ft, torch.ones_like(ft))


def test_phase_shift_moves_content_by_plus_shift():
    n = 16
    img = torch.zeros(n, n, dtype=torch.float64)
    img[8, 8] = 1.0
    out = irfft2_centered(phase_shift_2d(rfft2_centered(img), torch.tensor([3.0, -2.0], dtype=torch.float64), n), n)
    iy, ix = np.unravel_index(int(out.argmax()), out.shape)
    assert (ix, iy) == (11, 6)


@pytest.mark.parametrize("n,m", [(64, 32), (64, 33), (63, 40), (48, 30), (45, 25)])
def test_rescale_down_up_roundtrip_2d(n, m):
    x = _bandlimited((3, n, n), kmax=min(m, n) / 2 - 1.0, ndim=2)
    down = fourier_rescale(x, m, ndim=2)
    assert down.shape == (3, m, m)
    back = fourier_rescale(down, n, ndim=2)
    assert torch.allclose(back, x, atol=1e-10 * float(x.abs().max()) + 1e-12)
    # the mean (DC) is kept
    assert torch.allclose(down.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=1e-12)


def test_rescale_roundtrip_3d():
    x = _bandlimited((24, 24, 24), kmax=7.0, seed=3)
    down = fourier_rescale(x, 16)
    assert down.shape == (16, 16, 16)
    back = fourier_rescale(down, 24)
    assert torch.allclose(back, x, atol=1e-10)
    assert abs(float(down.mean()) - float(x.mean())) < 1e-12


def test_rescale_samples_same_continuous_function():
    # A smooth Gaussian sampled at apix a on n pixels, rescaled to m pixels, equals the same Gaussian sampled
    # at apix a*n/m (centre stays at N//2).
    n, m = 64, 40
    sigma_A = 6.0
    apix = 1.0

    def gauss(size, ap):
        c = (torch.arange(size, dtype=torch.float64) - size // 2) * ap
        return torch.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * sigma_A**2))

    out = fourier_rescale(gauss(n, apix), m)
    ref = gauss(m, apix * n / m)
    assert torch.allclose(out, ref, atol=1e-6)


def test_rescale_keeps_constant_and_is_real():
    x = torch.full((5, 32, 32), 2.5)
    for m in (17, 20, 48, 51):
        out = fourier_rescale(x, m, ndim=2)
        assert torch.allclose(out, torch.full_like(out, 2.5), atol=1e-5)


def test_rescale_pad_is_interpolation():
    # padding does not change the Fourier content: cropping back gives the input exactly for any image whose
    # Nyquist components are zero
    x = _bandlimited((40, 40), kmax=19.5, seed=5)
    up = fourier_rescale(x, 72)
    assert torch.allclose(fourier_rescale(up, 40), x, atol=1e-10)
    # on the common grid points (every 9/5 pixel) nothing to compare directly; check energy preserved (Parseval)
    e_in = (x**2).sum() / 40**2
    e_up = (up**2).sum() / 72**2
    assert math.isclose(float(e_in), float(e_up), rel_tol=1e-10)


def test_lowpass_highpass_complementary_and_shape():
    n = 48
    x = torch.randn(n, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ft = rfft3_centered(x)
    lp = lowpass(ft, res_A=12.0, pixel_size=3.0, edge_px=2.0)
    hp = highpass(ft, res_A=12.0, pixel_size=3.0, edge_px=2.0)
    assert torch.allclose(lp + hp, ft)
    r = radius_3d(n, dtype=torch.float64)
    shell = round(n * 3.0 / 12.0)  # 12
    w = lowpass(torch.ones_like(ft), res_A=12.0, pixel_size=3.0, edge_px=2.0).real
    assert torch.all(w[r <= shell - 1] == 1)
    assert torch.all(w[r >= shell + 1] == 0)
    # raised cosine: half amplitude at the cutoff shell, RELION's 0.5 + 0.5 cos(pi (r - lo) / width) between
    on = (r - shell).abs() < 1e-9
    assert torch.allclose(w[on], torch.full((1,), 0.5, dtype=torch.float64))
    mid = (r > shell - 1) & (r < shell + 1)
    expect = 0.5 + 0.5 * torch.cos(math.pi * (r[mid] - (shell - 1)) / 2.0)
    assert torch.allclose(w[mid], expect)
    assert torch.allclose(lp, ft * w)


def test_lowpass_2d_batch_and_real_output():
    n = 32
    imgs = torch.randn(4, n, n, generator=torch.Generator().manual_seed(2))
    ft = rfft2_centered(imgs)
    out = lowpass(ft, res_A=10.0, pixel_size=2.0, edge_px=3.0, ndim=2)
    assert out.shape == ft.shape
    r = radius_2d(n)
    assert torch.all(out[:, r > round(n * 2 / 10) + 1.5] == 0)
    # filtering a real image's FT with a radial filter keeps it real: round-trip is consistent
    img_f = irfft2_centered(out, n)
    assert torch.allclose(rfft2_centered(img_f), out, atol=1e-4)


def test_filters_reject_bad_input():
    ft = rfft2_centered(torch.zeros(16, 16))
    with pytest.raises(ValueError):
        lowpass(ft, res_A=0.0, pixel_size=1.0)
    with pytest.raises(ValueError):
        lowpass(torch.zeros(16, 7, dtype=torch.complex64), res_A=4.0, pixel_size=1.0)


@pytest.mark.parametrize("n,m", [(64, 32), (32, 64), (33, 20), (20, 33)])
def test_rescale_zeroes_smaller_grid_nyquist(n, m):
    x = torch.randn(2, n, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = fourier_rescale(x, m, ndim=2)
    ft = rfft2_centered(out)
    small = min(n, m)
    if small % 2 == 0:
        ky = torch.fft.fftfreq(m, d=1.0 / m, dtype=torch.float64)
        nyq_rows = ky.abs() == small // 2
        assert float(ft[:, nyq_rows, :].abs().max()) < 1e-9
        if small // 2 < ft.shape[-1]:
            assert float(ft[:, :, small // 2].abs().max()) < 1e-9
    # everything strictly inside the smaller grid's band is carried over with the (m/n)^2 scale
    src = rfft2_centered(x)
    kk = min(small // 2 - (1 if small % 2 == 0 else 0), 5)
    for ky in range(-kk, kk + 1):
        for kx in range(0, kk + 1):
            a = ft[:, ky % m, kx] * (n / m) ** 2
            b = src[:, ky % n, kx]
            assert torch.allclose(a, b, atol=1e-9)


# ------------------------------------------------------------------------------------------------------------
# one low-pass profile (issue 14 item 8): RELION's variants are options of core.fourier.lowpass_weights
# ------------------------------------------------------------------------------------------------------------

def test_resolution_shell_rounds_as_relion():
    assert resolution_shell(18, 3.0, 12.0) == 5.0  # 4.5 -> 5 (RELION's ROUND), not Python's banker's 4
    assert resolution_shell(48, 3.0, 12.0) == 12.0
    with pytest.raises(ValueError):
        resolution_shell(48, 3.0, 0.0)


def test_lowpass_map_reproduces_the_optimisers_former_filters():
    """The 3D optimiser's former ``lowpass_volume`` (edge beyond the cutoff) and class2d's former
    ``lowpass_raised_cosine_2d`` (centred edge, unclamped), written out here as they were, are ``lowpass_map`` with
    options: their callers moved to it without a change in numbers."""

    def former_lowpass_volume(vol, resolution_A, pixel_size, edge_shells=2.0):
        n = vol.shape[-1]
        f = torch.fft.fftfreq(n, dtype=torch.float64) * n
        fx = torch.fft.rfftfreq(n, dtype=torch.float64) * n
        r = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
        r0 = n * pixel_size / float(resolution_A)
        t = ((r - r0) / edge_shells).clamp(0, 1)
        filt = torch.where(r <= r0, torch.ones_like(r), 0.5 * (1 + torch.cos(math.pi * t)))
        filt = torch.where(r > r0 + edge_shells, torch.zeros_like(r), filt)
        return irfft3_centered(rfft3_centered(vol) * filt.to(vol.dtype), n).to(vol.dtype)

    def former_lowpass_raised_cosine_2d(images, radius_shells, width=2.0):
        n = images.shape[-1]
        ky = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
        kx = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)
        r = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
        lo = float(radius_shells) - width / 2.0
        hi = lo + width
        f = torch.where(r < lo, torch.ones_like(r),
                        torch.where(r > hi, torch.zeros_like(r), 0.5 - 0.5 * torch.cos(math.pi * (hi - r) / width)))
        return irfft2_centered(rfft2_centered(images.to(torch.float64)) * f, n).to(images.dtype)

    g = torch.Generator().manual_seed(3)
    vol = torch.randn(2, 24, 24, 24, generator=g, dtype=torch.float64)
    for res in (30.0, 17.3):
        ref = former_lowpass_volume(vol, res, 4.0)
        ours = lowpass_map(vol, 24 * 4.0 / res, 2.0, edge="outside")
        assert torch.allclose(ours, ref, atol=1e-12)
    imgs = torch.randn(3, 20, 20, generator=g, dtype=torch.float64)
    for radius in (0.4, 3.0, 6.7):
        ref = former_lowpass_raised_cosine_2d(imgs, radius)
        ours = lowpass_map(imgs, radius, 2.0, ndim=2, clamp_at_zero=False)
        assert torch.allclose(ours, ref, atol=1e-12)


def test_lowpass_map_is_relions_lowpassfiltermap():
    """RELION's ``lowPassFilterMap``: shell ``ROUND(n·apix/res)``, integer half edge, 0.5 + 0.5 cos between;
    the same profile as :func:`lowpass` on the centred FT."""
    n, apix = 32, 2.0
    vol = torch.randn(n, n, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for res, edge in ((10.0, 2), (7.0, 3), (60.0, 8)):
        ires = math.floor(n * apix / res + 0.5)
        half = edge // 2
        lo, hi = max(0.0, ires - half), ires + half
        r = radius_3d(n, dtype=torch.float64)
        w = torch.where(r < lo, 1.0, torch.where(r > hi, 0.0, 0.5 + 0.5 * torch.cos(math.pi * (r - lo) / (hi - lo))))
        ref = irfft3_centered(rfft3_centered(vol) * w, n)
        ours = lowpass_map(vol, resolution_shell(n, apix, res), 2 * half)
        assert torch.allclose(ours, ref, atol=1e-10)
        assert torch.allclose(irfft3_centered(lowpass(rfft3_centered(vol), res, apix, 2 * half), n), ref, atol=1e-10)


def test_lowpass_weights_edges():
    r = torch.linspace(0, 10, 101, dtype=torch.float64)
    hard = lowpass_weights(r, 5.0, 0.0)
    assert torch.equal(hard, (r <= 5.0).double())
    out = lowpass_weights(r, 5.0, 2.0, edge="outside")
    assert torch.all(out[r <= 5.0] == 1) and torch.all(out[r >= 7.0] == 0)
    assert torch.isclose(out[60], torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(ValueError):
        lowpass_weights(r, 5.0, 2.0, edge="inside")
