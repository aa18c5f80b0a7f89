"""Expected alignment accuracies (RELION ``calculateExpectedAngularErrors``, re-derived and batched).

For a class reference and a set of typical particles (their CTFs and noise spectra), the accuracy is the
smallest rotation (or translation) of the reference whose CTF-weighted difference becomes significant::

    Σ_p C_b(p)² |F(p) − F_δ(p)|² / (2σ²_b(p))  >  4.60517   (= −ln 0.01, p = 0.01)

averaged over the particles. ``F_δ`` is the reference rotated by ``δ`` (2D: in-plane; the caller provides the
predictions) or shifted by ``δ`` pixels. The trial values form a fine geometric series, evaluated all at once (one
GEMM per class). The per-shell share of the sum at the threshold (averaged over particles) is RELION's
``rlnSpectralOrientabilityContribution``.
"""

from __future__ import annotations

import math

import torch

from cryopipe.core.geometry import axis_angle_matrix
from cryopipe.engine.estep import shift_phases

__all__ = ["THRESHOLD", "trial_angles", "trial_shifts", "trial_rotations", "first_crossing", "expected_accuracy",
           "shift_difference_power"]

#: −ln(0.01): the difference must be significant at p = 0.01.
THRESHOLD = 4.60517


def trial_angles(max_deg: float = 180.0, device=None, ratio: float = 1.04) -> torch.Tensor:
    """Trial rotations (degrees): 0.05° to ``max_deg`` in steps of ``ratio`` (geometric, 4 %)."""
    n = int(math.ceil(math.log(max_deg / 0.05) / math.log(ratio))) + 1
    return torch.exp(torch.linspace(math.log(0.05), math.log(max_deg), n, device=device, dtype=torch.float64)
                     ).to(torch.float32)


def trial_rotations(angles_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3D trial rotations RELION probes, ``([J, 3, 3] about z (in-plane), [J, 3, 3] about x (out of plane))``
    for ``angles_deg`` ``[J]`` (right-handed, :func:`cryopipe.core.geometry.axis_angle_matrix`); applied on the
    left of a particle's matrix ``A`` (the view rotated in the image frame)."""
    z = torch.tensor([0.0, 0.0, 1.0], dtype=angles_deg.dtype, device=angles_deg.device)
    x = torch.tensor([1.0, 0.0, 0.0], dtype=angles_deg.dtype, device=angles_deg.device)
    return axis_angle_matrix(z.expand(angles_deg.numel(), 3), angles_deg), \
        axis_angle_matrix(x.expand(angles_deg.numel(), 3), angles_deg)


def trial_shifts(max_px: float, device=None, ratio: float = 1.04) -> torch.Tensor:
    """Trial translations (pixels): 0.02 px to ``max_px`` in steps of ``ratio`` (geometric, 4 %)."""
    n = int(math.ceil(math.log(max_px / 0.02) / math.log(ratio))) + 1
    return torch.exp(torch.linspace(math.log(0.02), math.log(max_px), n, device=device, dtype=torch.float64)
                     ).to(torch.float32)


def first_crossing(score: torch.Tensor, trials: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """``[I]`` first trial value whose score ``[I, J]`` exceeds ``threshold`` (the largest trial if none)."""
    above = score > threshold
    J = trials.numel()
    idx = torch.where(above, torch.arange(J, device=score.device)[None], torch.full_like(above, J - 1,
                                                                                          dtype=torch.long))
    return trials[idx.min(dim=1).values]


def expected_accuracy(diff_power: torch.Tensor, ctf2_over_sigma2: torch.Tensor, trials: torch.Tensor,
                      shell: torch.Tensor, n_shells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy of one reference for a set of particles.

    Args:
        diff_power: ``[J, P]`` ``|F − F_δ|²`` for each trial ``δ`` (coefficient vectors).
        ctf2_over_sigma2: ``[I, P]`` ``C²/σ²`` of each particle (0 where excluded, e.g. DC).
        trials: ``[J]`` trial values (ascending).
        shell: ``[P]`` shells, for the orientability contribution.

    Returns:
        ``(mean accuracy over particles, orientability [n_shells])``.
    """
    score = 0.5 * (ctf2_over_sigma2 @ diff_power.T)  # [I, J]
    acc = first_crossing(score, trials)
    j = torch.searchsorted(trials, acc)  # index of the accuracy trial per particle
    contrib = 0.5 * ctf2_over_sigma2 * diff_power[j.clamp_max(trials.numel() - 1)]  # [I, P]
    tot = contrib.sum(dim=1, keepdim=True).clamp_min(1e-30)
    frac = (contrib / tot).to(torch.float64)
    per_shell = torch.zeros(frac.shape[0], n_shells, dtype=torch.float64, device=frac.device)
    per_shell.index_add_(1, shell.to(frac.device), frac)
    return acc.mean(), per_shell.mean(dim=0)


def shift_difference_power(ref: torch.Tensor, k: torch.Tensor, n: int, shifts: torch.Tensor,
                           direction: torch.Tensor) -> torch.Tensor:
    """``[J, P]`` ``|F − F·e^{−2πi k·(s·u)/n}|²`` for shifts ``s [J]`` (pixels) along unit vector ``u [D]``."""
    t = shifts[:, None] * direction[None, :].to(shifts.dtype)
    ph = shift_phases(k, t, n)
    return (ref[None, :] * (1.0 - ph)).abs().square()
