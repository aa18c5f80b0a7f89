"""Template picking, part 3: peaks of the FOM maps (:func:`peak_search`, cluster pruning and close-neighbour
removal as RELION's autopicker), picking from maps (:func:`template_pick_from_maps`), the picking options
(:class:`TemplateOptions`) and the one-micrograph picker (:func:`template_pick`).

Split out of :mod:`cryopipe.picking.template` (issue 14), which re-exports everything; see there for the
conventions. Moved verbatim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cryopipe.errors import CryopipeError
from cryopipe.picking.common import PickTable
from cryopipe.picking.template_fom import TemplateMaps, template_fom_maps
from cryopipe.picking.template_references import TemplateReferences, round_half_away

__all__ = ["peak_search", "prune_peak_clusters", "remove_close_neighbours", "template_pick_from_maps",
           "TemplateOptions", "template_pick", "template_maps_for"]


def peak_search(fom: torch.Tensor, stddev: torch.Tensor, mean: torch.Tensor, *, threshold: float,
                first_index: tuple[int, int], extent: tuple[int, int], skip: int, scale_below_one: bool,
                max_stddev_noise: float = -1.0, min_avg_noise: float = -999.0) -> np.ndarray:
    """RELION's ``peakSearch`` on FOM maps ``[R, w, w]`` (or one ``[w, w]``), vectorised over references.

    Pixels of the micrograph's extent (``first_index``, ``extent`` on the work grid) at least ``skip`` (≥ 1)
    pixels from its edges with ``fom ≥ threshold``, not rejected by the noise criteria (``stddev``, ``mean``
    ``[w, w]``), and ``≥`` their four neighbours (which, unless ``scale_below_one``, must also be
    ``≥ threshold``).

    Returns:
        ``[K, 3]`` int64 NumPy array of ``(reference, row, col)`` work-grid peaks, per reference in row-major
        order (the order RELION visits them).
    """
    f3 = fom if fom.ndim == 3 else fom[None]
    r0, c0 = first_index
    hy, wx = extent
    skip = max(1, int(skip))
    i0, i1 = r0 + skip, r0 + hy - 1 - skip  # inclusive
    j0, j1 = c0 + skip, c0 + wx - 1 - skip
    if i1 < i0 or j1 < j0:
        return np.zeros((0, 3), dtype=np.int64)
    f = f3[:, i0:i1 + 1, j0:j1 + 1]
    ok = f >= threshold
    if max_stddev_noise > 0:
        ok &= ~(stddev[i0:i1 + 1, j0:j1 + 1] > max_stddev_noise)
    if min_avg_noise > -900:
        ok &= ~(mean[i0:i1 + 1, j0:j1 + 1] < min_avg_noise)
    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nb = f3[:, i0 + di:i1 + 1 + di, j0 + dj:j1 + 1 + dj]
        ok &= ~(nb > f)
        if not scale_below_one:
            ok &= ~(nb < threshold)
    idx = torch.nonzero(ok, as_tuple=False).cpu().numpy().astype(np.int64)
    idx[:, 1] += i0
    idx[:, 2] += j0
    return idx


def _pairs_within(pts: np.ndarray, d2_limit: float) -> np.ndarray:
    """Index pairs ``[K, 2]`` (i < j) with squared distance strictly below ``d2_limit``."""
    from scipy.spatial import cKDTree

    if len(pts) < 2 or not d2_limit > 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = cKDTree(pts).query_pairs(r=math.sqrt(d2_limit), output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    d2 = ((pts[pairs[:, 0]] - pts[pairs[:, 1]]) ** 2).sum(axis=1)
    return pairs[d2 < d2_limit].astype(np.int64)


def prune_peak_clusters(x: np.ndarray, y: np.ndarray, fom: np.ndarray, link_d2: float, min_d2: float) -> np.ndarray:
    """RELION's ``prunePeakClusters``: indices of the kept peaks, in RELION's output order.

    Peaks (integer work-grid positions) are grouped in single-linkage clusters (squared distance
    ``< link_d2``); clusters are visited in the order of their first peak in the input; in each cluster the
    peak with the highest FOM is kept and every member at squared distance ``< min_d2`` from it removed,
    repeatedly. (Equal FOMs in one cluster are resolved by input order; RELION uses its cluster-building order.)
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pts = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1)
    links = _pairs_within(pts, link_d2)
    graph = coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    first = np.full(label.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, label, np.arange(n))
    comp_rank = np.argsort(np.argsort(first))[label]
    sup = _pairs_within(pts, min_d2)
    sup = sup[label[sup[:, 0]] == label[sup[:, 1]]]
    nbr_i = np.concatenate([sup[:, 0], sup[:, 1]])
    nbr_j = np.concatenate([sup[:, 1], sup[:, 0]])
    o = np.argsort(nbr_i, kind="stable")
    nbr_i, nbr_j = nbr_i[o], nbr_j[o]
    start = np.searchsorted(nbr_i, np.arange(n + 1))
    order = np.lexsort((np.arange(n), -np.asarray(fom, dtype=np.float64), comp_rank))
    suppressed = np.zeros(n, dtype=bool)
    kept: list[int] = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[nbr_j[start[i]:start[i + 1]]] = True
    return np.asarray(kept, dtype=np.int64)


def remove_close_neighbours(x: np.ndarray, y: np.ndarray, min_d2: float) -> np.ndarray:
    """RELION's ``removeTooCloselyNeighbouringPeaks``: indices (input order) of the peaks whose nearest other
    peak is at squared distance ``> min_d2`` (both members of a too-close pair are removed)."""
    from scipy.spatial import cKDTree

    n = len(x)
    if n < 2:
        return np.arange(n, dtype=np.int64)
    pts = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1)
    _, idx = cKDTree(pts).query(pts, k=2)
    other = np.where(idx[:, 0] == np.arange(n), idx[:, 1], idx[:, 0])
    d2 = ((pts - pts[other]) ** 2).sum(axis=1)
    return np.flatnonzero(d2 > min_d2).astype(np.int64)


def template_pick_from_maps(maps: TemplateMaps, *, threshold: float = 0.25, min_distance: float = -1.0,
                            max_stddev_noise: float = -1.0, min_avg_noise: float = -999.0,
                            skip_side: int = 0) -> PickTable:
    """Peaks of precomputed :class:`TemplateMaps` (RELION's peak search, cluster pruning, close-pair removal).

    Args:
        threshold: ``--threshold`` (fraction of the expected likelihood ratio; RELION CLI 0.25, GUI 0.05).
        min_distance: ``--min_distance`` (Å); ``< 0`` = half the reference box (``box·apix/2``).
        max_stddev_noise: ``--max_stddev_noise`` (> 0: reject peaks whose local background σ is larger, e.g.
            on contamination / carbon edges; RELION GUI 1.1).
        min_avg_noise: ``--min_avg_noise`` (> −900: reject peaks whose local background mean is lower).
        skip_side: ``--skip_side`` extra micrograph pixels kept from the edges (besides box/2).

    Returns:
        :class:`PickTable`: ``x, y`` micrograph pixels (work-grid index / scale), ``fom``, ``class_number``
        (reference, 1-based), ``psi`` (degrees), ``diameter`` (the particle diameter, Å).
    """
    device = maps.fom.device
    scale32 = np.float32(maps.scale)
    md = min_distance if min_distance >= 0 else maps.box * maps.pixel_size / 2.0
    md_px = round_half_away(md / maps.pixel_size)
    min_d2 = float(np.float32(np.float32(md_px) * np.float32(md_px)) * scale32 * scale32)
    link_d2 = float(np.float32(maps.radius_px * maps.radius_px) * scale32 * scale32)
    skip = int(np.float32(skip_side + maps.box // 2) * scale32)
    r0, c0 = maps.first_index()
    extent = maps.extent()
    peaks = peak_search(maps.fom, maps.stddev, maps.mean, threshold=float(threshold), first_index=(r0, c0),
                        extent=extent, skip=skip, scale_below_one=bool(scale32 < 1),
                        max_stddev_noise=max_stddev_noise, min_avg_noise=min_avg_noise)
    if len(peaks) == 0:
        return PickTable.empty(device)
    sel = torch.as_tensor(peaks, device=device)
    f_all = maps.fom[sel[:, 0], sel[:, 1], sel[:, 2]].cpu().numpy()
    p_all = maps.psi[sel[:, 0], sel[:, 1], sel[:, 2]].cpu().numpy()
    bounds = np.searchsorted(peaks[:, 0], np.arange(maps.fom.shape[0] + 1))
    xs, ys, fs, refs_, ps = [], [], [], [], []
    for i in range(maps.fom.shape[0]):
        a, z = bounds[i], bounds[i + 1]
        if a == z:
            continue
        px, py, f = peaks[a:z, 2] - c0, peaks[a:z, 1] - r0, f_all[a:z]
        keep = prune_peak_clusters(px, py, f, link_d2, min_d2)
        xs.append(px[keep]); ys.append(py[keep]); fs.append(f[keep]); ps.append(p_all[a:z][keep])
        refs_.append(np.full(len(keep), i + 1, dtype=np.int64))
    px, py, f, ref, p = (np.concatenate(v) for v in (xs, ys, fs, refs_, ps))
    keep = prune_peak_clusters(px, py, f, link_d2, min_d2)
    px, py, f, ref, p = px[keep], py[keep], f[keep], ref[keep], p[keep]
    keep = remove_close_neighbours(px, py, min_d2)
    px, py, f, ref, p = px[keep], py[keep], f[keep], ref[keep], p[keep]
    s = float(scale32)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return PickTable(x=t(px / s, torch.float64), y=t(py / s, torch.float64), fom=t(f.astype(np.float64), torch.float64),
                     diameter=torch.full((len(px),), float(maps.particle_diameter), dtype=torch.float64, device=device),
                     class_number=t(ref, torch.int64), psi=t(p.astype(np.float64), torch.float64))


@dataclass(frozen=True)
class TemplateOptions:
    """Template-picking options (RELION ``relion_autopick`` names in brackets; CLI defaults).

    Map options (change the FOM maps): ``lowpass`` (``--lowpass`` Å, None = none), ``highpass`` (``--highpass``
    Å), ``shrink`` (``--shrink``), ``ctf`` (``--ctf``), ``ctf_intact_first_peak``, ``outlier_zscore``
    (``--outlier_removal_zscore``), ``optimise_scale`` (not ``--skip_optimise_scale``), ``random_seed``,
    ``relion_mean_term`` (RELION's disc-sum local-mean term, see the module docstring).
    Peak options (re-picking from maps): ``threshold`` (``--threshold``), ``min_distance`` (``--min_distance``
    Å, < 0 = box/2), ``max_stddev_noise``, ``min_avg_noise``, ``skip_side`` (px).
    """

    lowpass: float | None = None
    highpass: float | None = None
    shrink: float = 1.0
    ctf: bool = False
    ctf_intact_first_peak: bool = False
    outlier_zscore: float = 8.0
    optimise_scale: bool = True
    random_seed: int = 1
    relion_mean_term: bool = False
    threshold: float = 0.25
    min_distance: float = -1.0
    max_stddev_noise: float = -1.0
    min_avg_noise: float = -999.0
    skip_side: int = 0

    def map_settings(self) -> dict[str, object]:
        """The options that determine the FOM maps (stored with them)."""
        return {"lowpass": self.lowpass if self.lowpass is not None else -1.0,
                "highpass": self.highpass if self.highpass is not None else -1.0,
                "shrink": self.shrink, "ctf": int(self.ctf), "ctf_intact_first_peak": int(self.ctf_intact_first_peak),
                "outlier_zscore": self.outlier_zscore, "optimise_scale": int(self.optimise_scale),
                "relion_mean_term": int(self.relion_mean_term)}

    def pick_settings(self) -> dict[str, float]:
        return {"threshold": self.threshold, "min_distance": self.min_distance,
                "max_stddev_noise": self.max_stddev_noise, "min_avg_noise": self.min_avg_noise,
                "skip_side": self.skip_side}


def template_pick(micrograph: torch.Tensor, refs: TemplateReferences, options: TemplateOptions | None = None, *,
                  ctf: Mapping[str, float] | None = None, seed: int | None = None) -> PickTable:
    """Pick one micrograph ``[H, W]`` with ``refs``: :func:`template_fom_maps` then :func:`template_pick_from_maps`.

    ``ctf``: the micrograph's CTF parameters (required with ``options.ctf``); ``seed``: padding-noise seed
    (default ``options.random_seed``).
    """
    o = options or TemplateOptions()
    maps = template_maps_for(micrograph, refs, o, ctf, o.random_seed if seed is None else seed)
    return template_pick_from_maps(maps, **o.pick_settings())


def template_maps_for(micrograph: torch.Tensor, refs: TemplateReferences, o: TemplateOptions,
              ctf: Mapping[str, float] | None, seed: int) -> TemplateMaps:
    if o.ctf and refs.apply_ctf and ctf is None:
        raise CryopipeError("--ctf needs CTF parameters for each micrograph (rlnDefocusU/V/Angle in the input STAR; "
                            "use the CtfFind output)")
    return template_fom_maps(micrograph, refs, lowpass=o.lowpass, highpass=o.highpass, shrink=o.shrink,
                             ctf=ctf if o.ctf else None, ctf_intact_first_peak=o.ctf_intact_first_peak,
                             outlier_zscore=o.outlier_zscore, optimise_scale=o.optimise_scale, seed=seed,
                             relion_mean_term=o.relion_mean_term)
