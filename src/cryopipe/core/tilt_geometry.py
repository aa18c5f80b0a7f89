"""Tilt-series geometry in RELION 5's conventions: projection of tomogram points into tilt images, per-tilt
particle orientations, depth-dependent defocus, dose weights and visibility.

Conventions (re-derived from RELION 5's ``Tomogram``/``ParticleSet``/``Damage``; pinned by the fixtures in
``shared/fixtures/relion_tomo``):

* Units: **px** = one unbinned tilt-series pixel (rlnTomoTiltSeriesPixelSize Å). 3D positions are *decentred*
  tomogram pixels (origin at the tomogram corner); the tomogram centre is ``c = (X//2, Y//2, Z//2)`` of
  rlnTomoSizeX/Y/Z. Image pixel ``(x, y)`` = (column, row), 0-based, pixel centres at integers, image centre
  ``(W//2, H//2)``.
* Tilt rotation ``R_f = Rz(ZRot)·Ry(YTilt)·Rx(XTilt)`` with ordinary active right-handed rotations (degrees), e.g.
  ``Ry(a) = [[cos a, 0, sin a], [0, 1, 0], [−sin a, 0, cos a]]``.
* Projection ``q_f(p) = R_f·(p − c) + (XShiftAngst, YShiftAngst, 0)/px + (W//2, H//2, 0)``: ``(q_x, q_y)`` is the
  position in tilt image ``f`` and ``q_z`` the depth (px) below the tomogram centre's plane. As a 4×4 matrix this
  is RELION 4's rlnTomoProjX/Y/Z/W rows.
* A particle with orientation ``A`` (RELION Euler matrix, reference → tomogram) is seen in tilt ``f`` as a
  single-particle image with matrix ``R_f·A``.
* Defocus at depth: ``ΔU_f(p) = rlnDefocusU_f + hand·px·slope·q_z`` (same increment for ΔV).
* Dose weight (Grant & Grigorieff critical exposure): ``W_f(k) = exp(−D_f / (2·(0.245·k^−1.665 + 2.81)))`` with
  ``k`` in 1/Å and ``D_f`` = rlnMicrographPreExposure (e/Å²); or ``exp(−B·D_f·k²/4)`` with a per-dose B-factor.

Every function is batched (leading dimensions broadcast) and works on CPU or CUDA tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from cryopipe.core.fourier import freq_grid_2d
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.errors import CryopipeError

__all__ = [
    "tilt_rotation",
    "tilt_angles_from_rotation",
    "projection_matrices",
    "decompose_projection_matrices",
    "project_points",
    "particle_positions_px",
    "centered_angstrom",
    "particle_tilt_matrices",
    "subtomogram_orientations",
    "depth_defocus",
    "dose_weights",
    "visible_in_tilts",
]


def _tensor(x, dtype=torch.float64, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype, device=device if device is not None else x.device)
    return torch.tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)


def _axis_rotation(angle_deg: torch.Tensor, axis: int) -> torch.Tensor:
    """Active right-handed rotation ``[..., 3, 3]`` by ``angle_deg`` about coordinate axis 0 (x), 1 (y) or 2 (z)."""
    a = torch.deg2rad(angle_deg)
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if axis == 0:
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == 1:
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def tilt_rotation(x_tilt, y_tilt, z_rot) -> torch.Tensor:
    """``R_f = Rz(z_rot)·Ry(y_tilt)·Rx(x_tilt)`` ``[..., 3, 3]`` from rlnTomoXTilt/YTilt/ZRot (degrees, any
    broadcastable shape ``[...]``; float64 unless a floating tensor is given)."""
    dtype = next((t.dtype for t in (x_tilt, y_tilt, z_rot) if isinstance(t, torch.Tensor) and t.is_floating_point()),
                 torch.float64)
    device = next((t.device for t in (x_tilt, y_tilt, z_rot) if isinstance(t, torch.Tensor)), None)
    x, y, z = torch.broadcast_tensors(*(_tensor(v, dtype, device) for v in (x_tilt, y_tilt, z_rot)))
    return _axis_rotation(z, 2) @ _axis_rotation(y, 1) @ _axis_rotation(x, 0)


def tilt_angles_from_rotation(R: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tilt_rotation`: ``(x_tilt, y_tilt, z_rot)`` ``[..., 3]`` in degrees, with ``y_tilt`` in
    [−90°, 90°]. ``R`` ``[..., 3, 3]`` must be a rotation (checked by the caller, see
    :func:`decompose_projection_matrices`)."""
    # R = Rz·Ry·Rx: R[2,0] = −sin y, R[2,1] = cos y sin x, R[2,2] = cos y cos x, R[1,0] = sin z cos y, R[0,0] = cos z cos y
    y = torch.asin(torch.clamp(-R[..., 2, 0], -1.0, 1.0))
    x = torch.atan2(R[..., 2, 1], R[..., 2, 2])
    z = torch.atan2(R[..., 1, 0], R[..., 0, 0])
    return torch.rad2deg(torch.stack([x, y, z], dim=-1))


def _centre(size) -> torch.Tensor:
    return torch.as_tensor([int(s) // 2 for s in size], dtype=torch.float64)


def projection_matrices(x_tilt, y_tilt, z_rot, shifts_A, pixel_size: float, tomogram_size, image_size) -> torch.Tensor:
    """Per-tilt projection matrices ``P_f`` ``[F, 4, 4]`` (float64) mapping decentred tomogram px (homogeneous) to
    ``(image x, image y, depth, 1)``.

    ``x_tilt, y_tilt, z_rot``: ``[F]`` degrees; ``shifts_A``: ``[F, 2]`` rlnTomoX/YShiftAngst; ``pixel_size``: Å per
    unbinned px; ``tomogram_size``: rlnTomoSizeX/Y/Z (unbinned px); ``image_size``: ``(W, H)`` of the tilt images.
    """
    R = tilt_rotation(x_tilt, y_tilt, z_rot)
    shifts = _tensor(shifts_A, device=R.device).reshape(-1, 2) / float(pixel_size)
    F = R.shape[0]
    c = _centre(tomogram_size).to(R.device)
    img_c = torch.tensor([int(image_size[0]) // 2, int(image_size[1]) // 2, 0.0], dtype=torch.float64,
                         device=R.device)
    P = torch.zeros((F, 4, 4), dtype=torch.float64, device=R.device)
    P[:, :3, :3] = R
    P[:, :3, 3] = -(R @ c) + img_c
    P[:, :2, 3] += shifts
    P[:, 3, 3] = 1.0
    return P


def decompose_projection_matrices(P, pixel_size: float, tomogram_size, image_size, tolerance: float = 1e-4
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION 4's per-tilt matrices (rlnTomoProjX/Y/Z/W rows, ``[F, 4, 4]``) → ``(angles [F, 3], shifts_A [F, 2])``
    with angles ``(x_tilt, y_tilt, z_rot)`` (degrees) and shifts rlnTomoX/YShiftAngst.

    Raises :class:`CryopipeError` naming the tilt when a matrix is not a pure rotation + shift (a scaled or
    sheared 3×3 block, a bottom row other than (0, 0, 0, 1), or a depth translation that is not the one the
    tomogram centre implies), since such a matrix has no RELION 5 equivalent.
    """
    P = _tensor(P)
    R = P[:, :3, :3]
    eye = torch.eye(3, dtype=P.dtype, device=P.device)
    err = (R @ R.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2))
    det = torch.linalg.det(R)
    bottom = (P[:, 3] - torch.tensor([0, 0, 0, 1.0], dtype=P.dtype, device=P.device)).abs().amax(dim=-1)
    c = _centre(tomogram_size).to(P.device)
    img_c = torch.tensor([int(image_size[0]) // 2, int(image_size[1]) // 2], dtype=P.dtype, device=P.device)
    translation = P[:, :3, 3] + R @ c  # = (shift/px + image centre, 0)
    bad = (err > tolerance) | ((det - 1).abs() > tolerance) | (bottom > tolerance) | (translation[:, 2].abs() > 1e-3)
    if bool(bad.any()):
        f = int(torch.nonzero(bad)[0, 0])
        raise CryopipeError(
            f"projection matrix of tilt {f + 1} is not a rotation plus an image shift (|RRᵀ−I| = {float(err[f]):.2g}, "
            f"det = {float(det[f]):.4g}, depth shift {float(translation[f, 2]):.3g} px); RELION 5 cannot express it "
            "as rlnTomoXTilt/YTilt/ZRot + shifts: re-align the tilt series")
    angles = tilt_angles_from_rotation(R)
    shifts = (translation[:, :2] - img_c) * float(pixel_size)
    return angles, shifts


def project_points(P: torch.Tensor, points_px: torch.Tensor) -> torch.Tensor:
    """Positions of 3D points in every tilt: ``P`` ``[F, 4, 4]``, ``points_px`` ``[N, 3]`` (decentred px) →
    ``[N, F, 3]`` = (image x, image y, depth) in px."""
    P = P.to(points_px.dtype) if points_px.is_floating_point() else P
    return torch.einsum("fij,nj->nfi", P[:, :3, :3], points_px) + P[:, :3, 3]


def particle_positions_px(centered_A, origins_A, subtomo_matrices, pixel_size: float, tomogram_size) -> torch.Tensor:
    """Particle centres ``[N, 3]`` in decentred tomogram px (RELION 5 ``ParticleSet::getPosition``):
    ``p = centered_A/px + (X/2, Y/2, Z/2) − A_sub·origin_A/px``.

    ``centered_A``: ``[N, 3]`` rlnCenteredCoordinateX/Y/ZAngst; ``origins_A``: ``[N, 3]`` rlnOriginX/Y/ZAngst
    (subtomogram frame); ``subtomo_matrices``: ``[N, 3, 3]`` Euler(rlnTomoSubtomogramRot/Tilt/Psi) (identity when
    the columns are absent)."""
    centered = _tensor(centered_A)
    origins = _tensor(origins_A, device=centered.device)
    A_sub = _tensor(subtomo_matrices, device=centered.device)
    half = torch.as_tensor([float(s) / 2.0 for s in tomogram_size], dtype=torch.float64, device=centered.device)
    return centered / pixel_size + half - torch.einsum("nij,nj->ni", A_sub, origins) / pixel_size


def centered_angstrom(decentred_px, pixel_size: float, tomogram_size) -> torch.Tensor:
    """Decentred tomogram px ``[N, 3]`` (RELION 4's rlnCoordinateX/Y/Z) → rlnCenteredCoordinate*Angst ``[N, 3]``."""
    half = torch.as_tensor([float(s) / 2.0 for s in tomogram_size], dtype=torch.float64)
    return (_tensor(decentred_px) - half) * pixel_size


def particle_tilt_matrices(tilt_rotations: torch.Tensor, particle_matrices: torch.Tensor) -> torch.Tensor:
    """Single-particle matrices ``R_f·A`` ``[N, F, 3, 3]`` of each particle in each tilt, from the tilt rotations
    ``[F, 3, 3]`` (or ``P[:, :3, :3]``) and the particles' orientations ``[N, 3, 3]`` (``A_sub·A_particle``)."""
    return torch.einsum("fij,njk->nfik", tilt_rotations.to(particle_matrices.dtype), particle_matrices)


def subtomogram_orientations(subtomo_angles, particle_angles) -> torch.Tensor:
    """Full particle orientation ``A = Euler(rlnTomoSubtomogram*)·Euler(rlnAngle*)`` ``[N, 3, 3]``; angles ``[N, 3]``
    degrees (rot, tilt, psi)."""
    sub = _tensor(subtomo_angles)
    part = _tensor(particle_angles, device=sub.device)
    return euler_to_matrix(sub[:, 0], sub[:, 1], sub[:, 2]) @ euler_to_matrix(part[:, 0], part[:, 1], part[:, 2])


def depth_defocus(defocus_u, defocus_v, depth_px, hand: float, pixel_size: float, slope: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth-corrected defocus (Å) ``([N, F], [N, F])``: per-tilt rlnDefocusU/V ``[F]`` plus
    ``hand·pixel_size·slope·depth``, ``depth_px`` ``[N, F]`` the particle's depth from :func:`project_points`.
    With hand = +1 a particle at positive depth is more underfocused."""
    dz = _tensor(depth_px) * (float(hand) * float(pixel_size) * float(slope))
    return _tensor(defocus_u, device=dz.device) + dz, _tensor(defocus_v, device=dz.device) + dz


def dose_weights(n: int, pixel_size: float, pre_exposure, bfactor_per_dose: float = 0.0,
                 cutoff_fraction: float = 0.0, device=None) -> torch.Tensor:
    """Dose weights ``[F, n, n//2+1]`` (float32) on the half-complex grid of an ``n × n`` image of pixel size
    ``pixel_size`` Å, for pre-exposures ``[F]`` (e/Å², rlnMicrographPreExposure).

    Critical-exposure curve ``exp(−D/(2·(0.245·k^−1.665 + 2.81)))`` (``W(0) = 1``), or ``exp(−B·D·k²/4)`` when
    ``bfactor_per_dose`` (rlnCtfBfactorPerElectronDose) is > 0. Weights below ``cutoff_fraction`` are set to 0
    (RELION's ``--cutoff_fract``)."""
    dose = _tensor(pre_exposure, device=device).reshape(-1, 1, 1)
    kx, ky = freq_grid_2d(n, device=dose.device, dtype=torch.float64)
    k = torch.sqrt(kx * kx + ky * ky) / (n * float(pixel_size))
    if bfactor_per_dose > 0:
        w = torch.exp(-float(bfactor_per_dose) * dose * (k * k) / 4.0)
    else:
        critical = 0.245 * torch.where(k > 0, k, torch.ones_like(k)).pow(-1.665) + 2.81
        w = torch.where(k > 0, torch.exp(-dose / (2.0 * critical)), torch.ones_like(dose * k))
    if cutoff_fraction > 0:
        w = torch.where(w < cutoff_fraction, torch.zeros_like(w), w)
    return w.to(torch.float32)


def visible_in_tilts(image_xy: torch.Tensor, image_size, margin_px: float, pre_exposure=None,
                     max_dose: float | None = None) -> torch.Tensor:
    """Boolean ``[N, F]``: particle ``n`` is usable in tilt ``f`` when its projected centre ``image_xy``
    ``[N, F, 2]`` is farther than ``margin_px`` (unbinned px) from every image edge of an image ``(W, H)`` and
    the tilt's pre-exposure is ≤ ``max_dose`` (if given)."""
    W, H = float(image_size[0]), float(image_size[1])
    x, y = image_xy[..., 0], image_xy[..., 1]
    inside = (x - margin_px >= 0) & (x + margin_px < W) & (y - margin_px >= 0) & (y + margin_px < H)
    if max_dose is not None and max_dose > 0 and pre_exposure is not None:
        inside = inside & (_tensor(pre_exposure, device=inside.device) <= max_dose)[None, :]
    return inside

