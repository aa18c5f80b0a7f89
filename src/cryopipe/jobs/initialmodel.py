"""``cryopipe initialmodel``: de novo 3D initial model by gradient-driven optimisation (RELION's VDAM:
``relion_refine --grad --denovo_3dref``, then ``relion_align_symmetry``).

Usage mirrors RELION's InitialModel job::

    cryopipe initialmodel --i Select/job010/particles.star --o InitialModel/job011/run --iter 100 --K 1 --sym D2 \\
        --ctf --particle_diameter 200 --flatten_solvent --zero_mask --healpix_order 1 --offset_range 6 \\
        --offset_step 2 --tau2_fudge 4

The optimiser always runs in C1 (RELION GUI "run in C1 and apply symmetry later", its default): references start
as random blobs, mini-batches grow from ``--grad_ini_subset`` to ``--grad_fin_subset`` (RELION's defaults for a 3D
initial model: clamp(0.005·N, 200, 5000) → clamp(0.1·N, 1000, 50000)), step size 0.5 and ``tau2_fudge`` rising
from 1 to ``--tau2_fudge`` (:mod:`cryopipe.engine.vdam`), at most ``--maxsig`` (default 100·K) significant coarse
samples per particle, the HEALPix order fixed unless ``--auto_sampling`` (opt-in: RELION's GUI turns it on, but each
order costs 8× on a CPU; 15° oversampled sampling reaches ~9 Å on the 3 Å/px benchmark). Every
``--grad_write_iter`` iterations and at the last one it writes ``<prefix>_itNNN_classKKK.mrc``, ``_model.star``,
``_data.star``, ``_sampling.star``, ``_optimiser.star`` and ``_momenta.pt`` (cryopipe: the optimiser's moment
estimates, for ``--continue``).
At the end the largest class is aligned to the symmetry axes of ``--sym`` and symmetrised
(:func:`cryopipe.core.symmetry_align.align_symmetry_full`) into ``initial_model.mrc`` (next to the run files),
with the alignment record ``initial_model_symmetry.star``/``.json``; with C1 it is the largest class as it is.
Plots (:mod:`cryopipe.plots.refinement`): ``<prefix>_resolution.png``, ``_angdist.png`` and ``_plots.pdf``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from cryopipe.core.device import resolve_device
from cryopipe.engine.backend import add_dask_arguments, job_backend
from cryopipe.core.symmetry import canonical_symmetry_name
from cryopipe.core.symmetry_align import align_symmetry_full
from cryopipe.engine.class2d_files import optimiser_output, project_relative, split_output_prefix
from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings
from cryopipe.engine.particle_input import load_particles
from cryopipe.engine.initialmodel_setup import INITIAL_MODEL_FORCED, InitialModelRun, resume_initial_model
from cryopipe.engine.refine3d_files import state_from_data, write_iteration_3d
from cryopipe.engine.run_command import command_arguments
from cryopipe.engine.symmetry_files import write_symmetry_outputs
from cryopipe.engine.vdam import GradUpdate, default_subset_sizes, grad_star_values, initial_model_rule
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.atomic import atomic_path
from cryopipe.io.tomo_particles import is_optimisation_set, write_optimisation_set
from cryopipe.jobs.refine3d import settings_from_args
from cryopipe.plots.refinement import write_refinement_plots
from cryopipe.tomo.refine_setup import tomo_inputs

HELP = "de novo 3D initial model (like relion_refine --grad --denovo_3dref, then relion_align_symmetry)"

__all__ = ["HELP", "InitialModelResult", "initial_model", "add_arguments", "main"]


@dataclass
class InitialModelResult:
    """What :func:`initial_model` produced."""

    prefix: Path
    iteration: int
    data_star: Path
    model_star: Path
    optimiser_star: Path
    class_maps: list[Path]
    initial_model: Path  # initial_model.mrc (aligned, symmetrised largest class)
    symmetry_star: Path | None  # initial_model_symmetry.star (alignment record)
    optimiser: Optimiser3D


def _save_momenta(path: Path, rule: GradUpdate) -> None:
    with atomic_path(path) as tmp:
        torch.save(rule.state_dict(), tmp)


def initial_model(
    particles_star: str | os.PathLike | None,
    output: str | os.PathLike,
    settings: Refine3DSettings | None = None,
    *,
    symmetry: str = "C1",
    grad: dict | None = None,
    write_iter: int = 10,
    continue_from: str | os.PathLike | None = None,
    overrides: dict | None = None,
    device: str | torch.device | None = None,
    root: str | os.PathLike | None = None,
    command: str = "",
    log=print,
    progress=None,
    tomograms: str | os.PathLike | None = None,
    backend=None,
) -> InitialModelResult:
    """Run (or continue) a de novo initial model.

    Args:
        particles_star: particles STAR file (ignored when continuing).
        output: RELION prefix (``InitialModel/job009/run``) or directory (prefix ``run``).
        settings: options (:class:`Refine3DSettings`; forced: symmetry C1, ``grad``, no half-sets, no
            auto-refine). ``n_iter`` is the number of mini-batch iterations, ``tau2_fudge`` the final T.
        symmetry: point group applied at the end (align + symmetrise the largest class).
        grad: :class:`~cryopipe.engine.vdam.GradUpdate` options: ``ini_frac``, ``fin_frac`` (schedule),
            ``base_step`` (default 0.5), ``ini_subset``, ``fin_subset`` (default RELION's), ``grad_em_iters``.
        write_iter: write the run files every this many iterations (and at the last one).
        continue_from: an ``_itNNN_optimiser.star`` of an initial-model run (its ``_momenta.pt`` is restored).
        overrides: :class:`Refine3DSettings` fields given explicitly (win over stored ones when continuing).
        root: directory that names in the STAR files are relative to (default cwd).
        tomograms: tomograms.star for tomographic particles given as a particles file (2D stacks need it); an
            optimisation set (``--ios``) names its own. Tomographic particles (3D pseudo-subtomograms or 2D
            stacks) run on :mod:`cryopipe.engine.tomo_optimiser`; ``<prefix>_optimisation_set.star`` then names
            the particles and ``initial_model.mrc`` as the reference of the next job.
    """
    dev = resolve_device(device)
    root = Path(root) if root is not None else Path.cwd()
    out_dir, prefix = split_output_prefix(output)
    settings = settings if settings is not None else Refine3DSettings()
    sym_final = canonical_symmetry_name(symmetry)
    if continue_from is not None:
        run = resume_initial_model(continue_from, settings, dict(overrides or {}), dict(grad or {}), symmetry,
                                   sym_final, write_iter, dev, progress, log)
    else:
        run = _start(particles_star, settings, dict(grad or {}), sym_final, write_iter, tomograms, dev, root,
                     progress, log)
    opt, rule, ps, sym_final = run.opt, run.rule, run.opt.p, run.sym_final
    out_dir.mkdir(parents=True, exist_ok=True)
    n_iter = int(run.settings.n_iter)
    write_iter = max(1, int(run.write_iter))

    def write() -> dict:
        base = out_dir / f"{prefix}_it{opt.iteration:03d}"
        mom = Path(f"{base}_momenta.pt")
        _save_momenta(mom, rule)
        return write_iteration_3d(opt, run.data, out_dir, prefix, root, n_iter, command, run.original,
                                  extra=grad_star_values(rule, opt.iteration, ps.size, project_relative(mom, root),
                                                         write_iter, sym_final), write_data=run.write_data)

    paths = write() if continue_from is None else None
    if opt.iteration >= n_iter and continue_from is not None:
        raise CryopipeError(f"--iter {n_iter}: nothing to do, the run is already at iteration {opt.iteration} "
                            "(give a larger --iter to continue)")
    opt.backend = backend if backend is not None else opt.backend  # where the E-step chunks run (--dask)
    while opt.iteration < n_iter:
        report = opt.iterate()
        log(report.line())
        if hasattr(opt, "memory_line"):  # tomographic particles: peak memory per batch
            log(opt.memory_line())
        if opt.iteration % write_iter == 0 or opt.iteration == n_iter:
            paths = write()
    out_map = out_dir / "initial_model.mrc"
    sym_star = _write_largest_class(opt, sym_final, int(run.settings.random_seed), paths["maps"], out_map, dev, log)
    if run.set_values is not None:  # tomographic: the next job's input, the particles and the initial model
        write_optimisation_set(out_dir / f"{prefix}_optimisation_set.star", {
            **run.set_values, "rlnTomoParticlesFile": project_relative(paths["data"], root),
            "rlnTomoReferenceMap1File": project_relative(out_map, root)})
    log("plots: " + ", ".join(p.name for p in write_refinement_plots(out_dir / prefix)))
    return InitialModelResult(out_dir / prefix, opt.iteration, paths["data"], paths["model"], paths["optimiser"],
                              list(paths["maps"]), out_map, sym_star, opt)


def _start(particles_star, settings: Refine3DSettings, grad: dict, sym_final: str, write_iter: int, tomograms,
           device: torch.device, root: Path, progress, log) -> InitialModelRun:
    """A new run from random blobs: single particles, or tomographic ones (:mod:`cryopipe.tomo.refine_setup`)."""
    if particles_star is None:
        raise CryopipeError("--i (particles STAR file) is required unless --continue is given")
    if not Path(particles_star).is_file():
        raise InputFileError(particles_star, "not found", "give the particles STAR file (--i)")
    s = Refine3DSettings(**{**{f.name: getattr(settings, f.name) for f in fields(Refine3DSettings)},
                            **INITIAL_MODEL_FORCED})
    tomo = tomo_inputs(Path(particles_star), tomograms, root)
    rule = initial_model_rule(s.n_iter, s.tau2_fudge, grad)
    original = (int(s.healpix_order), float(s.offset_range), float(s.offset_step))
    if tomo is not None:
        from cryopipe.tomo.refine_setup import tomo_optimiser

        particles_path, tomograms_path, set_values = tomo
        opt, data, write_data, _ = tomo_optimiser(particles_path, s, None, None, device, root, progress, log,
                                                  tomograms_path, update_rule=rule)
        what = "tomographic particles"
    else:
        data, ps, origin = load_particles(particles_star, "3D initial model")
        if s.do_ctf and ps.ctf is None:
            raise InputFileError(particles_star, "--ctf was given but the particles have no rlnDefocusU column",
                                 "run CTF estimation and extraction with CTF values, or leave out --ctf")
        state = state_from_data(data, origin, particles_star)
        state.klass[:] = -1
        state.subset[:] = 0
        opt = Optimiser3D(ps, s, state=state, device=device, update_rule=rule, progress=progress)
        opt.initialise(None)
        write_data, set_values, what = None, None, "particles"
    ps = opt.p
    ini, fin = default_subset_sizes(ps.size, "initial_model")
    log(f"3D initial model: {ps.size} {what}, box {ps.n}, {ps.pixel_size:.3f} Å/px, {s.n_classes} class(es) "
        f"from random blobs, {s.n_iter} iterations, mini-batches {rule.ini_subset or ini} → "
        f"{rule.fin_subset or fin}; symmetry {sym_final} applied at the end")
    return InitialModelRun(s, opt, rule, data, original, sym_final, write_iter, write_data, set_values)


def _write_largest_class(opt: Optimiser3D, sym_final: str, seed: int, class_maps: list[Path], out_map: Path,
                         device: torch.device, log) -> Path | None:
    """Align the largest class to ``sym_final``'s axes, symmetrise it, write ``out_map``; its record's path."""
    model = opt.model
    k = int(torch.argmax(model.pdf_class))
    pixel_size = opt.p.pixel_size
    res = align_symmetry_full(model.vols[0, k], sym_final, pixel_size=pixel_size, keep_centre=sym_final == "C1",
                              apply_sym=True, seed=seed, device=device)
    _, sym_star = write_symmetry_outputs(out_map, res, pixel_size, class_maps[k])
    log(f"initial model: class {k + 1} ({float(model.pdf_class[k]):.1%} of the particles)"
        + (f" aligned to {sym_final} (symmetry residual {res.residual:.3f}) and symmetrised"
           if sym_final != "C1" else "") + f" -> {out_map}")
    return sym_star


# ------------------------------------------------------------------------------------------------ CLI

#: CLI defaults (RELION's InitialModel job: --healpix_order 1 --offset_range 6 --offset_step 2 --tau2_fudge 4
#: --flatten_solvent --zero_mask; --iter 100 as in the tutorials, the GUI has 200)
DEFAULTS = dict(n_iter=100, n_classes=1, tau2_fudge=4.0, particle_diameter=-1.0, healpix_order=1, offset_range=6.0,
                offset_step=2.0, oversampling=1, ini_high=-1.0, adaptive_fraction=0.999, max_significant=100,
                perturb=0.5, batch_size=32, incr_size=10, zero_mask=True, flatten_solvent=True, non_negative=False,
                pad=2, random_seed=0, auto_sampling=False, do_ctf=False, ctf_intact_first_peak=False, do_norm=False,
                do_scale=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input/output")
    g.add_argument("--i", "--ios", dest="i", default=None,
                   help="particles STAR file, or a tomography optimisation set (rlnTomoParticlesFile …)")
    g.add_argument("--tomograms", default=None,
                   help="tomograms.star of tomographic particles given with --i particles.star")
    g.add_argument("--o", dest="o", default=None,
                   help="output prefix, RELION style (e.g. InitialModel/job009/run); a directory means prefix 'run'")
    g.add_argument("--continue", dest="continue_", default=None, metavar="OPTIMISER_STAR",
                   help="continue from this _itNNN_optimiser.star (its _momenta.pt is restored)")
    g.add_argument("--grad_write_iter", dest="write_iter", type=int, default=None,
                   help="write the run files every this many iterations (default 10)")
    g = p.add_argument_group("model")
    g.add_argument("--iter", dest="n_iter", type=int, default=None,
                   help="number of mini-batch iterations (default 100; RELION GUI 200)")
    g.add_argument("--K", dest="n_classes", type=int, default=None, help="number of classes (default 1)")
    g.add_argument("--sym", dest="sym", default="C1",
                   help="point group applied at the end (the optimisation runs in C1)")
    g.add_argument("--particle_diameter", type=float, default=None, help="mask diameter (Å); default 0.8 × box")
    g.add_argument("--ctf", dest="do_ctf", action="store_true", default=None, help="do CTF correction")
    g.add_argument("--ctf_intact_first_peak", action="store_true", default=None,
                   help="ignore CTFs until their first peak")
    g.add_argument("--flatten_solvent", action="store_true", default=None, help="mask the references (default on)")
    g.add_argument("--no_flatten_solvent", dest="flatten_solvent", action="store_false", help=argparse.SUPPRESS)
    g.add_argument("--zero_mask", action="store_true", default=None, help="mask particles with zeros (default on)")
    g.add_argument("--no_zero_mask", dest="zero_mask", action="store_false", help=argparse.SUPPRESS)
    g.add_argument("--non_negative", action="store_true", default=None, help="clip negative density")
    g.add_argument("--tau2_fudge", type=float, default=None, help="final regularisation T (default 4)")
    g.add_argument("--ini_high", type=float, default=None,
                   help="low-pass of the random start (Å; default: the optimiser's)")
    g.add_argument("--random_seed", type=int, default=None, help="random seed (default 0)")
    g = p.add_argument_group("sampling")
    g.add_argument("--healpix_order", type=int, default=None, help="HEALPix order (default 1 = 30°, 15° oversampled)")
    g.add_argument("--offset_range", type=float, default=None, help="translation search range (pixels, default 6)")
    g.add_argument("--offset_step", type=float, default=None, help="translation step (pixels, default 2)")
    g.add_argument("--oversampling", type=int, default=None, help="adaptive oversampling order (default 1)")
    g.add_argument("--pad", type=int, default=None, help="padding factor (default 2)")
    g.add_argument("--maxsig", dest="max_significant", type=int, default=None,
                   help="at most this many significant coarse samples per particle (default 100 × K, RELION's "
                        "gradient default; -1: no limit)")
    g = p.add_argument_group("gradient (VDAM)")
    g.add_argument("--grad_ini_frac", type=float, default=None, help="fraction of iterations at the initial subset")
    g.add_argument("--grad_fin_frac", type=float, default=None, help="fraction of iterations at the final subset")
    g.add_argument("--grad_ini_subset", type=int, default=None, help="initial mini-batch size (default RELION's)")
    g.add_argument("--grad_fin_subset", type=int, default=None, help="final mini-batch size (default RELION's)")
    g.add_argument("--grad_stepsize", type=float, default=None, help="base step size (default 0.5)")
    g = p.add_argument_group("computation")
    g.add_argument("--j", type=int, default=None, help="CPU threads")
    g.add_argument("--batch_size", type=int, default=None, help="particles per batch (default 32)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--alias", default=None, help="job alias (project jobs)")
    add_dask_arguments(g)
    g.add_argument("--auto_sampling", action="store_true", default=None,
                   help="RELION's automatic sampling in gradient runs: every 10th iteration without a resolution gain, "
                        "one HEALPix order finer (up to order 3) and finer offsets (off by default: each order costs "
                        "8x more; RELION's GUI turns it on)")
    for flag in ("--grad", "--denovo_3dref", "--dont_combine_weights_via_disc", "--cpu", "--gpu",
                 "--preread_images", "--no_parallel_disc_io", "--pipeline_control", "--scratch_dir"):
        g.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    g.add_argument("--pool", type=int, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log, progress
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    if args.j:
        torch.set_num_threads(int(args.j))
    d = dict(DEFAULTS)
    d["max_significant"] = 100 * int(args.n_classes or DEFAULTS["n_classes"])  # RELION: 100·K in gradient runs
    settings, given = settings_from_args(args, d)
    if settings.n_classes < 1:
        raise CryopipeError(f"--K {settings.n_classes}: need at least one class")
    sym = canonical_symmetry_name(args.sym)
    if args.continue_ is None and not args.i:
        raise CryopipeError("--i is required (the particles STAR file), unless --continue is given")
    out_dir, prefix, same_job = optimiser_output(args.o, args.continue_)
    grad = {k: v for k, v in dict(ini_frac=args.grad_ini_frac, fin_frac=args.grad_fin_frac,
                                  base_step=args.grad_stepsize, ini_subset=args.grad_ini_subset,
                                  fin_subset=args.grad_fin_subset).items() if v is not None}
    if args.write_iter is not None:
        given["write_iter"] = args.write_iter
    if args.sym != "C1":
        given["symmetry"] = sym
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    in_type = NodeType.TOMO_OPTIMISATION_SET if args.i and is_optimisation_set(args.i) else NodeType.PARTICLES
    with open_job_dir(str(out_dir) + "/" if out_dir is not None else None, "InitialModel",
                      ProcessLabel.INITIAL_MODEL, alias=args.alias,
                      inputs=[(args.i, in_type)] if args.continue_ is None else [], params=params,
                      continue_job=same_job) as job, job_backend(args, log) as backend:
        res = initial_model(args.i, job.dir / prefix, settings, symmetry=sym, grad=grad, backend=backend,
                            write_iter=args.write_iter if args.write_iter is not None else 10,
                            continue_from=args.continue_, overrides=given, device=args.device, root=job.root,
                            command=" ".join(command_arguments()), log=log,
                            progress=lambda it, desc="": progress(it, desc=desc), tomograms=args.tomograms)
        job.add_output(res.initial_model, NodeType.INITIAL_MODEL)
        job.add_output(res.data_star, NodeType.INITIAL_MODEL_PARTICLES)
        job.add_output(res.optimiser_star, NodeType.INITIAL_MODEL_OPTIMISER)
        set_path = Path(f"{res.prefix}_optimisation_set.star")
        if in_type == NodeType.TOMO_OPTIMISATION_SET and set_path.is_file():
            job.add_output(set_path, NodeType.TOMO_OPTIMISATION_SET)
    return 0
