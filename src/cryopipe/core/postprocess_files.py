"""The postprocess job's files, RELION's: reading the half maps, mask and MTF (checked: same box and pixel
size, finite values), and the ``data_general`` / ``data_fsc`` / ``data_guinier`` tables, EMDB FSC XML and the
``_fsc.dat`` of a :class:`cryopipe.core.postprocess.PostprocessResult`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryopipe.core.postprocess import PostprocessResult
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.atomic import atomic_path
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star

__all__ = ["shell_resolutions", "other_half_name", "read_mtf", "load_inputs", "fsc_table", "guinier_table", "general_block",
           "write_fsc_xml", "write_fsc_dat"]


def other_half_name(half1: str | os.PathLike) -> str:
    """RELION's rule for a missing ``--i2``: the name of ``--i`` with its last ``half1`` replaced by ``half2`` (or
    ``half2`` by ``half1``)."""
    s = str(half1)
    for a, b in (("half1", "half2"), ("half2", "half1")):
        k = s.rfind(a)
        if k >= 0:
            return s[:k] + b + s[k + len(a):]
    raise CryopipeError(f"--i {s}: the name contains neither 'half1' nor 'half2' (give the other half map with --i2)")


def _read_cube(path: str | os.PathLike, what: str) -> tuple[np.ndarray, float]:
    data, apix = read_mrc(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputFileError(path, f"{what} must be a cubic 3D map, got shape {tuple(data.shape)}",
                             "give a cubic map")
    return data, apix


def read_mtf(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Detector MTF from a STAR file: (rlnResolutionInversePixel, rlnMtfValue)."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(p, "file not found", "check the --mtf path")
    blocks = read_star(p)
    for block in blocks.values():
        if isinstance(block, pd.DataFrame) and {"rlnResolutionInversePixel", "rlnMtfValue"} <= set(block.columns):
            res = block["rlnResolutionInversePixel"].to_numpy(dtype=np.float64)
            val = block["rlnMtfValue"].to_numpy(dtype=np.float64)
            if len(res) < 2:
                raise InputFileError(p, "the MTF table has fewer than 2 rows", "give a complete MTF STAR file")
            if (val < 1e-10).any():
                raise InputFileError(p, "zero or negative values in rlnMtfValue", "check the MTF file")
            if not res[-1] > res[0]:
                raise InputFileError(p, "rlnResolutionInversePixel does not increase", "check the MTF file")
            return res, val
    raise InputFileError(p, "no table with rlnResolutionInversePixel and rlnMtfValue", "give a RELION MTF STAR file")


def load_inputs(half1: str | os.PathLike, half2: str | os.PathLike | None, mask: str | os.PathLike | None,
                angpix: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float, str]:
    """Read and check the half maps and mask: (half1, half2, mask or None, pixel size Å, half2 name).

    Raises :class:`CryopipeError` (one line) for different box or pixel sizes, a mask of another size or with
    values outside [0, 1], or a missing pixel size.
    """
    name2 = str(half2) if half2 else other_half_name(half1)
    h1, a1 = _read_cube(half1, "half map 1")
    h2, a2 = _read_cube(name2, "half map 2")
    if h1.shape != h2.shape:
        raise InputFileError(name2, f"has box {h2.shape[-1]} but {half1} has {h1.shape[-1]}",
                             "give two half maps of the same reconstruction")
    if a1 > 0 and a2 > 0 and abs(a1 - a2) > 1e-3 * max(a1, a2):
        raise InputFileError(name2, f"has pixel size {a2:g} Å but {half1} has {a1:g} Å",
                             "give two half maps of the same reconstruction")
    apix = float(angpix) if angpix and angpix > 0 else a1
    if not apix or apix <= 0:
        raise InputFileError(half1, "has no pixel size in its header", "give --angpix")
    for name, half in ((half1, h1), (name2, h2)):
        if not np.isfinite(half).all():
            raise InputFileError(name, f"holds {int((~np.isfinite(half)).sum())} non-finite voxels (NaN/inf)",
                                 "re-run the refinement that made it")
        if not np.any(half):
            raise InputFileError(name, "is all zeros", "give the half maps of a finished refinement")
    if np.array_equal(h1, h2):
        raise InputFileError(name2, f"is identical to {half1}: their FSC would be 1 at every resolution",
                             "give the two independently refined half maps (half1 and half2)")
    m = None
    if mask:
        m, _ = _read_cube(mask, "the mask")
        if m.shape != h1.shape:
            raise InputFileError(mask, f"has box {m.shape[-1]} but the half maps have {h1.shape[-1]}",
                                 "make the mask from a map of the same box size")
        lo, hi = float(m.min()), float(m.max())
        if lo < -1e-6 or hi - 1.0 > 1e-6:
            raise InputFileError(mask, f"values must lie in [0, 1], found min {lo:g} max {hi:g}",
                                 "give a solvent mask (1 = protein, 0 = solvent), e.g. from cryopipe mask-create")
        m = np.clip(m, 0.0, 1.0)
    return h1, h2, m, apix, name2


def shell_resolutions(box: int, apix: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per shell ``i = 0 … box//2``: ``(i, 1/Å, Å)`` as RELION's tables give them (999 Å for shell 0)."""
    i = np.arange(box // 2 + 1)
    res = np.where(i > 0, box * apix / np.maximum(i, 1), 999.0)
    return i, 1.0 / res, res


def fsc_table(res: PostprocessResult) -> pd.DataFrame:
    """RELION's ``data_fsc`` table."""
    i, inv, ang = shell_resolutions(res.box, res.pixel_size)
    cols: dict[str, object] = {"rlnSpectralIndex": i.astype(np.int64), "rlnResolution": inv,
                               "rlnAngstromResolution": ang}
    if res.fsc_masked is not None:
        cols["rlnFourierShellCorrelationCorrected"] = res.fsc_true.numpy()
        cols["rlnFourierShellCorrelationParticleMaskFraction"] = res.fsc_part_mask.numpy()
        if res.fsc_part_molweight is not None:
            cols["rlnFourierShellCorrelationParticleMolWeight"] = res.fsc_part_molweight.numpy()
        cols["rlnFourierShellCorrelationUnmaskedMaps"] = res.fsc_unmasked.numpy()
        cols["rlnFourierShellCorrelationMaskedMaps"] = res.fsc_masked.numpy()
        cols["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"] = res.fsc_random.numpy()
    else:
        cols["rlnFourierShellCorrelationUnmaskedMaps"] = res.fsc_true.numpy()
        if res.fsc_part_molweight is not None:
            cols["rlnFourierShellCorrelationParticleMolWeight"] = res.fsc_part_molweight.numpy()
    return pd.DataFrame(cols)


def guinier_table(res: PostprocessResult, fsc_weighting: bool, sharpened: bool, auto_bfac: bool) -> pd.DataFrame:
    """RELION's ``data_guinier`` table."""
    cols: dict[str, object] = {"rlnResolutionSquared": res.guinier_in.x.numpy(),
                               "rlnLogAmplitudesOriginal": res.guinier_in.y.numpy()}
    if res.guinier_mtf is not None:
        cols["rlnLogAmplitudesMTFCorrected"] = res.guinier_mtf.y.numpy()
    if fsc_weighting:
        cols["rlnLogAmplitudesWeighted"] = res.guinier_weighted.y.numpy()
    if sharpened:
        cols["rlnLogAmplitudesSharpened"] = res.guinier_sharpened.y.numpy()
    if auto_bfac:
        cols["rlnLogAmplitudesIntercept"] = np.full(res.guinier_in.x.numel(), res.intercept)
    return pd.DataFrame(cols)


def general_block(res: PostprocessResult, names: dict[str, str], auto_bfac: bool, molweight: float) -> dict:
    """RELION's ``data_general`` key-value block; ``names``: half1, half2, map, masked, mask (as written)."""
    g: dict[str, object] = {
        "rlnFinalResolution": float(res.resolution),
        "rlnBfactorUsedForSharpening": float(res.bfactor),
        "rlnUnfilteredMapHalf1": names["half1"],
        "rlnUnfilteredMapHalf2": names["half2"],
        "rlnPostprocessedMap": names["map"],
    }
    if molweight > 0:
        g["rlnMolecularWeight"] = float(molweight)
        g["rlnParticleBoxFractionMolecularWeight"] = float(res.molweight_fraction)
    if res.fsc_masked is not None:
        g["rlnParticleBoxFractionSolventMask"] = float(res.solvent_fraction)
        g["rlnMaskName"] = names["mask"]
        g["rlnRandomiseFrom"] = float(res.box * res.pixel_size / res.randomize_at)
        g["rlnPostprocessedMapMasked"] = names["masked"]
    if auto_bfac:
        g["rlnFittedSlopeGuinierPlot"] = float(res.slope)
        g["rlnFittedInterceptGuinierPlot"] = float(res.intercept)
        g["rlnCorrelationFitGuinierPlot"] = float(res.fit_correlation)
    return g


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_fsc_xml(path: Path, res: PostprocessResult) -> None:
    """EMDB FSC XML of the corrected (final) FSC curve."""
    _, inv, _ = shell_resolutions(res.box, res.pixel_size)
    lines = ['<fsc title="RELION masked-corrected FSC" xaxis="Resolution (A-1)" yaxis="Correlation Coefficient">']
    for x, y in zip(inv, res.fsc_true.numpy()):
        lines += ["  <coordinate>", f"    <x>{x:.6g}</x>", f"    <y>{y:.6g}</y>", "  </coordinate>"]
    lines.append("</fsc>")
    _write_text(path, "\n".join(lines) + "\n")


def write_fsc_dat(path: Path, res: PostprocessResult) -> None:
    """Two columns: resolution (1/Å) and the corrected FSC."""
    _, inv, _ = shell_resolutions(res.box, res.pixel_size)
    _write_text(path, "".join(f"{x:.6g} {y:.6g}\n" for x, y in zip(inv, res.fsc_true.numpy())))
