"""Setting up a de novo initial model (``cryopipe initialmodel``): the run a job iterates
(:class:`InitialModelRun`) and a single-particle run continued from its ``_itNNN_optimiser.star`` (settings, model,
particle assignments, sampling and the gradient moments of ``_momenta.pt``). New runs are started in
:mod:`cryopipe.jobs.initialmodel` (tomographic particles through :mod:`cryopipe.tomo.refine_setup`). Moved from
``jobs/initialmodel.py`` (issue 14); behaviour unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Callable

import torch

from cryopipe.core.symmetry import canonical_symmetry_name
from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings
from cryopipe.engine.particle_input import load_particles
from cryopipe.engine.refine3d_files import (
    continue_inputs,
    model3d_from_files,
    original_sampling,
    sampling_from_files,
    state_from_data,
    stored_settings,
)
from cryopipe.engine.relion_files import read_model_star, resolve_relion_path
from cryopipe.engine.vdam import GradUpdate, initial_model_rule
from cryopipe.errors import InputFileError
from cryopipe.io.particles import ParticleData
from cryopipe.io.tomo_particles import is_tomo_particles

__all__ = ["INITIAL_MODEL_FORCED", "InitialModelRun", "resume_initial_model", "stored_grad_options"]

#: options forced in an initial-model run (the optimiser runs in C1; symmetry is applied at the end)
INITIAL_MODEL_FORCED = {"symmetry": "C1", "grad": True, "split_halves": False, "auto_refine": False}


@dataclass
class InitialModelRun:
    """An initial-model run ready to iterate (started or resumed)."""

    settings: Refine3DSettings
    opt: Optimiser3D
    rule: GradUpdate
    data: ParticleData | None  # the input table (None: tomographic particles, written by write_data)
    original: tuple[int, float, float]  # HEALPix order, offset range and step (pixels) the run started with
    sym_final: str  # point group applied at the end
    write_iter: int
    write_data: Callable | None = None  # write_data(path): the _data.star of tomographic particles
    set_values: dict | None = None  # optimisation-set entries of tomographic particles


def resume_initial_model(continue_from: str | os.PathLike, settings: Refine3DSettings, overrides: dict, grad: dict,
                         symmetry: str, sym_final: str, write_iter: int, device: torch.device, progress,
                         log) -> InitialModelRun:
    """Rebuild a single-particle run (settings, model, assignments, sampling, moments) from its optimiser STAR."""
    vals, bases, data_path, model_paths, sampling_vals, _ = continue_inputs(continue_from)
    if is_tomo_particles(data_path):
        raise InputFileError(continue_from, "is an initial model of tomographic particles; --continue does not "
                                            "resume those yet", "start a new initialmodel run")
    if int(vals.get("rlnDoGradientRefine", 0)) != 1 or len(model_paths) != 1:
        raise InputFileError(continue_from, "is not from a gradient-driven initial model (rlnDoGradientRefine)",
                             "continue a refinement with `cryopipe refine3d --continue`")
    kw = {f.name: getattr(settings, f.name) for f in fields(Refine3DSettings)}
    kw.update({k: v for k, v in stored_settings(vals, settings, sampling_vals).items() if k not in overrides})
    kw.update({k: v for k, v in overrides.items() if k in kw})
    data, ps, origin = load_particles(data_path, "3D initial model")
    general = read_model_star(model_paths[0]).general
    kw["n_classes"] = int(general.get("rlnNrClasses", 1))
    s = Refine3DSettings(**{**kw, **INITIAL_MODEL_FORCED})
    grad = {**stored_grad_options(vals), **{k: v for k, v in grad.items() if v is not None}}
    if "symmetry" not in overrides and symmetry == "C1":
        sym_final = canonical_symmetry_name(str(vals.get("cryopipeRequestedSymmetry", "C1")))
    if "write_iter" not in overrides:
        write_iter = int(vals.get("cryopipeGradWriteIter", write_iter))
    model = model3d_from_files(model_paths, ps, bases, device, "C1")
    state = state_from_data(data, origin, data_path)
    sampling = sampling_from_files(vals, sampling_vals, general, ps.pixel_size)
    start = int(vals.get("rlnCurrentIteration", 0))
    rule = initial_model_rule(s.n_iter, s.tau2_fudge, grad)
    momenta = str(vals.get("cryopipeGradMomentaFile", "None"))
    if momenta not in ("", "None"):
        momenta_path = resolve_relion_path(momenta, *bases)
        rule.load_state_dict(torch.load(momenta_path, map_location="cpu", weights_only=True), device=device)
    elif start > 0:
        log(f"warning: {continue_from} names no momenta file; the gradient moments restart from zero")
    opt = Optimiser3D(ps, s, model=model, state=state, sampling=sampling, iteration=start, device=device,
                      update_rule=rule, progress=progress)
    original = original_sampling(sampling_vals, sampling, ps.pixel_size)
    log(f"continuing from {continue_from} (iteration {start}, {s.n_classes} class(es), {ps.size} particles)")
    return InitialModelRun(s, opt, rule, data, original, sym_final, write_iter)


def stored_grad_options(vals: dict) -> dict:
    """The :class:`~cryopipe.engine.vdam.GradUpdate` options stored in an optimiser STAR (RELION's rlnSgd*)."""
    return dict(ini_frac=float(vals.get("rlnSgdInitialIterationsFraction", 0.3)),
                fin_frac=float(vals.get("rlnSgdFinalIterationsFraction", 0.2)),
                base_step=float(vals["rlnSgdStepsize"]) if float(vals.get("rlnSgdStepsize", -1)) > 0 else None,
                ini_subset=int(vals["rlnSgdInitialSubsetSize"]) if "rlnSgdInitialSubsetSize" in vals else None,
                fin_subset=int(vals["rlnSgdFinalSubsetSize"]) if "rlnSgdFinalSubsetSize" in vals else None,
                grad_em_iters=int(vals.get("rlnGradEmIters", 0)))
