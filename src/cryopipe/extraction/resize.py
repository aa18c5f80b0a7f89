"""RELION's Fourier resize of particle images (``resizeMap`` in ``src/fftw.cpp``, used by ``Image::rescale`` when
``relion_preprocess --extract --scale`` rescales the boxes).

The convention, re-derived from RELION 5 (``resizeMap``, ``windowFourierTransform``, the ``FFTW_ELEM`` /
``FOR_ALL_ELEMENTS_IN_FFTW_TRANSFORM`` index macros and FFTW's complex-to-real transform), for an ``N × N`` image
resized to ``M × M``:

1. **Forward transform** of the image as stored, phase origin at array index 0 (no centring), divided by ``N²``
   (RELION's FFTW normalisation), half-complex layout ``[N, N//2+1]``.
2. **Window**: half-grid row ``i`` holds the frequency ``ky = i`` for ``i < size//2 + 1`` and ``i − size``
   otherwise (so for an even size the Nyquist row stands for ``+size/2``); the last axis holds ``kx = 0 … size//2``.
   Every output coefficient whose ``(ky, kx)`` exists in the input grid is copied (shrinking: the whole output
   grid; enlarging: the whole input grid, the rest is 0). Nothing is zeroed: shrinking to an even ``M`` keeps the
   input's ``ky = +M/2`` row and ``kx = M/2`` column (the new Nyquist row and column, which are not Nyquist in
   the larger grid); enlarging keeps the input's Nyquist row at ``+N/2`` and its Nyquist column at ``kx = N/2``.
3. **Inverse** complex-to-real transform on the ``M`` grid, not normalised (so values, and the mean, are kept).
   The windowed array is in general not Hermitian-consistent; FFTW (and pocketfft) then compute, for every real
   output pixel, the complex inverse along ``y`` followed by the real inverse along ``x``, which reads only the
   real part of the ``kx = 0`` and (even ``M``) ``kx = M/2`` coefficients after the ``y`` transform. Equivalently:
   replace those two columns by their Hermitian part ``(F(ky) + conj F(−ky)) / 2``. This module does that
   explicitly, so the result is the same on every FFT backend (cuFFT leaves non-Hermitian input undefined).

cryopipe's :func:`cryopipe.core.fourier.fourier_rescale` (used by the 3D jobs) instead zeroes the smaller
grid's Nyquist components; for extraction, where the particles go on to RELION or come from it, this module
follows RELION. Pixel size of the result: ``apix · N / M``; a feature at array index ``N//2`` lands at ``M//2``
for even ``N`` and ``M`` (the sample positions are ``j · N / M``).
"""

from __future__ import annotations

import torch

__all__ = ["half_grid_frequencies", "relion_resize"]


def half_grid_frequencies(size: int, device=None) -> torch.Tensor:
    """Integer frequencies ``ky`` of the rows of a ``[size, size//2+1]`` half-complex grid in RELION's
    ``FFTW_ELEM`` convention: row ``i`` → ``i`` for ``i < size//2 + 1``, else ``i − size`` (``[size]`` int64)."""
    i = torch.arange(size, device=device)
    return torch.where(i < size // 2 + 1, i, i - size)


def relion_resize(images: torch.Tensor, new_size: int) -> torch.Tensor:
    """Resize square images ``[..., N, N]`` to ``[..., M, M]`` (``M = new_size``) as RELION's ``resizeMap``.

    See the module docstring for the convention (origin at index 0, ÷N² forward, copy of every coefficient the two
    half grids share with the ``FFTW_ELEM`` frequency mapping, Nyquist kept, unnormalised complex-to-real inverse).
    Batched over all leading dimensions; computed in float64 for float64 input, float32 otherwise; returns the
    input dtype (float16 input is computed in float32). ``new_size == N`` returns the input unchanged.
    """
    n = images.shape[-1]
    if images.shape[-2] != n:
        raise ValueError(f"relion_resize expects square images, got shape {tuple(images.shape)}")
    m = int(new_size)
    if m < 1:
        raise ValueError(f"new size must be >= 1, got {new_size}")
    if m == n:
        return images
    dev = images.device
    work = images.to(torch.float64) if images.dtype == torch.float64 else images.to(torch.float32)
    ft = torch.fft.rfft2(work) / float(n * n)  # [..., N, N//2+1], RELION's forward normalisation

    # rows: each output row's frequency, and whether the input grid has it (same FFTW_ELEM mapping both sides)
    f_out = half_grid_frequencies(m, dev)
    valid_y = (f_out >= -((n - 1) // 2)) & (f_out <= n // 2)
    src_y = torch.remainder(f_out, n)
    kx = torch.arange(m // 2 + 1, device=dev)
    valid_x = kx <= n // 2
    src_x = kx.clamp(max=n // 2)
    out = ft.index_select(-2, src_y).index_select(-1, src_x)
    keep = (valid_y[:, None] & valid_x[None, :]).to(out.real.dtype)
    out = out * keep

    # Hermitian part of the kx = 0 and (even M) kx = M/2 columns: what a complex-to-real inverse reads of them
    neg = torch.remainder(-torch.arange(m, device=dev), m)
    cols = [0] + ([m // 2] if m % 2 == 0 and m // 2 > 0 else [])
    for c in cols:
        col = out[..., :, c]
        out[..., :, c] = 0.5 * (col + col.index_select(-1, neg).conj())

    res = torch.fft.irfft2(out, s=(m, m), norm="forward")  # unnormalised inverse (RELION/FFTW backward)
    return res.to(images.dtype)
