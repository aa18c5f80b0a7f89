"""Fourier-space conventions and basic operations shared by every module.

Conventions (all of cryopipe follows them):

* Real-space arrays are ``[..., y, x]`` (images) and ``[..., z, y, x]`` (volumes), as stored in MRC files.
  The image/volume **centre is the element at index ``N // 2``** on every axis (RELION's ``(int)(N/2)``).
* Fourier transforms are **half-complex** (``rfft``) of the *centred* array: ``F = rfftn(ifftshift(x))``, so
  the centre voxel is the phase origin. No normalisation on the forward transform (torch ``norm="backward"``);
  :func:`irfft2_centered` / :func:`irfft3_centered` invert exactly.
* Frequency indices: along every axis but the last, index ``i`` is frequency ``fftfreq(N)[i] * N`` (0, 1, …,
  N/2−1, −N/2, …, −1); along the last axis index ``j`` is frequency ``j`` (0 … N/2). Frequencies are given in
  **Fourier pixels** (cycles per box) unless a function says ``_per_A`` (cycles per Å = pixels / (N · apix)).
* A vector ``(kx, ky[, kz])`` is ordered x first, as RELION's geometry does; arrays are indexed ``[.., ky, kx]``.
"""

from __future__ import annotations

import math

import torch

_DIMS2 = (-2, -1)
_DIMS3 = (-3, -2, -1)


def rfft2_centered(images: torch.Tensor) -> torch.Tensor:
    """Half-complex 2D FT of images ``[..., N, N]`` with the phase origin at the centre pixel ``N//2``."""
    return torch.fft.rfftn(torch.fft.ifftshift(images, dim=_DIMS2), dim=_DIMS2)


def irfft2_centered(ft: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_centered`; ``n`` is the real-space box size (needed for the half axis)."""
    return torch.fft.fftshift(torch.fft.irfftn(ft, s=(n, n), dim=_DIMS2), dim=_DIMS2)


def rfft3_centered(volume: torch.Tensor) -> torch.Tensor:
    """Half-complex 3D FT of volumes ``[..., N, N, N]`` with the phase origin at the centre voxel."""
    return torch.fft.rfftn(torch.fft.ifftshift(volume, dim=_DIMS3), dim=_DIMS3)


def irfft3_centered(ft: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`rfft3_centered` for a cubic box of size ``n``."""
    return torch.fft.fftshift(torch.fft.irfftn(ft, s=(n, n, n), dim=_DIMS3), dim=_DIMS3)


def freq_grid_2d(n: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kx, ky)`` in Fourier pixels on the half-complex grid ``[n, n//2+1]`` of an ``n × n`` image."""
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    kx = torch.arange(n // 2 + 1, device=device, dtype=dtype)
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    return kxx, kyy


def freq_grid_3d(n: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kx, ky, kz)`` in Fourier pixels on the half-complex grid ``[n, n, n//2+1]`` of an ``n³`` volume."""
    kz = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    kx = torch.arange(n // 2 + 1, device=device, dtype=dtype)
    kzz, kyy, kxx = torch.meshgrid(kz, ky, kx, indexing="ij")
    return kxx, kyy, kzz


def radius_2d(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Radial frequency ``|k|`` (Fourier pixels) on the half-complex 2D grid."""
    kx, ky = freq_grid_2d(n, device=device, dtype=dtype)
    return torch.sqrt(kx * kx + ky * ky)


def radius_3d(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Radial frequency ``|k|`` (Fourier pixels) on the half-complex 3D grid."""
    kx, ky, kz = freq_grid_3d(n, device=device, dtype=dtype)
    return torch.sqrt(kx * kx + ky * ky + kz * kz)


def shell_index_2d(n: int, device=None) -> torch.Tensor:
    """Integer shell ``round(|k|)`` per half-complex 2D coefficient (RELION's shell assignment)."""
    return torch.round(radius_2d(n, device=device, dtype=torch.float64)).long()


def shell_index_3d(n: int, device=None) -> torch.Tensor:
    """Integer shell ``round(|k|)`` per half-complex 3D coefficient (RELION's shell assignment)."""
    return torch.round(radius_3d(n, device=device, dtype=torch.float64)).long()


def phase_shift_2d(ft: torch.Tensor, shifts: torch.Tensor, n: int) -> torch.Tensor:
    """Translate images given as centred half-complex FTs ``[..., n, n//2+1]``.

    ``shifts`` is ``[..., 2]`` = ``(dx, dy)`` in pixels: the content moves by ``+dx`` along x and ``+dy``
    along y (a feature at ``(x, y)`` ends at ``(x+dx, y+dy)``). Broadcasts over leading dimensions.
    RELION's prediction of an observation with origin ``o`` is ``phase_shift_2d(P, -o)``.
    """
    kx, ky = freq_grid_2d(n, device=ft.device, dtype=shifts.dtype if shifts.is_floating_point() else torch.float32)
    dx = shifts[..., 0, None, None]
    dy = shifts[..., 1, None, None]
    phase = (-2.0 * math.pi / n) * (kx * dx + ky * dy)
    return ft * torch.polar(torch.ones_like(phase), phase).to(ft.dtype)


def phase_shift_3d(ft: torch.Tensor, shifts: torch.Tensor, n: int) -> torch.Tensor:
    """3D version of :func:`phase_shift_2d`; ``shifts`` is ``[..., 3]`` = ``(dx, dy, dz)`` pixels."""
    kx, ky, kz = freq_grid_3d(n, device=ft.device, dtype=shifts.dtype if shifts.is_floating_point() else torch.float32)
    dx = shifts[..., 0, None, None, None]
    dy = shifts[..., 1, None, None, None]
    dz = shifts[..., 2, None, None, None]
    phase = (-2.0 * math.pi / n) * (kx * dx + ky * dy + kz * dz)
    return ft * torch.polar(torch.ones_like(phase), phase).to(ft.dtype)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Real-space images ``[..., n, n]`` translated by ``shifts`` ``[..., 2]`` = ``(dx, dy)`` pixels (sub-pixel, periodic)."""
    n = images.shape[-1]
    return irfft2_centered(phase_shift_2d(rfft2_centered(images), shifts, n), n)


def good_fft_size(n: int, max_prime: int = 7) -> int:
    """Smallest even size ``>= n`` whose prime factors are all ``<= max_prime`` (fast FFT sizes)."""
    m = max(2, n + (n % 2))
    while True:
        k = m
        for p in (2, 3, 5, 7, 11, 13):
            if p > max_prime:
                break
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2
