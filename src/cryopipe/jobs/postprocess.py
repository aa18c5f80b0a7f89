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
import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.postprocess import PostprocessResult, postprocess_maps
from cryopipe.core.postprocess_files import (
    fsc_table,
    general_block,
    guinier_table,
    load_inputs,
    other_half_name,
    read_mtf,
    write_fsc_dat,
    write_fsc_xml,
)
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import write_mrc
from cryopipe.io.star import write_star
from cryopipe.plots.postprocess import plot_postprocess

HELP = "FSC-based resolution, solvent correction and B-factor sharpening of half maps (like relion_postprocess)"


# ------------------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------------------


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
