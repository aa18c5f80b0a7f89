"""What every picker shares: the pick table, RELION's coordinate-file names, and the coordinate STAR files.

Conventions (RELION's):

* Coordinates are in **pixels of the input micrograph**, ``x`` = column, ``y`` = row, origin at the first
  pixel (``rlnCoordinateX/Y``); they may be fractional (LoG picks on a shrunk grid are ``index / scale``).
* A micrograph ``Some/job003/Movies/a.mrc`` gets the coordinate file
  ``<odir>/Movies/a_<pickname>.star``: the ``Type/jobNNN/`` part of the micrograph path is dropped (RELION's
  ``decomposePipelineFileName``), the rest is kept, so identically named micrographs from different folders
  do not collide.
* Per-micrograph coordinate file: one unnamed data block with ``rlnCoordinateX``, ``rlnCoordinateY``,
  ``rlnAutopickFigureOfMerit``, ``rlnClassNumber``, ``rlnAnglePsi`` (in that order, as RELION writes them).
* List file ``<odir>/<pickname>.star``: table ``coordinate_files`` with ``rlnMicrographName`` and
  ``rlnMicrographCoordinates``, one row per micrograph that has a coordinate file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch

__all__ = [
    "PickTable",
    "COORDINATE_COLUMNS",
    "strip_job_prefix",
    "coordinate_file_name",
    "picks_to_frame",
    "write_coordinate_file",
    "read_coordinate_file",
    "write_coordinate_list",
    "write_summary",
]

#: Column order of RELION's ``*_autopick.star`` files.
COORDINATE_COLUMNS = ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnClassNumber", "rlnAnglePsi"]


@dataclass
class PickTable:
    """Picks on one micrograph, in the order the picker emitted them (LoG: decreasing FOM).

    All fields are 1D tensors of the same length on one device.

    Attributes:
        x, y: coordinates in pixels of the input micrograph (``x`` = column, ``y`` = row, 0-based, may be
            fractional).
        fom: figure of merit (``rlnAutopickFigureOfMerit``; LoG: filter response in units of the normalised
            micrograph).
        diameter: diameter (Å) of the filter / reference that gave the FOM (LoG: best blob diameter).
        class_number: ``rlnClassNumber`` (LoG: 0; template picking: reference number, 1-based).
        psi: ``rlnAnglePsi`` in degrees (LoG: 0).
    """

    x: torch.Tensor
    y: torch.Tensor
    fom: torch.Tensor
    diameter: torch.Tensor
    class_number: torch.Tensor = field(default=None)  # type: ignore[assignment]
    psi: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.class_number is None:
            self.class_number = torch.zeros(n, dtype=torch.int64, device=self.x.device)
        if self.psi is None:
            self.psi = torch.zeros(n, dtype=self.fom.dtype, device=self.x.device)
        for name in ("y", "fom", "diameter", "class_number", "psi"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"PickTable.{name} has {getattr(self, name).shape[0]} rows, x has {n}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> "PickTable":
        z = torch.zeros(0, dtype=torch.float64, device=device)
        return cls(x=z, y=z.clone(), fom=z.clone(), diameter=z.clone())

    def select(self, index: torch.Tensor) -> "PickTable":
        """Rows ``index`` (boolean mask or integer indices)."""
        return PickTable(x=self.x[index], y=self.y[index], fom=self.fom[index], diameter=self.diameter[index],
                         class_number=self.class_number[index], psi=self.psi[index])

    def sorted_by_fom(self) -> "PickTable":
        """Rows in decreasing FOM (stable)."""
        order = torch.sort(self.fom, descending=True, stable=True).indices
        return self.select(order)

    def xy(self) -> torch.Tensor:
        """``[n, 2]`` coordinates ``(x, y)`` in pixels."""
        return torch.stack([self.x, self.y], dim=1)


def picks_to_frame(picks: PickTable) -> pd.DataFrame:
    """RELION coordinate table (columns :data:`COORDINATE_COLUMNS`) of ``picks``."""
    return pd.DataFrame({
        "rlnCoordinateX": picks.x.detach().cpu().double().numpy(),
        "rlnCoordinateY": picks.y.detach().cpu().double().numpy(),
        "rlnAutopickFigureOfMerit": picks.fom.detach().cpu().double().numpy(),
        "rlnClassNumber": picks.class_number.detach().cpu().long().numpy(),
        "rlnAnglePsi": picks.psi.detach().cpu().double().numpy(),
    }, columns=COORDINATE_COLUMNS)


def strip_job_prefix(micrograph_name: str) -> str:
    """The part of a pipeline file name after its ``Type/jobNNN/`` folder (RELION's ``fn_post``).

    ``"MotionCorr/job002/Movies/a.mrc" -> "Movies/a.mrc"``; a name without a ``jobNNN/`` folder is returned
    unchanged (``"Micrographs/a.mrc"``). Only a ``jobNNN`` folder that follows another folder counts, as in
    RELION (``Type/jobNNN/``).
    """
    name = str(PurePosixPath(micrograph_name))
    m = re.search(r"/job\d{3}/", name)
    if m is None:
        return name
    return name[m.end():]


def coordinate_file_name(micrograph_name: str, odir: str | Path, pickname: str = "autopick") -> str:
    """RELION's coordinate file for a micrograph: ``<odir>/<name without Type/jobNNN/ and extension>_<pickname>.star``.

    Returned as a POSIX string relative to the same directory the micrograph name is relative to (the
    project directory), e.g. ``("Micrographs/mic001.mrc", "AutoPick/") -> "AutoPick/Micrographs/mic001_autopick.star"``.
    """
    post = PurePosixPath(strip_job_prefix(micrograph_name))
    stem = post.with_suffix("") if post.suffix else post
    odir_s = str(odir).replace("\\", "/")
    if odir_s and not odir_s.endswith("/"):
        odir_s += "/"
    return f"{odir_s}{stem.as_posix()}_{pickname}.star"


def write_coordinate_file(path: str | Path, picks: PickTable) -> None:
    """Write one micrograph's picks as a RELION coordinate STAR file (atomic; parent folders created)."""
    from cryopipe.io.star import write_star

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_star(path, {"": picks_to_frame(picks)})


def read_coordinate_file(path: str | Path) -> pd.DataFrame:
    """The coordinate table of a RELION coordinate STAR file (first loop block; empty frame if none)."""
    from cryopipe.io.star import read_star

    blocks = read_star(path)
    for block in blocks.values():
        if isinstance(block, pd.DataFrame):
            return block
    return pd.DataFrame(columns=COORDINATE_COLUMNS)


def write_coordinate_list(path: str | Path, micrograph_names: list[str], coordinate_files: list[str]) -> None:
    """Write RELION's coordinate list file (table ``coordinate_files``) atomically."""
    from cryopipe.io.star import write_star

    frame = pd.DataFrame({"rlnMicrographName": list(micrograph_names),
                          "rlnMicrographCoordinates": list(coordinate_files)},
                         columns=["rlnMicrographName", "rlnMicrographCoordinates"])
    write_star(Path(path), {"coordinate_files": frame})


def write_summary(path: str | Path, micrograph_names: list[str], mean_fom: list[float], n_picks: list[int]) -> None:
    """Write RELION's ``summary.star`` (mean FOM and number of picks per micrograph) atomically."""
    from cryopipe.io.star import write_star

    frame = pd.DataFrame({"rlnMicrographName": list(micrograph_names),
                          "rlnAutopickFigureOfMerit": np.asarray(mean_fom, dtype=np.float64),
                          "rlnGroupNrParticles": np.asarray(n_picks, dtype=np.int64)},
                         columns=["rlnMicrographName", "rlnAutopickFigureOfMerit", "rlnGroupNrParticles"])
    write_star(Path(path), {"": frame})
