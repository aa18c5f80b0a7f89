"""3D refinement on the shared engine: gold-standard auto-refine (RELION ``relion_refine --auto_refine
--split_random_halves``), 3D classification-style EM, and the gradient-driven (VDAM) de novo initial model.

One iteration (:meth:`Optimiser3D.iterate`):

1. coefficient sets of the iteration (current size = 2·(resolution shell + ``incr_size``), the whole box in the
   final iteration), a coarse prefix for the first pass (RELION ``updateImageSizeAndResolutionPointers``), the
   orientation grid (HEALPix order × ψ in the asymmetric unit of the symmetry, randomly perturbed, with adaptive
   oversampling children; :mod:`cryopipe.engine.orientations3d`) and the translation grid;
2. per model (the two half-sets are refined completely independently: their own references, their own
   back-projectors, their own particles, ``rlnRandomSubset``), stream the particles in batches: images → E-step
   (:func:`~cryopipe.engine.estep.expectation`: global grid, or a per-batch local window with a Gaussian prior
   around the previous orientation) → the per-sample sums are back-projected
   (:class:`~cryopipe.engine.reference3d.ClassBackProjectors`), the particle sums
   (:class:`~cryopipe.engine.stream.ParticleSums`) add up, and each particle's best pose is kept;
3. M-step: halves joined below ``low_resol_join_halves`` Å, gold-standard FSC, ``τ² = T·FSC/(1−FSC)·σ²_ref`` per
   half, Wiener reconstruction of each half with symmetry (:mod:`cryopipe.engine.reference3d`); or, in gradient
   mode, :class:`~cryopipe.engine.vdam.GradUpdate` on the padded Fourier grids with two pseudo-halves; solvent
   flattening; noise spectra, offset prior, norm/scale corrections; without half-sets ``data_vs_prior`` (hence
   the resolution) of CTF-premultiplied (tomographic) data has ``τ²`` times the average CTF² per shell (RELION
   ``setAverageCTF2``; :meth:`Optimiser3D._average_ctf2`, None for single particles);
4. resolution (RELION ``updateCurrentResolution``), expected accuracies (``calculateExpectedAngularErrors``),
   changes of the hidden variables, the auto-sampling update (HEALPix order + 1, offsets from the accuracies,
   local searches from ``auto_local_healpix_order``) and convergence; after convergence one last iteration joins
   the halves and uses all frequencies to Nyquist.

All statistics of a batch are additive (back-projector sums and :class:`ParticleSums`), so batches can be spread
over devices or workers. Memory: the coarse predictions ``[K, Rc, Pc]`` plus one batch (``batch_size`` images).
Angles in degrees (RELION ZYZ), offsets in pixels internally (Å in files).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cryopipe.core.fourier import lowpass_map
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.healpix import angular_step
from cryopipe.core.masks import soft_circular_mask, soft_spherical_mask
from cryopipe.core.projector import Projector
from cryopipe.engine.backend import InProcess
from cryopipe.engine.batch import prepare_batch
from cryopipe.engine.coefficients import CoefficientSet, coefficient_set
from cryopipe.engine.estep import BatchResult, EStepSettings, TranslationGrid, expectation
from cryopipe.engine.mstep import (
    current_resolution_shell,
    estimated_resolution_shell,
    resolution_per_A,
    total_fourier_coverage,
)
from cryopipe.engine.orientations3d import (
    healpix_orientations,
    local_batch_order,
    local_orientations,
    proper_symmetry_operators,
)
from cryopipe.engine.reference3d import (
    ClassBackProjectors,
    ClassReferences3D,
    _grid_radius,
    fsc_tau2,
    halfset_fsc,
    join_halves_at_low_resolution,
    ssnr_3d,
)
from cryopipe.engine.sampling import coarse_image_size, oversample_translations, translation_grid
from cryopipe.engine.seeds import NOISE_FILL, particle_seeds
from cryopipe.engine.stream import GRAD_MODEL_MOMENTUM, ParticleSet, ParticleStream, ParticleSums, \
    initial_noise_spectra, update_particle_model
from cryopipe.errors import CryopipeError

__all__ = ["Refine3DSettings", "ParticleState3D", "Model3D", "AutoSampling", "IterationReport3D", "Optimiser3D",
           "gold_standard_resolution_shell", "random_blob_volume"]


# ------------------------------------------------------------------------------------------------------------
# containers
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Refine3DSettings:
    """Options (RELION option names in brackets; pixels unless stated)."""

    n_classes: int = 1  # --K
    n_iter: int = 50  # --iter (auto-refine: upper bound; gradient mode: number of mini-batch iterations)
    tau2_fudge: float = 1.0  # --tau2_fudge
    particle_diameter: float = -1.0  # --particle_diameter (Å); <= 0: 0.8 × box
    do_ctf: bool = True  # --ctf
    ctf_intact_first_peak: bool = False  # --ctf_intact_first_peak
    zero_mask: bool = True  # --zero_mask
    flatten_solvent: bool = True  # --flatten_solvent
    non_negative: bool = False  # initial model: clip negative density (non-negative solvent)
    symmetry: str = "C1"  # --sym
    healpix_order: int = 2  # --healpix_order (initial; 2 = 7.5°)
    offset_range: float = 5.0  # --offset_range
    offset_step: float = 1.0  # --offset_step (before oversampling)
    oversampling: int = 1  # --oversampling
    perturb: float = 0.5  # --perturb
    adaptive_fraction: float = 0.999  # --adaptive_fraction
    max_significant: int = 200  # --maxsig (coarse samples per image; RELION: no limit; bounds early broad posteriors)
    do_norm: bool = False  # --norm
    do_scale: bool = False  # --scale
    minres_map: int = 5  # --minres_map
    incr_size: int = 10  # --incr_size
    pad: int = 2  # --pad
    width_mask_edge: float = 5.0  # --width_mask_edge
    random_seed: int = 0  # --random_seed
    batch_size: int = 32
    n_accuracy_particles: int = 20
    split_halves: bool = True  # --split_random_halves
    low_resol_join_halves: float = 40.0  # --low_resol_join_halves (Å)
    ini_high: float = 50.0  # --ini_high (Å; low-pass of the initial reference; <= 0: none)
    auto_refine: bool = True  # --auto_refine
    auto_local_healpix_order: int = 4  # --auto_local_healpix_order
    auto_ignore_angles: bool = False  # --auto_ignore_angles
    auto_resol_angles: bool = False  # --auto_resol_angles
    sigma_ang: float = 0.0  # --sigma_ang (degrees; > 0: local searches from the start)
    sigma_noise_particles: int = 1000  # particles per optics group for the initial noise spectra
    grad: bool = False  # --grad (VDAM mini-batches; no half-sets)
    solvent_correct_fsc: bool = False  # --solvent_correct_fsc (needs a solvent mask)
    auto_sampling: bool = False  # --auto_sampling (gradient runs: finer HEALPix order every 10th iteration, up to 3)


@dataclass
class ParticleState3D:
    """Per-particle assignments (numpy): ``angles [N, 3]`` (rot, tilt, psi degrees), ``origin [N, 2]`` (pixels,
    RELION origin), ``klass [N]`` (0-based, −1 none yet), ``subset [N]`` (1/2, rlnRandomSubset; 0 = none),
    ``norm``, ``loglik``, ``pmax``, ``nsig``."""

    angles: np.ndarray
    origin: np.ndarray
    klass: np.ndarray
    subset: np.ndarray
    norm: np.ndarray
    loglik: np.ndarray
    pmax: np.ndarray
    nsig: np.ndarray

    @classmethod
    def empty(cls, n: int, origin: np.ndarray | None = None, angles: np.ndarray | None = None) -> ParticleState3D:
        return cls(np.zeros((n, 3)) if angles is None else np.array(angles, float).reshape(n, 3).copy(),
                   np.zeros((n, 2)) if origin is None else np.array(origin, float)[:, :2].copy(),
                   np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64), np.ones(n), np.zeros(n),
                   np.zeros(n), np.zeros(n, np.int64))

    def copy(self) -> ParticleState3D:
        return ParticleState3D(*(np.array(getattr(self, f)) for f in self.__dataclass_fields__))


@dataclass
class Model3D:
    """The model (RELION ``MlModel`` fields of a 3D run). ``vols [H, K, n, n, n]``: per model (H = 2 half-sets or
    1) and class, real space in the particles' units; spectra ``[H, K, n//2+1]`` (``fsc [K, n//2+1]``: between the
    halves); ``acc_rot`` degrees, ``acc_trans`` Å; ``current_resolution`` 1/Å."""

    vols: torch.Tensor
    pixel_size: float
    symmetry: str
    pdf_class: torch.Tensor
    sigma2_offset: float
    sigma2_noise: torch.Tensor
    tau2_fudge: float
    tau2: torch.Tensor
    sigma2_ref: torch.Tensor
    data_vs_prior: torch.Tensor
    fourier_coverage: torch.Tensor
    fsc: torch.Tensor
    acc_rot: torch.Tensor
    acc_trans: torch.Tensor
    estimated_resolution: torch.Tensor
    total_fourier_coverage: torch.Tensor
    current_resolution: float
    current_size: int
    avg_norm_correction: float = 1.0
    scale_correction: torch.Tensor | None = None
    group_counts: torch.Tensor | None = None
    LL: float = 0.0
    ave_pmax: float = 0.0
    padding_factor: int = 2

    @property
    def n_models(self) -> int:
        return int(self.vols.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.vols.shape[1])

    @property
    def ori_size(self) -> int:
        return int(self.vols.shape[-1])

    @property
    def n_shells(self) -> int:
        return self.ori_size // 2 + 1


@dataclass
class AutoSampling:
    """The sampling of the next iteration and RELION's auto-refine bookkeeping (``updateAngularSampling``,
    ``checkConvergence``): HEALPix order, offsets (pixels, before oversampling), local-search σ (degrees, 0 =
    global), counters, best resolution (1/Å), smallest changes seen, and the convergence flags."""

    healpix_order: int
    offset_range: float
    offset_step: float
    sigma_ang: float = 0.0
    perturbation: float = 0.0
    nr_iter_wo_resol_gain: int = 0
    nr_iter_wo_large_changes: int = 0
    best_resolution: float = 0.0
    smallest_changes_orient: float = 999.0
    smallest_changes_offset: float = 999.0
    smallest_changes_class: float = 9999999.0
    has_fine_enough: bool = False
    has_converged: bool = False
    final_done: bool = False


@dataclass
class IterationReport3D:
    iteration: int
    resolution_A: float
    current_size: int
    angular_step: float
    offset_step_A: float
    local: bool
    acc_rot: float
    acc_trans_A: float
    changes_orientations: float
    changes_offsets_A: float
    changes_classes: float
    ave_pmax: float
    seconds: float
    n_particles: int
    samples_per_second: float
    final: bool = False
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        search = f"local σ {self.extra.get('sigma_ang', 0):.2f}°" if self.local else "global"
        tag = " (final, halves joined)" if self.final else ""
        return (f"iteration {self.iteration}{tag}: resolution {self.resolution_A:.2f} Å (image size "
                f"{self.current_size}), sampling {self.angular_step:.2f}° {search}, offsets step "
                f"{self.offset_step_A:.2f} Å; accuracy {self.acc_rot:.2f}° / {self.acc_trans_A:.2f} Å; changes "
                f"{self.changes_orientations:.2f}° / {self.changes_offsets_A:.2f} Å / classes "
                f"{self.changes_classes:.3f}; <Pmax> {self.ave_pmax:.3f}; {self.seconds:.1f} s "
                f"({self.samples_per_second:.3g} orientation×translation/s)")


def gold_standard_resolution_shell(fsc: torch.Tensor, tau2_fudge: float, ori_size: int, minres_map: int = 5) -> int:
    """RELION ``updateCurrentResolution`` with half-sets: per class ``data_vs_prior = T·FSC/(1−FSC)``; the shell
    before it first drops below 1 (FSC ≈ 0.5 for T = 1) minus one; if it rises above 1 again more than 3 shells
    later, the later crossing counts; the best class, at least ``minres_map``."""
    f = fsc.detach().cpu().to(torch.float64).clamp(0.001, 0.999)
    dvp = tau2_fudge * f / (1.0 - f)
    best = 0
    for k in range(dvp.shape[0]):  # K scalars
        row = dvp[k]
        ires = 1
        while ires < ori_size // 2 and row[ires] >= 1.0:
            ires += 1
        # a later rise above 1 (more than 3 shells on): take the later crossing
        j = ires + 3
        while j < ori_size // 2:
            if row[j] >= 1.0:
                k2 = j
                while k2 < ori_size // 2 and row[k2] >= 1.0:
                    k2 += 1
                ires = k2
                j = k2 + 3
            else:
                j += 1
        best = max(best, ires - 1)
    return max(best, int(minres_map))


def signal_power(X: torch.Tensor, noise: torch.Tensor) -> float:
    """Mean signal power per particle of coefficients ``X [B, P]`` (complex) with noise power ``noise [B, P]``
    (``E|X|²`` of pure noise; column 0, the DC term, is left out): ``Σ(|X|² − noise)``, clamped only after
    summing. A clamp per coefficient would keep ~0.37·noise of every noise-dominated coefficient
    (``E max(|X|² − σ², 0)`` for pure noise) and give pure noise, or low-SNR data, a bright initial reference whose
    first posteriors are sharp on noise. Floor: 0.1 % of the noise power (faint references, not none)."""
    data = float(((X.real.square() + X.imag.square()) - noise)[:, 1:].sum(dim=1).mean())
    return max(data, 1e-3 * float(noise[:, 1:].sum(dim=1).mean()))


def random_blob_volume(n: int, radius_px: float, generator: torch.Generator, count: int = 40,
                       device=None) -> torch.Tensor:
    """RELION's de novo start (``--denovo_3dref`` with init blobs): ``count`` positive and ``count/2`` negative
    Gaussian blobs (σ ≈ radius/8) at random positions inside ``radius_px``, standardised (mean 0, std 1)."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    c = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(n, n, n, dtype=torch.float64)
    sig = max(1.0, radius_px / 8.0)
    for sign, m in ((1.0, count), (-1.0, count // 2)):  # two blob sets, each one batched sum
        u = torch.rand(m, 3, generator=generator, dtype=torch.float64) * 2 - 1
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-9) * torch.rand(m, 1, generator=generator,
                                                                        dtype=torch.float64) ** (1 / 3)
        pos = u * 0.7 * radius_px
        d2 = ((z[None] - pos[:, 0, None, None, None]) ** 2 + (y[None] - pos[:, 1, None, None, None]) ** 2
              + (x[None] - pos[:, 2, None, None, None]) ** 2)
        vol += sign * torch.exp(-d2 / (2 * sig * sig)).sum(dim=0)
    vol = (vol - vol.mean()) / vol.std().clamp_min(1e-12)
    return vol.to(torch.float32).to(dev)


# ------------------------------------------------------------------------------------------------------------
# the optimiser
# ------------------------------------------------------------------------------------------------------------

@dataclass
class IterationSetup:
    """What every batch of one iteration shares: the coefficient set ``cset`` (``coarse_size`` of them in the
    first pass, radius ``r_cur``), the orientation ``grid`` and translations ``trans``, whether searches are
    ``local``, the E-step settings ``est``, ``log_pdf [K]`` class priors and one :class:`ClassReferences3D` per
    model (half-set)."""

    cset: CoefficientSet
    coarse_size: int
    r_cur: int
    grid: object
    trans: TranslationGrid
    local: bool
    est: EStepSettings
    log_pdf: torch.Tensor
    refs_models: list


class Optimiser3D(ParticleStream):
    """3D iterations on a :class:`ParticleSet` (module docstring).

    Start from references (:meth:`initialise` with ``volume [n, n, n]`` or ``[K, n, n, n]``) or de novo
    (:meth:`initialise` without a volume: random blobs, gradient mode), or continue from a given ``model``,
    ``state``, ``sampling`` and ``iteration``. ``update_rule``: None (EM / gold standard) or a
    :class:`cryopipe.engine.vdam.GradUpdate` (``settings.grad``).
    """

    #: dimension of the particles' offsets (2: images; 3: pseudo-subtomograms), for the offset-prior update
    offset_dim = 2

    def __init__(self, particles: ParticleSet, settings: Refine3DSettings, *, model: Model3D | None = None,
                 state: ParticleState3D | None = None, sampling: AutoSampling | None = None, iteration: int = 0,
                 device=None, update_rule=None, progress=None, solvent_mask: torch.Tensor | None = None,
                 backend=None):
        self.p = particles
        self.s = settings
        self.dev = torch.device(device) if device is not None else torch.device("cpu")
        self.n = n = particles.n
        self.model = model
        self.state = state if state is not None else ParticleState3D.empty(particles.size)
        self.sampling = sampling if sampling is not None else AutoSampling(
            settings.healpix_order, settings.offset_range, settings.offset_step, settings.sigma_ang)
        self.iteration = int(iteration)
        self.update_rule = update_rule
        if settings.grad and update_rule is None:
            raise CryopipeError("gradient mode needs an update rule (cryopipe.engine.vdam.GradUpdate)")
        if settings.grad and settings.split_halves:
            raise CryopipeError("gradient mode (--grad) cannot be combined with --split_random_halves")
        self.progress = progress
        self.backend = backend if backend is not None else InProcess()  # where the E-step chunks run (issue 15)
        self.full = coefficient_set(n, n // 2, device=self.dev)
        self.npix = self.full.shell_counts(n // 2 + 1)
        diam = settings.particle_diameter if settings.particle_diameter > 0 else 0.8 * n * particles.pixel_size
        self.particle_diameter = diam
        r_px = diam / (2.0 * particles.pixel_size)
        self.mask2d = soft_circular_mask(n, r_px, settings.width_mask_edge, device=self.dev)
        self.has_solvent_mask = solvent_mask is not None
        self.mask3d = (solvent_mask.to(self.dev, torch.float32) if solvent_mask is not None else
                       soft_spherical_mask(n, r_px, settings.width_mask_edge, device=self.dev))
        self.changes = {"orientations": 999.0, "offsets": 999.0, "classes": 1.0}
        self.rng = np.random.default_rng(settings.random_seed + 7919 * self.iteration)
        self.samples_evaluated = 0.0
        self.last_halves: list[torch.Tensor] | None = None  # final iteration: unregularised half maps

    # -------------------------------------------------------------------------------------- set-up
    @property
    def n_models(self) -> int:
        return 2 if self.s.split_halves else 1

    def assign_halves(self) -> None:
        """Random half-sets (rlnRandomSubset 1/2, balanced) for particles that have none (RELION assigns
        them at random unless they are given in the input)."""
        st = self.state
        if not self.s.split_halves:
            return
        need = st.subset <= 0
        if need.any():
            idx = np.nonzero(need)[0]
            rng = np.random.default_rng(self.s.random_seed + 12345)
            lab = np.arange(idx.size) % 2 + 1
            st.subset[idx] = lab[rng.permutation(idx.size)]

    def initialise(self, volume: torch.Tensor | None = None, *, absolute_greyscale: bool = True) -> Model3D:
        """Initial noise spectra from the particles, and the references: ``volume`` (low-passed to ``ini_high``;
        without ``absolute_greyscale`` rescaled so that its projections carry the particles' signal power) or,
        without a volume, random blobs (de novo). Sets ``self.model`` at iteration 0."""
        s, p, n, dev = self.s, self.p, self.n, self.dev
        K = s.n_classes
        H = self.n_models
        if p.size < max(2 * H, K):
            raise CryopipeError(f"{p.size} particles are too few for {K} class(es) and {H} half-set(s)")
        self.assign_halves()
        ns = n // 2 + 1
        take = self.rng.permutation(p.size)[:max(1, s.sigma_noise_particles * p.n_optics_groups)]
        take = np.sort(take)
        sigma2 = self._initial_noise(take)
        gen = torch.Generator().manual_seed(int(s.random_seed) + 101)
        if volume is None:
            r_px = self.particle_diameter / (2.0 * p.pixel_size)
            vols = torch.stack([random_blob_volume(n, r_px, gen) for _ in range(K)]).to(dev)
            lp = s.ini_high if s.ini_high > 0 else n * p.pixel_size / max(1, round(0.07 * n))  # as RELION
            vols = lowpass_map(vols, n * p.pixel_size / max(lp, 2.5 * p.pixel_size), 2.0, edge="outside")
            vols = vols * self.mask3d
            absolute_greyscale = False
        else:
            v = torch.as_tensor(volume, dtype=torch.float32, device=dev)
            vols = v[None] if v.dim() == 3 else v
            if vols.shape[0] == 1 and K > 1:
                vols = vols.expand(K, n, n, n).clone()
            if vols.shape[-1] != n:
                raise CryopipeError(f"reference box {vols.shape[-1]} differs from the particle box {n}")
            if s.ini_high > 0:
                vols = lowpass_map(vols, n * p.pixel_size / s.ini_high, 2.0, edge="outside")
        if not absolute_greyscale:
            vols = self._greyscale(vols, take, sigma2)
        model = Model3D(
            vols=vols[None].expand(H, *vols.shape).clone(), pixel_size=p.pixel_size, symmetry=s.symmetry,
            pdf_class=torch.full((K,), 1.0 / K, dtype=torch.float64),
            sigma2_offset=float(max(s.offset_range, 1.0) ** 2 / 4.0), sigma2_noise=sigma2,
            tau2_fudge=s.tau2_fudge,
            tau2=torch.zeros(H, K, ns, dtype=torch.float64), sigma2_ref=torch.zeros(H, K, ns, dtype=torch.float64),
            data_vs_prior=torch.zeros(H, K, ns, dtype=torch.float64),
            fourier_coverage=torch.zeros(H, K, ns, dtype=torch.float64),
            fsc=torch.zeros(K, ns, dtype=torch.float64),
            acc_rot=torch.full((K,), 999.0, dtype=torch.float64),
            acc_trans=torch.full((K,), 999.0, dtype=torch.float64),
            estimated_resolution=torch.zeros(K, dtype=torch.float64),
            total_fourier_coverage=torch.zeros(K, dtype=torch.float64),
            current_resolution=0.0, current_size=n,
            scale_correction=torch.ones(p.n_groups, dtype=torch.float64, device=dev),
            group_counts=torch.as_tensor(np.bincount(p.group, minlength=p.n_groups), dtype=torch.float64),
            padding_factor=s.pad)
        # first iteration's resolution: the low-pass of the initial reference (RELION --ini_high)
        ini = s.ini_high if s.ini_high > 0 else 30.0
        if volume is None and s.grad and s.ini_high <= 0:
            ini = n * p.pixel_size / max(1, round(0.07 * n))  # RELION's de novo start: 0.07 × box shells
        shell = max(int(s.minres_map), int(round(n * p.pixel_size / ini)))
        model.current_resolution = float(resolution_per_A(shell, n, p.pixel_size))
        model.current_size = int(min(2 * (shell + s.incr_size), n))
        self.model = model
        self.iteration = 0
        return model

    def _initial_noise(self, idx: np.ndarray) -> torch.Tensor:
        """``[G, n//2+1]`` initial noise spectra from particles ``idx`` (RELION's start; a hook for other kinds
        of particle data, e.g. :class:`cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D`)."""
        sigma2, _ = initial_noise_spectra(self, idx, self.state.origin, self.full, self.mask2d, self.s.zero_mask,
                                          seed=int(self.s.random_seed))
        return sigma2

    def _average_ctf2(self) -> torch.Tensor | None:
        """``[n//2+1]`` average CTF² per shell of CTF-premultiplied data (RELION ``setAverageCTF2``), by which
        :func:`~cryopipe.engine.reference3d.ssnr_3d` corrects ``τ²`` in runs without half-sets; None here:
        single particles are not premultiplied (the E-step multiplies the references by the CTF and σ² is the
        raw images' noise), so RELION applies no correction (``hasCtfPremultiplied()`` false). Tomographic
        particles override it (:mod:`cryopipe.engine.tomo_optimiser`)."""
        return None

    def _greyscale(self, vols: torch.Tensor, idx: np.ndarray, sigma2: torch.Tensor) -> torch.Tensor:
        """Scale references so that their CTF-modulated projections have the particles' signal power inside
        the mask: ``mean |X|² − noise`` over a few hundred particles (replaces RELION's ``--firstiter_cc``)."""
        p, n, dev = self.p, self.n, self.dev
        sub = idx[:min(idx.size, 200)]
        cset = self.full
        imgs = self._images(sub) * self.mask2d
        X = cset.gather(torch.fft.rfft2(torch.fft.ifftshift(imgs, dim=(-2, -1)))) / float(n * n)
        og = torch.as_tensor(p.optics_group[sub], device=dev)
        noise = 2.0 * sigma2.to(dev)[og][:, cset.shell]
        noise[:, 0] = 0.0
        data_pow = signal_power(X, noise)
        c = self._ctf(sub)
        C = torch.ones_like(X.real) if c is None else cset.gather(c)
        out = []
        for k in range(vols.shape[0]):  # K classes
            pr = Projector(vols[k] * self.mask3d, pad=self.s.pad)
            rot = euler_to_matrix(*(torch.as_tensor(self.rng.uniform(0, 360, sub.size)) for _ in range(3)))
            refs = ClassReferences3D([pr], cset, cset.size, healpix_orientations(0, device=dev))
            Pv = refs.predict(0, rot.to(dev), cset.k) * C.to(torch.complex64)
            ref_pow = float((Pv.real.square() + Pv.imag.square())[:, 1:].sum(dim=1).mean())
            out.append(vols[k] * (math.sqrt(data_pow / ref_pow) if ref_pow > 0 else 1.0))
        return torch.stack(out)

    # -------------------------------------------------------------------------------------- helpers
    def _coefficient_sets(self, final: bool) -> tuple[CoefficientSet, int, int]:
        s, m, n = self.s, self.model, self.n
        size = n if final else m.current_size
        r_cur = size // 2
        cset = self.full.prefix(r_cur)
        step = angular_step(self.sampling.healpix_order)
        csize = coarse_image_size(n, self.p.pixel_size, size, step, self.particle_diameter, 3, -1.0,
                                  s.oversampling)
        Pc = self.full.count_upto(csize // 2) if s.oversampling > 0 else cset.size
        return cset, min(Pc, cset.size), r_cur

    def _translations(self) -> TranslationGrid:
        smp, s = self.sampling, self.s
        tc = translation_grid(smp.offset_range, smp.offset_step, self.dev)
        if s.oversampling > 0:
            return TranslationGrid(tc, oversample_translations(tc, smp.offset_step, s.oversampling))
        return TranslationGrid(tc, tc[:, None, :])

    def _perturb_grid(self) -> None:
        """Draw the iteration's random perturbation of the orientation grid (RELION ``--perturb``), once per
        iteration in the main process (workers build their grid from it)."""
        s, smp = self.s, self.sampling
        if s.perturb > 0:
            pert = smp.perturbation + self.rng.uniform(0.5 * s.perturb, s.perturb)
            smp.perturbation = float((pert + s.perturb) % (2 * s.perturb) - s.perturb)

    def _grid(self):
        s, smp = self.s, self.sampling
        sym = self.model.symmetry if not self.s.grad else "C1"
        return healpix_orientations(smp.healpix_order, None, sym, s.oversampling, smp.perturbation, device=self.dev)

    def _batch_source(self, src: ClassReferences3D, est: EStepSettings, idx: np.ndarray, P: int):
        """``(predictions, E-step settings, coefficients)`` of one batch: the iteration's for images (a hook for
        particles whose coefficient set depends on the batch, e.g. the tilt stacks of one tilt series)."""
        return src, est, P

    def _batch_inputs(self, idx: np.ndarray, P: int, log_prior: torch.Tensor, gen: torch.Generator):
        s, p, m, dev = self.s, self.p, self.model, self.dev
        K = m.n_classes
        imgs = self._images(idx)
        og = torch.as_tensor(p.optics_group[idx], device=dev)
        grp = torch.as_tensor(p.group[idx], device=dev)
        scale = m.scale_correction.to(dev)[grp] if s.do_scale else None
        ctf = self._ctf(idx, scale)
        origin = torch.as_tensor(self.state.origin[idx], dtype=torch.float32, device=dev)
        normf = None
        if s.do_norm:
            normf = torch.as_tensor(m.avg_norm_correction / np.maximum(self.state.norm[idx], 1e-6),
                                    dtype=torch.float32, device=dev)
        batch = prepare_batch(imgs, self.full, P, m.sigma2_noise, og, origins=origin, norm_factor=normf, ctf=ctf,
                              mask=self.mask2d, zero_mask=s.zero_mask,
                              prior_centre=torch.zeros(idx.size, K, 2, device=dev), log_prior_orient=log_prior,
                              n_classes=K,  # noise fill seeded per particle (issue 14): batching-independent
                              noise_seeds=particle_seeds(s.random_seed, self.iteration, idx, NOISE_FILL))
        return batch, grp, scale

    # -------------------------------------------------------------------------------------- one iteration
    def iterate(self) -> IterationReport3D:
        """One iteration over the particles (module docstring); updates ``model``, ``state`` and ``sampling``."""
        if self.model is None:
            raise RuntimeError("call initialise() first (or give a model to continue from)")
        t0 = time.perf_counter()
        self.iteration += 1
        it = self.iteration
        s, p, m, dev, n = self.s, self.p, self.model, self.dev, self.n
        self.rng = np.random.default_rng(s.random_seed + 7919 * it)
        K, G, ns = m.n_classes, p.n_optics_groups, m.n_shells
        final = bool(self.sampling.has_converged) and s.split_halves and s.auto_refine
        grad = s.grad
        sub = -1
        # ---- particles of this iteration
        if grad:
            sub = self.update_rule.subset_size(it, p.size)
            m.tau2_fudge = float(self.update_rule.tau2_fudge(it))
            idx_all = self.rng.permutation(p.size)
            if 0 < sub < p.size:
                idx_all = idx_all[:sub]
            groups = [idx_all[idx_all % 2 == h] for h in (0, 1)]  # pseudo-halves by particle parity
        elif s.split_halves:
            groups = [np.nonzero(self.state.subset == h)[0] for h in (1, 2)]
        else:
            groups = [np.arange(p.size)]
        # ---- sampling, coefficient sets, references
        self._perturb_grid()
        setup = self._iteration_setup(final)
        cset, r_cur, grid, local, refs_models = setup.cset, setup.r_cur, setup.grid, setup.local, setup.refs_models
        bp_rmax = n // 2 if grad else r_cur
        bps = [ClassBackProjectors(K, n, s.pad, r_max=bp_rmax, device=dev) for _ in groups]
        sums = ParticleSums.zeros(K, G, ns, p.n_groups, dev)
        old = self.state.copy()
        if self.backend.distributed:
            n_samples = self._estep_distributed(setup, groups, bps, sums, final)
        else:
            n_samples = 0.0
            for gi, idx_g in enumerate(groups):
                label = f" half {gi + 1}" if s.split_halves else ""
                n_samples += self._estep_batches(setup, self._model_index(gi), self._group_order(setup, idx_g),
                                                 bps[gi], sums, desc=f"iteration {it}{label}")
        self.samples_evaluated = n_samples
        # ---- M-step
        if grad:
            self._maximise_grad(bps, cset, r_cur, refs_models)
        else:
            self._maximise_em(bps, r_cur, final, refs_models)
        # gradient runs on a mini-batch mix the particle-level estimates with momentum (RELION --mu 0.9)
        mu = GRAD_MODEL_MOMENTUM if grad and 0 < sub < p.size else 0.0
        pdf = sums.wsum_class / sums.wsum_class.sum().clamp_min(1e-300)
        pdf = (pdf / pdf.sum()).cpu()
        m.pdf_class = mu * m.pdf_class.to(pdf.dtype) + (1.0 - mu) * pdf if mu > 0 else pdf
        update_particle_model(m, sums, self.npix.to(dev), do_norm=s.do_norm, do_scale=s.do_scale, momentum=mu,
                              offset_dim=self.offset_dim)
        # ---- resolution, accuracies, changes, sampling
        self._changes(old, np.concatenate(groups))
        if final:
            self.sampling.final_done = True
        else:
            self._update_resolution()
            self._accuracies(refs_models, cset)
            if s.auto_refine and not grad:
                self._update_sampling()
            elif grad and s.auto_sampling:
                self._update_sampling_grad()
        secs = time.perf_counter() - t0
        smp = self.sampling
        return IterationReport3D(
            it, 1.0 / m.current_resolution if m.current_resolution > 0 else math.inf, m.current_size,
            angular_step(grid.order + grid.oversampling), smp.offset_step * p.pixel_size / 2 ** s.oversampling,
            local, float(m.acc_rot.min()), float(m.acc_trans.min()), self.changes["orientations"],
            self.changes["offsets"], self.changes["classes"], m.ave_pmax, secs, int(sum(g.size for g in groups)),
            n_samples / max(secs, 1e-9), final, {"sigma_ang": smp.sigma_ang})

    # -------------------------------------------------------------------------------------- E-step
    def _iteration_setup(self, final: bool) -> IterationSetup:
        """The iteration's coefficient sets, grids, E-step settings, class priors and references (step 1)."""
        s, p, m, dev, n = self.s, self.p, self.model, self.dev, self.n
        cset, Pc, r_cur = self._coefficient_sets(final)
        grid = self._grid()
        trans = self._translations()
        local = self.sampling.sigma_ang > 0 and not s.grad
        est = EStepSettings(n=n, k=cset.k, shell=cset.shell, coarse_size=Pc, n_shells=m.n_shells,
                            n_optics_groups=p.n_optics_groups, sigma2_offset=m.sigma2_offset,
                            adaptive_fraction=s.adaptive_fraction, max_significant=s.max_significant,
                            oversampling=s.oversampling > 0, compute_corrections=s.do_norm or s.do_scale)
        log_pdf = torch.where(m.pdf_class > 0, torch.log(m.pdf_class.clamp_min(1e-300)),
                              torch.full_like(m.pdf_class, -math.inf)).to(dev, torch.float32)
        refs_models = [ClassReferences3D.from_volumes(m.vols[h].to(dev), cset, Pc, grid, s.pad)
                       for h in range(m.n_models)]
        if local:
            for r in refs_models:
                r.enable_coarse_cache(grid.n_coarse)
        return IterationSetup(cset, Pc, r_cur, grid, trans, local, est, log_pdf, refs_models)

    def _group_order(self, setup: IterationSetup, idx_g: np.ndarray) -> np.ndarray:
        """Particles of one model in batch order (local searches: grouped by orientation, so that neighbouring
        particles share the cached coarse predictions)."""
        if not setup.local:
            return idx_g
        return idx_g[local_batch_order(torch.as_tensor(self.state.angles[idx_g])).numpy()]

    def _model_index(self, group: int) -> int:
        """Which model's references the particles of ``group`` are aligned to (half-sets: their own)."""
        return 0 if (self.s.grad or self.model.n_models == 1) else int(group)

    def _estep_batches(self, setup: IterationSetup, model_index: int, idx_g: np.ndarray, bps: ClassBackProjectors,
                       sums: ParticleSums, desc: str | None = None) -> float:
        """E-step of the particles ``idx_g`` (in this order) against model ``model_index``, batch by batch: sums
        into ``bps`` and ``sums``, each particle's best pose into ``self.state``. Returns the samples evaluated."""
        m, dev = self.model, self.dev
        K = m.n_classes
        refs = setup.refs_models[model_index]
        batches = self._batches(idx_g)
        it_b = self.progress(batches, desc=desc) if (self.progress is not None and desc) else batches
        n_samples = 0.0
        for idx in it_b:
            src = refs
            lpo = setup.log_pdf[None, :, None]
            if setup.local:
                subset, lp = local_orientations(setup.grid, torch.as_tensor(self.state.angles[idx], device=dev),
                                                self.sampling.sigma_ang, m.symmetry)
                src = refs.with_orientations(subset)
                lpo = lp.to(dev)[:, None, :] + setup.log_pdf[None, :, None]
            src, est_b, P_b = self._batch_source(src, setup.est, idx, setup.cset.size)
            batch, grp, scale = self._batch_inputs(idx, P_b, lpo, None)
            res = expectation(batch, src, setup.trans, est_b)
            n_samples += float(idx.size) * src.n_coarse * K * setup.trans.coarse.shape[0]
            bps.add(res, src)
            sums.add_result(res, grp, scale)
            self._record(res, src, idx, sums)
        return n_samples

    def _estep_distributed(self, setup: IterationSetup, groups: list[np.ndarray], bps: list[ClassBackProjectors],
                           sums: ParticleSums, final: bool) -> float:
        """The E-step of ``groups`` as chunks on the backend's workers (:mod:`cryopipe.engine.refine3d_step`),
        reduced in chunk order into ``bps`` / ``sums``; the chunks' poses are written into ``self.state``."""
        from cryopipe.engine.backend import split_chunks
        from cryopipe.engine.class2d_step import to_device
        from cryopipe.engine.refine3d_step import PoseRecords, Refine3DItem, Refine3DSnapshot, refine3d_chunk

        be, s = self.backend, self.s
        if hasattr(self, "_ensure_npix"):
            self._ensure_npix()  # tomographic data: computed here once, not by every worker
        snap = Refine3DSnapshot(self.iteration, self.model, self.sampling, final)
        items = []
        for gi, idx_g in enumerate(groups):
            order = self._group_order(setup, idx_g)
            n_chunks = be.n_chunks(-(-order.size // max(1, int(s.batch_size))))
            items += [Refine3DItem(gi, c, PoseRecords.take(self.state, c))
                      for c in split_chunks(order, n_chunks, s.batch_size)]
        n_samples = 0.0
        for part in be.map(refine3d_chunk, self, snap, items):
            bps[part.group].add_sums(part.data, part.weight)
            sums.add(to_device(part.sums, self.dev))
            part.records.apply(self.state)
            n_samples += part.n_samples
        return n_samples

    def __getstate__(self):
        """What a worker needs (:func:`cryopipe.engine.refine3d_step.refine3d_chunk`): the particles, settings and
        masks; the model, state and sampling come with each iteration's snapshot."""
        d = dict(self.__dict__)
        for k in ("model", "state", "backend", "progress", "update_rule", "rng", "last_halves"):
            d[k] = None
        return d

    def _record(self, res: BatchResult, src: ClassReferences3D, idx: np.ndarray, sums: ParticleSums) -> None:
        st, s, m = self.state, self.s, self.model
        st.angles[idx] = src.best_angles(res).cpu().numpy()
        st.origin[idx] = st.origin[idx] + res.best_offset.cpu().numpy().astype(float)
        st.klass[idx] = res.best_class.cpu().numpy()
        st.pmax[idx] = res.pmax.cpu().numpy()
        st.nsig[idx] = res.n_significant.cpu().numpy()
        st.loglik[idx] = res.loglik.cpu().numpy()
        if s.do_norm:
            new = (st.norm[idx] / m.avg_norm_correction) * np.sqrt(2.0 * res.norm_residual.cpu().numpy())
            st.norm[idx] = new
            sums.wsum_norm += float(new.sum())

    # -------------------------------------------------------------------------------------- M-steps
    def _flatten(self, vols: torch.Tensor) -> torch.Tensor:
        if self.s.flatten_solvent:
            vols = vols * self.mask3d
        if self.s.non_negative:
            vols = vols.clamp_min(0)
        return vols

    def _maximise_em(self, bps: list[ClassBackProjectors], r_cur: int, final: bool,
                     refs_models: list[ClassReferences3D]) -> None:
        """EM / gold-standard M-step; ``refs_models`` (the iteration's references, already in projectors) give the
        reference spectra τ² (RELION computes them from the current reference at the start of the iteration)."""
        s, m, n = self.s, self.model, self.n
        sym = m.symmetry
        T = m.tau2_fudge
        if s.split_halves:
            h1, h2 = bps
            lowres = int(math.ceil(n * self.p.pixel_size / s.low_resol_join_halves)) if s.low_resol_join_halves > 0 \
                else 0
            if lowres > 0 and not final:
                join_halves_at_low_resolution(h1, h2, lowres)
            st1, st2 = h1.symmetrised(sym), h2.symmetrised(sym)
            fsc = halfset_fsc(h1, h2, stats1=st1, stats2=st2)
            unfil = None  # unregularised half maps, when needed (solvent-corrected FSC, final iteration)
            if s.solvent_correct_fsc and self.has_solvent_mask:
                unfil = [h1.reconstruct(None, 1.0, sym), h2.reconstruct(None, 1.0, sym)]
                fsc = self._solvent_corrected_fsc(unfil[0], unfil[1], fsc)
            m.fsc = fsc.cpu()
            if final:
                # unregularised half maps (run_half?_class001_unfil.mrc), then the joined map
                self.last_halves = unfil if unfil is not None else [h1.reconstruct(None, 1.0, sym),
                                                                    h2.reconstruct(None, 1.0, sym)]
                h1.merge(h2)
                stj = h1.symmetrised(sym)
                tau_ref = refs_models[0].tau2()
                sig_ref, _, cov = ssnr_3d(h1, tau_ref, T, stats=stj)
                tau2, dvp = fsc_tau2(fsc, sig_ref, T, whole=True)
                vol = h1.reconstruct(tau2, T, sym, minres_map=s.minres_map)
                vol = self._flatten(vol)
                m.vols = torch.stack([vol, vol]).cpu()
                for h in range(2):
                    m.tau2[h], m.sigma2_ref[h], m.data_vs_prior[h], m.fourier_coverage[h] = (
                        tau2.cpu(), sig_ref.cpu(), dvp.cpu(), cov.cpu())
            else:
                vols = []
                for h, (bp, stt) in enumerate(((h1, st1), (h2, st2))):
                    tau_ref = refs_models[h].tau2()
                    sig_ref, _, cov = ssnr_3d(bp, tau_ref, T, stats=stt)
                    tau2, dvp = fsc_tau2(fsc, sig_ref, T)
                    vols.append(self._flatten(bp.reconstruct(tau2, T, sym, minres_map=s.minres_map)))
                    m.tau2[h], m.sigma2_ref[h], m.data_vs_prior[h], m.fourier_coverage[h] = (
                        tau2.cpu(), sig_ref.cpu(), dvp.cpu(), cov.cpu())
                m.vols = torch.stack(vols).cpu()
        else:
            bp = bps[0]
            stt = bp.symmetrised(sym)
            tau_ref = refs_models[0].tau2()
            sig_ref, dvp, cov = ssnr_3d(bp, tau_ref, T, stats=stt, avg_ctf2=self._average_ctf2())
            vol = self._flatten(bp.reconstruct(tau_ref, T, sym, minres_map=s.minres_map))
            m.vols = vol[None].cpu()
            m.tau2[0], m.sigma2_ref[0], m.data_vs_prior[0], m.fourier_coverage[0] = (
                tau_ref.cpu(), sig_ref.cpu(), dvp.cpu(), cov.cpu())
        self._estimated_resolution()

    def _solvent_corrected_fsc(self, v1: torch.Tensor, v2: torch.Tensor, fsc_unmasked: torch.Tensor
                               ) -> torch.Tensor:
        """RELION's ``--solvent_correct_fsc``: FSC of the unregularised half maps ``v1, v2 [K, n, n, n]`` inside
        the solvent mask,
        corrected for the mask by phase randomisation (as ``relion_postprocess``: phases randomised beyond the
        shell where the unmasked FSC drops below 0.8, ``(FSC_masked − FSC_random)/(1 − FSC_random)`` from two
        shells further), per class. Shells before the randomisation point keep the masked FSC."""
        from cryopipe.core.fsc import fsc as fsc_maps
        from cryopipe.core.postprocess import RelionRandom, corrected_fsc, randomization_shell, randomize_phases_beyond

        mask = self.mask3d.to(v1.device, v1.dtype)
        out = fsc_unmasked.clone().to(torch.float64)
        rng = RelionRandom(int(self.s.random_seed) + 31 * self.iteration)
        ns = out.shape[-1]
        for k in range(v1.shape[0]):  # K classes
            fm = fsc_maps(v1[k] * mask, v2[k] * mask).to(out.device, torch.float64)[:ns]
            at = randomization_shell(fsc_unmasked[k])
            if at <= 0 or at + 2 >= ns:
                out[k] = fm
                continue
            r1 = randomize_phases_beyond(v1[k], at, rng) * mask
            r2 = randomize_phases_beyond(v2[k], at, rng) * mask
            fr = fsc_maps(r1, r2).to(out.device, torch.float64)[:ns]
            out[k] = corrected_fsc(fm, fr, at)
        out[:, 0] = 1.0
        return out.to(fsc_unmasked.dtype)

    def _maximise_grad(self, bps: list[ClassBackProjectors], cset: CoefficientSet, r_cur: int,
                       refs_models: list[ClassReferences3D]) -> None:
        """VDAM update on the padded Fourier grids (:class:`~cryopipe.engine.vdam.GradUpdate`; the grid of each
        class is the coefficient vector, ``shell = round(|p|/pad)``)."""
        s, m, n, dev = self.s, self.model, self.n, self.dev
        K = m.n_classes
        projs = [Projector(m.vols[0, k].to(dev), pad=s.pad) for k in range(K)]
        b0 = bps[0].bps[0]
        r2 = _grid_radius(b0.R, dev)
        shell = torch.floor(torch.sqrt(r2) / b0.pad + 0.5).long()
        inside = r2 <= (b0.R * b0.R)
        flat_idx = torch.nonzero(inside.reshape(-1)).reshape(-1)
        sh = shell.reshape(-1)[flat_idx]
        nn = float(n * n)
        sym = [bp.symmetrised(None) for bp in bps]  # Hermitian symmetry on the x = 0 plane (C1)
        data = torch.stack([torch.stack([d.reshape(-1)[flat_idx] for d, _ in st]) for st in sym])
        weight = torch.stack([torch.stack([w.reshape(-1)[flat_idx] for _, w in st]) for st in sym])
        del sym
        current = torch.stack([pr.data.reshape(-1)[flat_idx] / nn for pr in projs])
        tau2 = torch.zeros(K, n // 2 + 1, dtype=torch.float64, device=dev)
        new = self.update_rule(data, weight, current, tau2, sh, m.tau2_fudge, s.minres_map, r_cur,
                               m.pdf_class.to(dev), self.iteration)
        vols = []
        for k in range(K):  # K classes: one padded inverse FFT each
            g = torch.zeros_like(projs[k].data).reshape(-1)
            g[flat_idx] = (new[k] * nn).to(g.dtype)
            vols.append(Projector.from_grid(g.reshape(projs[k].data.shape), n, s.pad).to_volume())
        vols = self._flatten(torch.stack(vols))
        m.vols = vols[None].cpu()
        # the update's per-shell FSC estimate (momentum noise against reference power) for the files
        fsc = self.update_rule.last_fsc.to(torch.float64)
        fsc[:, 0] = 1.0
        m.fsc = fsc.cpu()
        # resolution as RELION's gradient runs: data_vs_prior = mean(weight·T·τ²) per shell of the first
        # pseudo-half's statistics, τ² the power of the references this mini-batch was aligned against (times
        # the average CTF² for premultiplied data, RELION setAverageCTF2); shells beyond the current size have no
        # weight, so the resolution grows at most incr_size shells per iteration
        T = m.tau2_fudge
        tau_ref = refs_models[0].tau2()
        sig_ref, dvp, cov = ssnr_3d(bps[0], tau_ref, T, avg_ctf2=self._average_ctf2())
        m.tau2[0], m.sigma2_ref[0], m.data_vs_prior[0], m.fourier_coverage[0] = (
            tau_ref.cpu(), sig_ref.cpu(), dvp.cpu(), cov.cpu())
        self._estimated_resolution()

    # -------------------------------------------------------------------------------------- bookkeeping
    def _estimated_resolution(self) -> None:
        """Per-class rlnEstimatedResolution (Å) and overall Fourier completeness from model 1's spectra."""
        m = self.model
        maxres = estimated_resolution_shell(m.data_vs_prior[0])
        m.estimated_resolution = torch.where(maxres > 0, m.ori_size * m.pixel_size / maxres.clamp_min(1).to(
            torch.float64), torch.full_like(maxres, math.inf, dtype=torch.float64))
        m.total_fourier_coverage = total_fourier_coverage(m.fourier_coverage[0], maxres)

    def _update_resolution(self) -> None:
        s, m, smp = self.s, self.model, self.sampling
        if s.split_halves:
            shell = gold_standard_resolution_shell(m.fsc, m.tau2_fudge, m.ori_size, s.minres_map)
        else:
            shell = current_resolution_shell(m.data_vs_prior[0], m.ori_size, s.minres_map)
        new = float(resolution_per_A(shell, m.ori_size, m.pixel_size))
        if new <= smp.best_resolution + 1e-4:
            smp.nr_iter_wo_resol_gain += 1
        else:
            smp.nr_iter_wo_resol_gain = 0
            smp.best_resolution = new
        m.current_resolution = new
        m.current_size = int(min(2 * (shell + s.incr_size), m.ori_size))

    def _accuracies(self, refs_models: list[ClassReferences3D], cset: CoefficientSet) -> None:
        """RELION ``calculateExpectedAngularErrors`` (re-derived, batched): for a random subset of particles at
        their current orientations, the smallest rotation (about the in-plane and an in-plane axis) and shift
        whose difference power ``Σ C²|F − F_δ|²/(2σ²)`` exceeds ``−ln(0.01)``; the mean over particles."""
        from cryopipe.engine.accuracy import THRESHOLD, first_crossing, trial_angles, trial_rotations, trial_shifts
        from cryopipe.engine.estep import shift_phases

        m, dev, p = self.model, self.dev, self.p
        K = m.n_classes
        I = min(self.s.n_accuracy_particles, p.size)
        idx = np.sort(self.rng.choice(p.size, size=I, replace=False))
        c = self._ctf(idx)
        C = torch.ones(I, cset.size, device=dev) if c is None else cset.gather(c)
        og = torch.as_tensor(p.optics_group[idx], device=dev)
        s2 = m.sigma2_noise.to(dev)[og][:, cset.shell]
        w = torch.where((s2 > 0) & (cset.shell[None] > 0), C.square().to(torch.float64) / s2.clamp_min(1e-300),
                        torch.zeros((), dtype=torch.float64, device=dev)).to(torch.float32)  # [I, P]
        ang = trial_angles(30.0, dev, ratio=1.1).to(torch.float64)  # 10 % steps: 71 trials
        shifts = trial_shifts(min(self.n / 4.0, 10.0), dev)
        J = ang.numel()
        A = torch.as_tensor(self.state.angles[idx], dtype=torch.float64, device=dev)
        A0 = euler_to_matrix(A[:, 0], A[:, 1], A[:, 2])  # [I, 3, 3]
        Rz, Rx = trial_rotations(ang)  # in-plane, out of plane
        kk = cset.k.to(dev)
        acc_rot = torch.zeros(K, dtype=torch.float64)
        acc_trans = torch.zeros(K, dtype=torch.float64)
        for k in range(K):  # K classes
            if float(m.pdf_class[k]) <= 0:
                acc_rot[k], acc_trans[k] = 999.0, 999.0
                continue
            ref = refs_models[0]
            F0 = ref.predict(k, A0, kk)  # [I, P]
            rots = []
            for Rt in (Rz, Rx):  # two rotation axes
                Ar = (Rt[None] @ A0[:, None]).reshape(I * J, 3, 3)
                Fr = ref.predict(k, Ar, kk).reshape(I, J, -1)
                dp = (Fr - F0[:, None]).abs().square()
                score = 0.5 * (dp * w[:, None, :]).sum(-1)  # [I, J]
                rots.append(first_crossing(score, ang, THRESHOLD))
            acc_rot[k] = float(torch.stack(rots).mean())
            tr = []
            for d in (torch.tensor([1.0, 0.0], device=dev), torch.tensor([0.0, 1.0], device=dev)):
                ph = shift_phases(kk, shifts[:, None] * d[None], self.n)  # [J2, P]
                dp = F0.abs().square()[:, None, :] * (1.0 - ph[None]).abs().square()
                score = 0.5 * (dp * w[:, None, :]).sum(-1)
                tr.append(first_crossing(score, shifts, THRESHOLD))
            acc_trans[k] = float(torch.stack(tr).mean()) * m.pixel_size
        m.acc_rot, m.acc_trans = acc_rot, acc_trans

    def _changes(self, old: ParticleState3D, idx: np.ndarray) -> None:
        st = self.state
        had = old.klass[idx] >= 0
        if not had.any():
            self.changes = {"orientations": 999.0, "offsets": 999.0, "classes": 1.0}
            return
        i = idx[had]
        a0 = torch.as_tensor(old.angles[i], dtype=torch.float64)
        a1 = torch.as_tensor(st.angles[i], dtype=torch.float64)
        M0 = euler_to_matrix(a0[:, 0], a0[:, 1], a0[:, 2])
        M1 = euler_to_matrix(a1[:, 0], a1[:, 1], a1[:, 2])
        ops = proper_symmetry_operators(self.model.symmetry if not self.s.grad else "C1")
        tr = torch.einsum("bij,gjk,bik->bg", M0, ops, M1).amax(dim=1)  # tr(M1ᵀ·M0·R)
        dang = torch.rad2deg(torch.acos(((tr - 1.0) * 0.5).clamp(-1.0, 1.0))).numpy()
        doff = np.linalg.norm(st.origin[i] - old.origin[i], axis=1) * self.p.pixel_size
        self.changes = {"orientations": float(dang.mean()), "offsets": float(np.sqrt((doff ** 2).mean())),
                        "classes": float((st.klass[i] != old.klass[i]).mean())}

    def _update_sampling(self) -> None:
        """RELION's auto-refine sampling update and convergence check (``updateAngularSampling``,
        ``checkConvergence``; ``MAX_NR_ITER_WO_RESOL_GAIN = MAX_NR_ITER_WO_LARGE_HIDDEN_VARIABLE_CHANGES = 1``)."""
        s, m, smp, p = self.s, self.model, self.sampling, self.p
        os_ = s.oversampling
        fine_step = angular_step(smp.healpix_order + os_)
        fine_off = smp.offset_step / 2 ** os_  # pixels
        ch = self.changes
        # large hidden-variable changes?
        if (ch["orientations"] >= 0.97 * smp.smallest_changes_orient or ch["orientations"] < 0.4 * fine_step) and \
                (ch["offsets"] >= 0.97 * smp.smallest_changes_offset or ch["offsets"] < 0.4 * fine_off * p.pixel_size) \
                and (ch["classes"] >= 0.97 * smp.smallest_changes_class or ch["classes"] < 0.01):
            smp.nr_iter_wo_large_changes += 1
        else:
            smp.nr_iter_wo_large_changes = 0
        smp.smallest_changes_orient = min(smp.smallest_changes_orient, ch["orientations"])
        smp.smallest_changes_offset = min(smp.smallest_changes_offset, ch["offsets"])
        smp.smallest_changes_class = min(smp.smallest_changes_class, ch["classes"])
        acc_rot = float(m.acc_rot.min())
        acc_trans_px = float(m.acc_trans.min()) / p.pixel_size
        res_angle_finer = False
        if s.auto_resol_angles and m.current_resolution > 0:
            # the angle that moves the particle edge by one resolution element
            res_angle = math.degrees(1.0 / (m.current_resolution * 0.5 * self.particle_diameter))
            res_angle_finer = res_angle < fine_step
        proceed = (smp.nr_iter_wo_resol_gain >= 1 or res_angle_finer) and \
                  (smp.nr_iter_wo_large_changes >= 1 or s.auto_ignore_angles)
        if proceed and not smp.has_fine_enough:
            if fine_step < 0.75 * acc_rot:
                smp.has_fine_enough = True
            else:
                self._finer_offsets(acc_trans_px)
                smp.healpix_order += 1
                if smp.healpix_order >= s.auto_local_healpix_order:
                    smp.sigma_ang = 2.0 * angular_step(smp.healpix_order + os_)
                elif smp.sigma_ang > 0:
                    smp.sigma_ang = 2.0 * angular_step(smp.healpix_order + os_)
                smp.nr_iter_wo_resol_gain = 0
                smp.nr_iter_wo_large_changes = 0
        if smp.has_fine_enough and smp.nr_iter_wo_resol_gain >= 1 and \
                (s.auto_ignore_angles or smp.nr_iter_wo_large_changes >= 1):
            smp.has_converged = True

    def _update_sampling_grad(self) -> None:
        """RELION's ``--auto_sampling`` in gradient runs (angle changes ignored): every 10th iteration, when the
        resolution did not improve in the last iteration and the fine angular step is not yet below 0.75 × the
        estimated accuracy, one HEALPix order finer (never beyond order 3: no local searches in gradient runs) and
        offsets from the translational accuracy, as in auto-refine."""
        s, m, smp, p, it = self.s, self.model, self.sampling, self.p, self.iteration
        if it < 10:
            smp.nr_iter_wo_resol_gain = 0
        if it % 10 != 0 or it <= 1 or smp.nr_iter_wo_resol_gain < 1 or smp.healpix_order + 1 >= 4:
            return
        os_ = s.oversampling
        if angular_step(smp.healpix_order + os_) < 0.75 * float(m.acc_rot.min()):
            return
        self._finer_offsets(float(m.acc_trans.min()) / p.pixel_size)
        smp.healpix_order += 1
        smp.nr_iter_wo_resol_gain = 0

    def _finer_offsets(self, acc_trans_px: float) -> None:
        """RELION's offset update when the sampling gets finer (pixels): step from the translational accuracy
        (``min(1.5, 0.75·acc)·2^oversampling``, never coarser), range from the rms offset change (3×, at most
        1.3× the old range, at least 1.5 steps; halved, then the step widened, while it exceeds 4 steps)."""
        smp, p = self.sampling, self.p
        new_step = min(min(1.5, 0.75 * acc_trans_px) * 2 ** self.s.oversampling, smp.offset_step)
        new_range = min(3.0 * self.changes["offsets"] / p.pixel_size, 1.3 * smp.offset_range)
        new_range = max(new_range, 1.5 * new_step)
        if new_range > 4 * new_step:
            new_range /= 2
        if new_range > 4 * new_step:
            new_step = new_range / 4
        smp.offset_step = float(max(new_step, 1e-3))
        smp.offset_range = float(min(new_range, smp.offset_range))

    def finish_next(self) -> None:
        """Make the next iteration the final one (halves joined, all frequencies), e.g. when ``--iter`` runs out
        before convergence (RELION stops there without the joined iteration; a finished map is more useful)."""
        self.sampling.has_converged = True

    @property
    def converged(self) -> bool:
        """True once the final (joined) iteration has run (auto-refine)."""
        return bool(self.sampling.final_done)

