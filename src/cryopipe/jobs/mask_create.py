"""``cryopipe mask-create``: a soft-edged solvent mask from a map (like ``relion_mask_create``).

Steps (RELION semantics, :mod:`cryopipe.core.mask_ops`): optional low-pass filter of the input map (``--lowpass``
Å, raised-cosine edge of 2 shells), binarisation at ``--ini_threshold`` (``map >= t``; or a logical combination
with a second map, ``--and/--or/--and_not/--or_not``, with strict comparisons as RELION), extension
(``--extend_inimask N`` pixels; negative shrinks), a raised-cosine soft edge of ``--width_soft_edge`` pixels,
optional ``--invert`` (``1 − mask``). ``--denovo`` makes a spherical crown mask without an input map.

``--binary`` writes a 0/1 mask instead, for programs that want a binary mask: the soft mask thresholded at 0.5,
i.e. the extended binary mask when ``--width_soft_edge`` is 0, and that mask grown by half the soft-edge width
(where the cosine edge crosses 0.5) otherwise. ``--invert`` is applied before binarisation.

Output (``--o``): a file name ending in ``.mrc`` (written as given; inside a ``Type/jobNNN/`` folder that folder
is handled as a job), or a job folder / nothing (a new ``MaskCreate/jobNNN/`` in the project in the current
directory) holding ``mask.mrc``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryopipe.core.device import resolve_device
from cryopipe.core.mask_ops import binarize_soft_mask, create_mask, raised_crown_mask
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.mrc import read_mrc, write_mrc

HELP = "soft-edged solvent mask from a map: threshold, extend, cosine edge (like relion_mask_create)"

_OPS = ("and", "or", "and_not", "or_not")


@dataclass
class MaskResult:
    """A mask and its bookkeeping numbers."""

    mask: np.ndarray  # float32 [z, y, x] in [0, 1]
    pixel_size: float  # Å
    fraction_one: float  # fraction of voxels == 1
    fraction_nonzero: float  # fraction of voxels > 0


def _summary(mask: np.ndarray, pixel_size: float) -> MaskResult:
    return MaskResult(mask=mask, pixel_size=pixel_size, fraction_one=float((mask >= 1.0).mean()),
                      fraction_nonzero=float((mask > 0).mean()))


def _read_map(path: str | Path, what: str) -> tuple[np.ndarray, float]:
    data, apix = read_mrc(path, finite=True)
    if data.ndim not in (2, 3):
        raise InputFileError(path, f"{what} has {data.ndim} dimensions", "give a 3D map (or a 2D image)")
    return data, apix


def mask_create_file(input_map: str | Path | None, output: str | Path, *, angpix: float = -1.0,
                     other_map: str | Path | None = None, op: str | None = None, denovo: bool = False,
                     box_size: int = -1, inner_radius: float = 0.0, outer_radius: float = 99999.0,
                     center: tuple[float, float, float] = (0.0, 0.0, 0.0), **kwargs) -> MaskResult:
    """Read ``input_map`` (and ``other_map``), make the mask (:func:`create_mask` keyword arguments in
    ``kwargs``), write it to ``output`` (float32 MRC, pixel size ``angpix`` or the input's). With ``denovo`` a
    crown mask of ``box_size`` pixels is made instead (radii and ``center`` in pixels; edge
    ``kwargs['width_soft_edge']``)."""
    res = make_mask(input_map, angpix=angpix, other_map=other_map, op=op, denovo=denovo, box_size=box_size,
                    inner_radius=inner_radius, outer_radius=outer_radius, center=center, **kwargs)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mrc(out, res.mask, res.pixel_size)
    return res


def make_mask(input_map: str | Path | None, *, angpix: float = -1.0, other_map: str | Path | None = None,
              op: str | None = None, denovo: bool = False, box_size: int = -1, inner_radius: float = 0.0,
              outer_radius: float = 99999.0, center: tuple[float, float, float] = (0.0, 0.0, 0.0),
              **kwargs) -> MaskResult:
    """Validate the inputs and compute the mask (no file written); raises :class:`CryopipeError` on bad input."""
    if denovo:
        if box_size is None or box_size <= 0:
            raise CryopipeError("--denovo needs --box_size (the mask's box size in pixels)")
        width = float(kwargs.get("width_soft_edge", 0.0))
        dev = resolve_device(kwargs.get("device"))
        m = raised_crown_mask(int(box_size), float(inner_radius), float(outer_radius), width, center, device=dev)
        if kwargs.get("invert"):
            m = 1.0 - m
        if kwargs.get("binary"):
            m = binarize_soft_mask(m)
        apix = angpix if angpix and angpix > 0 else 1.0
        return _summary(m.cpu().numpy().astype(np.float32), apix)
    if not input_map:
        raise CryopipeError("give the input map with --i (or --denovo with --box_size)")
    vol, header_apix = _read_map(input_map, "the input map")
    apix = angpix if angpix and angpix > 0 else header_apix
    lowpass = kwargs.get("lowpass", -1.0)
    if lowpass is not None and lowpass > 0:
        if apix <= 0:
            raise InputFileError(input_map, "has no pixel size in its header", "give --angpix for --lowpass")
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise InputFileError(input_map, f"is not a cubic map (shape {vol.shape}) and cannot be low-pass filtered",
                                 "leave out --lowpass")
    if apix <= 0:
        apix = 1.0
    other = None
    if op is not None:
        if op not in _OPS:
            raise CryopipeError(f"unknown map combination {op!r} (use --and, --or, --and_not or --or_not)")
        if not other_map:
            raise CryopipeError(f"--{op} needs a map file")
        other, _ = _read_map(other_map, f"the --{op} map")
        if other.shape != vol.shape:
            raise InputFileError(other_map, f"has shape {other.shape} but the input map {input_map} has {vol.shape}",
                                 "give maps of the same box size")
    width = float(kwargs.get("width_soft_edge", 0.0))
    if width < 0:
        raise CryopipeError(f"--width_soft_edge must be >= 0, got {width:g}")
    mask = create_mask(vol, apix, other=other, op=op, **kwargs)
    return _summary(mask, apix)


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="input", default=None, help="input map to threshold")
    p.add_argument("--o", dest="output", default=None,
                   help="output mask file (.mrc), or a job folder (MaskCreate/jobNNN/; none: a new job in the "
                        "project in the current directory) that gets mask.mrc")
    p.add_argument("--ini_threshold", type=float, default=0.01, help="density threshold of the initial binary mask")
    p.add_argument("--extend_inimask", type=float, default=0.0,
                   help="extend the binary mask by this many pixels (negative: shrink)")
    p.add_argument("--width_soft_edge", type=float, default=0.0, help="width (pixels) of the raised-cosine soft edge")
    p.add_argument("--lowpass", type=float, default=-1.0, help="low-pass filter (Å) the input map first (<=0: none)")
    p.add_argument("--angpix", type=float, default=-1.0, help="pixel size (Å); default: from the input header")
    p.add_argument("--invert", action="store_true", help="invert the final mask (1 - mask)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--and", dest="and_map", default=None, help="1 where the input AND this map are above threshold")
    g.add_argument("--or", dest="or_map", default=None, help="1 where the input OR this map is above threshold")
    g.add_argument("--and_not", dest="and_not_map", default=None,
                   help="1 where the input is above AND this map below threshold")
    g.add_argument("--or_not", dest="or_not_map", default=None,
                   help="1 where the input is above OR this map below threshold")
    p.add_argument("--binary", action="store_true",
                   help="write a 0/1 mask (soft mask >= 0.5: the extended mask grown by half the soft edge)")
    p.add_argument("--denovo", action="store_true", help="make a spherical crown mask without an input map")
    p.add_argument("--box_size", type=int, default=-1, help="box size (pixels) for --denovo")
    p.add_argument("--inner_radius", type=float, default=0.0, help="--denovo inner radius (pixels)")
    p.add_argument("--outer_radius", type=float, default=99999.0, help="--denovo outer radius (pixels)")
    p.add_argument("--center_x", type=float, default=0.0, help="--denovo centre x (pixels from the box centre)")
    p.add_argument("--center_y", type=float, default=0.0, help="--denovo centre y (pixels from the box centre)")
    p.add_argument("--center_z", type=float, default=0.0, help="--denovo centre z (pixels from the box centre)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _op_and_map(args: argparse.Namespace) -> tuple[str | None, str | None]:
    for op in _OPS:
        v = getattr(args, f"{op}_map", None)
        if v:
            return op, v
    return None, None


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    op, other = _op_and_map(args)
    kwargs = dict(ini_threshold=args.ini_threshold, extend_inimask=args.extend_inimask,
                  width_soft_edge=args.width_soft_edge, lowpass=args.lowpass, invert=args.invert,
                  binary=args.binary, device=args.device)
    geo = dict(angpix=args.angpix, other_map=other, op=op, denovo=args.denovo, box_size=args.box_size,
               inner_radius=args.inner_radius, outer_radius=args.outer_radius,
               center=(args.center_x, args.center_y, args.center_z))
    out_arg = args.output
    job_dir, name = None, "mask.mrc"
    if out_arg and str(out_arg).lower().endswith(".mrc"):
        parent = Path(out_arg).parent
        if re.fullmatch(r"job\d{3,}", parent.name):
            job_dir, name = str(parent) + "/", Path(out_arg).name
        else:  # relion_mask_create style: just the file
            res = make_mask(args.input, **geo, **kwargs)
            out = Path(out_arg)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_mrc(out, res.mask, res.pixel_size)
            print(f"mask written to {out}: {res.fraction_one:.4f} of the voxels are 1, {res.fraction_nonzero:.4f} > 0")
            return 0
    else:
        job_dir = out_arg
    res = make_mask(args.input, **geo, **kwargs)  # inputs checked before any folder is made
    inputs = [(args.input, NodeType.DENSITY_MAP)] + ([(other, NodeType.DENSITY_MAP)] if other else [])
    with open_job_dir(job_dir, "MaskCreate", ProcessLabel.MASKCREATE, inputs=inputs, params=vars(args)) as job:
        out = job.path(name)
        write_mrc(out, res.mask, res.pixel_size)
        job.add_output(out, NodeType.MASKCREATE_MASK)
        log(f"mask written to {job.relpath(out)}: {res.fraction_one:.4f} of the voxels are 1, "
            f"{res.fraction_nonzero:.4f} > 0 ({res.mask.shape[-1]} px box, {res.pixel_size:g} Å/px)")
    return 0
