"""Find the rotation that puts a map's point-group symmetry axes on RELION's standard axes (``relion_align_symmetry``).

Geometry. For a rotation ``R`` (a RELION Euler matrix, ``R = euler_to_matrix(rot, tilt, psi)``) the *rotated* map is
``V_R(x) = V(Rᵀ·x)`` (a feature at ``p`` moves to ``R·p``; in Fourier space ``V̂_R(k) = V̂(Rᵀ·k)``, which is what
RELION's 3D "projection" ``get2DFourierTransform`` of the map with matrix ``A = R`` computes). RELION scores ``R`` by
``Σ_x (V_R − S V_R)²`` where ``S`` averages over the operators ``g`` of the group ``G``
(:func:`cryopipe.core.symmetry.symmetrise_volume`) and keeps the smallest.

Re-derivation used here. ``S`` is the orthogonal projector onto ``G``-invariant maps, so
``‖V_R − S V_R‖² = ‖V_R‖² − ⟨V_R, S V_R⟩ = ‖V‖² − (1/|G|) Σ_g ⟨V, V∘(Rᵀ g R)⟩`` and, by Parseval,
``⟨V, V∘M⟩ = Σ_k conj(V̂(k)) · V̂(M·k)``. The normalised *symmetry residual*

    ``ρ(R) = 1 − (1/|G|) Σ_g Re Σ_k conj(V̂(k)) V̂(Rᵀ g R·k) / Σ_k |V̂(k)|²``   (sums over ``0 < |k| ≤ r_max``)

is ``‖V_R − S V_R‖² / ‖V_R‖²`` of the mean-free map, band-limited to ``r_max`` Fourier pixels: 0 for a perfectly
``G``-symmetric map in the standard orientation, ≈ ``1 − 1/|G|`` for a map with no relation between its copies. It
only needs ``V̂`` at the points ``Rᵀ g R·k``, sampled by the projector's own sampler
(:func:`cryopipe.core.projector.interpolate_half_grid`, trilinear or nearest) from the padded, gridding-corrected
Fourier grid of :class:`cryopipe.core.projector.Projector`, batched over orientations ×
operators × frequencies — no rotated volumes are formed. Since ``⟨V, V∘M⟩ = ⟨V, V∘Mᵀ⟩``, one operator of each
pair ``{g, g⁻¹}`` is evaluated (weight 2).

Search (better than RELION's, same options):

1. *global*: ``nr_uniform`` random orientations (RELION's distribution: rot, psi uniform, tilt with density ∝ sin)
   or a HEALPix grid, scored at low resolution (``r_global``, default ``box/8`` Fourier pixels: smooth basins);
2. *local*, from the best ``n_candidates``: a grid of small rotations ``ΔR·R`` with ``ΔR = exp(ω)``,
   ``ω ∈ step·{−range … range}³`` (RELION's ``--local_search_range 2 --local_search_step 2`` give the same
   ``5³`` grid, but in rotation-vector form: no gimbal degeneracy at tilt 0/180° and no psi-offset bug — RELION used
   ``k·range`` instead of ``k·step`` for psi). The grid moves to its best point until the centre is best, then the
   step is halved down to 1°; then a 7-point stencil (±step about x, y, z) at ``box/4``, and finally at ``r_max``
   on a 4×-padded grid (less interpolation error), halving the step down to ``min_step``.

A map with ``G``-symmetry is also invariant under ``R ↦ N·R`` for every ``N`` of the normaliser of ``G`` (e.g. any
rotation about z for ``Cn``): such solutions are equally correct; compare symmetry *axes*
(:func:`symmetry_axis_error`), not Euler angles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cryopipe.core.geometry import euler_to_matrix, local_rotation_grid, matrix_to_euler, random_orientations
from cryopipe.core.projector import Projector, interpolate_half_grid
from cryopipe.core.symmetry import canonical_symmetry_name, symmetry_operators
from cryopipe.errors import CryopipeError

__all__ = [
    "SymmetryScorer", "SymmetrySearchResult", "search_symmetry_axes",
    "rotation_axes", "symmetry_axis_error",
]


# ------------------------------------------------------------------------------------------------ scoring


class SymmetryScorer:
    """Symmetry residual ``ρ(R)`` of a map (module doc) for batches of rotations.

    Args:
        volume: ``[N, N, N]`` real map (centre voxel ``N//2`` is the symmetry centre).
        sym: point group (RELION name: ``C4``, ``D7``, ``T``, ``O``, ``I``...).
        r_max: largest frequency (Fourier pixels) used, default ``N//2``; ``residual(..., r_max=r)`` may use less.
        pad: padding of the Fourier grid (2 as RELION); ``interpolation``: ``"trilinear"`` or ``"nearest"``.
        device: where the work runs (default: the volume's device).
        max_points: samples interpolated per chunk (memory ≈ 100 bytes each).
    """

    def __init__(self, volume: torch.Tensor, sym: str, r_max: float | None = None, pad: float = 2.0,
                 interpolation: str = "trilinear", device=None, max_points: int = 1 << 22):
        if volume.dim() != 3 or not (volume.shape[0] == volume.shape[1] == volume.shape[2]):
            raise CryopipeError(f"symmetry search needs a cubic map [N, N, N], got {tuple(volume.shape)}")
        dev = torch.device(device) if device is not None else volume.device
        n = volume.shape[-1]
        self.n = n
        self.sym = canonical_symmetry_name(sym)
        ops = symmetry_operators(self.sym, device=dev, dtype=torch.float64)
        if bool((torch.linalg.det(ops) < 0).any()):
            raise CryopipeError(f"--sym {sym}: groups with mirrors or inversion are not supported (use the proper "
                                "rotation group, e.g. C4 instead of C4H)")
        self.order = int(ops.shape[0])
        # non-identity operators (identity is first in symmetry_operators); ⟨V, V∘M⟩ = ⟨V, V∘Mᵀ⟩ (orthogonal
        # change of variables), so of each pair {g, g⁻¹} one is scored with weight 2
        nonid = ops[1:]
        keep, weight = [], []
        for i in range(nonid.shape[0]):
            inv = nonid[i].T
            j = int(torch.argmin((nonid - inv).abs().amax(dim=(-1, -2))))
            if j == i:
                keep.append(i)
                weight.append(1.0)
            elif j > i:
                keep.append(i)
                weight.append(2.0)
        self.ops = nonid[keep] if keep else nonid
        self.op_weights = torch.tensor(weight, dtype=torch.float64, device=dev)
        self.r_max = float(n // 2) if r_max is None else min(float(r_max), float(n // 2))
        self.interpolation = interpolation
        self.max_points = int(max_points)
        self.projector = Projector(volume.to(dev), pad=pad, interpolation=interpolation, device=dev)
        # half-grid frequencies 0 < |k| <= r_max, sorted by radius (a lower r_max is a prefix), with Hermitian
        # weights (2 for kx > 0: the mate -k is not in the half grid; 1 on the kx = 0 plane, which holds both)
        r = int(math.floor(self.r_max))
        c = torch.arange(-r, r + 1, device=dev, dtype=torch.float64)
        kz, ky, kx = torch.meshgrid(c, c, torch.arange(0, r + 1, device=dev, dtype=torch.float64), indexing="ij")
        k = torch.stack([kx, ky, kz], dim=-1).reshape(-1, 3)
        rad = torch.linalg.vector_norm(k, dim=-1)
        # on the kx = 0 plane keep one of each ±k pair and weight it 2, like the kx > 0 half
        half = (k[:, 0] > 0) | ((k[:, 0] == 0) & ((k[:, 1] > 0) | ((k[:, 1] == 0) & (k[:, 2] > 0))))
        keep = half & (rad <= self.r_max + 1e-9) & (rad > 0)
        k, rad = k[keep], rad[keep]
        order = torch.argsort(rad, stable=True)
        self.k = k[order].contiguous()
        self.radius = rad[order].contiguous()
        self.fdtype = self.projector.dtype
        self.ref = self._sample(self.k[None])[0]  # V̂(k)  [K]
        self.power_cumsum = torch.cumsum(self.ref.abs().double() ** 2, dim=0)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def n_freq(self, r_max: float | None = None) -> int:
        """Number of (half-grid) frequencies with ``|k| <= r_max``."""
        if r_max is None or r_max >= self.r_max:
            return int(self.k.shape[0])
        return int(torch.searchsorted(self.radius, torch.tensor(float(r_max) + 1e-9, dtype=torch.float64,
                                                                 device=self.device), right=True))

    def _sample(self, pts: torch.Tensor) -> torch.Tensor:
        """V̂ at frequency points ``[..., 3]`` (Fourier pixels of the unpadded box): the projector's own sampler
        (:func:`cryopipe.core.projector.interpolate_half_grid`, trilinear or RELION's nearest neighbour) on its
        padded half grid, the mate ``−p`` conjugated for ``x < 0``."""
        return interpolate_half_grid(self.projector.data, self.projector.centre, pts * self.projector.pad,
                                     self.interpolation)

    def _correlation(self, M: torch.Tensor, k: torch.Tensor, ref: torch.Tensor, t: torch.Tensor | None
                     ) -> torch.Tensor:
        """``Re Σ_k conj(V̂(k)) V̂(M·k) [e^{2πi (k − M·k)·t/N}]`` → ``[b, G-1]`` float64 for operators ``M [b, G-1,
        3, 3]``, frequencies ``k [K, 3]`` with values ``ref [K]`` and shifts ``t [b, 3]`` (None: 0)."""
        pts = torch.einsum("bgij,kj->bgki", M.float(), k)  # [b, G-1, K, 3]
        vals = self._sample(pts)
        if t is not None:
            phase = (2.0 * math.pi / self.n) * ((k[None, None] - pts).double() * t[:, None, None, :]).sum(-1)
            vals = vals * torch.polar(torch.ones_like(phase), phase).to(vals.dtype)
        return (ref.conj() * vals).real.double().sum(-1)

    def residual(self, rotations: torch.Tensor, r_max: float | None = None,
                 shifts: torch.Tensor | None = None) -> torch.Tensor:
        """``ρ(R)`` for rotations ``[B, 3, 3]`` (or ``[3, 3]``) → ``[B]`` float64 (module doc).

        ``shifts [B, 3]`` (or ``[3]``; pixels ``(x, y, z)``, None: 0): score the map moved by ``t`` first,
        ``V_t(x) = V(x − t)``, i.e. the symmetry centre at ``−t`` from the box centre: ``V̂_t(k) = e^{−2πi k·t/N}
        V̂(k)`` turns each term into ``conj(V̂(k)) V̂(M·k) e^{2πi (k − M·k)·t/N}``. Differentiable in ``rotations``
        and ``shifts`` (trilinear sampling)."""
        R = rotations.to(device=self.device, dtype=torch.float64)
        if R.dim() == 2:
            R = R[None]
        B = R.shape[0]
        t = None
        if shifts is not None:
            t = shifts.to(device=self.device, dtype=torch.float64)
            t = t[None].expand(B, 3) if t.dim() == 1 else t
        nk = self.n_freq(r_max)
        if self.ops.shape[0] == 0 or nk == 0:
            return torch.zeros(B, dtype=torch.float64, device=self.device)
        k = self.k[:nk]
        ref = self.ref[:nk]
        norm = float(self.power_cumsum[nk - 1])
        G1 = self.ops.shape[0]
        # M = Rᵀ g R for every (orientation, operator): [B, G-1, 3, 3]
        M = torch.einsum("bji,gjk,bkl->bgil", R, self.ops, R)
        corr = torch.empty(B, G1, dtype=torch.float64, device=self.device)
        per_orient = G1 * nk
        step = max(1, self.max_points // per_orient)
        kf32 = k.to(torch.float32)
        for b0 in range(0, B, step):
            Mb = M[b0:b0 + step]  # [b, G-1, 3, 3]
            tb = None if t is None else t[b0:b0 + step]
            if per_orient > self.max_points:  # very large single orientation: split the frequencies too
                acc = torch.zeros(Mb.shape[0], G1, dtype=torch.float64, device=self.device)
                kstep = max(1, self.max_points // G1)
                for k0 in range(0, nk, kstep):
                    acc = acc + self._correlation(Mb, kf32[k0:k0 + kstep], ref[k0:k0 + kstep], tb)
                corr[b0:b0 + step] = acc
            else:
                corr[b0:b0 + step] = self._correlation(Mb, kf32, ref, tb)
        # identity term contributes 1 − 1 = 0 exactly
        return ((1.0 - corr / norm) * self.op_weights).sum(-1) / self.order


# ------------------------------------------------------------------------------------------------ search


@dataclass
class SymmetrySearchResult:
    """Outcome of :func:`search_symmetry_axes`.

    Attributes:
        rotation: ``R`` ``[3, 3]`` float64: ``V(Rᵀ·x)`` has the group's axes on RELION's standard axes.
        angles: RELION Euler angles (rot, tilt, psi) of ``R``, degrees.
        residual: ``ρ(R)`` at ``r_max`` (0 = perfectly symmetric, ``1 − 1/|G|`` = unrelated copies).
        global_residual: best ``ρ`` of the global search (at ``r_global``).
        n_evaluations: orientations scored.
        r_global, r_max: Fourier radii used (pixels of the searched box).
        shift: ``[3]`` float64 pixels ``(x, y, z)`` of the searched box (0 unless ``refine_centre``): the map
            moved by ``t`` and then rotated, ``V(Rᵀ·x − t)``, is symmetric about the box centre; the symmetry
            centre of the input is at ``−t``.
    """

    rotation: torch.Tensor
    angles: torch.Tensor
    residual: float
    global_residual: float
    n_evaluations: int
    r_global: float
    r_max: float
    shift: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))


def _pattern_search(scorer: SymmetryScorer, R: torch.Tensor, step: float, stop_step: float, search_range: int,
                    r_max: float, only_rot: bool, axes_only: bool = False,
                    max_moves: int = 30, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """Move a grid of small rotations ``ΔR·R`` (:func:`local_rotation_grid`) to its best point until the centre
    wins, then halve the step, until ``step < stop_step``; ``shift [3]``: the map's (fixed) shift
    (:meth:`SymmetryScorer.residual`). Returns (R, ρ(R) at r_max, evaluations)."""
    best = float(scorer.residual(R, r_max, shift)[0])
    n_eval = 1
    while step >= stop_step - 1e-12:
        grid = local_rotation_grid(step, search_range, only_rot, device=scorer.device, axes_only=axes_only)
        for _ in range(max_moves):
            cand = grid @ R
            res = scorer.residual(cand, r_max, shift)
            n_eval += cand.shape[0]
            i = int(torch.argmin(res))
            if i == 0 or float(res[i]) >= best:
                break
            R, best = cand[i], float(res[i])
        step /= 2.0
    return R, best, n_eval


def _small_rotation(omega_deg: torch.Tensor) -> torch.Tensor:
    """``exp([ω]ₓ)`` ``[3, 3]`` for a rotation vector ``ω [3]`` in degrees (differentiable, also at 0)."""
    w = torch.deg2rad(omega_deg)
    zero = torch.zeros_like(w[0])
    K = torch.stack([torch.stack([zero, -w[2], w[1]]), torch.stack([w[2], zero, -w[0]]),
                     torch.stack([-w[1], w[0], zero])])
    return torch.linalg.matrix_exp(K)


def _continuous_refinement(scorer: SymmetryScorer, R: torch.Tensor, r_max: float, shift: torch.Tensor,
                           refine_shift: bool, only_rot: bool, max_iter: int = 60
                           ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Minimise ``ρ(exp(ω)·R, t)`` continuously (L-BFGS, strong-Wolfe line search, autograd through the
    trilinear sampler) over the rotation vector ``ω`` (degrees; about z only with ``only_rot``) and, with
    ``refine_shift``, the map's shift ``t`` (pixels, from ``shift``): the grid searches stop at ``min_step`` and
    keep the centre of mass, whose error (noise, density off the axis) tilts the axis that fits best through
    the wrong point. Returns ``(R, t, ρ, evaluations)``; the start is kept if nothing better is found."""
    dev = scorer.device
    R = R.to(dev, torch.float64).detach()
    t0 = shift.to(dev, torch.float64).detach()
    omega = torch.zeros(3, dtype=torch.float64, device=dev, requires_grad=True)
    dt = torch.zeros(3, dtype=torch.float64, device=dev, requires_grad=refine_shift)
    zmask = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=dev) if only_rot else None
    params = [omega] + ([dt] if refine_shift else [])
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12, history_size=10)
    n_eval = 0

    def current() -> tuple[torch.Tensor, torch.Tensor]:
        w = omega * zmask if zmask is not None else omega
        return _small_rotation(w) @ R, t0 + dt

    def closure():
        nonlocal n_eval
        opt.zero_grad()
        Rw, tw = current()
        rho = scorer.residual(Rw, r_max, tw)[0]
        rho.backward()
        n_eval += 1
        return rho

    with torch.no_grad():
        start = float(scorer.residual(R, r_max, t0)[0])
    opt.step(closure)
    with torch.no_grad():
        Rw, tw = current()
        rho = float(scorer.residual(Rw, r_max, tw)[0])
    n_eval += 2
    if not rho < start:
        return R, t0, start, n_eval
    return Rw.detach(), tw.detach(), rho, n_eval


def search_symmetry_axes(volume: torch.Tensor, sym: str, *, nr_uniform: int = 400, healpix_order: int | None = None,
                         only_rot: bool = False, r_max: float | None = None, r_global: float | None = None,
                         n_candidates: int = 5, local_search_range: int = 2, local_search_step: float = 2.0,
                         min_step: float = 0.125, seed: int | None = None, pad: float = 2.0, pad_final: float = 4.0,
                         interpolation: str = "trilinear", refine_centre: bool = False,
                         device=None) -> SymmetrySearchResult:
    """Global + local search for the rotation ``R`` that makes ``V(Rᵀ·x)`` ``sym``-symmetric (module doc).

    Args:
        volume: ``[N, N, N]`` map, centred on the symmetry centre (voxel ``N//2``); typically downsampled to 64³.
        sym: point group (proper rotations only).
        nr_uniform: random orientations of the global search (RELION ``--nr_uniform``); ignored with
            ``healpix_order`` (a HEALPix grid of that order, psi step = its angular step).
        only_rot: search rotations about z only (RELION ``--only_rot``).
        r_max: Fourier radius (pixels) of the final score, default ``N//2`` (RELION ``--maxres``).
        r_global: radius of the global search, default ``max(4, N//8)`` (≤ ``r_max``).
        n_candidates: best global orientations refined locally.
        local_search_range, local_search_step: the first local grid (``±range`` steps of ``step`` degrees in the
            three rotation-vector components), moved and halved down to 1°; then a 7-point stencil (±step about
            x, y, z) at ``N//4`` and ``r_max``, halved down to ``min_step`` degrees.
        seed: random generator seed of the global orientations (None: random).
        pad: padding of the Fourier grid of the global and coarse stages; ``pad_final`` (default 4) for the last
            stage and the reported residual (trilinear interpolation error: a perfectly symmetric map rotated off
            the grid scores ρ ≈ 0.04 with pad 2 and ≈ 0.01 with pad 4).
        interpolation: ``"trilinear"`` or ``"nearest"``.
        refine_centre: also refine where the symmetry centre is (the map's shift ``t``, see
            :meth:`SymmetryScorer.residual`; returned as ``shift``), for maps centred only roughly (e.g. on their
            centre of mass). Without it the centre stays at voxel ``N//2``.
        device: where the work runs (default: the volume's device).

    After the grid searches, the rotation (and with ``refine_centre`` the shift) is refined continuously
    (:func:`_continuous_refinement`) at the middle radius and again at ``r_max``.
    """
    n = volume.shape[-1]
    rmax = float(n // 2) if r_max is None else min(float(r_max), float(n // 2))
    rg = min(rmax, float(max(4, n // 8)) if r_global is None else float(r_global))
    r_mid = min(rmax, max(rg, float(n // 4)))
    coarse = SymmetryScorer(volume, sym, r_max=r_mid, pad=pad, interpolation=interpolation, device=device)
    dev = coarse.device
    if coarse.order == 1:
        eye = torch.eye(3, dtype=torch.float64, device=dev)
        return SymmetrySearchResult(eye, torch.zeros(3, dtype=torch.float64), 0.0, 0.0, 0, rg, rmax)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    if healpix_order is not None:
        from cryopipe.core.healpix import orientation_grid

        angles = orientation_grid(int(healpix_order), device="cpu")
        if only_rot:
            angles = angles[(angles[:, 1].abs() < 1e-9) & (angles[:, 2].abs() < 1e-9)]
    else:
        if nr_uniform < 1:
            raise CryopipeError(f"--nr_uniform {nr_uniform}: need at least one orientation")
        angles = random_orientations(nr_uniform, gen, only_rot=only_rot)
    rots = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]).to(dev)
    res = coarse.residual(rots, rg)
    n_eval = rots.shape[0]
    order = torch.argsort(res)
    global_best = float(res[order[0]])
    # refine the best few at low resolution, keep the best at the middle resolution, finish at r_max
    finals = []
    for idx in order[: max(1, n_candidates)].tolist():
        R, _, ne = _pattern_search(coarse, rots[idx], local_search_step, 1.0, local_search_range, rg, only_rot)
        n_eval += ne
        R, rho, ne = _pattern_search(coarse, R, 1.0, 0.5, 1, r_mid, only_rot, axes_only=True)
        n_eval += ne
        finals.append((rho, R))
    rho, R = min(finals, key=lambda t: t[0])
    shift = torch.zeros(3, dtype=torch.float64, device=dev)
    if refine_centre or interpolation == "trilinear":
        R, shift, rho, ne = _continuous_refinement(coarse, R, r_mid, shift, refine_centre, only_rot)
        n_eval += ne
    del coarse
    fine = SymmetryScorer(volume, sym, r_max=rmax, pad=pad_final, interpolation=interpolation, device=device)
    R, rho, ne = _pattern_search(fine, R, 0.5, min_step, 1, rmax, only_rot, axes_only=True, shift=shift)
    n_eval += ne
    if interpolation == "trilinear":  # nearest-neighbour sampling has no useful gradient
        R, shift, rho, ne = _continuous_refinement(fine, R, rmax, shift, refine_centre, only_rot)
        n_eval += ne
    # re-orthonormalise (products of many small rotations)
    U, _, Vh = torch.linalg.svd(R)
    R = U @ Vh
    rho = float(fine.residual(R, rmax, shift)[0])
    ang = matrix_to_euler(R).cpu()
    return SymmetrySearchResult(R, ang, rho, global_best, n_eval, rg, rmax, shift.cpu())


# ------------------------------------------------------------------------------------------------ axes


def rotation_axes(ops: torch.Tensor, tol_deg: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rotation axes of a set of proper rotations ``[n, 3, 3]``: ``(folds [m] int, axes [m, 3])`` (unit
    vectors, sign arbitrary; fold = 360°/smallest rotation angle about that axis). The identity is skipped."""
    ops = ops.to(torch.float64).cpu()
    axes: list[torch.Tensor] = []
    folds: list[int] = []
    eye = torch.eye(3, dtype=torch.float64)
    for R in ops:
        tr = float(R.diagonal().sum())
        ang = math.degrees(math.acos(max(-1.0, min(1.0, 0.5 * (tr - 1.0)))))
        if ang < 1e-6:
            continue
        S = R + R.T + (1.0 - tr) * eye  # = 2 (1 − cos θ) a aᵀ
        j = int(torch.argmax(S.diagonal()))
        a = S[:, j] / torch.linalg.vector_norm(S[:, j])
        fold = int(round(360.0 / ang))
        for i, b in enumerate(axes):
            if abs(float(a @ b)) > math.cos(math.radians(tol_deg)):
                folds[i] = max(folds[i], fold)
                break
        else:
            axes.append(a)
            folds.append(fold)
    if not axes:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.float64)
    return torch.tensor(folds), torch.stack(axes)


def symmetry_axis_error(found: torch.Tensor, truth: torch.Tensor, sym: str) -> float:
    """Largest angle (degrees) between the symmetry axes that two rotations imply for the *input* map.

    ``found``, ``truth``: rotations ``R`` such that ``V(Rᵀ·x)`` has ``sym``'s axes on the standard axes, so the
    input's axes are ``Rᵀ·a``. Every axis of one set is matched to the closest axis of the same fold in the other
    (up to sign) and the worst match is returned (both directions), so ``R`` and ``N·R`` (``N`` in the normaliser,
    e.g. any rotation about z for Cn) count as the same solution.
    """
    folds, axes = rotation_axes(symmetry_operators(sym, device="cpu", dtype=torch.float64))
    if axes.shape[0] == 0:
        return 0.0
    a = axes @ found.to(torch.float64).cpu()  # rows: (Rᵀ a)ᵀ = aᵀ R
    b = axes @ truth.to(torch.float64).cpu()
    same = folds[:, None] == folds[None, :]
    cos = (a @ b.T).abs().clamp(max=1.0)
    cos = torch.where(same, cos, torch.zeros_like(cos))
    worst = torch.minimum(cos.max(dim=1).values.min(), cos.max(dim=0).values.min())
    return math.degrees(math.acos(float(worst)))
