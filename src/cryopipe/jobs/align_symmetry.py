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

Python API (:mod:`cryopipe.core.symmetry_align`): :func:`~cryopipe.core.symmetry_align.align_symmetry`
``(volume, sym, ...) -> (aligned_volume, rotation_matrix, angles)`` and
:func:`~cryopipe.core.symmetry_align.align_symmetry_full` (everything, as ``AlignSymmetryResult``); this module
holds the options and the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryopipe.core.symmetry import canonical_symmetry_name
from cryopipe.core.symmetry_align import AlignSymmetryResult, align_symmetry_full
from cryopipe.engine.symmetry_files import write_symmetry_outputs
from cryopipe.errors import CryopipeError, InputFileError

HELP = "rotate a map so that its symmetry axes follow RELION's conventions (relion_align_symmetry), --apply_sym"


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
    jpath, spath = write_symmetry_outputs(out, res, apix, m)
    log(f"align-symmetry: the aligned map has been written to {out} (rotation in {spath}, {jpath})")
    return 0
