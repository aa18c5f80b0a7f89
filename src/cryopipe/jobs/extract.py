"""``cryopipe extract``: particle extraction from micrographs (like ``relion_preprocess --extract``).

For every micrograph of ``--i`` that has coordinates (``--coord_list`` / ``--coord_dir`` + ``--coord_suffix`` /
``--reextract_data_star``), all its particles are windowed at once (box ``--extract_size``, centre at
``(long)rlnCoordinate``), optionally Fourier-rescaled (``--scale``), re-windowed (``--window``), normalised
(``--norm``, background outside ``--bg_radius``), dust-cleaned and contrast-inverted, in RELION's order. Output
layout (as RELION): ``<job>/<micrograph path without the Type/jobNNN/ prefix>.mrcs`` (one stack per micrograph),
a ``_extract.star`` per micrograph, and ``<job>/particles.star`` (RELION 3.1 layout: ``data_optics`` with
rlnImagePixelSize / rlnImageSize / rlnImageDimensionality / rlnCtfDataAreCtfPremultiplied, ``data_particles``
with rlnCoordinateX/Y, rlnImageName ``000001@stack.mrcs``, rlnMicrographName, rlnOpticsGroup, the micrograph's
CTF, and every column of the coordinate file, e.g. autopick FOM / class / psi). Micrographs are processed one at
a time (memory: one micrograph plus one batch of particles). ``--continue`` keeps micrographs whose stack and
``_extract.star`` exist. Names inside STAR files are relative to the project directory (the current directory,
or the project of ``--o Type/jobNNN/``).

Re-extraction (``--reextract_data_star run_data.star``) re-uses refined particles: their coordinates, angles and
CTF; with ``--recenter`` each coordinate moves by the rounded refined origin (centre = coordinate − origin),
optionally first re-centred on ``--recenter_x/y/z`` (pixels of the reference), and the sub-pixel remainder stays
as the origin (RELION's behaviour).

This module holds the options and the job folder; the work is :mod:`cryopipe.extraction.plan` (inputs checked,
outputs named) and :mod:`cryopipe.extraction.run` (the micrographs, one at a time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryopipe.engine.backend import add_dask_arguments, make_backend
from cryopipe.errors import CryopipeError
from cryopipe.extraction.plan import ExtractOptions, plan_extraction
from cryopipe.extraction.run import run_extraction

HELP = "extract particles from micrographs (like relion_preprocess --extract), or re-extract refined particles"

__all__ = ["HELP", "add_arguments", "main"]


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input / output")
    g.add_argument("--i", required=True, metavar="STAR", help="micrographs STAR file (e.g. micrographs_ctf.star)")
    g.add_argument("--coord_list", "--coords", metavar="STAR",
                   help="coordinate list STAR (data_coordinate_files: rlnMicrographName, rlnMicrographCoordinates), "
                        "e.g. AutoPick/job006/autopick.star")
    g.add_argument("--coord_dir", metavar="DIR", help="directory with <micrograph root><coord_suffix> files")
    g.add_argument("--coord_suffix", metavar="SUFFIX", default=None,
                   help="coordinate file suffix with --coord_dir (default _autopick.star)")
    g.add_argument("--reextract_data_star", "--reextract", metavar="STAR",
                   help="re-extract refined particles from this _data.star instead of coordinate files")
    g.add_argument("--o", "--part_dir", dest="o", metavar="DIR", default=None,
                   help="job folder (default: a new Extract/jobNNN/ in the project in the current directory)")
    g.add_argument("--part_star", metavar="STAR", default=None,
                   help="output particles STAR (default <job>/particles.star)")
    g.add_argument("--alias", default=None, help="job alias")
    g.add_argument("--continue", dest="continue_", action="store_true",
                   help="continue the job in --o: keep micrographs whose stack and _extract.star exist")
    g.add_argument("--only_do_unfinished", dest="continue_", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--extract", action="store_true", help=argparse.SUPPRESS)  # relion_preprocess compatibility
    g.add_argument("--set_angpix", type=float, default=None, help="micrograph pixel size (Å) if the STAR has none")

    e = p.add_argument_group("extraction")
    e.add_argument("--extract_size", "--box", dest="extract_size", type=int, required=True,
                   help="box size to extract (pixels of the micrograph, even)")
    e.add_argument("--scale", "--rescale", dest="scale", type=int, default=None,
                   help="Fourier-rescale the particles to this box (pixels, even); pixel size × extract_size/scale")
    e.add_argument("--window", type=int, default=None, help="re-window (crop/pad) to this box after rescaling")
    e.add_argument("--norm", action="store_true", help="normalise: background mean 0, stddev 1")
    e.add_argument("--no_ramp", action="store_true", help="only subtract the background mean, no fitted plane")
    e.add_argument("--bg_radius", type=int, default=None,
                   help="background radius (pixels of the output box); default 75%% of the box diameter")
    e.add_argument("--bg_diameter", type=float, default=None,
                   help="background circle diameter in pixels of the extraction box (GUI option; -1: 75%% of box)")
    e.add_argument("--white_dust", type=float, default=-1.0, help="remove white dust above this many sigma (-1: off)")
    e.add_argument("--black_dust", type=float, default=-1.0, help="remove black dust below this many sigma (-1: off)")
    e.add_argument("--invert_contrast", "--invert", dest="invert_contrast", action="store_true",
                   help="invert contrast (dark particles become white)")
    e.add_argument("--float16", action="store_true", help="write stacks as float16 (MRC mode 12)")
    e.add_argument("--minimum_pick_fom", type=float, default=None,
                   help="only extract picks with rlnAutopickFigureOfMerit above this")
    e.add_argument("--extract_bias_x", type=int, default=0, help="add this (pixels) to every X coordinate")
    e.add_argument("--extract_bias_y", type=int, default=0, help="add this (pixels) to every Y coordinate")

    r = p.add_argument_group("re-extraction")
    r.add_argument("--recenter", action="store_true",
                   help="move each coordinate by the rounded refined origin (needs rlnOriginX/YAngst)")
    r.add_argument("--recenter_x", type=float, default=0.0, help="X (pixels of the reference) to centre on")
    r.add_argument("--recenter_y", type=float, default=0.0, help="Y (pixels of the reference) to centre on")
    r.add_argument("--recenter_z", type=float, default=0.0, help="Z (pixels of the reference) to centre on")
    r.add_argument("--ref_angpix", type=float, default=None,
                   help="pixel size of the reference for --recenter_x/y/z (default: the particles')")
    r.add_argument("--reset_offsets", action="store_true", help="set the refined origins to zero")
    r.add_argument("--keep_ctfs_micrographs", action="store_true",
                   help="take CTFs (and optics) from the micrographs STAR instead of the re-extracted particles")

    c = p.add_argument_group("computation")
    c.add_argument("--seed", "--random_seed", dest="seed", type=int, default=0, help="seed for dust-replacement noise")
    c.add_argument("--batch", type=int, default=256, help="particles per batch on the device")
    c.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")
    add_dask_arguments(c)


def _options_from_args(args: argparse.Namespace) -> ExtractOptions:
    return ExtractOptions(
        extract_size=args.extract_size, scale=args.scale, window=args.window, norm=args.norm,
        bg_radius=args.bg_radius if args.bg_radius is not None and args.bg_radius >= 0 else None,
        bg_diameter=args.bg_diameter, white_dust=args.white_dust, black_dust=args.black_dust,
        ramp=not args.no_ramp, invert_contrast=args.invert_contrast, float16=args.float16,
        minimum_pick_fom=args.minimum_pick_fom, extract_bias=(args.extract_bias_x, args.extract_bias_y),
        recenter=args.recenter, recenter_xyz=(args.recenter_x, args.recenter_y, args.recenter_z),
        ref_angpix=args.ref_angpix, reset_offsets=args.reset_offsets,
        keep_ctfs_micrographs=args.keep_ctfs_micrographs, seed=args.seed, batch_size=args.batch)


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir, output_root

    options = _options_from_args(args)
    root = output_root(args.o)
    # Check everything before the job folder is created: bad input leaves no output behind.
    plan = plan_extraction(args.i, options=options, coord_list=args.coord_list, coord_dir=args.coord_dir,
                           coord_suffix=args.coord_suffix, reextract_data_star=args.reextract_data_star, root=root,
                           set_angpix=args.set_angpix)
    label = ProcessLabel.REEXTRACT if plan.reextract else ProcessLabel.EXTRACT
    inputs = [(args.i, NodeType.MICROGRAPHS_CTF)]
    if args.coord_list:
        inputs.append((args.coord_list, NodeType.AUTOPICK_COORDS))
    if args.reextract_data_star:
        inputs.append((args.reextract_data_star, NodeType.PARTICLES))
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    with open_job_dir(args.o, "Extract", label, alias=args.alias, inputs=inputs, params=params,
                      continue_job=args.continue_) as job:
        part_star = Path(args.part_star) if args.part_star else job.path("particles.star")
        backend = make_backend(args.dask, args.dask_batches_per_worker)
        try:
            if backend.distributed:
                log(f"extract: micrographs extracted on {backend.describe()}")
            path, _ = run_extraction(plan, job.dir, part_star=part_star, continue_=args.continue_,
                                     device=args.device, backend=backend)
        finally:
            backend.close()
        try:
            job.add_output(path, NodeType.EXTRACT_PARTICLES)
        except CryopipeError:
            pass  # --part_star outside the job folder: written, but not a pipeline node
    return 0
