"""``cryopipe star``: STAR-file utilities with ``relion_star_handler``'s option names.

One operation per call (as ``relion_star_handler``), file in → file out (``--i in.star --o out.star``); no job
folder is made (RELION's star handler is a command-line tool, not a pipeline job):

* ``--center --center_X x --center_Y y --center_Z z`` (reference pixels, from the box centre): re-centre the
  particles on that point of the reference. With the RELION Euler matrix ``A`` of each particle,
  ``origin ← origin − pixel_size · (A·c)`` (x, y; and z when the file has ``rlnOriginZAngst``) — exactly
  ``relion_star_handler --center`` (RELION-3.1+ files: origins in Å, pixel size of the particle's optics group;
  RELION-3.0 files: ``rlnOriginX/Y`` in pixels are shifted in pixels). Tomography particles (RELION 4/5): the
  same with 3D origins and ``A`` = Euler(rlnAngle*) only (origins are in the subtomogram frame); optics without
  rlnImagePixelSize use rlnTomoTiltSeriesPixelSize × rlnTomoSubtomogramBinning.
* ``--select rlnX --minval a --maxval b``: keep rows with ``a ≤ value ≤ b`` (inclusive, as RELION 3.1+);
  ``--select_by_str rlnX --select_include s | --select_exclude s``: rows whose string contains / lacks ``s``.
  ``*_model.star`` files select from ``data_model_classes``, as RELION.
* ``--discard_on_stats [--discard_label rlnImageName --discard_sigma 4]``: compute the mean and standard deviation
  of every image; drop images whose mean or stddev lies ``sigma`` ensemble standard deviations or more from the
  ensemble average (strict inequalities, population statistics, as RELION).
* ``--split --nr_split N | --size_split M [--random_order --random_seed S]``: RELION's rule (only ``N``: size
  ``ceil(n/N)``; only ``M``: ``ceil(n/M)`` files; both: ``N`` files of ``M`` rows, the rest dropped); outputs
  ``<out>_split1.star``, ``<out>_split2.star``, ….
* ``--combine --i "a.star b.star" [--check_duplicates rlnImageName]``: concatenate tables (glob patterns
  allowed). Optics groups are merged by ``rlnOpticsGroupName`` the way RELION does: the first file's groups keep
  their numbers, a group of a later file with a new name is appended with number = its position in the list of
  distinct names, a group whose name was seen before is joined to it, and the particles' ``rlnOpticsGroup`` are
  renumbered; ``rlnGroupName`` of later files becomes ``optics<N>_<name>``; ``rlnGroupNumber`` is removed; optics
  columns present in only some files are filled (beam tilt 0, identity mag. matrix, not CTF-premultiplied), and
  only columns present in every file are kept (others are dropped with a warning). *Deviation*: two groups with
  the same name but different pixel size / voltage / Cs / amplitude contrast / image size are an error here
  (RELION joins them silently, which corrupts the CTF of one data set).
* ``--remove_duplicates D [--image_angpix a]``: particles of the same micrograph (``rlnMicrographName`` or
  ``rlnTomoName``) whose centres ``rlnCoordinate − origin_Å/a`` lie within ``D`` Å (``D/a`` pixels) of a *later*
  particle are removed (RELION's rule: the last one of a cluster survives); ``a`` defaults to the pixel size of the
  first optics group. The removed rows go to ``<out>_removed.star``.
* ``--convert [--output_version 3.0|3.1]``: full RELION-3.0 ↔ 3.1 conversion (:mod:`cryopipe.io.particles`;
  ``relion_convert_star`` for 3.0 → 3.1); default target: the other layout of the input.
* ``--downgrade [--o out]``: RELION 3.1 → the 3.0 table that Warp/M read for sub-tomogram re-extraction, with the
  semantics of ``dynamo2m``'s ``relion_star_downgrade``: optics merged into the particles,
  ``rlnCoordinate{X,Y,Z} ← rlnCoordinate − rlnOrigin{X,Y,Z}Angst / rlnImagePixelSize`` and only the columns
  ``rlnMicrographName, rlnCoordinateX, rlnCoordinateY, rlnCoordinateZ, rlnAngleRot, rlnAngleTilt, rlnAnglePsi``
  (one unnamed ``data_`` block, no version line). Default output ``<stem>_rln3.0.star`` next to the input. 2D
  files (no ``rlnCoordinateZ``) give X/Y only; absent origins count as 0; ``--coord_angpix`` divides the origins
  by that pixel size instead of ``rlnImagePixelSize`` (for coordinates in another pixel size).

Every other block of the input (``data_optics``, general tables) and its STAR version line are kept. The table
operated on is ``data_particles`` / ``data_micrographs`` / ``data_movies`` / the unnamed ``data_`` block /
``data_model_classes``, or the one named by ``--i_tablename``.

Python API: the pure table functions (:func:`recenter_table`, :func:`select_range_mask`, :func:`select_str_mask`,
:func:`split_indices`, :func:`duplicate_mask`, :func:`image_stats_mask`, :func:`combine_tables`,
:func:`downgrade_table`) and the file-level ones (:func:`center_star`, :func:`select_star`, :func:`split_star`,
:func:`combine_stars`, :func:`remove_duplicates_star`, :func:`discard_on_stats_star`, :func:`convert_star`,
:func:`downgrade_star`).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import CryopipeError, InputFileError

HELP = ("STAR utilities as relion_star_handler: --center, --select, --split, --combine, --remove_duplicates, "
        "--discard_on_stats, --convert (3.0<->3.1), --downgrade (3.1 -> Warp/M 3.0)")

_MAIN_BLOCKS = ("particles", "micrographs", "movies", "", "model_classes")
_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
# optics columns RELION fills when only some of the combined files have them, with their neutral values
_OPTICS_FILL = {
    "rlnBeamTiltX": 0.0, "rlnBeamTiltY": 0.0,
    "rlnMagMat00": 1.0, "rlnMagMat01": 0.0, "rlnMagMat10": 0.0, "rlnMagMat11": 1.0,
    "rlnOddZernike": "[0,0,0,0,0,0]", "rlnEvenZernike": "[0,0,0,0,0,0,0,0,0]",
    "rlnCtfDataAreCtfPremultiplied": 0,
}
# optics values that must agree for two groups with the same name to be joined
_OPTICS_MUST_AGREE = ("rlnImagePixelSize", "rlnMicrographPixelSize", "rlnVoltage", "rlnSphericalAberration",
                      "rlnAmplitudeContrast", "rlnImageSize", "rlnImageDimensionality")


def _warn(msg: str) -> None:
    from cryopipe.pipeline.log import warn

    warn(msg)


def _say(msg: str) -> None:
    from cryopipe.pipeline.log import log

    log(msg)


# ================================================================================================ documents


@dataclass
class StarDoc:
    """A STAR file read for editing: all blocks, the version line, and which loop is the main table.

    Attributes:
        path: the file.
        blocks: every block by name (loops as DataFrames, key-value blocks as dicts), in file order.
        version: number of the ``# version`` line, None for RELION-3.0 files.
        key: name of the main table (``"particles"``, ``""``...).
    """

    path: Path
    blocks: dict
    version: int | None
    key: str

    @property
    def table(self) -> pd.DataFrame:
        return self.blocks[self.key]

    @property
    def optics(self) -> pd.DataFrame | None:
        o = self.blocks.get("optics")
        return o if isinstance(o, pd.DataFrame) and self.key != "optics" else None

    def with_table(self, table: pd.DataFrame) -> dict:
        """The blocks with the main table replaced (order kept)."""
        out = dict(self.blocks)
        out[self.key] = table.reset_index(drop=True)
        return out

    def particle_data(self):
        """The main table as :class:`cryopipe.io.particles.ParticleData` (3.1 model, same row order): the optics
        table of a 3.1 file, or the ``relion_convert_star`` conversion of a 3.0 table (used for pixel sizes)."""
        from cryopipe.io.particles import ParticleData, convert_30_to_31

        block_name = self.key if self.key in ("particles", "micrographs", "movies") else "particles"
        if self.optics is not None:
            return ParticleData(self.optics.copy(), self.table.copy(), block_name, "3.1", self.path, self.version)
        with warnings.catch_warnings():  # image sizes are not needed here
            warnings.simplefilter("ignore")
            optics, parts, kind = convert_30_to_31(self.table, self.path)
        return ParticleData(optics, parts, kind, "3.0", self.path, self.version)


def read_doc(path: str | os.PathLike, tablename: str | None = None) -> StarDoc:
    """Read ``path`` and pick its main table (``tablename`` or the first of particles, micrographs, movies, the
    unnamed block, model_classes; else the only loop besides optics)."""
    from cryopipe.io.star import read_star_with_version

    path = Path(path)
    blocks, version = read_star_with_version(path)
    loops = [k for k, v in blocks.items() if isinstance(v, pd.DataFrame)]
    if tablename is not None:
        if tablename not in loops:
            raise InputFileError(path, f"has no table data_{tablename} (tables: "
                                       f"{', '.join('data_' + k for k in loops) or 'none'})",
                                 "give an existing --i_tablename")
        return StarDoc(path, blocks, version, tablename)
    order = _MAIN_BLOCKS
    if path.name.endswith("_model.star"):
        order = ("model_classes",) + _MAIN_BLOCKS
    for k in order:
        if k in loops:
            return StarDoc(path, blocks, version, k)
    rest = [k for k in loops if k != "optics"]
    if len(rest) == 1:
        return StarDoc(path, blocks, version, rest[0])
    tables = ", ".join("data_" + k for k in loops) or "none"
    raise InputFileError(path, f"cannot tell which table to use (tables: {tables})", "name it with --i_tablename")


def _write_doc(path: str | os.PathLike, doc: StarDoc, table: pd.DataFrame) -> Path:
    from cryopipe.io.star import write_star

    path = Path(path)
    write_star(path, doc.with_table(table), version=doc.version)
    return path


def _insert_before_extension(path: str | os.PathLike, tag: str) -> Path:
    """RELION's ``insertBeforeExtension``: ``out.star`` + ``_split1`` → ``out_split1.star``."""
    p = Path(path)
    return p.with_name(p.stem + tag + p.suffix) if p.suffix else p.with_name(p.name + tag)


def _numeric_column(table: pd.DataFrame, label: str, where) -> np.ndarray:
    if label not in table.columns:
        raise InputFileError(where, f"no {label} column",
                             f"choose one of the table's columns: {', '.join(map(str, table.columns[:8]))}...")
    vals = pd.to_numeric(table[label], errors="coerce").to_numpy(float)
    if np.isnan(vals).any() and not table[label].isna().any():
        i = int(np.argmax(np.isnan(vals)))
        raise InputFileError(where, f"column {label} is not numeric (row {i + 1}: {table[label].iloc[i]!r})",
                             "select on a numeric column, or use --select_by_str for strings")
    return vals


# ================================================================================================ center


def recenter_table(table: pd.DataFrame, center_px: Sequence[float], pixel_size: np.ndarray | float | None = None,
                   where="<table>") -> pd.DataFrame:
    """``relion_star_handler --center`` on one table (a copy is returned).

    ``center_px``: ``(x, y, z)`` reference pixels from the box centre. Origins in Å (``rlnOriginX/YAngst`` and
    ``rlnOriginZAngst`` when present) need ``pixel_size`` (Å/px, scalar or per row); RELION-3.0 origins
    ``rlnOriginX/Y(/Z)`` (pixels) are shifted in pixels. Absent angle columns count as 0.
    """
    from cryopipe.core.geometry import recenter_origins

    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(table.columns):
        labels = ["rlnOriginXAngst", "rlnOriginYAngst"] + (["rlnOriginZAngst"] if "rlnOriginZAngst" in table else [])
        if pixel_size is None:
            raise InputFileError(where, "origins are in Å but there is no pixel size (no data_optics table)",
                                 "give a RELION 3.1+ particles file with data_optics")
        apix = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (len(table),))
    elif {"rlnOriginX", "rlnOriginY"} <= set(table.columns):
        labels = ["rlnOriginX", "rlnOriginY"] + (["rlnOriginZ"] if "rlnOriginZ" in table else [])
        apix = np.ones(len(table))
    else:
        raise InputFileError(where, "no rlnOriginXAngst/rlnOriginYAngst (or 3.0 rlnOriginX/Y) columns to re-centre",
                             "re-centring needs refined particles (angles and origins)")
    angles = np.stack([_numeric_column(table, a, where) if a in table else np.zeros(len(table)) for a in _ANGLES], 1)
    origins = np.stack([_numeric_column(table, lab, where) for lab in labels], 1)
    new = recenter_origins(torch.from_numpy(angles), torch.from_numpy(origins),
                           torch.as_tensor(list(center_px), dtype=torch.float64), torch.from_numpy(apix.copy()))
    out = table.copy()
    new_np = new.cpu().numpy()
    for j, lab in enumerate(labels):
        out[lab] = new_np[:, j]
    return out


def _pixel_sizes_or_none(doc: StarDoc) -> np.ndarray | None:
    from cryopipe.io.particles import pixel_sizes

    if doc.optics is None:
        return None
    data = doc.particle_data()
    optics = data.optics
    if data.pixel_size_label not in optics.columns and "rlnTomoTiltSeriesPixelSize" in optics.columns:
        # tomography particles whose optics have no image pixel size yet: reference pixel = tilt-series pixel ×
        # rlnTomoSubtomogramBinning (1 if absent), the pixel size extraction would give them
        binning = optics["rlnTomoSubtomogramBinning"] if "rlnTomoSubtomogramBinning" in optics.columns else 1.0
        data.optics = optics.assign(**{data.pixel_size_label: optics["rlnTomoTiltSeriesPixelSize"] * binning})
    return pixel_sizes(data)


def center_star(input_star, output_star, center_px: Sequence[float], tablename: str | None = None) -> Path:
    """Re-centre the particles of ``input_star`` on reference point ``center_px`` (pixels); writes ``output_star``.

    Tomography particle files (RELION 4/5 ``rlnTomoName`` + 3D origins) are re-centred like ``relion_star_handler``:
    3D origins, pixel size = rlnImagePixelSize of the optics group (else rlnTomoTiltSeriesPixelSize ×
    rlnTomoSubtomogramBinning), particle angles rlnAngle* only (origins live in the subtomogram frame, so
    rlnTomoSubtomogram* are not used); data_general and every other block are kept."""
    doc = read_doc(input_star, tablename)
    if doc.optics is None and "rlnTomoName" in doc.table.columns and "rlnOriginXAngst" in doc.table.columns:
        raise InputFileError(doc.path, "tomography particles without data_optics: the pixel size of the origins is "
                                       "unknown", "re-centre the particles.star written by subtomogram extraction "
                                                  "(it has data_optics with rlnImagePixelSize)")
    apix = None
    if "rlnOriginXAngst" in doc.table.columns:
        apix = _pixel_sizes_or_none(doc)
    table = recenter_table(doc.table, center_px, apix, where=doc.path)
    return _write_doc(output_star, doc, table)


# ================================================================================================ select


def select_range_mask(table: pd.DataFrame, label: str, minval: float = -99999999.0, maxval: float = 99999999.0,
                      where="<table>") -> np.ndarray:
    """Rows with ``minval ≤ label ≤ maxval`` (RELION's inclusive ``subsetMetaDataTable``)."""
    vals = _numeric_column(table, label, where)
    if minval > maxval:
        raise CryopipeError(f"--minval {minval} is larger than --maxval {maxval}: nothing could be selected")
    return (vals >= minval) & (vals <= maxval)


def select_str_mask(table: pd.DataFrame, label: str, include: str | None = None, exclude: str | None = None,
                    where="<table>") -> np.ndarray:
    """Rows whose ``label`` string contains ``include`` (or does not contain ``exclude``); exactly one given."""
    if (include is None) == (exclude is None):
        raise CryopipeError("--select_by_str needs exactly one of --select_include or --select_exclude")
    if label not in table.columns:
        raise InputFileError(where, f"no {label} column", "choose a string column of the table")
    found = table[label].astype(str).str.contains(include if include is not None else exclude, regex=False)
    found = found.to_numpy(bool)
    return found if include is not None else ~found


@dataclass
class SelectResult:
    output: Path
    n_input: int
    n_selected: int


def select_star(input_star, output_star, label: str | None = None, minval: float = -99999999.0,
                maxval: float = 99999999.0, *, str_label: str | None = None, include: str | None = None,
                exclude: str | None = None, tablename: str | None = None) -> SelectResult:
    """Keep the rows selected by value range (``label``) or by string (``str_label``) and write them."""
    doc = read_doc(input_star, tablename)
    if label is not None:
        mask = select_range_mask(doc.table, label, minval, maxval, where=doc.path)
    elif str_label is not None:
        mask = select_str_mask(doc.table, str_label, include, exclude, where=doc.path)
    else:
        raise CryopipeError("select: give --select LABEL or --select_by_str LABEL")
    out = _write_doc(output_star, doc, doc.table.loc[mask])
    return SelectResult(out, len(doc.table), int(mask.sum()))


# ================================================================================================ split


def split_indices(n: int, nr_split: int = -1, size_split: int = -1, random_order: bool = False,
                  random_seed: int = -1) -> list[np.ndarray]:
    """Row indices of each output of ``relion_star_handler --split`` (see module doc). ``random_seed < 0``: a
    fresh random order."""
    if n == 0:
        raise CryopipeError("--split: the input table is empty")
    if nr_split <= 0 and size_split <= 0:
        raise CryopipeError("--split needs --nr_split N or --size_split M (a positive number)")
    if nr_split <= 0:
        nr_split = math.ceil(n / size_split)
    elif size_split <= 0:
        size_split = math.ceil(n / nr_split)
    order = np.arange(n)
    if random_order:
        rng = np.random.default_rng(None if random_seed < 0 else random_seed)
        order = rng.permutation(n)
    return [order[i * size_split: min((i + 1) * size_split, n)] for i in range(nr_split)]


def split_star(input_star, output_star, nr_split: int = -1, size_split: int = -1, random_order: bool = False,
               random_seed: int = -1, tablename: str | None = None) -> list[Path]:
    """Write ``<output>_split1.star`` … (other blocks kept in each)."""
    doc = read_doc(input_star, tablename)
    parts = split_indices(len(doc.table), nr_split, size_split, random_order, random_seed)
    outs = []
    for i, idx in enumerate(parts):
        p = _write_doc(_insert_before_extension(output_star, f"_split{i + 1}"), doc, doc.table.iloc[idx])
        outs.append(p)
    return outs


# ================================================================================================ combine


def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Whitespace-separated names / glob patterns (RELION's ``--i "a.star b*.star"``) → files, in order."""
    out: list[Path] = []
    for item in inputs:
        for word in str(item).split():
            hits = sorted(glob.glob(word)) if glob.has_magic(word) else [word]
            if not hits:
                raise CryopipeError(f"--i {word}: no file matches this pattern")
            out.extend(Path(h) for h in hits)
    return out


def _common_columns(tables: Sequence[pd.DataFrame], what: str, names: Sequence) -> list[str]:
    first = list(tables[0].columns)
    common = [c for c in first if all(c in t.columns for t in tables[1:])]
    for t, name in zip(tables, names):
        dropped = [c for c in t.columns if c not in common]
        if dropped:
            _warn(f"combine: ignoring {', '.join(dropped)} of {name} ({what}): not present in all files")
    return common


def combine_tables(particles: Sequence[pd.DataFrame], optics: Sequence[pd.DataFrame | None],
                   names: Sequence = ()) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Concatenate particle tables and merge their optics tables as ``relion_star_handler --combine``.

    Args:
        particles: the tables, in order.
        optics: their optics tables (all DataFrames, or all None for tables without optics).
        names: file names for messages.

    Returns:
        ``(particles, optics)`` — optics None when the inputs had none.
    """
    names = list(names) or [f"input {i + 1}" for i in range(len(particles))]
    if len(particles) < 2:
        raise CryopipeError("--combine needs at least two input STAR files (--i \"a.star b.star\")")
    has_optics = [o is not None for o in optics]
    if any(has_optics) and not all(has_optics):
        raise CryopipeError("combine: some inputs have data_optics and some do not (internal: convert them first)")
    parts = [p.copy() for p in particles]
    merged_optics = None
    if all(has_optics):
        opt = [o.copy() for o in optics]
        for o, name in zip(opt, names):
            for lab in ("rlnOpticsGroup", "rlnOpticsGroupName"):
                if lab not in o.columns:
                    raise InputFileError(name, f"data_optics has no {lab} column",
                                         "RELION names every optics group (rlnOpticsGroupName)")
        uniq = [str(v) for v in opt[0]["rlnOpticsGroupName"]]
        first_by_name = {str(r["rlnOpticsGroupName"]): r for _, r in opt[0].iterrows()}
        for i in range(1, len(opt)):
            o, p = opt[i], parts[i]
            if "rlnOpticsGroup" not in p.columns:
                raise InputFileError(names[i], "the particles have no rlnOpticsGroup column",
                                     "add it (1 for one group)")
            old = p["rlnOpticsGroup"].to_numpy()
            new = old.copy()
            keep_rows = []
            for j, row in o.iterrows():
                name = str(row["rlnOpticsGroupName"])
                if name in uniq:
                    g = uniq.index(name) + 1
                    ref = first_by_name[name]
                    for lab in _OPTICS_MUST_AGREE:
                        if lab in o.columns and lab in ref.index and not _same_value(row[lab], ref[lab]):
                            raise InputFileError(names[i], f"optics group {name!r} has {lab} {row[lab]} but "
                                                           f"{ref[lab]} in an earlier file",
                                                 "give the groups different rlnOpticsGroupName values before "
                                                 "combining")
                    _say(f"combine: joining optics groups named {name} (group {g})")
                else:
                    uniq.append(name)
                    g = len(uniq)
                    first_by_name[name] = row
                    keep_rows.append(j)
                if int(row["rlnOpticsGroup"]) != g:
                    _say(f"combine: renumbering optics group {name} of {names[i]} from {int(row['rlnOpticsGroup'])} "
                         f"to {g}")
                new[old == row["rlnOpticsGroup"]] = g
                o.loc[j, "rlnOpticsGroup"] = g
            p["rlnOpticsGroup"] = new.astype(np.int64)
            if "rlnGroupName" in p.columns:
                p["rlnGroupName"] = ["optics" + str(int(g)) + "_" + str(s) for g, s in zip(new, p["rlnGroupName"])]
            opt[i] = o.loc[keep_rows]
        for lab, val in _OPTICS_FILL.items():
            present = [lab in o.columns for o in opt]
            if any(present) and not all(present):
                for o in opt:
                    if lab not in o.columns:
                        o[lab] = val
        opt_nonempty = [o for o in opt if len(o)]
        cols = _common_columns(opt_nonempty, "optics", names)
        merged_optics = pd.concat([o[cols] for o in opt_nonempty], ignore_index=True)
        merged_optics["rlnOpticsGroup"] = merged_optics["rlnOpticsGroup"].astype(np.int64)
    cols = _common_columns(parts, "particles", names)
    out = pd.concat([p[cols] for p in parts], ignore_index=True)
    if "rlnGroupNumber" in out.columns:
        out = out.drop(columns=["rlnGroupNumber"])
    return out, merged_optics


def _same_value(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


@dataclass
class CombineResult:
    output: Path
    n_per_input: list[int]
    n_total: int
    n_optics_groups: int
    n_duplicates: int


def combine_stars(inputs: Sequence[str | os.PathLike], output_star, check_duplicates: str | None = None,
                  tablename: str | None = None) -> CombineResult:
    """Combine several STAR files into ``output_star`` (see module doc). RELION-3.0 inputs are converted to 3.1
    when any input has optics; all-3.0 inputs give a 3.0 output."""
    from cryopipe.io.star import write_star

    paths = _expand_inputs(inputs)
    docs = [read_doc(p, tablename) for p in paths]
    any_optics = any(d.optics is not None for d in docs)
    if any_optics:  # RELION-3.0 inputs are converted (relion_convert_star) so that optics can be merged
        pdatas = [d.particle_data() for d in docs]
        kinds = [p.block_name for p in pdatas]
        tables, optics = [p.particles for p in pdatas], [p.optics for p in pdatas]
    else:
        kinds = [d.key for d in docs]
        tables, optics = [d.table for d in docs], [None] * len(docs)
    if len(set(kinds)) > 1:
        raise CryopipeError("combine: the inputs hold different kinds of tables ("
                            + ", ".join(f"{p}: data_{k}" for p, k in zip(paths, kinds)) + ")")
    kind = kinds[0]
    out, merged_optics = combine_tables(tables, optics, [str(p) for p in paths])
    n_dup = 0
    if check_duplicates:
        if check_duplicates not in out.columns:
            raise CryopipeError(f"--check_duplicates {check_duplicates}: the combined table has no such column "
                                "(it must be present in all input files)")
        dup = out[check_duplicates].duplicated(keep="first")
        n_dup = int(dup.sum())
        for v in out.loc[dup, check_duplicates].head(10):
            _warn(f"combine: duplicate entry {v}")
        if n_dup:
            _warn(f"combine: total number of duplicate {check_duplicates} entries: {n_dup}")
    output_star = Path(output_star)
    if merged_optics is not None:
        version = next((d.version for d in docs if d.optics is not None and d.version), 30001)
        write_star(output_star, {"optics": merged_optics, kind: out}, version=version)
    else:
        write_star(output_star, {kind: out}, version=docs[0].version)
    return CombineResult(output_star, [len(t) for t in tables], len(out),
                         0 if merged_optics is None else len(merged_optics), n_dup)


# ================================================================================================ duplicates


def particle_centres(data, extract_angpix: float) -> np.ndarray:
    """Particle centres in micrograph pixels ``[N, 2|3]``: ``rlnCoordinate − rlnOrigin…Angst / extract_angpix``
    (``data``: :class:`~cryopipe.io.particles.ParticleData`; z when ``rlnCoordinateZ`` exists)."""
    t = data.particles
    where = data.path or "<particles>"
    axes = "XYZ" if "rlnCoordinateZ" in t.columns else "XY"
    cols = []
    for a in axes:
        c = _numeric_column(t, f"rlnCoordinate{a}", where)
        o = _numeric_column(t, f"rlnOrigin{a}Angst", where) if f"rlnOrigin{a}Angst" in t else np.zeros(len(t))
        cols.append(c - o / extract_angpix)
    return np.stack(cols, axis=1)


def duplicate_mask(centres_px: np.ndarray, groups: Sequence, threshold_px: float) -> np.ndarray:
    """``True`` for rows to **keep**: RELION's ``removeDuplicatedParticles`` — a particle is removed when a later
    particle (file order) of the same group (micrograph) lies within ``threshold_px`` (≤) of it."""
    from scipy.spatial import cKDTree

    n = len(centres_px)
    keep = np.ones(n, dtype=bool)
    if n < 2 or threshold_px < 0:
        return keep
    codes, _ = pd.factorize(pd.Series(list(groups), dtype=object))
    # one KD-tree over all particles; different micrographs are put far apart along an extra axis
    sep = 4.0 * float(threshold_px) + 1.0
    pts = np.concatenate([np.asarray(centres_px, np.float64), (codes.astype(np.float64) * sep)[:, None]], axis=1)
    pairs = cKDTree(pts).query_pairs(float(threshold_px), output_type="ndarray")
    if len(pairs):
        pairs = pairs[codes[pairs[:, 0]] == codes[pairs[:, 1]]]
        keep[np.minimum(pairs[:, 0], pairs[:, 1])] = False
    return keep


@dataclass
class DuplicateResult:
    output: Path
    removed_file: Path
    n_input: int
    n_removed: int


def remove_duplicates_star(input_star, output_star, distance_A: float, image_angpix: float = -1.0,
                           tablename: str | None = None) -> DuplicateResult:
    """``relion_star_handler --remove_duplicates``: writes ``output_star`` and ``<output>_removed.star``."""
    from cryopipe.io.particles import pixel_sizes

    if not distance_A > 0:
        raise CryopipeError(f"--remove_duplicates {distance_A}: give a positive distance in Å")
    doc = read_doc(input_star, tablename)
    data = doc.particle_data()
    t = doc.table
    mic = "rlnMicrographName" if "rlnMicrographName" in t else ("rlnTomoName" if "rlnTomoName" in t else None)
    if mic is None:
        raise InputFileError(doc.path, "no rlnMicrographName or rlnTomoName column", "duplicates are looked for per "
                                                                                  "micrograph / tomogram")
    if image_angpix is None or image_angpix <= 0:
        groups_apix = pixel_sizes(data)
        image_angpix = float(groups_apix[0]) if len(groups_apix) else 1.0
        if data.optics is not None and len(data.optics) > 1:
            _warn("remove_duplicates: several optics groups; assuming the original micrographs of all of them had "
                  f"pixel size {image_angpix} Å (else split the file and remove duplicates per group)")
    centres = particle_centres(data, image_angpix)
    keep = duplicate_mask(centres, t[mic].astype(str).tolist(), distance_A / image_angpix)
    out = _write_doc(output_star, doc, t.loc[keep])
    removed = _write_doc(Path(output_star).with_name(Path(output_star).stem + "_removed.star"), doc, t.loc[~keep])
    return DuplicateResult(out, removed, len(t), int((~keep).sum()))


# ================================================================================================ image statistics


def image_stats(image_names: Sequence[str], root_dir: str | os.PathLike = ".", batch: int = 512,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of every image, ``([N], [N])`` float64 (batched, in torch)."""
    from cryopipe.core.device import resolve_device
    from cryopipe.io.mrc import ImageReader

    dev = resolve_device(device)
    reader = ImageReader(list(image_names), root_dir)
    n = len(reader)
    means = torch.empty(n, dtype=torch.float64)
    stds = torch.empty(n, dtype=torch.float64)
    try:
        for s in range(0, n, batch):
            idx = np.arange(s, min(n, s + batch))
            x = torch.from_numpy(reader.read(idx)).to(dev, torch.float64).reshape(len(idx), -1)
            means[s:s + len(idx)] = x.mean(dim=1).cpu()
            stds[s:s + len(idx)] = x.std(dim=1, unbiased=False).cpu()
    finally:
        reader.close()
    return means, stds


def image_stats_mask(means: torch.Tensor, stds: torch.Tensor, sigma: float = 4.0) -> np.ndarray:
    """Rows to keep: mean and stddev both strictly within ``sigma`` ensemble standard deviations of the ensemble
    averages (``relion_star_handler --discard_on_stats``)."""
    m, s = means.to(torch.float64), stds.to(torch.float64)
    mu_m, sd_m = m.mean(), m.std(unbiased=False)
    mu_s, sd_s = s.mean(), s.std(unbiased=False)
    ok = (m > mu_m - sigma * sd_m) & (m < mu_m + sigma * sd_m) & (s > mu_s - sigma * sd_s) & (s < mu_s + sigma * sd_s)
    return ok.cpu().numpy()


def _image_root(doc: StarDoc, names: Sequence[str]) -> Path:
    """Directory image names are relative to: the current directory (RELION projects), else the STAR's."""
    from cryopipe.io.mrc import parse_image_name

    if not len(names):
        return Path(".")
    _, f = parse_image_name(str(names[0]))
    if Path(f).is_absolute() or Path(f).exists():
        return Path(".")
    if (doc.path.parent / f).exists():
        return doc.path.parent
    raise InputFileError(doc.path, f"image file {f} not found (relative to the current directory or the STAR "
                                   "file's directory)", "run from the RELION project directory")


def discard_on_stats_star(input_star, output_star, label: str = "rlnImageName", sigma: float = 4.0,
                          tablename: str | None = None) -> SelectResult:
    """Drop images with outlying mean/stddev (see :func:`image_stats_mask`) and write the rest."""
    doc = read_doc(input_star, tablename)
    if label not in doc.table.columns:
        raise InputFileError(doc.path, f"no {label} column", "give the image column with --discard_label")
    names = doc.table[label].astype(str).tolist()
    means, stds = image_stats(names, _image_root(doc, names))
    _say(f"discard_on_stats: [average, stddev] of the image averages = [{float(means.mean()):.6g}, "
         f"{float(means.std(unbiased=False)):.6g}], of the image stddevs = [{float(stds.mean()):.6g}, "
         f"{float(stds.std(unbiased=False)):.6g}]")
    keep = image_stats_mask(means, stds, sigma)
    out = _write_doc(output_star, doc, doc.table.loc[keep])
    return SelectResult(out, len(doc.table), int(keep.sum()))


# ================================================================================================ 3.0 / 3.1


def convert_star(input_star, output_star, output_version: str | None = None) -> Path:
    """Full RELION 3.0 ↔ 3.1 conversion (default: the other layout of the input)."""
    from cryopipe.io.particles import read_particles, write_particles

    data = read_particles(input_star)
    if output_version is None:
        output_version = "3.1" if data.source_version == "3.0" else "3.0"
    if output_version not in ("3.0", "3.1"):
        raise CryopipeError(f"--output_version {output_version}: use 3.0 or 3.1")
    star_version = data.file_version if (data.source_version == "3.1" and data.file_version) else 30001
    write_particles(output_star, data, version=output_version, star_version=star_version)
    return Path(output_star)


def downgrade_table(data, coord_angpix: float | None = None) -> pd.DataFrame:
    """The Warp/M RELION-3.0 table of ``data`` (:class:`~cryopipe.io.particles.ParticleData`), ``dynamo2m``
    ``relion_star_downgrade`` semantics (see module doc)."""
    from cryopipe.io.particles import pixel_sizes

    t = data.particles
    where = data.path or "<particles>"
    for lab in ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY") + _ANGLES:
        if lab not in t.columns:
            raise InputFileError(where, f"no {lab} column",
                                 "Warp/M need rlnMicrographName, coordinates and angles of refined particles")
    apix = pixel_sizes(data) if coord_angpix is None else np.full(len(t), float(coord_angpix))
    axes = "XYZ" if "rlnCoordinateZ" in t.columns else "XY"
    out = pd.DataFrame({"rlnMicrographName": t["rlnMicrographName"].astype(str).to_numpy()})
    for a in axes:
        c = _numeric_column(t, f"rlnCoordinate{a}", where)
        o = _numeric_column(t, f"rlnOrigin{a}Angst", where) if f"rlnOrigin{a}Angst" in t else np.zeros(len(t))
        out[f"rlnCoordinate{a}"] = c - o / apix
    for a in _ANGLES:
        out[a] = _numeric_column(t, a, where)
    return out


def downgrade_output_path(input_star: str | os.PathLike) -> Path:
    """``dynamo2m``'s default: ``<dir>/<stem>_rln3.0.star``."""
    p = Path(input_star)
    return p.parent / (p.stem + "_rln3.0.star")


def downgrade_star(input_star, output_star=None, coord_angpix: float | None = None) -> Path:
    """Write the Warp/M 3.0 table of ``input_star`` (default output ``<stem>_rln3.0.star``)."""
    from cryopipe.io.particles import read_particles
    from cryopipe.io.star import write_star

    data = read_particles(input_star)
    out = Path(output_star) if output_star else downgrade_output_path(input_star)
    write_star(out, {"": downgrade_table(data, coord_angpix)}, version=None)
    return out


# ================================================================================================ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("General")
    g.add_argument("--i", dest="input", nargs="+", required=True,
                   help="input STAR file (--combine: several files or a quoted list/glob \"a.star b*.star\")")
    g.add_argument("--o", dest="output", default=None, help="output STAR file (--split: root of the _splitN files)")
    g.add_argument("--i_tablename", default=None, help="operate on this table (default: particles / micrographs / "
                                                       "movies / unnamed / model_classes)")
    c = p.add_argument_group("Center")
    c.add_argument("--center", action="store_true", help="re-centre particles on a point of the reference")
    c.add_argument("--center_X", type=float, default=0.0, help="x of that point (reference pixels from the centre)")
    c.add_argument("--center_Y", type=float, default=0.0, help="y of that point (pixels)")
    c.add_argument("--center_Z", type=float, default=0.0, help="z of that point (pixels)")
    s = p.add_argument_group("Select")
    s.add_argument("--select", default=None, help="numeric column to select on, e.g. rlnCtfFigureOfMerit")
    s.add_argument("--minval", type=float, default=-99999999.0, help="minimum value (inclusive)")
    s.add_argument("--maxval", type=float, default=99999999.0, help="maximum value (inclusive)")
    s.add_argument("--select_by_str", default=None, help="string column to select on, e.g. rlnMicrographName")
    s.add_argument("--select_include", default=None, help="keep rows whose --select_by_str contains this")
    s.add_argument("--select_exclude", default=None, help="keep rows whose --select_by_str does not contain this")
    d = p.add_argument_group("Discard on image statistics")
    d.add_argument("--discard_on_stats", action="store_true", help="discard images with outlying mean/stddev")
    d.add_argument("--discard_label", default="rlnImageName", help="column with the images")
    d.add_argument("--discard_sigma", type=float, default=4.0, help="discard beyond this many ensemble sigmas")
    m = p.add_argument_group("Combine")
    m.add_argument("--combine", action="store_true", help="combine the --i files (optics groups merged by name)")
    m.add_argument("--check_duplicates", default=None, help="warn about duplicate values of this column")
    sp = p.add_argument_group("Split")
    sp.add_argument("--split", action="store_true", help="split into several files")
    sp.add_argument("--nr_split", type=int, default=-1, help="this many files")
    sp.add_argument("--size_split", type=int, default=-1, help="and/or this many rows per file")
    sp.add_argument("--random_order", action="store_true", help="split a random permutation of the rows")
    sp.add_argument("--random_seed", type=int, default=-1, help="seed of --random_order (negative: random)")
    dd = p.add_argument_group("Duplicates")
    dd.add_argument("--remove_duplicates", type=float, default=-1.0,
                    help="remove particles closer than this (Å) in the same micrograph; negative: off")
    dd.add_argument("--image_angpix", type=float, default=-1.0,
                    help="pixel size (Å) of the micrographs the particles were extracted from (default: optics "
                         "group 1)")
    v = p.add_argument_group("Versions")
    v.add_argument("--convert", action="store_true", help="convert RELION 3.0 <-> 3.1 (relion_convert_star)")
    v.add_argument("--output_version", choices=("3.0", "3.1"), default=None,
                   help="layout --convert writes (default: the other one)")
    v.add_argument("--downgrade", action="store_true",
                   help="3.1 -> the 3.0 table Warp/M expect (dynamo2m relion_star_downgrade); default output "
                        "<stem>_rln3.0.star")
    v.add_argument("--coord_angpix", type=float, default=None,
                   help="--downgrade: divide origins by this pixel size (Å) instead of rlnImagePixelSize")


_OPS = ("center", "select", "select_by_str", "discard_on_stats", "combine", "split", "remove_duplicates", "convert",
        "downgrade")


def _chosen_ops(args: argparse.Namespace) -> list[str]:
    chosen = []
    for op in _OPS:
        val = getattr(args, op)
        if op == "remove_duplicates":
            if val is not None and val > 0:
                chosen.append(op)
        elif val:
            chosen.append(op)
    return chosen


def main(args: argparse.Namespace) -> int:
    ops = _chosen_ops(args)
    if len(ops) != 1:
        raise CryopipeError("give exactly one of --center, --select, --select_by_str, --discard_on_stats, --combine, "
                            f"--split, --remove_duplicates, --convert, --downgrade (got {len(ops)}: "
                            f"{', '.join('--' + o for o in ops) or 'none'})")
    op = ops[0]
    inputs = [str(x) for x in args.input]
    if op != "combine":
        files = _expand_inputs(inputs)
        if len(files) != 1:
            raise CryopipeError(f"--{op} takes one input file (--i), got {len(files)} (only --combine takes several)")
        src = files[0]
    if op != "downgrade" and not args.output:
        raise CryopipeError(f"--{op}: give the output file with --o")

    if op == "center":
        out = center_star(src, args.output, (args.center_X, args.center_Y, args.center_Z), args.i_tablename)
        _say(f"star --center ({args.center_X}, {args.center_Y}, {args.center_Z}) px: written {out}")
    elif op in ("select", "select_by_str"):
        res = select_star(src, args.output, args.select, args.minval, args.maxval, str_label=args.select_by_str,
                          include=args.select_include, exclude=args.select_exclude, tablename=args.i_tablename)
        _say(f"star --{op}: {res.n_selected} of {res.n_input} rows written to {res.output}")
    elif op == "discard_on_stats":
        res = discard_on_stats_star(src, args.output, args.discard_label, args.discard_sigma, args.i_tablename)
        _say(f"star --discard_on_stats: discarded {res.n_input - res.n_selected} of {res.n_input} images; "
             f"written {res.output}")
    elif op == "combine":
        res = combine_stars(inputs, args.output, args.check_duplicates, args.i_tablename)
        _say(f"star --combine: {' + '.join(map(str, res.n_per_input))} = {res.n_total} rows, "
             f"{res.n_optics_groups} optics group(s): written {res.output}")
    elif op == "split":
        outs = split_star(src, args.output, args.nr_split, args.size_split, args.random_order, args.random_seed,
                          args.i_tablename)
        _say(f"star --split: written {len(outs)} files {outs[0]} ... {outs[-1]}")
    elif op == "remove_duplicates":
        res = remove_duplicates_star(src, args.output, args.remove_duplicates, args.image_angpix, args.i_tablename)
        _say(f"star --remove_duplicates: removed {res.n_removed} of {res.n_input} particles; written {res.output} "
             f"(removed ones: {res.removed_file})")
    elif op == "convert":
        out = convert_star(src, args.output, args.output_version)
        _say(f"star --convert: written {out}")
    else:
        out = downgrade_star(src, args.output, args.coord_angpix)
        _say(f"star --downgrade: written {out} (RELION 3.0 layout for Warp/M)")
    return 0
