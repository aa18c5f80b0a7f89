"""Scoring picks against ground-truth coordinates (precision, recall, F1).

A pick matches a true particle when their distance is below a tolerance (pixels; the issues use
0.3 × particle diameter), **one-to-one**: the matching maximises the number of matched pairs (and, among
those, minimises the summed distance) with :func:`scipy.optimize.linear_sum_assignment`, so two picks on one
particle count as one true positive and one false positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class PickScore:
    """Counts and rates of one comparison (sums over micrographs add: see :meth:`__add__`)."""

    n_picks: int
    n_true: int
    n_matched: int

    @property
    def precision(self) -> float:
        return self.n_matched / self.n_picks if self.n_picks else 0.0

    @property
    def recall(self) -> float:
        return self.n_matched / self.n_true if self.n_true else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def __add__(self, other: "PickScore") -> "PickScore":
        return PickScore(self.n_picks + other.n_picks, self.n_true + other.n_true, self.n_matched + other.n_matched)

    def as_dict(self) -> dict:
        return {"n_picks": self.n_picks, "n_true": self.n_true, "n_matched": self.n_matched,
                "precision": round(self.precision, 4), "recall": round(self.recall, 4), "f1": round(self.f1, 4)}


def match_picks(picks_xy: np.ndarray, truth_xy: np.ndarray, tolerance_px: float) -> np.ndarray:
    """One-to-one matching of picks to true positions within ``tolerance_px`` (pixels).

    Args:
        picks_xy: ``[P, 2]`` picked (x, y) pixels. truth_xy: ``[T, 2]`` true (x, y) pixels.

    Returns:
        ``[M, 2]`` integer pairs ``(pick index, truth index)``.
    """
    picks_xy = np.asarray(picks_xy, dtype=np.float64).reshape(-1, 2)
    truth_xy = np.asarray(truth_xy, dtype=np.float64).reshape(-1, 2)
    if len(picks_xy) == 0 or len(truth_xy) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # only candidate pairs within the tolerance enter the assignment (sparse; fine for 10^4 picks)
    pairs = cKDTree(picks_xy).query_ball_tree(cKDTree(truth_xy), r=tolerance_px)
    rows = np.repeat(np.arange(len(pairs)), [len(p) for p in pairs])
    cols = np.fromiter((j for p in pairs for j in p), dtype=np.int64, count=len(rows))
    if len(rows) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    dist = np.linalg.norm(picks_xy[rows] - truth_xy[cols], axis=1)
    # cost: a matched pair costs -1 (+ a tiny distance term), an unmatched cell 0 -> maximal matching first
    cost = np.zeros((len(ur), len(uc)))
    cost[ri, ci] = -1.0 + 1e-6 * dist / max(tolerance_px, 1e-12)
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < 0
    return np.stack([ur[r[ok]], uc[c[ok]]], axis=1).astype(np.int64)


def score_picks(picks_xy: np.ndarray, truth_xy: np.ndarray, tolerance_px: float) -> PickScore:
    """:class:`PickScore` of one micrograph (see :func:`match_picks`)."""
    m = match_picks(picks_xy, truth_xy, tolerance_px)
    return PickScore(int(np.asarray(picks_xy).reshape(-1, 2).shape[0]), int(np.asarray(truth_xy).reshape(-1, 2).shape[0]),
                     int(len(m)))
