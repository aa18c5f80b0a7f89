"""RELION files of a 2D classification run (``relion_refine`` naming), translated to and from the optimiser's
objects: the per-iteration ``_data.star`` table, ``_optimiser.star`` values and the file set written each
iteration (:func:`write_iteration_2d`), and, for ``--continue``, the particle state, the model and the resumed
:class:`~cryopipe.engine.classify2d.Optimiser2D` (:func:`resume_optimiser_2d`). The tables themselves are
written by :mod:`cryopipe.engine.relion_files`. Offsets: pixels inside, Å in the files.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.engine.classify2d import Class2DSettings, Model2D, Optimiser2D, ParticleSet2D, ParticleState2D
from cryopipe.engine.particle_input import load_particles
from cryopipe.engine.relion_files import (
    read_model_star,
    read_optimiser_star,
    read_sampling_star,
    resolve_relion_path,
    write_model_star,
    write_optimiser_star,
    write_sampling_star,
)
from cryopipe.engine.sampling import InPlaneSampling, psi_step_adjusted
from cryopipe.errors import InputFileError
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.particles import ParticleData, write_particles

__all__ = ["split_output_prefix", "project_relative", "data_table_2d", "optimiser_values_2d", "write_iteration_2d",
           "state_from_data_2d", "model_from_files_2d", "resume_optimiser_2d"]

_JOB_RE = re.compile(r"job\d{3,}")


def split_output_prefix(o: str | os.PathLike) -> tuple[Path, str]:
    """``--o`` → (directory, file prefix): ``Class2D/job007/run`` → (``Class2D/job007``, ``run``);
    ``Class2D/job007/`` or ``Class2D/job007`` → prefix ``run``."""
    s = str(o)
    p = Path(s)
    if s.endswith("/") or _JOB_RE.fullmatch(p.name) or (p.exists() and p.is_dir()):
        return p, "run"
    return (p.parent if str(p.parent) else Path(".")), p.name


def optimiser_output(o: str | None, continue_from: str | None) -> tuple[Path | None, str, bool]:
    """Where an optimiser job (class2d, initialmodel, refine3d) writes: ``(job folder or None for a new job,
    file prefix, same_job)``. Without ``--o`` a ``--continue`` run takes the prefix stored in its
    ``_optimiser.star`` (rlnOutputRootName); ``same_job``: the continued run's files are in that folder."""
    from cryopipe.engine.relion_files import read_optimiser_star

    if o is None and continue_from is not None:
        o = str(read_optimiser_star(continue_from).get("rlnOutputRootName", "run"))
    out_dir, prefix = (None, "run") if o is None else split_output_prefix(o)
    same_job = continue_from is not None and out_dir is not None and \
        Path(continue_from).resolve().parent == Path(out_dir).resolve()
    return out_dir, prefix, same_job


def project_relative(path: Path, root: Path) -> str:
    """``path`` relative to the project directory ``root`` (as names are written in STAR files), or absolute when
    they share no root (another drive)."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(root).resolve())
    except ValueError:
        return str(Path(path).resolve())


def data_table_2d(data: ParticleData, opt: Optimiser2D) -> ParticleData:
    """The ``_data.star`` of the current iteration: the input particles with RELION's 2D columns (group, angles
    with ψ in (−180, 180], origins in Å, 1-based class, norm, log-likelihood, Pmax, significant samples)."""
    st = opt.state
    apix = opt.p.pixel_size
    t = data.particles.copy()
    psi = (st.psi + 180.0) % 360.0 - 180.0
    cols = {
        "rlnGroupNumber": opt.p.group + 1,
        "rlnAngleRot": np.zeros(len(t)),
        "rlnAngleTilt": np.zeros(len(t)),
        "rlnAnglePsi": psi,
        "rlnOriginXAngst": st.origin[:, 0] * apix,
        "rlnOriginYAngst": st.origin[:, 1] * apix,
        "rlnClassNumber": np.maximum(st.klass, 0) + 1,
        "rlnNormCorrection": st.norm,
        "rlnLogLikeliContribution": st.loglik,
        "rlnMaxValueProbDistribution": st.pmax,
        "rlnNrOfSignificantSamples": st.nsig.astype(np.int64),
    }
    for k, v in cols.items():
        t[k] = v
    out = data.copy()
    out.particles = t
    return out


def optimiser_values_2d(opt: Optimiser2D, prefix_rel: str, files: dict, n_iter: int) -> dict:
    """``data_optimiser_general`` values of the current iteration (RELION 5.0.1's labels); ``files`` maps
    ``data``/``model``/``sampling`` to their project-relative names."""
    s, m = opt.s, opt.model
    active = m.pdf_class.cpu() > 0
    return {
        "rlnOutputRootName": prefix_rel,
        "rlnModelStarFile": files["model"],
        "rlnExperimentalDataStarFile": files["data"],
        "rlnOrientSamplingStarFile": files["sampling"],
        "rlnCurrentIteration": int(opt.iteration),
        "rlnNumberOfIterations": int(n_iter),
        "rlnDoSplitRandomHalves": 0,
        "rlnJoinHalvesUntilThisResolution": -1.0,
        "rlnAdaptiveOversampleOrder": int(s.oversampling),
        "rlnAdaptiveOversampleFraction": float(s.adaptive_fraction),
        "rlnRandomSeed": int(s.random_seed),
        "rlnParticleDiameter": float(opt.particle_diameter),
        "rlnWidthMaskEdge": int(round(s.width_mask_edge)),
        "rlnDoZeroMask": int(s.zero_mask),
        "rlnDoSolventFlattening": int(s.flatten_solvent),
        "rlnSolventMaskName": "None",
        "rlnTauSpectrumName": "None",
        "rlnMaximumCoarseImageSize": -1,
        "rlnHighresLimitExpectation": float(s.strict_highres_exp),
        "rlnIncrementImageSize": int(s.incr_size),
        "rlnDoMapEstimation": 1,
        "rlnDoFastSubsetOptimisation": int(s.fast_subsets),
        "rlnDoGradientRefine": int(getattr(opt.update_rule, "name", "em") != "em"),
        "rlnSgdClassInactivityThreshold": float(getattr(opt.update_rule, "class_inactivity_threshold", 0.0)),
        "rlnTau2FudgeArg": float(s.tau2_fudge),
        "rlnMaximumSignificantPoses": int(s.max_significant),
        "rlnDoAutoRefine": 0,
        "rlnNumberOfIterWithoutResolutionGain": 0,
        "rlnBestResolutionThusFar": float(m.current_resolution),
        "rlnOverallAccuracyRotations": float(m.acc_rot[active].min()) if active.any() else 999.0,
        "rlnOverallAccuracyTranslationsAngst": float(m.acc_trans[active].min()) if active.any() else 999.0,
        "rlnChangesOptimalOrientations": float(opt.changes["orientations"]),
        "rlnChangesOptimalOffsets": float(opt.changes["offsets"]),
        "rlnChangesOptimalClasses": float(opt.changes["classes"]),
        "rlnSmallestChangesOrientations": float(opt.smallest_changes["orientations"]),
        "rlnSmallestChangesOffsets": float(opt.smallest_changes["offsets"]),
        "rlnSmallestChangesClasses": float(opt.smallest_changes["classes"]),
        "rlnHasConverged": 0,
        "rlnDoCorrectNorm": int(s.do_norm),
        "rlnDoCorrectScale": int(s.do_scale),
        "rlnDoCorrectCtf": int(s.do_ctf),
        "rlnDoCenterClasses": int(s.center_classes),
        "rlnDoIgnoreCtfUntilFirstPeak": int(s.ctf_intact_first_peak),
        "rlnCtfDataArePhaseFlipped": 0,
        "rlnRefsAreCtfCorrected": int(s.do_ctf),
        "rlnPaddingFactor": float(s.pad),
        "rlnSamplingPerturbFactor": float(s.perturb),
        "rlnOffsetRangeX": -1.0,
        "rlnOffsetRangeY": -1.0,
        "rlnOffsetRangeZ": -1.0,
    }


def write_iteration_2d(opt: Optimiser2D, data: ParticleData, out_dir: Path, prefix: str, root: Path, n_iter: int,
                     command: str, original_sampling: InPlaneSampling) -> dict[str, Path]:
    """Write ``<out_dir>/<prefix>_itNNN_{classes.mrcs,data,model,sampling,optimiser}.star`` of the current
    iteration; returns their paths by kind (``data``, ``model``, ``optimiser``, ``sampling``, ``classes``)."""
    it = opt.iteration
    base = out_dir / f"{prefix}_it{it:03d}"
    paths = {k: Path(f"{base}_{k}.star") for k in ("data", "model", "optimiser", "sampling")}
    paths["classes"] = Path(f"{base}_classes.mrcs")
    m = opt.model
    write_mrc(paths["classes"], m.refs.detach().cpu().numpy().astype(np.float32), opt.p.pixel_size)
    write_particles(paths["data"], data_table_2d(data, opt), star_version=50001)
    write_model_star(paths["model"], m, project_relative(paths["classes"], root), group_names=opt.p.group_names)
    write_sampling_star(paths["sampling"], opt.sampling, opt.p.pixel_size, original_sampling, opt.s.perturb)
    rel = {k: project_relative(v, root) for k, v in paths.items()}
    values = optimiser_values_2d(opt, project_relative(out_dir / prefix, root), rel, n_iter)
    write_optimiser_star(paths["optimiser"], values, command)
    return paths


def state_from_data_2d(data: ParticleData, ps: ParticleSet2D, origin: np.ndarray) -> ParticleState2D:
    """Per-particle state (ψ, 0-based class, norm, log-likelihood, Pmax, significant samples) from a run's
    ``_data.star``; ``origin`` ``[N, 2]`` pixels. Missing columns keep :meth:`ParticleState2D.empty`'s values."""
    t = data.particles
    n = len(t)
    st = ParticleState2D.empty(n, origin)
    if "rlnAnglePsi" in t.columns:
        st.psi = np.array(pd.to_numeric(t["rlnAnglePsi"], errors="coerce").fillna(0).to_numpy(float) % 360.0)
    if "rlnClassNumber" in t.columns:
        st.klass = np.array(pd.to_numeric(t["rlnClassNumber"], errors="coerce").fillna(0).to_numpy(int) - 1)
    for col, attr in (("rlnNormCorrection", "norm"), ("rlnLogLikeliContribution", "loglik"),
                      ("rlnMaxValueProbDistribution", "pmax")):
        if col in t.columns:
            setattr(st, attr, np.array(pd.to_numeric(t[col], errors="coerce").fillna(1.0 if attr == "norm" else 0.0)
                                       .to_numpy(float), copy=True))
    if "rlnNrOfSignificantSamples" in t.columns:
        st.nsig = np.array(pd.to_numeric(t["rlnNrOfSignificantSamples"], errors="coerce").fillna(0).to_numpy(np.int64))
    return st


def model_from_files_2d(model_path: Path, ps: ParticleSet2D, bases: list[Path], tau2_fudge: float | None,
                      device) -> Model2D:
    """The :class:`Model2D` of a run's ``_model.star`` (class averages read through ``rlnReferenceImage``, names
    resolved against ``bases``); ``tau2_fudge`` overrides the stored T. Checks box and optics groups against
    ``ps``."""
    mf = read_model_star(model_path)
    g = mf.general
    if int(g.get("rlnReferenceDimensionality", 2)) != 2:
        raise InputFileError(model_path, "is not a 2D model (rlnReferenceDimensionality != 2)",
                             "continue a 2D classification with class2d")
    n = int(g["rlnOriginalImageSize"])
    if n != ps.n:
        raise InputFileError(model_path, f"rlnOriginalImageSize {n} differs from the particle box {ps.n}",
                             "continue with the same particles")
    names = mf.classes["rlnReferenceImage"].astype(str).tolist()
    refs = []
    cache: dict[str, np.ndarray] = {}
    for nm in names:  # K names, a few stacks
        idx, stack = nm.split("@", 1) if "@" in nm else ("1", nm)
        if stack not in cache:
            cache[stack], _ = read_mrc(resolve_relion_path(stack, *bases))
        arr = cache[stack]
        refs.append(arr[int(idx) - 1] if arr.ndim == 3 else arr)
    K = len(refs)
    apix = float(g["rlnPixelSize"])
    pdf = np.array(mf.classes["rlnClassDistribution"].to_numpy(float))
    prior = np.zeros((K, 2))
    for j, c in enumerate(("rlnClassPriorOffsetX", "rlnClassPriorOffsetY")):
        if c in mf.classes.columns:
            prior[:, j] = mf.classes[c].to_numpy(float) / apix
    res_A = float(g["rlnCurrentResolution"])
    ngroups = int(ps.n_groups)
    scale = np.ones(ngroups)
    if mf.groups is not None and "rlnGroupScaleCorrection" in mf.groups.columns and len(mf.groups) == ngroups:
        scale = mf.groups["rlnGroupScaleCorrection"].to_numpy(float)
    sig2 = mf.sigma2_noise
    if sig2.shape[0] != ps.n_optics_groups:
        raise InputFileError(model_path, f"{sig2.shape[0]} optics groups but the particles have {ps.n_optics_groups}",
                             "continue with the same particles")
    dev = device
    t64 = lambda a: torch.as_tensor(np.array(a, float), dtype=torch.float64, device=dev)  # noqa: E731
    acc = lambda c: torch.as_tensor(np.array(mf.classes[c].to_numpy(float)) if c in mf.classes.columns  # noqa: E731
                                    else np.zeros(K), dtype=torch.float64)
    est = (np.array(mf.classes["rlnEstimatedResolution"].to_numpy(float)) if "rlnEstimatedResolution" in mf.classes
           else np.zeros(K))
    return Model2D(
        refs=torch.as_tensor(np.stack(refs), dtype=torch.float32, device=dev), pixel_size=apix,
        pdf_class=t64(pdf), prior_offset=t64(prior),
        sigma2_offset=(float(g.get("rlnSigmaOffsetsAngst", 0.0)) / apix) ** 2,
        sigma2_noise=t64(sig2),
        tau2_fudge=float(g.get("rlnTau2FudgeFactor", 2.0)) if tau2_fudge is None else float(tau2_fudge),
        tau2=t64(mf.tau2), sigma2_ref=t64(mf.sigma2_ref), data_vs_prior=t64(mf.ssnr),
        fourier_coverage=t64(mf.fourier_coverage), orientability=torch.as_tensor(mf.orientability),
        acc_rot=acc("rlnAccuracyRotations"), acc_trans=acc("rlnAccuracyTranslationsAngst"),
        estimated_resolution=torch.as_tensor(est), total_fourier_coverage=acc("rlnOverallFourierCompleteness"),
        current_resolution=float(1.0 / res_A) if res_A > 0 else 0.0,
        current_size=int(g.get("rlnCurrentImageSize", n)),
        avg_norm_correction=float(g.get("rlnNormCorrectionAverage", 1.0)),
        scale_correction=t64(scale), group_counts=t64(np.bincount(ps.group, minlength=ngroups)),
        LL=float(g.get("rlnLogLikelihood", 0.0)), ave_pmax=float(g.get("rlnAveragePmax", 0.0)),
        padding_factor=int(round(float(g.get("rlnPaddingFactor", 2)))))


def resume_optimiser_2d(continue_from: str | os.PathLike, settings: Class2DSettings, overrides: dict, device,
                        *, progress=None, rule=None, backend=None, log=print
                        ) -> tuple[Optimiser2D, ParticleData, ParticleSet2D, Class2DSettings]:
    """An :class:`Optimiser2D` resumed from a run's ``_optimiser.star`` (cryopipe's or RELION's): the model (class
    averages, noise spectra, priors), the particle assignments of its data.star and its sampling. Stored options
    are used except those named in ``overrides`` (``{field: value}`` of :class:`Class2DSettings`).

    Returns:
        ``(optimiser at the stored iteration, particle data, particle set, settings in effect)``.
    """
    opt_path = Path(continue_from)
    vals = read_optimiser_star(opt_path)
    bases = [opt_path.resolve().parent, opt_path.resolve().parent.parent]
    data_path = resolve_relion_path(str(vals["rlnExperimentalDataStarFile"]), *bases)
    model_path = resolve_relion_path(str(vals["rlnModelStarFile"]), *bases)
    samp_name = str(vals.get("rlnOrientSamplingStarFile", ""))
    stored = dict(
        particle_diameter=float(vals.get("rlnParticleDiameter", settings.particle_diameter)),
        zero_mask=bool(int(vals.get("rlnDoZeroMask", settings.zero_mask))),
        flatten_solvent=bool(int(vals.get("rlnDoSolventFlattening", settings.flatten_solvent))),
        oversampling=int(vals.get("rlnAdaptiveOversampleOrder", settings.oversampling)),
        adaptive_fraction=float(vals.get("rlnAdaptiveOversampleFraction", settings.adaptive_fraction)),
        random_seed=int(vals.get("rlnRandomSeed", settings.random_seed)),
        width_mask_edge=float(vals.get("rlnWidthMaskEdge", settings.width_mask_edge)),
        strict_highres_exp=float(vals.get("rlnHighresLimitExpectation", settings.strict_highres_exp)),
        incr_size=int(vals.get("rlnIncrementImageSize", settings.incr_size)),
        do_norm=bool(int(vals.get("rlnDoCorrectNorm", settings.do_norm))),
        do_scale=bool(int(vals.get("rlnDoCorrectScale", settings.do_scale))),
        do_ctf=bool(int(vals.get("rlnDoCorrectCtf", settings.do_ctf))),
        ctf_intact_first_peak=bool(int(vals.get("rlnDoIgnoreCtfUntilFirstPeak", settings.ctf_intact_first_peak))),
        center_classes=bool(int(vals.get("rlnDoCenterClasses", settings.center_classes))),
        max_significant=int(vals.get("rlnMaximumSignificantPoses", settings.max_significant)),
        fast_subsets=bool(int(vals.get("rlnDoFastSubsetOptimisation", settings.fast_subsets))),
    )
    names = {f.name for f in fields(Class2DSettings)}
    kw = {f.name: getattr(settings, f.name) for f in fields(Class2DSettings)}
    kw.update({k: v for k, v in stored.items() if k not in overrides})
    kw.update({k: v for k, v in overrides.items() if k in names})
    data, ps, origin = load_particles(data_path)
    model = model_from_files_2d(model_path, ps, bases, overrides.get("tau2_fudge"), device)
    kw["n_classes"] = model.n_classes
    s = Class2DSettings(**kw)
    state = state_from_data_2d(data, ps, origin)
    start_iter = int(vals.get("rlnCurrentIteration", 0))
    samp = None
    if samp_name:
        sv = read_sampling_star(resolve_relion_path(samp_name, *bases))
        apix = ps.pixel_size
        samp = InPlaneSampling(
            psi_step=float(sv["rlnPsiStep"]) if "psi_step" not in overrides else psi_step_adjusted(s.psi_step),
            offset_range=float(sv["rlnOffsetRange"]) / apix if "offset_range" not in overrides else s.offset_range,
            offset_step=float(sv["rlnOffsetStep"]) / apix if "offset_step" not in overrides else s.offset_step,
            oversampling=s.oversampling, perturbation=float(sv.get("rlnSamplingPerturbInstance", 0.0)))
    opt = Optimiser2D(ps, s, model=model, state=state, iteration=start_iter, device=device, sampling=samp,
                      progress=progress, update_rule=rule, backend=backend)
    opt.from_scratch = False
    for key, lab in (("orientations", "rlnChangesOptimalOrientations"), ("offsets", "rlnChangesOptimalOffsets"),
                     ("classes", "rlnChangesOptimalClasses")):
        if lab in vals:
            opt.changes[key] = float(vals[lab])
    log(f"continuing from {opt_path} (iteration {start_iter}, {model.n_classes} classes, {ps.size} particles)")
    return opt, data, ps, s
