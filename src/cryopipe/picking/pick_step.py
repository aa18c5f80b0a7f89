"""The unit of work of ``cryopipe autopick`` as a pure per-chunk step (issue 15 item 3).

:func:`pick_micrographs` picks a list of micrographs and writes each one's coordinate file (atomically) at its
final path; it returns per micrograph the coordinate file and the number of picks. It runs in this process or on
Dask workers (:mod:`cryopipe.engine.backend`); the main process writes the list file, the summary and the pictures
in micrograph order, so the outputs do not depend on where the micrographs were picked. Every random draw of a
picker is seeded by the micrograph's index in the input (:class:`~cryopipe.picking.driver.MicrographContext`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cryopipe.picking.driver import MicrographContext, PickFunction, _png_for, pick_one_micrograph
from cryopipe.picking.common import write_coordinate_file

__all__ = ["PickInputs", "PickItem", "PickedMicrograph", "pick_micrographs"]


@dataclass
class PickInputs:
    """What every chunk needs (sent once per run).

    Attributes:
        picker: the picking function (a closure over its options and references; pickled by value).
        pixel_size: Å per micrograph pixel.
        png_per_mic: also write ``<coordinate file>.png``; display_diameter: circle diameter (Å) in it.
    """

    picker: PickFunction
    pixel_size: float
    png_per_mic: bool = False
    display_diameter: float | None = None


@dataclass(frozen=True)
class PickItem:
    """One micrograph: its context (index in the input, name, CTF), its file and its coordinate file (absolute)."""

    ctx: MicrographContext
    path: str
    coord_path: str


@dataclass(frozen=True)
class PickedMicrograph:
    """What picking one micrograph gave: its index in the input, coordinate file and number of picks."""

    index: int
    coord_path: str
    n_picks: int


def pick_micrographs(inputs: PickInputs, snapshot, items: list[PickItem], device=None) -> list[PickedMicrograph]:
    """Pick ``items`` one after another on ``device`` (default CPU) and write their coordinate files (and PNGs);
    ``snapshot`` is unused (picking has no model). Returns one :class:`PickedMicrograph` per item, in order."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = []
    for it in items:
        picks = pick_one_micrograph(Path(it.path), inputs.picker, inputs.pixel_size, it.ctx, dev)
        coord = Path(it.coord_path)
        write_coordinate_file(coord, picks)
        if inputs.png_per_mic:
            _png_for(coord, [(Path(it.path), it.ctx.name, coord)], inputs.pixel_size, inputs.display_diameter)
        out.append(PickedMicrograph(it.ctx.index, str(coord), len(picks)))
    return out
