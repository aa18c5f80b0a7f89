"""PNG gallery of 2D class averages (a bare matplotlib ``Figure`` rendered by Agg: no display, no pyplot).

:func:`write_class_gallery` draws the averages on a grid in a given order, each tile annotated with its class
number, share of particles (``rlnClassDistribution`` in %, and the particle count when given), estimated
resolution (Å) and score; selected classes get a green frame and the others are dimmed. It takes arrays, so
the class2d job can call it on its own averages after each iteration; :func:`gallery_from_model_star` does
the same from a ``run_itNNN_model.star`` (or optimiser / data STAR).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cryopipe.io.atomic import atomic_path

__all__ = ["write_class_gallery", "gallery_from_model_star"]


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float32).numpy()
    return np.asarray(a, dtype=np.float32)


def _display_range(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [0.5, 99.5])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        lo, hi = float(img.min()), float(img.max()) + 1e-12
    return float(lo), float(hi)


def write_class_gallery(path: str | os.PathLike, images, *, class_numbers: Sequence[int] | np.ndarray | None = None,
                        distribution: Sequence[float] | np.ndarray | None = None,
                        resolution: Sequence[float] | np.ndarray | None = None,
                        scores: Sequence[float] | np.ndarray | None = None,
                        counts: Sequence[int] | np.ndarray | None = None,
                        selected: Sequence[bool] | np.ndarray | None = None,
                        order: Sequence[int] | np.ndarray | None = None, ncols: int | None = None,
                        title: str | None = None, tile_inches: float = 1.35, dpi: int = 100) -> Path:
    """Write a PNG grid of class averages (atomically).

    Args:
        path: output ``.png``.
        images: class averages ``[K, N, N]`` (tensor or array; white = protein).
        class_numbers: label per class (default 1..K).
        distribution: ``rlnClassDistribution`` per class (fraction; shown in %).
        resolution: ``rlnEstimatedResolution`` per class (Å).
        scores: class score per class (shown as ``s=0.62``).
        counts: particles per class.
        selected: boolean per class; selected tiles are framed in green, the others dimmed. None: no highlight.
        order: tile order as indices into the classes (e.g. from :func:`cryopipe.selection.classes.sort_order`);
            default class order.
        ncols: columns (default ``min(10, ceil(sqrt(K)))``, at least 4 when K >= 4).
        title: figure title.
        tile_inches, dpi: tile size and resolution.

    Returns:
        ``Path(path)``.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; pyplot (global state) is not used

    imgs = _as_numpy(images)
    if imgs.ndim == 2:
        imgs = imgs[None]
    k = imgs.shape[0]
    order = np.arange(k) if order is None else np.asarray(order, dtype=np.int64)
    nums = np.arange(1, k + 1) if class_numbers is None else np.asarray(class_numbers)
    sel = None if selected is None else np.asarray(selected, dtype=bool)
    if ncols is None:
        ncols = min(10, max(min(4, k), math.ceil(math.sqrt(max(k, 1)))))
    ncols = max(1, min(int(ncols), max(len(order), 1)))
    nrows = max(1, math.ceil(len(order) / ncols))
    if title:   # wrap to the figure width (~0.55 em per character at 8 pt)
        title = textwrap.fill(title, width=max(20, int(ncols * tile_inches * 72 / (8 * 0.55))))
    head = 0.2 + 0.16 * title.count("\n") + 0.16 if title else 0.0
    height = nrows * (tile_inches + 0.42) + head
    fig = Figure(figsize=(ncols * tile_inches, height), dpi=dpi)
    fig.patch.set_facecolor("white")
    if title:
        fig.suptitle(title, fontsize=8, y=1.0 - 0.06 / height, va="top")
    top = 1.0 - head / height if title else 0.98
    gs = fig.add_gridspec(nrows, ncols, left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.06, hspace=0.42)
    for slot in range(nrows * ncols):
        ax = fig.add_subplot(gs[slot // ncols, slot % ncols])
        ax.set_xticks([])
        ax.set_yticks([])
        if slot >= len(order):
            ax.axis("off")
            continue
        i = int(order[slot])
        lo, hi = _display_range(imgs[i])
        is_sel = sel is not None and bool(sel[i])
        ax.imshow(imgs[i], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                  alpha=1.0 if (sel is None or is_sel) else 0.45)
        line1 = f"#{int(nums[i])}"
        if distribution is not None:
            line1 += f"  {100.0 * float(np.asarray(distribution)[i]):.1f}%"
        if counts is not None:
            line1 += f" ({int(np.asarray(counts)[i])})"
        parts2 = []
        if resolution is not None:
            r = float(np.asarray(resolution)[i])
            parts2.append(f"{r:.1f} Å" if np.isfinite(r) and r < 900 else "– Å")
        if scores is not None:
            parts2.append(f"s={float(np.asarray(scores)[i]):.2f}")
        ax.set_title(line1 + ("\n" + "  ".join(parts2) if parts2 else ""), fontsize=7, pad=2,
                     fontweight="bold" if is_sel else "normal", color="black" if (sel is None or is_sel) else "0.45")
        for sp in ax.spines.values():
            if is_sel:
                sp.set_edgecolor("#1db31d")
                sp.set_linewidth(3.0)
            else:
                sp.set_edgecolor("0.7")
                sp.set_linewidth(0.6)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return path


def gallery_from_model_star(model_star: str | os.PathLike, path: str | os.PathLike, *,
                            sort_by: str | None = "rlnClassDistribution", reverse: bool = False,
                            selected: Sequence[bool] | np.ndarray | None = None, with_scores: bool = True,
                            root: str | os.PathLike | None = None) -> Path:
    """Gallery of a classification run (its optimiser, model or data STAR) sorted by ``sort_by``, annotated with
    distribution, particle count, estimated resolution and (``with_scores``) the automatic class score."""
    from cryopipe.selection.classes import score_classes, solvent_radius, sort_order
    from cryopipe.selection.files import find_class2d_run, read_class_images

    run = find_class2d_run(model_star, root)
    images, apix = read_class_images(run)
    table = run.classes
    res = table["rlnEstimatedResolution"].to_numpy() if "rlnEstimatedResolution" in table else None
    scores = None
    if with_scores or sort_by == "rlnClassScore":
        get = (lambda c: table[c].to_numpy() if c in table else None)
        sc = score_classes(images, distribution=table["rlnClassDistribution"].to_numpy(),
                           estimated_resolution=res if res is not None else np.full(len(table), 999.0),
                           accuracy_rotations=get("rlnAccuracyRotations"),
                           accuracy_translations=get("rlnAccuracyTranslationsAngst"), counts=run.counts,
                           mask_radius_px=solvent_radius(images.shape[-1], run.particle_diameter, apix))
        scores = sc["score"].cpu().numpy()
        table = table.assign(rlnClassScore=scores)
    order = sort_order(table, sort_by, reverse)
    return write_class_gallery(path, images, class_numbers=table["rlnClassNumber"].to_numpy(),
                               distribution=table["rlnClassDistribution"].to_numpy(), resolution=res,
                               scores=scores if with_scores else None, counts=run.counts, selected=selected,
                               order=order, title=f"{Path(run.model_star).name}: {run.n_classes} classes")
