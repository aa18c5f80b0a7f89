"""The RELION-file bookkeeping of a 3D refinement (refine3d, initialmodel): input kinds (optimisation sets,
tomography particles), particle assignments ↔ ``_data.star`` tables, references from MRC files, the per-iteration
``_data`` / ``_model`` / ``_optimiser`` / ``_sampling`` STAR files and maps (:func:`write_iteration_3d`), and what
``--continue`` reads back from them (settings, auto-sampling state, model, file names).

Files use RELION's units: Å for offsets, resolutions (rlnCurrentResolution), accuracies; 1/Å for
rlnBestResolutionThusFar (as RELION); degrees for angles. Moved verbatim from ``jobs/refine3d.py`` (issue 14).
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.engine.class2d_files import project_relative as _rel
from cryopipe.engine.optimiser3d import AutoSampling, Model3D, Optimiser3D, ParticleState3D, Refine3DSettings
from cryopipe.engine.orientations3d import direction_histogram, nearest_directions
from cryopipe.engine.relion_files import (
    read_model_star,
    read_optimiser_star,
    read_sampling_star,
    resolve_relion_path,
    write_model_star_3d,
    write_optimiser_star,
    write_sampling_star_3d,
)
from cryopipe.errors import InputFileError
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.particles import ParticleData, euler_angles, write_particles

__all__ = ["state_from_data", "data_table_3d", "load_reference", "model3d_from_files",
           "optimiser_values_3d", "stored_settings", "sampling_from_files", "write_iteration_3d", "continue_inputs",
           "CHANGE_LABELS", "restore_changes", "original_sampling", "continued_settings"]


# ------------------------------------------------------------------------------------------------ particles

def state_from_data(data: ParticleData, origin: np.ndarray, source: str | os.PathLike = "particles STAR file"
                    ) -> ParticleState3D:
    """Particle assignments from a particles / ``_data.star`` table: angles (degrees; zeros where absent),
    ``origin`` (pixels, from :func:`cryopipe.engine.particle_input.load_particles`), rlnClassNumber (1-based →
    0-based; −1 where absent: "none yet"), rlnRandomSubset (1/2; 0 = not assigned), norm, log-likelihood, pmax,
    nsig."""
    t = data.particles
    n = len(t)
    st = ParticleState3D.empty(n, origin, euler_angles(data))

    def num(col: str, fill: float) -> np.ndarray:
        return pd.to_numeric(t[col], errors="coerce").fillna(fill).to_numpy()

    if "rlnClassNumber" in t.columns:
        st.klass = np.array(num("rlnClassNumber", 0).astype(np.int64) - 1)
    if "rlnRandomSubset" in t.columns:
        sub = num("rlnRandomSubset", 0).astype(np.int64)
        bad = (sub < 0) | (sub > 2)
        if bad.any():
            raise InputFileError(source, f"rlnRandomSubset has values other than 1 and 2 (e.g. {int(sub[bad][0])})",
                                 "remove the rlnRandomSubset column to draw new half-sets")
        st.subset = np.array(sub)
    for col, attr, fill in (("rlnNormCorrection", "norm", 1.0), ("rlnLogLikeliContribution", "loglik", 0.0),
                            ("rlnMaxValueProbDistribution", "pmax", 0.0)):
        if col in t.columns:
            setattr(st, attr, np.array(num(col, fill).astype(float)))
    if "rlnNrOfSignificantSamples" in t.columns:
        st.nsig = np.array(num("rlnNrOfSignificantSamples", 0).astype(np.int64))
    return st


def data_table_3d(data: ParticleData, opt: Optimiser3D) -> ParticleData:
    """The input table with the optimiser's assignments (RELION ``_data.star`` columns; origins in Å; rot and
    psi in [−180, 180)); rlnRandomSubset with half-sets only."""
    st, apix = opt.state, opt.p.pixel_size
    t = data.particles.copy()
    wrap = lambda a: (a + 180.0) % 360.0 - 180.0  # noqa: E731
    cols = {
        "rlnGroupNumber": opt.p.group + 1,
        "rlnAngleRot": wrap(st.angles[:, 0]),
        "rlnAngleTilt": st.angles[:, 1],
        "rlnAnglePsi": wrap(st.angles[:, 2]),
        "rlnOriginXAngst": st.origin[:, 0] * apix,
        "rlnOriginYAngst": st.origin[:, 1] * apix,
        "rlnClassNumber": np.maximum(st.klass, 0) + 1,
        "rlnNormCorrection": st.norm,
        "rlnLogLikeliContribution": st.loglik,
        "rlnMaxValueProbDistribution": st.pmax,
        "rlnNrOfSignificantSamples": st.nsig.astype(np.int64),
    }
    if opt.s.split_halves:
        cols["rlnRandomSubset"] = st.subset.astype(np.int64)
    for k, v in cols.items():
        t[k] = v
    out = data.copy()
    out.particles = t
    return out


def load_reference(path: str | os.PathLike, box: int, pixel_size: float, what: str = "--ref",
                   log=print) -> torch.Tensor:
    """A cubic MRC map with the particles' box (``[n, n, n]`` float32); a pixel size differing by > 1 % from
    the particles' is reported (not rescaled)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, f"{what} map not found", "give an existing MRC file")
    vol, apix = read_mrc(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputFileError(path, f"{what} map has shape {tuple(vol.shape)}, not a cube",
                             "give a cubic 3D map (.mrc)")
    if vol.shape[-1] != box:
        raise InputFileError(path, f"{what} box {vol.shape[-1]} differs from the particle box {box}",
                             "re-box or rescale the map to the particles (relion_image_handler --new_box "
                             "--rescale_angpix)")
    if apix > 0 and abs(apix - 1.0) > 1e-6 and abs(apix - pixel_size) > 0.01 * pixel_size:
        log(f"warning: {path}: pixel size {apix:g} Å differs from the particles' {pixel_size:g} Å "
            "(used as it is)")
    return torch.as_tensor(np.ascontiguousarray(vol), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ model files

def model3d_from_files(model_paths: list[Path], ps, bases: list[Path], device, symmetry: str,
                       tau2_fudge: float | None = None) -> Model3D:
    """A :class:`Model3D` from one ``_model.star`` per model (two half models, or one) and their maps
    (``rlnReferenceImage``); spectra, FSC, noise, class table and general values as written by
    :func:`cryopipe.engine.relion_files.write_model_star_3d` (or RELION)."""
    files = [read_model_star(p) for p in model_paths]
    g = files[0].general
    path0 = model_paths[0]
    if int(g.get("rlnReferenceDimensionality", 3)) != 3:
        raise InputFileError(path0, "is not a 3D model (rlnReferenceDimensionality != 3)",
                             "continue a 2D classification with class2d")
    n = int(g["rlnOriginalImageSize"])
    if n != ps.n:
        raise InputFileError(path0, f"rlnOriginalImageSize {n} differs from the particle box {ps.n}",
                             "continue with the same particles")
    K = files[0].n_classes
    for p, f in zip(model_paths, files):
        if f.n_classes != K:
            raise InputFileError(p, f"{f.n_classes} classes but {path0} has {K}", "give the half models of one run")
        if f.sigma2_noise.shape[0] != ps.n_optics_groups:
            raise InputFileError(p, f"{f.sigma2_noise.shape[0]} optics groups but the particles have "
                                    f"{ps.n_optics_groups}", "continue with the same particles")
    vols = []
    for p, f in zip(model_paths, files):
        row = []
        for nm in f.classes["rlnReferenceImage"].astype(str):  # K maps
            arr, _ = read_mrc(resolve_relion_path(nm, *bases, p.resolve().parent))
            if arr.shape != (n, n, n):
                raise InputFileError(nm, f"map shape {arr.shape} differs from the model's box {n}",
                                     "continue from an unmodified run")
            row.append(np.ascontiguousarray(arr, dtype=np.float32))
        vols.append(np.stack(row))
    apix = float(g["rlnPixelSize"])
    c = files[0].classes
    col = lambda name, fill: torch.as_tensor(  # noqa: E731
        np.array(c[name].to_numpy(float)) if name in c.columns else np.full(K, fill), dtype=torch.float64)
    stack = lambda attr: torch.as_tensor(np.stack([getattr(f, attr) for f in files]),  # noqa: E731
                                         dtype=torch.float64)
    ngroups = int(ps.n_groups)
    scale = np.ones(ngroups)
    gt = files[0].groups
    if gt is not None and "rlnGroupScaleCorrection" in gt.columns and len(gt) == ngroups:
        scale = np.array(gt["rlnGroupScaleCorrection"].to_numpy(float))
    res_A = float(g.get("rlnCurrentResolution", 0.0))
    fsc = files[0].fsc if files[0].fsc is not None else np.zeros((K, n // 2 + 1))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return Model3D(
        vols=torch.as_tensor(np.stack(vols)), pixel_size=apix, symmetry=symmetry,
        pdf_class=col("rlnClassDistribution", 1.0 / K),
        sigma2_offset=(float(g.get("rlnSigmaOffsetsAngst", 0.0)) / apix) ** 2,
        sigma2_noise=torch.as_tensor(files[0].sigma2_noise, dtype=torch.float64, device=dev),
        tau2_fudge=float(g.get("rlnTau2FudgeFactor", 1.0)) if tau2_fudge is None else float(tau2_fudge),
        tau2=stack("tau2"), sigma2_ref=stack("sigma2_ref"), data_vs_prior=stack("ssnr"),
        fourier_coverage=stack("fourier_coverage"), fsc=torch.as_tensor(fsc, dtype=torch.float64),
        acc_rot=col("rlnAccuracyRotations", 999.0), acc_trans=col("rlnAccuracyTranslationsAngst", 999.0),
        estimated_resolution=col("rlnEstimatedResolution", 0.0),
        total_fourier_coverage=col("rlnOverallFourierCompleteness", 0.0),
        current_resolution=1.0 / res_A if 0 < res_A < 999.0 else 0.0,
        current_size=int(g.get("rlnCurrentImageSize", n)),
        avg_norm_correction=float(g.get("rlnNormCorrectionAverage", 1.0)),
        scale_correction=torch.as_tensor(scale, dtype=torch.float64, device=dev),
        group_counts=torch.as_tensor(np.bincount(ps.group, minlength=ngroups), dtype=torch.float64),
        LL=float(g.get("rlnLogLikelihood", 0.0)), ave_pmax=float(g.get("rlnAveragePmax", 0.0)),
        padding_factor=int(round(float(g.get("rlnPaddingFactor", 2)))))


# ------------------------------------------------------------------------------------------------ optimiser.star

def optimiser_values_3d(opt: Optimiser3D, prefix_rel: str, files: dict[str, str], n_iter: int, *,
                        solvent_mask: str = "None", input_set: str = "None", extra: dict | None = None) -> dict:
    """``data_optimiser_general`` of a 3D run: RELION's labels, plus ``cryopipe*`` entries for state RELION does
    not store (RELION ignores unknown labels) so that ``--continue`` restores the auto-sampling exactly."""
    s, m, smp = opt.s, opt.model, opt.sampling
    active = m.pdf_class.cpu() > 0
    vals = {
        "rlnOutputRootName": prefix_rel,
        "rlnModelStarFile": files["model"],
    }
    if "model2" in files:
        vals["rlnModelStarFile2"] = files["model2"]
    vals.update({
        "rlnExperimentalDataStarFile": files["data"],
        "rlnOrientSamplingStarFile": files["sampling"],
        "rlnCurrentIteration": int(opt.iteration),
        "rlnNumberOfIterations": int(n_iter),
        "rlnDoSplitRandomHalves": int(s.split_halves),
        "rlnJoinHalvesUntilThisResolution": float(s.low_resol_join_halves) if s.split_halves else -1.0,
        "rlnAdaptiveOversampleOrder": int(s.oversampling),
        "rlnAdaptiveOversampleFraction": float(s.adaptive_fraction),
        "rlnRandomSeed": int(s.random_seed),
        "rlnParticleDiameter": float(opt.particle_diameter),
        "rlnWidthMaskEdge": int(round(s.width_mask_edge)),
        "rlnDoZeroMask": int(s.zero_mask),
        "rlnDoSolventFlattening": int(s.flatten_solvent),
        "rlnDoSolventFscCorrection": int(s.solvent_correct_fsc),
        "rlnSolventMaskName": solvent_mask,
        "rlnSolventMask2Name": "None",
        "rlnTauSpectrumName": "None",
        "rlnMaximumCoarseImageSize": -1,
        "rlnHighresLimitExpectation": -1.0,
        "rlnIncrementImageSize": int(s.incr_size),
        "rlnDoMapEstimation": 1,
        "rlnDoGradientRefine": int(s.grad),
        "rlnTau2FudgeArg": float(s.tau2_fudge),
        "rlnMaximumSignificantPoses": int(s.max_significant),
        "rlnDoAutoRefine": int(s.auto_refine and not s.grad),
        "rlnAutoLocalSearchesHealpixOrder": int(s.auto_local_healpix_order),
        "rlnNumberOfIterWithoutResolutionGain": int(smp.nr_iter_wo_resol_gain),
        "rlnBestResolutionThusFar": float(smp.best_resolution),
        "rlnNumberOfIterWithoutChangingAssignments": int(smp.nr_iter_wo_large_changes),
        "rlnOverallAccuracyRotations": float(m.acc_rot[active].min()) if active.any() else 999.0,
        "rlnOverallAccuracyTranslationsAngst": float(m.acc_trans[active].min()) if active.any() else 999.0,
        "rlnChangesOptimalOrientations": float(opt.changes["orientations"]),
        "rlnChangesOptimalOffsets": float(opt.changes["offsets"]),
        "rlnChangesOptimalClasses": float(opt.changes["classes"]),
        "rlnSmallestChangesOrientations": float(smp.smallest_changes_orient),
        "rlnSmallestChangesOffsets": float(smp.smallest_changes_offset),
        "rlnSmallestChangesClasses": float(smp.smallest_changes_class),
        "rlnHasConverged": int(smp.has_converged),
        "rlnHasHighFscAtResolLimit": 0,
        "rlnHasLargeSizeIncreaseIterationsAgo": 0,
        "rlnDoCorrectNorm": int(s.do_norm),
        "rlnDoCorrectScale": int(s.do_scale),
        "rlnDoCorrectCtf": int(s.do_ctf),
        "rlnDoIgnoreCtfUntilFirstPeak": int(s.ctf_intact_first_peak),
        "rlnCtfDataArePhaseFlipped": 0,
        "rlnRefsAreCtfCorrected": int(s.do_ctf),
        "rlnPaddingFactor": float(s.pad),
        "rlnSamplingPerturbFactor": float(s.perturb),
        "rlnOffsetRangeX": -1.0,
        "rlnOffsetRangeY": -1.0,
        "rlnOffsetRangeZ": -1.0,
        # cryopipe-only state (RELION keeps these in memory or derives them from its command line)
        "cryopipeHasFineEnoughSampling": int(smp.has_fine_enough),
        "cryopipeFinalIterationDone": int(smp.final_done),
        "cryopipeAutoIgnoreAngles": int(s.auto_ignore_angles),
        "cryopipeAutoResolAngles": int(s.auto_resol_angles),
        "cryopipeNonNegative": int(s.non_negative),
        "cryopipeInputOptimisationSet": input_set,
    })
    if extra:
        vals.update(extra)
    return vals


def stored_settings(vals: dict, settings: Refine3DSettings, sampling_vals: dict) -> dict:
    """Refine3DSettings fields stored in an ``_optimiser.star`` / ``_sampling.star`` (cryopipe's or RELION's;
    missing entries keep the value of ``settings``)."""
    s = settings

    def get(label: str, cast, default):
        v = vals.get(label, None)
        return default if v is None else cast(v)

    b = lambda x: bool(int(x))  # noqa: E731
    apix_free = {
        "particle_diameter": get("rlnParticleDiameter", float, s.particle_diameter),
        "zero_mask": get("rlnDoZeroMask", b, s.zero_mask),
        "flatten_solvent": get("rlnDoSolventFlattening", b, s.flatten_solvent),
        "solvent_correct_fsc": get("rlnDoSolventFscCorrection", b, s.solvent_correct_fsc),
        "oversampling": get("rlnAdaptiveOversampleOrder", int, s.oversampling),
        "adaptive_fraction": get("rlnAdaptiveOversampleFraction", float, s.adaptive_fraction),
        "random_seed": get("rlnRandomSeed", int, s.random_seed),
        "width_mask_edge": get("rlnWidthMaskEdge", float, s.width_mask_edge),
        "incr_size": get("rlnIncrementImageSize", int, s.incr_size),
        "do_norm": get("rlnDoCorrectNorm", b, s.do_norm),
        "do_scale": get("rlnDoCorrectScale", b, s.do_scale),
        "do_ctf": get("rlnDoCorrectCtf", b, s.do_ctf),
        "ctf_intact_first_peak": get("rlnDoIgnoreCtfUntilFirstPeak", b, s.ctf_intact_first_peak),
        "max_significant": get("rlnMaximumSignificantPoses", int, s.max_significant),
        "tau2_fudge": get("rlnTau2FudgeArg", float, s.tau2_fudge),
        "auto_local_healpix_order": get("rlnAutoLocalSearchesHealpixOrder", int, s.auto_local_healpix_order),
        "pad": int(round(get("rlnPaddingFactor", float, s.pad))),
        "perturb": get("rlnSamplingPerturbFactor", float, s.perturb),
        "n_iter": get("rlnNumberOfIterations", int, s.n_iter),
        "auto_ignore_angles": get("cryopipeAutoIgnoreAngles", b, s.auto_ignore_angles),
        "auto_resol_angles": get("cryopipeAutoResolAngles", b, s.auto_resol_angles),
        "non_negative": get("cryopipeNonNegative", b, s.non_negative),
    }
    if float(vals.get("rlnJoinHalvesUntilThisResolution", -1.0)) > 0:
        apix_free["low_resol_join_halves"] = float(vals["rlnJoinHalvesUntilThisResolution"])
    if "rlnSymmetryGroup" in sampling_vals:
        apix_free["symmetry"] = str(sampling_vals["rlnSymmetryGroup"])
    if "rlnHealpixOrderOriginal" in sampling_vals:
        apix_free["healpix_order"] = int(sampling_vals["rlnHealpixOrderOriginal"])
    return apix_free


def sampling_from_files(vals: dict, sampling_vals: dict, model_general: dict, pixel_size: float) -> AutoSampling:
    """The :class:`AutoSampling` state stored by :func:`write_iteration_3d` (offsets Å → pixels; local-search σ
    from the model's orientational prior)."""
    sigma = 0.0
    if int(model_general.get("rlnOrientationalPriorMode", 0)) == 1:
        sigma = float(model_general.get("rlnSigmaPriorRotAngle", 0.0))
    return AutoSampling(
        healpix_order=int(sampling_vals["rlnHealpixOrder"]),
        offset_range=float(sampling_vals["rlnOffsetRange"]) / pixel_size,
        offset_step=float(sampling_vals["rlnOffsetStep"]) / pixel_size,
        sigma_ang=sigma,
        perturbation=float(sampling_vals.get("rlnSamplingPerturbInstance", 0.0)),
        nr_iter_wo_resol_gain=int(vals.get("rlnNumberOfIterWithoutResolutionGain", 0)),
        nr_iter_wo_large_changes=int(vals.get("rlnNumberOfIterWithoutChangingAssignments", 0)),
        best_resolution=float(vals.get("rlnBestResolutionThusFar", 0.0)),
        smallest_changes_orient=float(vals.get("rlnSmallestChangesOrientations", 999.0)),
        smallest_changes_offset=float(vals.get("rlnSmallestChangesOffsets", 999.0)),
        smallest_changes_class=float(vals.get("rlnSmallestChangesClasses", 9999999.0)),
        has_fine_enough=bool(int(vals.get("cryopipeHasFineEnoughSampling", 0))),
        has_converged=bool(int(vals.get("rlnHasConverged", 0))),
        final_done=bool(int(vals.get("cryopipeFinalIterationDone", 0))),
    )


# ------------------------------------------------------------------------------------------------ writing

def write_iteration_3d(opt: Optimiser3D, data: ParticleData, out_dir: Path, prefix: str, root: Path, n_iter: int,
                       command: str, original: tuple[int, float, float], *, final: bool = False,
                       solvent_mask: str = "None", input_set: str = "None", extra: dict | None = None,
                       write_data=None) -> dict[str, Path]:
    """Write one iteration's files (each atomically; the optimiser.star last, so that it only ever names
    complete files). With half-sets: ``_half{1,2}_model.star`` and ``_half{1,2}_classKKK.mrc``; without (initial
    model): ``_model.star`` and ``_classKKK.mrc``. ``final``: RELION's end-of-refinement files without the
    iteration number (joined map, unfiltered half maps, joined model). Returns the paths by kind
    (``data``, ``model``, ``model2``, ``sampling``, ``optimiser``, ``maps``, and for ``final`` ``map``,
    ``model_joined``, ``half_maps``). ``write_data(path)``: writes the ``_data.star`` instead of the
    single-particle table (tomographic particles)."""
    m, apix = opt.model, opt.p.pixel_size
    K = m.n_classes
    base = out_dir / (prefix if final else f"{prefix}_it{opt.iteration:03d}")
    paths: dict = {k: Path(f"{base}_{k}.star") for k in ("data", "sampling", "optimiser")}
    sigma_ang = float(opt.sampling.sigma_ang)
    vols = m.vols.detach().cpu().numpy().astype(np.float32)
    maps: list[Path] = []
    # orientation distribution over the sampling's directions (model.star pdf_orient, sampling.star directions)
    st = opt.state
    d_rot, d_tilt, d_idx = nearest_directions(st.angles, int(opt.sampling.healpix_order),
                                              m.symmetry if not opt.s.grad else "C1")

    def pdf_of(sel):
        return direction_histogram(d_idx[torch.as_tensor(sel)], st.klass[sel], K, d_rot.numel())

    pdf_all = pdf_of(np.ones(len(st.klass), dtype=bool))
    if opt.s.split_halves:
        for h in range(2):
            names = []
            for k in range(K):
                if final:
                    mp = Path(f"{base}_half{h + 1}_class{k + 1:03d}_unfil.mrc")
                    half = opt.last_halves[h] if opt.last_halves is not None else m.vols[h]
                    half = half.detach().cpu()
                    write_mrc(mp, (half[k] if half.dim() == 4 else half).numpy().astype(np.float32), apix)
                else:
                    mp = Path(f"{base}_half{h + 1}_class{k + 1:03d}.mrc")
                    write_mrc(mp, vols[h, k], apix)
                maps.append(mp)
                names.append(_rel(mp, root))
            mpath = Path(f"{base}_half{h + 1}_model.star")
            write_model_star_3d(mpath, m, h, names, sigma_ang=sigma_ang, pdf_orient=pdf_of(st.subset == h + 1))
            paths["model" if h == 0 else "model2"] = mpath
        if final:
            paths["half_maps"] = [maps[0], maps[K]]
            joined = []
            for k in range(K):
                mp = Path(f"{base}_class{k + 1:03d}.mrc")
                write_mrc(mp, vols[0, k], apix)
                joined.append(mp)
            paths["map"] = joined[0]
            paths["model_joined"] = Path(f"{base}_model.star")
            write_model_star_3d(paths["model_joined"], m, 0, [_rel(p, root) for p in joined], sigma_ang=sigma_ang,
                                pdf_orient=pdf_all)
    else:
        names = []
        for k in range(K):
            mp = Path(f"{base}_class{k + 1:03d}.mrc")
            write_mrc(mp, vols[0, k], apix)
            maps.append(mp)
            names.append(_rel(mp, root))
        paths["model"] = Path(f"{base}_model.star")
        write_model_star_3d(paths["model"], m, 0, names, sigma_ang=sigma_ang, pdf_orient=pdf_all)
    paths["maps"] = maps
    if write_data is not None:  # tomographic particles: their own layout (cryopipe.tomo.subtomo_set)
        write_data(paths["data"])
    else:
        write_particles(paths["data"], data_table_3d(data, opt), star_version=50001)
    write_sampling_star_3d(paths["sampling"], opt.sampling, apix, m.symmetry, original, opt.s.perturb,
                           directions=(d_rot, d_tilt))
    rel = {k: _rel(v, root) for k, v in paths.items() if isinstance(v, Path)}
    write_optimiser_star(paths["optimiser"],
                         optimiser_values_3d(opt, _rel(out_dir / prefix, root), rel, n_iter,
                                             solvent_mask=solvent_mask, input_set=input_set, extra=extra),
                         command)
    return paths

# ------------------------------------------------------------------------------------------------ continue

CHANGE_LABELS = (("orientations", "rlnChangesOptimalOrientations"), ("offsets", "rlnChangesOptimalOffsets"),
                 ("classes", "rlnChangesOptimalClasses"))


def continue_inputs(continue_from: str | os.PathLike) -> tuple[dict, list[Path], Path, list[Path], dict, Path]:
    """Files of a run to continue: ``(optimiser values, bases, data.star, model.star paths, sampling values,
    sampling path)``; names are looked up from the current directory, then the project/job folder."""
    opt_path = Path(continue_from)
    if not opt_path.is_file():
        raise InputFileError(opt_path, "not found", "give a <prefix>_itNNN_optimiser.star of the run to continue")
    vals = read_optimiser_star(opt_path)
    here = opt_path.resolve().parent
    bases = [here.parent.parent, here.parent, here]
    for need in ("rlnExperimentalDataStarFile", "rlnModelStarFile", "rlnOrientSamplingStarFile"):
        if need not in vals:
            raise InputFileError(opt_path, f"no {need} entry", "give a relion_refine _optimiser.star")
    data_path = resolve_relion_path(str(vals["rlnExperimentalDataStarFile"]), *bases)
    models = [resolve_relion_path(str(vals["rlnModelStarFile"]), *bases)]
    if "rlnModelStarFile2" in vals and str(vals["rlnModelStarFile2"]) not in ("", "None"):
        models.append(resolve_relion_path(str(vals["rlnModelStarFile2"]), *bases))
    samp_path = resolve_relion_path(str(vals["rlnOrientSamplingStarFile"]), *bases)
    return vals, bases, data_path, models, read_sampling_star(samp_path), samp_path


def restore_changes(opt: Optimiser3D, vals: dict) -> None:
    """The last iteration's changes of orientations, offsets and classes (``rlnChangesOptimal*``) into
    ``opt.changes`` (the convergence test of the continued run needs them)."""
    for key, lab in CHANGE_LABELS:
        if lab in vals:
            opt.changes[key] = float(vals[lab])


def original_sampling(sv: dict, sampling: AutoSampling, pixel_size: float) -> tuple[int, float, float]:
    """``(HEALPix order, offset range, offset step)`` the run started with (pixels), from the ``_sampling.star``
    values ``sv`` (``rln*Original``, Å), else the current ``sampling``."""
    return (int(sv.get("rlnHealpixOrderOriginal", sampling.healpix_order)),
            float(sv.get("rlnOffsetRangeOriginal", sampling.offset_range * pixel_size)) / pixel_size,
            float(sv.get("rlnOffsetStepOriginal", sampling.offset_step * pixel_size)) / pixel_size)


def continued_settings(vals: dict, sv: dict, settings: Refine3DSettings, overrides: dict, model_general: dict,
                       forced: dict) -> Refine3DSettings:
    """The settings of a continued run: ``settings``, then the stored ones (:func:`stored_settings`) except those
    in ``overrides``, then ``overrides``; the number of classes from the model (``rlnNrClasses``); ``forced``
    fields last."""
    kw = {f.name: getattr(settings, f.name) for f in fields(Refine3DSettings)}
    kw.update({k: v for k, v in stored_settings(vals, settings, sv).items() if k not in overrides})
    kw.update({k: v for k, v in overrides.items() if k in kw})
    kw["n_classes"] = int(model_general.get("rlnNrClasses", 1))
    return Refine3DSettings(**{**kw, **forced})
