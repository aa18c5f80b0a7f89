"""A STAR file read for editing (:class:`StarDoc`): its blocks, version line and main table, and the small
helpers the STAR operations share (input lists, numeric columns, output names)."""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryopipe.errors import CryopipeError, InputFileError


_MAIN_BLOCKS = ("particles", "micrographs", "movies", "", "model_classes")


def _warn(msg: str) -> None:
    from cryopipe.pipeline.log import warn

    warn(msg)


def _say(msg: str) -> None:
    from cryopipe.pipeline.log import log

    log(msg)


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
    """:func:`cryopipe.io.star.numeric_column` (finite numbers only) with the STAR tools' remedy."""
    from cryopipe.io.star import numeric_column

    return numeric_column(table, label, where, finite=True,
                          remedy="select on a numeric column, or use --select_by_str for strings; fix or remove rows "
                                 "without a finite number")


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
