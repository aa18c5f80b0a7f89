"""Extraction's Fourier rescale (``extract --scale``) follows RELION's ``resizeMap`` (issue 11, item 4).

There is no RELION-rescaled particle stack in the fixtures (``../shared/fixtures/relion/mic/`` was extracted at
scale 1 only), so the rescale is tested against an independent statement of RELION's convention — a direct
double sum over the frequencies, no FFT, no index tables — and against hand-computed cases (a cosine at the new
Nyquist frequency keeps half its amplitude; RELION's zero-free copy of the Nyquist row and column), while the
unscaled extraction keeps matching the ``mic/`` fixture bit for bit (``tests/test_extract.py``).

The statement (RELION 5 ``resizeMap``: ``FourierTransform`` ÷N², ``windowFourierTransform`` with the
``FFTW_ELEM`` mapping, FFTW complex-to-real inverse): for an ``N × N`` image ``g`` and output size ``M``,

    F(ky, kx) = N⁻² Σ_{y,x} g(y, x) exp(−2πi (ky·y + kx·x) / N)
    out(y, x) = Σ_{ky ∈ K_M ∩ K_N} Σ_{kx = 0 … min(M, N)//2} w(kx) Re[F(ky, kx) exp(+2πi (ky·y + kx·x) / M)]

with ``K_s = {−((s−1)//2), …, s//2}`` (the rows of a half-complex grid of size ``s``: the Nyquist row of an
even grid is ``+s/2``) and ``w = 1`` for ``kx = 0`` and ``kx = M/2`` (a complex-to-real inverse reads only the
real part of those), ``w = 2`` otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.core.fourier import fourier_rescale
from cryopipe.extraction import extract_particles, rescale_images
from cryopipe.extraction.resize import relion_resize


def _relion_resize_by_sums(g: np.ndarray, m: int) -> np.ndarray:
    """The module docstring's double sum, in float64 (slow: small images only)."""
    n = g.shape[-1]
    kset_n = set(range(-((n - 1) // 2), n // 2 + 1))
    ky = np.array([k for k in range(-((m - 1) // 2), m // 2 + 1) if k in kset_n])
    kx = np.arange(0, min(m, n) // 2 + 1)
    pos_n = np.arange(n)
    pos_m = np.arange(m)
    ey_f = np.exp(-2j * math.pi * np.outer(ky, pos_n) / n)  # [Ky, N]
    ex_f = np.exp(-2j * math.pi * np.outer(kx, pos_n) / n)  # [Kx, N]
    f = np.einsum("ay,byx,cx->bac", ey_f, g, ex_f) / (n * n)  # [B, Ky, Kx]
    w = np.where((kx == 0) | ((m % 2 == 0) & (kx == m // 2)), 1.0, 2.0)
    ey_b = np.exp(2j * math.pi * np.outer(pos_m, ky) / m)  # [M, Ky]
    ex_b = np.exp(2j * math.pi * np.outer(pos_m, kx) / m)  # [M, Kx]
    return np.einsum("ya,bac,xc,c->byx", ey_b, f, ex_b, w).real


@pytest.mark.parametrize("n,m", [(24, 16), (24, 12), (16, 24), (20, 14), (15, 10), (12, 9), (9, 14)])
def test_resize_equals_the_explicit_sums(n, m):
    g = np.random.default_rng(n * 100 + m).standard_normal((3, n, n))
    ours = relion_resize(torch.from_numpy(g), m).numpy()
    ref = _relion_resize_by_sums(g, m)
    assert ours.shape == (3, m, m)
    assert np.abs(ours - ref).max() < 1e-12


def test_new_nyquist_cosine_keeps_half_its_amplitude():
    """cos(2π·8x/32) sampled on the 16-pixel grid is (−1)^j; RELION keeps the +8 half of it (½·(−1)^j), where a
    Nyquist-zeroing rescale (cryopipe's ``fourier_rescale``, used before issue 11) gives 0."""
    n, m = 32, 16
    x = torch.arange(n, dtype=torch.float64)
    g = torch.cos(2 * math.pi * 8 * x / n)[None, :].expand(n, n).clone()[None]
    out = relion_resize(g, m)[0]
    expect = 0.5 * (-1.0) ** torch.arange(m, dtype=torch.float64)
    assert torch.allclose(out, expect[None, :].expand(m, m), atol=1e-12)
    # the same along y; cos(π y)·cos(π x) on the new grid keeps one of its four (±8, ±8) components: ¼
    assert torch.allclose(relion_resize(g.transpose(-1, -2), m)[0], expect[:, None].expand(m, m), atol=1e-12)
    gm = torch.cos(2 * math.pi * 8 * x / n)[:, None] * torch.cos(2 * math.pi * 8 * x / n)[None, :]
    assert torch.allclose(relion_resize(gm[None], m)[0], expect[:, None] * expect[None, :], atol=1e-12)
    assert float(fourier_rescale(g, m).abs().max()) < 1e-12  # the old behaviour: Nyquist zeroed


def test_enlarging_keeps_the_input_nyquist_and_shrinking_returns_it():
    """Padding 16 → 32 puts the Nyquist row and column of the 16 grid at +8 (not zeroed), and shrinking back
    copies them back: the round trip returns the image except for half of its (ky, kx) = (8, 0) coefficient
    (row +8 of the kx = 0 column has no −8 partner in the 32 grid, so the real image keeps its Hermitian half).
    The mean is kept both ways."""
    g = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 16, 16)))
    up = relion_resize(g, 32)
    back = relion_resize(up, 16)
    assert torch.allclose(up.mean(dim=(-2, -1)), g.mean(dim=(-2, -1)), atol=1e-12)
    c = torch.fft.rfft2(g)[:, 8, 0].real / 256.0  # the (8, 0) component is c·(−1)^y
    sign_y = (-1.0) ** torch.arange(16, dtype=torch.float64)
    assert torch.allclose(back, g - 0.5 * c[:, None, None] * sign_y[None, :, None], atol=1e-12)
    # the Nyquist-zeroing rescale loses the whole Nyquist row and column instead
    old = fourier_rescale(fourier_rescale(g, 32), 16)
    assert float((old - g).abs().max()) > 0.1


def test_extract_scale_uses_relion_resize_and_keeps_the_centre():
    """``extract_particles(..., scale=M)`` = window, then :func:`relion_resize`; a Gaussian at the coordinate
    stays at the box centre ``M//2``; float32 and float64 agree; values (the background constant) are kept."""
    n, m = 64, 48
    yy, xx = torch.meshgrid(torch.arange(200, dtype=torch.float64), torch.arange(200, dtype=torch.float64),
                            indexing="ij")
    mic = 3.0 + torch.exp(-((xx - 101) ** 2 + (yy - 90) ** 2) / (2 * 5.0 ** 2))
    mic = mic + 0.1 * torch.from_numpy(np.random.default_rng(0).standard_normal((200, 200)))
    coords = torch.tensor([[101.0, 90.0], [60.7, 120.2]])
    out = extract_particles(mic, coords, n, scale=m)
    win = mic[90 - 32:90 + 32, 101 - 32:101 + 32]
    assert torch.allclose(out[0], relion_resize(win[None], m)[0], atol=1e-12)
    assert torch.allclose(rescale_images(win[None], m), relion_resize(win[None], m))
    clean = 3.0 + torch.exp(-((xx - 101) ** 2 + (yy - 90) ** 2) / (2 * 5.0 ** 2))
    peak = int(torch.argmax(extract_particles(clean, coords[:1], n, scale=m)[0]))
    assert divmod(peak, m) == (m // 2, m // 2)
    assert abs(float(out[0].mean()) - float(win.mean())) < 1e-12
    out32 = extract_particles(mic.float(), coords, n, scale=m)
    assert out32.dtype == torch.float32 and float((out32.double() - out).abs().max()) < 1e-4
