"""Particle averages straight from tilt series (RELION's ``relion_tomo_reconstruct_particle``).

Every visible (particle, tilt) image is cut and CTF·dose-premultiplied (:mod:`cryopipe.tomo.particle_images`)
and inserted into its half set's Fourier accumulators along ``R_f·A`` (tilt rotation × particle orientation) by
:func:`cryopipe.core.slice_insertion.gather_insert_slices`. The accumulators ``Σ c·X`` and ``Σ c²`` add over
batches, tomograms and workers (:class:`ParticleAccumulator`).

Finalising (:func:`finalise_map`): inverse FFT, division by the gridding kernel ``sinc²(r/b)``, FFT again,
division by the weights (Wiener ``Σc² + 1/SNR`` when ``SNR > 0``, else RELION's heuristic: weights below
0.1 % of their shell's mean are raised to it, shells beyond the box's radius zeroed), inverse FFT, then the
centre ``crop³`` with a spherical raised-cosine ``taper`` (pixels) and its mean under the taper removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryopipe.core.fourier import irfft3_centered, radius_3d, rfft3_centered
from cryopipe.core.projector import gridding_correction
from cryopipe.core.slice_insertion import gather_insert_slices
from cryopipe.core.symmetry import symmetry_operators
from cryopipe.core.tilt_geometry import (
    depth_defocus,
    particle_tilt_matrices,
    project_points,
    visible_in_tilts,
)
from cryopipe.tomo.particle_images import ctf_dose_weights, cut_particle_slices

__all__ = ["ParticleAccumulator", "TiltSeriesGeometry", "insert_particle_pairs", "insert_tilt_series_particles",
           "finalise_map", "taper_sphere"]


@dataclass
class TiltSeriesGeometry:
    """What the particle insertion needs from one tilt series (all per tilt ``[F]`` unless said)."""

    projections: torch.Tensor  # [F, 4, 4] float64 (core.tilt_geometry.projection_matrices)
    defocus: torch.Tensor  # [F, 3] (U Å, V Å, angle deg)
    pre_exposure: torch.Tensor  # [F] e/Å²
    ctf_scale: torch.Tensor  # [F]
    pixel_size: float  # unbinned Å
    hand: float
    defocus_slope: float
    voltage: float
    cs: float
    amplitude_contrast: float
    bfactor_per_dose: float = 0.0


class ParticleAccumulator:
    """Two half sets of Fourier sums ``Σ c·X`` (complex) and ``Σ c²`` on ``[b, b, b//2+1]`` grids (float64).

    Sums add: :meth:`merge` another accumulator (another batch, tomogram or worker)."""

    def __init__(self, box: int, device=None):
        self.box = int(box)
        shape = (2, box, box, box // 2 + 1)
        self.data = torch.zeros(shape, dtype=torch.complex128, device=device)
        self.weight = torch.zeros(shape, dtype=torch.float64, device=device)

    def merge(self, other: "ParticleAccumulator") -> None:
        self.data += other.data.to(self.data.device)
        self.weight += other.weight.to(self.weight.device)

    def symmetrised(self, symmetry: str) -> "ParticleAccumulator":
        """Sums averaged over the point group's operators (linear interpolation of both grids)."""
        out = ParticleAccumulator(self.box, device=self.data.device)
        ops = symmetry_operators(symmetry, device=self.data.device)
        if ops.shape[0] == 1:
            out.data, out.weight = self.data.clone(), self.weight.clone()
            return out
        for h in range(2):
            out.data[h], out.weight[h] = _symmetrise_half_grid(self.data[h], self.weight[h], ops)
        return out


def _symmetrise_half_grid(data: torch.Tensor, weight: torch.Tensor, ops: torch.Tensor):
    """Σ_g of both grids sampled at ``g·k`` (trilinear, Hermitian for ``x < 0``)."""
    n = data.shape[0]
    half = n // 2 + 1
    freq = torch.fft.fftfreq(n, d=1.0 / n, device=data.device, dtype=torch.float64)
    kz, ky, kx = torch.meshgrid(freq, freq, torch.arange(half, device=data.device, dtype=torch.float64),
                                indexing="ij")
    k = torch.stack([kx, ky, kz], dim=-1).reshape(-1, 3)
    total_d = torch.zeros_like(data).reshape(-1)
    total_w = torch.zeros_like(weight).reshape(-1)
    for g in ops.to(torch.float64):
        p = k @ g.T
        flip = p[:, 0] < 0
        p = torch.where(flip[:, None], -p, p)
        d, w = _trilinear_half(data, weight, p)
        total_d += torch.where(flip, d.conj(), d)
        total_w += w
    return total_d.reshape(data.shape), total_w.reshape(weight.shape)


def _trilinear_half(data: torch.Tensor, weight: torch.Tensor, p: torch.Tensor):
    n = data.shape[0]
    half = n // 2 + 1
    p0 = torch.floor(p)
    frac = p - p0
    p0 = p0.long()
    out_d = torch.zeros(p.shape[0], dtype=data.dtype, device=data.device)
    out_w = torch.zeros(p.shape[0], dtype=weight.dtype, device=data.device)
    fd, fw = data.reshape(-1), weight.reshape(-1)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                x = p0[:, 0] + dx
                w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                     * (frac[:, 2] if dz else 1 - frac[:, 2]))
                ok = x < half
                idx = ((p0[:, 2] + dz) % n) * (n * half) + ((p0[:, 1] + dy) % n) * half + x.clamp(max=half - 1)
                w = torch.where(ok, w, torch.zeros_like(w))
                out_d += w * fd[idx]
                out_w += w * fw[idx]
    return out_d, out_w


def insert_particle_pairs(accumulator: ParticleAccumulator, images: torch.Tensor, tilt_index: torch.Tensor,
                          centres_px: torch.Tensor, defocus: torch.Tensor, matrices: torch.Tensor,
                          half_sets: torch.Tensor, pre_exposure: torch.Tensor, ctf_scale: torch.Tensor, *,
                          pixel_size: float, binning: float, voltage: float, cs: float, amplitude_contrast: float,
                          bfactor_per_dose: float = 0.0, do_ctf: bool = True, cutoff_fraction: float = 0.01,
                          phase: torch.Tensor | None = None, flip_contrast: bool = True,
                          ctf_factor: torch.Tensor | None = None) -> None:
    """Insert ``P`` (particle, tilt) pairs given one by one (one batch; callers loop over batches).

    ``images`` ``[F, H, W]``; per pair: ``tilt_index`` ``[P]`` (long), ``centres_px`` ``[P, 2]`` projected centre
    (unbinned px, warp included), ``defocus`` ``[P, 3]`` (U, V Å depth-corrected, angle deg), ``matrices``
    ``[P, 3, 3]`` (``R_f·A``), ``half_sets`` ``[P]`` (1 or 2), ``pre_exposure`` ``[P]`` (e/Å²), ``ctf_scale``
    ``[P]``; ``pixel_size`` unbinned Å. ``phase``: optional ``[P, b, b//2+1]`` antisymmetric aberration phase
    (radians, e.g. beam tilt, :func:`cryopipe.core.ctf.beam_tilt_phase`) that the data carry relative to the
    reference; the slices are multiplied by ``exp(−i·phase)`` before insertion (RELION's demodulation).
    ``flip_contrast``: premultiply by ``−CTF·W`` (raw tilt images, dark protein) or, False, ``+CTF·W``.
    ``ctf_factor``: optional ``[P, b, b//2+1]`` factor used instead of the CTF·dose weights computed here (e.g. a
    CTF evaluated at magnified frequencies); the defocus, dose and CTF options are then unused."""
    box = accumulator.box
    slices = cut_particle_slices(images, tilt_index, centres_px, box, binning)
    if phase is not None:
        slices = slices * torch.polar(torch.ones_like(phase), -phase).to(slices.dtype)
    c = ctf_factor
    if c is None:
        c = ctf_dose_weights(box, pixel_size * binning, defocus[:, 0], defocus[:, 1], defocus[:, 2], pre_exposure,
                             voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast, scale=ctf_scale,
                             bfactor_per_dose=bfactor_per_dose, cutoff_fraction=cutoff_fraction, do_ctf=do_ctf,
                             flip_contrast=flip_contrast)
    for h in (1, 2):
        sel = half_sets == h
        if bool(sel.any()):
            gather_insert_slices(accumulator.data[h - 1], accumulator.weight[h - 1], slices[sel] * c[sel],
                                 c[sel] * c[sel], matrices[sel])


def insert_tilt_series_particles(accumulator: ParticleAccumulator, images: torch.Tensor,
                                 geometry: TiltSeriesGeometry, positions_px: torch.Tensor,
                                 orientations: torch.Tensor, half_sets: torch.Tensor, binning: float,
                                 batch_pairs: int = 512, do_ctf: bool = True, cutoff_fraction: float = 0.01,
                                 max_dose: float | None = None) -> int:
    """Insert the particles of one tilt series; returns the number of (particle, tilt) images used.

    ``images``: ``[F, H, W]`` tilt images; ``positions_px``: ``[N, 3]`` decentred unbinned px;
    ``orientations``: ``[N, 3, 3]`` (A_sub·A_particle); ``half_sets``: ``[N]`` 1 or 2. A particle is used in a
    tilt when its centre is at least ``box/2`` unbinned px inside the image (and the tilt's dose ≤
    ``max_dose``). Pairs are processed ``batch_pairs`` at a time (:func:`insert_particle_pairs`)."""
    box = accumulator.box
    F, H, W = images.shape
    q = project_points(geometry.projections.to(positions_px.device), positions_px.to(torch.float64))  # [N, F, 3]
    visible = visible_in_tilts(q[..., :2], (W, H), box / 2.0, geometry.pre_exposure, max_dose)
    particle, tilt = torch.nonzero(visible, as_tuple=True)
    u, v = depth_defocus(geometry.defocus[:, 0], geometry.defocus[:, 1], q[..., 2], geometry.hand,
                         geometry.pixel_size, geometry.defocus_slope)
    matrices = particle_tilt_matrices(geometry.projections[:, :3, :3], orientations.to(torch.float64))
    for start in range(0, particle.numel(), batch_pairs):
        n_idx, f_idx = particle[start:start + batch_pairs], tilt[start:start + batch_pairs]
        insert_particle_pairs(accumulator, images, f_idx, q[n_idx, f_idx, :2],
                              torch.stack([u[n_idx, f_idx], v[n_idx, f_idx], geometry.defocus[f_idx, 2]], -1),
                              matrices[n_idx, f_idx], half_sets[n_idx], geometry.pre_exposure[f_idx],
                              geometry.ctf_scale[f_idx], pixel_size=geometry.pixel_size, binning=binning,
                              voltage=geometry.voltage, cs=geometry.cs,
                              amplitude_contrast=geometry.amplitude_contrast,
                              bfactor_per_dose=geometry.bfactor_per_dose, do_ctf=do_ctf,
                              cutoff_fraction=cutoff_fraction)
    return int(particle.numel())


def taper_sphere(volume: torch.Tensor, width: float) -> torch.Tensor:
    """Spherical raised-cosine taper of ``width`` px ending at radius ``n/2`` (centre ``n/2``), after removing
    the taper-weighted mean inside; zero outside."""
    n = volume.shape[-1]
    m = n / 2.0
    c = torch.arange(n, device=volume.device, dtype=torch.float64) - m
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    w = torch.where(r < m - width, torch.ones_like(r), 0.5 - 0.5 * torch.cos(math.pi * (m - r) / width))
    w = torch.where(r < m, w, torch.zeros_like(r))
    v = volume.to(torch.float64)
    mean = (w * v).sum() / w.sum()
    return (w * (v - mean)).to(volume.dtype)


def finalise_map(data: torch.Tensor, weight: torch.Tensor, snr: float = -1.0, crop: int | None = None,
                 taper: float = 10.0, heuristic_fraction: float = 0.001) -> tuple[torch.Tensor, torch.Tensor]:
    """Map from Fourier sums ``[b, b, b//2+1]``: returns ``(cropped_tapered [crop³], full [b³])`` float32 (see the
    module docstring). ``crop`` ``None`` or ≥ ``b``: the full map is tapered and returned twice."""
    n = data.shape[0]
    real = irfft3_centered(data, n) / gridding_correction(n, n, "trilinear", device=data.device)
    ft = rfft3_centered(real)
    if snr > 0:
        divisor = weight + 1.0 / snr
        ft = ft / divisor
    else:
        r = radius_3d(n, device=data.device, dtype=torch.float64)
        shell = r.floor().long()
        nshell = n // 2 + 1
        inside = shell < nshell
        sums = torch.zeros(nshell, dtype=torch.float64, device=data.device).index_add_(
            0, shell[inside], weight[inside])
        counts = torch.zeros(nshell, dtype=torch.float64, device=data.device).index_add_(
            0, shell[inside], torch.ones_like(weight[inside]))
        mean = sums / counts.clamp(min=1)
        r0 = shell.clamp(max=nshell - 1)
        r1 = (shell + 1).clamp(max=nshell - 1)
        frac = r - r.floor()
        avg = (1 - frac) * mean[r0] + frac * mean[r1]
        threshold = avg * heuristic_fraction
        w = torch.maximum(weight, threshold)
        ft = torch.where((shell + 1 < nshell) & (w > 0), ft / torch.where(w > 0, w, torch.ones_like(w)),
                         torch.zeros_like(ft))
    full = irfft3_centered(ft, n)
    if crop is None or crop >= n:
        return taper_sphere(full, taper).float(), full.float()
    start = (n - crop) // 2
    cropped = full[start:start + crop, start:start + crop, start:start + crop]
    return taper_sphere(cropped, taper).float(), full.float()
