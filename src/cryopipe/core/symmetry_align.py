"""Aligning a map's point-group symmetry axes with RELION's standard axes (``relion_align_symmetry``): re-centre on
the centre of mass, search the rotation and refine the symmetry centre
(:func:`cryopipe.core.symmetry_search.search_symmetry_axes`) on a
Fourier-downsampled working map, rotate the full map (:func:`cryopipe.core.volume_rotation.rotate_volume`) and
optionally symmetrise it. The ``cryopipe align-symmetry`` job is :mod:`cryopipe.jobs.align_symmetry`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.fourier import fourier_rescale
from cryopipe.core.symmetry import canonical_symmetry_name, symmetrise_volume
from cryopipe.core.symmetry_search import search_symmetry_axes
from cryopipe.core.volume_rotation import rotate_volume, shift_volume
from cryopipe.errors import CryopipeError

__all__ = ["AlignSymmetryResult", "centre_of_mass", "align_symmetry_full", "align_symmetry"]


@dataclass
class AlignSymmetryResult:
    """Everything :func:`align_symmetry_full` found.

    Attributes:
        aligned: the rotated (and, with ``apply_sym``, symmetrised) full-size map ``[N, N, N]``.
        rotation: ``R`` ``[3, 3]`` float64 (RELION Euler matrix): ``aligned(x) = V_c(Rᵀ·x)`` with ``V_c`` the
            re-centred input.
        angles: (rot, tilt, psi) of ``R`` in degrees.
        residual: symmetry residual of the aligned working map (0 = perfectly symmetric, ``1 − 1/|G|`` = none).
        global_residual: best residual of the global (low-resolution) search.
        centre_shift_px: ``(dx, dy, dz)`` pixels the input was moved by before rotating (0 with ``keep_centre``):
            the centre of mass and the refined symmetry centre.
        sym: canonical group name; box, working_box: sizes; working_pixel_size: Å (None without a pixel size).
        n_evaluations: orientations scored; seconds: wall time.
    """

    aligned: torch.Tensor
    rotation: torch.Tensor
    angles: torch.Tensor
    residual: float
    global_residual: float
    centre_shift_px: tuple[float, float, float]
    sym: str
    box: int
    working_box: int
    working_pixel_size: float | None
    n_evaluations: int
    seconds: float
    extra: dict = field(default_factory=dict)


def centre_of_mass(volume: torch.Tensor) -> torch.Tensor:
    """Centre of mass ``(x, y, z)`` in pixels from the centre voxel ``N//2``, of the positive part of the map."""
    n = volume.shape[-1]
    w = volume.clamp_min(0).to(torch.float64)
    total = w.sum()
    if not float(total) > 0:
        raise CryopipeError("the map has no positive density: cannot find its centre of mass (use --keep_centre)")
    r = torch.arange(n, device=volume.device, dtype=torch.float64) - n // 2
    cz = (w.sum(dim=(1, 2)) * r).sum() / total
    cy = (w.sum(dim=(0, 2)) * r).sum() / total
    cx = (w.sum(dim=(0, 1)) * r).sum() / total
    return torch.stack([cx, cy, cz])


def align_symmetry_full(volume, sym: str, *, pixel_size: float | None = None, box_size: int = 64,
                        keep_centre: bool = False, nr_uniform: int = 400, healpix_order: int | None = None,
                        only_rot: bool = False, maxres: float | None = None, local_search_range: int = 2,
                        local_search_step: float = 2.0, min_step: float = 0.125, n_candidates: int = 5,
                        apply_sym: bool = False, seed: int | None = None, rotate_method: str = "auto",
                        device=None) -> AlignSymmetryResult:
    """Align ``volume``'s ``sym`` axes to RELION's standard axes (module doc).

    Args:
        volume: ``[N, N, N]`` map (tensor or array, z/y/x).
        sym: point group (C1, Cn, Dn, T, O, I/I1–I4; proper rotation groups).
        pixel_size: Å/px, only needed for ``maxres``.
        box_size: working box of the search (the map is Fourier-downsampled when larger).
        keep_centre: the map is centred on its symmetry centre: do not move it. Otherwise the centre of mass
            goes to the box centre, and the search then refines the symmetry centre with the axes (the centre of
            mass of a noisy or imperfect map is off the axis, and the axes that fit best through the wrong point
            are tilted).
        nr_uniform, healpix_order, only_rot, local_search_range, local_search_step, min_step, n_candidates, seed:
            the search (:func:`cryopipe.core.symmetry_search.search_symmetry_axes`).
        maxres: highest resolution (Å) used by the score (default: Nyquist of the working box).
        apply_sym: symmetrise the aligned map.
        rotate_method: ``"fourier"`` (2×-padded Fourier interpolation, as RELION), ``"linear"`` (real-space
            trilinear) or ``"auto"``: Fourier up to box 320 (its padded grid needs ≈ 24·(2N)³ bytes), else linear.
        device: torch device (default: CUDA if available).
    """
    t0 = time.time()
    dev = resolve_device(device)
    vol = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    if vol.dim() != 3 or not (vol.shape[0] == vol.shape[1] == vol.shape[2]):
        raise CryopipeError(f"align-symmetry needs a cubic 3D map, got shape {tuple(vol.shape)}")
    vol = vol.to(device=dev, dtype=torch.float32)
    sym_c = canonical_symmetry_name(sym)
    n = vol.shape[-1]
    if box_size < 16:
        raise CryopipeError(f"--box_size {box_size}: use at least 16 (64 is RELION's default)")
    shift = torch.zeros(3, dtype=torch.float64, device=dev)
    if not keep_centre:
        shift = -centre_of_mass(vol)
        vol = shift_volume(vol, shift)
    work_n = min(n, int(box_size))
    work = fourier_rescale(vol, work_n, ndim=3) if work_n != n else vol
    work_apix = None if pixel_size is None else float(pixel_size) * n / work_n
    r_max = None
    if maxres is not None and maxres > 0:
        if work_apix is None:
            raise CryopipeError("--maxres needs the pixel size (--angpix or the map header)")
        r_max = float(math.ceil(work_n * work_apix / maxres))
    if sym_c == "C1":
        rot = torch.eye(3, dtype=torch.float64, device=dev)
        res = None
        angles = torch.zeros(3, dtype=torch.float64)
        residual = global_residual = 0.0
        n_eval = 0
    else:
        res = search_symmetry_axes(work, sym_c, nr_uniform=nr_uniform, healpix_order=healpix_order,
                                   only_rot=only_rot, r_max=r_max, n_candidates=n_candidates,
                                   local_search_range=local_search_range, local_search_step=local_search_step,
                                   min_step=min_step, seed=seed, refine_centre=not keep_centre, device=dev)
        rot, angles, residual, global_residual, n_eval = (res.rotation, res.angles, res.residual,
                                                          res.global_residual, res.n_evaluations)
        if not keep_centre and bool(res.shift.abs().max() > 0):  # the refined symmetry centre (working pixels)
            centre_shift = res.shift.to(device=dev, dtype=torch.float64) * (n / work_n)
            vol = shift_volume(vol, centre_shift)
            shift = shift + centre_shift
    if rotate_method == "auto":
        rotate_method = "fourier" if n <= 320 else "linear"
    aligned = vol if sym_c == "C1" else rotate_volume(vol, rot, method=rotate_method)
    if apply_sym and sym_c != "C1":
        aligned = symmetrise_volume(aligned, sym_c)
    s = shift.cpu().tolist()
    return AlignSymmetryResult(aligned, rot.cpu(), angles.cpu(), float(residual), float(global_residual),
                               (s[0], s[1], s[2]), sym_c, n, work_n, work_apix, int(n_eval), time.time() - t0)


def align_symmetry(volume, sym: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(aligned_volume [N,N,N], rotation_matrix R [3,3], angles (rot, tilt, psi) degrees)``; see
    :func:`align_symmetry_full` for the options. ``aligned(x) = V_c(Rᵀ·x)`` (``V_c``: the re-centred input)."""
    r = align_symmetry_full(volume, sym, **kwargs)
    return r.aligned, r.rotation, r.angles
