"""Peak selection on figure-of-merit maps.

:func:`greedy_disc_suppression` is RELION's LoG peak picking (``autoPickLoGOneMicrograph``): repeatedly take
the global maximum of the FOM map (first in row-major order on ties), emit it, and set to zero every pixel
strictly inside a disc around it (``di² + dj² < r²``, ``r`` given per pixel), until the maximum is ``<= 0``.

It is computed exactly, without rescanning the map: the pixels with a positive FOM are visited once in
decreasing FOM order (ties in increasing row-major index). A pixel is the global maximum of the remaining map
exactly when it is reached in that order and no earlier pick's disc covered it, so the visit order gives the
same picks, in the same order, as the repeated-maximum loop. The loop runs on the CPU over the candidate list
(the map is small: the picker's working grid) and paints suppression discs with array slices.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["greedy_disc_suppression", "disc_offsets_mask"]


def disc_offsets_mask(radius: int) -> np.ndarray:
    """Boolean ``[2r+1, 2r+1]`` mask of offsets with ``di² + dj² < r²`` (RELION's strict disc); centre always set."""
    r = max(int(radius), 0)
    d = np.arange(-r, r + 1)
    mask = (d[:, None] ** 2 + d[None, :] ** 2) < r * r
    mask[r, r] = True
    return mask


def greedy_disc_suppression(fom: torch.Tensor, radius: torch.Tensor,
                            emit_below: float = float("inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy maximum picking with disc suppression on a 2D map.

    Args:
        fom: ``[H, W]`` figure-of-merit map (pixels with ``fom <= 0`` are never picked).
        radius: ``[H, W]`` integer suppression radius (pixels) to use when that pixel is picked; pixels
            ``(i', j')`` with ``(i'-i)² + (j'-j)² < radius[i, j]²`` are removed (the picked pixel itself always).
        emit_below: a maximum with ``fom >= emit_below`` is not emitted but still suppresses its disc
            (RELION's ``--LoG_upper_threshold``).

    Returns:
        ``(rows, cols)`` int64 tensors (on ``fom``'s device) of the emitted pixels, in emission order (the
        order of the repeated-global-maximum loop, i.e. decreasing FOM).
    """
    if fom.ndim != 2 or radius.shape != fom.shape:
        raise ValueError(f"greedy_disc_suppression: fom {tuple(fom.shape)} and radius {tuple(radius.shape)} "
                         "must be equal 2D shapes")
    device = fom.device
    h, w = fom.shape
    values = fom.detach().cpu().numpy()
    rad = radius.detach().cpu().numpy().astype(np.int64)
    flat = values.ravel()
    cand = np.flatnonzero(flat > 0)                      # ascending row-major index
    order = cand[np.argsort(-flat[cand], kind="stable")]  # decreasing FOM, ties keep ascending index
    suppressed = np.zeros((h, w), dtype=bool)
    sup_flat = suppressed.ravel()
    discs: dict[int, np.ndarray] = {}
    rad_flat = rad.ravel()
    rows: list[int] = []
    cols: list[int] = []
    for idx in order.tolist():
        if sup_flat[idx]:
            continue
        i, j = divmod(idx, w)
        if flat[idx] < emit_below:
            rows.append(i)
            cols.append(j)
        r = int(rad_flat[idx])
        disc = discs.get(r)
        if disc is None:
            disc = discs[r] = disc_offsets_mask(r)
        r = disc.shape[0] // 2
        i0, i1 = max(i - r, 0), min(i + r + 1, h)
        j0, j1 = max(j - r, 0), min(j + r + 1, w)
        suppressed[i0:i1, j0:j1] |= disc[i0 - i + r:i1 - i + r, j0 - j + r:j1 - j + r]
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(cols, dtype=torch.int64, device=device))
