"""RELION tomography files: tomogram sets (``tomograms.star`` + per-tilt-series STAR files), particle sets and
optimisation sets.

Layouts read (auto-detected, see ``shared/reference/tomography.md`` §1):

* **RELION 5**: ``tomograms.star`` has one table ``data_global`` (one row per tilt series, key rlnTomoName) whose
  column rlnTomoTiltSeriesStarFile names a STAR file with one table ``data_<rlnTomoName>`` (one row per tilt image,
  in file order). Tilt images are rlnMicrographName values: ``NNNNNN@stack.mrcs`` (image NNNNNN, 1-based, of one
  stack) or one MRC file per tilt (no ``@``). Alignment: rlnTomoXTilt/YTilt/ZRot (deg), rlnTomoX/YShiftAngst (Å).
* **RELION 4**: one ``tomograms.star`` holding ``data_global`` (no rlnTomoTiltSeriesStarFile; rlnTomoTiltSeriesName
  = one stack for the whole tilt series, ``.st:mrc`` allowed, + rlnTomoFrameCount) and one ``data_<rlnTomoName>``
  table per tilt series with the 4×4 projection matrices as rows rlnTomoProjX/Y/Z/W (4-vectors written
  ``[a,b,c,d]``; plain ``a,b,c,d`` is read too). On reading, the matrices are converted to XTilt/YTilt/ZRot +
  shifts (:func:`cryopipe.core.tilt_geometry.decompose_projection_matrices`, which refuses a matrix that is not a
  rotation plus an image shift), frame ``f`` of the stack becomes rlnMicrographName ``f@stack`` and the
  rlnTomoProjX..W columns and the global rlnTomoTiltSeriesName/rlnTomoFrameCount are dropped — what RELION 5 does
  when it reads and rewrites such a file (geometry kept: P_f is unchanged to rounding). A RELION 5 table that still
  carries rlnTomoProjX..W is converted the same way (RELION 5 uses those matrices as they are).

Everything else is kept, every column in file order, so that read → write loses nothing. Writing is always the
RELION 5 layout with ``# version 50001`` headers.

**Paths.** RELION stores paths relative to the *project directory* (the working directory of the RELION run).
Here, with ``root=None``, a relative path (rlnTomoTiltSeriesStarFile, image names, entries of an optimisation
set, particle files) is looked up in the current working directory first; if it does not exist there, in the
directory of the STAR file that names it, then in that directory's parents (first match); if found nowhere, the
working-directory path is used (and reported missing when it is needed). ``root=...`` resolves everything
against that directory instead. The directory that worked is kept as :attr:`TiltSeries.root`.

Errors are one-line :class:`~cryopipe.errors.InputFileError` / :class:`~cryopipe.errors.CryopipeError`. Images are
checked lazily (first use of :attr:`TiltSeries.image_size` or :meth:`TiltSeries.read_images`): every file exists,
stacks hold every referenced image, the header pixel size agrees with rlnTomoTiltSeriesPixelSize (a header value of
0 or 1 means "unset" and is accepted) and all images have one size.

Particles and optimisation sets live in :mod:`cryopipe.io.tomo_particles` and are re-exported here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.tilt_geometry import decompose_projection_matrices, projection_matrices
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.mrc import MrcStack, mrc_info, parse_image_names
from cryopipe.io.star import read_star, write_star

__all__ = [
    "TiltSeries", "TomogramSet", "read_tomograms", "write_tomograms", "project_root", "resolve_path",
    "path_for_star", "parse_vector", "RELION5_VERSION",
    # re-exported from cryopipe.io.tomo_particles
    "TomoParticles", "read_tomo_particles", "write_tomo_particles", "check_inside", "to_centered_coordinates",
    "read_optimisation_set", "write_optimisation_set", "OPTIMISATION_SET_LABELS", "optimisation_set_entries",
    "is_optimisation_set", "is_tomo_particles",
]

RELION5_VERSION = 50001
_PROJ_LABELS = ("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW")
_ANGLE_LABELS = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst", "rlnTomoYShiftAngst")
_R4_GLOBAL_LABELS = ("rlnTomoTiltSeriesName", "rlnTomoFrameCount")
_PRE_EXPOSURE = "rlnMicrographPreExposure"


# ================================================================================================ paths


def project_root(value: str | os.PathLike, star_file: str | os.PathLike, root: str | os.PathLike | None = None
                 ) -> Path:
    """The directory a relative path ``value`` named in ``star_file`` is relative to (see module doc): ``root``
    if given; else the working directory if ``value`` exists there; else the first of ``star_file``'s directory and
    its parents that holds ``value``; else the working directory."""
    if root is not None:
        return Path(root)
    cwd = Path.cwd()
    rel = Path(value)
    if rel.is_absolute() or (cwd / rel).exists():
        return cwd
    start = Path(star_file).resolve().parent
    for d in (start, *start.parents):
        if (d / rel).exists():
            return d
    return cwd


def resolve_path(value: str | os.PathLike, star_file: str | os.PathLike, root: str | os.PathLike | None = None
                 ) -> Path:
    """``value`` (absolute, or relative to the project directory) as a path, by the rule of :func:`project_root`."""
    p = Path(value)
    return p if p.is_absolute() else project_root(p, star_file, root) / p


def path_for_star(path: str | os.PathLike) -> str:
    """How a path written by us is stored in a STAR file: relative to the working directory (RELION's project
    directory) when it lies below it, else absolute."""
    p = Path(path).absolute()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _image_file(name_file: str) -> str:
    """File part of an image name without RELION's ``:mrc`` / ``:mrcs`` type suffix (``TS.st:mrc``)."""
    for suffix in (":mrcs", ":mrc"):
        if name_file.endswith(suffix):
            return name_file[: -len(suffix)]
    return name_file


# ================================================================================================ values


def parse_vector(value: object, n: int, where, what: str) -> list[float]:
    """A RELION vector value (``[a,b,c,d]``, ``a,b,c,d`` or whitespace separated) → ``n`` floats; one-line
    InputFileError naming ``what`` otherwise."""
    text = str(value).strip().strip("[]()").replace(",", " ")
    try:
        out = [float(t) for t in text.split()]
    except ValueError:
        out = []
    if len(out) != n:
        raise InputFileError(where, f"{what}: expected a vector of {n} numbers like [a,b,c,d], got {value!r}",
                             "fix the value")
    return out


def _numbers(table: pd.DataFrame, label: str, where, default: float | None = None) -> np.ndarray:
    """Column ``label`` of ``table`` as float64 ``[F]`` (``default`` if absent; error if absent without default)."""
    if label not in table.columns:
        if default is None:
            raise InputFileError(where, f"no {label} column", f"add {label} (RELION needs it)")
        return np.full(len(table), float(default))
    vals = pd.to_numeric(table[label], errors="coerce").to_numpy(np.float64)
    if np.isnan(vals).any():
        i = int(np.argmax(np.isnan(vals)))
        raise InputFileError(where, f"non-numeric {label} value {table[label].tolist()[i]!r} in row {i + 1}",
                             f"fix the {label} column")
    return vals


def _python(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


# ================================================================================================ tilt series


@dataclass
class TiltSeries:
    """One tilt series: its row of ``tomograms.star`` and its per-tilt table.

    Attributes:
        name: rlnTomoName.
        globals: this tilt series' row of the global table (every column, file order).
        tilts: per-tilt table in file order (every column).
        root: directory relative paths in the files are resolved against (the project directory).
        star_file: the per-tilt STAR file it was read from (``tomograms.star`` itself for RELION 4), or None.

    The image check and the resolved image paths are cached on first use: build a new TiltSeries after changing
    rlnMicrographName or ``root``.
    """

    name: str
    globals: dict[str, object]
    tilts: pd.DataFrame
    root: Path
    star_file: Path | None = None
    _image_cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ global values
    @property
    def _where(self):
        return self.star_file if self.star_file is not None else f"tilt series {self.name}"

    def _global(self, label: str, default: float | None = None) -> float:
        if label not in self.globals:
            if default is None:
                raise InputFileError(self._where, f"tomogram {self.name}: no {label} in the global table",
                                     f"add {label} to tomograms.star")
            return float(default)
        try:
            return float(self.globals[label])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InputFileError(self._where, f"tomogram {self.name}: {label} = {self.globals[label]!r} is not a "
                                              "number", f"fix {label} in tomograms.star") from None

    @property
    def pixel_size(self) -> float:
        """rlnTomoTiltSeriesPixelSize (Å per unbinned tilt-series pixel)."""
        return self._global("rlnTomoTiltSeriesPixelSize")

    @property
    def hand(self) -> float:
        """rlnTomoHand (±1; 1 if absent)."""
        return self._global("rlnTomoHand", 1.0)

    @property
    def tomogram_size(self) -> tuple[int, int, int]:
        """rlnTomoSizeX/Y/Z (unbinned tilt-series px)."""
        return tuple(int(round(self._global(f"rlnTomoSize{a}"))) for a in "XYZ")  # type: ignore[return-value]

    @property
    def defocus_slope(self) -> float:
        """rlnTomoDefocusSlope (1 if absent)."""
        return self._global("rlnTomoDefocusSlope", 1.0)

    @property
    def bfactor_per_dose(self) -> float:
        """rlnCtfBfactorPerElectronDose (0 if absent: critical-exposure dose weighting)."""
        return self._global("rlnCtfBfactorPerElectronDose", 0.0)

    @property
    def voltage(self) -> float:
        """rlnVoltage (kV)."""
        return self._global("rlnVoltage")

    @property
    def cs(self) -> float:
        """rlnSphericalAberration (mm)."""
        return self._global("rlnSphericalAberration")

    @property
    def amplitude_contrast(self) -> float:
        """rlnAmplitudeContrast."""
        return self._global("rlnAmplitudeContrast")

    @property
    def n_tilts(self) -> int:
        return len(self.tilts)

    # ------------------------------------------------------------------ per-tilt values
    def _column(self, label: str, default: float | None = None) -> np.ndarray:
        return _numbers(self.tilts, label, self._where, default)

    def tilt_angles(self) -> np.ndarray:
        """``[F, 3]`` (rlnTomoXTilt (0 if absent), rlnTomoYTilt, rlnTomoZRot) in degrees."""
        return np.stack([self._column("rlnTomoXTilt", 0.0), self._column("rlnTomoYTilt"),
                         self._column("rlnTomoZRot")], axis=1)

    def shifts_angst(self) -> np.ndarray:
        """``[F, 2]`` rlnTomoX/YShiftAngst (Å; 0 if absent)."""
        return np.stack([self._column("rlnTomoXShiftAngst", 0.0), self._column("rlnTomoYShiftAngst", 0.0)], axis=1)

    def pre_exposure(self) -> np.ndarray:
        """``[F]`` rlnMicrographPreExposure (e/Å² received before each tilt)."""
        return self._column(_PRE_EXPOSURE)

    def defocus(self) -> np.ndarray:
        """``[F, 3]`` (rlnDefocusU Å, rlnDefocusV Å (= U if absent), rlnDefocusAngle deg (0 if absent))."""
        u = self._column("rlnDefocusU")
        v = self._column("rlnDefocusV") if "rlnDefocusV" in self.tilts.columns else u.copy()
        return np.stack([u, v, self._column("rlnDefocusAngle", 0.0)], axis=1)

    def ctf_scale(self) -> np.ndarray:
        """``[F]`` rlnCtfScalefactor (1 if absent)."""
        return self._column("rlnCtfScalefactor", 1.0)

    def projection_matrices(self) -> torch.Tensor:
        """``[F, 4, 4]`` float64 projection matrices P_f (:func:`cryopipe.core.tilt_geometry.projection_matrices`)."""
        a = self.tilt_angles()
        return projection_matrices(a[:, 0], a[:, 1], a[:, 2], self.shifts_angst(), self.pixel_size,
                                   self.tomogram_size, self.image_size)

    # ------------------------------------------------------------------ images
    def _image_locations(self) -> tuple[np.ndarray, list[Path]]:
        """(0-based image index ``[F]``, file path per tilt) from rlnMicrographName; files are resolved once."""
        if "locations" not in self._image_cache:
            if "rlnMicrographName" not in self.tilts.columns:
                raise InputFileError(self._where, f"tomogram {self.name}: no rlnMicrographName column (tilt images)",
                                     "run motion correction / import the tilt images first")
            try:
                index, files = parse_image_names(self.tilts["rlnMicrographName"].astype(str).tolist())
            except CryopipeError as exc:
                raise InputFileError(self._where, f"tomogram {self.name}: {exc}", "fix rlnMicrographName") from None
            resolved: dict[str, Path] = {}
            for f in dict.fromkeys(files.tolist()):
                name = _image_file(f)
                p = self.root / name if not Path(name).is_absolute() else Path(name)
                if not p.exists() and self.star_file is not None:
                    p = resolve_path(name, self.star_file)
                resolved[f] = p
            self._image_cache["locations"] = (index, [resolved[f] for f in files.tolist()])
        return self._image_cache["locations"]

    def check_images(self) -> tuple[int, int]:
        """Check the tilt images (see module doc) and return their size ``(W, H)``; cached."""
        if "size" in self._image_cache:
            return self._image_cache["size"]
        index, paths = self._image_locations()
        if len(paths) == 0:
            raise InputFileError(self._where, f"tomogram {self.name} has no tilt images (empty per-tilt table)",
                                 "give at least one tilt")
        size = None
        for path in dict.fromkeys(paths):
            if not path.exists():
                row = paths.index(path)
                raise InputFileError(path, f"tilt image {row + 1} of tomogram {self.name} not found "
                                           f"({self.tilts['rlnMicrographName'].iloc[row]})",
                                     "check the path (relative paths are relative to the project directory)")
            info = mrc_info(path)
            n = info.shape[0]
            used = index[[i for i, p in enumerate(paths) if p == path]]
            if used.max() >= n:
                raise InputFileError(path, f"tomogram {self.name}: the STAR file refers to image {int(used.max()) + 1} "
                                           f"but the stack has {n} images", "the tilt count in the STAR file and the "
                                                                            "stack disagree: use the matching stack")
            header_px = info.pixel_size
            if header_px > 0 and abs(header_px - 1.0) > 1e-6 and \
                    abs(header_px - self.pixel_size) > 1e-3 * self.pixel_size:
                raise InputFileError(path, f"header pixel size {header_px:.4g} Å differs from "
                                           f"rlnTomoTiltSeriesPixelSize {self.pixel_size:.4g} Å of tomogram "
                                           f"{self.name}", "fix rlnTomoTiltSeriesPixelSize or the MRC header")
            this = (info.shape[2], info.shape[1])
            if size is not None and this != size:
                raise InputFileError(path, f"images are {this[0]}x{this[1]} but other tilts of tomogram "
                                           f"{self.name} are {size[0]}x{size[1]}", "all tilts need one size")
            size = this
        self._image_cache["size"] = size
        return size  # type: ignore[return-value]

    @property
    def image_size(self) -> tuple[int, int]:
        """``(W, H)`` of the tilt images (from the headers; checks the images, see :meth:`check_images`)."""
        return self.check_images()

    def read_images(self, tilts=None) -> np.ndarray:
        """Tilt images as float32 ``[F, H, W]`` (rows ``tilts`` of the per-tilt table, 0-based; all if None),
        from one stack or one MRC file per tilt."""
        W, H = self.check_images()
        index, paths = self._image_locations()
        rows = np.arange(len(paths)) if tilts is None else np.asarray(tilts, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(paths)):
            raise CryopipeError(f"tomogram {self.name}: tilt index out of range 0..{len(paths) - 1}")
        out = np.empty((rows.size, H, W), dtype=np.float32)
        by_file: dict[Path, list[int]] = {}
        for k, r in enumerate(rows.tolist()):
            by_file.setdefault(paths[r], []).append(k)
        for path, ks in by_file.items():
            with MrcStack(path) as stack:
                out[ks] = stack[index[rows[ks]]]
        return out


# ================================================================================================ tomogram set


@dataclass
class TomogramSet:
    """The tilt series of a ``tomograms.star``, by rlnTomoName in file order.

    ``tomograms["TS_01"]`` → :class:`TiltSeries` (one-line error listing the known names if unknown);
    iteration yields the tilt series.
    """

    tilt_series: dict[str, TiltSeries]
    path: Path | None = None

    def __getitem__(self, name: str) -> TiltSeries:
        try:
            return self.tilt_series[str(name)]
        except KeyError:
            known = ", ".join(self.tilt_series) or "none"
            raise InputFileError(self.path or "tomograms", f"unknown tomogram {name!r} (rlnTomoName; known: {known})",
                                 "use the tomograms.star the particles were picked in") from None

    def __contains__(self, name: object) -> bool:
        return str(name) in self.tilt_series

    def __iter__(self):
        return iter(self.tilt_series.values())

    def __len__(self) -> int:
        return len(self.tilt_series)

    @property
    def names(self) -> list[str]:
        return list(self.tilt_series)


def _global_rows(path: Path, blocks: dict) -> pd.DataFrame:
    table = blocks.get("global")
    if not isinstance(table, pd.DataFrame):
        raise InputFileError(path, "no data_global table", "give a RELION 4/5 tomograms.star (tomogram set)")
    if "rlnTomoName" not in table.columns:
        raise InputFileError(path, "data_global has no rlnTomoName column", "give a RELION tomograms.star")
    names = table["rlnTomoName"].astype(str)
    if names.duplicated().any():
        raise InputFileError(path, f"tomogram {names[names.duplicated()].iloc[0]} appears twice in data_global",
                             "give every tilt series its own rlnTomoName")
    return table


def _convert_matrices(ts: TiltSeries, where) -> None:
    """Replace rlnTomoProjX..W of ``ts.tilts`` by the equivalent XTilt/YTilt/ZRot + shifts (in place)."""
    t = ts.tilts
    P = np.array([[parse_vector(v, 4, where, f"tomogram {ts.name}, {lab}, tilt {i + 1}")
                   for lab, v in zip(_PROJ_LABELS, row)]
                  for i, row in enumerate(zip(*(t[lab].tolist() for lab in _PROJ_LABELS)))], dtype=np.float64)
    try:
        angles, shifts = decompose_projection_matrices(torch.from_numpy(P.reshape(-1, 4, 4)), ts.pixel_size,
                                                       ts.tomogram_size, ts.image_size)
    except CryopipeError as exc:
        raise InputFileError(where, f"tomogram {ts.name}: {exc}") from None
    values = np.concatenate([angles.numpy(), shifts.numpy()], axis=1)
    at = list(t.columns).index(_PROJ_LABELS[0])
    for j, lab in enumerate(_ANGLE_LABELS):
        if lab in t.columns:
            t[lab] = values[:, j]
        else:
            t.insert(at + j, lab, values[:, j])
    ts.tilts = t.drop(columns=list(_PROJ_LABELS))


def _tilt_table(blocks: dict, name: str, where) -> pd.DataFrame:
    table = blocks.get(name)
    if not isinstance(table, pd.DataFrame):
        raise InputFileError(where, f"no table data_{name} for tomogram {name}",
                             "each tilt series needs a per-tilt table named after its rlnTomoName")
    if _PRE_EXPOSURE not in table.columns:
        raise InputFileError(where, f"data_{name} has no {_PRE_EXPOSURE} column (dose before each tilt; RELION "
                                    "requires it)", "add the pre-exposure of every tilt")
    missing = [lab for lab in _PROJ_LABELS if lab not in table.columns]
    if 0 < len(missing) < 4:
        raise InputFileError(where, f"data_{name} has some rlnTomoProj columns but not {', '.join(missing)}",
                             "give all four rows rlnTomoProjX/Y/Z/W of the projection matrices")
    return table.copy()


def _read_relion5(path: Path, table: pd.DataFrame, root) -> dict[str, TiltSeries]:
    out = {}
    for row in table.to_dict("records"):
        name = str(row["rlnTomoName"])
        value = str(row["rlnTomoTiltSeriesStarFile"])
        base = project_root(value, path, root)
        ts_path = Path(value) if Path(value).is_absolute() else base / value
        if not ts_path.exists():
            raise InputFileError(ts_path, f"per-tilt STAR file of tomogram {name} not found (rlnTomoTiltSeriesStarFile "
                                          f"{value} in {path})", "check the path (relative to the project directory)")
        tilts = _tilt_table(read_star(ts_path), name, ts_path)
        out[name] = TiltSeries(name, {k: _python(v) for k, v in row.items()}, tilts, base, ts_path)
    return out


def _read_relion4(path: Path, blocks: dict, table: pd.DataFrame, root) -> dict[str, TiltSeries]:
    out = {}
    for row in table.to_dict("records"):
        name = str(row["rlnTomoName"])
        tilts = _tilt_table(blocks, name, path)
        if "rlnMicrographName" not in tilts.columns:
            if "rlnTomoTiltSeriesName" not in row:
                raise InputFileError(path, f"tomogram {name}: neither rlnTomoTiltSeriesStarFile nor "
                                           "rlnTomoTiltSeriesName (tilt-series stack)", "give a RELION 4 or 5 file")
            stack = str(row["rlnTomoTiltSeriesName"])
            stack_file = _image_file(stack)
            base = project_root(stack_file, path, root)
            stack_path = Path(stack_file) if Path(stack_file).is_absolute() else base / stack_file
            if not stack_path.exists():
                raise InputFileError(stack_path, f"tilt-series stack of tomogram {name} not found "
                                                 f"(rlnTomoTiltSeriesName in {path})", "check the path")
            n = mrc_info(stack_path).shape[0]
            count = int(row.get("rlnTomoFrameCount", len(tilts)))
            if not n == count == len(tilts):
                raise InputFileError(stack_path, f"tomogram {name}: the stack has {n} images but data_{name} lists "
                                                 f"{len(tilts)} tilts (rlnTomoFrameCount {count})",
                                     "the tilt count in the STAR file and the stack disagree: use the matching stack")
            tilts.insert(0, "rlnMicrographName", [f"{i + 1:06d}@{stack}" for i in range(len(tilts))])
        else:
            first = str(tilts["rlnMicrographName"].iloc[0])
            base = project_root(_image_file(first.partition("@")[2] if "@" in first else first), path, root)
        glob = {k: _python(v) for k, v in row.items() if k not in _R4_GLOBAL_LABELS}
        out[name] = TiltSeries(name, glob, tilts, base, path)
    return out


def read_tomograms(path: str | os.PathLike, root: str | os.PathLike | None = None) -> TomogramSet:
    """Read a tomogram set (RELION 5 or RELION 4 layout, auto-detected; see module doc).

    ``root``: project directory relative paths are resolved against (None: working directory, else the STAR
    file's directory and its parents). Raises one-line InputFileError for a missing file or table, a missing
    rlnMicrographPreExposure column, a RELION 4 stack whose image count differs from the tilt table, or a RELION 4
    matrix that is not a rotation plus an image shift.
    """
    path = Path(path)
    blocks = read_star(path)
    table = _global_rows(path, blocks)
    if "rlnTomoTiltSeriesStarFile" in table.columns:
        series = _read_relion5(path, table, root)
    else:
        series = _read_relion4(path, blocks, table, root)
    for ts in series.values():
        if all(lab in ts.tilts.columns for lab in _PROJ_LABELS):
            _convert_matrices(ts, ts.star_file or path)
    return TomogramSet(series, path)


def write_tomograms(path: str | os.PathLike, tomograms: TomogramSet, tilt_series_dir: str | os.PathLike | None = None
                    ) -> None:
    """Write ``tomograms`` in the RELION 5 layout: ``path`` (``data_global``) and one ``<name>.star`` per tilt
    series in ``tilt_series_dir`` (default ``<dir of path>/tilt_series``), ``# version 50001``.

    rlnTomoTiltSeriesStarFile is set to where the per-tilt file was written (relative to the working directory =
    project directory when below it, else absolute); every other value, image names included, is written as
    stored. All tilt series must have the same global columns.
    """
    path = Path(path)
    out_dir = Path(tilt_series_dir) if tilt_series_dir is not None else path.parent / "tilt_series"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for ts in tomograms:
        ts_path = out_dir / f"{ts.name}.star"
        write_star(ts_path, {ts.name: ts.tilts.reset_index(drop=True)}, version=RELION5_VERSION)
        row = dict(ts.globals)
        row["rlnTomoName"] = ts.name
        row["rlnTomoTiltSeriesStarFile"] = path_for_star(ts_path)
        rows.append(row)
    columns = list(dict.fromkeys(["rlnTomoName"] + [k for r in rows for k in r]))
    for r, ts in zip(rows, tomograms):
        missing = [c for c in columns if c not in r]
        if missing:
            raise CryopipeError(f"cannot write {path}: tomogram {ts.name} has no {missing[0]} while other tilt series "
                                "have it (give every tilt series the same global columns)")
    global_table = pd.DataFrame([[r[c] for c in columns] for r in rows], columns=columns)
    write_star(path, {"global": global_table}, version=RELION5_VERSION)


# Particles and optimisation sets live in cryopipe.io.tomo_particles (which uses this module); they are re-exported
# lazily so that either module can be imported first.
_REEXPORTED = frozenset({"TomoParticles", "read_tomo_particles", "write_tomo_particles", "check_inside",
                         "to_centered_coordinates", "read_optimisation_set", "write_optimisation_set",
                         "OPTIMISATION_SET_LABELS", "optimisation_set_entries", "is_optimisation_set",
                         "is_tomo_particles"})


def __getattr__(name: str):
    if name in _REEXPORTED:
        from cryopipe.io import tomo_particles

        return getattr(tomo_particles, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
