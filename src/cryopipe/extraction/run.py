"""Running a planned extraction (:mod:`cryopipe.extraction.plan`): one micrograph at a time (memory: one
micrograph plus one batch of particles), one stack and ``_extract.star`` per micrograph, then ``particles.star``
(RELION 3.1 layout) with the micrographs' CTF and every column of the coordinate files; ``--continue`` keeps the
micrographs already done."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.device import resolve_device
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
    ExtractOptions,
    ExtractPlan,
    MicrographTask,
    _first_loop_with,
    _read_coordinates,
    _resolve,
    output_root,
    plan_extraction,
)

__all__ = ["run_extraction", "extract"]


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


def _output_optics(plan: ExtractPlan) -> pd.DataFrame:
    opt = plan.options
    size = opt.out_size
    if plan.reextract and not opt.keep_ctfs_micrographs:
        optics = plan.part_optics.copy()
        mic_lut = {}
        if "rlnOpticsGroupName" in plan.mic_optics.columns:
            for _, r in plan.mic_optics.iterrows():
                g = int(r["rlnOpticsGroup"])
                apix = plan.mics.loc[plan.mics["rlnOpticsGroup"].astype(int) == g, "_apix"]
                mic_lut[str(r["rlnOpticsGroupName"])] = float(apix.iloc[0]) if len(apix) else None
        apix_out = []
        for _, r in optics.iterrows():
            a = mic_lut.get(str(r.get("rlnOpticsGroupName", "")))
            if a is None:  # this group has no micrographs: use the first micrograph's pixel size
                a = float(plan.mics["_apix"].iloc[0])
            apix_out.append(output_pixel_size(a, opt.extract_size, opt.scale))
    else:
        optics = plan.mic_optics.copy()
        apix_out = []
        for _, r in optics.iterrows():
            g = int(r["rlnOpticsGroup"])
            apix = plan.mics.loc[plan.mics["rlnOpticsGroup"].astype(int) == g, "_apix"]
            a = float(apix.iloc[0]) if len(apix) else float(r.get("rlnMicrographPixelSize", plan.mics["_apix"].iloc[0]))
            apix_out.append(output_pixel_size(a, opt.extract_size, opt.scale))
        optics = optics.drop(columns=[c for c in ("rlnMicrographPixelSize",) if c in optics.columns])
    for col in ("rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"):
        if col in optics.columns:
            optics = optics.drop(columns=col)
    optics["rlnImagePixelSize"] = apix_out
    optics["rlnImageSize"] = size
    optics["rlnImageDimensionality"] = 2
    if "rlnCtfDataAreCtfPremultiplied" not in optics.columns:
        optics["rlnCtfDataAreCtfPremultiplied"] = 0
    return optics.reset_index(drop=True)


def _join_tables(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-micrograph tables; columns missing in some are filled with 0 / "" (as RELION)."""
    if not tables:
        return pd.DataFrame()
    out = pd.concat(tables, ignore_index=True, sort=False)
    for col in out.columns:
        if out[col].isna().any():
            if pd.api.types.is_numeric_dtype(out[col]):
                out[col] = out[col].fillna(0)
            else:
                out[col] = out[col].fillna("")
    return out


def run_extraction(plan: ExtractPlan, output_dir: str | os.PathLike, *, part_star: str | os.PathLike | None = None,
                   continue_: bool = False, device: str | torch.device | None = None,
                   progress_bar: bool | None = None) -> tuple[Path, int]:
    """Extract every micrograph of ``plan`` into ``output_dir`` and write the joined particles STAR.

    Args:
        plan: from :func:`plan_extraction`.
        output_dir: job folder (absolute or relative to the current directory; it should lie inside the project
            directory ``plan.root`` so that image names can be written relative to it).
        part_star: output particles STAR (default ``output_dir/particles.star``).
        continue_: keep micrographs whose stack and ``_extract.star`` already exist.
        device: torch device (default: CUDA if available).
        progress_bar: terminal progress bar (default: when stderr is a terminal).

    Returns:
        ``(path of particles.star, number of particles)``.
    """
    from cryopipe.io.mrc import MrcStackWriter, format_image_name
    from cryopipe.io.particles import ParticleData, write_particles
    from cryopipe.io.star import read_star, write_star
    from cryopipe.pipeline.log import log, progress, warn

    opt = plan.options
    dev = resolve_device(device)
    out_dir = Path(os.path.abspath(output_dir))
    try:
        out_rel = out_dir.relative_to(plan.root).as_posix()
    except ValueError:
        out_rel = out_dir.as_posix()
    part_star = Path(part_star) if part_star is not None else out_dir / "particles.star"
    bg_radius = opt.effective_bg_radius() if opt.norm else -1
    out_size = opt.out_size
    dtype = np.float16 if opt.float16 else np.float32
    gen = torch.Generator(device=dev)
    log(f"extracting from {len(plan.tasks)} micrographs: box {opt.extract_size} px"
        + (f", rescaled to {opt.scale}" if opt.scale else "") + (f", window {opt.window}" if opt.window else "")
        + (f", normalised (bg radius {bg_radius} px)" if opt.norm else "")
        + (", contrast inverted" if opt.invert_contrast else "") + f", on {dev}")
    star_files: list[Path] = []
    n_done = n_skipped = 0
    for task in progress(plan.tasks, desc="extracting", bar=progress_bar):
        root_rel = f"{out_rel.rstrip('/')}/{output_root(task.name)}"
        stack_path = _resolve(plan.root, root_rel + ".mrcs")
        star_path = _resolve(plan.root, root_rel + "_extract.star")
        if continue_ and stack_path.exists() and star_path.exists():
            star_files.append(star_path)
            n_skipped += 1
            continue
        df = _coordinates_for(plan, task)
        if len(df) == 0:
            warn(f"no particles on micrograph {task.name}: skipped")
            continue
        stack_path.parent.mkdir(parents=True, exist_ok=True)
        mic = _read_micrograph(_resolve(plan.root, task.name), dev)
        coords = torch.tensor(df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(np.float64), device=dev)
        gen.manual_seed(int(opt.seed) * 1_000_003 + task.row)
        apix = output_pixel_size(float(plan.mics["_apix"].iloc[task.row]), opt.extract_size, opt.scale)
        with MrcStackWriter(stack_path, len(df), (out_size, out_size), apix, dtype=dtype) as w:
            for i0 in range(0, len(df), opt.batch_size):
                i1 = min(len(df), i0 + opt.batch_size)
                imgs = extract_particles(
                    mic, coords[i0:i1], opt.extract_size, name=task.name, scale=opt.scale, window=opt.window,
                    norm=opt.norm, bg_radius=bg_radius, white_dust=opt.white_dust, black_dust=opt.black_dust,
                    ramp=opt.ramp, invert=opt.invert_contrast, generator=gen)
                w[i0:i1] = imgs.to(torch.float32).cpu().numpy()
        stack_rel = root_rel + ".mrcs"
        table = _add_micrograph_columns(plan, task, df, format_image_name(np.arange(len(df)), stack_rel))
        write_star(star_path, {"images": table})
        star_files.append(star_path)
        n_done += 1
        del mic
    if n_skipped:
        log(f"kept {n_skipped} micrographs extracted before (--continue)")
    if not star_files:
        raise CryopipeError("no particles were extracted (no coordinates on any micrograph, or all below "
                            "--minimum_pick_fom)")
    tables = []
    for sp in star_files:
        blocks = read_star(sp)
        tables.append(_first_loop_with(blocks, "rlnImageName", sp, "per-micrograph _extract.star",
                                       preferred=("images",)))
    particles = _join_tables(tables)
    optics = _output_optics(plan)
    used = set(particles["rlnOpticsGroup"].astype(int))
    if plan.reextract and not opt.keep_ctfs_micrographs:
        optics = optics[optics["rlnOpticsGroup"].astype(int).isin(used)].reset_index(drop=True)
    write_particles(part_star, ParticleData(optics=optics, particles=particles, block_name="particles",
                                            source_version="3.1"), version="3.1")
    log(f"wrote {len(particles)} particles from {len(star_files)} micrographs to {part_star} "
        f"(pixel size {', '.join(f'{a:g}' for a in optics['rlnImagePixelSize'])} Å, box {out_size} px)")
    return part_star, len(particles)


def extract(micrographs_star: str | os.PathLike, output_dir: str | os.PathLike, *, options: ExtractOptions,
            coord_list: str | os.PathLike | None = None, coord_dir: str | os.PathLike | None = None,
            coord_suffix: str | None = None, reextract_data_star: str | os.PathLike | None = None,
            root: str | os.PathLike = ".", continue_: bool = False, device: str | torch.device | None = None,
            set_angpix: float | None = None) -> tuple[Path, int]:
    """Python API: check the inputs, then extract into ``output_dir`` (no pipeline bookkeeping).

    Returns ``(particles.star path, number of particles)``.
    """
    plan = plan_extraction(micrographs_star, options=options, coord_list=coord_list, coord_dir=coord_dir,
                           coord_suffix=coord_suffix, reextract_data_star=reextract_data_star, root=root,
                           set_angpix=set_angpix)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return run_extraction(plan, output_dir, continue_=continue_, device=device, progress_bar=False)
