"""Command-line part of ``cryopipe select --classes`` (hooked into :mod:`cryopipe.jobs.select`).

``cryopipe select --classes --i Class2D/job008/run_it025_optimiser.star (--select_classes 1,3,5 | --auto)
[--min_score 0.5] [--recenter] [--sort_by rlnClassDistribution] [--regroup N] [--o Select/job009/]``

Registered as ``relion.select.interactive`` (classes chosen by number, as RELION records a manual selection)
or ``relion.select.class2dauto`` (``--auto``), input node the optimiser (``OptimiserData.star.relion.class2d``)
or the data STAR, output nodes ``particles.star`` (``ParticleGroupMetadata.star.relion``) and
``class_averages.star`` (``Image2DGroupMetadata.star.relion.classaverages``). Files: see
:mod:`cryopipe.selection.files`.
"""

from __future__ import annotations

import argparse
import math

#: ``--sort_by`` keys (the same as :data:`cryopipe.selection.classes.SORT_DIRECTIONS`; listed here so that
#: building the command line does not import torch)
SORT_KEYS = ("rlnClassDistribution", "rlnClassScore", "rlnAccuracyRotations", "rlnAccuracyTranslationsAngst",
             "rlnEstimatedResolution", "rlnClassNumber")

AUTO_HELP = (
    "select classes by an automatic score in [0,1]: score = f_img * (0.4 f_res + 0.2 f_dist + 0.2 f_rot + "
    "0.2 f_trans), with f_res = best rlnEstimatedResolution / this one, f_dist = u/(u+0.25) for u = K * "
    "rlnClassDistribution, f_rot / f_trans = best rlnAccuracyRotations / rlnAccuracyTranslationsAngst over this "
    "one, and f_img the particle-likeness of the average: contrast of the peak density over the solvent ring "
    "noise (featureless noise/empty-ice averages score low) times its non-rotationally-symmetric (or ring-like) "
    "structure (featureless blobs of ice or contamination score low). Classes with score >= --min_score are kept "
    "(see cryopipe.selection.classes)")


def add_class_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the ``--classes`` mode (the mode flag itself is added by :mod:`cryopipe.jobs.select`)."""
    g = p.add_argument_group("class selection (--classes; --i is a Class2D run_itNNN_optimiser/model/data.star)")
    g.add_argument("--select_classes", default=None, metavar="LIST",
                   help="class numbers to keep: 1,3,5-7 or a text file of numbers")
    g.add_argument("--auto", "--auto_select", dest="auto", action="store_true", help=AUTO_HELP)
    g.add_argument("--min_score", type=float, default=0.5, help="--auto: minimum class score to keep")
    g.add_argument("--max_score", type=float, default=math.inf, help="--auto: maximum class score to keep")
    g.add_argument("--select_min_nr_particles", type=int, default=-1,
                   help="--auto: keep at least this many particles, adding the best-scoring classes (-1: off)")
    g.add_argument("--select_min_nr_classes", type=int, default=-1,
                   help="--auto: keep at least this many classes, adding the best-scoring ones (-1: off)")
    g.add_argument("--recenter", action="store_true",
                   help="re-centre the selected averages on the centre of mass of their white density inside a soft "
                        "circular mask of --particle_diameter (iterated; sub-pixel Fourier shift) into "
                        "class_averages.mrcs, e.g. for template picking")
    g.add_argument("--sort_by", "--sort", dest="sort_by", default="rlnClassDistribution",
                   choices=list(SORT_KEYS) + ["none"],
                   help="order of class_averages.star and the gallery (distribution and score: largest first; "
                        "accuracies and resolution: best first)")
    g.add_argument("--reverse", action="store_true", help="reverse the --sort_by order")
    g.add_argument("--regroup", type=int, default=0, metavar="N",
                   help="regroup the selected particles into about N groups (rlnGroupName/rlnGroupNumber) of at "
                        "least n_selected // N particles each, never splitting a micrograph (0: keep groups)")
    g.add_argument("--regroup_by", choices=["defocus", "scale"], default="defocus",
                   help="order in which micrographs (or particles) are collected into groups: mean defocus, or "
                        "the old groups' rlnGroupScaleCorrection as RELION's relion_display does")
    g.add_argument("--particle_diameter", type=float, default=None,
                   help="mask diameter in Å for the image features (default: the optimiser's, else 90%% of the box)")
    g.add_argument("--allow_empty", action="store_true", help="write empty outputs instead of failing when no "
                                                             "particles are selected")
    g.add_argument("--no_gallery", action="store_true", help="do not write class_averages.png")


def main_classes(args: argparse.Namespace) -> int:
    """Run ``select --classes`` from parsed arguments (job folder by the ``--o`` rule)."""
    from pathlib import Path

    from cryopipe.errors import CryopipeError
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir, output_root
    from cryopipe.selection.files import find_class2d_run, select_classes

    if (args.select_classes is None) == (not args.auto):
        raise CryopipeError("select --classes: give exactly one of --select_classes LIST or --auto")
    root = output_root(args.output)
    run = find_class2d_run(args.input, root)           # check the inputs before a job folder is made
    if run.optimiser_star is not None and Path(args.input) == run.optimiser_star:
        inputs = [(args.input, NodeType.CLASS2D_OPTIMISER)]
    else:
        inputs = [(str(run.data_star), NodeType.CLASS2D_PARTICLES)]
    label = ProcessLabel.SELECT_CLASS2D_AUTO if args.auto else ProcessLabel.SELECT_INTERACTIVE
    with open_job_dir(args.output, "Select", label, inputs=inputs, params=vars(args),
                      continue_job=args.continue_) as job:
        res = select_classes(
            args.input, job.dir, select=args.select_classes, auto=args.auto, min_score=args.min_score,
            max_score=args.max_score, select_min_nr_particles=args.select_min_nr_particles,
            select_min_nr_classes=args.select_min_nr_classes, recenter=args.recenter,
            sort_by=None if args.sort_by == "none" else args.sort_by, reverse=args.reverse, regroup=args.regroup,
            regroup_by=args.regroup_by, allow_empty=args.allow_empty, gallery=not args.no_gallery,
            particle_diameter=args.particle_diameter, root=job.root, log=log)
        if res.scores is not None:
            for _, r in res.scores.iterrows():
                log(f"class {int(r['rlnClassNumber']):4d}: {int(r['cryopipeNrParticles']):7d} particles, "
                    f"score {r['rlnClassScore']:.3f} (image {r['cryopipeScoreFImg']:.2f}: contrast "
                    f"{r['cryopipeScoreContrast']:.1f}, anisotropy {r['cryopipeScoreAnisotropy']:.3f})"
                    + ("  selected" if int(r["rlnClassNumber"]) in res.selected else ""))
        job.add_output(res.particles_star, NodeType.SELECT_PARTICLES)
        if res.class_averages_star is not None:
            job.add_output(res.class_averages_star, NodeType.SELECT_CLASS_AVERAGES)
        log(f"select: classes {','.join(map(str, res.selected)) or 'none'} -> {res.n_particles_selected} of "
            f"{res.n_particles_in} particles in {job.relpath(res.particles_star)}")
    return 0
