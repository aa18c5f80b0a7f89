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
  shell replaces the pixel count; it is a property of the data, computed once);
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
from cryopipe.engine.optimiser3d import Optimiser3D, ParticleState3D
from cryopipe.engine.reference3d import ClassReferences3D
from cryopipe.engine.stream import repair_negative_spectra
from cryopipe.engine.subtomo_batch import multiplicity_per_shell, prepare_subtomo_batch, split_subtomo_weights

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

    # -------------------------------------------------------------------------------------- data
    def _volumes(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.p.load(idx), dtype=np.float32)).to(self.dev)

    def _weights(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.ascontiguousarray(self.weights(idx), dtype=np.float32)).to(self.dev)
        return split_subtomo_weights(w)

    def _ensure_npix(self) -> None:
        """Mean over all particles of ``Σ M`` per shell: with ``sumw_group`` (the particle count) it makes the
        engine's noise update RELION's ``Σ resid / (2·Σ M)``."""
        if self.npix is not None:
            return
        ns = self.n // 2 + 1
        tot = torch.zeros(ns, dtype=torch.float64, device=self.dev)
        for b in self._batches(np.arange(self.p.size)):
            _, M = self._weights(b)
            tot += multiplicity_per_shell(M, self.full, ns).sum(dim=0)
        self.npix = (tot / max(1, self.p.size)).clamp_min(1e-12)

    def _initial_noise(self, idx: np.ndarray) -> torch.Tensor:
        """Per optics group ``(Σ_b |X_b|² − N·|X̄|²) / (2·Σ_b M_b)`` per shell over the masked, centred volumes
        ``idx`` (RELION's initial estimate with the subtomogram normalisation), negative values repaired."""
        self._ensure_npix()
        p, dev, n = self.p, self.dev, self.n
        G, ns = p.n_optics_groups, n // 2 + 1
        cset = self.full
        pow_sum = torch.zeros(G, ns, dtype=torch.float64, device=dev)
        m_sum = torch.zeros(G, ns, dtype=torch.float64, device=dev)
        x_sum = torch.zeros(cset.size, dtype=torch.complex128, device=dev)
        for b in self._batches(np.asarray(idx)):
            batch = self._prepare(b, cset.size, torch.ones(G, ns, dtype=torch.float64), None)
            X = batch.X.to(torch.complex128)
            og = torch.as_tensor(p.optics_group[b], device=dev)
            per = cset.shell_sum((X.real.square() + X.imag.square()), ns)
            pow_sum.index_add_(0, og, per)
            _, M = self._weights(b)
            m_sum.index_add_(0, og, multiplicity_per_shell(M, cset, ns))
            x_sum += X.sum(dim=0)
        mean = x_sum / max(1, len(idx))
        pm = cset.shell_sum((mean.real.square() + mean.imag.square())[None], ns)[0]
        sigma2 = (pow_sum - float(len(idx)) / G * pm[None]) / (2.0 * m_sum.clamp_min(1e-12))
        return repair_negative_spectra(sigma2)

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
        grp = torch.as_tensor(self.p.group[idx], device=self.dev)
        return self._prepare(idx, P, self.model.sigma2_noise, log_prior), grp, None

    def _translations(self) -> TranslationGrid:
        smp, s = self.sampling, self.s
        tc = translation_grid_3d(smp.offset_range, smp.offset_step, self.dev)
        if s.oversampling > 0:
            return TranslationGrid(tc, oversample_translations_3d(tc, smp.offset_step, s.oversampling))
        return TranslationGrid(tc, tc[:, None, :])

    # -------------------------------------------------------------------------------------- references
    def _greyscale(self, vols: torch.Tensor, idx: np.ndarray, sigma2: torch.Tensor) -> torch.Tensor:
        """Scale references so that ``|Σc²|·V̂(Aᵀk)`` at random orientations carries the volumes' signal power
        (mean ``|X|²`` minus the noise ``2σ²M``) inside the mask (as the single-particle version)."""
        sub = idx[:min(idx.size, 100)]
        cset = self.full
        batch = self._prepare(sub, cset.size, torch.ones_like(sigma2), None)
        X = batch.X
        _, M = self._weights(sub)
        Mc = cset.gather(M.to(torch.float64))
        og = torch.as_tensor(self.p.optics_group[sub], device=self.dev)
        noise = 2.0 * sigma2.to(self.dev)[og][:, cset.shell] * Mc
        noise[:, 0] = 0.0
        data_pow = float(((X.real.square() + X.imag.square()) - noise).clamp_min(0)[:, 1:].sum(dim=1).mean())
        out = []
        for k in range(vols.shape[0]):  # K classes
            refs = ClassReferences3D.from_volumes(vols[k][None] * self.mask3d, cset, cset.size,
                                                  self._grid_for_greyscale(), self.s.pad)
            rot = euler_to_matrix(*(torch.as_tensor(self.rng.uniform(0, 360, sub.size)) for _ in range(3)))
            Pv = refs.predict(0, rot.to(self.dev), cset.k) * batch.ctf.to(torch.complex64)
            ref_pow = float((Pv.real.square() + Pv.imag.square())[:, 1:].sum(dim=1).mean())
            scale = math.sqrt(data_pow / ref_pow) if ref_pow > 0 and data_pow > 0 else 1.0
            out.append(vols[k] * scale)
        return torch.stack(out)

    def _grid_for_greyscale(self):
        from cryopipe.engine.orientations3d import healpix_orientations

        return healpix_orientations(0, device=self.dev)

    def _accuracies(self, refs_models: list[ClassReferences3D], cset) -> None:
        """RELION ``calculateExpectedAngularErrors`` for volumes: for a few particles at their orientations, the
        smallest rotation (about two axes) and 3D shift whose difference power ``Σ C3²|F − F_δ|²/(2σ²M)`` exceeds
        ``−ln(0.01)``; the mean over (at most 10) particles, the sums over every ``stride``-th coefficient."""
        from cryopipe.engine.accuracy import THRESHOLD, first_crossing, trial_angles, trial_shifts
        from cryopipe.engine.estep import shift_phases

        m, dev, p = self.model, self.dev, self.p
        K = m.n_classes
        I = min(self.s.n_accuracy_particles, p.size, 10)
        idx = np.sort(self.rng.choice(p.size, size=I, replace=False))
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
        rad = torch.deg2rad(ang)
        cz, sz = torch.cos(rad), torch.sin(rad)
        one, zero = torch.ones_like(cz), torch.zeros_like(cz)
        Rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(J, 3, 3)
        Rx = torch.stack([one, zero, zero, zero, cz, -sz, zero, sz, cz], -1).reshape(J, 3, 3)
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

