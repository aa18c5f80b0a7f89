"""Particle and micrograph STAR files with optics groups; RELION 3.0 ↔ 3.1 layouts.

Internal model (:class:`ParticleData`) is always the RELION-3.1 layout:

* ``optics``: one row per optics group (``rlnOpticsGroup`` 1.., ``rlnOpticsGroupName``, ``rlnVoltage`` [kV],
  ``rlnSphericalAberration`` [mm], ``rlnAmplitudeContrast``, ``rlnImagePixelSize`` [Å] for particles or
  ``rlnMicrographPixelSize`` [Å] for micrographs, ``rlnImageSize``, ``rlnImageDimensionality``, ...).
* ``particles``: one row per particle / micrograph, 3.1 column names, ``rlnOpticsGroup`` per row, origins in Å
  (``rlnOriginXAngst``...).

Reading a RELION-3.0 file (one unnamed block, per-row ``rlnVoltage``/``rlnSphericalAberration``/
``rlnAmplitudeContrast``/``rlnMagnification``/``rlnDetectorPixelSize``, origins ``rlnOriginX/Y`` in pixels)
converts it the way ``relion_convert_star`` does: optics groups are the distinct combinations of the per-row
optics values (amplitude contrast, beam tilt x/y, Cs, voltage, detector pixel size, magnification) numbered in
order of first appearance and named ``opticsGroupN``; pixel size = ``rlnDetectorPixelSize·1e4/rlnMagnification``;
image size and dimensionality from the header of the first image of each group; per-row optics columns
removed; ``rlnOpticsGroup`` appended, then the origins (and priors, helical track length) in Å.

Writing ``version="3.0"`` is the inverse (per-row optics columns with ``rlnMagnification`` 10000 and
``rlnDetectorPixelSize`` = pixel size in µm·1e-4·mag, origins in pixels, no optics table and no 3.1-only
columns). Information the 3.0 layout cannot hold is dropped (optics group names/numbers, image size, MTF...),
and two groups with identical optics values merge into one.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryopipe.errors import InputFileError
from cryopipe.io.mrc import mrc_info, parse_image_name
from cryopipe.io.star import read_star_with_version, write_star

__all__ = [
    "ParticleData", "read_particles", "write_particles", "convert_30_to_31", "convert_31_to_30", "pixel_sizes",
    "ctf_parameters", "origins_px", "euler_angles", "optics_values",
]

# Per-row optics labels of the 3.0 layout, in the order relion_convert_star puts them in the optics table.
_OPTICS_LABELS_30 = ["rlnAmplitudeContrast", "rlnBeamTiltX", "rlnBeamTiltY", "rlnSphericalAberration", "rlnVoltage",
                     "rlnDetectorPixelSize", "rlnMagnification"]
# Pixel-valued 3.0 columns and their Å-valued 3.1 replacements, in relion_convert_star's order.
_PX_TO_ANGST = [("rlnOriginX", "rlnOriginXAngst"), ("rlnOriginY", "rlnOriginYAngst"), ("rlnOriginZ", "rlnOriginZAngst"),
                ("rlnOriginXPrior", "rlnOriginXPriorAngst"), ("rlnOriginYPrior", "rlnOriginYPriorAngst"),
                ("rlnOriginZPrior", "rlnOriginZPriorAngst"),
                ("rlnHelicalTrackLength", "rlnHelicalTrackLengthAngst")]
_DATA_BLOCKS = ("particles", "micrographs", "movies")
# Optics-table columns that RELION 3.0 had per row (copied back to the rows when writing 3.0).
_PER_ROW_30 = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnBeamTiltX", "rlnBeamTiltY"]


@dataclass
class ParticleData:
    """Particles (or micrographs) in the RELION-3.1 layout.

    Attributes:
        optics: optics table, one row per group (``rlnOpticsGroup`` int, 1-based).
        particles: one row per particle/micrograph, 3.1 column names, origins in Å.
        block_name: ``"particles"``, ``"micrographs"`` or ``"movies"`` (name of the data block in 3.1 files).
        source_version: layout of the file read: ``"3.0"`` or ``"3.1"`` (3.1 = any file with a data_optics).
        path: file it was read from (for error messages), or None.
        file_version: number of the file's ``# version`` line (30001, 50001...), None if absent.
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    block_name: str = "particles"
    source_version: str = "3.1"
    path: Path | None = None
    file_version: int | None = None
    other_blocks: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def pixel_size_label(self) -> str:
        """``rlnImagePixelSize`` for particles, ``rlnMicrographPixelSize`` for micrographs/movies."""
        return "rlnImagePixelSize" if self.block_name == "particles" else "rlnMicrographPixelSize"

    def copy(self) -> ParticleData:
        return ParticleData(self.optics.copy(), self.particles.copy(), self.block_name, self.source_version,
                            self.path, self.file_version, dict(self.other_blocks))


# ------------------------------------------------------------------------------------------------ 3.0 -> 3.1


def _block_kind(df: pd.DataFrame) -> str:
    """relion_convert_star's rule: rlnImageName → particles, rlnMicrographMetadata → movies, else micrographs."""
    if "rlnImageName" in df.columns:
        return "particles"
    if "rlnMicrographMetadata" in df.columns:
        return "movies"
    return "micrographs"


def _image_header_size(name: str, roots: list[Path]) -> tuple[int, int] | None:
    """(image size, dimensionality) from the MRC header of image ``name`` (``k@stack`` or a file), or None."""
    try:
        _, file = parse_image_name(name)
    except Exception:
        return None
    for root in roots:
        p = Path(file) if Path(file).is_absolute() else root / file
        if p.exists():
            info = mrc_info(p)
            nz, ny, nx = info.shape
            is_3d = "@" not in name and not info.is_stack and nz > 1
            return nx, 3 if is_3d else 2
    return None


def convert_30_to_31(df: pd.DataFrame, path: Path | str | None = None, pixel_size: float | None = None,
                     root_dir: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """RELION-3.0 table → (optics, particles, block_name) as ``relion_convert_star`` does.

    Args:
        df: the 3.0 table (per-row optics columns, origins in pixels).
        path: source file (error messages; its directory is where image stacks are looked for).
        pixel_size: Å/px to use when the table has no rlnMagnification/rlnDetectorPixelSize.
        root_dir: directory image names are relative to (default: the STAR file's directory, then cwd).
    """
    where = path if path is not None else "<table>"
    kind = _block_kind(df)
    labels = [lab for lab in _OPTICS_LABELS_30 if lab in df.columns]
    n = len(df)
    if labels:
        keys = df[labels]
        if keys.isna().any().any():
            bad = keys.columns[keys.isna().any()].tolist()[0]
            raise InputFileError(where, f"column {bad} has missing values", "fill in the optics value of every row")
        group_index = keys.groupby(labels, sort=False, dropna=False).ngroup().to_numpy(np.int64)
        firsts = keys.drop_duplicates().reset_index(drop=True)
    else:
        group_index = np.zeros(n, dtype=np.int64)
        firsts = pd.DataFrame(index=[0])
    n_groups = len(firsts)
    optics = pd.DataFrame({"rlnOpticsGroup": np.arange(1, n_groups + 1, dtype=np.int64),
                           "rlnOpticsGroupName": [f"opticsGroup{g + 1}" for g in range(n_groups)]})
    for lab in labels:
        optics[lab] = firsts[lab].to_numpy()
    if "rlnDetectorPixelSize" in optics.columns and "rlnMagnification" in optics.columns:
        angpix = optics["rlnDetectorPixelSize"].to_numpy(float) * (1e4 / optics["rlnMagnification"].to_numpy(float))
        optics = optics.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"])
    elif pixel_size is not None:
        angpix = np.full(n_groups, float(pixel_size))
        optics = optics.drop(columns=[c for c in ("rlnDetectorPixelSize", "rlnMagnification") if c in optics])
    else:
        angpix = None
    if angpix is not None:
        if kind == "particles":
            optics["rlnImagePixelSize"] = angpix
        else:
            optics["rlnMicrographPixelSize"] = angpix
            optics["rlnMicrographOriginalPixelSize"] = angpix

    parts = df.drop(columns=labels).copy()
    parts["rlnOpticsGroup"] = group_index + 1
    if kind == "particles" and angpix is not None:
        row_apix = angpix[group_index]
        for px, ang in _PX_TO_ANGST:
            if px in parts.columns:
                parts[ang] = parts[px].to_numpy(float) * row_apix
        parts = parts.drop(columns=[px for px, _ in _PX_TO_ANGST if px in parts.columns])

    if kind == "particles" and len(parts):
        roots = [Path(root_dir)] if root_dir is not None else []
        if path is not None:
            roots.append(Path(path).parent)
        roots.append(Path.cwd())
        sizes, dims, missing = np.zeros(n_groups, np.int64), np.zeros(n_groups, np.int64), []
        first_rows = pd.Series(np.arange(n)).groupby(group_index).first().to_numpy()
        names = parts["rlnImageName"].to_numpy()
        for g in range(n_groups):
            got = _image_header_size(str(names[first_rows[g]]), roots)
            if got is None:
                missing.append(str(names[first_rows[g]]))
            else:
                sizes[g], dims[g] = got
        if missing:
            warnings.warn(f"{where}: image {missing[0]} not found: rlnImageSize/rlnImageDimensionality left out of "
                          "the optics table (give root_dir= the project directory)", stacklevel=3)
        else:
            optics["rlnImageSize"] = sizes
            optics["rlnImageDimensionality"] = dims
    return optics, parts, kind


# ------------------------------------------------------------------------------------------------ 3.1 -> 3.0


def convert_31_to_30(data: ParticleData) -> pd.DataFrame:
    """Internal (3.1) model → a RELION-3.0 table: per-row optics, origins in pixels, no 3.1-only columns."""
    parts = data.particles.copy()
    optics = data.optics.set_index("rlnOpticsGroup")
    gi = parts["rlnOpticsGroup"].to_numpy()
    apix = pixel_sizes(data)
    cols_order = list(parts.columns)
    for px, ang in _PX_TO_ANGST:
        if ang in parts.columns:
            parts[px] = parts[ang].to_numpy(float) / apix
            cols_order[cols_order.index(ang)] = px
    parts = parts[cols_order]
    for lab in _PER_ROW_30:
        if lab in optics.columns and lab not in parts.columns:
            parts[lab] = optics[lab].reindex(gi).to_numpy()
    parts["rlnMagnification"] = 10000.0
    parts["rlnDetectorPixelSize"] = apix  # µm: 1e4 * dstep / 10000 = apix
    return parts.drop(columns=["rlnOpticsGroup"])


# ------------------------------------------------------------------------------------------------ read / write


#: per-particle numbers that must be finite where present (a NaN defocus or angle would silently spoil a map)
FINITE_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
                  "rlnCtfScalefactor", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst", "rlnOriginZAngst", "rlnOriginX", "rlnOriginY", "rlnCoordinateX", "rlnCoordinateY")


def _validate(data: ParticleData) -> None:
    where = data.path if data.path is not None else "<particles>"
    optics, parts = data.optics, data.particles
    if "rlnOpticsGroup" not in optics.columns:
        raise InputFileError(where, "data_optics has no rlnOpticsGroup column", "number the optics groups 1, 2, ...")
    if optics["rlnOpticsGroup"].duplicated().any():
        g = optics["rlnOpticsGroup"][optics["rlnOpticsGroup"].duplicated()].iloc[0]
        raise InputFileError(where, f"optics group {g} is defined twice in data_optics",
                             "give each group its own number")
    for lab, what in (("rlnVoltage", "voltage (kV)"), ("rlnSphericalAberration", "spherical aberration (mm)"),
                      (data.pixel_size_label, "pixel size (Å)")):
        if lab not in optics.columns:
            raise InputFileError(where, f"no {lab} column ({what}) in the optics table",
                                 f"add {lab} to data_optics (RELION 3.0 files: per-row rlnVoltage, "
                                 "rlnSphericalAberration, rlnMagnification and rlnDetectorPixelSize)")
        vals = pd.to_numeric(optics[lab], errors="coerce")
        bad = vals.isna() | ((vals <= 0) if lab != "rlnSphericalAberration" else False)
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise InputFileError(where, f"invalid {lab} value {optics[lab].tolist()[i]!r} for optics group "
                                        f"{optics['rlnOpticsGroup'].tolist()[i]}", f"{lab} must be a positive number")
    if "rlnOpticsGroup" not in parts.columns:
        if len(optics) == 1:
            parts["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        else:
            raise InputFileError(where, f"data_{data.block_name} has no rlnOpticsGroup column but data_optics has "
                                        f"{len(optics)} groups", "add rlnOpticsGroup to every row")
    for lab in FINITE_COLUMNS:
        if lab in parts.columns:
            vals = pd.to_numeric(parts[lab], errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(vals)
            if bad.any():
                i = int(np.argmax(bad))
                raise InputFileError(where, f"{lab} of particle {i + 1} (row {i + 1} of data_{data.block_name}) is "
                                            f"{parts[lab].tolist()[i]!r}, not a finite number "
                                            f"({int(bad.sum())} such rows)",
                                     "fix or remove those rows (e.g. cryopipe star --select)")
    known = set(optics["rlnOpticsGroup"].tolist())
    used = pd.unique(parts["rlnOpticsGroup"])
    unknown = [g for g in used.tolist() if g not in known]
    if unknown:
        raise InputFileError(where, f"rlnOpticsGroup {unknown[0]} is used in data_{data.block_name} but not defined in "
                                    "data_optics",
                             f"add optics group {unknown[0]} to data_optics or fix rlnOpticsGroup")


def read_particles(path: str | os.PathLike, pixel_size: float | None = None,
                   root_dir: str | os.PathLike | None = None) -> ParticleData:
    """Read a particles / micrographs STAR file (RELION 3.0 or 3.1+) into the 3.1 model.

    Args:
        path: the STAR file.
        pixel_size: Å/px for 3.0 files that have no rlnMagnification/rlnDetectorPixelSize (ignored otherwise).
        root_dir: directory image names are relative to, used to read the image size of 3.0 particles
            (default: the STAR file's directory, then the current directory).

    Raises InputFileError (one line) for a missing data block, an unknown optics group, or missing required
    optics (pixel size, rlnVoltage, rlnSphericalAberration).
    """
    path = Path(path)
    blocks, version = read_star_with_version(path)
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "optics" in loops:
        name = next((b for b in _DATA_BLOCKS if b in loops), None)
        if name is None:
            rest = [b for b in loops if b != "optics"]
            if len(rest) != 1:
                raise InputFileError(path, f"has data_optics but no data_particles / data_micrographs block "
                                           f"(blocks: {', '.join(blocks) or 'none'})", "give a particles or "
                                                                                       "micrographs STAR file")
            name = rest[0]
        parts = loops[name].copy()
        kind = name if name in _DATA_BLOCKS else _block_kind(parts)
        data = ParticleData(loops["optics"].copy(), parts, kind, "3.1", path, version,
                            {k: v for k, v in blocks.items() if k not in ("optics", name)})
        # 3.1-layout files that still carry pixel origins: convert them with the group pixel size
        if any(px in parts.columns and ang not in parts.columns for px, ang in _PX_TO_ANGST):
            _validate(data)
            apix = pixel_sizes(data)
            for px, ang in _PX_TO_ANGST:
                if px in parts.columns and ang not in parts.columns:
                    parts[ang] = parts[px].to_numpy(float) * apix
                    del parts[px]
    else:
        if not loops:
            raise InputFileError(path, "contains no table (loop_) of particles or micrographs",
                                 "give a particles or micrographs STAR file")
        name = "" if "" in loops else next((b for b in _DATA_BLOCKS if b in loops), None)
        if name is None:
            if len(loops) != 1:
                raise InputFileError(path, f"has no data_optics and no unnamed data_ block (blocks: "
                                           f"{', '.join(blocks)})", "give a RELION 3.0 or 3.1 particles file")
            name = next(iter(loops))
        df = loops[name]
        for lab, what in (("rlnVoltage", "voltage"), ("rlnSphericalAberration", "spherical aberration")):
            if lab not in df.columns:
                raise InputFileError(path, f"no data_optics table and no per-row {lab} column ({what})",
                                     "a RELION 3.0 file needs per-row rlnVoltage, rlnSphericalAberration, "
                                     "rlnAmplitudeContrast, rlnMagnification and rlnDetectorPixelSize")
        if pixel_size is None and not {"rlnMagnification", "rlnDetectorPixelSize"} <= set(df.columns):
            raise InputFileError(path, "no pixel size: neither data_optics nor per-row rlnMagnification and "
                                       "rlnDetectorPixelSize", "add those columns or pass the pixel size explicitly")
        optics, parts, kind = convert_30_to_31(df, path, pixel_size, root_dir)
        data = ParticleData(optics, parts, kind, "3.0", path, version,
                            {k: v for k, v in blocks.items() if k != name})
    _validate(data)
    return data


def write_particles(path: str | os.PathLike, data: ParticleData, version: str = "3.1",
                    star_version: int = 30001) -> None:
    """Write particles/micrographs atomically in the RELION-3.1 (default) or 3.0 layout.

    ``version="3.1"``: ``data_optics`` + ``data_<block_name>`` with ``# version <star_version>`` lines.
    ``version="3.0"``: one unnamed ``data_`` block, no version line, per-row optics, origins in pixels.
    """
    if version == "3.1":
        write_star(path, {"optics": data.optics, data.block_name: data.particles}, version=star_version)
    elif version == "3.0":
        write_star(path, {"": convert_31_to_30(data)}, version=None)
    else:
        raise ValueError(f"write_particles: version must be '3.1' or '3.0', not {version!r}")


# ------------------------------------------------------------------------------------------------ accessors


def optics_values(data: ParticleData, label: str, default: float | None = None) -> np.ndarray:
    """Per-particle values of optics-table column ``label`` (float64 [N]); ``default`` if the column is absent."""
    where = data.path if data.path is not None else "<particles>"
    if label not in data.optics.columns:
        if default is None:
            raise InputFileError(where, f"no {label} column in the optics table", f"add {label} to data_optics")
        return np.full(len(data.particles), float(default))
    table = pd.Series(pd.to_numeric(data.optics[label], errors="coerce").to_numpy(float),
                      index=data.optics["rlnOpticsGroup"].to_numpy())
    vals = table.reindex(data.particles["rlnOpticsGroup"].to_numpy()).to_numpy(float)
    if np.isnan(vals).any():
        raise InputFileError(where, f"missing or non-numeric {label} for some optics groups",
                             f"give every optics group a numeric {label}")
    return vals


def pixel_sizes(data: ParticleData) -> np.ndarray:
    """Pixel size (Å) of every particle [N] (``rlnImagePixelSize`` / ``rlnMicrographPixelSize`` of its group)."""
    return optics_values(data, data.pixel_size_label)


def _column(data: ParticleData, label: str, default: float | None) -> np.ndarray:
    where = data.path if data.path is not None else "<particles>"
    if label not in data.particles.columns:
        if default is None:
            raise InputFileError(where, f"no {label} column in data_{data.block_name}",
                                 "run CTF estimation (or add the column) first")
        return np.full(len(data.particles), float(default))
    vals = pd.to_numeric(data.particles[label], errors="coerce").to_numpy(float)
    if np.isnan(vals).any():
        i = int(np.argmax(np.isnan(vals)))
        raise InputFileError(where, f"non-numeric {label} value {data.particles[label].tolist()[i]!r} in row {i + 1}",
                             f"fix the {label} column")
    return vals


def ctf_parameters(data: ParticleData) -> dict[str, np.ndarray]:
    """Per-particle CTF parameters (float64 [N] each), RELION units.

    Keys: ``defocus_u``, ``defocus_v`` (Å; V defaults to U), ``defocus_angle`` (deg, default 0), ``voltage`` (kV),
    ``cs`` (mm), ``amplitude_contrast`` (optics; required), ``phase_shift`` (deg, default 0), ``bfactor`` (Å²,
    default 0), ``scale`` (default 1).
    """
    du = _column(data, "rlnDefocusU", None)
    dv = _column(data, "rlnDefocusV", None) if "rlnDefocusV" in data.particles.columns else du.copy()
    return {
        "defocus_u": du,
        "defocus_v": dv,
        "defocus_angle": _column(data, "rlnDefocusAngle", 0.0),
        "voltage": optics_values(data, "rlnVoltage"),
        "cs": optics_values(data, "rlnSphericalAberration"),
        "amplitude_contrast": optics_values(data, "rlnAmplitudeContrast"),
        "phase_shift": _column(data, "rlnPhaseShift", 0.0),
        "bfactor": _column(data, "rlnCtfBfactor", 0.0),
        "scale": _column(data, "rlnCtfScalefactor", 1.0),
    }


def origins_px(data: ParticleData) -> np.ndarray:
    """Origins in pixels [N, 2] (x, y) or [N, 3] (x, y, z when rlnOriginZAngst exists); 0 where absent.

    ``origin_px = rlnOrigin{X,Y,Z}Angst / pixel size``; the particle centre in the micrograph is
    ``rlnCoordinate − origin_px``.
    """
    labels = ["rlnOriginXAngst", "rlnOriginYAngst"]
    if "rlnOriginZAngst" in data.particles.columns:
        labels.append("rlnOriginZAngst")
    ang = np.stack([_column(data, lab, 0.0) for lab in labels], axis=1)
    return ang / pixel_sizes(data)[:, None]


def euler_angles(data: ParticleData) -> np.ndarray:
    """(rot, tilt, psi) in degrees [N, 3] (RELION ZYZ convention); 0 where a column is absent."""
    return np.stack([_column(data, lab, 0.0) for lab in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)
