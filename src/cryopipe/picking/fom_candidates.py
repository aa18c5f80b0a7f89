"""Pick candidates from the LoG FOM maps that ``autopick --LoG --write_fom_maps`` stored, for re-thresholding
without re-running the picker (the project viewer's threshold slider).

The LoG picker emits picks greedily in decreasing figure of merit, and a pixel below the threshold can neither be
picked nor suppress a neighbour that would otherwise be picked before it. So the picks at threshold ``t`` are exactly
the picks at any lower threshold whose FOM is ``>= t``: one greedy pass at the lowest threshold (all positive maxima),
kept in emission order, answers every higher threshold by a cut. The cut is exact down to the FOM of the last
candidate kept (``max_candidates``). Picks that a contamination mask (``--contamination_mask``) removed after
picking are candidates here, because the mask is not part of the FOM maps.

Files (next to the coordinate file ``<root>_<pickname>.star``): ``<root>_<pickname>_bestLoG.mrc`` (best filter
response) and ``<root>_<pickname>_bestSize.mrc`` (its diameter, Å), both ``[work, work]`` on the LoG work grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cryopipe.io.mrc import read_mrc
from cryopipe.picking.common import PickTable
from cryopipe.picking.log import LoGMaps, log_diameters, log_pick_from_maps

__all__ = ["log_map_paths", "read_log_maps", "log_candidates"]


def log_map_paths(coordinate_file: str | os.PathLike) -> tuple[Path, Path]:
    """``(bestLoG, bestSize)`` map paths written by ``--write_fom_maps`` for ``coordinate_file`` (``.star``)."""
    base = str(coordinate_file)
    base = base[: -len(".star")] if base.endswith(".star") else base
    return Path(f"{base}_bestLoG.mrc"), Path(f"{base}_bestSize.mrc")


def read_log_maps(coordinate_file: str | os.PathLike, micrograph_shape: tuple[int, int], diam_min: float,
                  diam_max: float, max_search: float = 5.0) -> LoGMaps | None:
    """The :class:`LoGMaps` stored for ``coordinate_file`` (None when ``--write_fom_maps`` was not used).

    Args:
        micrograph_shape: ``(H, W)`` of the picked micrograph (pixels).
        diam_min, diam_max, max_search: the job's ``--LoG_diam_min/max`` (Å) and ``--Log_max_search``.
    """
    fom_path, size_path = log_map_paths(coordinate_file)
    if not (fom_path.is_file() and size_path.is_file()):
        return None
    fom, _ = read_mrc(fom_path)
    diameter, _ = read_mrc(size_path)
    work = int(fom.shape[-1])
    h, w = (int(v) for v in micrograph_shape)
    n = max(h, w)
    return LoGMaps(best_fom=torch.from_numpy(np.ascontiguousarray(fom.reshape(work, work))),
                   best_diameter=torch.from_numpy(np.ascontiguousarray(diameter.reshape(work, work))),
                   diameters=log_diameters(diam_min, diam_max, max_search), work_size=work,
                   scale=float(np.float32(work) / np.float32(n)), size=n, shape=(h, w))


def log_candidates(maps: LoGMaps, pixel_size: float, diam_min: float, diam_max: float, *,
                   upper_threshold: float = 99999.0, neighbour: float = 100.0, skip_side: int = 0,
                   robust_threshold: bool = False, max_candidates: int = 2000) -> PickTable:
    """All positive maxima of ``maps`` in the LoG picker's emission order (decreasing FOM), at most
    ``max_candidates``: cutting them at ``fom >= t`` gives the picks of threshold ``t`` (module docstring). The
    keyword options are the job's (``--LoG_upper_threshold``, ``--LoG_neighbour``, ``--skip_side``,
    ``--LoG_robust_threshold``); the adjust threshold is replaced by the lowest possible one."""
    picks = log_pick_from_maps(maps, pixel_size, diam_min, diam_max, adjust_threshold=-1e30,
                               upper_threshold=upper_threshold, neighbour=neighbour, skip_side=skip_side,
                               robust_threshold=robust_threshold)
    keep = slice(0, max(int(max_candidates), 0))
    return PickTable(x=picks.x[keep], y=picks.y[keep], fom=picks.fom[keep], diameter=picks.diameter[keep])
