"""L-BFGS refinement of one tilt series' parameter groups on the global normalised cross-correlation.

The score of a tilt series, ``NCC = S_ab / sqrt(S_aa·S_bb)`` (:mod:`cryopipe.mpr.forward`), is not a sum over
batches, but its gradient is a combination of batch gradients:
``∇NCC = ∇S_ab / sqrt(S_aa·S_bb) − S_ab·∇S_bb / (2·sqrt(S_aa)·S_bb^{3/2})`` (``S_aa``, the data term, is
constant). Each evaluation therefore makes one gradient-free pass over the batches for the global sums, then a
second pass that back-propagates that combination batch by batch: memory holds one batch's graph, and the
gradient is exact. The loss handed to ``torch.optim.LBFGS`` is ``−NCC·P`` (``P`` pairs; M scales its score by
particles × tilts as well), so per-parameter gradients are O(1). The data slices (cut at centres fixed for the
sub-iteration) are cut once and kept while they fit :data:`CACHE_BYTES`, else cut again batch by batch.

Block-coordinate steps (``alternate``, issue 13): refined jointly, per-tilt groups (a tilt's shift or angles sum
the gradient of the ~N particles seen in it) dominate L-BFGS's few iterations once a tilt series holds 40+
particles, and the particle poses barely move. With ``alternate`` the per-particle groups (:data:`PARTICLE_GROUPS`)
and the others take turns: L-BFGS on the others (poses frozen), then on the particle groups (the rest frozen),
each for the full iteration count; the gauge is fixed for the union of the groups throughout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cryopipe.mpr.forward import (Band, Species, TiltSeriesData, batch_sums, data_slices, make_band, pair_geometry,
                                  pair_sums, zero_parameters)
from cryopipe.mpr.parameters import DEFOCUS_UNIT_A, TiltSeriesParameters, gauge_fixed

#: data slices of a tilt series are kept for a sub-iteration when they take at most this many bytes
CACHE_BYTES = 512e6

__all__ = ["CACHE_BYTES", "cached_slices", "defocus_grid_search",
           "RefineStats", "pair_centres", "tilt_series_score", "score_and_gradient",
           "PARTICLE_GROUPS", "refine_tilt_series"]

#: groups with parameters per particle; with ``alternate`` they are refined in turn with the other groups
PARTICLE_GROUPS = ("poses", "temporalposes")


@dataclass
class RefineStats:
    score_before: float  # NCC (×100, as M prints it)
    score_after: float
    evaluations: int  # forward+backward passes over all pairs
    pair_evaluations: int  # particle-tilt evaluations (forward passes)
    seconds: float
    cpu_seconds: float


def pair_centres(data: TiltSeriesData) -> torch.Tensor:
    """``[P, 2]`` projected centres of all pairs at the current metadata (the fixed cut centres ``q₀``)."""
    with torch.no_grad():
        n, f = data.pairs.unbind(-1)
        return pair_geometry(data, zero_parameters(data), n, f).xy


def cached_slices(data: TiltSeriesData, species: Species, band: Band, centres: torch.Tensor, batch_pairs: int,
                  max_bytes: float = CACHE_BYTES) -> list[torch.Tensor] | None:
    """The data slices of every batch (cut once per sub-iteration: the cut centres are fixed), or None when they
    would take more than ``max_bytes`` (then every evaluation cuts them again, batch by batch)."""
    if len(data.pairs) * band.flat.numel() * 8 > max_bytes:
        return None
    out = []
    with torch.no_grad():
        for s in range(0, len(data.pairs), batch_pairs):
            out.append(data_slices(data, species, band, data.pairs[s:s + batch_pairs, 1], centres[s:s + batch_pairs]))
    return out


def _batches(n_pairs: int, batch_pairs: int, cache):
    for i, s in enumerate(range(0, n_pairs, batch_pairs)):
        yield slice(s, s + batch_pairs), (cache[i] if cache is not None else None)


def _global_sums(data, species, band, params, groups, centres, batch_pairs, cache=None):
    tot = torch.zeros(3, dtype=torch.float64, device=centres.device)
    with torch.no_grad():
        p = gauge_fixed(params, groups)
        for rows, X in _batches(len(data.pairs), batch_pairs, cache):
            tot += torch.stack(batch_sums(data, species, band, p, rows, centres, X))
    return tot


def tilt_series_score(data: TiltSeriesData, species: Species, band: Band, params: TiltSeriesParameters,
                      groups, centres: torch.Tensor, batch_pairs: int = 256, cache=None) -> float:
    """Global NCC ×100 of the tilt series at ``params`` (``cache``: :func:`cached_slices`)."""
    s_ab, s_bb, s_aa = _global_sums(data, species, band, params, groups, centres, batch_pairs, cache).tolist()
    return 100.0 * s_ab / max((s_aa * s_bb) ** 0.5, 1e-300)


def score_and_gradient(data: TiltSeriesData, species: Species, band: Band, params: TiltSeriesParameters, groups,
                       centres: torch.Tensor, batch_pairs: int = 256, cache=None) -> torch.Tensor:
    """Loss ``−NCC·P`` (a float64 scalar) of the tilt series; its exact gradient is *added* to ``.grad`` of the
    parameter tensors that require it, batch by batch (module docstring)."""
    n_pairs = len(data.pairs)
    s_ab, s_bb, s_aa = _global_sums(data, species, band, params, groups, centres, batch_pairs, cache).tolist()
    norm = max(s_aa * s_bb, 1e-300) ** 0.5
    a = -n_pairs / norm
    b = n_pairs * s_ab / (2.0 * s_aa ** 0.5 * max(s_bb, 1e-300) ** 1.5)
    for rows, X in _batches(n_pairs, batch_pairs, cache):
        p = gauge_fixed(params, groups)
        ab, bb, _ = batch_sums(data, species, band, p, rows, centres, X)
        (a * ab + b * bb).backward()
    return torch.tensor(-n_pairs * s_ab / norm, dtype=torch.float64)


def defocus_grid_search(data: TiltSeriesData, species: Species, band: Band, params: TiltSeriesParameters, groups,
                        centres: torch.Tensor, offsets_A: torch.Tensor, batch_pairs: int = 256, cache=None
                        ) -> torch.Tensor:
    """M's exhaustive defocus search before the gradient steps: every tilt's mean defocus is tried at each of the
    ``offsets_A`` ``[D]`` (Å, added to the current correction), each tilt keeps the offset with the highest NCC
    of its own pairs (``S_ab,f / sqrt(S_aa,f·S_bb,f)``: the tilts are independent here, so one pass per offset
    scores all of them), and the best offsets ``[F]`` (Å) are written into ``params`` (``defocus`` group: the mean
    defocus; ``ctf`` group: the mean-defocus component). A tilt series of one tilt per particle
    (:mod:`cryopipe.mpr.spa`) gets a per-particle search. Cost: ``D`` forward passes without gradients."""
    target = params.defocus_mean if "defocus" in groups else params.defocus[:, 0]
    F = len(data.angles)
    f_all = data.pairs[:, 1]
    scores = torch.zeros(len(offsets_A), F, dtype=torch.float64, device=centres.device)
    start = target.detach().clone()
    with torch.no_grad():
        for j, off in enumerate(offsets_A.tolist()):
            target.copy_(start + off / DEFOCUS_UNIT_A)
            p = gauge_fixed(params, groups)
            sums = torch.zeros(F, 3, dtype=torch.float64, device=centres.device)
            for rows, X in _batches(len(data.pairs), batch_pairs, cache):
                sums.index_add_(0, f_all[rows], pair_sums(data, species, band, p, rows, centres, X))
            scores[j] = sums[:, 0] / (sums[:, 1] * sums[:, 2]).clamp(min=1e-300).sqrt()
        best = offsets_A.to(scores.device, torch.float64)[scores.argmax(0)]
        best = torch.where(torch.bincount(f_all, minlength=F) > 0, best, torch.zeros_like(best))
        target.copy_(start + best / DEFOCUS_UNIT_A)
    return best


def refine_tilt_series(data: TiltSeriesData, species: Species, params: TiltSeriesParameters, groups,
                       k_max: float, *, lbfgs_iterations: int = 10, batch_pairs: int = 256,
                       band: Band | None = None, tolerance: float = 0.0,
                       defocus_search_A: torch.Tensor | None = None, alternate: bool = True) -> RefineStats:
    """Refine ``params`` (in place) for the ``groups`` within ``|k| ≤ k_max`` Fourier px of the species box.
    ``tolerance`` > 0: L-BFGS runs in chunks of 2 iterations and stops after a chunk that raised the NCC by less
    than ``tolerance`` (against drifting along flat, noise-dominated directions); 0: the full ``lbfgs_iterations``
    (M's fixed iteration counts). ``defocus_search_A`` (offsets in Å; with a ``ctf`` or ``defocus`` group):
    :func:`defocus_grid_search` first, then L-BFGS from the best offsets. ``alternate``: with particle and other
    groups together, L-BFGS first on the other groups, then on the particle groups (module docstring); False: all
    at once."""
    t0, c0 = time.perf_counter(), time.process_time()
    centres = pair_centres(data)
    band = band if band is not None else make_band(data, species, k_max, batch_pairs=batch_pairs)
    tensors = params.for_groups(groups)
    cache = cached_slices(data, species, band, centres, batch_pairs)
    before = tilt_series_score(data, species, band, params, groups, centres, batch_pairs, cache)
    n_pairs = len(data.pairs)
    evaluations = 0
    searched = 0
    if defocus_search_A is not None and len(defocus_search_A) and {"ctf", "defocus"} & set(groups) and n_pairs:
        defocus_grid_search(data, species, band, params, groups, centres, defocus_search_A, batch_pairs, cache)
        searched = len(defocus_search_A)
    if tensors and n_pairs:
        for block in _blocks(params, groups, alternate):
            for t in tensors:
                t.requires_grad_(any(t is b for b in block))
            evaluations += _run_lbfgs(block, lambda: score_and_gradient(data, species, band, params, groups,
                                                                        centres, batch_pairs, cache),
                                      lbfgs_iterations, tolerance * n_pairs)
    params.for_groups(())
    after = tilt_series_score(data, species, band, params, groups, centres, batch_pairs, cache)
    return RefineStats(before, after, evaluations, n_pairs * (2 * evaluations + 2 + searched),
                       time.perf_counter() - t0, time.process_time() - c0)


def _blocks(params: TiltSeriesParameters, groups, alternate: bool) -> list[list[torch.Tensor]]:
    """The tensor sets L-BFGS refines in turn: the non-particle groups', then the particle groups'
    (``alternate`` and both present), else all of them at once."""
    particle = [g for g in groups if g in PARTICLE_GROUPS]
    others = [g for g in groups if g not in PARTICLE_GROUPS]
    if not (alternate and particle and others):
        return [params.for_groups(groups)]
    blocks = [params.for_groups(others), params.for_groups(particle)]
    params.for_groups(groups)
    return [b for b in blocks if b]


def _run_lbfgs(tensors: list[torch.Tensor], loss_and_gradient, iterations: int, min_gain: float) -> int:
    """L-BFGS on ``tensors`` for ``iterations``; ``min_gain`` > 0: in chunks of 2 iterations, stopping after a
    chunk that lowered the loss by less (``refine_tilt_series``'s ``tolerance``). Returns the evaluations."""
    evaluations = 0
    chunk = 2 if min_gain > 0 else iterations
    opt = torch.optim.LBFGS(tensors, lr=1.0, max_iter=chunk, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        return loss_and_gradient()

    previous = None
    for _ in range(0, iterations, chunk):  # L-BFGS keeps its history across step() calls
        start = float(opt.step(closure))  # the loss before this chunk = after the previous one
        if min_gain > 0 and previous is not None and previous - start < min_gain:
            break
        previous = start
    return evaluations
