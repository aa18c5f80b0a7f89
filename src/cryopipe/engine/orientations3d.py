"""3D orientation samples for the engine: the global HEALPix × ψ grid with adaptive-oversampling children, and
per-batch LOCAL subsets with a Gaussian orientation prior (RELION's local searches).

Orientations are RELION Euler angles ``(rot, tilt, psi)`` in degrees (matrix ``A = euler_to_matrix(rot, tilt,
psi)``, projection ``P(k) = V̂(Aᵀ·(kx, ky, 0))``, :mod:`cryopipe.core.geometry`).

Global grid (RELION ``HealpixSampling``; :mod:`cryopipe.core.healpix`):

* coarse samples: the HEALPix directions of ``order`` in the asymmetric unit of the symmetry group × in-plane
  angles ``i·360/ceil(360/psi_step)`` (default ``psi_step`` = the angular step ``360/(6·2^order)``),
  direction-major (row ``d·n_psi + j``);
* children (adaptive oversampling of order ``os``): the ``4^os`` NEST children of the direction at
  ``order + os`` × the ``2^os`` sub-angles ``psi − step/2 + (j + ½)·step/2^os``; child ``i·2^os + j``;
* RELION's random perturbation rotates every sample (coarse and children alike) by ``A ← A·Euler(p, p, p)``,
  ``p = perturb · angular_step(order)`` degrees.

Local searches (RELION ``selectOrientationsWithNonZeroPriorProbability``, re-derived): each particle ``b`` with
previous orientation ``A_b`` keeps the grid samples within ``cutoff·σ`` (default 3σ) and gets the log prior
``−Δ²/(2σ²)`` (normalised over its own window), where ``Δ`` is the rotation angle between the sample and ``A_b``
minimised over the proper symmetry operators ``R`` of the group (``A`` and ``A·R`` give the same projection of a
symmetric map). RELION uses separate Gaussians on the direction angle and on the ψ difference (a "cylinder"
window); the rotation angle ``Δ`` is the same quantity for small angles (``Δ² ≈ Δ_dir² + Δ_ψ²``) but is also correct
near the poles (``tilt ≈ 0``, where rot and psi are degenerate) — a deliberate, documented deviation.
The E-step of a batch runs on the UNION of its particles' windows (one GEMM); each particle's samples outside its
own window get ``log prior = −inf`` (zero weight). Batches of particles with similar previous orientations keep
the union small: :func:`local_batch_order`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.healpix import (
    ang2pix_nest,
    angular_step,
    asymmetric_unit_pixels,
    healpix_directions,
    oversampled_directions,
    orientation_grid,
    oversampled_psi,
    perturb_orientations,
    psi_angles,
)
from cryopipe.errors import CryopipeError

__all__ = ["OrientationSet3D", "healpix_orientations", "proper_symmetry_operators", "orientation_distances",
           "local_orientations", "local_batch_order", "nearest_directions", "direction_histogram",
           "direction_distribution"]


@dataclass
class OrientationSet3D:
    """Coarse orientation samples and their oversampled children (all angles in degrees, float64).

    Attributes:
        coarse: ``[R, 3]`` (rot, tilt, psi).
        children: ``[R, S, 3]`` children of each coarse sample (``S = 1`` and ``children[:, 0] == coarse`` when
            ``oversampling == 0``).
        order: HEALPix order of the coarse directions.
        psi_step: coarse in-plane step (degrees, as used: ``360/n_psi``).
        oversampling: adaptive oversampling order of the children.
        pixel: ``[R]`` NEST pixel (at ``order``) of each sample's direction.
        psi_index: ``[R]`` in-plane index ``j`` of each sample.
        grid_index: ``[R]`` row of each sample in its full grid (:func:`healpix_orientations`), so that subsets of
            the same grid can be compared and merged.
    """

    coarse: torch.Tensor
    children: torch.Tensor
    order: int
    psi_step: float
    oversampling: int
    pixel: torch.Tensor
    psi_index: torch.Tensor
    grid_index: torch.Tensor

    @property
    def n_coarse(self) -> int:
        return int(self.coarse.shape[0])

    @property
    def n_children(self) -> int:
        return int(self.children.shape[1])

    @property
    def device(self) -> torch.device:
        return self.coarse.device

    @property
    def angular_step(self) -> float:
        """Coarse angular step of the directions (degrees)."""
        return angular_step(self.order)

    @property
    def fine_angular_step(self) -> float:
        """Angular step of the children (degrees): ``angular_step(order + oversampling)``."""
        return angular_step(self.order + self.oversampling)

    def select(self, idx: torch.Tensor) -> OrientationSet3D:
        """The subset of coarse samples ``idx`` (long, any order) with their children."""
        idx = idx.to(self.device)
        return OrientationSet3D(self.coarse[idx], self.children[idx], self.order, self.psi_step, self.oversampling,
                                self.pixel[idx], self.psi_index[idx], self.grid_index[idx])

    def coarse_matrices(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[R, 3, 3]`` RELION matrices of the coarse samples."""
        a = self.coarse
        return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).to(dtype)

    def sample_angles(self, coarse_idx: torch.Tensor, child_idx: torch.Tensor | None = None) -> torch.Tensor:
        """``[M, 3]`` angles of samples ``(coarse_idx[i], child_idx[i])`` (children; ``child_idx=None``: the coarse
        samples themselves)."""
        c = coarse_idx.to(self.device)
        if child_idx is None:
            return self.coarse[c]
        return self.children[c, child_idx.to(self.device)]

    def sample_matrices(self, coarse_idx: torch.Tensor, child_idx: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[M, 3, 3]`` RELION matrices of samples (see :meth:`sample_angles`)."""
        a = self.sample_angles(coarse_idx, child_idx)
        return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).to(dtype)


def healpix_orientations(order: int, psi_step: float | None = None, sym: str | None = "C1", oversampling: int = 1,
                         perturb: float = 0.0, device=None) -> OrientationSet3D:
    """The global 3D grid (module docstring): HEALPix ``order`` directions in the asymmetric unit of ``sym`` × ψ
    (``psi_step`` degrees, default the angular step), children of adaptive-oversampling order ``oversampling``,
    rotated by RELION's perturbation ``perturb`` (fraction of the angular step, |perturb| <= 1)."""
    if oversampling < 0:
        raise CryopipeError(f"oversampling order must be >= 0 (got {oversampling})")
    if abs(perturb) > 1.0:
        raise CryopipeError(f"perturbation must be a fraction of the angular step in [-1, 1] (got {perturb})")
    dev = resolve_device(device)
    pix = asymmetric_unit_pixels(order, sym, device="cpu")
    psi = psi_angles(angular_step(order) if psi_step is None else float(psi_step), device="cpu")
    step = 360.0 / psi.numel()
    nd, npsi = pix.numel(), psi.numel()
    # the coarse samples are core.healpix.orientation_grid's (unperturbed; the perturbation is applied below to
    # the coarse samples and their children alike); the [R, S, 3] children are built on the device
    coarse = orientation_grid(order, psi_step, sym, device=dev)
    psi_d = psi.to(dev)
    if oversampling == 0:
        children = coarse[:, None, :].clone()
    else:
        crot, ctilt = (t.to(dev) for t in oversampled_directions(order, pix, oversampling))  # [nd, 4^os]
        cpsi = oversampled_psi(psi_d, step, oversampling)  # [npsi, 2^os]
        nsd, nsp = crot.shape[1], cpsi.shape[1]
        # children[d·npsi + j, i·nsp + l] = (crot[d, i], ctilt[d, i], cpsi[j, l])
        r = crot[:, None, :, None].expand(nd, npsi, nsd, nsp)
        t = ctilt[:, None, :, None].expand(nd, npsi, nsd, nsp)
        p = cpsi[None, :, None, :].expand(nd, npsi, nsd, nsp)
        children = torch.stack([r, t, p], dim=-1).reshape(nd * npsi, nsd * nsp, 3)
    if perturb:
        pd = perturb * angular_step(order)
        coarse = perturb_orientations(coarse, pd)
        children = perturb_orientations(children, pd)
    return OrientationSet3D(
        coarse=coarse.to(torch.float64), children=children.to(torch.float64), order=int(order),
        psi_step=step, oversampling=int(oversampling), pixel=pix.to(dev).repeat_interleave(npsi),
        psi_index=torch.arange(npsi, device=dev).repeat(nd), grid_index=torch.arange(nd * npsi, device=dev))


def proper_symmetry_operators(sym: str | None, device=None) -> torch.Tensor:
    """``[G, 3, 3]`` float64 rotations (det +1) of point group ``sym`` (identity first; C1/None → identity).
    Mirrors and inversions do not relate orientations of a chiral map and are left out."""
    dev = resolve_device(device)
    if sym is None:
        return torch.eye(3, dtype=torch.float64, device=dev)[None]
    from cryopipe.core.symmetry import symmetry_operators

    ops = symmetry_operators(sym, device=dev, dtype=torch.float64)
    return ops[torch.linalg.det(ops) > 0]


def orientation_distances(A: torch.Tensor, B: torch.Tensor, ops: torch.Tensor | None = None,
                          chunk_elems: int = 1 << 24) -> torch.Tensor:
    """``[P, Q]`` rotation angles (degrees) between orientations ``A [P, 3, 3]`` and ``B [Q, 3, 3]`` (RELION
    matrices), minimised over ``A·R`` for the operators ``R`` of ``ops [G, 3, 3]`` (None: identity).

    ``angle = acos((tr(Bᵀ·A·R) − 1)/2)``; the traces are one GEMM ``[P·G, 9] × [9, Q]`` (chunked over ``Q`` so
    that at most ``chunk_elems`` traces are held at once). float64.
    """
    dev = A.device
    A = A.to(torch.float64)
    B = B.to(device=dev, dtype=torch.float64)
    if ops is None:
        ops = torch.eye(3, dtype=torch.float64, device=dev)[None]
    ops = ops.to(device=dev, dtype=torch.float64)
    P, G, Q = A.shape[0], ops.shape[0], B.shape[0]
    AR = (A[:, None] @ ops[None]).reshape(P * G, 9)  # tr(Bᵀ X) = <B, X>_F
    Bf = B.reshape(Q, 9)
    out = torch.empty(P, Q, dtype=torch.float64, device=dev)
    step = max(1, int(chunk_elems // max(1, P * G)))
    for q0 in range(0, Q, step):  # chunks over candidate samples (memory bound)
        tr = (AR @ Bf[q0:q0 + step].T).reshape(P, G, -1).amax(dim=1)
        out[:, q0:q0 + step] = torch.rad2deg(torch.acos(((tr - 1.0) * 0.5).clamp(-1.0, 1.0)))
    return out


def local_orientations(grid: OrientationSet3D, prior_angles: torch.Tensor, sigma_deg: float, sym: str | None = None,
                       cutoff: float = 3.0, chunk_elems: int = 1 << 24) -> tuple[OrientationSet3D, torch.Tensor]:
    """Candidate orientations of a batch for a local search (module docstring).

    Args:
        grid: the full (perturbed) grid of the iteration (:func:`healpix_orientations`).
        prior_angles: ``[B, 3]`` previous orientations (rot, tilt, psi) of the batch's particles (degrees).
        sigma_deg: σ of the Gaussian orientation prior (degrees; RELION: 2 × the angular step at the switch to
            local searches, ``--sigma_ang``).
        sym: point group of the reference (proper operators are used, see :func:`proper_symmetry_operators`).
        cutoff: window half-width in units of σ (RELION: 3).

    Returns:
        ``(subset, log_prior)``: the union of the particles' windows as a subset of ``grid`` (ascending grid
        rows), and ``[B, U]`` float32 log priors, ``−Δ²/(2σ²)`` normalised to sum to 1 over each particle's own
        window and ``−inf`` outside it. A particle whose window holds no sample keeps its nearest sample.

    Cost: one ``[B, n_directions]`` direction pre-filter (the direction angle never exceeds the rotation angle),
    then rotation angles to the samples of the retained directions only.
    """
    if not sigma_deg > 0:
        raise CryopipeError(f"local searches need sigma > 0 degrees (got {sigma_deg})")
    dev = grid.device
    prior = prior_angles.to(device=dev, dtype=torch.float64).reshape(-1, 3)
    B = prior.shape[0]
    ops = proper_symmetry_operators(sym, dev)
    Ap = euler_to_matrix(prior[:, 0], prior[:, 1], prior[:, 2])  # [B, 3, 3]
    lim = cutoff * float(sigma_deg)
    # ---- direction pre-filter: direction of A·R is Rᵀ·(row 3 of A); compare with the grid's directions
    upix, inv = torch.unique(grid.pixel, return_inverse=True)
    first = torch.full((upix.numel(),), grid.n_coarse, dtype=torch.long, device=dev).scatter_reduce(
        0, inv, torch.arange(grid.n_coarse, device=dev), reduce="amin")
    vd = grid.sample_matrices(first)[:, 2, :]  # [D, 3]: one sample per direction (all its ψ share it)
    u = torch.einsum("bj,gjk->bgk", Ap[:, 2, :], ops).reshape(B * ops.shape[0], 3)  # rows of Rᵀ·d: d·R
    cosd = (u @ vd.T).reshape(B, ops.shape[0], -1).amax(dim=1).clamp(-1.0, 1.0)
    ddir = torch.rad2deg(torch.acos(cosd))  # [B, D]
    # keep directions within the window; and each particle's nearest direction ring (so nobody is left empty)
    near = ddir.min(dim=1, keepdim=True).values
    dir_ok = (ddir <= lim) | (ddir <= near + grid.angular_step)
    cand_dir = dir_ok.any(dim=0)  # [D]
    cand = torch.nonzero(cand_dir[inv]).reshape(-1)  # grid rows whose direction is a candidate
    # ---- rotation angles to the candidates
    d = orientation_distances(Ap, grid.sample_matrices(cand), ops, chunk_elems)  # [B, C]
    inside = d <= lim
    nearest = d.argmin(dim=1)
    inside[torch.arange(B, device=dev), nearest] = True
    keep = inside.any(dim=0)
    rows = cand[keep]
    d, inside = d[:, keep], inside[:, keep]
    logp = torch.where(inside, -d.square() / (2.0 * float(sigma_deg) ** 2),
                       torch.full_like(d, -math.inf))
    logp = logp - torch.logsumexp(logp, dim=1, keepdim=True)
    return grid.select(rows), logp.to(torch.float32)


def local_batch_order(prior_angles: torch.Tensor, level: int = 6) -> torch.Tensor:
    """A permutation ``[N]`` of particles along a space-filling curve over orientations, so that consecutive
    batches hold similar previous orientations and their unions of local-search windows stay small.

    The key interleaves, level by level, the two bits of the viewing direction's NEST pixel (HEALPix is
    hierarchical: pixel ``p`` at order ``l`` contains ``4p … 4p+3`` at ``l+1``) with one bit of the in-plane
    angle ψ (``6·2^level`` bins, about the pixel size at each level), after the 12 base faces × 6 ψ sextants —
    a Morton order of the (direction, ψ) cells of side ``≈ 58.6°/2^level``. Angles in degrees.
    """
    a = prior_angles.to(torch.float64).reshape(-1, 3)
    A = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
    v = A[:, 2, :]
    z = v[:, 2].clamp(-1.0, 1.0)
    phi = torch.atan2(v[:, 1], v[:, 0])
    L = int(level)
    pix = ang2pix_nest(L, z.cpu(), phi.cpu()).to(a.device)
    npsi = 6 * (1 << L)
    ipsi = torch.floor(torch.remainder(a[:, 2], 360.0) / (360.0 / npsi)).long().clamp(0, npsi - 1)
    face, ipf = pix >> (2 * L), pix & ((1 << (2 * L)) - 1)
    key = face * 6 + (ipsi >> L)
    for b in range(L - 1, -1, -1):  # L levels, most significant first
        key = key * 8 + ((ipf >> (2 * b)) & 3) * 2 + ((ipsi >> b) & 1)
    return torch.argsort(key, stable=True)


def nearest_directions(angles: torch.Tensor, order: int, sym: str | None = "C1"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rot [D], tilt [D], index [N])``: the HEALPix directions of ``order`` kept for ``sym`` (degrees; the rows
    of RELION's ``data_sampling_directions``) and, for each orientation ``angles [N, 3]`` (rot, tilt, psi degrees),
    the kept direction nearest to its viewing direction over the group's copies.

    The viewing direction of orientation ``A`` is its third row ``(cos rot·sin tilt, sin rot·sin tilt, cos tilt)``;
    ``A·G`` (``G`` a symmetry rotation) gives the same projection, with direction ``A[2]·G``."""
    pix = asymmetric_unit_pixels(order, sym, device="cpu")
    rot_all, tilt_all = healpix_directions(order, device="cpu")
    rot, tilt = rot_all[pix], tilt_all[pix]
    r, t = torch.deg2rad(rot), torch.deg2rad(tilt)
    dirs = torch.stack([torch.cos(r) * torch.sin(t), torch.sin(r) * torch.sin(t), torch.cos(t)], dim=-1)  # [D, 3]
    a = torch.as_tensor(angles, dtype=torch.float64).reshape(-1, 3).cpu()
    best = torch.zeros(a.shape[0], dtype=torch.int64)
    ops = proper_symmetry_operators(sym)
    chunk = max(1, 2 ** 22 // max(1, ops.shape[0] * dirs.shape[0]))  # bounded memory: [chunk, G, D] scores
    for i in range(0, a.shape[0], chunk):  # particle chunks
        ai = a[i:i + chunk]
        A = euler_to_matrix(ai[:, 0], ai[:, 1], ai[:, 2]).to(torch.float64)
        v = torch.einsum("nj,gjk->ngk", A[:, 2, :], ops)  # [n, G, 3] symmetry copies of each direction
        best[i:i + chunk] = torch.einsum("ngk,dk->ngd", v, dirs).amax(dim=1).argmax(dim=1)
    return rot, tilt, best


def direction_histogram(index: torch.Tensor, klass: torch.Tensor, n_classes: int, n_directions: int
                        ) -> torch.Tensor:
    """``[K, D]`` per class, the fraction of its particles at each direction ``index [N]`` (from
    :func:`nearest_directions`); ``klass [N]`` 0-based, other values ignored; a class without particles is
    uniform."""
    k = torch.as_tensor(klass, dtype=torch.int64).reshape(-1).cpu()
    idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
    ok = (k >= 0) & (k < n_classes)
    pdf = torch.zeros(n_classes, n_directions, dtype=torch.float64)
    pdf.index_put_((k[ok], idx[ok]), torch.ones(int(ok.sum()), dtype=torch.float64), accumulate=True)
    tot = pdf.sum(dim=1, keepdim=True)
    return torch.where(tot > 0, pdf / tot.clamp_min(1e-300), torch.full_like(pdf, 1.0 / n_directions))


def direction_distribution(angles: torch.Tensor, klass: torch.Tensor, n_classes: int, order: int,
                           sym: str | None = "C1") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rot [D], tilt [D], pdf [K, D])``: the directions of :func:`nearest_directions` and, per class, the
    fraction of its particles nearest to each (RELION's ``data_model_pdf_orient_class_N``,
    rlnOrientationDistribution, here from each particle's best orientation; :func:`direction_histogram`)."""
    rot, tilt, best = nearest_directions(angles, order, sym)
    return rot, tilt, direction_histogram(best, klass, n_classes, rot.numel())
