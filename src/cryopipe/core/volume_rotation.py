"""Rotating (and shifting) cubic maps: the one volume rotation of cryopipe.

Convention: the rotated map is ``V'(x) = V(Rᵀ·(x − t))`` for a rotation matrix ``R`` acting on ``(x, y, z)``
coordinates in pixels with the origin at the centre voxel ``N//2`` (a feature at ``p`` moves to ``R·p + t``) and a
shift ``t`` (pixels, ``(x, y, z)``). Arrays are indexed ``[..., z, y, x]``. In Fourier space ``V̂'(k) = V̂(Rᵀ·k)``
(for ``t = 0``), which is what RELION's 3D ``get2DFourierTransform`` samples.

Two interpolations (RELION uses both): ``"linear"`` (real-space trilinear, zeros outside the box, batched over
rotations and channels; RELION's ``applyGeometry``/``symmetriseMap``) and ``"fourier"`` (the 2×-padded,
gridding-corrected FT sampled at ``Rᵀ·k``; frequencies beyond ``N/2`` — the cube's corners — are dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cryopipe.errors import CryopipeError

__all__ = ["rotate_volume", "shift_volume"]


def rotate_volume(volume: torch.Tensor, rotation: torch.Tensor, *, shift: torch.Tensor | None = None,
                  method: str = "linear", pad: float = 2.0, chunk_voxels: int = 1 << 24) -> torch.Tensor:
    """``V(Rᵀ·(x − t))`` about the centre voxel ``N//2`` (module docstring).

    Args:
        volume: ``[..., N, N, N]`` (leading axes are channels rotated alike; ``"fourier"``: ``[N, N, N]`` only).
        rotation: ``[3, 3]`` or ``[B, 3, 3]``.
        shift: ``[3]`` or ``[B, 3]`` pixels ``(x, y, z)`` (``"linear"`` only; None: no shift).
        method: ``"linear"`` (trilinear, zeros outside) or ``"fourier"`` (module docstring).
        pad: padding factor of the ``"fourier"`` method's grid.
        chunk_voxels: ``"linear"``: sample positions held at once (rotations per chunk ``≈ chunk_voxels/N³``);
            ``"fourier"`` interpolates ``2²²`` frequencies at a time.

    Returns:
        ``volume``'s shape for a single rotation, ``[B, *volume.shape]`` for ``[B, 3, 3]``; the volume's float
        dtype (float32 for integer input). ``"linear"`` computes in that dtype.
    """
    n = volume.shape[-1]
    if volume.dim() < 3 or not (volume.shape[-1] == volume.shape[-2] == volume.shape[-3]):
        raise CryopipeError(f"rotate_volume: expected a cubic volume [..., N, N, N], got {tuple(volume.shape)}")
    single = rotation.dim() == 2
    dt = volume.dtype if volume.is_floating_point() else torch.float32
    if method == "fourier":
        if shift is not None or volume.dim() != 3:
            raise CryopipeError("rotate_volume: the 'fourier' method takes one [N, N, N] map and no shift")
        R = rotation.reshape(-1, 3, 3)
        out = torch.stack([_rotate_fourier(volume, R[b], pad) for b in range(R.shape[0])])
        return (out[0] if single else out).to(dt)
    if method != "linear":
        raise CryopipeError(f"rotate_volume: method must be 'fourier' or 'linear', not {method!r}")
    batch_shape = volume.shape[:-3]
    vol = volume.reshape(1, -1, n, n, n).to(dt)
    C = vol.shape[1]
    R = rotation.reshape(-1, 3, 3).to(device=vol.device, dtype=dt)
    B = R.shape[0]
    t = None if shift is None else shift.reshape(-1, 3).to(device=vol.device, dtype=dt)  # [1 or B, 3]
    c = torch.arange(n, device=vol.device, dtype=dt) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], dim=-1).reshape(-1, 3)  # [V, 3] (x, y, z)
    scale = 2.0 / (n - 1) if n > 1 else 1.0
    step = max(1, chunk_voxels // pts.shape[0])
    out = []
    for b0 in range(0, B, step):  # chunks of rotations: bounded memory
        Rb = R[b0:b0 + step]
        p = pts[None] if t is None else pts[None] - (t if t.shape[0] == 1 else t[b0:b0 + step])[:, None, :]
        src = torch.einsum("bvj,bjk->bvk", p, Rb)  # (Rᵀ·p)ᵀ = pᵀ·R
        # grid_sample wants (x, y, z) normalised to [-1, 1] with align_corners=True: index i ↔ −1 + 2i/(n−1)
        g = (src + n // 2) * scale - 1.0
        out.append(F.grid_sample(vol.expand(Rb.shape[0], C, n, n, n), g.reshape(Rb.shape[0], n, n, n, 3),
                                 mode="bilinear", padding_mode="zeros", align_corners=True))
    res = torch.cat(out).reshape(B, *batch_shape, n, n, n)
    return res[0] if single else res


def _rotate_fourier(volume: torch.Tensor, R: torch.Tensor, pad: float, chunk: int = 1 << 22) -> torch.Tensor:
    """``V(Rᵀ·x)`` of one map ``[N, N, N]`` by sampling the padded, gridding-corrected FT at ``Rᵀ·k``."""
    from cryopipe.core.fourier import irfft3_centered
    from cryopipe.core.projector import Projector, interpolate_half_grid

    n = volume.shape[-1]
    R = R.to(device=volume.device, dtype=torch.float64)
    proj = Projector(volume, pad=pad, device=volume.device)
    half = n // 2 + 1
    f = torch.fft.fftfreq(n, d=1.0 / n, device=volume.device).to(torch.float64)
    kx = torch.arange(half, device=volume.device, dtype=torch.float64)
    out = torch.zeros(n * n * half, dtype=proj.data.dtype, device=volume.device)
    kz, ky, kxx = torch.meshgrid(f, f, kx, indexing="ij")
    k = torch.stack([kxx, ky, kz], dim=-1).reshape(-1, 3)
    inside = torch.nonzero(torch.linalg.vector_norm(k, dim=-1) <= n // 2, as_tuple=False).reshape(-1)
    for s in range(0, inside.numel(), chunk):
        idx = inside[s:s + chunk]
        pts = (k[idx] @ R) * proj.pad  # rows: (Rᵀ k)ᵀ = kᵀ R
        out[idx] = interpolate_half_grid(proj.data, proj.centre, pts.to(proj.dtype), proj.interpolation)
    return irfft3_centered(out.reshape(n, n, half), n)


def shift_volume(volume: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Move the content of a cubic map ``[..., N, N, N]`` by ``shift_px`` ``(dx, dy, dz)`` pixels (Fourier,
    sub-pixel, periodic): ``V'(x) = V(x − t)``, as :func:`rotate_volume`'s shift but without interpolation."""
    from cryopipe.core.fourier import irfft3_centered, phase_shift_3d, rfft3_centered

    n = volume.shape[-1]
    ft = rfft3_centered(volume.to(torch.float64))
    return irfft3_centered(phase_shift_3d(ft, shift_px.to(torch.float64), n), n).to(volume.dtype)
