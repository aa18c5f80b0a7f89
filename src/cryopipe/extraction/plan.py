"""Planning an extraction job (``cryopipe extract``): which micrographs, where their coordinates are
(``--coord_list`` / ``--coord_dir`` + ``--coord_suffix`` / ``--reextract_data_star``), their CTF and pixel sizes,
and where each output goes (RELION's layout: ``<job>/<micrograph path without the Type/jobNNN/ prefix>.mrcs``).
Every input is checked here, before any output is written. The run is :mod:`cryopipe.extraction.run`."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.extraction.extract import default_bg_radius

__all__ = ["ExtractOptions", "MicrographTask", "ExtractPlan", "output_root", "plan_extraction"]

_JOB_PREFIX_RE = re.compile(r"(?:^|/)[^/]+/job\d{3,}/")


_CTF_FROM_MIC = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")


_CTF_DEFAULTS = (("rlnCtfBfactor", 0.0), ("rlnCtfScalefactor", 1.0), ("rlnPhaseShift", 0.0))


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
    from cryopipe.io.star import numeric_column, read_star

    blocks = read_star(path)
    if not any(isinstance(b, pd.DataFrame) for b in blocks.values()) and all(
            isinstance(b, dict) and not b for b in blocks.values()):
        return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
    df = _first_loop_with(blocks, "rlnCoordinateX", path, "coordinate STAR file with rlnCoordinateX/Y")
    if "rlnCoordinateY" not in df.columns:
        raise InputFileError(path, "has rlnCoordinateX but no rlnCoordinateY", "fix the coordinate file")
    df = df.reset_index(drop=True)
    for label in ("rlnCoordinateX", "rlnCoordinateY"):  # finite numbers, checked before anything is written
        numeric_column(df, label, path, remedy="fix the coordinate file")
    return df


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
