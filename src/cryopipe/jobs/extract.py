"""``cryopipe extract``: particle extraction from micrographs (like ``relion_preprocess --extract``).

For every micrograph of ``--i`` that has coordinates (``--coord_list`` / ``--coord_dir`` + ``--coord_suffix`` /
``--reextract_data_star``), all its particles are windowed at once (box ``--extract_size``, centre at
``(long)rlnCoordinate``), optionally Fourier-rescaled (``--scale``), re-windowed (``--window``), normalised
(``--norm``, background outside ``--bg_radius``), dust-cleaned and contrast-inverted, in RELION's order. Output
layout (as RELION): ``<job>/<micrograph path without the Type/jobNNN/ prefix>.mrcs`` (one stack per micrograph),
a ``_extract.star`` per micrograph, and ``<job>/particles.star`` (RELION 3.1 layout: ``data_optics`` with
rlnImagePixelSize / rlnImageSize / rlnImageDimensionality / rlnCtfDataAreCtfPremultiplied, ``data_particles``
with rlnCoordinateX/Y, rlnImageName ``000001@stack.mrcs``, rlnMicrographName, rlnOpticsGroup, the micrograph's
CTF, and every column of the coordinate file, e.g. autopick FOM / class / psi). Micrographs are processed one at
a time (memory: one micrograph plus one batch of particles). ``--continue`` keeps micrographs whose stack and
``_extract.star`` exist. Names inside STAR files are relative to the project directory (the current directory,
or the project of ``--o Type/jobNNN/``).

Re-extraction (``--reextract_data_star run_data.star``) re-uses refined particles: their coordinates, angles and
CTF; with ``--recenter`` each coordinate moves by the rounded refined origin (centre = coordinate − origin),
optionally first re-centred on ``--recenter_x/y/z`` (pixels of the reference), and the sub-pixel remainder stays
as the origin (RELION's behaviour).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.device import resolve_device
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.extraction.extract import (
    default_bg_radius,
    extract_particles,
    flush_float16_subnormals,
    output_pixel_size,
    reextract_geometry,
)

HELP = "extract particles from micrographs (like relion_preprocess --extract), or re-extract refined particles"

__all__ = ["HELP", "ExtractOptions", "ExtractPlan", "plan_extraction", "run_extraction", "extract", "add_arguments",
           "main", "output_root"]

_JOB_PREFIX_RE = re.compile(r"(?:^|/)[^/]+/job\d{3,}/")
_CTF_FROM_MIC = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
_CTF_DEFAULTS = (("rlnCtfBfactor", 0.0), ("rlnCtfScalefactor", 1.0), ("rlnPhaseShift", 0.0))


# ------------------------------------------------------------------------------------------------- options


@dataclass
class ExtractOptions:
    """Extraction parameters (pixels unless stated)."""

    extract_size: int
    scale: int | None = None
    window: int | None = None
    norm: bool = False
    bg_radius: int | None = None  # pixels of the output box; None: 75 % of the box (RELION GUI rule)
    bg_diameter: float | None = None  # pixels of the extraction box (GUI option), alternative to bg_radius
    white_dust: float = -1.0
    black_dust: float = -1.0
    ramp: bool = True
    invert_contrast: bool = False
    float16: bool = False
    minimum_pick_fom: float | None = None
    extract_bias: tuple[int, int] = (0, 0)
    recenter: bool = False
    recenter_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ref_angpix: float | None = None
    reset_offsets: bool = False
    keep_ctfs_micrographs: bool = False
    seed: int = 0
    batch_size: int = 256

    @property
    def out_size(self) -> int:
        if self.window is not None and self.window > 0:
            return int(self.window)
        if self.scale is not None and self.scale > 0:
            return int(self.scale)
        return int(self.extract_size)

    def effective_bg_radius(self) -> int:
        if self.bg_radius is not None and self.bg_radius >= 0:
            return int(self.bg_radius)
        return default_bg_radius(self.extract_size, self.scale, -1.0 if self.bg_diameter is None else self.bg_diameter)

    def validate(self) -> None:
        sizes = [("--extract_size", self.extract_size)]
        sizes += [(n, v) for n, v in (("--scale", self.scale), ("--window", self.window)) if v is not None and v > 0]
        for name, v in sizes:
            if v <= 0 or v % 2 != 0:
                raise CryopipeError(f"{name} {v}: only even box sizes (in pixels) are allowed, as in RELION "
                                    f"(use e.g. {max(2, v + v % 2)})")
        if self.norm:
            r = self.effective_bg_radius()
            if r < 0 or 2 * r > self.out_size:
                raise CryopipeError(f"--bg_radius {r} px: 2*bg_radius is larger than the output box "
                                    f"{self.out_size} px (give a radius in pixels of the (rescaled) box)")
        if self.batch_size < 1:
            raise CryopipeError(f"--batch {self.batch_size}: must be at least 1")


# ------------------------------------------------------------------------------------------------- plan


@dataclass
class MicrographTask:
    """One micrograph to extract from."""

    name: str  # rlnMicrographName as in the micrographs STAR
    row: int  # row in the micrographs table
    coord_file: str | None = None  # coordinate file (relative to the project root), or None for re-extraction
    particles: pd.DataFrame | None = None  # re-extraction: this micrograph's rows of the data STAR


@dataclass
class ExtractPlan:
    """Validated inputs of an extraction run (nothing written yet)."""

    root: Path
    micrographs_star: Path
    mic_optics: pd.DataFrame
    mics: pd.DataFrame
    tasks: list[MicrographTask]
    options: ExtractOptions
    reextract: bool = False
    part_optics: pd.DataFrame | None = None
    inputs: list[tuple[str, str]] = field(default_factory=list)


def output_root(mic_name: str) -> str:
    """Micrograph name without its ``Type/jobNNN/`` prefix and extension (RELION ``decomposePipelineFileName``):
    ``MotionCorr/job002/Movies/mic001.mrc`` → ``Movies/mic001``."""
    name = mic_name.replace("\\", "/")
    m = _JOB_PREFIX_RE.search(name)
    post = name[m.end():] if m else name.lstrip("/")
    if post.startswith("../"):
        post = post.replace("../", "")
    stem, dot, ext = post.rpartition(".")
    return stem if dot and "/" not in ext else post


def _resolve(root: Path, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else root / p


def _first_loop_with(blocks: dict, label: str, path: Path, what: str, preferred: Sequence[str] = ()) -> pd.DataFrame:
    for key in list(preferred) + list(blocks):
        b = blocks.get(key)
        if isinstance(b, pd.DataFrame) and label in b.columns:
            return b
    raise InputFileError(path, f"no table with {label}", f"give a {what}")


def _read_coordinates(path: Path) -> pd.DataFrame:
    """Coordinate file: RELION STAR (rlnCoordinateX/Y, any extra columns kept) or EMAN ``.box`` (x y w h)."""
    if not path.exists():
        raise InputFileError(path, "coordinate file not found", "check the coordinate list / --coord_dir")
    if path.suffix.lower() == ".box":
        try:
            arr = np.loadtxt(path, ndmin=2)
        except ValueError as exc:
            raise InputFileError(path, f"cannot read EMAN box file ({exc})", "give 'x y width height' per line") \
                from None
        if arr.size == 0:
            return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
        if arr.shape[1] < 4:
            raise InputFileError(path, "EMAN box lines need 4 numbers (x y width height)", "fix the file")
        a = arr.astype(np.int64)
        return pd.DataFrame({"rlnCoordinateX": (a[:, 0] + a[:, 2] // 2).astype(np.float64),
                             "rlnCoordinateY": (a[:, 1] + a[:, 3] // 2).astype(np.float64)})
    from cryopipe.io.star import read_star

    blocks = read_star(path)
    if not any(isinstance(b, pd.DataFrame) for b in blocks.values()) and all(
            isinstance(b, dict) and not b for b in blocks.values()):
        return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
    df = _first_loop_with(blocks, "rlnCoordinateX", path, "coordinate STAR file with rlnCoordinateX/Y")
    if "rlnCoordinateY" not in df.columns:
        raise InputFileError(path, "has rlnCoordinateX but no rlnCoordinateY", "fix the coordinate file")
    return df.reset_index(drop=True)


def plan_extraction(micrographs_star: str | os.PathLike, *, options: ExtractOptions,
                    coord_list: str | os.PathLike | None = None, coord_dir: str | os.PathLike | None = None,
                    coord_suffix: str | None = None, reextract_data_star: str | os.PathLike | None = None,
                    root: str | os.PathLike = ".", set_angpix: float | None = None) -> ExtractPlan:
    """Read and check every input; raise a one-line :class:`CryopipeError` on any problem (nothing is written).

    Args:
        micrographs_star: micrographs STAR (RELION 3.0 or 3.1+, with CTF columns if the particles should get CTF).
        options: extraction parameters.
        coord_list: STAR table ``coordinate_files`` (rlnMicrographName, rlnMicrographCoordinates).
        coord_dir, coord_suffix: coordinate file = ``coord_dir/<micrograph root>coord_suffix`` (RELION
            ``--coord_dir``/``--coord_suffix``); micrographs without such a file are skipped.
        reextract_data_star: refined particles to re-extract (instead of coordinate files).
        root: project directory: base of every relative name inside the STAR files.
        set_angpix: micrograph pixel size (Å) when the STAR file has none.
    """
    from cryopipe.io.particles import pixel_sizes, read_particles
    from cryopipe.io.star import read_star

    options.validate()
    root = Path(os.path.abspath(root))
    mpath = Path(micrographs_star)
    sources = sum(x is not None and str(x) != "" for x in (coord_list, coord_dir, reextract_data_star))
    if sources != 1:
        raise CryopipeError("give exactly one of --coord_list, --coord_dir (with --coord_suffix) or "
                            "--reextract_data_star")
    mdata = read_particles(mpath, pixel_size=set_angpix)
    mics = mdata.particles.reset_index(drop=True)
    if "rlnMicrographName" not in mics.columns:
        raise InputFileError(mpath, "no rlnMicrographName column", "give a micrographs STAR file (e.g. from CTF "
                                                                  "estimation)")
    optics = mdata.optics.reset_index(drop=True)
    if "rlnOpticsGroup" not in mics.columns:
        mics["rlnOpticsGroup"] = 1
    mic_apix = np.full(len(mics), float(set_angpix)) if set_angpix is not None and set_angpix > 0 \
        else pixel_sizes(mdata)
    mics = mics.assign(_apix=mic_apix)
    names = mics["rlnMicrographName"].astype(str).tolist()
    dup = pd.Series(names)[pd.Series(names).duplicated()]
    if len(dup):
        raise InputFileError(mpath, f"micrograph {dup.iloc[0]} is listed twice", "remove duplicate rows")
    index = {n: i for i, n in enumerate(names)}
    inputs: list[tuple[str, str]] = [(str(mpath), "MicrographGroupMetadata.star.relion.ctf")]
    tasks: list[MicrographTask] = []
    part_optics = None

    if coord_list is not None and str(coord_list) != "":
        cpath = Path(coord_list)
        blocks = read_star(cpath)
        table = _first_loop_with(blocks, "rlnMicrographCoordinates", cpath,
                                 "coordinate list STAR (data_coordinate_files: rlnMicrographName, "
                                 "rlnMicrographCoordinates)", preferred=("coordinate_files",))
        if "rlnMicrographName" not in table.columns:
            raise InputFileError(cpath, "no rlnMicrographName column", "give a coordinate list from picking")
        listed: dict[str, str] = {}
        for mic, crd in zip(table["rlnMicrographName"].astype(str), table["rlnMicrographCoordinates"].astype(str)):
            if mic not in index:
                raise InputFileError(cpath, f"micrograph {mic} is not in {mpath}",
                                     "use the micrographs STAR file the coordinates were picked on")
            listed[mic] = crd
        for mic in names:
            if mic in listed:
                if not _resolve(root, listed[mic]).exists():
                    raise InputFileError(cpath, f"coordinate file {listed[mic]} (for {mic}) not found",
                                         f"file names are relative to the project directory {root}")
                tasks.append(MicrographTask(mic, index[mic], coord_file=listed[mic]))
        inputs.append((str(cpath), "MicrographCoordsGroup.star.relion.autopick"))
    elif coord_dir is not None and str(coord_dir) != "":
        suffix = coord_suffix or "_autopick.star"
        cdir = str(coord_dir).rstrip("/") + "/"
        for mic in names:
            crd = cdir + output_root(mic) + suffix
            if _resolve(root, crd).exists():
                tasks.append(MicrographTask(mic, index[mic], coord_file=crd))
        if not tasks:
            raise CryopipeError(f"--coord_dir {coord_dir}: no coordinate file <micrograph>{suffix} found for any "
                                f"micrograph of {mpath} (check --coord_dir / --coord_suffix)")
    else:
        dpath = Path(reextract_data_star)
        pdata = read_particles(dpath)
        parts = pdata.particles.reset_index(drop=True)
        for col in ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"):
            if col not in parts.columns:
                raise InputFileError(dpath, f"no {col} column", "give particles extracted from micrographs "
                                                               "(e.g. a refinement's run_data.star)")
        if options.recenter and not {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(parts.columns):
            raise InputFileError(dpath, "no rlnOriginXAngst/rlnOriginYAngst for --recenter",
                                 "use a refinement _data.star, or drop --recenter")
        part_optics = pdata.optics.reset_index(drop=True)
        if "rlnOpticsGroup" not in parts.columns:
            parts["rlnOpticsGroup"] = 1
        # match particles to micrographs: exact name, else the name without its Type/jobNNN/ prefix
        by_root = {output_root(n): n for n in names}
        pm = parts["rlnMicrographName"].astype(str)
        matched = pm.map(lambda s: s if s in index else by_root.get(output_root(s)))
        if matched.isna().any():
            bad = pm[matched.isna()].iloc[0]
            raise InputFileError(dpath, f"{int(matched.isna().sum())} particles come from micrographs not in "
                                        f"{mpath} (first: {bad})",
                                 "give the micrographs STAR file these particles were extracted from")
        parts = parts.assign(_mic=matched.to_numpy())
        # optics groups of the particles must exist (by name) in the micrographs' optics table
        if not options.keep_ctfs_micrographs:
            mic_names = set(optics.get("rlnOpticsGroupName", pd.Series(dtype=str)).astype(str))
            used = set(parts["rlnOpticsGroup"].astype(int))
            for _, og in part_optics.iterrows():
                if int(og["rlnOpticsGroup"]) in used and str(og.get("rlnOpticsGroupName", "")) not in mic_names:
                    raise InputFileError(dpath, f"optics group {og.get('rlnOpticsGroupName')} does not exist in "
                                                f"{mpath}", "use matching micrograph and particle STAR files")
        for mic in names:
            sub = parts[parts["_mic"] == mic]
            if len(sub):
                tasks.append(MicrographTask(mic, index[mic], particles=sub.drop(columns="_mic")))
        inputs.append((str(dpath), "ParticleGroupMetadata.star.relion"))
    from cryopipe.io.mrc import mrc_info

    for t in tasks:
        mp = _resolve(root, t.name)
        if not mp.exists():
            raise InputFileError(mp, "micrograph not found",
                                 f"names in {mpath} are relative to the project directory {root}")
        _, ny, nx = mrc_info(mp).shape
        if options.extract_size > min(nx, ny):
            raise InputFileError(mp, f"is {nx}x{ny} px, smaller than --extract_size {options.extract_size}",
                                 "give a box that fits the micrographs (in their pixels)")
    return ExtractPlan(root=root, micrographs_star=mpath, mic_optics=optics, mics=mics, tasks=tasks,
                       options=options, reextract=reextract_data_star is not None and str(reextract_data_star) != "",
                       part_optics=part_optics, inputs=inputs)


# ------------------------------------------------------------------------------------------------- run


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

    data, _ = read_mrc(path)
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


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input / output")
    g.add_argument("--i", required=True, metavar="STAR", help="micrographs STAR file (e.g. micrographs_ctf.star)")
    g.add_argument("--coord_list", "--coords", metavar="STAR",
                   help="coordinate list STAR (data_coordinate_files: rlnMicrographName, rlnMicrographCoordinates), "
                        "e.g. AutoPick/job006/autopick.star")
    g.add_argument("--coord_dir", metavar="DIR", help="directory with <micrograph root><coord_suffix> files")
    g.add_argument("--coord_suffix", metavar="SUFFIX", default=None,
                   help="coordinate file suffix with --coord_dir (default _autopick.star)")
    g.add_argument("--reextract_data_star", "--reextract", metavar="STAR",
                   help="re-extract refined particles from this _data.star instead of coordinate files")
    g.add_argument("--o", "--part_dir", dest="o", metavar="DIR", default=None,
                   help="job folder (default: a new Extract/jobNNN/ in the project in the current directory)")
    g.add_argument("--part_star", metavar="STAR", default=None,
                   help="output particles STAR (default <job>/particles.star)")
    g.add_argument("--alias", default=None, help="job alias")
    g.add_argument("--continue", dest="continue_", action="store_true",
                   help="continue the job in --o: keep micrographs whose stack and _extract.star exist")
    g.add_argument("--only_do_unfinished", dest="continue_", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--extract", action="store_true", help=argparse.SUPPRESS)  # relion_preprocess compatibility
    g.add_argument("--set_angpix", type=float, default=None, help="micrograph pixel size (Å) if the STAR has none")

    e = p.add_argument_group("extraction")
    e.add_argument("--extract_size", "--box", dest="extract_size", type=int, required=True,
                   help="box size to extract (pixels of the micrograph, even)")
    e.add_argument("--scale", "--rescale", dest="scale", type=int, default=None,
                   help="Fourier-rescale the particles to this box (pixels, even); pixel size × extract_size/scale")
    e.add_argument("--window", type=int, default=None, help="re-window (crop/pad) to this box after rescaling")
    e.add_argument("--norm", action="store_true", help="normalise: background mean 0, stddev 1")
    e.add_argument("--no_ramp", action="store_true", help="only subtract the background mean, no fitted plane")
    e.add_argument("--bg_radius", type=int, default=None,
                   help="background radius (pixels of the output box); default 75%% of the box diameter")
    e.add_argument("--bg_diameter", type=float, default=None,
                   help="background circle diameter in pixels of the extraction box (GUI option; -1: 75%% of box)")
    e.add_argument("--white_dust", type=float, default=-1.0, help="remove white dust above this many sigma (-1: off)")
    e.add_argument("--black_dust", type=float, default=-1.0, help="remove black dust below this many sigma (-1: off)")
    e.add_argument("--invert_contrast", "--invert", dest="invert_contrast", action="store_true",
                   help="invert contrast (dark particles become white)")
    e.add_argument("--float16", action="store_true", help="write stacks as float16 (MRC mode 12)")
    e.add_argument("--minimum_pick_fom", type=float, default=None,
                   help="only extract picks with rlnAutopickFigureOfMerit above this")
    e.add_argument("--extract_bias_x", type=int, default=0, help="add this (pixels) to every X coordinate")
    e.add_argument("--extract_bias_y", type=int, default=0, help="add this (pixels) to every Y coordinate")

    r = p.add_argument_group("re-extraction")
    r.add_argument("--recenter", action="store_true",
                   help="move each coordinate by the rounded refined origin (needs rlnOriginX/YAngst)")
    r.add_argument("--recenter_x", type=float, default=0.0, help="X (pixels of the reference) to centre on")
    r.add_argument("--recenter_y", type=float, default=0.0, help="Y (pixels of the reference) to centre on")
    r.add_argument("--recenter_z", type=float, default=0.0, help="Z (pixels of the reference) to centre on")
    r.add_argument("--ref_angpix", type=float, default=None,
                   help="pixel size of the reference for --recenter_x/y/z (default: the particles')")
    r.add_argument("--reset_offsets", action="store_true", help="set the refined origins to zero")
    r.add_argument("--keep_ctfs_micrographs", action="store_true",
                   help="take CTFs (and optics) from the micrographs STAR instead of the re-extracted particles")

    c = p.add_argument_group("computation")
    c.add_argument("--seed", "--random_seed", dest="seed", type=int, default=0, help="seed for dust-replacement noise")
    c.add_argument("--batch", type=int, default=256, help="particles per batch on the device")
    c.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")


def _project_root_for(output_arg: str | None) -> Path:
    """Project directory whose relative names the STAR files use: the project of ``--o .../Type/jobNNN/`` if it
    has a default_pipeline.star, else the current directory (RELION runs in the project directory)."""
    here = Path(os.path.abspath("."))
    if output_arg:
        full = Path(os.path.abspath(output_arg))
        if re.fullmatch(r"job\d{3,}", full.name) and (full.parent.parent / "default_pipeline.star").is_file():
            return full.parent.parent
    return here


def _options_from_args(args: argparse.Namespace) -> ExtractOptions:
    return ExtractOptions(
        extract_size=args.extract_size, scale=args.scale, window=args.window, norm=args.norm,
        bg_radius=args.bg_radius if args.bg_radius is not None and args.bg_radius >= 0 else None,
        bg_diameter=args.bg_diameter, white_dust=args.white_dust, black_dust=args.black_dust,
        ramp=not args.no_ramp, invert_contrast=args.invert_contrast, float16=args.float16,
        minimum_pick_fom=args.minimum_pick_fom, extract_bias=(args.extract_bias_x, args.extract_bias_y),
        recenter=args.recenter, recenter_xyz=(args.recenter_x, args.recenter_y, args.recenter_z),
        ref_angpix=args.ref_angpix, reset_offsets=args.reset_offsets,
        keep_ctfs_micrographs=args.keep_ctfs_micrographs, seed=args.seed, batch_size=args.batch)


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    options = _options_from_args(args)
    root = _project_root_for(args.o)
    # Check everything before the job folder is created: bad input leaves no output behind.
    plan = plan_extraction(args.i, options=options, coord_list=args.coord_list, coord_dir=args.coord_dir,
                           coord_suffix=args.coord_suffix, reextract_data_star=args.reextract_data_star, root=root,
                           set_angpix=args.set_angpix)
    label = ProcessLabel.REEXTRACT if plan.reextract else ProcessLabel.EXTRACT
    inputs = [(args.i, NodeType.MICROGRAPHS_CTF)]
    if args.coord_list:
        inputs.append((args.coord_list, NodeType.AUTOPICK_COORDS))
    if args.reextract_data_star:
        inputs.append((args.reextract_data_star, NodeType.PARTICLES))
    params = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    with open_job_dir(args.o, "Extract", label, alias=args.alias, inputs=inputs, params=params,
                      continue_job=args.continue_) as job:
        part_star = Path(args.part_star) if args.part_star else job.path("particles.star")
        path, _ = run_extraction(plan, job.dir, part_star=part_star, continue_=args.continue_, device=args.device)
        try:
            job.add_output(path, NodeType.EXTRACT_PARTICLES)
        except CryopipeError:
            pass  # --part_star outside the job folder: written, but not a pipeline node
    return 0
