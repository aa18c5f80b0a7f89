"""HEALPix (NEST) orientation sampling as used by RELION (``src/healpix_sampling.cpp``), without healpy.

HEALPix (Górski et al. 2005, ApJ 622:759) divides the sphere into 12 base faces, each split into
``nside² = 4^order`` equal-area pixels. In the NEST scheme a pixel index ``p`` is ``face·nside² + ipf`` where the
bits of ``ipf`` interleave the face coordinates ``(ix, iy)`` (``ix`` on even bits, ``iy`` on odd bits), so the
children of pixel ``p`` at ``order + 1`` are ``4p … 4p+3``. Pixel centres (``pix2ang``): with
``jr = jrll[face]·nside − ix − iy − 1`` (ring number counted from the north pole, 1 … 4·nside−1) and
``jrll = (2,2,2,2,3,3,3,3,4,4,4,4)``, ``jpll = (1,3,5,7,0,2,4,6,1,3,5,7)``:

* north cap ``jr < nside``: ``nr = jr``, ``z = 1 − nr²/(3·nside²)``;
* south cap ``jr > 3·nside``: ``nr = 4·nside − jr``, ``z = nr²/(3·nside²) − 1``;
* equatorial belt: ``nr = nside``, ``z = (2·nside − jr)·2/(3·nside)``;
* ``φ = (π/4)·(jpll[face]·nr + ix − iy)/nr`` (mod 2π).

RELION maps a pixel to Euler angles ``rot = φ`` (wrapped into [−180, 180]) and ``tilt = acos(z)`` (degrees); the
angular step of order ``n`` is ``360 / (6·2^n)`` and the default in-plane (psi) step is the same.

Symmetry: directions related by a group operator ``R`` (``v ↦ R·v``) give equivalent views of a symmetric
reference. :func:`asymmetric_unit_pixels` folds every grid direction into one fundamental domain (the Dirichlet
cell of a fixed generic direction ``u₀``: the copy ``R·v`` closest to ``u₀``, ties broken by a second direction
``u₁``), bins the folded copies by HEALPix pixel and keeps one grid direction per occupied pixel (the one whose
copy is closest to the pixel centre). All grid directions inside the domain are kept; border and near-axis pixels
get a direction too. This is not RELION's rule (per-group angle ranges plus a seam clean-up, which leaves holes
around n-fold axes for n ≥ 5), so the *set* of directions differs from RELION's, but it is a subset of the same
HEALPix grid (pixel indices and oversampling children stay valid) with about ``Npix/|G|`` members whose symmetry
copies cover the sphere as densely as the full grid.
"""

from __future__ import annotations

import functools
import math

import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.geometry import euler_to_matrix, matrix_to_euler
from cryopipe.errors import CryopipeError

__all__ = [
    "MAX_ORDER",
    "nside",
    "npix",
    "angular_step",
    "pix2ang_nest",
    "ang2pix_nest",
    "healpix_vectors",
    "healpix_directions",
    "asymmetric_unit_pixels",
    "psi_angles",
    "orientation_grid",
    "perturb_orientations",
    "next_random_perturbation",
    "oversampled_directions",
    "oversampled_psi",
]

MAX_ORDER = 12

_JRLL = (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
_JPLL = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)

# Generic reference directions for the Dirichlet asymmetric unit (not on any symmetry axis of RELION's groups).
_U0 = (math.radians(3.1), math.radians(17.3))  # (rot, tilt) in radians
_U1 = (math.radians(131.7), math.radians(71.9))


def _check_order(order: int) -> int:
    if not (isinstance(order, int) or (hasattr(order, "__index__"))) or not (0 <= int(order) <= MAX_ORDER):
        raise CryopipeError(f"HEALPix order must be an integer in 0..{MAX_ORDER} (got {order!r})")
    return int(order)


def nside(order: int) -> int:
    """HEALPix ``nside = 2^order``."""
    return 1 << _check_order(order)


def npix(order: int) -> int:
    """Number of HEALPix pixels ``12·4^order``."""
    return 12 * nside(order) ** 2


def angular_step(order: int) -> float:
    """RELION's angular sampling (degrees) of HEALPix order ``order``: ``360 / (6·2^order)``."""
    return 360.0 / (6 * nside(order))


def pix2ang_nest(order: int, pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of NEST pixels ``pix`` (int64 tensor) as ``(z = cos θ, φ)``, float64, φ in [0, 2π)."""
    order = _check_order(order)
    ns = 1 << order
    pix = torch.as_tensor(pix, dtype=torch.int64)
    if pix.numel() and (int(pix.min()) < 0 or int(pix.max()) >= 12 * ns * ns):
        raise CryopipeError(f"HEALPix pixel index out of range 0..{12 * ns * ns - 1} for order {order}")
    face = pix // (ns * ns)
    ipf = pix % (ns * ns)
    ix = torch.zeros_like(ipf)
    iy = torch.zeros_like(ipf)
    for b in range(order):  # de-interleave the bits of ipf
        ix |= ((ipf >> (2 * b)) & 1) << b
        iy |= ((ipf >> (2 * b + 1)) & 1) << b
    jrll = torch.tensor(_JRLL, dtype=torch.int64, device=pix.device)[face]
    jpll = torch.tensor(_JPLL, dtype=torch.int64, device=pix.device)[face]
    jr = jrll * ns - ix - iy - 1
    north = jr < ns
    south = jr > 3 * ns
    nr = torch.where(north, jr, torch.where(south, 4 * ns - jr, torch.full_like(jr, ns)))
    nrf = nr.to(torch.float64)
    z_cap = nrf * nrf / (3.0 * ns * ns)
    z = torch.where(
        north, 1.0 - z_cap, torch.where(south, z_cap - 1.0, (2 * ns - jr).to(torch.float64) * (2.0 / (3.0 * ns)))
    )
    t = jpll * nr + ix - iy
    t = torch.remainder(t, 8 * nr)
    phi = (math.pi / 4.0) * t.to(torch.float64) / nrf
    return z, phi


def ang2pix_nest(order: int, z: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """NEST pixel index (int64) containing the direction ``(z = cos θ, φ)`` (inverse of :func:`pix2ang_nest`).

    Equatorial zone (``|z| ≤ 2/3``): the pixel boundaries are the lines ``jp = nside·(1/2 + t − 3z/4)`` and
    ``jm = nside·(1/2 + t + 3z/4)`` with ``t = 2φ/π``; polar caps: ``jp = tp·nside·sqrt(3(1−|z|))``,
    ``jm = (1−tp)·nside·sqrt(3(1−|z|))`` with ``tp`` the fractional part of ``t``.
    """
    order = _check_order(order)
    ns = 1 << order
    z = torch.as_tensor(z, dtype=torch.float64)
    phi = torch.as_tensor(phi, dtype=torch.float64, device=z.device)
    za = z.abs()
    tt = torch.remainder(phi * (2.0 / math.pi), 4.0)
    # equatorial
    t1 = ns * (0.5 + tt)
    t2 = ns * (z * 0.75)
    jp_e = torch.floor(t1 - t2).to(torch.int64)
    jm_e = torch.floor(t1 + t2).to(torch.int64)
    ifp, ifm = jp_e >> order, jm_e >> order
    face_e = torch.where(ifp == ifm, ifp | 4, torch.where(ifp < ifm, ifp, ifm + 8))
    ix_e = jm_e & (ns - 1)
    iy_e = ns - (jp_e & (ns - 1)) - 1
    # polar caps
    ntt = torch.clamp(torch.floor(tt).to(torch.int64), max=3)
    tp = tt - ntt.to(torch.float64)
    tmp = ns * torch.sqrt(torch.clamp(3.0 * (1.0 - za), min=0.0))
    jp_p = torch.clamp(torch.floor(tp * tmp).to(torch.int64), max=ns - 1)
    jm_p = torch.clamp(torch.floor((1.0 - tp) * tmp).to(torch.int64), max=ns - 1)
    north = z >= 0
    face_p = torch.where(north, ntt, ntt + 8)
    ix_p = torch.where(north, ns - jm_p - 1, jp_p)
    iy_p = torch.where(north, ns - jp_p - 1, jm_p)
    eq = za <= 2.0 / 3.0
    face = torch.where(eq, face_e, face_p)
    ix = torch.where(eq, ix_e, ix_p)
    iy = torch.where(eq, iy_e, iy_p)
    ipf = torch.zeros_like(ix)
    for b in range(order):  # interleave: ix on even bits, iy on odd bits
        ipf |= ((ix >> b) & 1) << (2 * b)
        ipf |= ((iy >> b) & 1) << (2 * b + 1)
    return face * (ns * ns) + ipf


def _vectors_from_z_phi(z: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    s = torch.sqrt(torch.clamp(1.0 - z * z, min=0.0))
    return torch.stack([s * torch.cos(phi), s * torch.sin(phi), z], dim=-1)


def healpix_vectors(order: int, device=None) -> torch.Tensor:
    """Unit vectors ``(x, y, z)`` of all pixel centres in NEST order, ``[12·4^order, 3]`` float64."""
    pix = torch.arange(npix(order), dtype=torch.int64)
    z, phi = pix2ang_nest(order, pix)
    return _vectors_from_z_phi(z, phi).to(resolve_device(device))


def _relion_rot_tilt(z: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION's ``getDirectionFromHealPix``: rot = φ in degrees wrapped into [−180, 180], tilt = acos(z)."""
    rot = torch.rad2deg(phi)
    rot = torch.where(rot > 180.0, rot - 360.0, rot)
    tilt = torch.rad2deg(torch.acos(torch.clamp(z, -1.0, 1.0)))
    return rot, tilt


def healpix_directions(
    order: int, device=None, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rot, tilt)`` in degrees of all ``12·4^order`` pixel centres in NEST order (RELION's direction set)."""
    pix = torch.arange(npix(order), dtype=torch.int64)
    rot, tilt = _relion_rot_tilt(*pix2ang_nest(order, pix))
    dev = resolve_device(device)
    return rot.to(device=dev, dtype=dtype), tilt.to(device=dev, dtype=dtype)


def _unit(rot_tilt: tuple[float, float]) -> torch.Tensor:
    r, t = rot_tilt
    return torch.tensor([math.sin(t) * math.cos(r), math.sin(t) * math.sin(r), math.cos(t)], dtype=torch.float64)


def _canonical_copies(v: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Directions ``v`` ``[N, 3]`` -> the copy ``R·v`` in the Dirichlet cell of ``u₀`` (ties broken by ``u₁``)."""
    u0, u1 = _unit(_U0), _unit(_U1)
    orbit0 = ops @ u0
    if bool((torch.cdist(orbit0, orbit0) + 10 * torch.eye(len(ops), dtype=torch.float64)).min() < 1e-3):
        raise CryopipeError("internal error: the reference direction lies on a symmetry axis")
    # score of copy R·v against u is (R v)·u = v·(Rᵀ u)
    s0 = v @ (ops.transpose(-1, -2) @ u0).T  # [N, G]
    s1 = v @ (ops.transpose(-1, -2) @ u1).T
    best0 = s0.max(dim=1, keepdim=True).values
    s1 = torch.where(s0 >= best0 - 1e-9, s1, torch.full_like(s1, -math.inf))
    chosen = s1.argmax(dim=1)
    return torch.einsum("nij,nj->ni", ops[chosen], v)


def asymmetric_unit_pixels(order: int, sym: str | None = "C1", device=None) -> torch.Tensor:
    """NEST indices (ascending, int64) of the HEALPix directions kept for symmetry group ``sym``.

    ``C1``/``None`` keeps all pixels. Otherwise every grid direction ``v`` is folded onto its symmetry copy
    ``c(v)`` in the fundamental domain (the Dirichlet cell of a generic direction ``u₀``), the folded copies are
    binned by the HEALPix pixel (same order) they fall in, and for each occupied pixel the grid direction whose
    folded copy is closest to that pixel's centre is kept (ties: lowest index). Grid directions lying inside the
    fundamental domain are therefore always kept, and pixels that only straddle the domain's border (or taper
    towards a symmetry axis) still get one direction, so the symmetry copies of the kept directions cover the
    sphere about as densely as the full grid (never an empty set, even for I at order 0-1).
    """
    from cryopipe.core.symmetry import canonical_symmetry_name

    name = "C1" if sym is None else canonical_symmetry_name(sym)
    return _asymmetric_unit_cpu(_check_order(order), name).clone().to(resolve_device(device))


@functools.lru_cache(maxsize=32)
def _asymmetric_unit_cpu(order: int, name: str) -> torch.Tensor:
    """Cached worker of :func:`asymmetric_unit_pixels` (pure function of ``order`` and the canonical name)."""
    from cryopipe.core.symmetry import symmetry_operators

    n = npix(order)
    if name == "C1":
        return torch.arange(n, dtype=torch.int64)
    ops = symmetry_operators(name, device="cpu", dtype=torch.float64)  # [G, 3, 3]
    v = healpix_vectors(order, device="cpu")  # [N, 3], row i = pixel i
    c = _canonical_copies(v, ops)
    # grid directions that are exact symmetry copies of each other share one canonical copy up to rounding;
    # give them the copy of the lowest-indexed member so that they always land in the same bin
    keys = torch.round(c * 1e6).to(torch.int64)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    rep = torch.full((int(group.max()) + 1,), n, dtype=torch.int64)
    rep = rep.scatter_reduce(0, group, torch.arange(n, dtype=torch.int64), reduce="amin")
    c = c[rep[group]]
    cz = torch.clamp(c[:, 2], -1.0, 1.0)
    cphi = torch.atan2(c[:, 1], c[:, 0])
    bins = ang2pix_nest(order, cz, cphi)  # [N]
    dist = 1.0 - (c * v[bins]).sum(dim=1)  # 1 − cos(angle to the bin centre)
    # first element of each bin after sorting by (bin, dist, index)
    idx = torch.arange(n, dtype=torch.int64)
    o1 = torch.argsort(dist, stable=True)
    o2 = torch.argsort(bins[o1], stable=True)
    order_idx = idx[o1][o2]
    sorted_bins = bins[order_idx]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = sorted_bins[1:] != sorted_bins[:-1]
    return torch.sort(order_idx[first]).values


def psi_angles(psi_step: float, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """In-plane angles ``i·step'`` (degrees) with ``step' = 360/ceil(360/psi_step)`` (RELION's psi sampling)."""
    if not psi_step > 0:
        raise CryopipeError(f"psi step must be > 0 degrees (got {psi_step})")
    nr = math.ceil(360.0 / psi_step - 1e-9)
    return torch.arange(nr, dtype=dtype, device=resolve_device(device)) * (360.0 / nr)


def orientation_grid(
    order: int,
    psi_step: float | None = None,
    sym: str | None = None,
    perturb: float = 0.0,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """All sampled orientations ``[M, 3]`` = (rot, tilt, psi) degrees, direction-major (psi varies fastest).

    Directions: HEALPix order ``order`` restricted to the asymmetric unit of ``sym`` (:func:`asymmetric_unit_pixels`);
    psi: :func:`psi_angles` with ``psi_step`` (default :func:`angular_step`). ``perturb`` is RELION's
    ``random_perturbation`` (a fraction of the angular step, |perturb| ≤ 1; see :func:`perturb_orientations`).
    The direction pixel of row ``m`` is ``asymmetric_unit_pixels(order, sym)[m // len(psi)]``.
    """
    dev = resolve_device(device)
    pix = asymmetric_unit_pixels(order, sym, device="cpu")
    rot, tilt = _relion_rot_tilt(*pix2ang_nest(order, pix))
    psi = psi_angles(angular_step(order) if psi_step is None else psi_step, device="cpu")
    nd, npsi = rot.numel(), psi.numel()
    grid = torch.stack(
        [rot.repeat_interleave(npsi), tilt.repeat_interleave(npsi), psi.repeat(nd)], dim=-1
    )
    if perturb:
        grid = perturb_orientations(grid, perturb * angular_step(order))
    return grid.to(device=dev, dtype=dtype)


def perturb_orientations(angles: torch.Tensor, perturb_deg: float) -> torch.Tensor:
    """RELION's grid perturbation: ``A ← A · Euler(p, p, p)`` with ``p = perturb_deg``, back to RELION angles.

    ``angles`` ``[..., 3]`` (rot, tilt, psi) degrees; returns the same shape (rot/psi in (−180, 180]).
    """
    angles = torch.as_tensor(angles)
    A = euler_to_matrix(angles[..., 0], angles[..., 1], angles[..., 2])
    p = torch.as_tensor(perturb_deg, dtype=A.dtype, device=A.device)
    P = euler_to_matrix(p, p, p)
    return matrix_to_euler(A @ P)


def next_random_perturbation(previous: float, factor: float, generator: torch.Generator | None = None) -> float:
    """RELION's ``resetRandomlyPerturbedSampling``: ``previous + U(factor/2, factor)`` wrapped into [−factor, factor].

    ``factor`` is ``--perturb`` (0 … 1; RELION's default 0.5). Returns the new ``random_perturbation``.
    """
    if not 0.0 <= factor <= 1.0:
        raise CryopipeError(f"--perturb must be between 0 and 1 (got {factor})")
    if factor == 0.0:
        return 0.0
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    x = previous + 0.5 * factor + u * 0.5 * factor
    lo, hi = -factor, factor
    w = hi - lo
    if lo <= x <= hi:
        return x
    if x < lo:
        return x - int((x - lo) / w - 1) * w
    return x - int((x - hi) / w + 1) * w


def oversampled_directions(order: int, pix: torch.Tensor, oversampling: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rot, tilt)`` ``[len(pix), 4^os]`` of the NEST children at ``order + oversampling`` of pixels ``pix``.

    Children are ``pix·4^os … pix·4^os + 4^os − 1`` (NEST order; RELION enumerates the same set face-row by row).
    """
    if oversampling < 0:
        raise CryopipeError(f"oversampling order must be >= 0 (got {oversampling})")
    pix = torch.as_tensor(pix, dtype=torch.int64)
    f = 4**oversampling
    children = pix.reshape(-1, 1).cpu() * f + torch.arange(f, dtype=torch.int64)
    rot, tilt = _relion_rot_tilt(*pix2ang_nest(order + oversampling, children))
    return rot.to(pix.device), tilt.to(pix.device)


def oversampled_psi(psi: torch.Tensor, psi_step: float, oversampling: int) -> torch.Tensor:
    """``[..., 2^os]`` in-plane angles ``psi − step/2 + (i + 1/2)·step/2^os`` (RELION's psi oversampling)."""
    psi = torch.as_tensor(psi)
    k = 2**oversampling
    i = torch.arange(k, dtype=psi.dtype if psi.is_floating_point() else torch.float64, device=psi.device)
    return psi[..., None] - 0.5 * psi_step + (0.5 + i) * (psi_step / k)
