"""Differentiable trilinear sampling of Fourier central slices (for gradient-based refinement).

:class:`cryopipe.core.projector.Projector` builds the padded, gridding-corrected centred half grid of a map and
samples it quickly, but its sampler writes into pre-allocated outputs in place and is not meant for autograd.
:func:`sample_half_grids` samples the same grid layout (``[Z, Y, X]``, ``z, y`` index = coordinate + ``centre``,
``x`` = coordinate ``>= 0``; points with ``x < 0`` read the Hermitian mate ``−p`` conjugated) with out-of-place
tensor operations only, so that gradients flow to the sample points (hence to rotations, via
``p = pad·Aᵀ·(kx, ky, 0)``) and to the grid values. The corner indices are piecewise constant (no gradient); the
trilinear fractions carry the gradient, which is exact for the interpolant (it jumps across voxel faces).
"""

from __future__ import annotations

import torch

__all__ = ["sample_half_grids", "central_slice_points"]


def central_slice_points(rotations: torch.Tensor, k: torch.Tensor, pad: float) -> torch.Tensor:
    """Grid points ``[P, M, 3]`` = ``pad·Aᵀ·(kx, ky, 0)`` for rotations ``[P, 3, 3]`` (RELION single-particle
    matrices, reference → image) and in-plane frequencies ``k`` ``[M, 2]`` (Fourier pixels of the image box)."""
    a = rotations[:, :2, :] * pad  # rows 0, 1 of A: p = kx·A[0] + ky·A[1]
    return torch.einsum("mj,pjc->pmc", k.to(a.dtype), a)


def sample_half_grids(grids: torch.Tensor, centre: int, points: torch.Tensor, which: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Trilinear samples (complex) ``[P, M]`` of one of ``G`` centred half grids ``grids`` ``[G, Z, Y, X]`` (complex)
    at ``points`` ``[P, M, 3]`` = ``(x, y, z)`` grid units; ``which`` ``[P]`` (long, default 0) picks the grid of
    each row. Differentiable in ``points`` and ``grids``. Callers keep ``|p| <= centre − 1``."""
    G, Z, Y, X = grids.shape
    P, M, _ = points.shape
    flat = torch.view_as_real(grids).reshape(-1, 2)  # [G·Z·Y·X, 2] (re, im)
    x, y, z = points.unbind(-1)
    sign = torch.where(x < 0, -1.0, 1.0).to(points.dtype).detach()
    x, y, z = x * sign, y * sign, z * sign
    x0, y0, z0 = torch.floor(x).detach(), torch.floor(y).detach(), torch.floor(z).detach()
    fx, fy, fz = x - x0, y - y0, z - z0
    ix = x0.long().clamp(0, X - 2)
    iy = (y0.long() + centre).clamp(0, Y - 2)
    iz = (z0.long() + centre).clamp(0, Z - 2)
    g = torch.zeros(P, dtype=torch.long, device=points.device) if which is None else which.to(points.device).long()
    base = ((g[:, None] * Z + iz) * Y + iy) * X + ix  # [P, M]
    out = 0.0
    for dz in (0, 1):
        wz = fz if dz else 1.0 - fz
        for dy in (0, 1):
            wy = wz * (fy if dy else 1.0 - fy)
            for dx in (0, 1):
                w = wy * (fx if dx else 1.0 - fx)
                v = flat.index_select(0, (base + (dz * Y + dy) * X + dx).reshape(-1)).reshape(P, M, 2)
                out = out + w[..., None].to(v.dtype) * v
    re, im = out[..., 0], out[..., 1] * sign.to(out.dtype)
    return torch.complex(re, im)
