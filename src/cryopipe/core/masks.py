"""Soft-edged circular (2D) and spherical (3D) masks centred on the box centre ``N // 2``.

The edge is a raised cosine *outside* ``radius_px``: the mask is 1 for ``r <= radius``, 0 for
``r >= radius + edge`` and ``0.5 + 0.5·cos(π·(r − radius)/edge)`` in between, with ``r`` the Euclidean distance
(pixels) from the centre pixel/voxel. This is RELION's raised-cosine convention (``softMaskOutsideMap``,
``raisedCosineMask``), where ``radius + edge`` is the outer radius.
"""

from __future__ import annotations

import math

import torch

from cryopipe.core.device import resolve_device

__all__ = ["soft_circular_mask", "soft_spherical_mask", "raised_cosine"]


def raised_cosine(r: torch.Tensor, radius_px: float, edge_px: float) -> torch.Tensor:
    """Mask value as a function of the distance ``r`` (pixels): 1 inside ``radius_px``, raised-cosine fall-off
    to 0 over ``edge_px`` pixels outside it (hard edge ``r <= radius`` when ``edge_px == 0``)."""
    if edge_px < 0:
        raise ValueError(f"edge_px must be >= 0, got {edge_px}")
    if edge_px == 0:
        return (r <= radius_px).to(r.dtype)
    t = ((r - radius_px) / edge_px).clamp(0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def _centred_coords(n: int, device, dtype) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=dtype) - (n // 2)


def soft_circular_mask(n: int, radius_px: float, edge_px: float = 0.0, device=None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2D mask ``[n, n]`` (index ``[y, x]``), centred at ``(n//2, n//2)``; radius and edge in pixels."""
    dev = resolve_device(device)
    c = _centred_coords(n, dev, torch.float64)
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return raised_cosine(r, float(radius_px), float(edge_px)).to(dtype)


def soft_spherical_mask(n: int, radius_px: float, edge_px: float = 0.0, device=None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """3D mask ``[n, n, n]`` (index ``[z, y, x]``), centred at voxel ``(n//2,)*3``; radius and edge in pixels."""
    dev = resolve_device(device)
    c = _centred_coords(n, dev, torch.float64)
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return raised_cosine(r, float(radius_px), float(edge_px)).to(dtype)
