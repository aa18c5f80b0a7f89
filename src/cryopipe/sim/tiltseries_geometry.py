"""What a simulated tilt series looks like before any image is formed: tilt schemes and dose order, particle
positions (random in a slab, or on a sphere / cylinder lattice with surface-normal orientations), per-tilt
alignment and defocus, and the smooth image warp used to inject imperfections.

Conventions: positions are decentred tomogram px (:mod:`cryopipe.core.tilt_geometry`); orientations ``A`` map
reference coordinates to tomogram coordinates (``x_tomo = p + A·x_ref``), RELION Euler matrices
(:func:`cryopipe.core.geometry.euler_to_matrix`). All random draws use a ``numpy.random.Generator``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryopipe.core.geometry import euler_to_matrix, matrix_to_euler
from cryopipe.errors import CryopipeError

__all__ = [
    "ORDERS",
    "LATTICES",
    "tilt_scheme",
    "random_slab_positions",
    "sphere_lattice",
    "cylinder_lattice",
    "normal_frames",
    "SURFACE_PRIOR_ANGLES",
    "random_alignment",
    "random_tilt_defocus",
    "WARP_TERMS",
    "warp_basis",
    "random_warp_coefficients",
    "warp_displacement_px",
]

ORDERS = ("dose-symmetric", "bidirectional")
LATTICES = ("random", "sphere", "cylinder")

#: rlnAngleRot/Tilt/Psi of a particle whose z axis lies exactly along the surface normal, as RELION's surface
#: pickers write them (the subtomogram frame is turned by 90° about y so that refinement sees tilt ≈ 90°, away
#: from the rot/psi gimbal lock): ``A_sub·Euler(0, 90, 0)·ẑ = normal``; priors rlnAngleTiltPrior 90, PsiPrior 0.
SURFACE_PRIOR_ANGLES = (0.0, 90.0, 0.0)


# ------------------------------------------------------------------------------------------------ tilt scheme


def tilt_scheme(tilt_min: float, tilt_max: float, step: float, order: str = "dose-symmetric",
                dose_per_tilt: float = 3.0, group: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Nominal tilt angles (ascending, degrees) and the dose each received before it (rlnMicrographPreExposure).

    Acquisition starts at the angle closest to 0°. ``dose-symmetric`` (Hagen): then ``group`` tilts to the
    positive side, ``group`` to the negative side, alternating (0, +3, +6, −3, −6, +9, … for group 2);
    ``bidirectional``: all positive angles outward, then the negative ones outward. Tilt ``i`` acquired in
    position ``j`` (0-based) has pre-exposure ``j·dose_per_tilt``.
    """
    if order not in ORDERS:
        raise CryopipeError(f"tilt order {order!r}: use one of {', '.join(ORDERS)}")
    if step <= 0 or tilt_max < tilt_min or dose_per_tilt < 0 or group < 1:
        raise CryopipeError(f"tilt scheme {tilt_min}..{tilt_max} step {step}, dose {dose_per_tilt}: need step > 0, "
                            "min <= max and dose >= 0")
    n = int(math.floor((tilt_max - tilt_min) / step + 1e-6)) + 1
    angles = tilt_min + step * np.arange(n)
    start = int(np.argmin(np.abs(angles)))
    pos = list(range(start + 1, n))
    neg = list(range(start - 1, -1, -1))
    seq = [start]
    if order == "bidirectional":
        seq += pos + neg
    else:
        while pos or neg:
            seq += pos[:group] + neg[:group]
            pos, neg = pos[group:], neg[group:]
    pre = np.empty(n)
    pre[np.array(seq)] = dose_per_tilt * np.arange(n)
    return angles, pre


# ------------------------------------------------------------------------------------------------ positions


def random_slab_positions(n: int, tomogram_size, thickness_px: float, margin_px: float, min_distance_px: float,
                          rng: np.random.Generator, max_candidates: int | None = None) -> np.ndarray:
    """Up to ``n`` positions ``[P, 3]`` (decentred px), uniform in x, y (``margin_px`` from the tomogram's x/y
    edges) and in a slab of ``thickness_px`` centred on the tomogram's mid-plane (the particle centres stay
    ``margin_px`` inside the slab), pairwise ``>= min_distance_px`` apart (greedy sequential acceptance)."""
    X, Y, Z = (float(s) for s in tomogram_size)
    half_z = thickness_px / 2 - margin_px
    if X - 2 * margin_px <= 0 or Y - 2 * margin_px <= 0 or half_z < 0:
        raise CryopipeError(f"tomogram {X:g}x{Y:g} px with a slab of {thickness_px:g} px cannot hold particles of "
                            f"radius {margin_px:g} px; use a larger --image_size or --thickness")
    m = max_candidates or max(50 * n, 1000)
    cand = np.stack([rng.uniform(margin_px, X - margin_px, m), rng.uniform(margin_px, Y - margin_px, m),
                     Z / 2 + rng.uniform(-half_z, half_z, m)], axis=1)
    kept: list[np.ndarray] = []
    d2 = min_distance_px ** 2
    for c in cand:
        if kept and (((np.asarray(kept) - c) ** 2).sum(axis=1) < d2).any():
            continue
        kept.append(c)
        if len(kept) == n:
            break
    return np.asarray(kept, dtype=np.float64).reshape(-1, 3)


def sphere_lattice(centre_px, radius_px: float, spacing_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Points ``[P, 3]`` about ``spacing_px`` apart on a sphere (Fibonacci lattice) and their outward unit
    normals ``[P, 3]``."""
    if radius_px <= 0 or spacing_px <= 0:
        raise CryopipeError(f"sphere lattice: radius {radius_px:g} px and spacing {spacing_px:g} px must be > 0")
    count = max(1, int(round(4 * math.pi * radius_px ** 2 / (spacing_px ** 2 * math.sqrt(3) / 2))))
    k = np.arange(count) + 0.5
    z = 1.0 - 2.0 * k / count
    phi = k * math.pi * (3.0 - math.sqrt(5.0))
    normals = np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], axis=1)
    return np.asarray(centre_px, dtype=np.float64) + radius_px * normals, normals


def cylinder_lattice(centre_px, axis, radius_px: float, length_px: float, spacing_px: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Points ``[P, 3]`` on a cylinder (rings ``spacing_px`` apart along ``axis``, each ring's points staggered
    by half a spacing: a helical-like lattice) and their outward (radial) unit normals."""
    if radius_px <= 0 or spacing_px <= 0 or length_px <= 0:
        raise CryopipeError(f"cylinder lattice: radius {radius_px:g}, length {length_px:g} and spacing "
                            f"{spacing_px:g} px must be > 0")
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    u = np.cross(a, [0.0, 0.0, 1.0] if abs(a[2]) < 0.9 else [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(a, u)
    per_ring = max(3, int(round(2 * math.pi * radius_px / spacing_px)))
    n_rings = max(1, int(math.floor(length_px / spacing_px)) + 1)
    s = (np.arange(n_rings) - (n_rings - 1) / 2) * spacing_px
    phi = 2 * math.pi * (np.arange(per_ring)[None, :] + 0.5 * (np.arange(n_rings)[:, None] % 2)) / per_ring
    normals = (np.cos(phi)[..., None] * u + np.sin(phi)[..., None] * v).reshape(-1, 3)
    along = np.repeat(s, per_ring)[:, None] * a
    return np.asarray(centre_px, dtype=np.float64) + along + radius_px * normals, normals


def normal_frames(normals: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orientations of particles standing on a surface: ``(A_true, A_sub, rest_angles)``.

    ``A_true`` ``[P, 3, 3]``: the particle's z axis along the normal (``A_true·ẑ = n``) and a uniformly random
    rotation about it. ``A_sub`` (rlnTomoSubtomogramRot/Tilt/Psi, the picker's prior, which knows the normal but
    not the in-plane angle) is chosen as RELION's surface pickers do: ``A_sub·Euler(0, 90, 0)·ẑ = n``.
    ``rest_angles`` ``[P, 3]`` = rlnAngleRot/Tilt/Psi with ``A_sub·Euler(rest) = A_true`` (tilt 90°, psi 0°,
    rot = the in-plane angle)."""
    n = np.asarray(normals, dtype=np.float64)
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    helper = np.where(np.abs(n[:, 2:3]) < 0.9, np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0]]))
    u = np.cross(helper, n)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.cross(n, u)
    frame = np.stack([u, v, n], axis=2)  # columns u, v, n: frame·ẑ = n, det +1
    spin = rng.uniform(0.0, 360.0, len(n))
    A_true = frame @ euler_to_matrix(torch.as_tensor(spin), 0.0, 0.0).numpy()  # rotation about z keeps ẑ
    prior = euler_to_matrix(*SURFACE_PRIOR_ANGLES).numpy()
    A_sub = frame @ prior.T
    rest = matrix_to_euler(torch.as_tensor(np.swapaxes(A_sub, 1, 2) @ A_true)).numpy()
    return A_true, A_sub, rest


# ------------------------------------------------------------------------------------------------ per-tilt values


def random_alignment(nominal: np.ndarray, tilt_axis_deg: float, rng: np.random.Generator, jitter: float = 1.0
                     ) -> dict[str, np.ndarray]:
    """Plausible "true" per-tilt alignment (rlnTomoXTilt/YTilt/ZRot, rlnTomoX/YShiftAngst) for nominal angles
    ``[F]``: XTilt constant U[−1, 1]°, YTilt = nominal + a constant offset U[−1, 1]° + N(0, 0.1°), ZRot = tilt
    axis + N(0, 0.15°), shifts N(0, 24 Å) clipped at ±60 Å; every random part scaled by ``jitter``."""
    F = len(nominal)
    return {
        "rlnTomoXTilt": np.full(F, jitter * rng.uniform(-1, 1)),
        "rlnTomoYTilt": nominal + jitter * (rng.uniform(-1, 1) + rng.normal(0, 0.1, F)),
        "rlnTomoZRot": tilt_axis_deg + jitter * rng.normal(0, 0.15, F),
        "rlnTomoXShiftAngst": np.clip(jitter * rng.normal(0, 24, F), -60, 60),
        "rlnTomoYShiftAngst": np.clip(jitter * rng.normal(0, 24, F), -60, 60),
    }


def random_tilt_defocus(F: int, defocus_range, astigmatism_A: float, rng: np.random.Generator,
                        jitter_A: float = 300.0) -> dict[str, np.ndarray]:
    """Per-tilt astigmatic defocus: a tomogram mean ``D ~ U[defocus_range]``, astigmatism ``a ~ U[0,
    astigmatism_A]`` and angle ``φ ~ U[0, 180)`` shared by the tilts; per tilt ``U = D + a/2 + e``,
    ``V = D − a/2 + e`` with ``e ~ N(0, jitter_A)`` and angle ``φ + N(0, 5°)``."""
    lo, hi = float(defocus_range[0]), float(defocus_range[1])
    if not (0 < lo <= hi):
        raise CryopipeError(f"defocus range {lo:g}..{hi:g} Å: need 0 < min <= max (underfocus is positive)")
    mean = rng.uniform(lo, hi)
    astig = rng.uniform(0, astigmatism_A) if astigmatism_A > 0 else 0.0
    e = rng.normal(0, jitter_A, F)
    angle = rng.uniform(0, 180)
    return {"rlnDefocusU": mean + astig / 2 + e, "rlnDefocusV": mean - astig / 2 + e,
            "rlnDefocusAngle": angle + rng.normal(0, 5.0, F)}


# ------------------------------------------------------------------------------------------------ image warp

#: terms of the smooth image warp, each with unit RMS over the image and zero mean (so that the warp adds no
#: net shift): x̃ = (x − W/2)/(W/2), ỹ likewise, uniform in [−1, 1]
WARP_TERMS = ("(x^2-1/3)/sqrt(4/45)", "3xy", "(y^2-1/3)/sqrt(4/45)")


def warp_basis(xy: torch.Tensor, image_size) -> torch.Tensor:
    """The :data:`WARP_TERMS` ``[..., K]`` at image positions ``xy`` ``[..., 2]`` (px)."""
    W, H = float(image_size[0]), float(image_size[1])
    x = (xy[..., 0] - W / 2) / (W / 2)
    y = (xy[..., 1] - H / 2) / (H / 2)
    c = math.sqrt(4.0 / 45.0)
    return torch.stack([(x * x - 1 / 3) / c, 3 * x * y, (y * y - 1 / 3) / c], dim=-1)


def random_warp_coefficients(F: int, rms_A: float, rng: np.random.Generator) -> np.ndarray:
    """``[F, 2, K]`` coefficients (Å) of the x and y displacement per tilt; the terms are orthonormal over the
    image, so the expected RMS displacement over an image is ``rms_A``."""
    K = len(WARP_TERMS)
    return rng.normal(0.0, rms_A / math.sqrt(2 * K), (F, 2, K)) if rms_A > 0 else np.zeros((F, 2, K))


def warp_displacement_px(coefficients_A, xy: torch.Tensor, image_size, pixel_size: float) -> torch.Tensor:
    """Displacement ``[N, F, 2]`` (px) of image content at positions ``xy`` ``[N, F, 2]`` for per-tilt warp
    coefficients ``[F, 2, K]`` (Å)."""
    c = torch.as_tensor(np.asarray(coefficients_A), dtype=xy.dtype, device=xy.device)
    return torch.einsum("nfk,fdk->nfd", warp_basis(xy, image_size), c) / pixel_size
