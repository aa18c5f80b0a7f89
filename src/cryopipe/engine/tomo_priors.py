"""Priors on the angles of tomographic particles (RELION ``--sigma_tilt`` / ``--sigma_psi`` / ``--sigma_rot``).

Particles picked on surfaces (membranes, capsids, lattices) come with an orientation from the surface normal:
the pseudo-subtomogram frame ``A_sub`` (rlnTomoSubtomogramRot/Tilt/Psi) or rlnAngleTiltPrior/rlnAnglePsiPrior.
RELION then restrains the global search with a Gaussian prior on the tilt (and psi) of each direction
(``HealpixSampling::selectOrientationsWithNonZeroPriorProbability`` with only ``sigma_tilt`` / ``sigma_psi``
set): for coarse orientation ``ω`` and particle ``b``::

    log p(ω | b) = −Δtilt² / (2σ_tilt²) − Δpsi² / (2σ_psi²),   Δ < 3σ (otherwise the orientation is left out)

with ``Δtilt = min over symmetry mates |tilt(ω·S) − tilt_prior_b|`` (psi differences wrapped to [0, 180]).
With ``σ_rot`` as well (RELION ``--sigma_rot``) the direction ``d(ω) = (cos rot sin tilt, sin rot sin tilt, cos
tilt)`` is restrained instead of the tilt: ``Δ = min over mates ∠(d(ω·S), d(rot_prior, tilt_prior))`` with
``σ = max(σ_rot, σ_tilt)``; ``σ_rot`` without ``σ_tilt``: ``Δ = |asin(d_y')|``, ``d_y'`` the component of ``d``
along the y axis turned by ``rot_prior`` about z (``calculateDeltaRot``).
Angles are those of the subtomogram frame (rlnAngle*, what the priors refer to): for 3D pseudo-subtomograms the
grid's own angles; for 2D stacks, whose orientations are refined in the tomogram frame, ``A_subᵀ·R(ω)``.

Centres (``prior_centres``): rlnAngleTiltPrior / rlnAnglePsiPrior / rlnAngleRotPrior where the particles file
has them (RELION's 999 = none), fixed for the run; where a prior is missing, the particle's current angle
relative to the subtomogram (surface-normal) frame, re-read every iteration (``AnglePriors.follow_current``:
the caller passes the rows' current angles), as
RELION's ``getFourierTransformsAndCtfs`` (``prior_rot/tilt/psi = METADATA_ROT/TILT/PSI`` when the prior is 999);
the first iteration's centres are the input angles. As in RELION, the prior applies to global searches; local
searches (auto-refine from ``--auto_local_healpix_order``, or ``--sigma_ang``) use their own Gaussian around the
current orientation.
A particle for which no coarse orientation lies within ``3σ`` keeps the Gaussian without the cut (RELION stops
with "Zero orientations fall within the local angular search").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cryopipe.core.geometry import euler_to_matrix, matrix_to_euler

__all__ = ["AnglePriors", "prior_centres", "angle_log_prior"]

#: RELION's cut-off of the prior, in standard deviations (``sigma_cutoff`` = 3)
SIGMA_CUTOFF = 3.0


@dataclass
class AnglePriors:
    """Per-particle priors on the subtomogram-frame tilt / psi (degrees): ``tilt [N]``, ``psi [N]``, their
    standard deviations (``<= 0``: no prior on that angle) and, for particles refined in another frame,
    ``frames [N, 3, 3]`` (``A_sub``: refined orientation ``R`` → subtomogram frame ``A_subᵀ·R``; None: the same
    frame)."""

    tilt: np.ndarray
    psi: np.ndarray
    sigma_tilt: float = 0.0
    sigma_psi: float = 0.0
    frames: np.ndarray | None = None
    rot: np.ndarray | None = None
    sigma_rot: float = 0.0
    follow_current: bool = False

    def centres(self, idx: np.ndarray, current_angles: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(tilt, psi, rot)`` centres ``[B]`` of particles ``idx``: the given priors, and where a prior is missing
        (NaN) and ``follow_current`` is set, the particle's current subtomogram-frame angle (``current_angles
        [B, 3]``: the refined (rot, tilt, psi) of rows ``idx`` in the refinement frame, turned by ``frames``), as
        RELION does every iteration."""
        idx = np.asarray(idx)
        tilt, psi = self.tilt[idx].astype(np.float64), self.psi[idx].astype(np.float64)
        rot = None if self.rot is None else self.rot[idx].astype(np.float64)
        missing = np.isnan(tilt) | np.isnan(psi) | (np.isnan(rot) if rot is not None else False)
        if not self.follow_current or current_angles is None or not missing.any():
            return tilt, psi, rot
        a = torch.as_tensor(np.asarray(current_angles), dtype=torch.float64).reshape(-1, 3)
        if self.frames is not None:
            A = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).to(torch.float64)
            a = matrix_to_euler(torch.as_tensor(self.frames[idx], dtype=torch.float64).transpose(-1, -2) @ A)
        a = a.numpy()
        tilt, psi = np.where(np.isnan(tilt), a[:, 1], tilt), np.where(np.isnan(psi), a[:, 2], psi)
        if rot is not None:
            rot = np.where(np.isnan(rot), a[:, 0], rot)
        return tilt, psi, rot

    @property
    def active(self) -> bool:
        return self.sigma_tilt > 0 or self.sigma_psi > 0 or (self.sigma_rot > 0 and self.rot is not None)


def prior_centres(particles: pd.DataFrame, with_rot: bool = False, missing_as_nan: bool = False
                  ) -> tuple[np.ndarray, ...]:
    """``(tilt [N], psi [N])`` prior centres (degrees) from a particles table: rlnAngleTiltPrior /
    rlnAnglePsiPrior where present and not RELION's 999 ("none"), else rlnAngleTilt / rlnAnglePsi (0 where
    absent); ``with_rot``: ``(tilt, psi, rot)`` with rlnAngleRotPrior / rlnAngleRot the same way;
    ``missing_as_nan``: NaN where there is no prior (to be re-centred on the current angle,
    :meth:`AnglePriors.centres`)."""
    n = len(particles)

    def col(label: str, fill: float) -> np.ndarray:
        if label not in particles.columns:
            return np.full(n, np.nan)
        v = pd.to_numeric(particles[label], errors="coerce").to_numpy(dtype=np.float64)
        return np.where(np.abs(v - 999.0) < 0.01, np.nan, v) if fill is None else np.nan_to_num(v, nan=fill)

    out = []
    pairs = [("rlnAngleTiltPrior", "rlnAngleTilt"), ("rlnAnglePsiPrior", "rlnAnglePsi")]
    for prior, angle in pairs + ([("rlnAngleRotPrior", "rlnAngleRot")] if with_rot else []):
        p = col(prior, None)
        a = col(angle, 0.0)
        a = np.where(np.isnan(a), 0.0, a)
        out.append(p if missing_as_nan else np.where(np.isnan(p), a, p))
    return tuple(out)


def _wrap180(d: torch.Tensor) -> torch.Tensor:
    """``|d|`` folded to [0, 180] degrees."""
    d = torch.remainder(d, 360.0)
    return torch.minimum(d, 360.0 - d)


def angle_log_prior(coarse: torch.Tensor, priors: AnglePriors, idx: np.ndarray,
                    symmetry_ops: torch.Tensor | None = None, current_angles: np.ndarray | None = None
                    ) -> torch.Tensor:
    """``[B, R]`` float32 log prior of the coarse orientations ``coarse [R, 3]`` (rot, tilt, psi degrees, in the
    frame the particles are refined in) for particles ``idx`` (module docstring); ``symmetry_ops [S, 3, 3]``
    (None: C1) give the mates ``R(ω)·S`` whose nearest tilt / psi counts; ``current_angles [B, 3]``: the rows'
    current angles, the centres of missing priors (:meth:`AnglePriors.centres`)."""
    dev = coarse.device
    c = coarse.to(torch.float64)
    R = euler_to_matrix(c[:, 0], c[:, 1], c[:, 2]).to(dev, torch.float64)  # [R, 3, 3]
    mates = R[None]
    if symmetry_ops is not None:
        mates = R[None] @ symmetry_ops.to(dev, torch.float64)[:, None]  # [S, R, 3, 3]
    col = mates[..., :, 2]  # [S, R, 3] last column: tilt and psi of RELION's Euler angles
    idx = np.asarray(idx)
    Fr = None
    if priors.frames is not None:
        Fr = torch.as_tensor(priors.frames[idx], dtype=torch.float64, device=dev)  # [B, 3, 3]
        col = torch.einsum("bji,srj->bsri", Fr, col)  # A_subᵀ·(R·S) last column  [B, S, R, 3]
    else:
        col = col[None]  # [1, S, R, 3]
    tilt = torch.rad2deg(torch.atan2(torch.sqrt(col[..., 0] ** 2 + col[..., 1] ** 2), col[..., 2]))
    psi = torch.rad2deg(torch.atan2(col[..., 1], -col[..., 0]))
    B = idx.size
    tilt_centre, psi_centre, rot_centre = priors.centres(idx, current_angles)
    logp = torch.zeros(B, tilt.shape[-1], dtype=torch.float64, device=dev)
    inside = torch.ones(B, tilt.shape[-1], dtype=torch.bool, device=dev)
    terms = [(priors.sigma_tilt, tilt, tilt_centre), (priors.sigma_psi, psi, psi_centre)]
    if priors.sigma_rot > 0 and priors.rot is not None:  # RELION's direction priors replace the tilt term
        row = mates[..., 2, :]  # [S, R, 3] last row: the direction (cos rot sin tilt, sin rot sin tilt, cos tilt)
        if priors.frames is not None:
            row = torch.einsum("bj,srjk->bsrk", Fr[:, :, 2], mates)  # last row of A_subᵀ·(R·S)
        else:
            row = row[None]
        rot_c = torch.deg2rad(torch.as_tensor(rot_centre, dtype=torch.float64, device=dev))[:, None, None]
        if priors.sigma_tilt > 0:
            # both: the angle between the direction and the prior's (rot, tilt) direction, σ = max(σ_rot, σ_tilt)
            tilt_c = torch.deg2rad(torch.as_tensor(tilt_centre, dtype=torch.float64, device=dev))[:, None, None]
            prior_dir = torch.stack([torch.cos(rot_c) * torch.sin(tilt_c), torch.sin(rot_c) * torch.sin(tilt_c),
                                     torch.cos(tilt_c)], dim=-1)  # [B, 1, 1, 3]
            d = torch.rad2deg(torch.acos((row * prior_dir).sum(-1).clamp(-1.0, 1.0))).amin(dim=1)
            terms[0] = (max(priors.sigma_rot, priors.sigma_tilt), d, None)
        else:
            # rot alone (RELION calculateDeltaRot): |asin| of the direction's component along the prior-rot y axis
            y = -torch.sin(rot_c) * row[..., 0] + torch.cos(rot_c) * row[..., 1]
            terms.append((priors.sigma_rot, torch.rad2deg(torch.asin(y.clamp(-1.0, 1.0))).abs().amin(dim=1), None))
    for sig, ang, centre in terms:
        if sig <= 0:
            continue
        if centre is None:  # already the angular distance to the prior  [B, R]
            d = ang
        else:
            ctr = torch.as_tensor(centre, dtype=torch.float64, device=dev)[:, None, None]
            d = _wrap180(ang - ctr).amin(dim=1)  # [B, R] nearest symmetry mate
        logp = logp - d.square() / (2.0 * sig * sig)
        inside &= d < SIGMA_CUTOFF * sig
    none = ~inside.any(dim=1, keepdim=True)  # no orientation within the cut: keep the Gaussian alone
    logp = torch.where(inside | none, logp, torch.full_like(logp, -torch.inf))
    return logp.to(torch.float32)
