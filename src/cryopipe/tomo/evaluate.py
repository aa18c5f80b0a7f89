"""Scores of tomograms against known particle positions (simulated data, benchmarks, the demo).

A particle is where its density is: in a tomogram low-passed to ``lowpass_voxels``, the centroid of the dark
(negative, protein in transmission contrast) density within ``radius_voxels`` of the true centre should lie on
that centre. Voxel ``(i, j, k)`` (z, y, x array indices) of a bin-``b`` tomogram is the decentred tomogram
position ``b·(k, j, i)`` unbinned px (fixture README A8), so a true position ``p`` (x, y, z unbinned px) is voxel
``p / b`` in (x, y, z) order.
"""

from __future__ import annotations

import torch

from cryopipe.core.fourier import lowpass_real

__all__ = ["dark_centroids", "position_errors"]


def dark_centroids(volume: torch.Tensor, positions_voxels: torch.Tensor, radius_voxels: float = 4.0,
                   lowpass_voxels: float = 4.0) -> torch.Tensor:
    """Centroids ``[N, 3]`` (x, y, z voxels) of the dark density within ``radius_voxels`` of each position.

    ``volume``: ``[nz, ny, nx]`` tomogram; ``positions_voxels``: ``[N, 3]`` (x, y, z) voxel coordinates;
    ``lowpass_voxels``: resolution (voxels) the tomogram is low-passed to first. A position with no dark density
    around it gets NaN."""
    low = lowpass_real(volume.to(torch.float64), 1.0 / float(lowpass_voxels))
    dark = (-low).clamp_min(0.0)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=volume.device) for s in volume.shape],
                           indexing="ij")
    xyz = torch.stack([grids[2], grids[1], grids[0]], dim=-1).reshape(-1, 3)  # [V, 3]
    weights = dark.reshape(-1)
    out = []
    for p in positions_voxels.to(torch.float64):
        inside = ((xyz - p) ** 2).sum(dim=-1) <= radius_voxels**2
        w = weights * inside
        out.append((w[:, None] * xyz).sum(dim=0) / w.sum())
    return torch.stack(out) if out else torch.zeros((0, 3), dtype=torch.float64)


def position_errors(volume: torch.Tensor, positions_px: torch.Tensor, binning: float, radius_voxels: float = 4.0,
                    lowpass_voxels: float = 4.0) -> torch.Tensor:
    """Distance ``[N]`` (voxels) from each true position (``[N, 3]`` decentred unbinned px) to the centroid of the
    dark density around it in the bin-``binning`` tomogram ``volume`` (:func:`dark_centroids`)."""
    voxels = positions_px.to(torch.float64) / float(binning)
    return torch.linalg.norm(dark_centroids(volume, voxels, radius_voxels, lowpass_voxels) - voxels, dim=-1)
