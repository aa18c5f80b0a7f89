"""The unit of work of a 2D classification iteration, as a pure function (issue 15 item 1).

``class2d_step(particles, snapshot, rows)`` runs the E-step on the particles ``rows.index`` (in batches of
``settings.batch_size``) against a frozen :class:`Class2DSnapshot` of the model, and returns their additive
statistics (:class:`~cryopipe.engine.classify2d.Stats2D`, one per pseudo-half in gradient mode) and their new
per-particle assignments (:class:`Assignments2D`). It reads the images itself through ``particles.load`` (an
``ImageReader`` holds file paths, so a worker on shared storage reads its own particles), mutates nothing it is
given, and draws its random numbers from per-particle seeds (:mod:`cryopipe.engine.seeds`): the statistics of a
union of chunks equal the sum of the chunks' statistics whatever the chunking (up to float summation order), which
is what lets :class:`~cryopipe.engine.classify2d.Optimiser2D` run the chunks in-process or on Dask workers and
reduce them in a fixed order.

Units: pixels; angles in degrees; FT/n² coefficient vectors as in :mod:`cryopipe.engine.batch`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields, is_dataclass, replace

import numpy as np
import torch

from cryopipe.engine.backend import CachedSnapshot
from cryopipe.engine.batch import prepare_batch
from cryopipe.engine.coefficients import coefficient_set
from cryopipe.engine.estep import EStepSettings, TranslationGrid, expectation
from cryopipe.engine.reference2d import ClassReferences2D
from cryopipe.engine.seeds import NOISE_FILL, particle_seeds
from cryopipe.engine.stream import ParticleSet, ParticleStream, add_particle_result

__all__ = ["Class2DSnapshot", "ParticleRows2D", "Assignments2D", "Class2DPartial", "class2d_step",
           "to_device"]


def to_device(obj, device: torch.device):
    """A copy of a (nested) dataclass / tuple / list with every tensor on ``device`` (``obj`` itself when nothing
    moves)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in fields(obj):
            if not f.init:
                continue
            v = getattr(obj, f.name)
            w = to_device(v, device)
            if w is not v:
                changes[f.name] = w
        return replace(obj, **changes) if changes else obj
    if isinstance(obj, (tuple, list)):
        out = [to_device(v, device) for v in obj]
        return obj if all(a is b for a, b in zip(out, obj)) else type(obj)(out)
    return obj


@dataclass
class Class2DSnapshot(CachedSnapshot):
    """The frozen model of one iteration: everything a batch needs, picklable (sent once per iteration).

    Attributes:
        settings: the run's :class:`~cryopipe.engine.classify2d.Class2DSettings`.
        iteration: 1-based iteration (enters the per-particle seeds).
        refs: ``[K, n, n]`` class averages (real space) the predictions are made from.
        r_cur: radius (Fourier pixels) of the iteration's coefficient set; ``coarse_size``: coefficients of the
            coarse pass.
        coarse_psi: ``[Rc]`` coarse in-plane angles (degrees); ``fine_psi``: ``[Rc, S]`` or None (one pass).
        trans: translation grid; est: E-step settings.
        log_pdf: ``[K]`` log class priors (−inf: inactive); sigma2_noise: ``[G, n//2+1]``.
        scale_correction: ``[n_groups]`` (used with ``--scale``); avg_norm_correction: ``--norm`` average.
        prior_offset: ``[K, 2]`` class offset priors (pixels).
        seed_class: ``[N]`` first-iteration class seeds of every particle, or None.
        halves: gradient mode's pseudo-halves by particle-index parity (two statistics objects).
        n_groups: scale-correction groups; n_optics_groups: G.
    """

    settings: object
    iteration: int
    refs: torch.Tensor
    r_cur: int
    coarse_size: int
    coarse_psi: torch.Tensor
    fine_psi: torch.Tensor | None
    trans: TranslationGrid
    est: EStepSettings
    log_pdf: torch.Tensor
    sigma2_noise: torch.Tensor
    scale_correction: torch.Tensor | None
    avg_norm_correction: float
    prior_offset: torch.Tensor
    seed_class: np.ndarray | None
    halves: bool
    n_groups: int
    n_optics_groups: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(self.refs.shape[-1])

    @property
    def n_classes(self) -> int:
        return int(self.refs.shape[0])

    def final_psi(self, device=None) -> torch.Tensor:
        """``[Rf]`` angles of the final grid (fine if two passes, else coarse)."""
        psi = self.coarse_psi if self.fine_psi is None else self.fine_psi.reshape(-1)
        return psi if device is None else psi.to(device)

    def references(self, device: torch.device) -> tuple[ClassReferences2D, EStepSettings, TranslationGrid]:
        """Predictions, E-step settings and translations on ``device``, built once per snapshot and device (a
        worker that holds the snapshot builds them for its first chunk only)."""
        def build():
            cset = coefficient_set(self.n, self.n // 2, device=device).prefix(self.r_cur)
            src = ClassReferences2D(self.refs.to(device), cset, self.coarse_size, self.coarse_psi.to(device),
                                    None if self.fine_psi is None else self.fine_psi.to(device),
                                    pad=self.settings.pad)
            return src, to_device(self.est, device), to_device(self.trans, device)
        return self.cached(str(device), build)

    def preset_references(self, src: ClassReferences2D, device: torch.device) -> None:
        """Use predictions already built for this iteration (the in-process path; saves building them twice)."""
        with self._lock:
            self._cache[str(device)] = (src, to_device(self.est, device), to_device(self.trans, device))


@dataclass
class ParticleRows2D:
    """Per-particle inputs of one chunk (``[B]`` numpy): ``index`` (0-based rows of the particle table),
    ``origin [B, 2]`` (pixels), ``norm`` (current norm corrections)."""

    index: np.ndarray
    origin: np.ndarray
    norm: np.ndarray


@dataclass
class Assignments2D:
    """Per-particle results of one chunk (``[B]`` numpy, rows as ``ParticleRows2D.index``): ψ (degrees, [0, 360)),
    new origin ``[B, 2]`` (pixels), best class (0-based), max posterior, number of significant samples,
    log-likelihood contribution, new norm correction (the input's without ``--norm``)."""

    index: np.ndarray
    psi: np.ndarray
    origin: np.ndarray
    klass: np.ndarray
    pmax: np.ndarray
    nsig: np.ndarray
    loglik: np.ndarray
    norm: np.ndarray


@dataclass
class Class2DPartial:
    """What a chunk returns: additive statistics (one per pseudo-half in gradient mode, else one) and the
    per-particle assignments."""

    stats: list
    assignments: Assignments2D


class _Reader(ParticleStream):
    """The stream mixin bound to a particle set, settings and device (images and CTFs of index batches)."""

    def __init__(self, particles: ParticleSet, settings, device: torch.device):
        self.p, self.s, self.dev, self.n = particles, settings, device, particles.n


def class2d_step(particles: ParticleSet, snap: Class2DSnapshot, rows: ParticleRows2D,
                 device: torch.device | str | None = None, mask: torch.Tensor | None = None,
                 into: list | None = None) -> Class2DPartial:
    """E-step of the particles ``rows`` against ``snap`` (module docstring); pure unless ``into`` is given.

    Args:
        particles: how to read the images (``load`` on file paths), CTF parameters, groups.
        device: where to compute (default: CPU); the returned statistics live there.
        mask: ``[n, n]`` soft particle mask (default: the one the settings define).
        into: statistics objects to add to in place (the in-process loop, one accumulator for all batches);
            None: fresh zeros (the distributed path).
    """
    from cryopipe.core.masks import soft_circular_mask
    from cryopipe.engine.classify2d import Stats2D

    dev = torch.device(device) if device is not None else torch.device("cpu")
    s, n, K = snap.settings, snap.n, snap.n_classes
    src, est, trans = snap.references(dev)
    if mask is None:
        diam = s.particle_diameter if s.particle_diameter > 0 else 0.8 * n * particles.pixel_size
        mask = soft_circular_mask(n, diam / (2.0 * particles.pixel_size), s.width_mask_edge, device=dev)
    mask = mask.to(dev)
    reader = _Reader(particles, s, dev)
    full = coefficient_set(n, n // 2, device=dev)
    P = src.cset.size
    final_psi = snap.final_psi(dev)
    Rf = int(final_psi.numel())
    So = Rf // int(snap.coarse_psi.numel())
    ns = n // 2 + 1
    H = 2 if snap.halves else 1
    stats = into if into is not None else [Stats2D.zeros(K, Rf, P, snap.n_optics_groups, ns, snap.n_groups, dev)
                                           for _ in range(H)]
    B = int(rows.index.size)
    out = Assignments2D(rows.index.copy(), np.zeros(B), rows.origin.astype(float).copy(), np.full(B, -1, np.int64),
                        np.zeros(B), np.zeros(B, np.int64), np.zeros(B), rows.norm.astype(float).copy())
    log_prior = snap.log_pdf.to(dev, torch.float32)[None, :, None]
    prior = snap.prior_offset.to(dev, torch.float32)
    scale_all = snap.scale_correction.to(dev) if s.do_scale and snap.scale_correction is not None else None
    sigma2 = snap.sigma2_noise.to(dev)
    bs = max(1, int(s.batch_size))
    for start in range(0, B, bs):
        pos = np.arange(start, min(start + bs, B))
        groups = [pos[rows.index[pos] % 2 == h] for h in (0, 1)] if snap.halves else [pos]
        for st, sel in zip(stats, groups):
            if sel.size == 0:
                continue
            idx = rows.index[sel]
            og = torch.as_tensor(particles.optics_group[idx], device=dev)
            grp = torch.as_tensor(particles.group[idx], device=dev)
            scale = scale_all[grp] if scale_all is not None else None
            # RELION shifts each image by its old offset rounded to whole pixels and adds the new translation to
            # that rounded offset (the fraction is dropped), with its offset prior (relion_offset_prior)
            old_origin = np.floor(rows.origin[sel] + 0.5) if s.relion_offset_prior else rows.origin[sel]
            origin = torch.as_tensor(old_origin, dtype=torch.float32, device=dev)
            normf = None
            if s.do_norm:
                normf = torch.as_tensor(snap.avg_norm_correction / np.maximum(rows.norm[sel], 1e-6),
                                        dtype=torch.float32, device=dev)
            allowed = None
            if snap.seed_class is not None:
                allowed = torch.as_tensor(snap.seed_class[idx], device=dev)
            batch = prepare_batch(reader._images(idx), full, P, sigma2, og, origins=origin, norm_factor=normf,
                                  ctf=reader._ctf(idx, scale), mask=mask, zero_mask=s.zero_mask,
                                  prior_centre=prior[None, :, :] - origin[:, None, :], log_prior_orient=log_prior,
                                  n_classes=K, allowed_class=allowed,
                                  noise_seeds=particle_seeds(s.random_seed, snap.iteration, idx, NOISE_FILL),
                                  keep_unmasked=s.unmasked_reconstruction)
            if s.relion_offset_prior:
                batch.prior_centre_estep = prior[None, :, :] - origin[:, None, :] / float(particles.pixel_size)
            res = expectation(batch, src, trans, est)
            two_pass = res.extra.get("two_pass", True)
            f = res.sample_coarse * So + res.sample_child if two_pass else res.sample_coarse
            rows_kf = res.sample_class * Rf + f
            st.S.view(K * Rf, P).index_add_(0, rows_kf, res.S)
            st.W.view(K * Rf, P).index_add_(0, rows_kf, res.W)
            o64 = torch.as_tensor(old_origin, dtype=torch.float64, device=dev)
            st.wsum_offset += (res.wsum_class_per_image.to(torch.float64)[:, :, None] * o64[:, None, :]
                               + res.wsum_offset_rel.to(torch.float64)).sum(dim=0)
            add_particle_result(st, res, grp, scale)
            psi_grid = final_psi if two_pass else snap.coarse_psi.to(dev)
            best_f = res.best_coarse * So + res.best_child if two_pass else res.best_coarse
            out.psi[sel] = psi_grid[best_f].cpu().numpy().astype(float) % 360.0
            out.origin[sel] = old_origin + res.best_offset.cpu().numpy().astype(float)
            out.klass[sel] = res.best_class.cpu().numpy()
            out.pmax[sel] = res.pmax.cpu().numpy()
            out.nsig[sel] = res.n_significant.cpu().numpy()
            out.loglik[sel] = res.loglik.cpu().numpy()
            if s.do_norm:
                new = (rows.norm[sel] / snap.avg_norm_correction) * np.sqrt(2.0 * res.norm_residual.cpu().numpy())
                out.norm[sel] = new
                st.wsum_norm += float(new.sum())
    return Class2DPartial(stats, out)
