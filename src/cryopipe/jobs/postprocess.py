"""``cryopipe postprocess``: resolution and sharpening from two half maps (like ``relion_postprocess``).

Masked and phase-randomised FSC, solvent-corrected FSC and final resolution (FSC = 0.143), FSC weighting,
Guinier-plot B-factor (``--auto_bfac``) or ``--adhoc_bfac``, optional MTF correction and low-pass filter: see
:mod:`cryopipe.core.postprocess` (RELION semantics and defaults; with the same ``--random_seed`` the phase
randomisation, hence every number, equals RELION's).

Outputs for the root name ``R`` (``--o``; RELION style ``PostProcess/jobNNN/postprocess``):

* ``R.mrc`` – sharpened map; ``R_masked.mrc`` – the same times the mask (with ``--mask``);
* ``R.star`` – ``data_general`` (rlnFinalResolution, rlnBfactorUsedForSharpening, …), ``data_fsc`` (per shell:
  rlnFourierShellCorrelationCorrected / …ParticleMaskFraction / …UnmaskedMaps / …MaskedMaps /
  rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps) and ``data_guinier`` — RELION's tables and
  columns;
* ``R_fsc.xml`` (EMDB FSC), ``R_fsc.dat``, ``R_fsc.png``, ``R_guinier.png`` and ``logfile.pdf`` (both plots) in
  the output folder.

``--o``: nothing (a new ``PostProcess/jobNNN/`` in the project in the current directory, root ``postprocess``), a
job folder (``PostProcess/jobNNN/``, root ``postprocess``), ``PostProcess/jobNNN/<name>`` (that job, root
``<name>``), or any other root name (files written as named, no job bookkeeping, as ``relion_postprocess``).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.postprocess import PostprocessResult, postprocess_maps
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.atomic import atomic_path
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.star import read_star, write_star

HELP = "FSC-based resolution, solvent correction and B-factor sharpening of half maps (like relion_postprocess)"


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------------------

def _res_table(box: int, apix: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i = np.arange(box // 2 + 1)
    res = np.where(i > 0, box * apix / np.maximum(i, 1), 999.0)
    return i, 1.0 / res, res


def fsc_table(res: PostprocessResult) -> pd.DataFrame:
    """RELION's ``data_fsc`` table."""
    i, inv, ang = _res_table(res.box, res.pixel_size)
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
    _, inv, _ = _res_table(res.box, res.pixel_size)
    lines = ['<fsc title="RELION masked-corrected FSC" xaxis="Resolution (A-1)" yaxis="Correlation Coefficient">']
    for x, y in zip(inv, res.fsc_true.numpy()):
        lines += ["  <coordinate>", f"    <x>{x:.6g}</x>", f"    <y>{y:.6g}</y>", "  </coordinate>"]
    lines.append("</fsc>")
    _write_text(path, "\n".join(lines) + "\n")


def write_fsc_dat(path: Path, res: PostprocessResult) -> None:
    """Two columns: resolution (1/Å) and the corrected FSC."""
    _, inv, _ = _res_table(res.box, res.pixel_size)
    _write_text(path, "".join(f"{x:.6g} {y:.6g}\n" for x, y in zip(inv, res.fsc_true.numpy())))


def _angstrom_axis(ax) -> None:
    """Ticks in Å on top of ``ax`` (whose x axis is in 1/Å), at the bottom axis' tick positions (call after the
    x limits are set)."""
    top = ax.twiny()
    lo, hi = ax.get_xlim()
    top.set_xlim(lo, hi)
    ticks = [t for t in ax.get_xticks() if lo < t <= hi]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1.0 / t:.3g}" for t in ticks], fontsize=8)
    top.set_xlabel("resolution (Å)")


def plot_postprocess(res: PostprocessResult, fsc_png: Path, guinier_png: Path, pdf: Path | None,
                     fit_minres: float, fit_maxres: float) -> None:
    """FSC curves and Guinier plot as PNGs and (optionally) a two-page PDF (bare matplotlib ``Figure`` objects
    rendered by Agg: no pyplot, no backend switch)."""
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    _, inv, _ = _res_table(res.box, res.pixel_size)
    fig1 = Figure(figsize=(7.5, 5))
    ax = fig1.subplots()
    if res.fsc_masked is not None:
        ax.plot(inv, res.fsc_unmasked.numpy(), "g-", lw=1, label="unmasked maps")
        ax.plot(inv, res.fsc_masked.numpy(), "b-", lw=1, label="masked maps")
        ax.plot(inv, res.fsc_random.numpy(), "r-", lw=1, label="phase-randomised masked maps")
        ax.plot(inv, res.fsc_true.numpy(), "k--", lw=2, label="corrected (masked − phase-randomised)", zorder=5)
    else:
        ax.plot(inv, res.fsc_true.numpy(), "k-", lw=2, label="unmasked maps")
    ax.axhline(0.143, color="0.5", ls=":", lw=1)
    ax.text(inv[-1], 0.143, "0.143 ", ha="right", va="bottom", fontsize=8, color="0.4")
    ax.axhline(0.0, color="0.7", lw=0.5)
    nyquist = 2.0 * res.pixel_size
    limited = res.resolution <= nyquist * 1.0001
    ax.axvline(1.0 / res.resolution, color="0.6", ls="--", lw=0.8)
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_title(f"Final resolution = {res.resolution:.2f} Å"
                 + (f" (Nyquist-limited: the FSC stays above 0.143 up to {nyquist:.2f} Å)" if limited else ""),
                 fontsize=10)
    ax.set_xlim(0, inv[-1])
    ax.set_ylim(min(-0.1, float(np.nanmin(res.fsc_true.numpy())) - 0.02), 1.05)
    _angstrom_axis(ax)
    ax.legend(loc="upper right", fontsize=8)
    fig1.tight_layout()

    fig2 = Figure(figsize=(7.5, 5))
    bx = fig2.subplots()
    x = res.guinier_in.x.numpy()

    def curve(g, style, label):
        y = g.y.numpy()
        ok = y > -99
        bx.plot(x[ok], y[ok], style, label=label)

    curve(res.guinier_in, "k-", "original")
    if res.guinier_mtf is not None:
        curve(res.guinier_mtf, "g-", "MTF-corrected")
    curve(res.guinier_weighted, "b-", "FSC-weighted")
    if abs(res.bfactor) > 0:
        curve(res.guinier_sharpened, "r-", f"sharpened (B = {res.bfactor:.1f} Å²)")
    if res.slope != 0 or res.intercept != 0:
        w = res.guinier_weighted.w.numpy() > 0
        if w.any():
            xf = x[w]
            bx.plot(xf, res.slope * xf + res.intercept, "m--",
                    label=f"fit {fit_minres:g}-{fit_maxres:g} Å (r² = {res.fit_correlation:.3f})")
    bx.set_xlabel("resolution² (1/Å²)")
    bx.set_ylabel("ln(amplitudes)")
    bx.set_title("Guinier plot")
    bx.legend(loc="upper right", fontsize=8)
    fig2.tight_layout()
    with atomic_path(fsc_png) as tmp:
        fig1.savefig(tmp, dpi=100, format="png")
    with atomic_path(guinier_png) as tmp:
        fig2.savefig(tmp, dpi=100, format="png")
    if pdf is not None:
        with atomic_path(pdf) as tmp:
            with PdfPages(tmp) as pp:
                pp.savefig(fig1)
                pp.savefig(fig2)


def write_outputs(res: PostprocessResult, root: Path, names: dict[str, str], *, auto_bfac: bool,
                  fsc_weighting: bool, molweight: float, fit_minres: float, fit_maxres: float,
                  logfile: Path | None) -> list[Path]:
    """Write every output of a post-processing run under the root name ``root``; returns the paths written."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    out_map = Path(f"{root}.mrc")
    write_mrc(out_map, res.sharpened.cpu().numpy().astype(np.float32), res.pixel_size)
    written = [out_map]
    if res.masked is not None:
        out_masked = Path(f"{root}_masked.mrc")
        write_mrc(out_masked, res.masked.cpu().numpy().astype(np.float32), res.pixel_size)
        written.append(out_masked)
    blocks = {"general": general_block(res, names, auto_bfac, molweight), "fsc": fsc_table(res),
              "guinier": guinier_table(res, fsc_weighting, abs(res.bfactor) > 0, auto_bfac)}
    star = Path(f"{root}.star")
    write_star(star, blocks, version=50001)
    written.append(star)
    write_fsc_xml(Path(f"{root}_fsc.xml"), res)
    write_fsc_dat(Path(f"{root}_fsc.dat"), res)
    fsc_png, gui_png = Path(f"{root}_fsc.png"), Path(f"{root}_guinier.png")
    plot_postprocess(res, fsc_png, gui_png, logfile, fit_minres, fit_maxres)
    written += [Path(f"{root}_fsc.xml"), Path(f"{root}_fsc.dat"), fsc_png, gui_png]
    if logfile is not None:
        written.append(logfile)
    return written


# ------------------------------------------------------------------------------------------------------------
# Python API
# ------------------------------------------------------------------------------------------------------------

def run_postprocess(half1: str | os.PathLike, half2: str | os.PathLike | None = None, *,
                    mask: str | os.PathLike | None = None, angpix: float | None = None, auto_bfac: bool = False,
                    autob_lowres: float = 10.0, autob_highres: float = 0.0, adhoc_bfac: float = 0.0,
                    randomize_at_fsc: float = 0.8, randomize_at_A: float = -1.0, skip_fsc_weighting: bool = False,
                    low_pass: float = 0.0, filter_edge_width: int = 2, force_mask: bool = False,
                    mtf: str | os.PathLike | None = None, mtf_angpix: float = -1.0, molweight: float = -1.0,
                    random_seed: int = 0, device: str | torch.device | None = None) -> PostprocessResult:
    """Post-process two half-map files (no output written; see :func:`write_outputs`). Options as the CLI."""
    if auto_bfac and abs(adhoc_bfac) > 0:
        raise CryopipeError("give either --auto_bfac or --adhoc_bfac, not both")
    h1, h2, m, apix, _ = load_inputs(half1, half2, mask, angpix)
    mtf_tab = None
    if mtf:
        r, v = read_mtf(mtf)
        mtf_tab = (torch.tensor(r), torch.tensor(v))
    dev = resolve_device(device)
    t1, t2 = torch.from_numpy(h1).to(dev), torch.from_numpy(h2).to(dev)
    tm = torch.from_numpy(m).to(dev) if m is not None else None
    try:
        return postprocess_maps(t1, t2, apix, tm, auto_bfac=auto_bfac, fit_minres=autob_lowres,
                                fit_maxres=autob_highres, adhoc_bfac=adhoc_bfac, randomize_at_fsc=randomize_at_fsc,
                                randomize_at_A=randomize_at_A, fsc_weighting=not skip_fsc_weighting,
                                low_pass=low_pass, filter_edge_width=filter_edge_width, force_mask=force_mask,
                                mtf=mtf_tab, mtf_pixel_size=mtf_angpix if mtf_angpix and mtf_angpix > 0 else apix,
                                molweight_kda=molweight, seed=random_seed)
    except ValueError as exc:
        raise CryopipeError(f"{half1}: {exc}") from None


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="input", required=True, help="half map 1 (e.g. run_half1_class001_unfil.mrc)")
    p.add_argument("--i2", dest="input2", default=None, help="half map 2 (default: --i with half1 -> half2)")
    p.add_argument("--o", dest="output", default=None,
                   help="output root name (PostProcess/jobNNN/postprocess), a job folder, or none: a new job in "
                        "the project in the current directory")
    p.add_argument("--angpix", type=float, default=-1.0, help="pixel size (Å); default: from the half-map header")
    p.add_argument("--mask", default=None, help="solvent mask (1 = protein, 0 = solvent, values in [0, 1])")
    p.add_argument("--force_mask", action="store_true",
                   help="use the mask even when the unmasked FSC extends further than the corrected one")
    p.add_argument("--mtf", default=None,
                   help="STAR file with the detector MTF (rlnResolutionInversePixel, rlnMtfValue)")
    p.add_argument("--mtf_angpix", type=float, default=-1.0, help="detector pixel size (Å); default --angpix")
    p.add_argument("--auto_bfac", action="store_true", help="B-factor from the Guinier plot (Rosenthal & Henderson)")
    p.add_argument("--autob_lowres", type=float, default=10.0, help="lowest resolution (Å) in the B-factor fit")
    p.add_argument("--autob_highres", type=float, default=0.0, help="highest resolution (Å) in the B-factor fit")
    p.add_argument("--adhoc_bfac", type=float, default=0.0, help="B-factor (Å²) to apply, e.g. -400")
    p.add_argument("--skip_fsc_weighting", action="store_true", help="no sqrt(2FSC/(1+FSC)) weighting")
    p.add_argument("--low_pass", type=float, default=0.0,
                   help="low-pass filter (Å) of the final map (0: none, negative: at the final resolution)")
    p.add_argument("--filter_edge_width", type=int, default=2, help="raised-cosine edge of the low-pass (shells)")
    p.add_argument("--randomize_at_fsc", type=float, default=0.8,
                   help="randomise phases from where the unmasked FSC drops below this value")
    p.add_argument("--randomize_at_A", type=float, default=-1.0,
                   help="randomise phases from this resolution (Å) instead (if positive)")
    p.add_argument("--molweight", type=float, default=-1.0, help="ordered molecular weight (kDa) for the part-FSC")
    p.add_argument("--random_seed", type=int, default=0, help="seed of the phase randomisation (negative: random)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _split_output(out_arg: str | None) -> tuple[str | None, str, bool]:
    """(job folder argument for open_job_dir, root file name, use a job folder)."""
    if out_arg is None or str(out_arg).strip() == "":
        return None, "postprocess", True
    s = str(out_arg)
    if s.endswith("/") or Path(s).is_dir():
        return s, "postprocess", True
    parent, name = Path(s).parent, Path(s).name
    if re.fullmatch(r"job\d{3,}", parent.name):
        return str(parent) + "/", name, True
    return None, s, False


def _log_result(res: PostprocessResult, say) -> None:
    for w in res.warnings:
        say(f"WARNING: {w}")
    if res.fsc_masked is not None:
        say(f"phase randomisation from {res.box * res.pixel_size / res.randomize_at:.2f} Å (shell "
            f"{res.randomize_at}); mask covers {100 * 0.476 / res.solvent_fraction:.1f} % of the box "
            f"(rlnParticleBoxFractionSolventMask {res.solvent_fraction:.4f})")
    if res.slope != 0:
        say(f"Guinier fit: slope {res.slope:.4f}, intercept {res.intercept:.4f}, r² {res.fit_correlation:.4f}")
    say(f"B-factor {res.bfactor:.2f} Å²; FINAL RESOLUTION {res.resolution:.4f} Å")


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log, warn
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    opts = dict(mask=args.mask, angpix=args.angpix, auto_bfac=args.auto_bfac, autob_lowres=args.autob_lowres,
                autob_highres=args.autob_highres, adhoc_bfac=args.adhoc_bfac, randomize_at_fsc=args.randomize_at_fsc,
                randomize_at_A=args.randomize_at_A, skip_fsc_weighting=args.skip_fsc_weighting,
                low_pass=args.low_pass, filter_edge_width=args.filter_edge_width, force_mask=args.force_mask,
                mtf=args.mtf, mtf_angpix=args.mtf_angpix, molweight=args.molweight, random_seed=args.random_seed,
                device=args.device)
    half2 = args.input2 or other_half_name(args.input)
    wopts = dict(auto_bfac=args.auto_bfac, fsc_weighting=not args.skip_fsc_weighting, molweight=args.molweight,
                 fit_minres=args.autob_lowres, fit_maxres=args.autob_highres)
    job_arg, root_name, use_job = _split_output(args.output)
    if not use_job:
        res = run_postprocess(args.input, half2, **opts)
        root = Path(root_name)
        names = {"half1": str(args.input), "half2": str(half2), "map": f"{root_name}.mrc",
                 "masked": f"{root_name}_masked.mrc", "mask": str(args.mask or "")}
        write_outputs(res, root, names, logfile=root.parent / "logfile.pdf", **wopts)
        _log_result(res, print)
        return 0
    res = run_postprocess(args.input, half2, **opts)  # inputs checked before any folder is made
    inputs = [(args.input, NodeType.HALFMAP), (args.mask, NodeType.MASK3D)]
    with open_job_dir(job_arg, "PostProcess", ProcessLabel.POSTPROCESS, inputs=inputs, params=vars(args)) as job:
        root = job.path(root_name)
        names = {"half1": job.relpath(os.path.abspath(args.input)), "half2": job.relpath(os.path.abspath(half2)),
                 "map": job.relpath(f"{root}.mrc"), "masked": job.relpath(f"{root}_masked.mrc"),
                 "mask": job.relpath(os.path.abspath(args.mask)) if args.mask else ""}
        logfile = job.path("logfile.pdf")
        write_outputs(res, root, names, logfile=logfile, **wopts)
        job.add_output(f"{root}.mrc", NodeType.POSTPROCESS_MAP)
        if res.masked is not None:
            job.add_output(f"{root}_masked.mrc", NodeType.POSTPROCESS_MASKED_MAP)
        job.add_output(f"{root}.star", NodeType.POSTPROCESS)
        job.add_output(logfile, NodeType.LOGFILE)
        _log_result(res, lambda s: warn(s) if s.startswith("WARNING") else log(s))
    return 0


__all__ = ["HELP", "add_arguments", "main", "run_postprocess", "load_inputs", "write_outputs", "fsc_table",
           "guinier_table", "general_block", "other_half_name", "read_mtf", "plot_postprocess"]
