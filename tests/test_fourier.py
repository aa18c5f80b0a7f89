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
    phase_shift_2d,
    radius_2d,
    radius_3d,
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
