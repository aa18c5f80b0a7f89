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
import math
import os
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.device import resolve_device
from cryopipe.engine.backend import add_dask_arguments, make_backend
from cryopipe.engine.classify2d import (
    Class2DSettings,
    Model2D,
    Optimiser2D,
    ParticleSet2D,
    ParticleState2D,
)
from cryopipe.engine.mstep import resolution_per_A
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
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.mrc import ImageReader, read_mrc, write_mrc
from cryopipe.io.particles import ParticleData, ctf_parameters, origins_px, pixel_sizes, read_particles, write_particles

HELP = "2D classification (like relion_refine without a reference, 2D)"

__all__ = ["HELP", "Class2DResult", "classify_2d", "load_particles", "split_output_prefix", "add_arguments", "main"]

_JOB_RE = re.compile(r"job\d{3,}")


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


# ------------------------------------------------------------------------------------------------ particles

def _image_root(star_path: Path, first_name: str) -> Path:
    stack = first_name.split("@", 1)[-1]
    if Path(stack).is_absolute() or (Path.cwd() / stack).exists():
        return Path.cwd()
    return star_path.resolve().parent


def load_particles(star_path: str | os.PathLike, purpose: str = "2D classification"
                   ) -> tuple[ParticleData, ParticleSet2D, np.ndarray]:
    """Read a particles STAR file: ``(data, ParticleSet2D, origins px [N, 2])``; one pixel size and box required
    (``purpose`` names the job in the error messages)."""
    star_path = Path(star_path)
    data = read_particles(star_path)
    t = data.particles
    if "rlnImageName" not in t.columns:
        raise InputFileError(star_path, "no rlnImageName column", "give a particles STAR file (from extraction)")
    if len(t) == 0:
        raise InputFileError(star_path, "contains no particles", "give a non-empty particles STAR file")
    apix_all = pixel_sizes(data)
    apix = float(apix_all[0])
    if not np.allclose(apix_all, apix, rtol=1e-4):
        raise InputFileError(star_path, f"particles have different pixel sizes {sorted(set(np.round(apix_all, 4)))}",
                             f"{purpose} takes one pixel size at a time (rescale particles to a common pixel size)")
    names = t["rlnImageName"].astype(str).to_numpy()
    reader = ImageReader(names, root_dir=_image_root(star_path, names[0]))
    ny, nx = reader.image_shape
    if ny != nx or nx % 2:
        raise InputFileError(star_path, f"images are {nx}x{ny}", f"{purpose} needs square, even-sized images")
    og_labels = data.optics["rlnOpticsGroup"].to_numpy()
    og = pd.Series(np.arange(len(og_labels)), index=og_labels).reindex(t["rlnOpticsGroup"].to_numpy()).to_numpy()
    grp, group_names = particle_groups(t, og.astype(int))
    try:
        ctf = ctf_parameters(data)
    except InputFileError:
        ctf = None
    ps = ParticleSet2D(int(nx), apix, reader.read, ctf, og.astype(np.int64), np.asarray(grp, dtype=np.int64),
                       group_names=group_names)
    return data, ps, origins_px(data)[:, :2]


_PIPELINE_JOB_RE = re.compile(r"(?:^|/)job\d+/")


def particle_groups(t: pd.DataFrame, optics_group: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """Scale-correction groups ``([N] 0-based, names)`` as RELION's ``Experiment::read``: ``rlnGroupName`` if
    given, else one group per micrograph (``rlnMicrographName`` without its ``Type/jobNNN/`` prefix), numbered in
    order of first appearance with the particles sorted by micrograph name. Without either column, the given
    ``rlnGroupNumber`` (RELION would make one group) or else the optics groups (names None)."""
    n = len(t)
    if "rlnGroupName" in t.columns:
        names = t["rlnGroupName"].astype(str).to_numpy()
    elif "rlnMicrographName" in t.columns:
        names = np.array([_PIPELINE_JOB_RE.split(str(m), maxsplit=1)[-1] for m in t["rlnMicrographName"]],
                         dtype=object)
    elif "rlnGroupNumber" in t.columns:
        grp = pd.to_numeric(t["rlnGroupNumber"], errors="coerce").fillna(1).to_numpy(int) - 1
        return pd.factorize(grp, sort=True)[0].astype(np.int64), None
    else:
        return np.asarray(optics_group, dtype=np.int64), None
    order = (np.argsort(t["rlnMicrographName"].astype(str).to_numpy(), kind="stable")
             if "rlnMicrographName" in t.columns else np.arange(n))
    codes, uniques = pd.factorize(pd.Series(names[order]), sort=False)
    grp = np.empty(n, dtype=np.int64)
    grp[order] = codes
    return grp, [str(u) for u in uniques]


# ------------------------------------------------------------------------------------------------ output

def split_output_prefix(o: str | os.PathLike) -> tuple[Path, str]:
    """``--o`` → (directory, file prefix): ``Class2D/job007/run`` → (``Class2D/job007``, ``run``);
    ``Class2D/job007/`` or ``Class2D/job007`` → prefix ``run``."""
    s = str(o)
    p = Path(s)
    if s.endswith("/") or _JOB_RE.fullmatch(p.name) or (p.exists() and p.is_dir()):
        return p, "run"
    return (p.parent if str(p.parent) else Path(".")), p.name


def _rel(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(root).resolve())
    except ValueError:
        return str(Path(path).resolve())


def _data_table(data: ParticleData, opt: Optimiser2D) -> ParticleData:
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


def _optimiser_values(opt: Optimiser2D, prefix_rel: str, files: dict, n_iter: int) -> dict:
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


def _write_iteration(opt: Optimiser2D, data: ParticleData, out_dir: Path, prefix: str, root: Path, n_iter: int,
                     command: str, original_sampling: InPlaneSampling) -> dict[str, Path]:
    it = opt.iteration
    base = out_dir / f"{prefix}_it{it:03d}"
    paths = {k: Path(f"{base}_{k}.star") for k in ("data", "model", "optimiser", "sampling")}
    paths["classes"] = Path(f"{base}_classes.mrcs")
    m = opt.model
    write_mrc(paths["classes"], m.refs.detach().cpu().numpy().astype(np.float32), opt.p.pixel_size)
    write_particles(paths["data"], _data_table(data, opt), star_version=50001)
    write_model_star(paths["model"], m, _rel(paths["classes"], root), group_names=opt.p.group_names)
    write_sampling_star(paths["sampling"], opt.sampling, opt.p.pixel_size, original_sampling, opt.s.perturb)
    rel = {k: _rel(v, root) for k, v in paths.items()}
    write_optimiser_star(paths["optimiser"], _optimiser_values(opt, _rel(out_dir / prefix, root), rel, n_iter),
                         command)
    return paths


# ------------------------------------------------------------------------------------------------ continue

def _state_from_data(data: ParticleData, ps: ParticleSet2D, origin: np.ndarray) -> ParticleState2D:
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


def _model_from_files(model_path: Path, ps: ParticleSet2D, bases: list[Path], tau2_fudge: float | None,
                      device) -> Model2D:
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
    ns = n // 2 + 1
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
        model = _model_from_files(model_path, ps, bases, overrides.get("tau2_fudge"), dev)
        kw["n_classes"] = model.n_classes
        s = Class2DSettings(**kw)
        state = _state_from_data(data, ps, origin)
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
        opt = Optimiser2D(ps, s, model=model, state=state, iteration=start_iter, device=dev, sampling=samp,
                          progress=progress, update_rule=rule, backend=backend)
        opt.from_scratch = False
        for key, lab in (("orientations", "rlnChangesOptimalOrientations"), ("offsets", "rlnChangesOptimalOffsets"),
                         ("classes", "rlnChangesOptimalClasses")):
            if lab in vals:
                opt.changes[key] = float(vals[lab])
        log(f"continuing from {opt_path} (iteration {start_iter}, {model.n_classes} classes, {ps.size} particles)")
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
        paths = _write_iteration(opt, data, out_dir, prefix, root, n_iter, command, original)
    while opt.iteration < n_iter:
        rep = opt.iterate()
        paths = _write_iteration(opt, data, out_dir, prefix, root, n_iter, command, original)
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
                "zero_mask", "do_norm", "do_scale", "ini_high", "offset_sigma", "init_blobs")


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
                    do_norm=False, do_scale=False, ini_high=-1.0, offset_sigma=10.0, init_blobs=True)
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
    o = args.o
    if o is None and args.continue_ is not None:
        vals = read_optimiser_star(args.continue_)
        o = str(vals.get("rlnOutputRootName", "run"))
    if o is None:
        out_dir, prefix = None, "run"
    else:
        out_dir, prefix = split_output_prefix(o)
    same_job = False
    if args.continue_ is not None and out_dir is not None:
        same_job = Path(args.continue_).resolve().parent == Path(out_dir).resolve()
    inputs = [(args.i, NodeType.PARTICLES)] if args.i else []
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    with open_job_dir(str(out_dir) + "/" if out_dir is not None else None, "Class2D", ProcessLabel.CLASS2D,
                      alias=args.alias, inputs=inputs, params=params, continue_job=same_job) as job:
        backend = make_backend(args.dask, args.dask_batches_per_worker)
        if backend.distributed:
            log(f"E-step on {backend.describe()}")
        try:
            res = classify_2d(args.i, job.dir / prefix, settings, continue_from=args.continue_, overrides=given,
                              device=args.device, root=job.root, command=" ".join(_argv_of(args)), log=log,
                              progress=lambda it, desc="": progress(it, desc=desc), grad=_grad_options(args),
                              backend=backend)
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


def _argv_of(args: argparse.Namespace) -> list[str]:
    import sys

    return sys.argv[2:] if len(sys.argv) > 2 else []
