"""Rigid alignment of one 3D map onto another (rotation, translation and, optionally, the hand), as users do in
Chimera's "fit in map" before comparing a de novo model with a known structure.

Convention: the aligned map is ``V'(x) = V(Rᵀ·(x − t))`` for a rotation matrix ``R`` (acting on ``(x, y, z)``
coordinates in pixels, origin at the centre voxel ``n//2``) and a shift ``t`` (pixels, ``(x, y, z)``); with
``mirror`` the moving map is first inverted through the centre (``V(−x)``, the other hand).

Search: global over SO(3) on a HEALPix × ψ grid (:func:`cryopipe.core.healpix.orientation_grid`) at low
resolution (both maps Fourier-cropped and low-passed, rotated by :func:`cryopipe.core.volume_rotation.rotate_volume`),
translations by FFT cross-correlation for every rotation (one batched 3D FFT per chunk of rotations); then local
refinement of the best solutions on successively finer rotation grids
(:func:`cryopipe.core.geometry.local_rotation_grid`, moved until the centre wins at each step). All batched tensor work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryopipe.core.fourier import fourier_rescale, irfft3_centered, rfft3_centered
from cryopipe.core.geometry import euler_to_matrix, local_rotation_grid
from cryopipe.core.healpix import orientation_grid
from cryopipe.core.volume_rotation import rotate_volume

__all__ = ["VolumeAlignment", "align_volumes", "symmetry_axes_error"]


@dataclass
class VolumeAlignment:
    """Result of :func:`align_volumes`: ``rotation [3, 3]`` (float64), ``shift [3]`` (pixels of the full map,
    ``(x, y, z)``), ``mirror``, ``correlation`` (normalised, at the search resolution) and ``aligned`` (the
    moving map transformed onto the fixed one, full size)."""

    rotation: torch.Tensor
    shift: torch.Tensor
    mirror: bool
    correlation: float
    aligned: torch.Tensor


def _prepare(vol: torch.Tensor, small: int, lowpass_shells: float) -> torch.Tensor:
    v = vol.to(torch.float32)
    if v.shape[-1] != small:
        v = fourier_rescale(v, small)
    n = v.shape[-1]
    f = torch.fft.fftfreq(n, device=v.device) * n
    fx = torch.fft.rfftfreq(n, device=v.device) * n
    r = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    filt = torch.exp(-0.5 * (r / lowpass_shells) ** 2)
    v = irfft3_centered(rfft3_centered(v) * filt, n)
    return (v - v.mean()) / v.std().clamp_min(1e-12)


def _score(rot_vols: torch.Tensor, fixed_ft: torch.Tensor, n: int, fixed_norm: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Best normalised cross-correlation over circular shifts for each rotated map ``[B, n, n, n]``; returns
    ``(score [B], shift [B, 3] (x, y, z) pixels)``."""
    r = rot_vols - rot_vols.mean(dim=(1, 2, 3), keepdim=True)
    norm = r.flatten(1).norm(dim=1).clamp_min(1e-12)
    cc = torch.fft.irfftn(torch.fft.rfftn(r, dim=(1, 2, 3)).conj() * fixed_ft[None], s=(n, n, n), dim=(1, 2, 3))
    flat = cc.flatten(1)
    best, idx = flat.max(dim=1)
    iz, iy, ix = idx // (n * n), (idx // n) % n, idx % n
    wrap = lambda i: torch.where(i > n // 2, i - n, i)  # noqa: E731
    return best / (norm * fixed_norm), torch.stack([wrap(ix), wrap(iy), wrap(iz)], dim=-1).to(torch.float32)


def _grid_rotations(order: int, device) -> torch.Tensor:
    """``[M, 3, 3]`` float32 rotations of the HEALPix ``order`` × ψ grid (C1, no perturbation)."""
    a = orientation_grid(order, device=device)
    return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).to(torch.float32)


def _refine_locally(m_s: torch.Tensor, fixed_ft: torch.Tensor, n: int, fixed_norm: float, R: torch.Tensor,
                    steps: tuple[float, ...] = (5.0, 2.5, 1.0, 0.5, 0.25, 0.125), max_moves: int = 20
                    ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Pattern search from ``R``: the ``3³`` grid of small rotations (:func:`local_rotation_grid`, ±1 step) moves
    to its best point until the centre wins, then the step is halved (``steps`` degrees). A single move per step
    (the earlier scheme) stops short whenever the optimum is more than two steps away — e.g. a grid point 15° off
    — and leaves a C6 axis tilted by degrees. Returns ``(score, R [3, 3] float32, shift [3])``."""
    R = R.to(torch.float64)
    sc, sh = _score(rotate_volume(m_s, R[None].to(torch.float32)), fixed_ft, n, fixed_norm)
    score, shift = float(sc[0]), sh[0]
    for step in steps:
        grid = local_rotation_grid(step, 1, dtype=torch.float64, device=m_s.device)
        for _ in range(max_moves):
            cands = grid @ R[None]
            sc, sh = _score(rotate_volume(m_s, cands.to(torch.float32)), fixed_ft, n, fixed_norm)
            i = int(sc.argmax())
            if i == 0 or float(sc[i]) <= score:
                break
            score, R, shift = float(sc[i]), cands[i], sh[i]
    return score, R.to(torch.float32), shift


def align_volumes(moving: torch.Tensor, fixed: torch.Tensor, *, pixel_size: float, resolution_A: float = 12.0,
                  search_box: int = 32, try_mirror: bool = True, order: int = 2,
                  n_candidates: int = 3) -> VolumeAlignment:
    """Align ``moving`` onto ``fixed`` (both ``[n, n, n]``, same pixel size Å; module docstring).

    The global search runs on maps Fourier-cropped to ``search_box`` and low-passed (Gaussian) to about
    ``resolution_A`` Å, over the HEALPix ``order`` grid × ψ (order 1: 576 rotations, 15°; order 2: 4608, 7.5°),
    both hands with ``try_mirror``; the best ``n_candidates`` grid points of each hand are refined locally
    (:func:`_refine_locally`: moves until the centre wins at 5°, then halved down to 0.125°).
    """
    n = fixed.shape[-1]
    dev = fixed.device
    small = min(search_box, n)
    apix_small = pixel_size * n / small
    shells = max(1.0, small * apix_small / resolution_A)
    fx = _prepare(fixed, small, shells)
    fixed_ft = torch.fft.rfftn(fx, dim=(0, 1, 2))
    fnorm = float(fx.norm())
    cand = []
    for mirror in ((False, True) if try_mirror else (False,)):  # two hands
        mv = moving.flip(0, 1, 2) if mirror else moving
        if mirror and n % 2 == 0:  # inversion about the centre voxel n//2 (flip maps i -> n-1-i)
            mv = torch.roll(mv, shifts=(1, 1, 1), dims=(0, 1, 2))
        m_s = _prepare(mv, small, shells)
        Rs = _grid_rotations(order, dev)
        scores = torch.cat([_score(rotate_volume(m_s, Rs[r0:r0 + 512]), fixed_ft, small, fnorm)[0]
                            for r0 in range(0, Rs.shape[0], 512)])  # chunks of rotations
        refined = [_refine_locally(m_s, fixed_ft, small, fnorm, Rs[int(i)])
                   for i in torch.argsort(scores, descending=True)[:n_candidates]]
        score, R, shift = max(refined, key=lambda c: c[0])
        cand.append((score, R, shift, mirror, mv))
    score, R, shift_s, mirror, mv = max(cand, key=lambda c: c[0])
    # translation at full size: refine by cross-correlation of the rotated full map
    rot_full = rotate_volume(mv.to(torch.float32), R)
    r = rot_full - rot_full.mean()
    cc = torch.fft.irfftn(torch.fft.rfftn(r).conj() * torch.fft.rfftn(fixed.to(torch.float32) - fixed.mean()),
                          s=(n, n, n))
    idx = int(cc.flatten().argmax())
    iz, iy, ix = idx // (n * n), (idx // n) % n, idx % n
    wrap = lambda i: i - n if i > n // 2 else i  # noqa: E731
    t = torch.tensor([wrap(ix), wrap(iy), wrap(iz)], dtype=torch.float32)
    aligned = torch.roll(rot_full, shifts=(int(t[2]), int(t[1]), int(t[0])), dims=(0, 1, 2))
    return VolumeAlignment(R.to(torch.float64), t, bool(mirror), float(score), aligned)


def symmetry_axes_error(rotation: torch.Tensor, sym: str) -> float:
    """Angle (degrees) by which ``rotation`` (e.g. :attr:`VolumeAlignment.rotation` of a map symmetrised in
    RELION's convention onto a truth built in that convention) moves the group's symmetry axes off themselves,
    as a set of lines: ``Cn``: the angle between ``R·z`` and the z line; otherwise the smallest rotation angle of
    ``R·N`` over the rotations ``N`` that map the axis set onto itself (the group's normaliser: ``O`` for D2 and T,
    ``D2n`` for Dn, the group itself for O and I). Which of D2's three equivalent 2-folds lies on z is a free
    choice of the convention, hence the normaliser. ``C1``: 0."""
    from cryopipe.core.symmetry import canonical_symmetry_name, symmetry_operators

    name = canonical_symmetry_name(sym)
    R = torch.as_tensor(rotation, dtype=torch.float64).cpu()
    if name == "C1":
        return 0.0
    if name.startswith("C"):
        return float(torch.rad2deg(torch.acos(R[2, 2].abs().clamp(max=1.0))))
    if name == "D2" or name == "T":
        norm = "O"
    elif name.startswith("D"):
        norm = f"D{2 * int(name[1:])}"
    else:
        norm = name
    ops = symmetry_operators(norm, dtype=torch.float64).cpu()
    ops = ops[torch.linalg.det(ops) > 0]
    tr = torch.einsum("ij,gji->g", R, ops).max()  # max tr(R·N)
    return float(torch.rad2deg(torch.acos(((tr - 1.0) / 2.0).clamp(-1.0, 1.0))))
