"""3D class volumes as the reference model of the engine: projections for every (class, orientation) as E-step
predictions, and the M-step that inserts the engine's per-orientation sums into one back-projector per class.

E-step (:class:`ClassReferences3D`, a :class:`~cryopipe.engine.estep.PredictionSource`): each class volume is
held as a padded Fourier-slice :class:`~cryopipe.core.projector.Projector` (built once per iteration); the
prediction of class ``k`` in orientation ``A`` at coefficient ``q`` of the iteration's
:class:`~cryopipe.engine.coefficients.CoefficientSet` is the projector's trilinear sample at ``pad·Aᵀ·(qx, qy, 0)``
divided by ``n²`` (the engine's ``FT / n²`` units), zero for ``|q| > n/2`` — exactly the coefficients of
:meth:`Projector.project`. Coarse predictions ``[K, Rc, Pc]`` are computed once per orientation set (lazily, in
chunks of bounded memory) and shared by all batches of a global search; fine predictions are computed on demand
for the significant samples of each batch only (``M × S`` projections per batch, never the whole fine grid).
Local searches build one orientation subset per batch (:func:`cryopipe.engine.orientations3d.local_orientations`)
and a light :meth:`ClassReferences3D.with_orientations` view that shares the projectors.

M-step (:class:`ClassBackProjectors`): the engine returns, per fine sample ``m = (class, orientation)`` of a batch,
``S[m, p] = Σ w·C·X_t/σ²`` and ``W[m, p] = Σ w·C²/σ²`` (RELION's back-projection weighting). Each class's samples
are inserted with ONE :meth:`BackProjector.insert` call over their orientation matrices (data ``S``, weight ``W``),
so the cost scales with the number of significant orientations, not with the number of particles; the statistics
add over batches, devices and workers (:meth:`ClassBackProjectors.merge`). Reconstruction is
:meth:`BackProjector.reconstruct` (Wiener ``data / (weight + 1/(pad³·T·τ²))``, symmetry), multiplied by ``n²``
to return to the particles' real-space units (the units of the volumes given to :class:`ClassReferences3D`).

Spectra (RELION units, per real/imaginary component, of the ``FT / n²`` coefficients):

* :func:`reference_tau2_3d` — ``τ²`` of a reference (RELION ``Projector::computeFourierTransformMap``): mean
  ``|F/n²|²/2`` over padded-grid voxels in shell ``round(|p|/pad)``.
* :func:`ssnr_3d` — RELION ``BackProjector::updateSSNRarrays`` without FSC: ``σ²_ref = 1/mean(pad³·weight)``
  (rlnReferenceSigma2), ``data_vs_prior = mean(pad³·weight·T·τ²)``, Fourier coverage (via
  :func:`cryopipe.engine.mstep.ssnr_arrays`) on the Hermitian- and point-group-symmetrised statistics.
* :func:`halfset_fsc` — RELION ``compareTwoHalves``: FSC of the two halves' ``Σdata/Σweight`` averaged onto the
  unpadded grid (``getDownsampledAverage``, ``calculateDownSampledFourierShellCorrelation``; FSC(0) = 1).
* :func:`fsc_tau2` — gold standard: ``τ² = T·FSC/(1−FSC)·σ²_ref`` (FSC clipped to [0.001, 0.999]; for the final
  joined map ``FSC' = sqrt(2·FSC/(1+FSC))``); RELION applies ``T`` once more in the reconstruction, as
  :meth:`ClassBackProjectors.reconstruct` does with ``tau2_fudge`` (``T = 1`` in auto-refine).
* :func:`join_halves_at_low_resolution` — RELION ``joinTwoHalvesAtLowResolution`` (``--low_resol_join_halves``).

Use in a refinement loop (per iteration; ``r = current_size // 2``)::

    grid = healpix_orientations(order, psi_step, sym, oversampling, perturb)      # asymmetric unit of sym
    refs = ClassReferences3D.from_volumes(vols, cset, Pc, grid, pad)              # per half-set
    bps = ClassBackProjectors(K, n, pad, r_max=r)                                 # per half-set
    for idx in batches:                        # local: ordered by local_batch_order(previous angles)
        src, lpo = refs, log_pdf_class[None, :, None]                 # (+ log pdf_direction[:, grid.pixel])
        if local:
            sub, lp = local_orientations(grid, angles[idx], sigma_ang, sym)
            src, lpo = refs.with_orientations(sub), lp[:, None, :] + log_pdf_class[None, :, None]
        res = expectation(prepare_batch(..., log_prior_orient=lpo), src, translations, settings)
        bps.add(res, src); angles[idx] = src.best_angles(res); origins[idx] += res.best_offset
    # gold standard M-step
    join_halves_at_low_resolution(h1, h2, ceil(n * apix / 40))
    st1, st2 = h1.symmetrised(sym), h2.symmetrised(sym)
    fsc = halfset_fsc(h1, h2, stats1=st1, stats2=st2)
    sigma2_ref, _, _ = ssnr_3d(h1, tau2, T, stats=st1); tau2_1, dvp = fsc_tau2(fsc, sigma2_ref, T)
    vol1 = h1.reconstruct(tau2_1, T, sym, minres_map=minres_map)                  # same for half 2
    # classification (no halves): tau2 = refs.tau2(r); ssnr_3d(bps, tau2, T, sym); bps.reconstruct(tau2, T, sym)

``EStepSettings.oversampling`` must be ``grid.oversampling > 0`` (single-pass mode takes child 0 as the sample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cryopipe.core.backprojector import BackProjector
from cryopipe.core.projector import Projector, interpolate_half_grid
from cryopipe.engine.coefficients import CoefficientSet
from cryopipe.engine.mstep import ssnr_arrays
from cryopipe.engine.orientations3d import OrientationSet3D
from cryopipe.errors import CryopipeError

__all__ = [
    "ClassReferences3D",
    "ClassBackProjectors",
    "reference_tau2_3d",
    "symmetry_ops",
    "ssnr_3d",
    "average_ctf2",
    "downsampled_average",
    "halfset_fsc",
    "fsc_tau2",
    "join_halves_at_low_resolution",
]


def symmetry_ops(symmetry: str | torch.Tensor | None, device=None) -> torch.Tensor | None:
    """Point-group operators ``[G, 3, 3]`` for a RELION symmetry name (None/"C1" → None, tensors pass through)."""
    if symmetry is None:
        return None
    if isinstance(symmetry, torch.Tensor):
        return symmetry.to(device) if device is not None else symmetry
    from cryopipe.core.symmetry import canonical_symmetry_name, symmetry_operators

    if canonical_symmetry_name(symmetry) == "C1":
        return None
    return symmetry_operators(symmetry, device=device, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------
# E-step: predictions
# ------------------------------------------------------------------------------------------------------------

class ClassReferences3D:
    """Projections of ``K`` class volumes at the samples of an :class:`OrientationSet3D` (a
    :class:`~cryopipe.engine.estep.PredictionSource`; module docstring).

    Args:
        projectors: one :class:`Projector` per class (same box ``n``; see :meth:`from_volumes`).
        cset: the coefficient set of the iteration (``P`` coefficients, box ``n``).
        coarse_size: number of leading coefficients used by the coarse pass (``Pc``).
        orientations: the samples (coarse ``[Rc]`` and children ``[Rc, S]``).
        chunk_bytes: bound on the temporary memory of one interpolation chunk.

    ``coarse()`` → ``[K, Rc, Pc]`` complex64 (computed once, cached); ``fine(k_idx, r_idx)`` → ``[M, S, P]`` (the
    children of coarse sample ``r_idx[i]`` of class ``k_idx[i]``; with ``oversampling == 0`` the single child is
    the coarse sample itself, which is what the E-step's single-pass mode expects).
    """

    def __init__(self, projectors: Sequence[Projector], cset: CoefficientSet, coarse_size: int,
                 orientations: OrientationSet3D, chunk_bytes: int = 1 << 27):
        self.projectors = list(projectors)
        if not self.projectors:
            raise ValueError("ClassReferences3D needs at least one class projector")
        n = self.projectors[0].n
        if any(p.n != n for p in self.projectors) or cset.n != n:
            raise ValueError(f"projectors and coefficient set must share one box size (cset {cset.n}, "
                             f"projectors {[p.n for p in self.projectors]})")
        self.n = n
        self.cset = cset
        self.coarse_size = int(coarse_size)
        self.orientations = orientations
        self.chunk_bytes = int(chunk_bytes)
        self.n_classes = len(self.projectors)
        self.n_coarse = orientations.n_coarse
        self.n_children = orientations.n_children
        self._coarse: torch.Tensor | None = None
        self._cache: _CoarseCache | None = None  # shared by the local-search views of one full grid

    def enable_coarse_cache(self, n_grid_rows: int, max_bytes: int = 1 << 30) -> bool:
        """Share coarse predictions between the per-batch local-search views (:meth:`with_orientations`): each
        row of the full grid (``grid_index``) is projected at most once per iteration. Only when the cache of
        ``K × n_grid_rows × Pc`` complex64 values fits in ``max_bytes`` (it is allocated lazily: untouched rows
        cost no memory). Returns whether it is on."""
        need = self.n_classes * int(n_grid_rows) * self.coarse_size * 8
        if need > max_bytes:
            return False
        self._cache = _CoarseCache(self.n_classes, int(n_grid_rows), self.coarse_size, self.device)
        return True

    @classmethod
    def from_volumes(cls, volumes: torch.Tensor, cset: CoefficientSet, coarse_size: int,
                     orientations: OrientationSet3D, pad: float = 2.0, interpolation: str = "trilinear",
                     chunk_bytes: int = 1 << 27) -> ClassReferences3D:
        """Build the projectors of class volumes ``[K, n, n, n]`` (real space, the particles' units) on the
        volumes' device (one padded 3D FFT per class)."""
        if volumes.dim() == 3:
            volumes = volumes[None]
        projs = [Projector(volumes[k], pad=pad, interpolation=interpolation) for k in range(volumes.shape[0])]
        return cls(projs, cset, coarse_size, orientations, chunk_bytes)

    def with_orientations(self, orientations: OrientationSet3D, cset: CoefficientSet | None = None,
                          coarse_size: int | None = None) -> ClassReferences3D:
        """The same class projectors at another orientation set (e.g. one batch's local-search candidates)."""
        view = ClassReferences3D(self.projectors, self.cset if cset is None else cset,
                                 self.coarse_size if coarse_size is None else coarse_size, orientations,
                                 self.chunk_bytes)
        if self._cache is not None and view.coarse_size == self.coarse_size and cset is None:
            view._cache = self._cache
        return view

    @property
    def device(self) -> torch.device:
        return self.projectors[0].device

    # ---------------------------------------------------------------------------------------------------
    def predict(self, k: int, rotations: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """``[R, Q]`` complex64 predictions of class ``k`` for RELION matrices ``rotations [R, 3, 3]`` at
        frequencies ``freqs [Q, 2]`` (Fourier pixels): ``V̂(pad·Aᵀ·(qx, qy, 0)) / n²``, 0 beyond ``n/2``; with
        3D frequencies ``freqs [Q, 3]`` (tilt stacks, :func:`~cryopipe.engine.coefficients.stack_coefficient_set`)
        ``V̂(pad·Aᵀ·q)``."""
        pr = self.projectors[int(k)]
        dev = pr.device
        rot = rotations.to(device=dev, dtype=torch.float64).reshape(-1, 3, 3)
        q = freqs.to(device=dev, dtype=torch.float64)
        R, Q = rot.shape[0], q.shape[0]
        out = torch.zeros(R, Q, dtype=torch.complex64, device=dev)
        if R == 0 or Q == 0:
            return out
        valid = (q.square().sum(-1) <= pr.r_max * pr.r_max + 1e-9).to(torch.float32)
        scale = valid / float(self.n * self.n)
        step = max(1, self.chunk_bytes // (Q * 160))  # ~160 bytes of temporaries per sampled coefficient
        for r0 in range(0, R, step):  # chunks of orientations: bounded temporary memory
            a = rot[r0:r0 + step, :q.shape[1], :] * pr.pad
            pts = torch.einsum("qi,rij->rqj", q, a).to(pr.dtype)  # pad·Aᵀ(qx, qy[, qz]) = (x, y, z)
            vals = interpolate_half_grid(pr.data, pr.centre, pts, pr.interpolation)
            out[r0:r0 + step] = (vals * scale[None]).to(torch.complex64)
        return out

    def coarse(self) -> torch.Tensor:
        """``[K, Rc, Pc]`` predictions of every class at every coarse sample (cached)."""
        if self._coarse is None and self._cache is not None:
            self._coarse = self._cache.get(self, self.orientations.grid_index)
        if self._coarse is None:
            q = self.cset.k[:self.coarse_size]
            A = self.orientations.coarse_matrices()
            self._coarse = torch.stack([self.predict(k, A, q) for k in range(self.n_classes)])  # K classes
        return self._coarse

    def fine(self, k_idx: torch.Tensor, r_idx: torch.Tensor) -> torch.Tensor:
        """``[M, S, P]`` predictions of the children of coarse samples ``r_idx`` for classes ``k_idx``."""
        M, S, P = int(k_idx.numel()), self.n_children, self.cset.size
        dev = self.device
        out = torch.zeros(M, S, P, dtype=torch.complex64, device=dev)
        if M == 0:
            return out
        kk = k_idx.to(dev)
        ang = self.orientations.children[r_idx.to(self.orientations.device)].to(dev)  # [M, S, 3]
        from cryopipe.core.geometry import euler_to_matrix

        rot = euler_to_matrix(ang[..., 0], ang[..., 1], ang[..., 2])  # [M, S, 3, 3]
        q = self.cset.k
        for k in torch.unique(kk).tolist():  # the classes present (K is small)
            sel = torch.nonzero(kk == k).reshape(-1)
            out[sel] = self.predict(k, rot[sel].reshape(-1, 3, 3), q).reshape(sel.numel(), S, P)
        return out

    # ---------------------------------------------------------------------------------------------------
    def sample_rotations(self, coarse_idx: torch.Tensor, child_idx: torch.Tensor, two_pass: bool = True
                         ) -> torch.Tensor:
        """``[M, 3, 3]`` matrices of the E-step's samples (``BatchResult.sample_coarse/sample_child`` or
        ``best_coarse/best_child``); ``two_pass=False`` (``BatchResult.extra["two_pass"]``): the coarse samples."""
        o = self.orientations
        return o.sample_matrices(coarse_idx, child_idx if two_pass else None)

    def sample_angles(self, coarse_idx: torch.Tensor, child_idx: torch.Tensor, two_pass: bool = True
                      ) -> torch.Tensor:
        """``[M, 3]`` (rot, tilt, psi) degrees of E-step samples (see :meth:`sample_rotations`)."""
        return self.orientations.sample_angles(coarse_idx, child_idx if two_pass else None)

    def best_angles(self, result) -> torch.Tensor:
        """``[B, 3]`` angles (degrees) of each image's most probable sample in a ``BatchResult``."""
        return self.sample_angles(result.best_coarse, result.best_child, bool(result.extra.get("two_pass", True)))

    def tau2(self, r_max: int | None = None) -> torch.Tensor:
        """``[K, n//2+1]`` reference spectra of the classes (:func:`reference_tau2_3d`)."""
        return torch.stack([reference_tau2_3d(p, r_max) for p in self.projectors])


class _CoarseCache:
    """Coarse predictions ``[K, rows, Pc]`` of a full orientation grid, filled on demand (row ``grid_index``)."""

    def __init__(self, K: int, rows: int, Pc: int, device):
        self.values = torch.empty(K, rows, Pc, dtype=torch.complex64, device=device)  # pages touched on write
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)

    def get(self, refs: ClassReferences3D, grid_index: torch.Tensor) -> torch.Tensor:
        gi = grid_index.to(self.done.device)
        todo = torch.unique(gi[~self.done[gi]])
        if todo.numel():
            pos = torch.searchsorted(gi.sort().values, todo)  # any sample of the subset with that grid row
            order = gi.argsort()
            rows = order[pos]
            A = refs.orientations.coarse_matrices()[rows.to(refs.orientations.device)]
            q = refs.cset.k[:refs.coarse_size]
            for k in range(refs.n_classes):  # K classes
                self.values[k, todo] = refs.predict(k, A, q)
            self.done[todo] = True
        return self.values[:, gi]


def _grid_radius(R: int, device) -> torch.Tensor:
    """``|p|²`` (float64) on the centred padded half grid ``[2R+3, 2R+3, R+2]`` of projectors/back-projectors."""
    c = torch.arange(-R - 1, R + 2, device=device, dtype=torch.float64)
    x = torch.arange(R + 2, device=device, dtype=torch.float64)
    return c[:, None, None] ** 2 + c[None, :, None] ** 2 + x[None, None, :] ** 2


def _shell_of_grid(r2: torch.Tensor, pad: float, max_r2: int, excluded: int) -> torch.Tensor:
    """RELION's ``ires = round(|p|/pad)`` for voxels with ``r² < max_r2`` (``excluded`` elsewhere)."""
    ires = torch.floor(torch.sqrt(r2) / pad + 0.5).long()
    return torch.where(r2 < max_r2, ires, torch.full_like(ires, excluded))


def reference_tau2_3d(projector: Projector, r_max: int | None = None) -> torch.Tensor:
    """``[n//2+1]`` float64 ``τ²`` of a reference held in a :class:`Projector`: mean ``|F/n²|²/2`` over the padded
    grid voxels with ``r² <= round(pad·r_max)²`` in shell ``round(|p|/pad)`` (RELION
    ``computeFourierTransformMap``); ``r_max`` default ``n//2``; zero beyond."""
    n = projector.n
    ns = n // 2 + 1
    rm = n // 2 if r_max is None else min(int(r_max), n // 2)
    Rm = int(round(projector.pad * rm))
    r2 = _grid_radius(projector.R, projector.device)
    inside = r2 <= Rm * Rm
    ires = torch.floor(torch.sqrt(r2) / projector.pad + 0.5).long()
    keep = inside & (ires < ns)
    d = projector.data
    p = ((d.real.to(torch.float64) ** 2 + d.imag.to(torch.float64) ** 2) / (2.0 * float(n) ** 4))[keep]
    sums = torch.zeros(ns, dtype=torch.float64, device=d.device).index_add_(0, ires[keep], p)
    cnt = torch.zeros(ns, dtype=torch.float64, device=d.device).index_add_(
        0, ires[keep], torch.ones_like(p))
    return torch.where(cnt > 0, sums / cnt.clamp_min(1), torch.zeros_like(sums))


# ------------------------------------------------------------------------------------------------------------
# M-step: back-projection of the orientation sums
# ------------------------------------------------------------------------------------------------------------

class ClassBackProjectors:
    """One :class:`BackProjector` per class accumulating the engine's per-sample sums (module docstring).

    Args:
        n_classes, n: classes and box (pixels).
        pad, interpolation: as :class:`BackProjector` (RELION: 2, trilinear).
        r_max: highest frequency inserted (Fourier pixels; RELION: ``current_size/2``); default ``n//2``.
        device, dtype: of the accumulators.
        chunk_elems: images of ``n × (n//2+1)`` coefficients are inserted in chunks of at most this many values.
    """

    def __init__(self, n_classes: int, n: int, pad: float = 2.0, interpolation: str = "trilinear",
                 r_max: float | None = None, device=None, dtype: torch.dtype = torch.float32,
                 chunk_elems: int = 1 << 22):
        self.bps = [BackProjector(n, pad, interpolation, r_max, device, dtype) for _ in range(int(n_classes))]
        self.n = int(n)
        self.chunk_elems = int(chunk_elems)

    @property
    def n_classes(self) -> int:
        return len(self.bps)

    @property
    def device(self) -> torch.device:
        return self.bps[0].device

    @property
    def pad(self) -> float:
        return self.bps[0].pad

    @property
    def r_max(self) -> int:
        return self.bps[0].r_max

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(data [K, ...], weight [K, ...])``: the accumulated grids of all classes (a chunk's partial sums)."""
        return torch.stack([bp.data for bp in self.bps]), torch.stack([bp.weight for bp in self.bps])

    def add_sums(self, data: torch.Tensor, weight: torch.Tensor) -> None:
        """Add the grids of :meth:`sums` of another accumulator with the same classes, box, padding and r_max."""
        for k, bp in enumerate(self.bps):
            bp.data += data[k].to(bp.data.device)
            bp.weight += weight[k].to(bp.weight.device)

    def insert_sums(self, S: torch.Tensor, W: torch.Tensor, sample_class: torch.Tensor, rotations: torch.Tensor,
                    cset: CoefficientSet) -> None:
        """Add sums ``S [M, P]`` (complex, ``Σ w·C·X/σ²``) and ``W [M, P]`` (``Σ w·C²/σ²``) of samples with classes
        ``sample_class [M]`` and RELION matrices ``rotations [M, 3, 3]``: ``data += S``, ``weight += W`` at the
        Fourier-slice positions (one :meth:`BackProjector.insert` per class and chunk). With a tilt-stack set
        (``cset.n_images = F``) each sample's ``F`` slices go in at ``R_f·A``; with a volume set (3D
        pseudo-subtomograms, ``cset.volume``) every coefficient goes in at ``Aᵀ·k``
        (:meth:`BackProjector.insert_points`)."""
        if S.shape != W.shape or S.shape[0] != sample_class.numel() or rotations.shape[0] != S.shape[0]:
            raise ValueError(f"inconsistent sums: S {tuple(S.shape)}, W {tuple(W.shape)}, classes "
                             f"{tuple(sample_class.shape)}, rotations {tuple(rotations.shape)}")
        if cset.n != self.n:
            raise ValueError(f"coefficient set box {cset.n} != back-projector box {self.n}")
        dev = self.device
        S, W = S.to(dev), W.to(dev)
        kk = sample_class.to(dev)
        rot = rotations.to(dev)
        live = (W > 0).any(dim=1)  # samples without weight (pruned for every image) add nothing
        if not bool(live.all()):
            S, W, kk, rot = S[live], W[live], kk[live], rot[live]
        if cset.volume:  # 3D pseudo-subtomograms: every coefficient at pad·Aᵀ·k (the volume rotated, no slice)
            for k in torch.unique(kk).tolist():  # the classes present (K is small)
                sel = torch.nonzero(kk == k).reshape(-1)
                self.bps[k].insert_points(S[sel], W[sel], rot[sel], cset.k, self.chunk_elems)
            return
        F = cset.n_images
        half = self.n * (self.n // 2 + 1) * F
        step = max(1, self.chunk_elems // half)
        for k in torch.unique(kk).tolist():  # the classes present (K is small)
            sel = torch.nonzero(kk == k).reshape(-1)
            for c0 in range(0, sel.numel(), step):  # chunks of samples: bounded memory
                s = sel[c0:c0 + step]
                w = W[s].to(torch.float32)
                # insert() adds X·wt to data and wt to weight: X = S/W, wt = W (W = 0 implies S = 0)
                x = torch.where(w > 0, S[s] / torch.where(w > 0, w, torch.ones_like(w)),
                                torch.zeros((), dtype=S.dtype, device=dev))
                r = rot[s]
                if F > 1:  # tilt stacks: the slices of every tilt, at R_f·A
                    r = (cset.image_rotations.to(dev, r.dtype)[None] @ r[:, None]).reshape(-1, 3, 3)
                h = self.n // 2 + 1
                self.bps[k].insert(cset.scatter(x, hermitian=False).reshape(-1, self.n, h), r,
                                   weights=cset.scatter(w, hermitian=False).reshape(-1, self.n, h))

    def add(self, result, refs: ClassReferences3D) -> None:
        """Insert the sums of one E-step ``BatchResult`` computed with predictions ``refs`` (its samples index
        ``refs.orientations``)."""
        two = bool(result.extra.get("two_pass", True))
        rot = refs.sample_rotations(result.sample_coarse, result.sample_child, two)
        self.insert_sums(result.S, result.W, result.sample_class, rot, refs.cset)

    def merge(self, other: ClassBackProjectors) -> ClassBackProjectors:
        """``self += other`` (statistics of the union of their particles); returns self."""
        if other.n_classes != self.n_classes:
            raise CryopipeError(f"cannot merge back-projectors of {other.n_classes} and {self.n_classes} classes")
        for a, b in zip(self.bps, other.bps):
            a.merge(b)
        return self

    def clear(self) -> None:
        for b in self.bps:
            b.clear()

    def reconstruct(self, tau2: torch.Tensor | None = None, tau2_fudge: float = 1.0,
                    symmetry: str | torch.Tensor | None = None, r_max: float | None = None,
                    minres_map: int = 0, classes: Sequence[int] | None = None) -> torch.Tensor:
        """``[K, n, n, n]`` maps in the particles' units (``n² ×`` :meth:`BackProjector.reconstruct`).

        ``tau2 [K, n//2+1]`` (or ``[n//2+1]`` for all classes; None: unregularised, RELION's weight floor);
        shells ``< minres_map`` get no prior term (RELION ``--minres_map``). ``symmetry``: RELION name or
        operators. Empty classes (no weight) give zero maps.
        """
        ops = symmetry_ops(symmetry, self.device)
        ks = range(self.n_classes) if classes is None else classes
        out = []
        for k in ks:  # K classes: one padded 3D inverse FFT each
            t2 = None
            if tau2 is not None:
                t = tau2 if tau2.dim() == 1 else tau2[k]
                t2 = t.to(self.device, torch.float64).clone()
                if minres_map > 0:
                    t2[:minres_map] = math.inf  # 1/(pad³·T·τ²) = 0: no prior term
            if float(self.bps[k].weight.sum()) <= 0:
                out.append(torch.zeros(self.n, self.n, self.n, device=self.device))
                continue
            out.append(self.bps[k].reconstruct(t2, tau2_fudge, ops, r_max) * float(self.n * self.n))
        return torch.stack(out)

    def symmetrised(self, symmetry: str | torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per class ``(data, weight)`` after Hermitian symmetry on the ``x = 0`` plane and point-group
        symmetrisation (what RELION's ``symmetriseReconstructions`` leaves for the FSC and SSNR arrays)."""
        ops = symmetry_ops(symmetry, self.device)
        out = []
        for b in self.bps:  # K classes
            # BackProjector's own Hermitian/point-group steps (private helpers; see the module report)
            d, w = BackProjector._enforce_hermitian(b.data, b.weight)
            if ops is not None:
                d, w = b._symmetrise(d, w, ops)
            out.append((d, w))
        return out


# ------------------------------------------------------------------------------------------------------------
# SSNR, FSC between halves, gold-standard tau2
# ------------------------------------------------------------------------------------------------------------

def average_ctf2(ctf2_per_shell: torch.Tensor, count_per_shell: torch.Tensor) -> torch.Tensor:
    """RELION ``setAverageCTF2``: the average CTF² per shell ``[n//2+1]`` of CTF-premultiplied data, ``Σ c² /
    Σ M`` over the particles' coefficients of each shell (3D pseudo-subtomograms: ``c²`` the weight volume's
    ``|Σ c²|``, ``M`` its multiplicity; 2D stacks: the tilts' ``c²`` over the image count × coefficients per
    shell); 0 where nothing was counted. The tomographic optimisers compute it once per run
    (:meth:`cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D._average_ctf2`)."""
    c = count_per_shell.to(torch.float64)
    return torch.where(c > 0, ctf2_per_shell.to(torch.float64) / c.clamp_min(1e-300), torch.zeros_like(c))


def ssnr_3d(bps: ClassBackProjectors, tau2: torch.Tensor, tau2_fudge: float = 1.0,
            symmetry: str | torch.Tensor | None = None, stats: list | None = None,
            avg_ctf2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigma2_ref, data_vs_prior, fourier_coverage)`` ``[K, n//2+1]`` of RELION's ``updateSSNRarrays``
    (without FSC) on the symmetrised statistics: voxels with ``r² < round(pad·r_max)²``, shell
    ``round(|p|/pad)``, weights times the oversampling correction ``pad³``. ``tau2 [K, n//2+1]``; ``stats``: the
    output of :meth:`ClassBackProjectors.symmetrised` (computed if None).

    ``avg_ctf2 [n//2+1]`` (:func:`average_ctf2`): RELION's correction for CTF-premultiplied data (tomography) in
    runs without half-sets (``do_correct_tau2_by_avgctf2``: premultiplied, not CTF-corrected, τ² not fixed, no
    split halves): ``1/τ²`` is divided by the shell's average CTF² where ``τ² > 0`` and it is ``> 0``, so
    ``data_vs_prior`` and the Fourier coverage count ``weight·T·τ²·avg c²``. The weights of premultiplied data
    are ``Σ c²/σ²`` with a σ² estimated from the premultiplied residuals (``≈ avg c² × the raw noise``): without
    the factor the SSNR, and the resolution that follows from it, would be overstated by ``1/avg c²``. The
    reconstruction itself is not corrected (RELION ``BackProjector::reconstruct`` uses τ² as is)."""
    if stats is None:
        stats = bps.symmetrised(symmetry)
    b0 = bps.bps[0]
    ns = bps.n // 2 + 1
    Rm = int(round(b0.r_max * b0.pad))
    r2 = _grid_radius(b0.R, bps.device)
    shell = _shell_of_grid(r2, b0.pad, Rm * Rm, ns + 1)
    w = torch.stack([s[1] for s in stats]).to(torch.float64) * b0.pad ** 3
    t2 = tau2.to(bps.device, torch.float64)
    if t2.dim() == 1:
        t2 = t2[None].expand(bps.n_classes, -1)
    if avg_ctf2 is not None:
        a = torch.zeros(t2.shape[1], dtype=torch.float64, device=t2.device)
        m = min(a.numel(), avg_ctf2.numel())
        a[:m] = avg_ctf2.to(t2.device, torch.float64)[:m]
        t2 = torch.where((a[None] > 0) & (t2 > 0), t2 * a[None], t2)
    return ssnr_arrays(w, t2, shell, ns, tau2_fudge, b0.r_max)


def downsampled_average(data: torch.Tensor, weight: torch.Tensor, pad: float, r_max: int) -> torch.Tensor:
    """RELION ``getDownsampledAverage``: ``Σdata / Σweight`` of the padded-grid voxels that round to each voxel of
    the unpadded half grid (coordinate ``round(p/pad)``, half away from zero), ``[2r+3, 2r+3, r+2]`` with
    ``r = r_max`` (``z, y`` index = coordinate + ``r + 1``); zero where the summed weight is 0."""
    Z = data.shape[0]
    R = (Z - 3) // 2
    dev = data.device
    c = torch.arange(-R - 1, R + 2, device=dev, dtype=torch.float64)
    x = torch.arange(R + 2, device=dev, dtype=torch.float64)

    def rnd(v: torch.Tensor) -> torch.Tensor:
        return (torch.sign(v) * torch.floor(v.abs() / pad + 0.5)).long()

    r = int(r_max)
    dz, dx = rnd(c), rnd(x)  # z and y share the same rounding of c
    size = 2 * r + 3
    ok_z = dz.abs() <= r + 1
    ok_x = dx <= r + 1
    iz = (dz + r + 1).clamp(0, size - 1)
    ix = dx.clamp(0, r + 1)
    flat = (iz[:, None, None] * size + iz[None, :, None]) * (r + 2) + ix[None, None, :]
    ok = ok_z[:, None, None] & ok_z[None, :, None] & ok_x[None, None, :]
    n_out = size * size * (r + 2)
    idx = flat[ok]
    dsum = torch.zeros(n_out, dtype=torch.complex128, device=dev).index_add_(0, idx, data[ok].to(torch.complex128))
    wsum = torch.zeros(n_out, dtype=torch.float64, device=dev).index_add_(0, idx, weight[ok].to(torch.float64))
    avg = torch.where(wsum > 0, dsum / torch.where(wsum > 0, wsum, torch.ones_like(wsum)),
                      torch.zeros((), dtype=dsum.dtype, device=dev))
    return avg.reshape(size, size, r + 2)


def halfset_fsc(half1: ClassBackProjectors, half2: ClassBackProjectors, symmetry: str | torch.Tensor | None = None,
                stats1: list | None = None, stats2: list | None = None) -> torch.Tensor:
    """``[K, n//2+1]`` gold-standard FSC between two half-set back-projectors (RELION ``compareTwoHalves``): the
    downsampled ``Σdata/Σweight`` of each (symmetrised) half, correlated in shells ``round(|k|)`` for
    ``|k| <= r_max``; FSC(0) = 1, shells beyond ``r_max`` 0."""
    if stats1 is None:
        stats1 = half1.symmetrised(symmetry)
    if stats2 is None:
        stats2 = half2.symmetrised(symmetry)
    b0 = half1.bps[0]
    r = b0.r_max
    ns = half1.n // 2 + 1
    dev = half1.device
    out = torch.zeros(half1.n_classes, ns, dtype=torch.float64, device=dev)
    c = torch.arange(-r - 1, r + 2, device=dev, dtype=torch.float64)
    x = torch.arange(r + 2, device=dev, dtype=torch.float64)
    rr = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + x[None, None, :] ** 2)
    keep = rr <= r
    idx = torch.floor(rr + 0.5).long()[keep]
    for k in range(half1.n_classes):  # K classes
        a1 = downsampled_average(*stats1[k], b0.pad, r)[keep]
        a2 = downsampled_average(*stats2[k], b0.pad, r)[keep].to(dev)
        num = torch.zeros(ns, dtype=torch.float64, device=dev).index_add_(0, idx, (a1 * a2.conj()).real)
        d1 = torch.zeros(ns, dtype=torch.float64, device=dev).index_add_(0, idx, a1.abs().square())
        d2 = torch.zeros(ns, dtype=torch.float64, device=dev).index_add_(0, idx, a2.abs().square())
        den = d1 * d2
        out[k] = torch.where(den > 0, num / torch.sqrt(torch.where(den > 0, den, torch.ones_like(den))),
                             torch.zeros_like(num))
        out[k, 0] = 1.0
    return out


def fsc_tau2(fsc: torch.Tensor, sigma2_ref: torch.Tensor, tau2_fudge: float = 1.0, whole: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gold-standard ``(tau2, data_vs_prior)`` from the half-set FSC (RELION ``updateSSNRarrays`` with
    ``update_tau2_with_fsc``): ``f = clip(FSC, 0.001, ·)``, for the joined final map ``f = sqrt(2f/(1+f))``
    (``whole``), ``f = min(f, 0.999)``, ``SSNR = T·f/(1−f)``, ``τ² = SSNR·σ²_ref``, ``data_vs_prior = SSNR``."""
    f = fsc.to(torch.float64).clamp_min(0.001)
    if whole:
        f = torch.sqrt(2.0 * f / (f + 1.0))
    f = f.clamp_max(0.999)
    ssnr = tau2_fudge * f / (1.0 - f)
    return ssnr * sigma2_ref.to(ssnr.device, torch.float64), ssnr


def join_halves_at_low_resolution(half1: ClassBackProjectors, half2: ClassBackProjectors, lowres_r_max: int
                                  ) -> None:
    """RELION ``joinTwoHalvesAtLowResolution``: both halves get the summed ``data``/``weight`` of the voxels with
    ``r² <= round(pad·lowres_r_max)²`` (``lowres_r_max = ceil(n·apix / low_resol_join_halves)`` Fourier pixels).
    In place."""
    for a, b in zip(half1.bps, half2.bps):  # K classes
        R2 = int(round(a.pad * int(lowres_r_max))) ** 2
        m = _grid_radius(a.R, a.device) <= R2
        d = a.data[m] + b.data[m].to(a.device)
        w = a.weight[m] + b.weight[m].to(a.device)
        a.data[m] = d
        a.weight[m] = w
        b.data[m] = d.to(b.device)
        b.weight[m] = w.to(b.device)
