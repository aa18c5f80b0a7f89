"""Refinable parameter groups of one tilt series, in well-scaled units (one unit ≈ a comparable image change).

Every group is a *correction* added to the metadata the refinement started from (all zeros = unchanged):

* ``poses`` — per particle a rotation vector ``[N, 3]`` (degrees; the orientation becomes ``A·Exp(δ)``, i.e. a
  rotation in the reference frame) and a position change ``[N, 3]`` (Å, tomogram frame);
* ``shifts`` — per tilt an image shift ``[F, 2]`` (Å, added to rlnTomoX/YShiftAngst);
* ``stageangles`` — per tilt ``[F, 3]`` (degrees, added to rlnTomoXTilt/YTilt/ZRot);
* ``ctf`` — per tilt ``[F, 3]`` in units of :data:`DEFOCUS_UNIT_A` (1000 Å = 0.1 µm, as M): mean defocus and
  the two astigmatism components ``((U−V)/2·cos 2θ, (U−V)/2·sin 2θ)``;
* ``imagewarp`` — per tilt a cubic B-spline grid ``[F, 2, gy, gx]`` of image displacements (Å, x then y) over
  the image (uniform nodes at the image corners and in between, end nodes repeated);
* ``defocus`` — per tilt the mean defocus only ``[F]`` (:data:`DEFOCUS_UNIT_A`); in a single-particle data set
  (:mod:`cryopipe.mpr.spa`: one "tilt" per particle) this is M's / RELION's per-particle defocus;
* ``beamtilt`` — per beam-tilt group (optics group) ``[G, 2]`` (mrad, added to rlnBeamTiltX/Y): the
  antisymmetric phase :func:`cryopipe.core.ctf.beam_tilt_phase` of the reference;
* ``temporalposes`` — M's particle poses over dose: per particle ``S`` temporal samples (``--pose_samples``) of a
  rotation vector ``[N, S, 3]`` (deg) and a position ``[N, S, 3]`` (Å), *deviations* from the particle's pose
  (``poses``; their mean over the samples is removed, so the mean stays in the pose); tilt ``f`` sees the samples
  linearly interpolated at its pre-exposure (:func:`dose_sample_weights`). With ``S = 1`` the group is empty and
  the forward model is exactly the one without it;
* ``magnification`` — per tilt series ``[2, 2]`` in units of :data:`MAG_UNIT` (1 %): the anisotropic magnification
  matrix ``M = M₀ + MAG_UNIT·m`` (RELION's rlnMagMat00..11 convention: the observed image's frequency ``k`` shows
  the undistorted one at ``M·k``, so image positions about the image centre move by ``Mᵀ``);
* ``oddzernike`` — antisymmetric aberrations of the tilt series: the beam tilt (``[G, 2]`` mrad, the same tensor as
  ``beamtilt``: the lowest odd order, :func:`cryopipe.core.ctf.beam_tilt_phase`) and the trefoil ``[2]`` (the
  pure ``ρ³·sin 3φ``, ``ρ³·cos 3φ`` terms, in units of :data:`ZERNIKE_UNIT_A`);
* ``evenzernike`` — symmetric aberrations of the tilt series: the five 4th-order terms ``[5]`` (``ρ⁴·sin 4φ``,
  ``ρ⁴·sin 2φ``, ``ρ⁴``, ``ρ⁴·cos 2φ``, ``ρ⁴·cos 4φ``; ``ρ⁴`` is a spherical-aberration change) added to the CTF
  phase ``γ``, in units of :data:`ZERNIKE_UNIT_A` (2nd order would repeat ``ctf``'s defocus and astigmatism).

The Zernike groups are kept in RELION's coefficients (rlnOddZernike / rlnEvenZernike: unnormalised Zernike
polynomials of the frequency in Å⁻¹, :func:`cryopipe.core.ctf.zernike_phase`) through :func:`odd_from_trefoil` and
:func:`even_from_fourth_order`.

Gauges: a translation of all particles equals a change of every tilt's shift, a common rotation of all particles
one of every tilt's angles, and a constant warp a tilt shift; the same holds for the particles' mean trajectory
over dose; the antisymmetric part of a magnification correction is an in-plane rotation of every tilt (ZRot).
:func:`gauge_fixed` removes those, so the optimiser cannot drift along them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["GROUPS", "CTF_GROUPS", "DEFOCUS_UNIT_A", "MAG_UNIT", "ZERNIKE_UNIT_A", "TiltSeriesParameters",
           "rotation_from_vector", "bspline_weights", "warp_at", "gauge_fixed", "dose_sample_weights",
           "odd_from_trefoil", "even_from_fourth_order"]

#: parameter groups, in the order they are usually added (M's staging)
GROUPS = ("poses", "shifts", "imagewarp", "stageangles", "ctf", "defocus", "beamtilt", "temporalposes",
          "magnification", "oddzernike", "evenzernike")
#: groups that change the CTF (refused on a species worse than ``ctf_minresolution``, as M)
CTF_GROUPS = ("ctf", "defocus", "beamtilt", "oddzernike", "evenzernike")
#: defocus change per unit of the ``ctf`` group (Å)
DEFOCUS_UNIT_A = 1000.0
#: magnification-matrix change per unit of the ``magnification`` group (M's step of 1/100)
MAG_UNIT = 0.01
#: Zernike groups: one unit = a phase of 1 rad at |k| = 1/ZERNIKE_UNIT_A Å⁻¹ (RELION coefficient = unit·ZERNIKE_UNIT_Aⁿ)
ZERNIKE_UNIT_A = 10.0


@dataclass
class TiltSeriesParameters:
    """Corrections for one tilt series (see the module docstring for units)."""

    particle_angles: torch.Tensor  # [N, 3] deg (rotation vector)
    particle_shifts: torch.Tensor  # [N, 3] Å
    tilt_shifts: torch.Tensor  # [F, 2] Å
    tilt_angles: torch.Tensor  # [F, 3] deg
    defocus: torch.Tensor  # [F, 3] DEFOCUS_UNIT_A
    warp: torch.Tensor  # [F, 2, gy, gx] Å
    defocus_mean: torch.Tensor  # [F] DEFOCUS_UNIT_A
    beam_tilt: torch.Tensor  # [G, 2] mrad
    trajectory_angles: torch.Tensor  # [N, S, 3] deg (deviation of each temporal sample)
    trajectory_shifts: torch.Tensor  # [N, S, 3] Å
    magnification: torch.Tensor  # [2, 2] MAG_UNIT
    trefoil: torch.Tensor  # [2] ZERNIKE_UNIT_A (ρ³ sin 3φ, ρ³ cos 3φ)
    fourth_order: torch.Tensor  # [5] ZERNIKE_UNIT_A (ρ⁴ sin 4φ, ρ⁴ sin 2φ, ρ⁴, ρ⁴ cos 2φ, ρ⁴ cos 4φ)

    @classmethod
    def zeros(cls, n_particles: int, n_tilts: int, warp_grid: tuple[int, int] = (1, 1), dtype=torch.float64,
              device=None, n_beam_groups: int = 1, pose_samples: int = 1) -> "TiltSeriesParameters":
        gx, gy = int(warp_grid[0]), int(warp_grid[1])
        z = lambda *s: torch.zeros(s, dtype=dtype, device=device)  # noqa: E731
        S = max(1, int(pose_samples))
        return cls(z(n_particles, 3), z(n_particles, 3), z(n_tilts, 2), z(n_tilts, 3), z(n_tilts, 3),
                   z(n_tilts, 2, gy, gx), z(n_tilts), z(max(1, int(n_beam_groups)), 2), z(n_particles, S, 3),
                   z(n_particles, S, 3), z(2, 2), z(2), z(5))

    @property
    def pose_samples(self) -> int:
        return int(self.trajectory_angles.shape[1])

    def for_groups(self, groups) -> list[torch.Tensor]:
        """The tensors the groups refine (set ``requires_grad`` on them; the others are frozen)."""
        trajectories = [self.trajectory_angles, self.trajectory_shifts] if self.pose_samples > 1 else []
        by_group = {"poses": [self.particle_angles, self.particle_shifts], "shifts": [self.tilt_shifts],
                    "stageangles": [self.tilt_angles], "ctf": [self.defocus], "imagewarp": [self.warp],
                    "defocus": [self.defocus_mean], "beamtilt": [self.beam_tilt], "temporalposes": trajectories,
                    "magnification": [self.magnification], "oddzernike": [self.beam_tilt, self.trefoil],
                    "evenzernike": [self.fourth_order]}
        out = []
        for f in fields(self):
            getattr(self, f.name).requires_grad_(False)
        for g in groups:
            for t in by_group[g]:
                if not any(t is o for o in out):
                    t.requires_grad_(True)
                    out.append(t)
        return out

    def detached(self) -> "TiltSeriesParameters":
        return TiltSeriesParameters(*(getattr(self, f.name).detach().clone() for f in fields(self)))


def rotation_from_vector(v_deg: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` (Rodrigues) for rotation vectors ``[..., 3]`` (axis × angle, degrees);
    smooth (and differentiable) at zero."""
    v = torch.deg2rad(v_deg)
    t2 = (v * v).sum(-1)
    small = t2 < 1e-8
    t2s = torch.where(small, torch.ones_like(t2), t2)
    t = torch.sqrt(t2s)
    a = torch.where(small, 1.0 - t2 / 6.0, torch.sin(t) / t)  # sin θ / θ
    b = torch.where(small, 0.5 - t2 / 24.0, (1.0 - torch.cos(t)) / t2s)  # (1 − cos θ) / θ²
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                     torch.stack([-y, x, zero], -1)], -2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand(K.shape)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def bspline_weights(u: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Uniform cubic B-spline weights ``[P, n_nodes]`` at positions ``u`` ``[P]`` in node units (node ``j`` at
    ``u = j``; nodes beyond the ends repeat the end nodes, so the weights sum to 1 everywhere)."""
    if n_nodes == 1:
        return torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)
    u = u.clamp(0.0, n_nodes - 1.0)
    i = torch.floor(u).detach()
    t = u - i
    basis = torch.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4, -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1, t ** 3],
                        -1) / 6.0  # nodes i−1 … i+2
    idx = (i.long()[:, None] + torch.arange(-1, 3, device=u.device)).clamp(0, n_nodes - 1)
    return torch.zeros(u.shape[0], n_nodes, dtype=u.dtype, device=u.device).scatter_add(1, idx, basis)


def warp_at(warp: torch.Tensor, tilt: torch.Tensor, xy_px: torch.Tensor, image_size) -> torch.Tensor:
    """Image-warp displacement ``[P, 2]`` (Å) of tilt ``tilt`` ``[P]`` at image positions ``xy_px`` ``[P, 2]``
    (unbinned px); ``warp`` ``[F, 2, gy, gx]`` (Å), nodes spread uniformly from pixel 0 to ``W−1`` / ``H−1``."""
    F, _, gy, gx = warp.shape
    W, H = float(image_size[0]), float(image_size[1])
    wx = bspline_weights(xy_px[:, 0] / max(W - 1.0, 1.0) * (gx - 1), gx)  # [P, gx]
    wy = bspline_weights(xy_px[:, 1] / max(H - 1.0, 1.0) * (gy - 1), gy)  # [P, gy]
    nodes = warp[tilt]  # [P, 2, gy, gx]
    return torch.einsum("pdyx,py,px->pd", nodes, wy.to(nodes.dtype), wx.to(nodes.dtype))


def gauge_fixed(params: TiltSeriesParameters, groups) -> TiltSeriesParameters:
    """Corrections with the gauge modes removed (module docstring): the mean particle shift when tilt shifts are
    refined too, the mean particle rotation when stage angles are, the per-tilt mean warp node when tilt shifts
    are. Differentiable; the result is what the forward model uses and what is written out."""
    groups = set(groups)
    shifts, angles, warp = params.particle_shifts, params.particle_angles, params.warp
    if "poses" in groups and "shifts" in groups and shifts.shape[0] > 1:
        shifts = shifts - shifts.mean(0, keepdim=True)
    if "poses" in groups and "stageangles" in groups and angles.shape[0] > 1:
        angles = angles - angles.mean(0, keepdim=True)
    if "imagewarp" in groups and "shifts" in groups and warp[0].numel() > 2:
        warp = warp - warp.mean(dim=(-1, -2), keepdim=True)
    out = replace(params, particle_angles=angles, particle_shifts=shifts, warp=warp)
    if params.pose_samples > 1:
        out = replace(out, **_trajectory_gauge(params, groups))
    if "magnification" in groups and "stageangles" in groups:
        out = replace(out, magnification=0.5 * (params.magnification + params.magnification.T))
    return out


def _trajectory_gauge(params: TiltSeriesParameters, groups: set) -> dict:
    """Trajectories with their mean over the samples removed (that is the pose), and their mean over the
    particles when tilt shifts (positions) or stage angles (angles) are refined too."""
    angles = params.trajectory_angles - params.trajectory_angles.mean(1, keepdim=True)
    shifts = params.trajectory_shifts - params.trajectory_shifts.mean(1, keepdim=True)
    if "shifts" in groups and shifts.shape[0] > 1:
        shifts = shifts - shifts.mean(0, keepdim=True)
    if "stageangles" in groups and angles.shape[0] > 1:
        angles = angles - angles.mean(0, keepdim=True)
    return {"trajectory_angles": angles, "trajectory_shifts": shifts}


def dose_sample_weights(pre_exposure: torch.Tensor, samples: int) -> torch.Tensor:
    """Linear-interpolation weights ``[F, S]`` of ``S`` temporal samples spread evenly over the tilt series'
    accumulated dose: tilt ``f`` sits at ``t = (D_f − D_min)/(D_max − D_min)·(S − 1)`` (``D`` = pre-exposure, e/Å²)
    and weighs the two samples around ``t`` (rows sum to 1; all dose equal: sample 0)."""
    d = pre_exposure.to(torch.float64)
    span = float(d.max() - d.min()) if d.numel() else 0.0
    t = (d - d.min()) / span * (samples - 1) if span > 0 else torch.zeros_like(d)
    nodes = torch.arange(samples, dtype=d.dtype, device=d.device)
    return (1.0 - (t[:, None] - nodes[None, :]).abs()).clamp(min=0.0)


def odd_from_trefoil(trefoil: torch.Tensor) -> torch.Tensor:
    """RELION's six odd Zernike coefficients ``[..., 6]`` (rlnOddZernike order ``(n, m)`` = (1,−1), (1,1), (3,−3),
    (3,−1), (3,1), (3,3); frequency in Å⁻¹) of the trefoil ``[..., 2]`` (:data:`ZERNIKE_UNIT_A` units): ``Z₃^{∓3}`` is
    the pure ``ρ³·sin/cos 3φ``, so only those two coefficients are non-zero."""
    scale = ZERNIKE_UNIT_A ** 3
    z = torch.zeros(*trefoil.shape[:-1], 6, dtype=trefoil.dtype, device=trefoil.device)
    return torch.cat([z[..., :2], scale * trefoil[..., :1], z[..., 3:5], scale * trefoil[..., 1:]], -1)


def even_from_fourth_order(fourth: torch.Tensor) -> torch.Tensor:
    """RELION's nine even Zernike coefficients ``[..., 9]`` (rlnEvenZernike order (0,0), (2,−2), (2,0), (2,2),
    (4,−4), (4,−2), (4,0), (4,2), (4,4)) of the pure 4th-order terms ``[..., 5]`` (:data:`ZERNIKE_UNIT_A` units):
    ``ρ⁴ = Z₄⁰/6 + Z₂⁰/2 + 1/3``, ``ρ⁴·cos 2φ = Z₄²/4 + 3·Z₂²/4`` (same for sin), ``ρ⁴·cos 4φ = Z₄⁴``."""
    a = fourth * ZERNIKE_UNIT_A ** 4
    s4, s2, c0, c2, c4 = a.unbind(-1)
    return torch.stack([c0 / 3.0, 0.75 * s2, 0.5 * c0, 0.75 * c2, s4, 0.25 * s2, c0 / 6.0, 0.25 * c2, c4], -1)
