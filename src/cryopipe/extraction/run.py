"""Running a planned extraction (:mod:`cryopipe.extraction.plan`): one micrograph at a time (memory: one
micrograph plus one batch of particles; the per-micrograph step is :mod:`cryopipe.extraction.extract_step`, in this
process or on Dask workers), one stack and ``_extract.star`` per micrograph, then ``particles.star`` (RELION 3.1
layout) with the micrographs' CTF and every column of the coordinate files; ``--continue`` keeps the micrographs
already done."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.device import resolve_device
from cryopipe.engine.backend import InProcess, split_chunks
from cryopipe.errors import CryopipeError
from cryopipe.extraction.extract import output_pixel_size
from cryopipe.extraction.extract_step import (
    ExtractedMicrograph,
    ExtractInputs,
    extract_micrographs,
    micrograph_output_root,
)
from cryopipe.extraction.plan import ExtractOptions, ExtractPlan, _first_loop_with, _resolve, plan_extraction

__all__ = ["run_extraction", "extract"]


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
                   progress_bar: bool | None = None, backend=None) -> tuple[Path, int]:
    """Extract every micrograph of ``plan`` into ``output_dir`` and write the joined particles STAR.

    Args:
        plan: from :func:`plan_extraction`.
        output_dir: job folder (absolute or relative to the current directory; it should lie inside the project
            directory ``plan.root`` so that image names can be written relative to it).
        part_star: output particles STAR (default ``output_dir/particles.star``).
        continue_: keep micrographs whose stack and ``_extract.star`` already exist.
        device: torch device (default: CUDA if available).
        progress_bar: terminal progress bar (default: when stderr is a terminal).
        backend: where the micrographs are extracted (:func:`cryopipe.engine.backend.make_backend`; default in
            this process): chunks of micrographs go to :func:`cryopipe.extraction.extract_step.extract_micrographs`,
            which writes their stacks; the ``_extract.star`` files and ``particles.star`` are written here.

    Returns:
        ``(path of particles.star, number of particles)``.
    """
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
    log(f"extracting from {len(plan.tasks)} micrographs: box {opt.extract_size} px"
        + (f", rescaled to {opt.scale}" if opt.scale else "") + (f", window {opt.window}" if opt.window else "")
        + (f", normalised (bg radius {bg_radius} px)" if opt.norm else "")
        + (", contrast inverted" if opt.invert_contrast else "") + f", on {dev}")
    inputs = ExtractInputs(plan, out_rel)
    roots = [micrograph_output_root(out_rel, t.name) for t in plan.tasks]
    star_of = [_resolve(plan.root, r + "_extract.star") for r in roots]
    done = [continue_ and star_of[k].exists() and _resolve(plan.root, roots[k] + ".mrcs").exists()
            for k in range(len(roots))]
    n_skipped = int(sum(done))
    todo = [k for k in range(len(plan.tasks)) if not done[k]]
    be = backend if backend is not None else InProcess()

    def write_tables(results: list[ExtractedMicrograph]) -> None:
        for r in results:  # in micrograph order
            if r.table is None:
                warn(f"no particles on micrograph {plan.tasks[r.task].name}: skipped")
            else:
                write_star(star_of[r.task], {"images": r.table})
                written[r.task] = True

    written = list(done)
    if be.distributed and todo:
        chunks = split_chunks(np.asarray(todo), be.n_chunks(len(todo)), 1)
        write_tables([r for part in be.map(extract_micrographs, inputs, None, [c.tolist() for c in chunks])
                      for r in part])
    else:
        for k in progress(todo, desc="extracting", bar=progress_bar):
            write_tables(extract_micrographs(inputs, None, [k], device=dev))
    star_files = [star_of[k] for k in range(len(plan.tasks)) if written[k]]
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
