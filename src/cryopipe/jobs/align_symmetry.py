"""``cryopipe align-symmetry``: rotate a map so that its point-group symmetry axes lie on RELION's standard axes
(``relion_align_symmetry``), optionally symmetrising it.

Steps (RELION's, re-derived; numerics in :mod:`cryopipe.core.symmetry_search`):

1. read the map (``--i map.mrc``), or the class maps of a ``*_model.star`` (``--select_largest_class`` by
   ``rlnClassDistribution``, ``--select_highest_resol`` by ``rlnEstimatedResolution``, default: every class, the
   most symmetric one kept);
2. unless ``--keep_centre``: move the centre of mass (of the positive density) to the box centre ``N//2``
   (sub-pixel Fourier shift);
3. Fourier-downsample to ``--box_size`` (64);
4. global search over ``--nr_uniform`` (400) random orientations (or ``--healpix_order``), then local refinement
   (``--local_search_range``, ``--local_search_step``, then finer), scoring the symmetry residual
   ``‖V_R − S V_R‖² / ‖V_R‖²`` of the rotated map ``V_R(x) = V(Rᵀ·x)``;
5. rotate the full-size (re-centred) map by the best ``R`` (2×-padded Fourier interpolation as RELION), and with
   ``--apply_sym`` average over the group (:func:`cryopipe.core.symmetry.symmetrise_volume`).

Outputs: the map ``--o`` (default ``aligned.mrc``), ``<o stem>_symmetry.star`` (``data_align_symmetry``:
rlnAngleRot/Tilt/Psi of ``R``, rlnSymmetryGroup, and cryopipe's residual, centre shift and matrix) and
``<o stem>_symmetry.json`` (the same). ``R`` is a RELION Euler matrix: a particle refined against the *input* map with
matrix ``A`` has ``A·Rᵀ`` against the aligned map (when the centre was kept).

Python API: :func:`align_symmetry` ``(volume, sym, ...) -> (aligned_volume, rotation_matrix, angles)`` and
:func:`align_symmetry_full` (everything, as :class:`AlignSymmetryResult`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.fourier import fourier_rescale, irfft3_centered, phase_shift_3d, rfft3_centered
from cryopipe.core.symmetry import canonical_symmetry_name, symmetrise_volume
from cryopipe.core.symmetry_search import search_symmetry_axes
from cryopipe.core.volume_rotation import rotate_volume
from cryopipe.errors import CryopipeError, InputFileError

HELP = "rotate a map so that its symmetry axes follow RELION's conventions (relion_align_symmetry), --apply_sym"


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
        centre_shift_px: ``(dx, dy, dz)`` pixels the input was moved by before rotating (0 with ``keep_centre``).
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


def shift_volume(volume: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Move the content of a cubic map by ``shift_px`` ``(dx, dy, dz)`` pixels (Fourier, sub-pixel, periodic)."""
    n = volume.shape[-1]
    ft = rfft3_centered(volume.to(torch.float64))
    return irfft3_centered(phase_shift_3d(ft, shift_px.to(torch.float64), n), n).to(volume.dtype)


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
        keep_centre: do not move the centre of mass to the box centre.
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
                                   min_step=min_step, seed=seed, device=dev)
        rot, angles, residual, global_residual, n_eval = (res.rotation, res.angles, res.residual,
                                                          res.global_residual, res.n_evaluations)
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


# ------------------------------------------------------------------------------------------------ files


def class_maps_from_model(model_star: str | Path, select: str = "all") -> list[Path]:
    """Class maps of a ``*_model.star`` (``data_model_classes`` / ``rlnReferenceImage``): all of them, or the one with
    the largest ``rlnClassDistribution`` (``select="largest"``) or smallest ``rlnEstimatedResolution``
    (``"resol"``). Relative names are looked up from the current directory, then next to the model file."""
    from cryopipe.io.star import read_star

    model_star = Path(model_star)
    blocks = read_star(model_star)
    t = blocks.get("model_classes")
    if t is None or "rlnReferenceImage" not in getattr(t, "columns", []):
        raise InputFileError(model_star, "no data_model_classes table with rlnReferenceImage",
                             "give a RELION *_model.star from Class3D / Refine3D / InitialModel, or a map")
    names = [str(v) for v in t["rlnReferenceImage"]]
    if select == "largest":
        if "rlnClassDistribution" not in t:
            raise InputFileError(model_star, "no rlnClassDistribution column", "leave out --select_largest_class")
        names = [names[int(np.argmax(t["rlnClassDistribution"].to_numpy(float)))]]
    elif select == "resol":
        if "rlnEstimatedResolution" not in t:
            raise InputFileError(model_star, "no rlnEstimatedResolution column", "leave out --select_highest_resol")
        names = [names[int(np.argmin(t["rlnEstimatedResolution"].to_numpy(float)))]]
    out = []
    for nm in names:
        cands = [Path(nm), model_star.parent / nm, model_star.parent / Path(nm).name]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            raise InputFileError(model_star, f"class map {nm} not found (from the current directory or next to the "
                                             "model file)", "run from the RELION project directory")
        out.append(hit)
    return out


def _write_outputs(out_map: Path, res: AlignSymmetryResult, pixel_size: float, source: Path) -> tuple[Path, Path]:
    from cryopipe.io.mrc import write_mrc
    from cryopipe.io.star import write_star

    out_map.parent.mkdir(parents=True, exist_ok=True)
    write_mrc(out_map, res.aligned.detach().cpu().numpy().astype(np.float32), pixel_size)
    ang = [float(a) for a in res.angles]
    R = res.rotation.tolist()
    info = {
        "input": str(source), "output": str(out_map), "symmetry": res.sym,
        "rot": ang[0], "tilt": ang[1], "psi": ang[2], "rotation_matrix": R,
        "symmetry_residual": res.residual, "global_residual": res.global_residual,
        "centre_shift_px": list(res.centre_shift_px), "box": res.box, "working_box": res.working_box,
        "working_pixel_size": res.working_pixel_size, "n_evaluations": res.n_evaluations,
        "seconds": round(res.seconds, 3),
    }
    stem = out_map.with_suffix("")
    jpath = Path(str(stem) + "_symmetry.json")
    spath = Path(str(stem) + "_symmetry.star")
    from cryopipe.io.atomic import atomic_path

    with atomic_path(jpath) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    kv = {"rlnAngleRot": ang[0], "rlnAngleTilt": ang[1], "rlnAnglePsi": ang[2], "rlnSymmetryGroup": res.sym,
          "cryopipeSymmetryResidual": res.residual, "cryopipeCentreShiftX": res.centre_shift_px[0],
          "cryopipeCentreShiftY": res.centre_shift_px[1], "cryopipeCentreShiftZ": res.centre_shift_px[2]}
    for i in range(3):
        for j in range(3):
            kv[f"cryopipeRotationMatrix{i}{j}"] = float(R[i][j])
    write_star(spath, {"align_symmetry": kv}, version=50001)
    return jpath, spath


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="input", required=True, help="input map (.mrc) or a RELION *_model.star")
    p.add_argument("--o", dest="output", default="aligned.mrc", help="output map")
    p.add_argument("--sym", required=True, help="target point group: Cn, Dn, T, O, I (I1-I4)")
    p.add_argument("--box_size", type=int, default=64, help="working box size (px) of the search")
    p.add_argument("--keep_centre", action="store_true", help="do not re-centre the map on its centre of mass")
    p.add_argument("--angpix", type=float, default=-1.0, help="pixel size (Å); default from the map header")
    p.add_argument("--only_rot", action="store_true", help="search rotations about z only")
    p.add_argument("--nr_uniform", type=int, default=400, help="random orientations of the global search")
    p.add_argument("--healpix_order", type=int, default=None,
                   help="global search on a HEALPix grid of this order instead of random orientations")
    p.add_argument("--maxres", type=float, default=-1.0, help="highest resolution (Å) scored (default: Nyquist)")
    p.add_argument("--local_search_range", type=int, default=2, help="local grid: ±this many steps")
    p.add_argument("--local_search_step", type=float, default=2.0, help="local grid step (degrees), then halved")
    p.add_argument("--min_step", type=float, default=0.125, help="finest local step (degrees)")
    p.add_argument("--apply_sym", action="store_true", help="also symmetrise the aligned map")
    p.add_argument("--select_largest_class", action="store_true",
                   help="model.star input: use the class with the largest rlnClassDistribution")
    p.add_argument("--select_highest_resol", action="store_true",
                   help="model.star input: use the class with the best rlnEstimatedResolution")
    p.add_argument("--rotate_method", choices=("auto", "fourier", "linear"), default="auto",
                   help="interpolation of the final rotation of the full map (auto: fourier up to box 320)")
    p.add_argument("--random_seed", type=int, default=None, help="seed of the random global orientations")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    from cryopipe.io.mrc import read_mrc
    from cryopipe.pipeline.log import log

    src = Path(args.input)
    if args.select_largest_class and args.select_highest_resol:
        raise CryopipeError("give only one of --select_largest_class and --select_highest_resol")
    canonical_symmetry_name(args.sym)  # validate early
    if src.suffix == ".star":
        mode = "largest" if args.select_largest_class else ("resol" if args.select_highest_resol else "all")
        maps = class_maps_from_model(src, mode)
    else:
        if args.select_largest_class or args.select_highest_resol:
            raise CryopipeError("--select_largest_class / --select_highest_resol need a *_model.star as --i")
        maps = [src]
    best: tuple[AlignSymmetryResult, float, Path] | None = None
    for m in maps:
        data, apix = read_mrc(m, finite=True)
        if data.ndim != 3 or len(set(data.shape)) != 1:
            raise InputFileError(m, f"is not a cubic 3D map (shape {data.shape})", "give a 3D map")
        if args.angpix and args.angpix > 0:
            apix = float(args.angpix)
        res = align_symmetry_full(
            data, args.sym, pixel_size=apix, box_size=args.box_size, keep_centre=args.keep_centre,
            nr_uniform=args.nr_uniform, healpix_order=args.healpix_order, only_rot=args.only_rot,
            maxres=args.maxres if args.maxres > 0 else None, local_search_range=args.local_search_range,
            local_search_step=args.local_search_step, min_step=args.min_step, apply_sym=args.apply_sym,
            seed=args.random_seed, rotate_method=args.rotate_method, device=args.device)
        log(f"align-symmetry {m}: ROT = {float(res.angles[0]):.3f} TILT = {float(res.angles[1]):.3f} "
            f"PSI = {float(res.angles[2]):.3f}, symmetry residual {res.residual:.4f} ({res.sym}, "
            f"{res.n_evaluations} orientations, {res.seconds:.1f} s)")
        if best is None or res.residual < best[0].residual:
            best = (res, apix, m)
    res, apix, m = best
    if len(maps) > 1:
        log(f"align-symmetry: keeping {m} (lowest symmetry residual {res.residual:.4f})")
    if res.residual > 0.25:
        log(f"align-symmetry: warning: residual {res.residual:.3f} is high — the map may not have {res.sym} symmetry")
    out = Path(args.output)
    jpath, spath = _write_outputs(out, res, apix, m)
    log(f"align-symmetry: the aligned map has been written to {out} (rotation in {spath}, {jpath})")
    return 0
