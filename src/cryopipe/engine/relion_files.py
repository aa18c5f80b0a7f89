"""RELION ``relion_refine`` output files: ``_model.star``, ``_optimiser.star``, ``_sampling.star`` (writers and
readers) of a 2D classification and, with :func:`model_blocks_3d` / :func:`write_sampling_star_3d`, of a 3D run
(auto-refine half models, initial model), matching RELION 5.0.1's tables and labels (``MlModel::write``,
``MlOptimiser::write``, ``HealpixSampling::write``; compare ``fixtures/relion/class2d/run_it005_*.star``).

Units in the files: Å for offsets, resolutions and accuracies (``rlnCurrentResolution`` is written in Å, as
RELION does), 1/Å for ``rlnResolution``, pixels for sizes. Internally (:class:`~cryopipe.engine.classify2d.
Model2D`) offsets are in pixels and the current resolution in 1/Å.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import InputFileError
from cryopipe.io.star import read_star, write_star

__all__ = ["model_blocks", "write_model_star", "read_model_star", "ModelFile", "write_optimiser_star",
           "read_optimiser_star", "write_sampling_star", "read_sampling_star", "resolve_relion_path",
           "model_blocks_3d", "write_model_star_3d", "write_sampling_star_3d"]

STAR_VERSION = 50001


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _angstrom_res(shells: np.ndarray, ori_size: int, apix: float) -> np.ndarray:
    res = shells / (ori_size * apix)
    with np.errstate(divide="ignore"):
        a = np.where(shells > 0, 1.0 / np.where(res > 0, res, 1.0), 999.0)
    return a


def model_blocks(model, reference_stack: str, group_names: list[str] | None = None) -> dict:
    """The blocks of a RELION 2D ``_model.star`` for a :class:`~cryopipe.engine.classify2d.Model2D`;
    ``reference_stack`` is the class-average stack as written in rlnReferenceImage (project-relative)."""
    K, ns, n, apix = model.n_classes, model.n_shells, model.ori_size, model.pixel_size
    G = int(model.sigma2_noise.shape[0])
    groups = model.scale_correction.numel() if model.scale_correction is not None else 1
    res_A = 1.0 / model.current_resolution if model.current_resolution > 0 else 999.0
    general = {
        "rlnReferenceDimensionality": 2,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": n,
        "rlnCurrentResolution": float(res_A),
        "rlnCurrentImageSize": int(model.current_size),
        "rlnPaddingFactor": float(model.padding_factor),
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": float(apix),
        "rlnNrClasses": K,
        "rlnNrBodies": 1,
        "rlnNrGroups": int(groups),
        "rlnNrOpticsGroups": G,
        "rlnTau2FudgeFactor": float(model.tau2_fudge),
        "rlnNormCorrectionAverage": float(model.avg_norm_correction),
        "rlnSigmaOffsetsAngst": float(math.sqrt(max(model.sigma2_offset, 0.0)) * apix),
        "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0,
        "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": float(model.LL),
        "rlnAveragePmax": float(model.ave_pmax),
    }
    prior = _np(model.prior_offset) * apix
    est = _np(model.estimated_resolution).astype(float)
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{k + 1:08d}@{reference_stack}" for k in range(K)],
        "rlnClassDistribution": _np(model.pdf_class).astype(float),
        "rlnAccuracyRotations": _np(model.acc_rot).astype(float),
        "rlnAccuracyTranslationsAngst": _np(model.acc_trans).astype(float),
        "rlnEstimatedResolution": np.where(np.isfinite(est), est, 999.0),
        "rlnOverallFourierCompleteness": _np(model.total_fourier_coverage).astype(float),
        "rlnClassPriorOffsetX": prior[:, 0].astype(float),
        "rlnClassPriorOffsetY": prior[:, 1].astype(float),
    })
    blocks: dict = {"model_general": general, "model_classes": classes}
    shells = np.arange(ns)
    res = shells / (n * apix)
    ares = _angstrom_res(shells, n, apix)
    for k in range(K):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells,
            "rlnResolution": res,
            "rlnAngstromResolution": ares,
            "rlnSsnrMap": _np(model.data_vs_prior[k]).astype(float),
            "rlnGoldStandardFsc": np.zeros(ns),
            "rlnFourierCompleteness": _np(model.fourier_coverage[k]).astype(float),
            "rlnReferenceSigma2": _np(model.sigma2_ref[k]).astype(float),
            "rlnReferenceTau2": _np(model.tau2[k]).astype(float),
            "rlnSpectralOrientabilityContribution": _np(model.orientability[k]).astype(float),
        })
    blocks.update(_group_blocks(model, groups, G, shells, res, group_names))
    return blocks


def write_model_star(path: str | os.PathLike, model, reference_stack: str,
                     group_names: list[str] | None = None) -> None:
    """Write ``path`` (atomically) as RELION's ``_model.star``."""
    write_star(path, model_blocks(model, reference_stack, group_names), version=STAR_VERSION)


def model_blocks_3d(model, half: int, reference_images: list[str], group_names: list[str] | None = None,
                    sigma_ang: float = 0.0, pdf_orient=None) -> dict:
    """The blocks of a RELION 3D ``_model.star`` (``relion_refine`` 3D: auto-refine half models, the joined
    ``run_model.star``, initial model) for model ``half`` (0-based index into the ``[H, K, ...]`` arrays) of a
    :class:`~cryopipe.engine.optimiser3d.Model3D`.

    Args:
        reference_images: per class, the map's name as written in rlnReferenceImage (project-relative ``.mrc``).
        sigma_ang: local-search σ (degrees; > 0 written as RELION's orientational prior, mode 1).
        pdf_orient: ``[K, D]`` orientation distribution over the sampling's HEALPix directions
            (:func:`cryopipe.engine.orientations3d.direction_distribution`), written as
            ``data_model_pdf_orient_class_N`` (rlnOrientationDistribution); None leaves those tables out.
    """
    K, ns, n, apix = model.n_classes, model.n_shells, model.ori_size, model.pixel_size
    G = int(model.sigma2_noise.shape[0])
    groups = model.scale_correction.numel() if model.scale_correction is not None else 1
    res_A = 1.0 / model.current_resolution if model.current_resolution > 0 else 999.0
    general = {
        "rlnReferenceDimensionality": 3,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": n,
        "rlnCurrentResolution": float(res_A),
        "rlnCurrentImageSize": int(model.current_size),
        "rlnPaddingFactor": float(model.padding_factor),
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": float(apix),
        "rlnNrClasses": K,
        "rlnNrBodies": 1,
        "rlnNrGroups": int(groups),
        "rlnNrOpticsGroups": G,
        "rlnTau2FudgeFactor": float(model.tau2_fudge),
        "rlnNormCorrectionAverage": float(model.avg_norm_correction),
        "rlnSigmaOffsetsAngst": float(math.sqrt(max(model.sigma2_offset, 0.0)) * apix),
        "rlnOrientationalPriorMode": 1 if sigma_ang > 0 else 0,
        "rlnSigmaPriorRotAngle": float(max(sigma_ang, 0.0)),
        "rlnSigmaPriorTiltAngle": float(max(sigma_ang, 0.0)),
        "rlnSigmaPriorPsiAngle": float(max(sigma_ang, 0.0)),
        "rlnLogLikelihood": float(model.LL),
        "rlnAveragePmax": float(model.ave_pmax),
    }
    est = _np(model.estimated_resolution).astype(float)
    classes = pd.DataFrame({
        "rlnReferenceImage": list(reference_images),
        "rlnClassDistribution": _np(model.pdf_class).astype(float),
        "rlnAccuracyRotations": _np(model.acc_rot).astype(float),
        "rlnAccuracyTranslationsAngst": _np(model.acc_trans).astype(float),
        "rlnEstimatedResolution": np.where(np.isfinite(est), est, 999.0),
        "rlnOverallFourierCompleteness": _np(model.total_fourier_coverage).astype(float),
    })
    blocks: dict = {"model_general": general, "model_classes": classes}
    shells = np.arange(ns)
    res = shells / (n * apix)
    ares = _angstrom_res(shells, n, apix)
    fsc = _np(model.fsc).astype(float)
    for k in range(K):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells,
            "rlnResolution": res,
            "rlnAngstromResolution": ares,
            "rlnSsnrMap": _np(model.data_vs_prior[half, k]).astype(float),
            "rlnGoldStandardFsc": fsc[k] if fsc.ndim == 2 else np.zeros(ns),
            "rlnFourierCompleteness": _np(model.fourier_coverage[half, k]).astype(float),
            "rlnReferenceSigma2": _np(model.sigma2_ref[half, k]).astype(float),
            "rlnReferenceTau2": _np(model.tau2[half, k]).astype(float),
            "rlnSpectralOrientabilityContribution": np.zeros(ns),
        })
    blocks.update(_group_blocks(model, groups, G, shells, res, group_names))
    if pdf_orient is not None:
        po = _np(pdf_orient).astype(float)
        for k in range(K):
            blocks[f"model_pdf_orient_class_{k + 1}"] = pd.DataFrame({"rlnOrientationDistribution": po[k]})
    return blocks


def write_model_star_3d(path: str | os.PathLike, model, half: int, reference_images: list[str],
                        group_names: list[str] | None = None, sigma_ang: float = 0.0, pdf_orient=None) -> None:
    """Write ``path`` (atomically) as RELION's 3D ``_model.star`` (:func:`model_blocks_3d`)."""
    write_star(path, model_blocks_3d(model, half, reference_images, group_names, sigma_ang, pdf_orient),
               version=STAR_VERSION)


def _group_blocks(model, groups: int, G: int, shells: np.ndarray, res: np.ndarray,
                  group_names: list[str] | None) -> dict:
    counts = _np(model.group_counts) if model.group_counts is not None else np.zeros(groups)
    scale = _np(model.scale_correction) if model.scale_correction is not None else np.ones(groups)
    out = {"model_groups": pd.DataFrame({
        "rlnGroupNumber": np.arange(1, groups + 1),
        "rlnGroupName": group_names if group_names is not None else [""] * groups,
        "rlnGroupNrParticles": counts.astype(np.int64),
        "rlnGroupScaleCorrection": scale.astype(float),
    })}
    s2 = _np(model.sigma2_noise)
    for g in range(G):
        out[f"model_optics_group_{g + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": res, "rlnSigma2Noise": s2[g].astype(float)})
    return out


@dataclass
class ModelFile:
    """What a ``_model.star`` holds (2D): general values, per-class table, spectra (numpy)."""

    general: dict
    classes: pd.DataFrame
    ssnr: np.ndarray  # [K, ns]
    tau2: np.ndarray
    sigma2_ref: np.ndarray
    fourier_coverage: np.ndarray
    orientability: np.ndarray
    sigma2_noise: np.ndarray  # [G, ns]
    groups: pd.DataFrame | None
    fsc: np.ndarray | None = None  # [K, ns] rlnGoldStandardFsc (3D runs), None where a class table lacks it

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _noise_spectra(blocks: dict, path: Path, spectra, optics_groups: int) -> np.ndarray:
    """``[G, ns]`` noise spectra: RELION >= 4 writes one per optics group (``data_model_optics_group_N``); RELION
    3.1 wrote one per group (``data_model_group_N``, usually one per micrograph), which for a single optics group
    are averaged weighted by ``rlnGroupNrParticles`` (RELION 4's per-optics-group estimate is that average)."""
    if "model_optics_group_1" in blocks or "model_group_1" not in blocks:
        return spectra("model_optics_group_", "rlnSigma2Noise", optics_groups)
    groups = blocks.get("model_groups")
    if optics_groups != 1 or groups is None or "rlnGroupNrParticles" not in groups.columns:
        raise InputFileError(path, "RELION 3.1 noise spectra per group (data_model_group_N) cannot be assigned to "
                             f"{optics_groups} optics groups", "continue from a RELION 4/5 or cryopipe _model.star")
    per_group = spectra("model_group_", "rlnSigma2Noise", len(groups))
    counts = groups["rlnGroupNrParticles"].to_numpy(float)
    return (counts @ per_group / max(counts.sum(), 1.0))[None]


def read_model_star(path: str | os.PathLike) -> ModelFile:
    """Read a RELION (or cryopipe) 2D/3D ``_model.star``; raises InputFileError if a required table is missing."""
    path = Path(path)
    b = read_star(path)
    for need in ("model_general", "model_classes"):
        if need not in b:
            raise InputFileError(path, f"no data_{need} table", "give a relion_refine _model.star file")
    gen = b["model_general"]
    classes = b["model_classes"]
    K = len(classes)
    ns = int(gen["rlnOriginalImageSize"]) // 2 + 1

    def spectra(prefix: str, label: str, count: int) -> np.ndarray:
        out = np.zeros((count, ns))
        for i in range(count):
            t = b.get(f"{prefix}{i + 1}")
            if t is None or label not in t.columns:
                raise InputFileError(path, f"no {label} in data_{prefix}{i + 1}", "give a complete _model.star")
            v = t[label].to_numpy(float)
            out[i, :min(ns, v.size)] = v[:ns]
        return out

    G = int(gen.get("rlnNrOpticsGroups", 1))
    return ModelFile(
        general=gen, classes=classes,
        ssnr=spectra("model_class_", "rlnSsnrMap", K),
        tau2=spectra("model_class_", "rlnReferenceTau2", K),
        sigma2_ref=spectra("model_class_", "rlnReferenceSigma2", K),
        fourier_coverage=spectra("model_class_", "rlnFourierCompleteness", K),
        orientability=spectra("model_class_", "rlnSpectralOrientabilityContribution", K)
        if all("rlnSpectralOrientabilityContribution" in b.get(f"model_class_{k + 1}", pd.DataFrame()).columns
               for k in range(K)) else np.zeros((K, ns)),
        sigma2_noise=_noise_spectra(b, path, spectra, G),
        groups=b.get("model_groups"),
        fsc=spectra("model_class_", "rlnGoldStandardFsc", K)
        if all("rlnGoldStandardFsc" in b.get(f"model_class_{k + 1}", pd.DataFrame()).columns
               for k in range(K)) else None,
    )


def write_optimiser_star(path: str | os.PathLike, values: dict, command: str = "") -> None:
    """Write ``_optimiser.star`` (``data_optimiser_general``), preceded by RELION's two comment lines (the second
    one is the command line)."""
    from cryopipe import __version__
    from cryopipe.io.atomic import atomic_path

    with atomic_path(path) as t:
        write_star(t, {"optimiser_general": values}, version=STAR_VERSION)
        body = Path(t).read_text()
        Path(t).write_text(f"# RELION optimiser; version 5.0.1 (cryopipe {__version__})\n# {command}\n" + body)


def read_optimiser_star(path: str | os.PathLike) -> dict:
    """``data_optimiser_general`` of an ``_optimiser.star`` as a dict."""
    path = Path(path)
    b = read_star(path)
    if "optimiser_general" not in b or not isinstance(b["optimiser_general"], dict):
        raise InputFileError(path, "no data_optimiser_general table", "give a relion_refine _optimiser.star file")
    return dict(b["optimiser_general"])


def write_sampling_star(path: str | os.PathLike, sampling, pixel_size: float, original=None,
                        perturbation_factor: float = 0.5) -> None:
    """``_sampling.star`` of a 2D run (translations in Å)."""
    o = original if original is not None else sampling
    vals = {
        "rlnIs3DSampling": 0,
        "rlnIs3DTranslationalSampling": 0,
        "rlnPsiStep": float(sampling.psi_step),
        "rlnOffsetRange": float(sampling.offset_range * pixel_size),
        "rlnOffsetStep": float(sampling.offset_step * pixel_size),
        "rlnHelicalOffsetStep": -1.0,
        "rlnSamplingPerturbInstance": float(sampling.perturbation),
        "rlnSamplingPerturbFactor": float(perturbation_factor),
        "rlnHealpixOrderOriginal": 0,
        "rlnPsiStepOriginal": float(o.psi_step),
        "rlnOffsetRangeOriginal": float(o.offset_range * pixel_size),
        "rlnOffsetStepOriginal": float(o.offset_step * pixel_size),
    }
    write_star(path, {"sampling_general": vals}, version=STAR_VERSION)


def write_sampling_star_3d(path: str | os.PathLike, sampling, pixel_size: float, symmetry: str,
                           original: tuple[int, float, float], perturbation_factor: float = 0.5,
                           directions=None) -> None:
    """``_sampling.star`` of a 3D run (RELION ``HealpixSampling::write``, 3D): HEALPix order, ψ step (= the
    HEALPix step, degrees), offsets in Å, the perturbation; ``sampling`` is an
    :class:`~cryopipe.engine.optimiser3d.AutoSampling` (offsets in pixels), ``original`` = (HEALPix order,
    offset range px, offset step px) at the start of the run. The local-search σ is in the model.star
    (rlnSigmaPriorRotAngle …), as in RELION. ``directions``: ``(rot, tilt)`` degrees of the HEALPix directions
    kept for the symmetry (:func:`cryopipe.engine.orientations3d.direction_distribution`), written as
    ``data_sampling_directions``."""
    from cryopipe.core.healpix import angular_step

    vals = {
        "rlnIs3DSampling": 1,
        "rlnIs3DTranslationalSampling": 0,
        "rlnHealpixOrder": int(sampling.healpix_order),
        "rlnSymmetryGroup": str(symmetry),
        "rlnTiltAngleLimit": -91.0,
        "rlnPsiStep": float(angular_step(int(sampling.healpix_order))),
        "rlnOffsetRange": float(sampling.offset_range * pixel_size),
        "rlnOffsetStep": float(sampling.offset_step * pixel_size),
        "rlnHelicalOffsetStep": -1.0,
        "rlnSamplingPerturbInstance": float(sampling.perturbation),
        "rlnSamplingPerturbFactor": float(perturbation_factor),
        "rlnHealpixOrderOriginal": int(original[0]),
        "rlnPsiStepOriginal": float(angular_step(int(original[0]))),
        "rlnOffsetRangeOriginal": float(original[1] * pixel_size),
        "rlnOffsetStepOriginal": float(original[2] * pixel_size),
    }
    blocks: dict = {"sampling_general": vals}
    if directions is not None:
        blocks["sampling_directions"] = pd.DataFrame({"rlnAngleRot": _np(directions[0]).astype(float),
                                                      "rlnAngleTilt": _np(directions[1]).astype(float)})
    write_star(path, blocks, version=STAR_VERSION)


def read_sampling_star(path: str | os.PathLike) -> dict:
    path = Path(path)
    b = read_star(path)
    if "sampling_general" not in b:
        raise InputFileError(path, "no data_sampling_general table", "give a relion_refine _sampling.star file")
    return dict(b["sampling_general"])


def resolve_relion_path(name: str, *bases: str | os.PathLike) -> Path:
    """A file named in a RELION STAR file: as given if it exists (relative to the current directory, RELION's
    project directory), else relative to each of ``bases`` in turn; raises InputFileError if not found."""
    p = Path(name)
    if p.is_absolute() and p.exists():
        return p
    if p.exists():
        return p
    for b in bases:
        q = Path(b) / p
        if q.exists():
            return q
    raise InputFileError(name, "not found (relative to the current directory or "
                               + ", ".join(str(b) for b in bases) + ")", "run from the project directory")
