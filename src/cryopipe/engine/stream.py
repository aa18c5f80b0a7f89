"""Particle streaming shared by the engine's optimisers (2D classification, 3D initial model, 3D refinement).

:class:`ParticleSet` says how to read images and their CTFs; :class:`ParticleStream` is the mixin that turns
particle indices into device tensors in batches (images, CTF times the group scale); :class:`ParticleSums` is the
additive per-particle part of the M-step statistics (noise spectra, offsets, norm and scale corrections, class
weights, log-likelihood) that every optimiser needs besides its reference sums, and :func:`update_particle_model`
applies RELION's updates from them. :func:`initial_noise_spectra` is RELION's start: per optics group the mean
power spectrum of the (masked) images minus the power spectrum of their mean.

Units: pixels, FT/n² (RELION's normalisation), spectra per real/imaginary component.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import irfft2_centered, phase_shift_2d, rfft2_centered
from cryopipe.engine.batch import mask_images
from cryopipe.engine.coefficients import CoefficientSet
from cryopipe.engine.mstep import noise_spectrum
from cryopipe.engine.seeds import NOISE_FILL_INITIAL, particle_seeds

__all__ = ["GRAD_MODEL_MOMENTUM", "ParticleSet", "ParticleStream", "ParticleSums", "add_particle_result",
           "update_particle_model", "initial_noise_spectra",
           "repair_negative_spectra"]


@dataclass
class ParticleSet:
    """The particles: how to read them, their CTFs and groups.

    Attributes:
        n: box size (pixels); pixel_size: Å.
        load: ``indices [B] -> [B, n, n] float32`` images (numpy; e.g. ``ImageReader.read``).
        ctf: per-particle CTF parameters (``cryopipe.io.particles.ctf_parameters`` keys: defocus_u, defocus_v,
            defocus_angle, voltage, cs, amplitude_contrast, phase_shift, bfactor, scale), or None.
        optics_group: ``[N]`` 0-based; group: ``[N]`` 0-based scale-correction groups (rlnGroupNumber − 1).
        group_names: the name of each group (rlnGroupName in ``data_model_groups``: micrograph names), or None.
    """

    n: int
    pixel_size: float
    load: Callable[[np.ndarray], np.ndarray]
    ctf: dict[str, np.ndarray] | None
    optics_group: np.ndarray
    group: np.ndarray
    group_names: list[str] | None = None

    @property
    def size(self) -> int:
        return int(len(self.optics_group))

    @property
    def n_optics_groups(self) -> int:
        return int(self.optics_group.max()) + 1 if self.size else 1

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if self.size else 1


class ParticleStream:
    """Mixin: batches of particle indices → device tensors. Needs ``self.p`` (:class:`ParticleSet`), ``self.s``
    (settings with ``batch_size``, ``do_ctf``, ``ctf_intact_first_peak``), ``self.dev`` and ``self.n``."""

    def _batches(self, idx: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
        bs = max(1, int(self.s.batch_size if batch_size is None else batch_size))
        return [idx[i:i + bs] for i in range(0, idx.size, bs)]

    def _images(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.p.load(idx), dtype=np.float32)).to(self.dev)

    def _ctf(self, idx: np.ndarray, scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[B, n, n//2+1]`` CTFs (times ``scale [B]``), or None without CTF correction and scale."""
        if not self.s.do_ctf or self.p.ctf is None:
            if scale is None:
                return None
            return scale.to(self.dev, torch.float32)[:, None, None].expand(idx.size, self.n, self.n // 2 + 1)
        c = {k: torch.as_tensor(np.asarray(v)[idx], dtype=torch.float64, device=self.dev)
             for k, v in self.p.ctf.items()}
        out = ctf_2d(self.n, self.p.pixel_size, c["defocus_u"], c["defocus_v"], c["defocus_angle"],
                     voltage=c["voltage"], cs=c["cs"], amplitude_contrast=c["amplitude_contrast"],
                     phase_shift=c["phase_shift"], bfactor=c["bfactor"], scale=c["scale"],
                     intact_until_first_peak=self.s.ctf_intact_first_peak)
        if scale is not None:
            out = out * scale.to(out.device, out.dtype)[:, None, None]
        return out


@dataclass
class ParticleSums:
    """Additive per-particle statistics of one iteration (float64); ``add`` of two equals the union."""

    wsum_class: torch.Tensor  # [K]
    wsum_sigma2_offset: torch.Tensor  # scalar, pixels²
    wsum_sigma2_noise: torch.Tensor  # [G, ns]
    sumw_group: torch.Tensor  # [G]
    wsum_norm: torch.Tensor  # scalar
    scale_xa: torch.Tensor  # [n_groups]
    scale_aa: torch.Tensor  # [n_groups]
    loglik: torch.Tensor  # scalar
    pmax: torch.Tensor  # scalar
    count: torch.Tensor  # scalar

    @classmethod
    def zeros(cls, K: int, G: int, ns: int, n_groups: int, device) -> ParticleSums:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(K), z(()), z(G, ns), z(G), z(()), z(n_groups), z(n_groups), z(()), z(()), z(()))

    def add(self, other: ParticleSums) -> ParticleSums:
        for name in self.__dataclass_fields__:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        return self

    def add_result(self, res, group: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Add an E-step ``BatchResult`` (``group [B]`` scale groups; ``scale [B]`` current group scales)."""
        add_particle_result(self, res, group, scale)


def add_particle_result(sums, res, group: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Add the per-particle statistics of an E-step ``BatchResult`` to ``sums`` (a :class:`ParticleSums` or any
    statistics object with its fields, e.g. 2D's ``Stats2D``), in place."""
    sums.wsum_class += res.wsum_class.to(torch.float64)
    sums.wsum_sigma2_offset += res.wsum_sigma2_offset
    sums.wsum_sigma2_noise += res.wsum_sigma2_noise
    sums.sumw_group += res.sumw_group
    sums.loglik += res.loglik.to(torch.float64).sum()
    sums.pmax += res.pmax.to(torch.float64).sum()
    sums.count += float(res.pmax.numel())
    if scale is not None:
        sums.scale_xa.index_add_(0, group, res.scale_xa / scale)
        sums.scale_aa.index_add_(0, group, res.scale_aa / scale.square())


#: RELION ``--mu``: gradient runs on mini-batches mix the noise spectra, class and offset priors, norm and scale
#: corrections of each mini-batch into the model with this momentum (0 when a batch is all particles)
GRAD_MODEL_MOMENTUM = 0.9

#: RELION ``--min_sigma2_offset`` (Å², default 2): the lower bound of the offset prior's variance after each update
#: (``MlOptimiser::maximizationOtherParameters``), in 2D and 3D, EM and gradient runs alike
MIN_SIGMA2_OFFSET_A2 = 2.0


def update_particle_model(model, sums: ParticleSums, npix: torch.Tensor, *, do_norm: bool, do_scale: bool,
                          offset_dim: int = 2, momentum: float = 0.0) -> None:
    """RELION's updates of the particle-level model fields from :class:`ParticleSums` (in place on ``model``:
    ``sigma2_noise``, ``sigma2_offset`` (``Σw|Δo|²/(D·Σw)`` in pixels², at least RELION's
    :data:`MIN_SIGMA2_OFFSET_A2` / ``model.pixel_size``²), ``avg_norm_correction``, ``scale_correction``
    (clipped to [median/5, 5·median] and normalised to a particle-weighted mean of 1), ``LL``, ``ave_pmax``).

    ``momentum`` μ (RELION ``--mu``, used by gradient runs on mini-batches): each estimate enters as
    ``μ·old + (1 − μ)·new``, so one small mini-batch cannot swing the noise model; 0 replaces (EM)."""
    mu = float(momentum)

    def mix(old, new):
        return new if mu <= 0 or old is None else mu * old + (1.0 - mu) * new

    sum_w = float(sums.wsum_class.sum())
    if sum_w > 0:
        sigma2 = float(mix(model.sigma2_offset, float(sums.wsum_sigma2_offset) / (offset_dim * sum_w)))
        apix = float(getattr(model, "pixel_size", 0.0) or 0.0)
        model.sigma2_offset = max(sigma2, MIN_SIGMA2_OFFSET_A2 / apix ** 2) if apix > 0 else sigma2
    new_noise = noise_spectrum(sums.wsum_sigma2_noise, sums.sumw_group, npix, previous=model.sigma2_noise)
    model.sigma2_noise = mix(model.sigma2_noise.to(new_noise.device, new_noise.dtype)
                             if model.sigma2_noise is not None else None, new_noise)
    if do_norm and float(sums.count) > 0:
        model.avg_norm_correction = float(mix(model.avg_norm_correction, float(sums.wsum_norm) / float(sums.count)))
    if do_scale:
        xa, aa = sums.scale_xa, sums.scale_aa
        sc = torch.where(aa > 0, xa / aa.clamp_min(1e-300), torch.ones_like(aa))
        med = torch.sort(sc).values[sc.numel() // 2]
        sc = sc.clamp(min=float(med) / 5.0, max=5.0 * float(med))
        cnt = model.group_counts.to(sc.device)
        sc = sc / ((cnt * sc).sum() / cnt.sum())
        model.scale_correction = mix(model.scale_correction.to(sc.device, sc.dtype), sc)
    model.LL = float(sums.loglik)
    model.ave_pmax = float(sums.pmax) / max(float(sums.count), 1.0)


def repair_negative_spectra(sigma2: torch.Tensor) -> torch.Tensor:
    """RELION's repair of negative noise-power values: take the shell below (or the next positive one)."""
    out = sigma2.clone()
    G, ns = out.shape
    for g in range(G):  # G spectra of ns values
        for i in range(ns):
            if out[g, i] < 0:
                pos = torch.nonzero(out[g, i:] > 0)
                out[g, i] = out[g, i - 1] if i > 0 and out[g, i - 1] > 0 else (
                    out[g, i + int(pos[0])] if pos.numel() else 1e-10)
    return out


def initial_noise_spectra(stream: ParticleStream, idx: np.ndarray, origins: np.ndarray, full: CoefficientSet,
                          mask: torch.Tensor, zero_mask: bool, batch_size: int = 256, seed: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma2 [G, n//2+1], mean_image [n, n])``: per optics group the mean power spectrum of the masked,
    centred images ``idx`` minus the power spectrum of their mean (RELION
    ``calculateSumOfPowerSpectraAndAverageImage`` / ``setSigmaNoiseEstimatesAndSetAverageImage``): ``σ² = ⟨|X|²⟩/2 −
    |⟨X⟩|²/2`` per shell (FT/n²), negative
    values repaired; ``mean_image`` is the average masked image (real space). The background noise fill (without
    ``zero_mask``) is seeded per particle from ``seed`` (iteration 0)."""
    p, dev, n = stream.p, stream.dev, stream.n
    G = p.n_optics_groups
    ns = n // 2 + 1
    npix = full.shell_counts(ns).to(dev)
    pow_sum = torch.zeros(G, ns, dtype=torch.float64, device=dev)
    img_sum = torch.zeros(n, n, dtype=torch.float64, device=dev)
    nimg = torch.zeros(G, dtype=torch.float64, device=dev)
    for b in stream._batches(np.asarray(idx), batch_size):
        imgs = stream._images(b)
        ft = phase_shift_2d(rfft2_centered(imgs), torch.as_tensor(origins[b], dtype=torch.float32, device=dev), n)
        im = mask_images(irfft2_centered(ft, n), mask, zero_mask,
                         noise_seeds=particle_seeds(seed, 0, b, NOISE_FILL_INITIAL))
        img_sum += im.sum(dim=0).to(torch.float64)
        X = full.gather(rfft2_centered(im)) / float(n * n)
        pw = (X.real.square() + X.imag.square()).to(torch.float64)
        per = torch.zeros(b.size, ns, dtype=torch.float64, device=dev).index_add_(1, full.shell, pw)
        og = torch.as_tensor(p.optics_group[b], device=dev)
        pow_sum.index_add_(0, og, per / npix[None])
        nimg.index_add_(0, og, torch.ones(b.size, dtype=torch.float64, device=dev))
    avg = (img_sum / max(1, len(idx))).to(torch.float32)
    A = full.gather(torch.fft.rfft2(torch.fft.ifftshift(avg))) / float(n * n)
    pa = torch.zeros(ns, dtype=torch.float64, device=dev).index_add_(
        0, full.shell, (A.real.square() + A.imag.square()).to(torch.float64)) / npix
    sigma2 = pow_sum / (2.0 * nimg.clamp_min(1)[:, None]) - pa[None] / 2.0
    return repair_negative_spectra(sigma2), avg
