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

__all__ = ["dark_centroids", "pose_errors", "position_errors"]


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


def pose_errors(A_est: torch.Tensor, A_true: torch.Tensor, sym: str = "C1", n_candidates: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Angular error (degrees) of each particle's orientation after the best global rotation of the estimated
    frame onto the true one, up to the symmetry of the truth: ``(errors [N], Q [3, 3])``.

    ``A_est``, ``A_true``: ``[N, 3, 3]`` total orientations (A = A_sub·A_particle, reference → tomogram frame) of
    the same particles. A map ``V`` that is the truth ``T`` in another frame, ``V(y) = T(Q·y)``, gives
    ``A_est = A_true·S·Q`` (``S`` any operator of the truth's point group ``sym``), so ``M_i = S·Q`` with
    ``M_i = A_trueᵢᵀ·A_estᵢ``. ``Q`` is chosen among ``n_candidates`` particles' ``M_i`` (smallest median
    error), then refined twice by the projected mean of ``S_iᵀ·M_i``; ``errors[i] = min_S ∠(M_i, S·Q)``. A map
    of the wrong hand cannot be matched by a rotation: its errors stay large."""
    from cryopipe.core.geometry import angular_distance
    from cryopipe.core.symmetry import symmetry_operators

    M = A_true.to(torch.float64).transpose(-1, -2) @ A_est.to(torch.float64)  # [N, 3, 3]
    ops = symmetry_operators(sym, device=M.device, dtype=torch.float64)
    ops = ops[torch.linalg.det(ops) > 0]  # [G, 3, 3]

    def errors_for(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = angular_distance(M[:, None], ops[None] @ Q)  # [N, G]
        return d.min(dim=1)

    cands = M[torch.linspace(0, len(M) - 1, min(n_candidates, len(M))).round().long()]
    best = min(cands, key=lambda Q: float(errors_for(Q)[0].median()))
    for _ in range(2):  # refine: mean of the symmetry-reduced M_i over the inliers, projected onto SO(3)
        err, k = errors_for(best)
        inl = err <= max(float(err.median()) * 3.0, 1.0)
        mean = (ops[k[inl]].transpose(-1, -2) @ M[inl]).mean(dim=0)
        U, _, Vt = torch.linalg.svd(mean)
        D = torch.diag(torch.tensor([1.0, 1.0, float(torch.linalg.det(U @ Vt))], dtype=torch.float64))
        best = U @ D @ Vt
    return errors_for(best)[0], best
