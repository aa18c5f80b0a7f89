"""Differentiable forward model and score of multi-particle refinement for one tilt series (as Warp's M).

For every (particle ``n``, tilt ``f``) pair of a batch:

* geometry (RELION 5, :mod:`cryopipe.core.tilt_geometry`): ``R_f = Rz·Ry·Rx`` of the refined stage angles, the
  projected position ``q = R_f·(p − c) + shift_f/px + (W//2, H//2)`` of the refined particle centre ``p`` plus the
  tilt's image warp at ``q``, the depth ``q_z`` and the single-particle matrix ``R_f·A_n``;
* reference: the central slice ``V̂_h((R_f·A_n)ᵀ·(kx, ky, 0))`` of the particle's **own** half-map ``h``
  (rlnRandomSubset: gold standard), times ``c = −CTF·W`` (depth-corrected, refined defocus and astigmatism;
  dose weight ``W``; −1 because the raw images have dark protein; ``+CTF`` for extracted single particles,
  ``flip_contrast=False``), moved by ``(q − q₀)/bin`` px with a phase ramp;
* beam tilt (when the data carry one or it is refined): the reference times ``exp(i·φ)``, ``φ`` the antisymmetric
  phase of the pair's beam-tilt group (:func:`cryopipe.core.ctf.beam_tilt_phase`, RELION's convention);
* odd / even Zernike aberrations (when the data carry them or they are refined; RELION's rlnOddZernike /
  rlnEvenZernike, :func:`cryopipe.core.ctf.zernike_phase`): the odd phase adds to ``φ``, the even one to the CTF
  phase ``γ``;
* anisotropic magnification ``M`` (when the data carry one or it is refined; RELION's rlnMagMat convention): the
  slice, CTF and aberrations are evaluated at ``M·k`` for the observed frequency ``k``, and the projected position
  moves about the image centre by ``Mᵀ`` (before the image warp);
* poses over dose (``data.trajectory_*`` / the ``temporalposes`` group): the pair's rotation vector and position
  correction are the particle's plus its temporal samples interpolated at the tilt's pre-exposure
  (:func:`cryopipe.mpr.parameters.dose_sample_weights`); the orientation is ``A·Exp(v)`` with the summed vector;
* data: the particle's FT cut around the fixed centre ``q₀`` (the position at the start of the sub-iteration;
  :func:`cryopipe.tomo.particle_images.cut_particle_slices`, phase origin exactly at ``q₀``).

Score (M's ``MultiParticleDiffKernel``): with whitening weights ``w(k) = 1/⟨|X(k)|²⟩`` (the average particle power
spectrum of the tilt series, per shell) inside the band ``k_min ≤ |k| ≤ k_max``,
``NCC = Σ w·Re(X·R̄) / sqrt(Σ w|X|² · Σ w|R|²)`` over all pairs and pixels of the tilt series (half-complex
pixels with ``kx > 0`` count twice). Sums add over batches, so a tilt series is streamed in batches of pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from cryopipe.core.ctf import beam_tilt_phase, ctf_gamma, zernike_phase
from cryopipe.core.projector import slice_coordinates
from cryopipe.core.slice_sampling import central_slice_points, sample_half_grids
from cryopipe.core.tilt_geometry import dose_weights, tilt_rotation
from cryopipe.mpr.parameters import (
    DEFOCUS_UNIT_A,
    MAG_UNIT,
    TiltSeriesParameters,
    dose_sample_weights,
    even_from_fourth_order,
    gauge_fixed,
    odd_from_trefoil,
    rotation_from_vector,
    warp_at,
)
from cryopipe.tomo.particle_images import cut_particle_slices

__all__ = ["TiltSeriesData", "Species", "Band", "PairGeometry", "pair_geometry", "make_band", "data_slices",
           "batch_sums", "pair_sums", "pair_beam_tilt", "uses_beam_tilt", "zero_parameters",
           "bake", "astigmatism_components", "defocus_from_components", "total_magnification", "zernike_totals",
           "pose_corrections", "magnified_frequencies", "pair_ctf"]


@dataclass
class TiltSeriesData:
    """One tilt series' images and the metadata the corrections apply to (float64 except the images)."""

    images: torch.Tensor  # [F, H, W] float32 raw tilt images
    angles: torch.Tensor  # [F, 3] rlnTomoXTilt/YTilt/ZRot (deg)
    shifts: torch.Tensor  # [F, 2] rlnTomoX/YShiftAngst (Å)
    defocus: torch.Tensor  # [F, 3] rlnDefocusU, V (Å), angle (deg)
    pre_exposure: torch.Tensor  # [F] e/Å²
    ctf_scale: torch.Tensor  # [F]
    warp: torch.Tensor  # [F, 2, gy, gx] image warp (Å)
    positions: torch.Tensor  # [N, 3] decentred unbinned px
    orientations: torch.Tensor  # [N, 3, 3] A_sub·A_particle
    half_sets: torch.Tensor  # [N] 1 or 2
    pairs: torch.Tensor  # [P, 2] long (particle, tilt) pairs used
    pixel_size: float
    tomogram_size: tuple[int, int, int]
    hand: float
    defocus_slope: float
    voltage: float
    cs: float
    amplitude_contrast: float
    bfactor_per_dose: float = 0.0
    beam_tilt: torch.Tensor | None = None  # [G, 2] rlnBeamTiltX/Y (mrad) per beam-tilt group; None: none
    beam_group: torch.Tensor | None = None  # [F] long: each tilt's group (None: group 0)
    flip_contrast: bool = True  # raw tilt images (dark protein): model −CTF·W; False: +CTF (extracted particles)
    trajectory_angles: torch.Tensor | None = None  # [N, S, 3] deg: poses over dose (None: one sample, none)
    trajectory_shifts: torch.Tensor | None = None  # [N, S, 3] Å
    mag_matrix: torch.Tensor | None = None  # [2, 2] rlnMagMat00..11 (None: identity)
    odd_zernike: torch.Tensor | None = None  # [K] rlnOddZernike (RELION's coefficients, Å⁻¹; beam tilt apart)
    even_zernike: torch.Tensor | None = None  # [K] rlnEvenZernike
    magnify_positions: bool = True  # the magnification moves image positions too (False: extracted particles)

    @property
    def pose_samples(self) -> int:
        return 1 if self.trajectory_angles is None else int(self.trajectory_angles.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[1])

    @property
    def n_beam_groups(self) -> int:
        return 1 if self.beam_tilt is None else int(self.beam_tilt.shape[0])


def zero_parameters(data: TiltSeriesData) -> TiltSeriesParameters:
    """All-zero corrections shaped for ``data`` (its warp grid and beam-tilt groups)."""
    return TiltSeriesParameters.zeros(len(data.positions), len(data.angles),
                                      (data.warp.shape[-1], data.warp.shape[-2]), device=data.positions.device,
                                      n_beam_groups=data.n_beam_groups, pose_samples=data.pose_samples)


def _active(t: torch.Tensor) -> bool:
    """Whether a correction tensor takes part in the model (refined, or non-zero)."""
    return t.requires_grad or bool((t != 0).any())


def total_magnification(data: TiltSeriesData, params: TiltSeriesParameters) -> torch.Tensor | None:
    """The magnification matrix ``[2, 2]`` (metadata + ``MAG_UNIT``·correction), or None when there is none (the
    model then skips it entirely)."""
    if data.mag_matrix is None and not _active(params.magnification):
        return None
    base = data.mag_matrix if data.mag_matrix is not None else \
        torch.eye(2, dtype=params.magnification.dtype, device=params.magnification.device)
    return base + MAG_UNIT * params.magnification


def _plus(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` with the shorter vector zero-padded (coefficient lists of different maximum order)."""
    if a is None:
        return b
    n = max(a.shape[-1], b.shape[-1])
    return torch.nn.functional.pad(a, (0, n - a.shape[-1])) + torch.nn.functional.pad(b, (0, n - b.shape[-1]))


def zernike_totals(data: TiltSeriesData, params: TiltSeriesParameters
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RELION's odd and even Zernike coefficients (metadata + the refined trefoil / 4th-order terms), each None
    when absent (beam tilt apart: :func:`pair_beam_tilt`)."""
    odd = _plus(data.odd_zernike, odd_from_trefoil(params.trefoil)) \
        if data.odd_zernike is not None or _active(params.trefoil) else None
    even = _plus(data.even_zernike, even_from_fourth_order(params.fourth_order)) \
        if data.even_zernike is not None or _active(params.fourth_order) else None
    return odd, even


def pose_corrections(data: TiltSeriesData, params: TiltSeriesParameters, n: torch.Tensor, f: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair ``(rotation vector [P, 3] deg, position change [P, 3] Å)``: the particle's correction plus, with
    several temporal samples, its trajectory (metadata + correction) interpolated at tilt ``f``'s dose."""
    angles, shifts = params.particle_angles[n], params.particle_shifts[n]
    S = params.pose_samples
    if data.trajectory_angles is None and S == 1:
        return angles, shifts
    traj_a, traj_s = params.trajectory_angles, params.trajectory_shifts
    if data.trajectory_angles is not None:
        traj_a, traj_s = traj_a + data.trajectory_angles, traj_s + data.trajectory_shifts
    w = dose_sample_weights(data.pre_exposure, traj_a.shape[1])[f].to(traj_a.dtype)  # [P, S]
    return angles + torch.einsum("ps,psd->pd", w, traj_a[n]), shifts + torch.einsum("ps,psd->pd", w, traj_s[n])


def uses_beam_tilt(data: TiltSeriesData, params: TiltSeriesParameters) -> bool:
    """Whether the forward model needs the beam-tilt phase (the data carry a beam tilt, or it is refined/set)."""
    return data.beam_tilt is not None or params.beam_tilt.requires_grad or bool((params.beam_tilt != 0).any())


def pair_beam_tilt(data: TiltSeriesData, params: TiltSeriesParameters, f: torch.Tensor) -> torch.Tensor:
    """Beam tilt ``[P, 2]`` (mrad) of the tilts ``f`` ``[P]``: metadata + correction of their groups."""
    g = data.beam_group[f] if data.beam_group is not None else torch.zeros_like(f)
    bt = params.beam_tilt if data.beam_tilt is None else data.beam_tilt + params.beam_tilt
    return bt[g]


@dataclass
class Species:
    """The two half-maps as padded centred half grids (:class:`cryopipe.core.projector.Projector` layout)."""

    grids: torch.Tensor  # [2, Z, Y, X] complex: half 1, half 2
    centre: int
    pad: float
    box: int  # binned px
    binning: float  # map pixel / tilt-series pixel


@dataclass
class Band:
    """The Fourier pixels scored, their weights and the per-tilt dose weights at them."""

    flat: torch.Tensor  # [M] indices into the flattened [b, b//2+1] half-complex image
    k: torch.Tensor  # [M, 2] (kx, ky) Fourier px
    weights: torch.Tensor  # [M] whitening × half-complex multiplicity
    dose: torch.Tensor  # [F, M] dose weights


@dataclass
class PairGeometry:
    xy: torch.Tensor  # [P, 2] projected centre incl. warp (unbinned px)
    depth: torch.Tensor  # [P] px
    matrices: torch.Tensor  # [P, 3, 3] R_f·A_n
    defocus: torch.Tensor  # [P, 3] U, V (Å, depth-corrected), angle (deg)


def astigmatism_components(defocus: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` (U, V, angle°) → (mean, (U−V)/2·cos 2θ, (U−V)/2·sin 2θ) in Å."""
    u, v, a = defocus.unbind(-1)
    dev, a2 = 0.5 * (u - v), 2.0 * torch.deg2rad(a)
    return torch.stack([0.5 * (u + v), dev * torch.cos(a2), dev * torch.sin(a2)], -1)


def defocus_from_components(c: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`astigmatism_components` (U ≥ V; angle in (−90°, 90°])."""
    mean, c1, c2 = c.unbind(-1)
    dev = torch.sqrt(c1 * c1 + c2 * c2 + 1e-12)
    return torch.stack([mean + dev, mean - dev, torch.rad2deg(0.5 * torch.atan2(c2, c1))], -1)


def pair_geometry(data: TiltSeriesData, params: TiltSeriesParameters, n: torch.Tensor, f: torch.Tensor
                  ) -> PairGeometry:
    """Refined geometry and defocus of pairs ``(n [P], f [P])`` (differentiable in ``params``)."""
    px = data.pixel_size
    R = tilt_rotation(*(data.angles[f] + params.tilt_angles[f]).unbind(-1))  # [P, 3, 3]
    c = torch.tensor([s // 2 for s in data.tomogram_size], dtype=R.dtype, device=R.device)
    W, H = data.image_size
    rotation, shift = pose_corrections(data, params, n, f)
    p = data.positions[n] + shift / px
    q = torch.einsum("pij,pj->pi", R, p - c)
    xy = q[:, :2] + (data.shifts[f] + params.tilt_shifts[f]) / px
    centre = torch.tensor([W // 2, H // 2], dtype=R.dtype, device=R.device)
    xy = xy + centre
    mag = total_magnification(data, params)
    if mag is not None and data.magnify_positions:  # x_observed − centre = Mᵀ·(x − centre)
        xy = centre + (xy - centre) @ mag.to(xy.dtype)
    xy = xy + warp_at(data.warp + params.warp, f, xy, (W, H)) / px
    A = data.orientations[n] @ rotation_from_vector(rotation)
    comp = astigmatism_components(data.defocus[f]) + params.defocus[f] * DEFOCUS_UNIT_A
    dz = q[:, 2] * (data.hand * px * data.defocus_slope) + params.defocus_mean[f] * DEFOCUS_UNIT_A
    comp = torch.stack([comp[:, 0] + dz, comp[:, 1], comp[:, 2]], -1)
    return PairGeometry(xy, q[:, 2], R @ A, defocus_from_components(comp))


def magnified_frequencies(k: torch.Tensor, mag: torch.Tensor | None) -> torch.Tensor:
    """The undistorted frequencies ``M·k`` ``[..., 2]`` of observed frequencies ``k`` ``[..., 2]`` (any unit) under
    RELION's magnification matrix ``M`` ``[2, 2]`` (rlnMagMat; None: ``k`` unchanged)."""
    return k if mag is None else k.to(mag.dtype) @ mag.T


def pair_ctf(data: TiltSeriesData, defocus: torch.Tensor, f: torch.Tensor, kx_per_A: torch.Tensor,
             ky_per_A: torch.Tensor, even: torch.Tensor | None, dose: torch.Tensor) -> torch.Tensor:
    """The model's CTF factor ``c = ∓CTF·W·scale`` ``[P, ...]`` (float64) of pairs with ``defocus`` ``[P, 3]`` (U, V
    Å, angle °) in tilts ``f`` ``[P]``, at frequencies ``kx_per_A, ky_per_A`` (Å⁻¹, the undistorted ``M·k``;
    broadcasting with ``[P, ...]``); ``even``: RELION's even Zernike coefficients ``[K]`` added to the CTF phase
    ``γ`` (None: none); ``dose`` ``[P, ...]`` the dose weights. ``−CTF = sin γ`` for raw tilt images
    (``data.flip_contrast``: dark protein), ``+CTF`` otherwise."""
    shape = (-1,) + (1,) * (kx_per_A.dim() - 1)
    u, v, angle = (defocus[:, i].reshape(shape) for i in range(3))
    gamma = ctf_gamma(kx_per_A, ky_per_A, u, v, angle, data.voltage, data.cs, data.amplitude_contrast)
    if even is not None:
        gamma = gamma + zernike_phase(kx_per_A, ky_per_A, even, odd=False)
    c = torch.sin(gamma) * dose * data.ctf_scale[f].reshape(shape)
    return c if data.flip_contrast else -c


def make_band(data: TiltSeriesData, species: Species, k_max: float, k_min: float = 2.0,
              batch_pairs: int = 256) -> Band:
    """Band pixels ``k_min ≤ |k| ≤ k_max`` (Fourier px of the species box) with whitening weights from the average
    power spectrum of the tilt series' particle images (cut at the current, uncorrected positions)."""
    b = species.box
    flat, k = slice_coordinates(b, min(k_max, b // 2 - 1), device=data.images.device)
    r = torch.sqrt((k * k).sum(-1))
    keep = r >= k_min
    flat, k, r = flat[keep], k[keep], r[keep]
    shell = torch.round(r).long()
    power = torch.zeros(b // 2 + 2, dtype=torch.float64, device=k.device)
    count = torch.zeros_like(power)
    zero = zero_parameters(data)
    with torch.no_grad():
        for s in range(0, len(data.pairs), batch_pairs):
            n, f = data.pairs[s:s + batch_pairs].unbind(-1)
            xy = pair_geometry(data, zero, n, f).xy
            X = cut_particle_slices(data.images, f, xy, b, species.binning).reshape(len(n), -1)[:, flat]
            power.index_add_(0, shell, (X.abs() ** 2).sum(0).to(torch.float64))
            count.index_add_(0, shell, torch.full_like(r, float(len(n))))
    ps = power / count.clamp(min=1)
    w = 1.0 / ps[shell].clamp(min=1e-30)
    w = w * torch.where(k[:, 0] > 0, 2.0, 1.0) / w.mean()
    pixel = data.pixel_size * species.binning
    dose = dose_weights(b, pixel, data.pre_exposure, data.bfactor_per_dose, device=k.device).reshape(
        len(data.pre_exposure), -1)[:, flat]
    return Band(flat, k, w.to(torch.float64), dose.to(torch.float64))


def data_slices(data: TiltSeriesData, species: Species, band: Band, f: torch.Tensor, centres: torch.Tensor
                ) -> torch.Tensor:
    """Band pixels ``[P, M]`` (complex) of the particle FTs cut at ``centres`` ``[P, 2]`` in tilts ``f`` ``[P]``."""
    X = cut_particle_slices(data.images, f, centres, species.box, species.binning)
    return X.reshape(len(f), -1)[:, band.flat]


def _model_and_data(data: TiltSeriesData, species: Species, band: Band, params: TiltSeriesParameters,
                    n: torch.Tensor, f: torch.Tensor, centres: torch.Tensor, X: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference ``[P, M]``, data ``[P, M]``) complex for pairs ``(n, f)``; ``centres`` ``[P, 2]`` = ``q₀``;
    ``X``: the data slices if already cut (:func:`data_slices`)."""
    b = species.box
    geo = pair_geometry(data, params, n, f)
    rdt = species.grids.real.dtype
    mag = total_magnification(data, params)
    k = magnified_frequencies(band.k, mag)  # the undistorted frequency M·k
    points = central_slice_points(geo.matrices, k, species.pad).to(rdt)
    ref = sample_half_grids(species.grids, species.centre, points, data.half_sets[n] - 1)
    pixel = data.pixel_size * species.binning
    kA = k / (b * pixel)
    odd, even = zernike_totals(data, params)
    c = pair_ctf(data, geo.defocus, f, kA[None, :, 0], kA[None, :, 1], even, band.dose[f])
    d = (geo.xy - centres) / species.binning  # model moves by +d (binned px)
    phase = (-2.0 * math.pi / b) * (d @ band.k.T.to(d.dtype))
    if uses_beam_tilt(data, params):
        bt = pair_beam_tilt(data, params, f)
        phase = phase + beam_tilt_phase(kA[None, :, 0], kA[None, :, 1], bt[:, :1], bt[:, 1:], data.voltage, data.cs)
    if odd is not None:
        phase = phase + zernike_phase(kA[None, :, 0], kA[None, :, 1], odd[None, None, :], odd=True)
    model = ref * torch.complex((c * torch.cos(phase)).to(rdt), (c * torch.sin(phase)).to(rdt))
    if X is None:
        X = data_slices(data, species, band, f, centres)
    return model, X.to(model.dtype)


def pair_sums(data: TiltSeriesData, species: Species, band: Band, params: TiltSeriesParameters,
              rows: slice, centres: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
    """Per pair ``[P, 3]`` (float64): ``Σ_k w·Re(X·R̄)``, ``Σ_k w|R|²``, ``Σ_k w|X|²`` over the band, for the pairs
    ``data.pairs[rows]``; ``centres`` ``[P_all, 2]`` are the fixed cut centres of all pairs; ``X`` these pairs'
    data slices if cached. Differentiable in ``params``."""
    n, f = data.pairs[rows].unbind(-1)
    model, X = _model_and_data(data, species, band, params, n, f, centres[rows], X)
    w = band.weights.to(model.real.dtype)
    s_ab = ((X.real * model.real + X.imag * model.imag) * w).sum(-1)
    s_bb = ((model.real ** 2 + model.imag ** 2) * w).sum(-1)
    s_aa = ((X.real ** 2 + X.imag ** 2) * w).sum(-1)
    return torch.stack([s_ab, s_bb, s_aa], -1).to(torch.float64)


def batch_sums(data: TiltSeriesData, species: Species, band: Band, params: TiltSeriesParameters,
               rows: slice, centres: torch.Tensor, X: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Σ w·Re(X·R̄), Σ w|R|², Σ w|X|²)`` (float64 scalars): :func:`pair_sums` summed over the pairs."""
    return tuple(pair_sums(data, species, band, params, rows, centres, X).sum(0).unbind(0))


def bake(data: TiltSeriesData, params: TiltSeriesParameters, groups) -> TiltSeriesData:
    """The metadata with the (gauge-fixed) corrections applied; corrections can then restart from zero. The
    magnification and Zernike corrections become metadata values (RELION's matrix and coefficients; a refined group
    is always written, even at zero), trajectory corrections add to the metadata's. The orientation takes the
    particle's rotation ``A·Exp(δ)`` while a pair's trajectory vector ``τ`` was combined as ``A·Exp(δ + τ)`` and is
    then applied as ``A·Exp(δ)·Exp(τ)``: the same to first order (they differ by at most ``½|δ|·|τ|``
    rad, 0.08° for 3° each)."""
    p = gauge_fixed(params.detached(), groups)
    comp = astigmatism_components(data.defocus) + p.defocus * DEFOCUS_UNIT_A
    comp[:, 0] += p.defocus_mean * DEFOCUS_UNIT_A
    beam_tilt = data.beam_tilt
    if beam_tilt is not None or bool((p.beam_tilt != 0).any()):
        beam_tilt = p.beam_tilt if beam_tilt is None else beam_tilt + p.beam_tilt
    odd, even = zernike_totals(data, p)
    mag = total_magnification(data, p)
    if "oddzernike" in groups and odd is None:  # refined (to zero): the output still says so
        odd = odd_from_trefoil(p.trefoil)
    if "evenzernike" in groups and even is None:
        even = even_from_fourth_order(p.fourth_order)
    if "magnification" in groups and mag is None:
        mag = torch.eye(2, dtype=p.magnification.dtype, device=p.magnification.device)
    out = replace(data, angles=data.angles + p.tilt_angles, shifts=data.shifts + p.tilt_shifts,
                  defocus=defocus_from_components(comp), warp=data.warp + p.warp, beam_tilt=beam_tilt,
                  positions=data.positions + p.particle_shifts / data.pixel_size,
                  orientations=data.orientations @ rotation_from_vector(p.particle_angles),
                  mag_matrix=mag, odd_zernike=odd, even_zernike=even)
    if p.pose_samples > 1:
        base_a = data.trajectory_angles if data.trajectory_angles is not None else 0.0
        base_s = data.trajectory_shifts if data.trajectory_shifts is not None else 0.0
        out = replace(out, trajectory_angles=base_a + p.trajectory_angles, trajectory_shifts=base_s + p.trajectory_shifts)
    return out
