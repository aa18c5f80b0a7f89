"""Setting up a gold-standard 3D auto-refinement of single particles (``cryopipe refine3d``): the inputs (a
particles file or an optimisation set naming particles, references and mask), a new run (particles, reference
and mask read and checked, :class:`~cryopipe.engine.optimiser3d.Optimiser3D` initialised) or a continued one
(settings, model, particle assignments and auto-sampling state from an ``_itNNN_optimiser.star`` and the files it
names). Tomographic particles are set up by :mod:`cryopipe.tomo.refine_setup` on the same types. Moved from
``jobs/refine3d.py`` (issue 14); behaviour unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cryopipe.engine.class2d_files import project_relative as _rel
from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings
from cryopipe.engine.particle_input import load_particles
from cryopipe.engine.refine3d_files import (
    continue_inputs,
    load_reference,
    model3d_from_files,
    original_sampling,
    restore_changes,
    sampling_from_files,
    state_from_data,
)
from cryopipe.engine.relion_files import read_model_star, resolve_relion_path
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.particles import ParticleData
from cryopipe.io.tomo_particles import is_optimisation_set, optimisation_set_entries

__all__ = ["FORCED", "ContinuedRun", "RefineInputs", "RefineStart", "read_refine_continue", "refine_inputs",
           "resume_refine3d", "start_refine3d"]

#: settings every auto-refinement runs with
FORCED = {"split_halves": True, "auto_refine": True, "grad": False}


@dataclass
class ContinuedRun:
    """The files of a run to continue (:func:`~cryopipe.engine.refine3d_files.continue_inputs`)."""

    path: str | os.PathLike  # the _itNNN_optimiser.star given
    vals: dict  # its data_optimiser_general
    bases: list[Path]  # folders that names are looked up in
    data_path: Path
    model_paths: list[Path]
    sampling_vals: dict
    model_general: dict  # data_model_general of the first model


@dataclass
class RefineInputs:
    """A new run's input files: the particles file (an optimisation set resolved to its particles), the
    reference(s) and mask (given, or named by the optimisation set) and the set's entries."""

    particles_path: Path
    reference: str | os.PathLike | list
    solvent_mask: str | os.PathLike | None
    set_values: dict | None
    input_set: str  # the optimisation set, project-relative ("None": none)
    set_bases: list[Path]


@dataclass
class RefineStart:
    """A refinement ready to iterate."""

    opt: Optimiser3D
    data: ParticleData | None  # the input table (None: tomographic particles, written by write_data)
    write_data: Callable | None  # write_data(path): the _data.star of tomographic particles
    original: tuple[int, float, float]  # HEALPix order, offset range and step (pixels) the run started with
    mask_name: str = "None"
    input_set: str = "None"
    set_values: dict | None = None


def read_refine_continue(continue_from: str | os.PathLike) -> ContinuedRun:
    """The files of an auto-refinement to continue; InputFileError for another kind of run or a finished one."""
    vals, bases, data_path, model_paths, sv, _ = continue_inputs(continue_from)
    if int(vals.get("rlnDoAutoRefine", 0)) != 1 or int(vals.get("rlnDoSplitRandomHalves", 0)) != 1 \
            or len(model_paths) != 2:
        raise InputFileError(continue_from, "is not from a gold-standard auto-refinement (rlnDoAutoRefine, "
                                            "rlnDoSplitRandomHalves, two model files)",
                             "continue an initial model with `cryopipe initialmodel --continue`")
    if int(vals.get("cryopipeFinalIterationDone", 0)):
        raise InputFileError(continue_from, "the refinement has already finished (final iteration done)",
                             "start a new refinement from its run_data.star and run_class001.mrc")
    model_general = read_model_star(model_paths[0]).general
    return ContinuedRun(continue_from, vals, bases, data_path, model_paths, sv, model_general)


def refine_inputs(particles_star: str | os.PathLike | None, reference, solvent_mask, root: Path) -> RefineInputs:
    """The input files of a new run; an optimisation set names the particles and, unless given, the reference
    map(s) (rlnTomoReferenceMap1File/2File, averaged later) and the mask. A reference is required."""
    if particles_star is None:
        raise CryopipeError("--i (particles STAR file or optimisation set) is required unless --continue is given")
    particles_path = Path(particles_star)
    if not particles_path.is_file():
        raise InputFileError(particles_path, "not found", "give the particles STAR file or optimisation set (--i)")
    set_bases: list = []
    set_values, input_set = None, "None"
    if is_optimisation_set(particles_path):
        set_values = optimisation_set_entries(particles_path)
        input_set = _rel(particles_path, root)
        set_bases = [particles_path.resolve().parent, particles_path.resolve().parent.parent.parent]
        particles_path = resolve_relion_path(str(set_values["rlnTomoParticlesFile"]), *set_bases)
        if reference is None:
            refs = [set_values.get(k) for k in ("rlnTomoReferenceMap1File", "rlnTomoReferenceMap2File")]
            refs = [resolve_relion_path(str(r), *set_bases) for r in refs if r not in (None, "", "None")]
            reference = refs if refs else None
        if solvent_mask is None and set_values.get("rlnTomoReferenceMaskFile") not in (None, "", "None"):
            solvent_mask = resolve_relion_path(str(set_values["rlnTomoReferenceMaskFile"]), *set_bases)
    if reference is None:
        raise CryopipeError("--ref (initial reference map, MRC) is required for 3D refinement "
                            "(e.g. InitialModel/jobNNN/initial_model.mrc)")
    return RefineInputs(particles_path, reference, solvent_mask, set_values, input_set, set_bases)


def resume_refine3d(run: ContinuedRun, s: Refine3DSettings, overrides: dict, solvent_mask, dev: torch.device,
                    root: Path, progress, log) -> RefineStart:
    """Continue a single-particle refinement: particles and assignments from the run's last ``_data.star``, the
    half models, the sampling state and the mask (``solvent_mask`` if given, else the stored one)."""
    vals, bases, data_path, model_paths, sv = run.vals, run.bases, run.data_path, run.model_paths, run.sampling_vals
    data, ps, origin = load_particles(data_path, "3D refinement")
    model = model3d_from_files(model_paths, ps, bases, dev, s.symmetry, overrides.get("tau2_fudge"))
    state = state_from_data(data, origin, data_path)
    samp = sampling_from_files(vals, sv, run.model_general, ps.pixel_size)
    mask_t = None
    mask_name = str(vals.get("rlnSolventMaskName", "None"))
    if solvent_mask is not None:
        mask_name = _rel(Path(solvent_mask), root)
    if mask_name not in ("", "None"):
        mask_t = load_reference(resolve_relion_path(mask_name, *bases), ps.n, ps.pixel_size, "--solvent_mask",
                                log)
    set_values = None
    input_set = str(vals.get("cryopipeInputOptimisationSet", "None"))
    if input_set not in ("", "None"):
        set_values = optimisation_set_entries(resolve_relion_path(input_set, *bases))
    start = int(vals.get("rlnCurrentIteration", 0))
    opt = Optimiser3D(ps, s, model=model, state=state, sampling=samp, iteration=start, device=dev,
                      progress=progress, solvent_mask=mask_t)
    restore_changes(opt, vals)
    original = original_sampling(sv, samp, ps.pixel_size)
    log(f"continuing from {run.path} (iteration {start}, {ps.size} particles, HEALPix order "
        f"{samp.healpix_order}{', local searches' if samp.sigma_ang > 0 else ''})")
    return RefineStart(opt, data, None, original, mask_name, input_set, set_values)


def start_refine3d(inp: RefineInputs, s: Refine3DSettings, absolute_greyscale: bool, dev: torch.device,
                   root: Path, progress, log, angle_sigmas: tuple[float, ...] = (0.0, 0.0)) -> RefineStart:
    """A new single-particle refinement: particles (checked for CTF values with ``--ctf``), the reference(s)
    (averaged), an optional mask in [0, 1], start assignments from the input table (classes reset), the optimiser
    initialised from the reference (low-passed; rescaled unless ``absolute_greyscale``)."""
    particles_path, reference, solvent_mask = inp.particles_path, inp.reference, inp.solvent_mask
    mask_name = "None"
    if any(a > 0 for a in angle_sigmas):
        raise CryopipeError("--sigma_tilt / --sigma_psi / --sigma_rot are implemented for tomographic particles only (an "
                            "optimisation set or particles with rlnTomoName); use --sigma_ang for local searches")
    data, ps, origin = load_particles(particles_path, "3D refinement")
    if s.do_ctf and ps.ctf is None:
        raise InputFileError(particles_path, "--ctf was given but the particles have no rlnDefocusU column",
                             "run CTF estimation and extraction with CTF values, or leave out --ctf")
    ref_list = reference if isinstance(reference, list) else [reference]
    vol = torch.stack([load_reference(r, ps.n, ps.pixel_size, "--ref", log) for r in ref_list]).mean(dim=0)
    mask_t = None
    if solvent_mask is not None:
        mask_t = load_reference(solvent_mask, ps.n, ps.pixel_size, "--solvent_mask", log)
        if float(mask_t.min()) < -1e-3 or float(mask_t.max()) > 1.001:
            raise InputFileError(solvent_mask, f"values span [{float(mask_t.min()):.3g}, "
                                               f"{float(mask_t.max()):.3g}], not [0, 1]",
                                 "give a mask from mask-create (0 = solvent, 1 = protein)")
        mask_name = _rel(Path(solvent_mask), root)
    state = state_from_data(data, origin, particles_path)
    state.klass[:] = -1  # classes of earlier jobs are not this run's
    opt = Optimiser3D(ps, s, state=state, device=dev, progress=progress, solvent_mask=mask_t)
    opt.initialise(vol, absolute_greyscale=absolute_greyscale)
    n1 = int((opt.state.subset == 1).sum())
    log(f"3D auto-refine: {ps.size} particles (half-sets {n1} / {ps.size - n1}), box {ps.n}, "
        f"{ps.pixel_size:.3f} Å/px, symmetry {s.symmetry}, reference low-passed to {s.ini_high:g} Å"
        + ("" if absolute_greyscale else " and rescaled to the particles' greyscale"))
    original = (int(s.healpix_order), float(s.offset_range), float(s.offset_step))
    return RefineStart(opt, data, None, original, mask_name, inp.input_set, inp.set_values)
