"""``cryopipe class2d``: reference-free 2D classification (like ``relion_refine`` with 2D references).

Usage mirrors RELION::

    cryopipe class2d --i Extract/job005/particles.star --o Class2D/job007/run --K 50 --iter 25 --tau2_fudge 2 \\
        --particle_diameter 200 --ctf --zero_mask --psi_step 12 --offset_range 5 --offset_step 2

``--o`` is RELION's output *prefix*: ``Class2D/job007/run`` writes ``Class2D/job007/run_it025_*.star`` (a trailing
``/`` or a bare ``Type/jobNNN`` directory means prefix ``run``). Every iteration writes RELION-named and
RELION-readable ``<prefix>_itNNN_data.star``, ``_model.star``, ``_optimiser.star``, ``_sampling.star`` and
``_classes.mrcs`` (iteration 0 from the initial references), and logs one line (resolution, changes, time).

``--continue <prefix>_itNNN_optimiser.star`` resumes from those files — written by cryopipe or by RELION —
reading the model (class averages, noise spectra, priors), the particle assignments and the sampling; options
given on the command line (``--iter``, ``--tau2_fudge``, ``--particle_diameter``, sampling, …) override the stored
ones. The algorithm is :mod:`cryopipe.engine.classify2d`.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cryopipe.core.device import resolve_device
from cryopipe.engine.backend import add_dask_arguments, make_backend
from cryopipe.engine.class2d_files import (optimiser_output, resume_optimiser_2d, split_output_prefix,
                                           write_iteration_2d)
from cryopipe.engine.classify2d import Class2DSettings, Optimiser2D, ParticleState2D
from cryopipe.engine.particle_input import load_particles, particle_groups
from cryopipe.engine.run_command import command_arguments
from cryopipe.engine.sampling import InPlaneSampling
from cryopipe.errors import CryopipeError, InputFileError

HELP = "2D classification (like relion_refine without a reference, 2D)"

__all__ = ["HELP", "Class2DResult", "classify_2d", "load_particles", "particle_groups", "split_output_prefix",
           "add_arguments", "main"]


@dataclass
class Class2DResult:
    """What :func:`classify_2d` produced: the final iteration's file names and the optimiser."""

    prefix: Path
    iteration: int
    data_star: Path
    model_star: Path
    optimiser_star: Path
    classes: Path
    optimiser: Optimiser2D


# ------------------------------------------------------------------------------------------------ the job

def classify_2d(
    particles_star: str | os.PathLike | None,
    output: str | os.PathLike,
    settings: Class2DSettings,
    *,
    continue_from: str | os.PathLike | None = None,
    overrides: dict | None = None,
    device: str | torch.device | None = None,
    root: str | os.PathLike | None = None,
    command: str = "",
    log=print,
    progress=None,
    grad: dict | None = None,
    backend=None,
    on_written=None,
) -> Class2DResult:
    """Run (or continue) a 2D classification, writing RELION-named files every iteration.

    Args:
        particles_star: input particles (ignored when continuing: the run's data.star is used).
        output: RELION prefix (``Class2D/job007/run``) or directory (prefix ``run``).
        settings: options; when continuing, stored options are used except those named in ``overrides``
            (``{field: value}`` of :class:`Class2DSettings`, e.g. given on the command line).
        continue_from: an ``_optimiser.star`` to continue from (cryopipe's or RELION's).
        root: directory that names in the STAR files are relative to (the project directory; default cwd).
        grad: gradient (VDAM) mode instead of EM: keyword arguments of :class:`cryopipe.engine.vdam.GradUpdate`
            besides the schedule (``ini_frac``, ``fin_frac`` for :class:`~cryopipe.engine.vdam.GradSchedule`,
            ``base_step``, ``ini_subset``, ``fin_subset``, ``grad_em_iters``). Momenta are not stored in the
            output files: a continued gradient run restarts them.
        backend: where the E-step chunks run (:func:`cryopipe.engine.backend.make_backend`; default
            in-process). Results do not depend on it (up to float summation order).
        on_written: called (no arguments) after each iteration's files are written (the run can be continued
            from them; the job then keeps its folder on a later error).
    """
    dev = resolve_device(device)
    root = Path(root) if root is not None else Path.cwd()
    rule = None
    if grad is not None:
        from cryopipe.engine.vdam import GradSchedule, GradUpdate

        g = dict(grad)
        n_it = int(overrides.get("n_iter", settings.n_iter)) if overrides else int(settings.n_iter)
        sched = GradSchedule(n_it, g.pop("ini_frac", 0.3), g.pop("fin_frac", 0.2))
        rule = GradUpdate(sched, kind="2d", T=float(overrides.get("tau2_fudge", settings.tau2_fudge))
                          if overrides else settings.tau2_fudge, **g)
    out_dir, prefix = split_output_prefix(output)
    overrides = dict(overrides or {})
    if continue_from is not None:
        opt, data, ps, s = resume_optimiser_2d(continue_from, settings, overrides, dev, progress=progress, rule=rule,
                                               backend=backend, log=log)
    else:
        if particles_star is None:
            raise CryopipeError("--i (particles STAR file) is required unless --continue is given")
        data, ps, origin = load_particles(particles_star)
        s = settings
        if s.do_ctf and ps.ctf is None:
            raise InputFileError(particles_star, "--ctf was given but the particles have no rlnDefocusU column",
                                 "run CTF estimation and extraction with CTF values, or leave out --ctf")
        opt = Optimiser2D(ps, s, state=ParticleState2D.empty(ps.size, origin), device=dev, progress=progress,
                          update_rule=rule, backend=backend)
        t0 = time.perf_counter()
        opt.initialise()
        log(f"initial references from random subsets: {s.n_classes} classes, {ps.size} particles, box {ps.n}, "
            f"{ps.pixel_size:.3f} Å/px ({time.perf_counter() - t0:.1f} s)")
    if opt.particle_diameter > ps.n * ps.pixel_size:
        log(f"warning: --particle_diameter {opt.particle_diameter:g} Å is larger than the box "
            f"({ps.n * ps.pixel_size:g} Å)")
    out_dir.mkdir(parents=True, exist_ok=True)
    original = InPlaneSampling(opt.sampling.psi_step, opt.sampling.offset_range, opt.sampling.offset_step,
                               opt.sampling.oversampling, 0.0)
    n_iter = int(s.n_iter)
    paths = None
    if continue_from is None:
        paths = write_iteration_2d(opt, data, out_dir, prefix, root, n_iter, command, original)
    while opt.iteration < n_iter:
        rep = opt.iterate()
        paths = write_iteration_2d(opt, data, out_dir, prefix, root, n_iter, command, original)
        if on_written is not None:
            on_written()
        log(rep.line())
        if opt.replaced is not None:
            drop, src = opt.replaced
            log(f"class {drop + 1} had too little activity: replaced by a copy of class {src + 1}")
    if paths is None:
        raise CryopipeError(f"--iter {n_iter}: nothing to do, the run is already at iteration {opt.iteration} "
                            "(give a larger --iter to continue)")
    return Class2DResult(out_dir / prefix, opt.iteration, paths["data"], paths["model"], paths["optimiser"],
                         paths["classes"], opt)


# ------------------------------------------------------------------------------------------------ CLI

_OVERRIDABLE = ("n_iter", "tau2_fudge", "particle_diameter", "psi_step", "offset_range", "offset_step",
                "oversampling", "strict_highres_exp", "adaptive_fraction", "max_significant", "perturb",
                "batch_size", "incr_size", "minres_map", "fast_subsets", "center_classes", "flatten_solvent",
                "zero_mask", "do_norm", "do_scale", "ini_high", "offset_sigma", "init_blobs", "relion_offset_prior")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input/output")
    g.add_argument("--i", dest="i", default=None, help="particles STAR file (RELION 3.0 or 3.1+)")
    g.add_argument("--o", dest="o", default=None,
                   help="output prefix, RELION style (e.g. Class2D/job007/run); a directory means prefix 'run'")
    g.add_argument("--continue", dest="continue_", default=None, metavar="OPTIMISER_STAR",
                   help="continue from this _optimiser.star (cryopipe or RELION); --o defaults to its prefix")
    g = p.add_argument_group("classification")
    g.add_argument("--K", type=int, default=1, help="number of classes")
    g.add_argument("--iter", dest="n_iter", type=int, default=None, help="number of iterations (default 25)")
    g.add_argument("--tau2_fudge", type=float, default=None, help="regularisation T (default 2)")
    g.add_argument("--particle_diameter", type=float, default=None, help="mask diameter (Å); default 0.8 × box")
    g.add_argument("--ctf", action="store_true", help="do CTF correction")
    g.add_argument("--ctf_intact_first_peak", action="store_true", help="ignore CTFs until their first peak")
    g.add_argument("--zero_mask", action="store_true", default=None,
                   help="mask particles with zeros (default: noise outside the mask)")
    g.add_argument("--flatten_solvent", action="store_true", default=None,
                   help="mask the class averages with the particle mask")
    g.add_argument("--center_classes", action="store_true", default=None, help="re-centre class averages")
    g.add_argument("--norm", dest="do_norm", action="store_true", default=None,
                   help="per-particle normalisation-error correction")
    g.add_argument("--scale", dest="do_scale", action="store_true", default=None,
                   help="per-group intensity-scale correction")
    g.add_argument("--strict_highres_exp", type=float, default=None, help="E-step resolution limit (Å)")
    g.add_argument("--ini_high", type=float, default=None,
                   help="low-pass of the initial references and resolution of the first iteration (Å; default: "
                        "RELION's 0.07 × box Fourier pixels, e.g. 41 Å for box 96 at 3 Å/px)")
    g.add_argument("--no_init_blobs", dest="init_blobs", action="store_false", default=None,
                   help="start from the low-passed random-subset averages, not from random Gaussian blobs")
    g.add_argument("--relion_offset_prior", action="store_true", default=None,
                   help="RELION's own offset prior (its mixed pixel/Å units: about sigma/apix^2 pixels wide, at the "
                        "coarse translation, rounded old offsets) instead of the textbook Gaussian; reproduces "
                        "RELION's rlnSigmaOffsetsAngst, but at large pixel sizes barely searches shifts; not stored in "
                        "the _optimiser.star: give it again with --continue")
    g.add_argument("--offset", dest="offset_sigma", type=float, default=None,
                   help="initial standard deviation of the origin offsets (Å, default 10)")
    g.add_argument("--random_seed", type=int, default=0, help="random seed")
    g.add_argument("--fast_subsets", action="store_true", default=None,
                   help="use growing random subsets in the first 15 iterations")
    g = p.add_argument_group("sampling")
    g.add_argument("--psi_step", type=float, default=None,
                   help="in-plane angular step (degrees, before oversampling; default 6)")
    g.add_argument("--offset_range", type=float, default=None, help="translation search range (pixels, default 6)")
    g.add_argument("--offset_step", type=float, default=None,
                   help="translation step (pixels, before oversampling; default 2)")
    g.add_argument("--oversampling", type=int, default=None, help="adaptive oversampling order (default 1)")
    g.add_argument("--adaptive_fraction", type=float, default=None,
                   help="posterior mass kept as significant (default 0.999)")
    g.add_argument("--maxsig", dest="max_significant", type=int, default=None,
                   help="maximum number of significant samples per particle (default: no limit)")
    g.add_argument("--perturb", type=float, default=None, help="random perturbation of the ψ grid (default 0.5)")
    g.add_argument("--incr_size", type=int, default=None, help="shells beyond the current resolution (default 10)")
    g.add_argument("--minres_map", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--pad", type=int, default=2, help="padding factor of the Fourier interpolation")
    g = p.add_argument_group("gradient (VDAM) mode")
    g.add_argument("--grad", action="store_true", help="gradient-driven optimisation with mini-batches (RELION VDAM)")
    g.add_argument("--grad_ini_frac", type=float, default=0.3, help="fraction of iterations at the initial subset")
    g.add_argument("--grad_fin_frac", type=float, default=0.2, help="fraction of iterations at the final subset")
    g.add_argument("--grad_stepsize", type=float, default=-1.0, help="base step size (default 0.3)")
    g.add_argument("--grad_ini_subset", type=int, default=-1, help="initial mini-batch size (default RELION's)")
    g.add_argument("--grad_fin_subset", type=int, default=-1, help="final mini-batch size (default RELION's)")
    g.add_argument("--grad_em_iters", type=int, default=0, help="final iterations with all particles")
    g.add_argument("--class_inactivity_threshold", type=float, default=0.0,
                   help="replace a class whose share falls below this / (active classes) by a copy of the class "
                        "that still changes most, during the in-between phase (RELION's GUI: 0.1; default 0: off)")
    g = p.add_argument_group("computation")
    g.add_argument("--j", type=int, default=None, help="CPU threads")
    g.add_argument("--batch_size", type=int, default=None, help="particles per batch (default 128)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--alias", default=None, help="job alias (project jobs)")
    add_dask_arguments(g)
    for flag in ("--dont_combine_weights_via_disc", "--cpu", "--gpu", "--preread_images", "--no_parallel_disc_io"):
        g.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    g.add_argument("--pool", type=int, default=None, help=argparse.SUPPRESS)


def _settings_from_args(args: argparse.Namespace) -> tuple[Class2DSettings, dict]:
    defaults = dict(n_iter=25, tau2_fudge=2.0, particle_diameter=-1.0, psi_step=6.0, offset_range=6.0,
                    offset_step=2.0, oversampling=1, strict_highres_exp=-1.0, adaptive_fraction=0.999,
                    max_significant=-1, perturb=0.5, batch_size=128, incr_size=10, minres_map=5,
                    fast_subsets=False, center_classes=False, flatten_solvent=False, zero_mask=False,
                    do_norm=False, do_scale=False, ini_high=-1.0, offset_sigma=10.0, init_blobs=True,
                    relion_offset_prior=False)
    given = {k: getattr(args, k) for k in _OVERRIDABLE if getattr(args, k, None) is not None}
    kw = dict(defaults)
    kw.update(given)
    s = Class2DSettings(n_classes=int(args.K), do_ctf=bool(args.ctf),
                        ctf_intact_first_peak=bool(args.ctf_intact_first_peak), random_seed=int(args.random_seed),
                        pad=int(args.pad), **kw)
    if s.n_classes < 1:
        raise CryopipeError(f"--K {s.n_classes}: need at least one class")
    if s.psi_step <= 0 or s.offset_step <= 0 or s.offset_range < 0:
        raise CryopipeError("--psi_step and --offset_step must be > 0 and --offset_range >= 0")
    return s, given


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log, progress
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    if args.j:
        torch.set_num_threads(int(args.j))
    settings, given = _settings_from_args(args)
    if args.continue_ is None and not args.i:
        raise CryopipeError("--i is required (the particles STAR file), unless --continue is given")
    out_dir, prefix, same_job = optimiser_output(args.o, args.continue_)
    inputs = [(args.i, NodeType.PARTICLES)] if args.i else []
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    with open_job_dir(str(out_dir) + "/" if out_dir is not None else None, "Class2D", ProcessLabel.CLASS2D,
                      alias=args.alias, inputs=inputs, params=params, continue_job=same_job) as job:
        backend = make_backend(args.dask, args.dask_batches_per_worker)
        if backend.distributed:
            log(f"E-step on {backend.describe()}")
        try:
            res = classify_2d(args.i, job.dir / prefix, settings, continue_from=args.continue_, overrides=given,
                              device=args.device, root=job.root, command=" ".join(command_arguments()), log=log,
                              progress=lambda it, desc="": progress(it, desc=desc), grad=_grad_options(args),
                              backend=backend, on_written=job.mark_continuable)
        finally:
            backend.close()
        job.add_output(res.data_star, NodeType.CLASS2D_PARTICLES)
        job.add_output(res.optimiser_star, NodeType.CLASS2D_OPTIMISER)
    return 0


def _grad_options(args: argparse.Namespace) -> dict | None:
    if not getattr(args, "grad", False):
        return None
    return dict(ini_frac=args.grad_ini_frac, fin_frac=args.grad_fin_frac,
                base_step=args.grad_stepsize if args.grad_stepsize > 0 else None,
                ini_subset=args.grad_ini_subset if args.grad_ini_subset > 0 else None,
                fin_subset=args.grad_fin_subset if args.grad_fin_subset > 0 else None,
                grad_em_iters=args.grad_em_iters, class_inactivity_threshold=args.class_inactivity_threshold)
