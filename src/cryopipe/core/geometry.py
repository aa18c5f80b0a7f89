"""Rotations in RELION's conventions (Euler ZYZ, degrees at the API boundary).

Conventions (see docs/design.md and reference/conventions.md):

* ``A = euler_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``: rotation ``rot`` about Z, then
  ``tilt`` about the new Y, then ``psi`` about the new Z, written as the matrix that maps reference coordinates to
  observation coordinates. Numerically ``A = Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True)
  .as_matrix().T`` (scipy), i.e. ``A = Rz(psi) · Ry(tilt) · Rz(rot)`` with passive (coordinate-frame) factors.
* The 2D projection of a volume ``V`` in orientation ``A`` has Fourier transform ``P(k) = V̂(Aᵀ·(kx, ky, 0))``.
* Row 3 of ``A`` is the viewing direction ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``.
* Vectors are ordered ``(x, y, z)``; matrices act on column vectors: ``p = A @ v``.

All functions are batched over leading dimensions, accept tensors (or numbers / NumPy arrays, converted with
``torch.as_tensor``) and return tensors on the input's device with the input's floating dtype.
"""

from __future__ import annotations

import math

import torch

from cryopipe.errors import CryopipeError

__all__ = [
    "local_rotation_grid",
    "euler_to_matrix",
    "matrix_to_euler",
    "rotation_2d",
    "angular_distance",
    "viewing_direction",
    "direction_to_angles",
    "axis_angle_matrix",
    "recenter_origins",
    "random_orientations",
]

# RELION compares |sin(tilt)| against 16 * FLT_EPSILON to detect gimbal lock (src/euler.cpp).
_FLT_EPSILON = 1.1920928955078125e-07
_GIMBAL_EPS = 16.0 * _FLT_EPSILON


def _as_float_tensor(x, like: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as a floating tensor. Non-tensors are created on ``like``'s device and, when ``like`` is floating,
    directly in its dtype (so that a Python float such as 0.1 is not rounded to float32 on the way)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif like is not None:
        dtype = like.dtype if like.is_floating_point() else None
        t = torch.as_tensor(x, dtype=dtype, device=like.device)
    else:
        t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


def _broadcast_floats(*args) -> list[torch.Tensor]:
    """Convert to floating tensors on a common device/dtype and broadcast to one shape."""
    like = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    if like is None:
        like = next((a for a in args if isinstance(a, torch.Tensor)), None)
    ts = [_as_float_tensor(a, like) for a in args]
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = ts[0].device if like is None else like.device
    ts = [t.to(device=device, dtype=dtype) for t in ts]
    return list(torch.broadcast_tensors(*ts))


def euler_to_matrix(rot, tilt, psi) -> torch.Tensor:
    """RELION Euler matrix ``A`` (``Euler_angles2matrix``) for angles in degrees.

    ``rot``, ``tilt``, ``psi``: tensors (or numbers) of any broadcastable shape ``[...]``.
    Returns ``[..., 3, 3]``: ``A = Rz(psi)·Ry(tilt)·Rz(rot)`` (frame rotations), equal to scipy's
    ``Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T``.
    """
    rot, tilt, psi = _broadcast_floats(rot, tilt, psi)
    a, b, g = torch.deg2rad(rot), torch.deg2rad(tilt), torch.deg2rad(psi)
    ca, sa = torch.cos(a), torch.sin(a)
    cb, sb = torch.cos(b), torch.sin(b)
    cg, sg = torch.cos(g), torch.sin(g)
    cc, cs = cb * ca, cb * sa
    sc, ss = sb * ca, sb * sa
    row0 = torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], dim=-1)
    row1 = torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], dim=-1)
    row2 = torch.stack([sc, ss, cb], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)


def matrix_to_euler(A) -> torch.Tensor:
    """Euler angles ``(rot, tilt, psi)`` in degrees from rotation matrices ``[..., 3, 3]`` (RELION's branches).

    Follows RELION's ``Euler_matrix2angles``: with ``|sin tilt| = sqrt(A02² + A12²)``,

    * if ``|sin tilt| > 16·FLT_EPSILON``: ``psi = atan2(A12, −A02)``, ``rot = atan2(A21, A20)``,
      ``tilt = atan2(|sin tilt|, A22)`` (RELION's ``sign_sb`` is always +1, so tilt ∈ [0, 180]);
    * gimbal lock with ``A22 ≥ 0``: ``rot = tilt = 0``, ``psi = atan2(−A10, A00)``;
    * gimbal lock with ``A22 < 0``: ``rot = 0``, ``tilt = 180``, ``psi = atan2(A10, −A00)``.

    ``rot`` and ``psi`` lie in (−180, 180]. Returns ``[..., 3]``.
    """
    A = _as_float_tensor(A)
    if A.shape[-2:] != (3, 3):
        raise CryopipeError(f"matrix_to_euler: expected [..., 3, 3] matrices, got shape {tuple(A.shape)}")
    a02, a12 = A[..., 0, 2], A[..., 1, 2]
    a20, a21, a22 = A[..., 2, 0], A[..., 2, 1], A[..., 2, 2]
    a00, a10 = A[..., 0, 0], A[..., 1, 0]
    abs_sb = torch.sqrt(a02 * a02 + a12 * a12)
    regular = abs_sb > _GIMBAL_EPS
    up = a22 >= 0
    zero = torch.zeros_like(a22)

    rot = torch.where(regular, torch.atan2(a21, a20), zero)
    tilt = torch.where(
        regular,
        torch.atan2(abs_sb, a22),
        torch.where(up, zero, torch.full_like(a22, math.pi)),
    )
    psi = torch.where(
        regular,
        torch.atan2(a12, -a02),
        torch.where(up, torch.atan2(-a10, a00), torch.atan2(a10, -a00)),
    )
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


def rotation_2d(psi) -> torch.Tensor:
    """2D rotation ``[..., 2, 2]`` for in-plane angle ``psi`` (degrees), in the Euler convention.

    Equals the upper-left 2×2 block of ``euler_to_matrix(0, 0, psi)``: ``[[cos ψ, sin ψ], [−sin ψ, cos ψ]]``, so
    a 2D reference ``R`` seen at ``psi`` has FT ``R̂(Aᵀ·k)`` exactly as in 3D (this is how RELION's 2D
    classification uses ψ). Note: this is the *transpose* of RELION's ``rotation2DMatrix(psi)``.
    """
    psi = _as_float_tensor(psi)
    p = torch.deg2rad(psi)
    c, s = torch.cos(p), torch.sin(p)
    row0 = torch.stack([c, s], dim=-1)
    row1 = torch.stack([-s, c], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def angular_distance(A, B) -> torch.Tensor:
    """Rotation angle (degrees, in [0, 180]) of ``A·Bᵀ`` for rotation matrices ``[..., 3, 3]`` (broadcast).

    Computed as ``atan2(|axis part|, cos part)`` of ``A·Bᵀ``, accurate for both tiny and large angles.
    """
    A = _as_float_tensor(A)
    B = _as_float_tensor(B, A).to(device=A.device)
    dtype = torch.promote_types(A.dtype, B.dtype)
    R = A.to(dtype) @ B.to(dtype).transpose(-1, -2)
    tr = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    cos = 0.5 * (tr - 1.0)
    wx = R[..., 2, 1] - R[..., 1, 2]
    wy = R[..., 0, 2] - R[..., 2, 0]
    wz = R[..., 1, 0] - R[..., 0, 1]
    sin = 0.5 * torch.sqrt(wx * wx + wy * wy + wz * wz)
    return torch.rad2deg(torch.atan2(sin, cos))


def viewing_direction(A) -> torch.Tensor:
    """Viewing direction (unit ``(x, y, z)``) = row 3 of RELION's Euler matrix: ``[..., 3, 3] -> [..., 3]``."""
    A = _as_float_tensor(A)
    return A[..., 2, :]


def direction_to_angles(v) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rot, tilt)`` in degrees of direction(s) ``v`` ``[..., 3]`` (RELION's ``Euler_direction2angles``).

    ``rot = atan2(y, x)`` ∈ (−180, 180], ``tilt = acos(z)`` ∈ [0, 180]; ``rot = 0`` when tilt is within 0.001° of
    0 or 180 (RELION's choice). ``v`` need not be normalised.
    """
    v = _as_float_tensor(v)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    rot = torch.rad2deg(torch.atan2(v[..., 1], v[..., 0]))
    tilt = torch.rad2deg(torch.acos(torch.clamp(v[..., 2], -1.0, 1.0)))
    polar = (tilt.abs() < 0.001) | ((tilt - 180.0).abs() < 0.001)
    rot = torch.where(polar, torch.zeros_like(rot), rot)
    return rot, tilt


def axis_angle_matrix(axis, angle_deg) -> torch.Tensor:
    """Active rotation matrix ``[..., 3, 3]`` by ``angle_deg`` (right-handed) about ``axis`` ``[..., 3]``.

    ``R @ v`` rotates vector ``v`` counter-clockwise when looking down the axis towards the origin (Rodrigues).
    """
    axis = _as_float_tensor(axis)
    angle = _as_float_tensor(angle_deg, axis)
    dtype = torch.promote_types(axis.dtype, angle.dtype)
    axis, angle = axis.to(dtype), angle.to(device=axis.device, dtype=dtype)
    n = axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True)
    t = torch.deg2rad(angle)
    c, s = torch.cos(t)[..., None, None], torch.sin(t)[..., None, None]
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    zero = torch.zeros_like(x)
    K = torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )
    eye = torch.eye(3, dtype=n.dtype, device=n.device)
    outer = n[..., :, None] * n[..., None, :]
    return c * eye + s * K + (1.0 - c) * outer


def local_rotation_grid(step_deg: float, search_range: int = 1, only_rot: bool = False, device=None,
                        dtype: torch.dtype = torch.float64, axes_only: bool = False) -> torch.Tensor:
    """Small rotations ``exp(ω)``, identity first. Default: ``ω ∈ step·{−range … range}³`` (degrees, rotation
    vectors), ``[(2·range+1)³, 3, 3]``; ``axes_only``: ``ω = ±j·step`` along x, y and z only (``6·range + 1``);
    ``only_rot``: about z only (``2·range + 1``)."""
    r = torch.arange(-search_range, search_range + 1, dtype=dtype, device=device) * float(step_deg)
    zero = torch.zeros_like(r)
    if only_rot:
        w = torch.stack([zero, zero, r], dim=-1)
    elif axes_only:
        w = torch.cat([torch.stack([r, zero, zero], -1), torch.stack([zero, r, zero], -1),
                       torch.stack([zero, zero, r], -1)])
        w = torch.unique(w, dim=0)
    else:
        wz, wy, wx = torch.meshgrid(r, r, r, indexing="ij")
        w = torch.stack([wx, wy, wz], dim=-1).reshape(-1, 3)
    mag = torch.linalg.vector_norm(w, dim=-1)
    w = w[torch.argsort(mag, stable=True)]  # identity first
    mag = torch.linalg.vector_norm(w, dim=-1)
    axis = torch.where(mag[:, None] > 0, w / mag.clamp_min(1e-30)[:, None],
                       torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=device))
    return axis_angle_matrix(axis, mag)


def random_orientations(n: int, rng=None, *, only_rot: bool = False, device=None) -> torch.Tensor:
    """``[n, 3]`` float64 RELION Euler angles ``(rot, tilt, psi)`` in degrees, uniform on SO(3): ``rot, psi ~
    U[0, 360)``, ``tilt = acos(U[−1, 1])`` (density ∝ sin tilt; RELION's ``--nr_uniform`` draw and the fixtures'
    recipe). ``only_rot``: ``tilt = psi = 0``.

    ``rng``: a ``numpy.random.Generator`` (three draws of ``n`` in the order rot, tilt, psi: the simulators'
    stream), a ``torch.Generator`` or None (one ``[n, 3]`` ``torch.rand`` draw, columns rot, tilt, psi).
    """
    if rng is not None and not isinstance(rng, torch.Generator):   # numpy Generator
        import numpy as np

        rot = torch.from_numpy(np.asarray(rng.uniform(0.0, 360.0, n), dtype=np.float64))
        if only_rot:
            zero = torch.zeros(n, dtype=torch.float64)
            return torch.stack([rot, zero, zero], dim=-1).to(device)
        tilt = torch.from_numpy(np.degrees(np.arccos(rng.uniform(-1.0, 1.0, n))))
        psi = torch.from_numpy(np.asarray(rng.uniform(0.0, 360.0, n), dtype=np.float64))
        return torch.stack([rot, tilt, psi], dim=-1).to(device)
    u = torch.rand(n, 3, generator=rng, dtype=torch.float64)
    rot = 360.0 * u[:, 0]
    if only_rot:
        zero = torch.zeros(n, dtype=torch.float64)
        return torch.stack([rot, zero, zero], dim=-1).to(device)
    tilt = torch.rad2deg(torch.acos(1.0 - 2.0 * u[:, 1]))
    psi = 360.0 * u[:, 2]
    return torch.stack([rot, tilt, psi], dim=-1).to(device)


def recenter_origins(angles_deg, origins_A, center_px, pixel_size) -> torch.Tensor:
    """Re-centre particles on a point of the reference (``relion_star_handler --center``).

    ``angles_deg`` ``[N, 3]`` (rot, tilt, psi); ``origins_A`` ``[N, 2]`` or ``[N, 3]`` (rlnOriginX/Y(/Z)Angst);
    ``center_px`` ``(x, y, z)`` in reference pixels relative to the box centre (``--center_X/Y/Z``);
    ``pixel_size`` Å/px (scalar or ``[N]``). The new origin is ``origin − pixel_size · (A·c)`` restricted to the
    first 2 (or 3) components, with ``A`` the RELION Euler matrix: after this, the point ``c`` of the
    reference projects onto the centre of the re-extracted / re-centred particle box.
    Returns ``[N, 2|3]`` in Å.
    """
    angles = _as_float_tensor(angles_deg)
    origins = _as_float_tensor(origins_A, angles).to(angles.device)
    dtype = torch.promote_types(angles.dtype, origins.dtype)
    angles, origins = angles.to(dtype), origins.to(dtype)
    if angles.ndim != 2 or angles.shape[-1] != 3:
        raise CryopipeError(f"recenter_origins: angles must be [N, 3] (rot, tilt, psi), got {tuple(angles.shape)}")
    if origins.ndim != 2 or origins.shape[-1] not in (2, 3) or origins.shape[0] != angles.shape[0]:
        raise CryopipeError(
            f"recenter_origins: origins must be [N, 2] or [N, 3] with N={angles.shape[0]}, got {tuple(origins.shape)}"
        )
    c = torch.as_tensor(center_px, dtype=dtype, device=angles.device).reshape(-1)
    if c.numel() == 2:
        c = torch.cat([c, c.new_zeros(1)])
    if c.numel() != 3:
        raise CryopipeError(f"recenter_origins: center_px must be (x, y[, z]), got {tuple(c.tolist())}")
    apix = torch.as_tensor(pixel_size, dtype=dtype, device=angles.device)
    A = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    p = A @ c  # [N, 3] in pixels
    d = origins.shape[-1]
    return origins - apix.reshape(-1, 1) * p[:, :d]
