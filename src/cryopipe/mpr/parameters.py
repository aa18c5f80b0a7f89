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
  antisymmetric phase :func:`cryopipe.core.ctf.beam_tilt_phase` of the reference.

Gauges: a translation of all particles equals a change of every tilt's shift, a common rotation of all particles
one of every tilt's angles, and a constant warp a tilt shift. :func:`gauge_fixed` removes those means, so the
optimiser cannot drift along them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["GROUPS", "CTF_GROUPS", "DEFOCUS_UNIT_A", "TiltSeriesParameters", "rotation_from_vector", "bspline_weights",
           "warp_at", "gauge_fixed"]

#: parameter groups, in the order they are usually added (M's staging)
GROUPS = ("poses", "shifts", "imagewarp", "stageangles", "ctf", "defocus", "beamtilt")
#: groups that change the CTF (refused on a species worse than ``ctf_minresolution``, as M)
CTF_GROUPS = ("ctf", "defocus", "beamtilt")
#: defocus change per unit of the ``ctf`` group (Å)
DEFOCUS_UNIT_A = 1000.0


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

    @classmethod
    def zeros(cls, n_particles: int, n_tilts: int, warp_grid: tuple[int, int] = (1, 1), dtype=torch.float64,
              device=None, n_beam_groups: int = 1) -> "TiltSeriesParameters":
        gx, gy = int(warp_grid[0]), int(warp_grid[1])
        z = lambda *s: torch.zeros(s, dtype=dtype, device=device)  # noqa: E731
        return cls(z(n_particles, 3), z(n_particles, 3), z(n_tilts, 2), z(n_tilts, 3), z(n_tilts, 3),
                   z(n_tilts, 2, gy, gx), z(n_tilts), z(max(1, int(n_beam_groups)), 2))

    def for_groups(self, groups) -> list[torch.Tensor]:
        """The tensors the groups refine (set ``requires_grad`` on them; the others are frozen)."""
        by_group = {"poses": [self.particle_angles, self.particle_shifts], "shifts": [self.tilt_shifts],
                    "stageangles": [self.tilt_angles], "ctf": [self.defocus], "imagewarp": [self.warp],
                    "defocus": [self.defocus_mean], "beamtilt": [self.beam_tilt]}
        out = []
        for f in fields(self):
            getattr(self, f.name).requires_grad_(False)
        for g in groups:
            for t in by_group[g]:
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
    return TiltSeriesParameters(angles, shifts, params.tilt_shifts, params.tilt_angles, params.defocus, warp,
                                params.defocus_mean, params.beam_tilt)
