"""3D refinement of tomographic particles on the shared engine: :class:`SubtomoOptimiser3D` is
:class:`~cryopipe.engine.optimiser3d.Optimiser3D` (same iterations, E-step, gold-standard M-step, auto-sampling)
with 3D pseudo-subtomograms as its data (:mod:`cryopipe.engine.subtomo_batch`).

What differs from single particles, and only that, is overridden:

* coefficients: the volume set of the box (:func:`~cryopipe.engine.coefficients.volume_coefficient_set`), so
  predictions are the reference rotated in 3D and the M-step inserts whole rotated volumes;
* batches: data volumes, ``|Σc²|`` and multiplicity (``particles.load`` and ``weights``), translated by the
  particle's 3D origin, masked with the particle-diameter sphere, RELION's ``1/(σ²·M)``;
* translations: a 3D grid in a sphere of ``offset_range`` (RELION ``setTranslations`` in 3D), with ``8^order``
  oversampled children;
* noise spectra: RELION's subtomogram normalisation, ``σ² = Σ resid / (2·Σ M)`` per shell (the multiplicity per
  shell replaces the pixel count; it is a property of the data, computed once), in RELION's units (3D transforms
  normalised by ``n³``: the engine's residuals are divided by ``n²·Σ M``,
  :func:`cryopipe.engine.subtomo_batch.engine_sigma2_scale`);
* M-step: RELION's back-projection of premultiplied data, ``Σ w·X/σ²`` with weight ``Σ w·C3/σ²``; in runs
  without half-sets (the de novo initial model) ``τ²`` in ``data_vs_prior`` is corrected by the average CTF² per
  shell (RELION ``setAverageCTF2``, :meth:`SubtomoOptimiser3D._average_ctf2`);
* offsets are 3D (origins ``[N, 3]`` in pixels, the offset prior over 3 dimensions);
* initial noise spectra, the reference greyscale and the expected accuracies from the volumes.

Particles are streamed: only one batch of volumes (``B × n³`` floats and their weights) is in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.masks import soft_spherical_mask
from cryopipe.engine.coefficients import volume_coefficient_set
from cryopipe.engine.estep import TranslationGrid
from cryopipe.engine.optimiser3d import Optimiser3D, ParticleState3D, signal_power
from cryopipe.engine.reference3d import ClassReferences3D, average_ctf2
from cryopipe.engine.stream import repair_negative_spectra
from cryopipe.engine.tomo_memory import BatchMemory
from cryopipe.engine.tomo_priors import AnglePriors, angle_log_prior
from cryopipe.engine.subtomo_batch import (
    SUBTOMO_MULTI_THR,
    engine_sigma2_scale,
    multiplicity_per_shell,
    prepare_subtomo_batch,
    split_subtomo_weights,
)

__all__ = ["translation_grid_3d", "oversample_translations_3d", "SubtomoOptimiser3D"]


def translation_grid_3d(offset_range: float, offset_step: float, device=None) -> torch.Tensor:
    """Coarse translations ``[T, 3]`` (pixels) on a cubic grid of spacing ``offset_step`` inside the sphere of
    radius ``offset_range`` (RELION ``setTranslations`` for 3D data); ``offset_range = 0``: the single origin."""
    if offset_step <= 0:
        raise ValueError(f"offset_step must be > 0 pixels, got {offset_step}")
    maxp = int(math.ceil(offset_range / offset_step - 1e-9)) if offset_range > 0 else 0
    i = torch.arange(-maxp, maxp + 1, device=device, dtype=torch.float64) * offset_step
    z, y, x = torch.meshgrid(i, i, i, indexing="ij")
    pts = torch.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], dim=-1)
    keep = pts.square().sum(-1) < offset_range * offset_range + 0.001
    return pts[keep].to(torch.float32)


def oversample_translations_3d(coarse: torch.Tensor, step: float, order: int) -> torch.Tensor:
    """Children ``[T, 8^order, 3]`` of coarse 3D translations ``[T, 3]`` with coarse spacing ``step``."""
    if order == 0:
        return coarse[:, None, :].clone()
    m = 2 ** int(order)
    d = (-0.5 * step + (torch.arange(m, device=coarse.device, dtype=torch.float64) + 0.5) * step / m)
    z, y, x = torch.meshgrid(d, d, d, indexing="ij")
    off = torch.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], dim=-1).to(coarse.dtype)
    return coarse[:, None, :] + off[None]


class SubtomoOptimiser3D(Optimiser3D):
    """:class:`Optimiser3D` on 3D pseudo-subtomograms (module docstring).

    ``particles.load(idx)`` gives the data volumes ``[B, n, n, n]``; ``weights(idx)`` their weight volumes
    ``[B, 2n, n, n//2+1]`` (``*_weights.mrc``). ``state.origin`` is ``[N, 3]`` (pixels, subtomogram frame).
    Other arguments as :class:`Optimiser3D`."""

    offset_dim = 3

    def __init__(self, particles, settings, weights: Callable[[np.ndarray], np.ndarray], **kw):
        state = kw.pop("state", None)
        if state is None:
            state = ParticleState3D.empty(particles.size)
        if state.origin.shape[1] != 3:
            state.origin = np.concatenate([state.origin, np.zeros((state.origin.shape[0], 3 - state.origin.shape[1]))],
                                          axis=1)
        super().__init__(particles, settings, state=state, **kw)
        self.weights = weights
        n = self.n
        self.full = volume_coefficient_set(n, n // 2, device=self.dev)
        r_px = self.particle_diameter / (2.0 * particles.pixel_size)
        self.mask_data = soft_spherical_mask(n, r_px, settings.width_mask_edge, device=self.dev)
        self.npix = None  # Σ multiplicity per shell per particle: set from the data (initialise / first use)
        self.avg_ctf2 = None  # [n//2+1] average CTF² per shell: set with npix (RELION setAverageCTF2)
        self.memory = BatchMemory(self.dev)  # peak memory per batch, for the log (memory_line)
        #: priors on the subtomogram-frame tilt / psi in global searches (RELION --sigma_tilt / --sigma_psi)
        self.angle_priors: AnglePriors | None = None
        self._src = None  # the current batch's predictions (their orientations carry the priors)

    def iterate(self):
        """One iteration (:meth:`Optimiser3D.iterate`), measuring the peak memory of its batches."""
        self.memory.new_iteration()
        return super().iterate()

    def memory_line(self) -> str:
        """The last iteration's peak memory per batch (:class:`cryopipe.engine.tomo_memory.BatchMemory`)."""
        return self.memory.line()

    def _record(self, res, src, idx: np.ndarray, sums) -> None:
        super()._record(res, src, idx, sums)
        self.memory.stop()

    # -------------------------------------------------------------------------------------- data
    def _volumes(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.p.load(idx), dtype=np.float32)).to(self.dev)

    def _weights(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.ascontiguousarray(self.weights(idx), dtype=np.float32)).to(self.dev)
        return split_subtomo_weights(w)

    def _ensure_npix(self) -> None:
        """Once per run, in one pass over all particles: the mean over the particles of ``Σ M`` per shell (with
        ``sumw_group``, the particle count, it makes the engine's noise update RELION's ``Σ resid / (2·Σ M)``)
        and the average CTF² per shell (:meth:`_average_ctf2`)."""
        if self.npix is not None:
            return
        ns = self.n // 2 + 1
        ctf2 = torch.zeros(ns, dtype=torch.float64, device=self.dev)
        counts = torch.zeros(ns, dtype=torch.float64, device=self.dev)
        for b in self._batches(np.arange(self.p.size)):
            c2, cnt = self._ctf2_counts(b)
            ctf2 += c2.sum(dim=0)
            counts += cnt.sum(dim=0)
        self.avg_ctf2 = average_ctf2(ctf2, counts)
        self.npix = (counts * self._noise_unit() / max(1, self.p.size)).clamp_min(1e-12)

    def _average_ctf2(self) -> torch.Tensor:
        """``[n//2+1]`` RELION ``setAverageCTF2`` of these CTF-premultiplied particles: ``Σ C / Σ count`` per shell
        over all particles (:meth:`_ctf2_counts`; :func:`~cryopipe.engine.reference3d.average_ctf2`). RELION sums
        over the particles of the iteration (a VDAM mini-batch) at its current size; the data do not change, so
        it is computed once over all of them (shells beyond the current size carry no weight either way)."""
        self._ensure_npix()
        return self.avg_ctf2

    def _noise_unit(self) -> float:
        """Factor from RELION's noise-spectrum denominators (:meth:`_ctf2_counts`) to the engine's
        (:meth:`_noise_counts`): ``n²`` for pseudo-subtomograms (:func:`engine_sigma2_scale`)."""
        return engine_sigma2_scale(self.n)

    def _ctf2_counts(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, n//2+1] Σ C, [B, n//2+1] Σ M)`` per shell of particles ``idx`` over the coefficients RELION
        keeps (``M ≥ --subtomo_multi_thr``): ``C = |Σc²|`` of the weight volume (RELION's ``Fctf`` of
        premultiplied subtomograms, ``sumw_ctf2``) and the multiplicity (``sumw_stMulti``)."""
        C3, M = self._weights(idx)
        ns = self.n // 2 + 1
        m = self.full.gather(M.to(torch.float64))
        c = self.full.gather(C3.to(torch.float64))
        c = torch.where(m >= SUBTOMO_MULTI_THR, c, torch.zeros((), dtype=c.dtype, device=c.device))
        return self.full.shell_sum(c, ns), multiplicity_per_shell(M, self.full, ns)

    def _set_for(self, idx: np.ndarray):
        """The full coefficient set of particles ``idx`` (here the volume set of the box)."""
        return self.full

    def _noise_counts(self, idx: np.ndarray) -> torch.Tensor:
        """``[B, n//2+1]`` noise-spectrum denominators per particle (here ``n²·Σ M`` per shell: RELION's ``Σ M``
        and the engine → RELION unit factor of the residuals)."""
        _, M = self._weights(idx)
        return multiplicity_per_shell(M, self.full, self.n // 2 + 1) * self._noise_unit()

    def _initial_noise(self, idx: np.ndarray) -> torch.Tensor:
        """Per optics group ``Σ_b |X_b|² / (2·Σ_b counts_b)`` per shell over the (masked, centred) particles
        ``idx`` (RELION's initial estimate, without subtracting the average's power, which is negligible for
        particles in random orientations), negative values repaired."""
        self._ensure_npix()
        p, dev, n = self.p, self.dev, self.n
        G, ns = p.n_optics_groups, n // 2 + 1
        pow_sum = torch.zeros(G, ns, dtype=torch.float64, device=dev)
        c_sum = torch.zeros(G, ns, dtype=torch.float64, device=dev)
        for b in self._batches(np.asarray(idx)):
            cset = self._set_for(b)
            batch = self._prepare(b, cset.size, torch.ones(G, ns, dtype=torch.float64), None)
            X = batch.X.to(torch.complex128)
            og = torch.as_tensor(p.optics_group[b], device=dev)
            pow_sum.index_add_(0, og, cset.shell_sum((X.real.square() + X.imag.square()), ns))
            c_sum.index_add_(0, og, self._noise_counts(b))
        return repair_negative_spectra(pow_sum / (2.0 * c_sum.clamp_min(1e-12)))

    def _prepare(self, idx: np.ndarray, P: int, sigma2: torch.Tensor, log_prior: torch.Tensor | None):
        m = self.model
        K = m.n_classes if m is not None else 1
        ctf2, multi = self._weights(idx)
        origin = torch.as_tensor(self.state.origin[idx], dtype=torch.float32, device=self.dev)
        og = torch.as_tensor(self.p.optics_group[idx], device=self.dev)
        return prepare_subtomo_batch(self._volumes(idx), ctf2, multi, self.full, P, sigma2, og, origins=origin,
                                     mask=self.mask_data, log_prior_orient=log_prior, n_classes=K)

    def _batch_inputs(self, idx: np.ndarray, P: int, log_prior: torch.Tensor, gen: torch.Generator):
        self._ensure_npix()
        self.memory.start()
        grp = torch.as_tensor(self.p.group[idx], device=self.dev)
        log_prior = self._with_angle_priors(idx, log_prior)
        return self._prepare(idx, P, self.model.sigma2_noise, log_prior), grp, None

    def _batch_source(self, src, est, idx: np.ndarray, P: int):
        """The iteration's predictions, with the per-particle residual sums on: the engine's group-level noise
        shortcut assumes one ``1/σ²`` per optics group, while here it varies per particle (``M``, ``c²``)."""
        from dataclasses import replace

        self._src = src
        return src, replace(est, compute_corrections=True), P

    def _with_angle_priors(self, idx: np.ndarray, log_prior: torch.Tensor) -> torch.Tensor:
        """``log_prior [1 or B, K, Rc]`` plus the tilt / psi priors ``[B, 1, Rc]`` of a global search
        (:mod:`cryopipe.engine.tomo_priors`; local searches keep their own Gaussian, as RELION)."""
        pr = self.angle_priors
        if pr is None or not pr.active or self._src is None or self.sampling.sigma_ang > 0 or self.s.grad:
            return log_prior
        from cryopipe.engine.reference3d import symmetry_ops

        coarse = self._src.orientations.coarse.to(self.dev)
        current = np.asarray(self.state.angles[idx]) if pr.follow_current else None  # read before this batch
        lp = angle_log_prior(coarse, pr, idx, symmetry_ops(self.model.symmetry, self.dev), current)  # records them
        return log_prior.to(lp.device) + lp[:, None, :]

    def _translations(self) -> TranslationGrid:
        smp, s = self.sampling, self.s
        tc = translation_grid_3d(smp.offset_range, smp.offset_step, self.dev)
        if s.oversampling > 0:
            return TranslationGrid(tc, oversample_translations_3d(tc, smp.offset_step, s.oversampling))
        return TranslationGrid(tc, tc[:, None, :])

    # -------------------------------------------------------------------------------------- references
    def _greyscale(self, vols: torch.Tensor, idx: np.ndarray, sigma2: torch.Tensor) -> torch.Tensor:
        """Scale references so that their predictions times the data's ``C`` (``|Σc²|`` or ``c²``) at random
        orientations carry the particles' signal power (mean ``|X|²`` minus the noise ``2/inv``, i.e. ``2σ²M``
        or ``2σ²c²``), as the single-particle version. Data and references are measured on the same (at most
        100) particles of ``idx``, of every tilt series: 2D stacks come in batches of one tilt series each (their
        coefficient sets differ), and measuring the data of one tilt series against a noise spectrum of all of
        them made the scale a chance difference between tilt series (2D-stack references 10–20× brighter than the
        signal, first posteriors sharp on noise, issue 12)."""
        sub = np.asarray(idx[:min(idx.size, 100)])
        coeffs, noises = [], []
        ref_sum = torch.zeros(vols.shape[0], dtype=torch.float64)
        for b in self._batches(sub):  # one coefficient set per batch
            cset = self._set_for(b)
            batch = self._prepare(b, cset.size, sigma2, None)
            inv = batch.inv_sigma2.to(torch.float64)
            coeffs.append(batch.X)
            noises.append(torch.where(inv > 0, 2.0 / inv.clamp_min(1e-30), torch.zeros_like(inv)))
            rot = euler_to_matrix(*(torch.as_tensor(self.rng.uniform(0, 360, b.size)) for _ in range(3)))
            for k in range(vols.shape[0]):  # K classes
                refs = ClassReferences3D.from_volumes(vols[k][None] * self.mask3d, cset, cset.size,
                                                      self._grid_for_greyscale(), self.s.pad)
                Pv = refs.predict(0, rot.to(self.dev), cset.k) * batch.ctf.to(torch.complex64)
                ref_sum[k] += float((Pv.real.square() + Pv.imag.square())[:, 1:].sum())
        width = max(x.shape[1] for x in coeffs)  # batches of other coefficient sets: padded with zeros
        X = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in coeffs])
        noise = torch.cat([torch.nn.functional.pad(q, (0, width - q.shape[1])) for q in noises])
        data_pow = signal_power(X, noise)
        ref_pow = ref_sum / max(sub.size, 1)
        return torch.stack([vols[k] * (math.sqrt(data_pow / float(ref_pow[k])) if ref_pow[k] > 0 else 1.0)
                            for k in range(vols.shape[0])])

    def _same_set(self, idx: np.ndarray) -> np.ndarray:
        """Boolean mask of the particles of ``idx`` that share the first one's coefficient set (all, here)."""
        return np.ones(len(idx), dtype=bool)

    def _grid_for_greyscale(self):
        from cryopipe.engine.orientations3d import healpix_orientations

        return healpix_orientations(0, device=self.dev)

    def _accuracies(self, refs_models: list[ClassReferences3D], cset) -> None:
        """RELION ``calculateExpectedAngularErrors`` for volumes: for a few particles at their orientations, the
        smallest rotation (about two axes) and 3D shift whose difference power ``Σ C3²|F − F_δ|²/(2σ²M)`` exceeds
        ``−ln(0.01)``; the mean over (at most 10) particles, the sums over every ``stride``-th coefficient."""
        from cryopipe.engine.accuracy import THRESHOLD, first_crossing, trial_angles, trial_rotations, trial_shifts
        from cryopipe.engine.estep import shift_phases

        m, dev, p = self.model, self.dev, self.p
        K = m.n_classes
        idx = np.sort(self.rng.choice(p.size, size=min(self.s.n_accuracy_particles, p.size, 10), replace=False))
        idx = idx[self._same_set(idx)]
        I = idx.size
        full = self._set_for(idx)
        cset = full.prefix(cset.r_max)
        batch = self._prepare(idx, cset.size, m.sigma2_noise, None)
        w = (batch.ctf.square() * batch.inv_sigma2).to(torch.float32)  # [I, P]
        w[:, 0] = 0.0
        # a volume has ~n/2 times the coefficients of an image: score every stride-th one, times stride (the
        # sums are over thousands of coefficients per shell, so the estimate barely changes)
        stride = max(1, cset.size // 3000)
        w = w[:, ::stride] * float(stride)
        ang = trial_angles(30.0, dev, ratio=1.1).to(torch.float64)
        shifts = trial_shifts(min(self.n / 4.0, 10.0), dev)
        J = ang.numel()
        A = torch.as_tensor(self.state.angles[idx], dtype=torch.float64, device=dev)
        A0 = euler_to_matrix(A[:, 0], A[:, 1], A[:, 2])
        Rz, Rx = trial_rotations(ang)  # in-plane, out of plane
        kk = cset.k.to(dev)[::stride]
        acc_rot = torch.zeros(K, dtype=torch.float64)
        acc_trans = torch.zeros(K, dtype=torch.float64)
        for k in range(K):  # K classes
            if float(m.pdf_class[k]) <= 0:
                acc_rot[k], acc_trans[k] = 999.0, 999.0
                continue
            ref = refs_models[0]
            F0 = ref.predict(k, A0, kk)
            rots = []
            for Rt in (Rz, Rx):  # two rotation axes
                Fr = ref.predict(k, (Rt[None] @ A0[:, None]).reshape(I * J, 3, 3), kk).reshape(I, J, -1)
                score = 0.5 * ((Fr - F0[:, None]).abs().square() * w[:, None, :]).sum(-1)
                rots.append(first_crossing(score, ang, THRESHOLD))
            acc_rot[k] = float(torch.stack(rots).mean())
            tr = []
            for d in torch.eye(3, device=dev):  # x, y, z
                ph = shift_phases(kk, shifts[:, None] * d[None], self.n)
                score = 0.5 * ((F0.abs().square()[:, None, :] * (1.0 - ph[None]).abs().square()) * w[:, None, :]).sum(-1)
                tr.append(first_crossing(score, shifts, THRESHOLD))
            acc_trans[k] = float(torch.stack(tr).mean()) * m.pixel_size
        m.acc_rot, m.acc_trans = acc_rot, acc_trans



class StackOptimiser3D(SubtomoOptimiser3D):
    """:class:`Optimiser3D` on RELION 5's 2D stacks: each particle is its visible tilt images, premultiplied by
    ``c = −CTF·W`` (:func:`cryopipe.engine.tomo_batch.prepare_stack_batch`: ``X = c·I``, ``C = c²``, RELION's
    premultiplied model and M-step sums; one coefficient vector per particle with 3D frequencies
    ``k₃ = R_fᵀ(kx, ky, 0)``, the prediction of tilt ``f`` the central slice at ``R_f·A``, the log-likelihood
    summed over the tilts, 3D origins projected into every tilt by the phases).

    ``stacks`` (:class:`cryopipe.tomo.subtomo_set.TiltStacks`-like) gives ``ts_index [N]``, ``rotations`` (per
    tilt series ``[F, 3, 3]``), ``read(idx) → (ft [B, F, n, n//2+1], visible [B, F])`` and ``ctf(idx) → c`` of
    particles of ONE tilt series. Orientations and origins are in the tomogram frame (``A_sub·A_particle``,
    ``A_sub·origin``; the caller converts); batches never mix tilt series (their coefficient sets differ), and
    the predictions of a global search are made once per tilt series and iteration. RELION's premultiplied
    likelihood: ``X = c·I`` against ``c²·V̂(Aᵀk₃)`` with ``1/σ²`` the noise of the premultiplied images (the
    stored images are real-space crops of the premultiplied ones, so they are not exactly ``c·I`` and dividing
    by ``c²`` would blow up their residuals near CTF zeros); the noise spectrum counts the visible tilts'
    coefficients."""

    def __init__(self, particles, settings, stacks, **kw):
        super().__init__(particles, settings, weights=None, **kw)
        from cryopipe.engine.coefficients import coefficient_set

        self.stacks = stacks
        self.full = coefficient_set(self.n, self.n // 2, device=self.dev)  # the 2D set of one tilt image
        self._stack_sets: dict[int, object] = {}
        self._views: dict = {}
        self._radii = (self.n // 2, self.n // 2)

    def _set_for(self, idx: np.ndarray):
        from cryopipe.engine.coefficients import stack_coefficient_set

        ts = int(self.stacks.ts_index[int(np.asarray(idx)[0])])
        if ts not in self._stack_sets:
            self._stack_sets[ts] = stack_coefficient_set(self.full, self.stacks.rotations[ts].to(self.dev))
        return self._stack_sets[ts]

    def _same_set(self, idx: np.ndarray) -> np.ndarray:
        ts = self.stacks.ts_index[np.asarray(idx)]
        return ts == ts[0]

    def _batches(self, idx: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
        """Batches of at most ``batch_size`` particles, never mixing tilt series (input order kept within one)."""
        idx = np.asarray(idx)
        ts = self.stacks.ts_index[idx]
        out = []
        for t in np.unique(ts):  # a handful of tilt series
            out += super()._batches(idx[ts == t], batch_size)
        return out

    def _seen(self, idx: np.ndarray, stack) -> torch.Tensor:
        """``[B, Pfull]`` float64 1 where the coefficient's tilt is visible for the particle, else 0."""
        _, visible = self.stacks.read(idx, data=False)
        seen = torch.as_tensor(visible, device=self.dev)[:, stack.flat // (self.n * (self.n // 2 + 1))]
        return seen.to(torch.float64)

    def _noise_counts(self, idx: np.ndarray) -> torch.Tensor:
        """``[B, n//2+1]`` number of coefficients per shell over the particle's visible tilts."""
        stack = self._set_for(idx)
        return stack.shell_sum(self._seen(idx, stack), self.n // 2 + 1)

    def _noise_unit(self) -> float:
        return 1.0

    def _ctf2_counts(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, n//2+1] Σ c², [B, n//2+1] count)`` per shell over the visible tilts' coefficients of particles
        ``idx`` (one tilt series): RELION's ``sumw_ctf2`` (``Fctf = CTF²`` of every tilt image, dose-weighted)
        and its denominator ``sumw_group·Npix_per_shell`` (one weight per image, so the images' coefficients)."""
        stack = self._set_for(idx)
        seen = self._seen(idx, stack)
        c = stack.gather(torch.as_tensor(self.stacks.ctf(idx), device=self.dev).to(torch.float64))
        ns = self.n // 2 + 1
        return stack.shell_sum(seen * c * c, ns), stack.shell_sum(seen, ns)

    def _prepare(self, idx: np.ndarray, P: int, sigma2: torch.Tensor, log_prior: torch.Tensor | None):
        from cryopipe.engine.tomo_batch import prepare_stack_batch

        m = self.model
        K = m.n_classes if m is not None else 1
        stack = self._set_for(idx)
        ft, visible = self.stacks.read(idx)
        c = self.stacks.ctf(idx)
        s2 = sigma2.to(self.dev, torch.float64)
        og = int(self.p.optics_group[int(np.asarray(idx)[0])])
        s2 = s2[og] if s2.dim() == 2 else s2
        origin = torch.as_tensor(self.state.origin[idx], dtype=torch.float64, device=self.dev)
        # RELION's premultiplied model: X = c·I against c²·V̂ with the noise of the premultiplied images
        return prepare_stack_batch(torch.as_tensor(ft, device=self.dev), torch.as_tensor(c, device=self.dev),
                                   torch.as_tensor(visible, device=self.dev), stack, P, s2, origins=origin,
                                   log_prior_orient=log_prior, n_classes=K)

    def _coefficient_sets(self, final: bool):
        cset, Pc, r_cur = super()._coefficient_sets(final)
        r_coarse = int(self.full.shell[max(Pc, 1) - 1])
        self._radii = (r_cur, r_coarse)
        self._views = {}
        return cset, Pc, r_cur

    def _batch_source(self, src, est, idx: np.ndarray, P: int):
        from dataclasses import replace

        self._src = src
        r_cur, r_coarse = self._radii
        stack = self._set_for(idx)
        ts = int(self.stacks.ts_index[int(idx[0])])
        Pb, Pcb = stack.count_upto(r_cur), stack.count_upto(r_coarse)
        key = (id(src), ts)
        view = self._views.get(key)
        if view is None:
            view = src.with_orientations(src.orientations, cset=stack.prefix(r_cur), coarse_size=Pcb)
            if src.orientations.n_coarse > 0 and not self.sampling.sigma_ang > 0:
                self._views[key] = view  # global search: the tilt series' predictions serve all its batches
        return view, replace(est, k=view.cset.k, shell=view.cset.shell, coarse_size=Pcb,
                             compute_corrections=True), Pb

    def _batch_inputs(self, idx: np.ndarray, P: int, log_prior: torch.Tensor, gen: torch.Generator):
        self._ensure_npix()
        self.memory.start()
        grp = torch.as_tensor(self.p.group[idx], device=self.dev)
        log_prior = self._with_angle_priors(idx, log_prior)
        return self._prepare(idx, P, self.model.sigma2_noise, log_prior), grp, None
