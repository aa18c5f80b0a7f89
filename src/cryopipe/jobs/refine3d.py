"""``cryopipe refine3d``: gold-standard 3D auto-refinement (like ``relion_refine --auto_refine
--split_random_halves``).

Usage mirrors RELION::

    cryopipe refine3d --i Select/job010/particles.star --o Refine3D/job011/run --ref InitialModel/job009/initial_model.mrc \\
        --firstiter_cc --ini_high 50 --ctf --particle_diameter 200 --flatten_solvent --zero_mask --oversampling 1 \\
        --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 --offset_step 2 --sym C1 \\
        --low_resol_join_halves 40 --norm --scale

``--i`` is a particles STAR file or a RELION optimisation set (``--ios`` is the same option; a key-value STAR
block with ``rlnTomoParticlesFile``, ``rlnTomoReferenceMap1File`` …): its particles are refined and an updated
``<prefix>_optimisation_set.star`` points at the new ``run_data.star`` and half maps.

Tomographic particles (a particles file with rlnTomoName, given by ``--ios optimisation_set.star`` or ``--i
particles.star --tomograms tomograms.star``): 3D pseudo-subtomograms from ``subtomo`` are refined on the same
engine (:class:`cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D`: reference rotated in 3D, CTF² weights and
multiplicity, 3D offsets); ``run_data.star`` keeps RELION's tomography layout (general/optics/particles blocks,
rlnOriginX/Y/ZAngst) and ``run_optimisation_set.star`` names it, the tomograms and the half maps. 2D stacks
(rlnTomoSubTomosAre2DStacks 1) are refined on :class:`cryopipe.engine.tomo_optimiser.StackOptimiser3D` (CTFs from
the tomograms). ``--continue`` resumes a tomographic run from its ``_itNNN_optimiser.star`` (the last
``_data.star``, half models and sampling state; ``--sigma_tilt`` / ``--sigma_psi`` are not stored: give them
again).

Half-sets: ``rlnRandomSubset`` (1/2) of the input where present, random balanced halves otherwise. Start angles and
origins (Å → pixels) come from the input where present. Every iteration writes (atomically) RELION-named files
``<prefix>_itNNN_half{1,2}_model.star``, ``_half{1,2}_classKKK.mrc``, ``_data.star``, ``_optimiser.star`` and
``_sampling.star`` (iteration 0: the initial references) and logs one line. Once the run has converged the final
iteration joins the halves and uses all frequencies; it writes ``<prefix>_model.star``, ``_half{1,2}_model.star``,
``_data.star``, ``_optimiser.star``, ``_sampling.star``, ``_class001.mrc`` (joined map) and
``_half{1,2}_class001_unfil.mrc`` (unregularised half maps, for post-processing). If ``--iter`` iterations pass
without convergence, the last of them is made the final (joined) one, with a warning. At the end the plots of
:mod:`cryopipe.plots.refinement` are written: ``<prefix>_resolution.png``, ``_fsc.png`` (gold-standard FSC per
iteration), ``_angdist.png`` and ``_plots.pdf``.

``--continue <prefix>_itNNN_optimiser.star`` rebuilds the settings, the auto-sampling state (HEALPix order,
offsets, local-search σ, counters, best resolution, smallest changes, convergence flags), the model (half maps,
spectra, noise) and the particle assignments from the files and goes on; with the same seed the continued run
repeats the uninterrupted one. Options given on the command line override the stored ones.

Files use RELION's units: Å for offsets, resolutions (rlnCurrentResolution), accuracies; 1/Å for
rlnBestResolutionThusFar (as RELION); degrees for angles. The algorithm is
:class:`cryopipe.engine.optimiser3d.Optimiser3D`; the files are read and written by
:mod:`cryopipe.engine.refine3d_files`, runs set up by :mod:`cryopipe.engine.refine3d_setup` (single particles) and
:mod:`cryopipe.tomo.refine_setup` (tomographic particles).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from cryopipe.core.device import resolve_device
from cryopipe.engine.backend import add_dask_arguments, job_backend
from cryopipe.engine.class2d_files import optimiser_output, project_relative, split_output_prefix
from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings
from cryopipe.engine.refine3d_files import (
    continued_settings,
    write_iteration_3d,
)
from cryopipe.engine.refine3d_setup import FORCED, read_refine_continue, refine_inputs, resume_refine3d, start_refine3d
from cryopipe.engine.run_command import command_arguments
from cryopipe.errors import CryopipeError
from cryopipe.io.tomo_particles import is_optimisation_set, is_tomo_particles, write_optimisation_set
from cryopipe.plots.refinement import write_refinement_plots
from cryopipe.tomo.refine_setup import resume_tomo_refine3d, start_tomo_refine3d

HELP = "3D auto-refinement with gold-standard half-sets (like relion_refine --auto_refine --split_random_halves)"

__all__ = ["HELP", "Refine3DResult", "refine_3d", "DEFAULTS", "settings_from_args", "add_arguments", "main"]


@dataclass
class Refine3DResult:
    """What :func:`refine_3d` produced: the last files written (the final ``run_*`` files once converged)."""

    prefix: Path
    iteration: int
    converged: bool
    data_star: Path
    optimiser_star: Path
    model_star: Path
    map: Path | None  # <prefix>_class001.mrc (joined, final) or None
    half_maps: list[Path]  # unfiltered half maps (final) or the iteration's half maps
    optimisation_set: Path | None
    optimiser: Optimiser3D


def refine_3d(
    particles_star: str | os.PathLike | None,
    output: str | os.PathLike,
    settings: Refine3DSettings | None = None,
    *,
    reference: str | os.PathLike | None = None,
    solvent_mask: str | os.PathLike | None = None,
    absolute_greyscale: bool = True,
    continue_from: str | os.PathLike | None = None,
    overrides: dict | None = None,
    device: str | torch.device | None = None,
    root: str | os.PathLike | None = None,
    command: str = "",
    log=print,
    progress=None,
    tomograms: str | os.PathLike | None = None,
    angle_sigmas: tuple[float, ...] = (0.0, 0.0),
    backend=None,
) -> Refine3DResult:
    """Run (or continue) a gold-standard 3D auto-refinement, writing RELION-named files every iteration.

    Args:
        particles_star: particles STAR file or optimisation set (ignored when continuing).
        output: RELION prefix (``Refine3D/job011/run``) or directory (prefix ``run``).
        settings: options (:class:`Refine3DSettings`; ``split_halves`` and ``auto_refine`` are forced on, ``grad``
            off). When continuing, the stored options are used except those named in ``overrides``.
        reference: initial map (MRC, the particles' box); from an optimisation set its reference map(s) are the
            default.
        solvent_mask: optional MRC mask (the particles' box) for solvent flattening instead of the sphere.
        absolute_greyscale: the reference is on the particles' greyscale (RELION: no ``--firstiter_cc``);
            False rescales it to the particles' signal power.
        continue_from: an ``_optimiser.star`` of an earlier iteration of this kind of run.
        overrides: ``{field: value}`` of :class:`Refine3DSettings` given explicitly (they win over stored ones).
        root: directory that names in the STAR files are relative to (the project directory; default cwd).
        log, progress: a line logger and a progress wrapper (``progress(iterable, desc=...)``).
        tomograms: tomograms.star of tomographic particles given as ``--i particles.star`` (RELION's
            ``--tomograms``); recorded in the ``run_optimisation_set.star`` written at the end.
        angle_sigmas: ``(σ_tilt, σ_psi[, σ_rot])`` degrees, RELION's ``--sigma_tilt`` / ``--sigma_psi`` /
            ``--sigma_rot`` priors for
            tomographic particles (0: none; :mod:`cryopipe.engine.tomo_priors`).
        backend: where the E-step chunks run (:func:`cryopipe.engine.backend.make_backend`; default in-process).

    Tomographic particles (a particles file with rlnTomoName, directly or through an optimisation set) are
    refined as 3D pseudo-subtomograms (:class:`cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D`; the form is
    chosen as RELION chooses it, :func:`cryopipe.tomo.subtomo_set.particle_form`); their reference is always
    rescaled to the data's greyscale, and the ``_data.star`` keeps the tomography layout.
    """
    dev = resolve_device(device)
    root = Path(root) if root is not None else Path.cwd()
    out_dir, prefix = split_output_prefix(output)
    settings = settings if settings is not None else Refine3DSettings()
    s, setup = _set_up_run(particles_star, settings, reference, solvent_mask, absolute_greyscale, continue_from,
                           dict(overrides or {}), dev, root, progress, log, tomograms, angle_sigmas)
    opt, data = setup.opt, setup.data
    _warn_diameter_beyond_box(opt, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_iter = int(s.n_iter)
    extra = _tomograms_extra(setup.write_data, setup.set_values)
    write = lambda final=False: write_iteration_3d(  # noqa: E731
        opt, data, out_dir, prefix, root, n_iter, command, setup.original, final=final,
        solvent_mask=setup.mask_name, input_set=setup.input_set, write_data=setup.write_data, extra=extra)
    paths = write() if continue_from is None else None
    opt.backend = backend if backend is not None else opt.backend
    paths = _iterate_until_converged(opt, n_iter, write, log, paths)
    set_path = None
    if opt.converged:
        log(f"finished after {opt.iteration} iterations: final map {paths['map']}, half maps "
            f"{paths['half_maps'][0].name}, {paths['half_maps'][1].name} (resolution: cryopipe postprocess)")
        if setup.set_values is not None:
            set_path = _write_refined_optimisation_set(out_dir / f"{prefix}_optimisation_set.star",
                                                       setup.set_values, paths, setup.mask_name, root)
    log("plots: " + ", ".join(p.name for p in write_refinement_plots(out_dir / prefix)))
    return Refine3DResult(out_dir / prefix, opt.iteration, opt.converged, paths["data"], paths["optimiser"],
                          paths.get("model_joined", paths["model"]), paths.get("map"),
                          list(paths.get("half_maps", paths["maps"][:1] + paths["maps"][-1:])), set_path, opt)


def _set_up_run(particles_star, settings: Refine3DSettings, reference, solvent_mask, absolute_greyscale: bool,
                continue_from, overrides: dict, device: torch.device, root: Path, progress, log, tomograms,
                angle_sigmas: tuple[float, ...]):
    """``(settings, setup)``: the effective settings and the :class:`~cryopipe.engine.refine3d_setup.RefineStart`
    (optimiser, data, writers), resumed from ``continue_from`` or started from the particles."""
    if continue_from is not None:
        run = read_refine_continue(continue_from)
        s = continued_settings(run.vals, run.sampling_vals, settings, overrides, run.model_general, FORCED)
        if is_tomo_particles(run.data_path):  # the last _data.star (tomography layout) and the stored model
            setup = resume_tomo_refine3d(run, s, overrides, solvent_mask, device, root, progress, log, angle_sigmas)
        else:
            setup = resume_refine3d(run, s, overrides, solvent_mask, device, root, progress, log)
        return s, setup
    inputs = refine_inputs(particles_star, reference, solvent_mask, root)
    s = Refine3DSettings(**{**{f.name: getattr(settings, f.name) for f in fields(Refine3DSettings)}, **FORCED})
    if is_tomo_particles(inputs.particles_path):
        setup = start_tomo_refine3d(inputs, s, tomograms, device, root, progress, log, angle_sigmas)
    else:
        setup = start_refine3d(inputs, s, absolute_greyscale, device, root, progress, log, angle_sigmas)
    return s, setup


def _warn_diameter_beyond_box(opt: Optimiser3D, log) -> None:
    """Log a warning when the particle diameter (Å) exceeds the box edge (pixels × Å/px)."""
    box_angstrom = opt.p.n * opt.p.pixel_size
    if opt.particle_diameter > box_angstrom:
        log(f"warning: --particle_diameter {opt.particle_diameter:g} Å is larger than the box ({box_angstrom:g} Å)")


def _tomograms_extra(write_data, set_values: dict | None) -> dict | None:
    """``{cryopipeTomogramsFile: ...}`` for a tomographic run whose set names tomograms (for --continue), else None."""
    if write_data is not None and set_values is not None and \
            set_values.get("rlnTomoTomogramsFile") not in (None, "", "None"):
        return {"cryopipeTomogramsFile": str(set_values["rlnTomoTomogramsFile"])}
    return None


def _iterate_until_converged(opt: Optimiser3D, n_iter: int, write, log, paths: dict | None) -> dict:
    """Iterate, writing each iteration's files (``write(final=...)``), until converged or at ``n_iter`` (then the
    last iteration is the final, joined one); the last written paths (an error if none: nothing to do)."""
    while not opt.converged and opt.iteration < n_iter:
        if opt.iteration >= n_iter - 1 and not opt.sampling.has_converged:
            log(f"warning: not converged after {opt.iteration} iterations; iteration {opt.iteration + 1} "
                f"(--iter {n_iter}) is the final one (halves joined); give a larger --iter to refine further")
            opt.finish_next()
        report = opt.iterate()
        log(report.line())
        if hasattr(opt, "memory_line"):  # tomographic particles: peak memory per batch
            log(opt.memory_line())
        paths = write(final=opt.converged)
    if paths is None:
        raise CryopipeError(f"--iter {n_iter}: nothing to do, the run is already at iteration {opt.iteration} "
                            "(give a larger --iter to continue)")
    return paths


def _write_refined_optimisation_set(path: Path, set_values: dict, paths: dict, mask_name: str, root: Path) -> Path:
    """Write the optimisation set of the converged run (its particles, half maps and mask) to ``path``."""
    values = dict(set_values)
    values["rlnTomoParticlesFile"] = project_relative(paths["data"], root)
    values["rlnTomoReferenceMap1File"] = project_relative(paths["half_maps"][0], root)
    values["rlnTomoReferenceMap2File"] = project_relative(paths["half_maps"][1], root)
    if mask_name not in ("", "None"):
        values["rlnTomoReferenceMaskFile"] = mask_name
    write_optimisation_set(path, values)
    return path


# ------------------------------------------------------------------------------------------------ CLI

#: CLI defaults (RELION's, where the GUI / relion_refine has one)
DEFAULTS = dict(n_iter=50, tau2_fudge=1.0, particle_diameter=-1.0, healpix_order=2, auto_local_healpix_order=4,
                offset_range=5.0, offset_step=1.0, oversampling=1, low_resol_join_halves=40.0, ini_high=50.0,
                sigma_ang=0.0, adaptive_fraction=0.999, max_significant=200, perturb=0.5, batch_size=32,
                incr_size=10, symmetry="C1", zero_mask=False, flatten_solvent=False, do_norm=False, do_scale=False,
                auto_ignore_angles=False, auto_resol_angles=False, pad=2, random_seed=0, do_ctf=False,
                ctf_intact_first_peak=False, solvent_correct_fsc=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input/output")
    g.add_argument("--i", "--ios", dest="i", default=None,
                   help="particles STAR file, or an optimisation set (rlnTomoParticlesFile …)")
    g.add_argument("--tomograms", default=None,
                   help="tomograms.star of tomographic particles given with --i particles.star (an optimisation "
                        "set names its own)")
    g.add_argument("--o", dest="o", default=None,
                   help="output prefix, RELION style (e.g. Refine3D/job011/run); a directory means prefix 'run'")
    g.add_argument("--ref", default=None, help="initial reference map (MRC, the particles' box)")
    g.add_argument("--solvent_mask", default=None, help="mask (MRC, 0..1) for solvent flattening")
    g.add_argument("--solvent_correct_fsc", action="store_true", default=None,
                   help="FSC of the half maps inside --solvent_mask, corrected by phase randomisation (resolution "
                        "and regularisation follow the masked FSC)")
    g.add_argument("--continue", dest="continue_", default=None, metavar="OPTIMISER_STAR",
                   help="continue from this _itNNN_optimiser.star; --o defaults to its prefix")
    g = p.add_argument_group("reference")
    g.add_argument("--ini_high", type=float, default=None, help="low-pass filter of the reference (Å; default 50)")
    g.add_argument("--firstiter_cc", action="store_true",
                   help="the reference is not on the particles' absolute greyscale (rescale it)")
    g.add_argument("--sym", dest="symmetry", default=None, help="point-group symmetry (default C1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iter", dest="n_iter", type=int, default=None,
                   help="maximum number of iterations (default 50; the last is the final one if not converged)")
    g.add_argument("--tau2_fudge", type=float, default=None, help="regularisation T (default 1)")
    g.add_argument("--particle_diameter", type=float, default=None, help="mask diameter (Å); default 0.8 × box")
    g.add_argument("--ctf", dest="do_ctf", action="store_true", default=None, help="do CTF correction")
    g.add_argument("--ctf_intact_first_peak", action="store_true", default=None,
                   help="ignore CTFs until their first peak")
    g.add_argument("--zero_mask", action="store_true", default=None, help="mask particles with zeros")
    g.add_argument("--flatten_solvent", action="store_true", default=None,
                   help="mask the references (with --solvent_mask or the particle sphere)")
    g.add_argument("--norm", dest="do_norm", action="store_true", default=None,
                   help="per-particle normalisation-error correction")
    g.add_argument("--scale", dest="do_scale", action="store_true", default=None,
                   help="per-group intensity-scale correction")
    g.add_argument("--low_resol_join_halves", type=float, default=None,
                   help="average the half-sets below this resolution (Å; default 40)")
    g.add_argument("--random_seed", type=int, default=None, help="random seed (default 0)")
    g = p.add_argument_group("sampling")
    g.add_argument("--healpix_order", type=int, default=None,
                   help="initial angular sampling, HEALPix order (default 2; 7.5° with --oversampling 1)")
    g.add_argument("--auto_local_healpix_order", type=int, default=None,
                   help="local searches from this HEALPix order on (default 4)")
    g.add_argument("--offset_range", type=float, default=None, help="translation search range (pixels, default 5)")
    g.add_argument("--offset_step", type=float, default=None,
                   help="translation step (pixels, before oversampling; default 1)")
    g.add_argument("--oversampling", type=int, default=None, help="adaptive oversampling order (default 1)")
    g.add_argument("--sigma_ang", type=float, default=None,
                   help="local angular searches from the start with this σ (degrees)")
    g.add_argument("--sigma_tilt", type=float, default=0.0,
                   help="tomographic particles: Gaussian prior (degrees) on the tilt angle in global searches, "
                        "centred on rlnAngleTiltPrior or the input tilt (orientations from surface normals)")
    g.add_argument("--sigma_psi", type=float, default=0.0,
                   help="tomographic particles: the same prior on the in-plane angle (rlnAnglePsiPrior)")
    g.add_argument("--sigma_rot", type=float, default=0.0,
                   help="tomographic particles: prior on the first angle (rlnAngleRotPrior); with --sigma_tilt a "
                        "prior on the direction (rot, tilt), σ the larger of the two (RELION)")
    g.add_argument("--auto_ignore_angles", action="store_true", default=None,
                   help="refine the sampling without waiting for the angles to settle")
    g.add_argument("--auto_resol_angles", action="store_true", default=None,
                   help="refine the sampling as soon as the resolution asks for it")
    g.add_argument("--finer_faster", action="store_true",
                   help="both --auto_ignore_angles and --auto_resol_angles (RELION GUI 'finer angular sampling "
                        "faster')")
    g.add_argument("--adaptive_fraction", type=float, default=None, help="posterior mass kept (default 0.999)")
    g.add_argument("--maxsig", dest="max_significant", type=int, default=None,
                   help="maximum significant coarse samples per particle (default 200; RELION: no limit; "
                        "the limit bounds the cost of the broad posteriors of the first iterations)")
    g.add_argument("--perturb", type=float, default=None, help="random perturbation of the grid (default 0.5)")
    g.add_argument("--incr_size", type=int, default=None, help="shells beyond the current resolution (default 10)")
    g.add_argument("--pad", type=int, default=None, help="padding factor of the Fourier interpolation (default 2)")
    g = p.add_argument_group("computation")
    g.add_argument("--j", type=int, default=None, help="CPU threads")
    g.add_argument("--batch_size", type=int, default=None, help="particles per batch (default 32)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--alias", default=None, help="job alias (project jobs)")
    add_dask_arguments(g)
    # RELION options that cryopipe accepts and does not need
    for flag in ("--auto_refine", "--split_random_halves", "--dont_combine_weights_via_disc", "--cpu", "--gpu",
                 "--preread_images", "--no_parallel_disc_io", "--skip_gridding", "--pipeline_control",
                 "--scratch_dir"):
        g.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    g.add_argument("--pool", type=int, default=None, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace, defaults: dict | None = None) -> tuple[Refine3DSettings, dict]:
    """``(settings, given)``: :class:`Refine3DSettings` from the parsed options (``defaults`` for those not
    given) and the fields given explicitly (they override stored ones when continuing)."""
    d = dict(DEFAULTS if defaults is None else defaults)
    names = {f.name for f in fields(Refine3DSettings)}
    given = {k: getattr(args, k) for k in d if k in names and getattr(args, k, None) is not None}
    if getattr(args, "finer_faster", False):
        given["auto_ignore_angles"] = given["auto_resol_angles"] = True
    kw = {k: v for k, v in d.items() if k in names}
    kw.update(given)
    s = Refine3DSettings(**kw)
    if s.healpix_order < 0 or s.offset_step <= 0 or s.offset_range < 0 or s.oversampling < 0:
        raise CryopipeError("--healpix_order must be >= 0, --offset_step > 0, --offset_range >= 0, "
                            "--oversampling >= 0")
    if s.n_iter < 1:
        raise CryopipeError(f"--iter {s.n_iter}: need at least one iteration")
    return s, given


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log, progress
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    if args.j:
        torch.set_num_threads(int(args.j))
    settings, given = settings_from_args(args)
    if args.continue_ is None and not args.i:
        raise CryopipeError("--i is required (particles STAR file or optimisation set), unless --continue is given")
    if args.continue_ is None and not args.ref and not (args.i and is_optimisation_set(args.i)):
        raise CryopipeError("--ref is required (the initial reference map, e.g. InitialModel/jobNNN/initial_model.mrc)")
    out_dir, prefix, same_job = optimiser_output(args.o, args.continue_)
    in_type = NodeType.TOMO_OPTIMISATION_SET if args.i and is_optimisation_set(args.i) else NodeType.PARTICLES
    if settings.solvent_correct_fsc and args.solvent_mask is None and args.continue_ is None and \
            in_type != NodeType.TOMO_OPTIMISATION_SET:
        raise CryopipeError("--solvent_correct_fsc needs a --solvent_mask (the mask the FSC is corrected for)")
    inputs = [(args.i, in_type), (args.ref, NodeType.DENSITY_MAP), (args.solvent_mask, NodeType.MASK3D)]
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    with open_job_dir(str(out_dir) + "/" if out_dir is not None else None, "Refine3D", ProcessLabel.REFINE3D,
                      alias=args.alias, inputs=inputs if args.continue_ is None else [], params=params,
                      continue_job=same_job) as job, job_backend(args, log) as backend:
        res = refine_3d(args.i, job.dir / prefix, settings, reference=args.ref, solvent_mask=args.solvent_mask,
                        absolute_greyscale=not args.firstiter_cc, continue_from=args.continue_, overrides=given,
                        device=args.device, root=job.root, command=" ".join(command_arguments()), log=log,
                        progress=lambda it, desc="": progress(it, desc=desc), tomograms=args.tomograms,
                        angle_sigmas=(float(args.sigma_tilt or 0.0), float(args.sigma_psi or 0.0),
                                      float(args.sigma_rot or 0.0)),
                        backend=backend)
        if res.converged:
            job.add_output(res.data_star, NodeType.REFINE3D_PARTICLES)
            job.add_output(res.optimiser_star, NodeType.REFINE3D_OPTIMISER)
            job.add_output(res.half_maps[0], NodeType.REFINE3D_HALFMAP)
            job.add_output(res.map, NodeType.REFINE3D_MAP)
            if res.optimisation_set is not None:
                job.add_output(res.optimisation_set, NodeType.TOMO_OPTIMISATION_SET)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use `cryopipe refine3d`")
