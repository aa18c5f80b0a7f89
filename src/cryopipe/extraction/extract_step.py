"""The unit of work of ``cryopipe extract`` as a pure per-chunk step (issue 15 item 3).

:func:`extract_micrographs` extracts the particles of a list of micrographs (one micrograph in memory at a time),
writes each micrograph's stack atomically at its final path and returns its particle table (``_extract.star``
rows: coordinates, carried-over columns, rlnImageName, rlnMicrographName, the micrograph's CTF). It runs in this
process or on Dask workers (:mod:`cryopipe.engine.backend`); the main process writes the ``_extract.star`` files
and ``particles.star`` in micrograph order (:func:`cryopipe.extraction.run.run_extraction`). The dust-replacement
noise is seeded by (``--seed``, micrograph row), so results do not depend on where a micrograph was extracted.

Units: pixels of the micrograph (coordinates), Å (pixel sizes, origins).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.extraction.extract import (
    extract_particles,
    flush_float16_subnormals,
    output_pixel_size,
    reextract_geometry,
)
from cryopipe.extraction.plan import (
    _CTF_DEFAULTS,
    _CTF_FROM_MIC,
    ExtractPlan,
    MicrographTask,
    _read_coordinates,
    _resolve,
    output_root,
)

__all__ = ["ExtractInputs", "ExtractedMicrograph", "extract_micrographs", "micrograph_output_root"]


@dataclass
class ExtractInputs:
    """What every chunk needs (sent once per run): the plan and where the outputs go.

    Attributes:
        plan: from :func:`cryopipe.extraction.plan.plan_extraction` (micrographs, coordinates, options).
        out_rel: the output folder as written in the STAR files (relative to ``plan.root`` when inside it).
    """

    plan: ExtractPlan
    out_rel: str


@dataclass
class ExtractedMicrograph:
    """One micrograph's result: its task index, its ``_extract.star`` rows (None: no particles, nothing written)."""

    task: int
    table: pd.DataFrame | None


def micrograph_output_root(out_rel: str, mic_name: str) -> str:
    """``<out_rel>/<micrograph path without Type/jobNNN/ and extension>``: the stack is ``+ ".mrcs"``, the
    per-micrograph STAR ``+ "_extract.star"`` (relative to the project root when ``out_rel`` is)."""
    return f"{out_rel.rstrip('/')}/{output_root(mic_name)}"


def _coordinates_for(plan: ExtractPlan, task: MicrographTask) -> pd.DataFrame:
    """The particle table of one micrograph (coordinates + carried-over columns), after FOM threshold, bias and
    re-extraction geometry."""
    opt = plan.options
    if task.particles is None:
        df = _read_coordinates(_resolve(plan.root, task.coord_file))
    else:
        df = task.particles.reset_index(drop=True).copy()
    if opt.minimum_pick_fom is not None and len(df):
        if "rlnAutopickFigureOfMerit" not in df.columns:
            src = task.coord_file or "the re-extraction STAR file"
            raise CryopipeError(f"{src}: --minimum_pick_fom needs rlnAutopickFigureOfMerit "
                                "(leave out the threshold for these coordinates)")
        df = df[df["rlnAutopickFigureOfMerit"].astype(float) > opt.minimum_pick_fom].reset_index(drop=True)
    if len(df) and (opt.extract_bias[0] or opt.extract_bias[1]):
        df["rlnCoordinateX"] = df["rlnCoordinateX"].astype(float) + opt.extract_bias[0]
        df["rlnCoordinateY"] = df["rlnCoordinateY"].astype(float) + opt.extract_bias[1]
    if task.particles is not None and len(df):
        has_o = {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(df.columns)
        po = plan.part_optics
        p_apix_lut = dict(zip(po["rlnOpticsGroup"].astype(int), po["rlnImagePixelSize"].astype(float))) \
            if po is not None and "rlnImagePixelSize" in po.columns else {}
        mic_apix = float(plan.mics["_apix"].iloc[task.row])
        p_apix = df["rlnOpticsGroup"].astype(int).map(lambda g: p_apix_lut.get(g, mic_apix)).to_numpy(np.float64)
        ang = None
        if {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(df.columns):
            ang = torch.tensor(df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64))
        coords, origins = reextract_geometry(
            torch.tensor(df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(np.float64)),
            torch.tensor(df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64)) if has_o else None,
            torch.tensor(p_apix), torch.full((len(df),), mic_apix), angles_deg=ang, recenter=opt.recenter,
            recenter_xyz=opt.recenter_xyz, ref_pixel_size=opt.ref_angpix, reset_offsets=opt.reset_offsets)
        df["rlnCoordinateX"] = coords[:, 0].numpy()
        df["rlnCoordinateY"] = coords[:, 1].numpy()
        if origins is not None:
            df["rlnOriginXAngst"] = origins[:, 0].numpy()
            df["rlnOriginYAngst"] = origins[:, 1].numpy()
    return df


def _add_micrograph_columns(plan: ExtractPlan, task: MicrographTask, df: pd.DataFrame, image_names: list[str]
                            ) -> pd.DataFrame:
    """rlnImageName, rlnMicrographName, rlnOpticsGroup and the micrograph's CTF (RELION's column order)."""
    mic = plan.mics.iloc[task.row]
    out = df.copy()
    out["rlnImageName"] = image_names
    out["rlnMicrographName"] = task.name
    if "rlnOpticsGroup" not in out.columns:
        out["rlnOpticsGroup"] = int(mic["rlnOpticsGroup"])
    mic_has_ctf = "rlnDefocusU" in plan.mics.columns
    in_has_ctf = "rlnDefocusU" in df.columns
    keep = plan.options.keep_ctfs_micrographs
    if mic_has_ctf and (not in_has_ctf or keep):
        for col in ("rlnCtfMaxResolution", "rlnCtfFigureOfMerit"):
            if col in plan.mics.columns:
                out[col] = float(mic[col])
        for col in _CTF_FROM_MIC:
            out[col] = float(mic[col]) if col in plan.mics.columns else 0.0
        for col, default in _CTF_DEFAULTS:
            out[col] = float(mic[col]) if col in plan.mics.columns else default
    if mic_has_ctf:
        for col in ("rlnBeamTiltX", "rlnBeamTiltY"):
            if col in plan.mics.columns and (col not in df.columns or keep):
                out[col] = float(mic[col])
    return out


def _read_micrograph(path: Path, device: torch.device) -> torch.Tensor:
    from cryopipe.io.mrc import mrc_info, read_mrc

    data, _ = read_mrc(path, finite=True)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise InputFileError(path, f"is not a 2D micrograph (shape {data.shape})", "give summed 2D micrographs")
    mic = torch.from_numpy(data).to(device)
    if mrc_info(path).mode == 12:  # RELION reads float16 subnormals as 0
        mic = flush_float16_subnormals(mic)
    return mic




def extract_micrographs(inputs: ExtractInputs, snapshot, tasks: list[int], device=None) -> list[ExtractedMicrograph]:
    """Extract the micrographs ``plan.tasks[t]`` for ``t`` in ``tasks`` on ``device`` (default CPU), writing each
    stack (atomically) at its final path; ``snapshot`` is unused. Returns one :class:`ExtractedMicrograph` per
    task, in order."""
    from cryopipe.io.mrc import MrcStackWriter, format_image_name

    plan, opt = inputs.plan, inputs.plan.options
    dev = torch.device(device) if device is not None else torch.device("cpu")
    bg_radius = opt.effective_bg_radius() if opt.norm else -1
    dtype = np.float16 if opt.float16 else np.float32
    gen = torch.Generator(device=dev)
    out = []
    for t in tasks:
        task = plan.tasks[int(t)]
        df = _coordinates_for(plan, task)
        if len(df) == 0:
            out.append(ExtractedMicrograph(int(t), None))
            continue
        stack_rel = micrograph_output_root(inputs.out_rel, task.name) + ".mrcs"
        stack_path = _resolve(plan.root, stack_rel)
        stack_path.parent.mkdir(parents=True, exist_ok=True)
        mic = _read_micrograph(_resolve(plan.root, task.name), dev)
        coords = torch.tensor(df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(np.float64), device=dev)
        gen.manual_seed(int(opt.seed) * 1_000_003 + task.row)
        apix = output_pixel_size(float(plan.mics["_apix"].iloc[task.row]), opt.extract_size, opt.scale)
        with MrcStackWriter(stack_path, len(df), (opt.out_size, opt.out_size), apix, dtype=dtype) as w:
            for i0 in range(0, len(df), opt.batch_size):
                i1 = min(len(df), i0 + opt.batch_size)
                imgs = extract_particles(
                    mic, coords[i0:i1], opt.extract_size, name=task.name, scale=opt.scale, window=opt.window,
                    norm=opt.norm, bg_radius=bg_radius, white_dust=opt.white_dust, black_dust=opt.black_dust,
                    ramp=opt.ramp, invert=opt.invert_contrast, generator=gen)
                w[i0:i1] = imgs.to(torch.float32).cpu().numpy()
        del mic
        table = _add_micrograph_columns(plan, task, df, format_image_name(np.arange(len(df)), stack_rel))
        out.append(ExtractedMicrograph(int(t), table))
    return out
