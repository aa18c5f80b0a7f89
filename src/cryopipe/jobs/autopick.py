"""``cryopipe autopick``: automated particle picking on micrographs, as RELION's ``relion_autopick``.

Pickers: Laplacian-of-Gaussian (``--LoG``, :func:`cryopipe.picking.log.log_pick`) and template matching
(``--ref``, :mod:`cryopipe.picking.template`; FOM maps ``<root>_<pickname>_fom.mrcs``/``.star`` with
``--write_fom_maps``, re-picked with ``--read_fom_maps``). A picker is any
:data:`cryopipe.picking.driver.PickFunction`, and :func:`cryopipe.picking.driver.run_autopick` does the rest
(micrograph loop, "continue", coordinate files, list file, summary, pictures); this module holds the options.

Outputs (RELION's layout, ``--odir`` = the job folder):

* ``<odir>/<micrograph path without Type/jobNNN/ and extension>_<pickname>.star`` per micrograph
  (``rlnCoordinateX/Y`` in micrograph pixels, ``rlnAutopickFigureOfMerit``, ``rlnClassNumber``, ``rlnAnglePsi``);
* ``<odir>/<pickname>.star``: table ``coordinate_files`` (``rlnMicrographName``, ``rlnMicrographCoordinates``)
  listing every micrograph of the input that has a coordinate file; registered as the job's output node
  (``MicrographCoordsGroup.star.relion.autopick``, RELION 5's label; RELION 4 called it
  ``MicrographsCoords.star.relion.autopick``);
* ``<odir>/summary.star``: mean FOM and number of picks per micrograph;
* ``<odir>/picks.png``: up to four micrographs (downscaled) with the picks circled, coloured by FOM
  (``--png_per_mic``: also one PNG next to each coordinate file).

Micrograph names in the input STAR are relative to the project directory (the current directory); when a name
is not found there it is looked up relative to the STAR file's folder. The pixel size is the optics group's
``rlnMicrographPixelSize`` (all groups must agree, as in RELION) unless ``--angpix`` is given.

Continue: with ``--continue`` (or RELION's ``--only_do_unfinished``) micrographs that already have a
coordinate file are skipped; the list file and summary always cover all micrographs of the input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cryopipe.engine.backend import add_dask_arguments, make_backend
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.picking.background import ContaminationOptions, contamination_aware_picker
from cryopipe.picking.common import coordinate_file_name
from cryopipe.picking.driver import (
    LoGOptions,
    _fom_map_writer,
    log_picker,
    read_micrograph_set,
    run_autopick,
)

HELP = ("automated particle picking on micrographs (RELION relion_autopick: --LoG Laplacian-of-Gaussian, "
        "--ref template matching)")


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="input", required=True, help="micrographs STAR file (e.g. CtfFind/job003/micrographs_ctf.star)")
    p.add_argument("--odir", "--o", dest="output", default=None,
                   help="output job folder, e.g. AutoPick/job004/ (default: a new AutoPick/jobNNN/ in the project)")
    p.add_argument("--pickname", default="autopick", help="rootname of the coordinate files")
    p.add_argument("--angpix", type=float, default=None, help="micrograph pixel size (Å); default rlnMicrographPixelSize")
    p.add_argument("--LoG", dest="log", action="store_true", help="Laplacian-of-Gaussian blob picking")
    p.add_argument("--LoG_diam_min", type=float, default=None, help="smallest particle diameter (Å)")
    p.add_argument("--LoG_diam_max", type=float, default=None, help="largest particle diameter (Å)")
    p.add_argument("--Log_invert", "--LoG_invert", dest="log_invert", action="store_true",
                   help="particles are white instead of black")
    p.add_argument("--LoG_adjust_threshold", type=float, default=0.0,
                   help="threshold in σ of the FOM above its mean: positive = fewer picks, negative = more")
    p.add_argument("--LoG_upper_threshold", type=float, default=99999.0,
                   help="no picks above this many σ (e.g. 5 to skip ice contamination / carbon edges)")
    p.add_argument("--LoG_neighbour", type=float, default=100.0,
                   help="exclusion distance between picks: (detected + minimum diameter) × this %% / 2")
    p.add_argument("--Log_max_search", "--LoG_max_search", dest="log_max_search", type=float, default=5.0,
                   help="largest searched diameter is this many times --LoG_diam_max")
    p.add_argument("--LoG_use_ctf", action="store_true", help="divide the micrograph by its CTF up to the first peak")
    p.add_argument("--LoG_robust_threshold", action="store_true",
                   help="(not in RELION) thresholds in units of the median and 1.4826·MAD of the FOMs instead of their "
                        "mean and σ: contamination no longer raises the threshold, and --LoG_upper_threshold can remove "
                        "it (recommended with it: --LoG_adjust_threshold 4 --LoG_upper_threshold 12)")
    p.add_argument("--lowpass", type=float, default=20.0,
                   help="resolution (Å) of the work grid for --shrink 0; <= 0 = none (RELION GUI value 20; "
                        "relion_autopick's own default is none)")
    p.add_argument("--shrink", type=float, default=0.0,
                   help="0 = work at the --lowpass resolution; 0 < s <= 1 = fraction of the size; s > 1 = size in "
                        "pixels (RELION GUI value 0; relion_autopick's own default is 1)")
    p.add_argument("--skip_optimise_scale", action="store_true", help="keep the work size even if its FFT is slow")
    p.add_argument("--outlier_removal_zscore", type=float, default=8.0,
                   help="pixels this many σ from the mean are set to the mean")
    p.add_argument("--skip_side", type=int, default=0, help="extra pixels to skip at the edges (at least dmin/2 is skipped)")
    p.add_argument("--random_seed", type=int, default=1, help="seed of the noise that pads non-square micrographs")
    p.add_argument("--write_fom_maps", action="store_true",
                   help="also write the FOM maps (MRC; LoG: best-LoG and best-diameter maps; --ref: one "
                        "<root>_fom.mrcs stack with the per-reference FOM/ψ maps and the local background σ/mean)")
    p.add_argument("--only_do_unfinished", action="store_true", help="skip micrographs that have a coordinate file")
    p.add_argument("--continue", dest="continue_", action="store_true",
                   help="continue the job given by --odir: pick only micrographs without a coordinate file")
    p.add_argument("--png_per_mic", action="store_true", help="write a PNG with the picks next to each coordinate file")
    p.add_argument("--no_png", action="store_true", help="do not write picks.png")
    p.add_argument("--ref", default=None,
                   help="template picking references: a class-averages STAR file (rlnReferenceImage or rlnImageName), "
                        "an .mrcs stack, a 3D map (projected on --healpix_order directions), or 'gauss' (blob)")
    # template picking (--ref): relion_autopick's options and CLI defaults (RELION GUI values in brackets)
    p.add_argument("--angpix_ref", type=float, default=-1.0,
                   help="pixel size of the references (Å); default: their MRC header, else the micrographs'")
    p.add_argument("--invert", action="store_true", help="the micrograph's particles have the opposite contrast of "
                   "the references (e.g. white class averages or maps, dark particles)")
    p.add_argument("--ang", type=float, default=10.0, help="in-plane angular step (degrees; rounded so that 360/step "
                   "is an integer; 360 = no rotations) [GUI 5]")
    p.add_argument("--highpass", type=float, default=-1.0, help="high-pass filter the micrographs at this resolution (Å)")
    p.add_argument("--ctf", action="store_true", help="multiply the references by each micrograph's CTF")
    p.add_argument("--ctf_intact_first_peak", action="store_true", help="with --ctf: CTF = 1 before its first peak")
    p.add_argument("--particle_diameter", type=float, default=-1.0,
                   help="diameter (Å) of the particle mask; < 0 = from the references")
    p.add_argument("--shrink_particle_mask", type=int, default=2, help="shrink the particle mask by this many pixels")
    p.add_argument("--gauss_max", type=float, default=0.1, help="peak value of the --ref gauss blob")
    p.add_argument("--healpix_order", type=int, default=1, help="directions of the projections of a 3D reference")
    p.add_argument("--sym", default="C1", help="symmetry of a 3D reference (projections in its asymmetric unit)")
    p.add_argument("--threshold", type=float, default=0.25,
                   help="picking threshold: fraction of the expected likelihood ratio of a particle [GUI 0.05]")
    p.add_argument("--min_distance", type=float, default=-1.0,
                   help="minimum distance between picks (Å); < 0 = half the reference box [GUI 100]")
    p.add_argument("--max_stddev_noise", type=float, default=-1.0,
                   help="no picks where the local background σ exceeds this (normalised units; e.g. 1.1 against "
                        "contamination and carbon edges); <= 0 = off [GUI 1.1]")
    p.add_argument("--min_avg_noise", type=float, default=-999.0,
                   help="no picks where the local background mean is below this; <= -900 = off")
    p.add_argument("--read_fom_maps", action="store_true",
                   help="pick from the FOM maps of an earlier --write_fom_maps run (new thresholds/distances in seconds)")
    p.add_argument("--no_fom_limit", action="store_true", help="allow --write_fom_maps for more than 30 micrographs")
    p.add_argument("--flatten", action="store_true",
                   help="(not in RELION) pick on the micrograph with its local ice background and noise level normalised "
                        "and contamination (large dark/bright regions, carbon, their rims) replaced by noise "
                        "(cryopipe.picking.background; for ice gradients and contamination)")
    p.add_argument("--contamination_mask", action="store_true",
                   help="(not in RELION) drop picks on or within --contamination_margin of contamination")
    p.add_argument("--contamination_threshold", type=float, default=0.75,
                   help="contamination: regions offset from the ice by more than this many noise σ")
    p.add_argument("--contamination_edge", type=float, default=1.2,
                   help="contamination rims: steps steeper than this many noise σ per 100 Å")
    p.add_argument("--contamination_margin", type=float, default=0.0, help="with --contamination_mask: margin (Å)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dask_arguments(p)
    p.add_argument("--j", dest="threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; on a busy machine 1 is often fastest)")


def _run_autopick(args: argparse.Namespace, *a, **kw):
    """:func:`run_autopick` on the ``--dask`` backend (micrographs picked by Dask workers; default in-process)."""
    from cryopipe.pipeline.log import log

    backend = make_backend(args.dask, args.dask_batches_per_worker)
    try:
        if backend.distributed:
            log(f"autopick: micrographs picked on {backend.describe()}")
        return run_autopick(*a, backend=backend, **kw)
    finally:
        backend.close()


def _contamination_options(args: argparse.Namespace) -> ContaminationOptions:
    return ContaminationOptions(flatten=args.flatten, reject=args.contamination_mask,
                                threshold=args.contamination_threshold, edge_threshold=args.contamination_edge,
                                margin_A=args.contamination_margin)


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    if args.ref is not None and args.log:
        raise CryopipeError("give one picking method: --LoG or --ref, not both")
    if args.ref is not None:
        return _main_template(args)
    if not args.log:
        raise CryopipeError("give a picking method: --LoG (with --LoG_diam_min and --LoG_diam_max) or --ref <references>")
    if args.LoG_diam_min is None or args.LoG_diam_max is None:
        raise CryopipeError("--LoG needs --LoG_diam_min and --LoG_diam_max (particle diameter range in Å)")
    if args.LoG_diam_min <= 0 or args.LoG_diam_max < args.LoG_diam_min:
        raise CryopipeError(f"--LoG_diam_min {args.LoG_diam_min} / --LoG_diam_max {args.LoG_diam_max}: need "
                            "0 < min <= max (Å)")
    if args.threads is not None:
        if args.threads < 1:
            raise CryopipeError(f"--j {args.threads}: give at least 1 thread")
        torch.set_num_threads(args.threads)
    mics = read_micrograph_set(args.input, angpix=args.angpix)
    if len(mics) == 0:
        raise InputFileError(args.input, "lists no micrographs", "check the input STAR file")
    pixel_size = mics.pixel_size
    if pixel_size is None or not pixel_size > 0:
        raise InputFileError(args.input, "has no rlnMicrographPixelSize in its optics table",
                             "give --angpix (Å per micrograph pixel)")
    opts = LoGOptions(diam_min=args.LoG_diam_min, diam_max=args.LoG_diam_max, invert=args.log_invert,
                      adjust_threshold=args.LoG_adjust_threshold, upper_threshold=args.LoG_upper_threshold,
                      neighbour=args.LoG_neighbour, max_search=args.log_max_search, use_ctf=args.LoG_use_ctf,
                      lowpass=args.lowpass if args.lowpass is not None and args.lowpass > 0 else None,
                      shrink=args.shrink, outlier_zscore=args.outlier_removal_zscore, skip_side=args.skip_side,
                      optimise_scale=not args.skip_optimise_scale, random_seed=args.random_seed,
                      robust_threshold=args.LoG_robust_threshold)
    in_type = NodeType.MICROGRAPHS_CTF if mics.ctf is not None else NodeType.MICROGRAPHS
    with open_job_dir(args.output, "AutoPick", ProcessLabel.AUTOPICK_LOG, inputs=[(args.input, in_type)],
                      params=vars(args), continue_job=args.continue_) as job:
        odir = job.relpath(job.dir)
        odir = odir if odir.endswith("/") else odir + "/"
        writer = _fom_map_writer(job.root, odir, args.pickname, pixel_size) if args.write_fom_maps else None
        picker = contamination_aware_picker(log_picker(opts, writer), _contamination_options(args))
        log(f"autopick: LoG picking of {len(mics)} micrographs from {args.input}, diameters {opts.diam_min:g}-"
            f"{opts.diam_max:g} Å, pixel size {pixel_size:g} Å")
        res = _run_autopick(args, mics, odir, picker, pixel_size=pixel_size, pickname=args.pickname,
                           only_unfinished=args.continue_ or args.only_do_unfinished, root=job.root,
                           device=args.device, png=not args.no_png, png_per_mic=args.png_per_mic,
                           display_diameter=0.5 * (opts.diam_min + opts.diam_max))
        job.add_output(res.coordinate_list, NodeType.AUTOPICK_COORDS)
    return 0


def _main_template(args: argparse.Namespace) -> int:
    """``--ref``: template picking (:mod:`cryopipe.picking.template`) through :func:`run_autopick`.

    FOM maps (``--write_fom_maps``) go next to the coordinate files as ``<root>_<pickname>_fom.mrcs`` + ``.star``
    (see :func:`cryopipe.picking.template.write_template_maps`). Continue: with ``--write_fom_maps`` or
    ``--read_fom_maps`` every micrograph is (re-)picked; otherwise only those without a coordinate file.
    """
    from cryopipe.picking.template import (
        TemplateOptions,
        gauss_reference,
        make_template_picker,
        prepare_references,
        read_reference_images,
    )
    from cryopipe.pipeline.log import log, warn
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    if args.threads is not None:
        if args.threads < 1:
            raise CryopipeError(f"--j {args.threads}: give at least 1 thread")
        torch.set_num_threads(args.threads)
    if args.read_fom_maps and args.write_fom_maps:
        raise CryopipeError("--read_fom_maps and --write_fom_maps exclude each other (maps are read or computed)")
    mics = read_micrograph_set(args.input, angpix=args.angpix)
    if len(mics) == 0:
        raise InputFileError(args.input, "lists no micrographs", "check the input STAR file")
    pixel_size = mics.pixel_size
    if pixel_size is None or not pixel_size > 0:
        raise InputFileError(args.input, "has no rlnMicrographPixelSize in its optics table",
                             "give --angpix (Å per micrograph pixel)")
    if args.write_fom_maps and len(mics) > 30 and not args.no_fom_limit:
        raise CryopipeError(f"--write_fom_maps for {len(mics)} micrographs: add --no_fom_limit to write more than 30")
    gauss = str(args.ref).lower() == "gauss"
    if args.ctf and not gauss and mics.ctf is None:
        raise InputFileError(args.input, "has no CTF parameters (rlnDefocusU) for --ctf", "use the CtfFind output")
    is3d = False
    in_type = NodeType.MICROGRAPHS_CTF if mics.ctf is not None else NodeType.MICROGRAPHS
    label = ProcessLabel.AUTOPICK_REF2D
    if not gauss and Path(args.ref).suffix.lower() == ".mrc":
        from cryopipe.io.mrc import mrc_info

        info = mrc_info(args.ref)
        is3d = info.shape[0] > 1 and not info.is_stack
        label = ProcessLabel.AUTOPICK_REF3D if is3d else label
    with open_job_dir(args.output, "AutoPick", label, inputs=[(args.input, in_type)],
                      params=vars(args), continue_job=args.continue_) as job:
        odir = job.relpath(job.dir)
        odir = odir if odir.endswith("/") else odir + "/"
        if gauss:
            imgs, apix_ref, names = gauss_reference(args.particle_diameter, pixel_size, args.gauss_max), pixel_size, ["gauss"]
        else:
            imgs, header_apix, names, is3d = read_reference_images(args.ref, root=job.root,
                                                                   healpix_order=args.healpix_order, sym=args.sym)
            apix_ref = args.angpix_ref if args.angpix_ref > 0 else (header_apix if header_apix > 0 else pixel_size)
        refs = prepare_references(imgs, pixel_size, pixel_size_ref=apix_ref, particle_diameter=args.particle_diameter,
                                  shrink_particle_mask=args.shrink_particle_mask, invert=args.invert,
                                  psi_step=360.0 if gauss else args.ang, names=names, apply_ctf=not gauss)
        opts = TemplateOptions(lowpass=args.lowpass if args.lowpass is not None and args.lowpass > 0 else None,
                               highpass=args.highpass if args.highpass > 0 else None, shrink=args.shrink,
                               ctf=args.ctf and not gauss, ctf_intact_first_peak=args.ctf_intact_first_peak,
                               outlier_zscore=args.outlier_removal_zscore, optimise_scale=not args.skip_optimise_scale,
                               random_seed=args.random_seed, threshold=args.threshold, min_distance=args.min_distance,
                               max_stddev_noise=args.max_stddev_noise, min_avg_noise=args.min_avg_noise,
                               skip_side=args.skip_side)
        root = job.root

        def maps_base(ctx) -> Path:
            return root / coordinate_file_name(ctx.name, odir, args.pickname)[: -len(".star")]

        picker = make_template_picker(refs, opts, maps_base=maps_base, write_maps=args.write_fom_maps,
                                      read_maps=args.read_fom_maps, warn=warn)
        picker = contamination_aware_picker(picker, _contamination_options(args))
        log(f"autopick: template picking of {len(mics)} micrographs from {args.input} with {len(refs)} "
            f"{'projections of ' + str(args.ref) if is3d else 'references from ' + str(args.ref)} ({apix_ref:g} Å/px, "
            f"box {refs.box} px at {pixel_size:g} Å/px, particle diameter {refs.particle_diameter:g} Å)"
            + (", re-picking from FOM maps" if args.read_fom_maps else ""))
        fom_maps = args.write_fom_maps or args.read_fom_maps
        res = _run_autopick(args, mics, odir, picker, pixel_size=pixel_size, pickname=args.pickname,
                           only_unfinished=(args.continue_ and not fom_maps) or args.only_do_unfinished,
                           root=job.root, device=args.device, png=not args.no_png, png_per_mic=args.png_per_mic,
                           display_diameter=refs.particle_diameter)
        job.add_output(res.coordinate_list, NodeType.AUTOPICK_COORDS)
    return 0
