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
    "WorkGridMixin",
    "PickTable",
    "COORDINATE_COLUMNS",
    "strip_job_prefix",
    "coordinate_file_name",
    "picks_to_frame",
    "write_coordinate_file",
    "read_coordinate_file",
    "write_coordinate_list",
    "write_summary",
    "thumbnail",
    "draw_picks",
    "save_picks_png",
]

#: Column order of RELION's ``*_autopick.star`` files.
COORDINATE_COLUMNS = ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnClassNumber", "rlnAnglePsi"]


class WorkGridMixin:
    """Where a micrograph of ``shape`` (H, W) px lies on a square work grid of ``work_size`` px (FOM maps).

    For classes with attributes ``shape``, ``work_size`` and ``scale`` (= work_size / N, N the padded square
    micrograph size), as both pickers' map containers have. Arithmetic in float32, as RELION keeps these values.
    """

    def extent(self) -> tuple[int, int]:
        """``(int(H·scale), int(W·scale))`` in float32 arithmetic: the micrograph's extent on the work grid."""
        s = np.float32(self.scale)
        return int(np.float32(self.shape[0]) * s), int(np.float32(self.shape[1]) * s)

    def first_index(self) -> tuple[int, int]:
        """Work-grid array index of the micrograph's first row / column (RELION's ``FIRST_XMIPP_INDEX``)."""
        hy, wx = self.extent()
        return self.work_size // 2 - hy // 2, self.work_size // 2 - wx // 2


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


# ------------------------------------------------------------------------------------------------ pictures

def thumbnail(micrograph: torch.Tensor, max_side: int = 768, *, pixel_size: float | None = None,
              lowpass_A: float | None = None) -> tuple[np.ndarray, int]:
    """Block-averaged copy of a ``[H, W]`` micrograph with its larger side ``<= max_side``: ``(image, bin)``.

    ``bin`` is the integer binning factor (thumbnail pixel ``(i, j)`` covers micrograph pixels
    ``[i·bin, (i+1)·bin)``), so a micrograph coordinate ``x`` is at ``x / bin − 0.5 + 0.5/bin`` ≈ ``x / bin``.
    With ``pixel_size`` (Å) and ``lowpass_A`` (Å) the thumbnail is also low-passed there (as RELION's manual
    picking display, ``--lowpass 20``), so that particles at low SNR are visible under their circles; no filter
    when the binned Nyquist is already coarser than ``lowpass_A``.
    """
    from cryopipe.core.fourier import lowpass_real

    h, w = micrograph.shape
    b = max(1, int(np.ceil(max(h, w) / max_side)))
    img = micrograph.detach().to(torch.float32)
    if b > 1:
        img = torch.nn.functional.avg_pool2d(img[None, None], kernel_size=b, stride=b, ceil_mode=True)[0, 0]
    if pixel_size and lowpass_A and pixel_size * b / lowpass_A < 0.5:
        img = lowpass_real(img, pixel_size * b / lowpass_A, ndim=2)
    return img.cpu().numpy(), b


def draw_picks(ax, image: np.ndarray, bin_factor: int, picks: pd.DataFrame, radius_px: float | np.ndarray,
               title: str = "", vmin_fom: float | None = None, vmax_fom: float | None = None):
    """Draw a thumbnail with circles at the picks, coloured by ``rlnAutopickFigureOfMerit`` (matplotlib axes).

    Args:
        ax: matplotlib axes.
        image: thumbnail from :func:`thumbnail`.
        bin_factor: its binning factor.
        picks: coordinate table (:data:`COORDINATE_COLUMNS`; micrograph pixels).
        radius_px: circle radius in micrograph pixels (scalar or one per pick).
    Returns:
        the collection of circles (for a colour bar), or None when there are no picks.
    """
    from matplotlib.collections import EllipseCollection

    lo, hi = np.percentile(image, [1.0, 99.0])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(picks) == 0:
        return None
    x = picks["rlnCoordinateX"].to_numpy(dtype=float) / bin_factor - 0.5 + 0.5 / bin_factor
    y = picks["rlnCoordinateY"].to_numpy(dtype=float) / bin_factor - 0.5 + 0.5 / bin_factor
    r = np.broadcast_to(np.asarray(radius_px, dtype=float), x.shape) / bin_factor
    fom = picks["rlnAutopickFigureOfMerit"].to_numpy(dtype=float) if "rlnAutopickFigureOfMerit" in picks else np.zeros_like(x)
    coll = EllipseCollection(2 * r, 2 * r, np.zeros_like(r), units="xy", offsets=np.stack([x, y], 1),
                             transOffset=ax.transData, facecolors="none", cmap="viridis", linewidths=0.8)
    coll.set_array(fom)
    coll.set_edgecolor(None)
    coll.set_clim(vmin_fom if vmin_fom is not None else float(fom.min()),
                  vmax_fom if vmax_fom is not None else float(fom.max()) + 1e-12)
    ax.add_collection(coll)
    coll.set_facecolor("none")
    return coll


def save_picks_png(path: str | Path, panels: list[tuple[np.ndarray, int, pd.DataFrame, float | np.ndarray, str]],
                   suptitle: str = "") -> None:
    """Write a PNG (atomic) with one panel per ``(thumbnail, bin, picks, radius_px, title)``, circles coloured
    by FOM on a common scale with one colour bar."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    from cryopipe.io.atomic import atomic_path

    n = max(1, len(panels))
    ncol = min(n, 2)
    nrow = int(np.ceil(n / ncol))
    foms = [p[2]["rlnAutopickFigureOfMerit"].to_numpy(dtype=float) for p in panels
            if len(p[2]) and "rlnAutopickFigureOfMerit" in p[2]]
    allf = np.concatenate(foms) if foms else np.zeros(1)
    vmin, vmax = float(allf.min()), float(allf.max())
    fig = Figure(figsize=(5.0 * ncol, 5.0 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    coll = None
    for ax, (img, b, picks, rad, title) in zip(axes.ravel(), panels):
        c = draw_picks(ax, img, b, picks, rad, title, vmin, vmax)
        coll = c if c is not None else coll
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    if coll is not None:
        fig.colorbar(coll, ax=axes.ravel().tolist(), shrink=0.8, label="rlnAutopickFigureOfMerit")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
