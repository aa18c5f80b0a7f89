"""Simulated micrographs with particles at known coordinates (ground truth for picking and extraction).

Two stages, kept apart so that a tilt-series simulator can reuse the second one:

* **geometry** — *what projects where*: :func:`place_particles` (non-overlapping integer coordinates, away from
  the edges and from contamination), :func:`random_blobs` (contamination), :func:`render_projections` (the
  noise-free, CTF-free projection image: each particle's projection, computed in one batched projector call per
  chunk, scatter-added into the micrograph with the projection centre pixel ``N//2`` at the coordinate — no
  per-particle FFTs);
* **image formation** — :func:`apply_ctf_micrograph` (whole-micrograph CTF in Fourier space),
  :func:`ice_background` (smooth ramp + offset), :func:`blob_image` (contamination), negation (dark particles,
  as in raw micrographs) and white Gaussian noise; for data as hard as real micrographs (issue 11,
  :data:`HARD_MICROGRAPHS`) also an ice-thickness map (:func:`ice_thickness_map`: linear ramp plus a sinusoid)
  that darkens the image and raises the noise where the ice is thicker, large dark contamination and a carbon
  edge (:func:`carbon_edge_mask`: the rim of the carbon film around a hole; no particles on the carbon).

The recipe follows the RELION fixtures' ``mic/`` (README §6): projections added at integer pixels, whole
micrograph multiplied by the CTF, negated, noise added with SNR = (mean over particles of the variance of the CTF
signal within ``signal_radius_px`` of each coordinate) / σ². σ is set per micrograph from its own particles (so
every micrograph has the requested SNR; its defocus changes the signal variance), unless a fixed ``noise_sigma``
is given; a micrograph without particles keeps the previous σ. Ice ramp and contamination are added after the
CTF (low-frequency / amplitude-contrast features). The thickness-dependent darkening, the carbon film and the
noise increase (``σ(x) = σ·(1 + ice_noise_increase·t(x))``, ``t`` the thickness map in [0, 1]) are in units of
that σ. All of these are off by default, and their random draws come from their own stream, so that settings
without them reproduce earlier simulations exactly.

Outputs of :func:`simulate_micrographs` in ``out_dir``: ``Micrographs/micNNN.mrc``, ``micrographs.star``
(RELION 3.1, CtfFind-like columns), ``Micrographs/micNNN_truth.star`` (rlnCoordinateX/Y + true angles),
``coords_truth_list.star`` (table ``coordinate_files``), ``micrographs_truth.star`` (per-micrograph ice, noise,
counts), ``contamination_truth.star`` (blobs) and ``truth_map.mrc``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.fourier import irfft2_centered
from cryopipe.core.geometry import euler_to_matrix, random_orientations
from cryopipe.core.projector import Projector
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import write_mrc
from cryopipe.io.star import write_star
from cryopipe.sim.particles import (
    _volume_tensor,
    add_gaussian_noise,
    ctf_images,
    estimate_particle_radius,
    noise_sigma_for_snr,
    optics_table,
    random_ctf_parameters,
    seeded_generator,
)

__all__ = [
    "MicrographGeometry",
    "MicrographSimulation",
    "place_particles",
    "random_blobs",
    "render_projections",
    "apply_ctf_micrograph",
    "ice_background",
    "blob_image",
    "particle_signal_variance",
    "ice_thickness_map",
    "carbon_edge_mask",
    "random_carbon_edge",
    "HARD_MICROGRAPHS",
    "simulate_micrographs",
]


#: width (px) of the raised-cosine edge of contamination blobs
BLOB_EDGE_PX = 8.0

#: The recipe of issue 11 for micrographs as hard as real data (keywords of :func:`simulate_micrographs`; use with
#: 2048² micrographs, 1.5 Å/px, SNR 0.05 and the ~128 Å D2 assembly of 3ENL): thicker ice darker by up to 1.3
#: noise σ and 20 % noisier, varying linearly across the micrograph plus a sinusoid (35 % of the range); on 60 %
#: of the micrographs 2–3 dark contamination blobs of 300–600 Å diameter at 3–6 noise σ with a 3-px edge.
#: ``carbon_probability`` (carbon edges) is left to the caller.
HARD_MICROGRAPHS: dict = {
    "ice_darkening": 1.3,
    "ice_noise_increase": 0.2,
    "ice_sine_fraction": 0.35,
    "n_blobs": (2, 3),
    "blob_probability": 0.6,
    "blob_radius_A": (150.0, 300.0),
    "blob_amplitude_noise": 6.0,
    "blob_dark_fraction": 1.0,
    "blob_edge_px": 3.0,
}

# ------------------------------------------------------------------------------------------------ geometry


@dataclass
class MicrographGeometry:
    """What projects where on one micrograph (pixels of the micrograph, x = column, y = row)."""

    shape: tuple[int, int]  #: (ny, nx)
    coords: np.ndarray  #: [P, 2] int (x, y): pixel where the projection centre (N//2, N//2) lands
    angles: np.ndarray  #: [P, 3] RELION (rot, tilt, psi), degrees
    blobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  #: [K, 4] (x, y, radius_px, amplitude)
    carbon_hole: tuple[float, float, float] | None = None  #: (x, y, radius_px) of the hole; carbon outside it


def random_blobs(count: int, shape: tuple[int, int], radius_range_px: tuple[float, float], amplitude: float,
                 rng: np.random.Generator, dark_fraction: float = 0.7) -> np.ndarray:
    """``[count, 4]`` contamination blobs ``(x, y, radius_px, amplitude)``: centres anywhere on the micrograph,
    radius uniform in ``radius_range_px``, amplitude ``±amplitude·U[0.5, 1]`` (negative = dark, with probability
    ``dark_fraction``)."""
    ny, nx = shape
    x = rng.uniform(0, nx, count)
    y = rng.uniform(0, ny, count)
    r = rng.uniform(radius_range_px[0], radius_range_px[1], count)
    sign = np.where(rng.uniform(0, 1, count) < dark_fraction, -1.0, 1.0)
    amp = sign * amplitude * rng.uniform(0.5, 1.0, count)
    return np.stack([x, y, r, amp], axis=1) if count else np.zeros((0, 4))


def place_particles(count: int, shape: tuple[int, int], min_distance_px: float, edge_px: int,
                    rng: np.random.Generator, exclude: np.ndarray | None = None, exclude_margin_px: float = 0.0,
                    max_candidates: int | None = None, allowed: np.ndarray | None = None) -> np.ndarray:
    """Up to ``count`` integer coordinates ``[P, 2]`` (x, y), pairwise ``>= min_distance_px`` apart, at least
    ``edge_px`` from every edge, outside the discs ``exclude`` ``[K, >=3]`` (x, y, radius) enlarged by
    ``exclude_margin_px`` and, with ``allowed`` (bool ``[ny, nx]``), only where it is True. Random sequential
    placement (first come, first kept) among random candidates. Returns fewer than ``count`` when the
    micrograph is full.
    """
    ny, nx = shape
    if nx - 2 * edge_px <= 0 or ny - 2 * edge_px <= 0:
        raise CryopipeError(f"micrograph {nx}x{ny} px is too small for an edge margin of {edge_px} px")
    if count <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    m = max_candidates or max(30 * count, 1000)
    cand = np.stack([rng.integers(edge_px, nx - edge_px, m), rng.integers(edge_px, ny - edge_px, m)], axis=1)
    if exclude is not None and len(exclude):
        d = np.sqrt(((cand[:, None, :2] - exclude[None, :, :2]) ** 2).sum(-1))
        cand = cand[(d >= exclude[None, :, 2] + exclude_margin_px).all(axis=1)]
    if allowed is not None:
        cand = cand[np.asarray(allowed, dtype=bool)[cand[:, 1], cand[:, 0]]]
    if min_distance_px <= 0:
        return np.unique(cand, axis=0)[:count].astype(np.int64)
    # greedy sequential acceptance on a background grid: cells of side d/√2 hold at most one kept point, and
    # a point closer than d to the candidate lies within ±2 cells
    cell = min_distance_px / math.sqrt(2.0)
    occ = np.full((int(ny / cell) + 5, int(nx / cell) + 5), -1, dtype=np.int64)
    d2 = min_distance_px * min_distance_px
    kept: list[int] = []
    for i, (x, y) in enumerate(cand.tolist()):
        gx, gy = int(x / cell) + 2, int(y / cell) + 2
        near = occ[gy - 2:gy + 3, gx - 2:gx + 3]
        near = near[near >= 0]
        if near.size and (((cand[near] - (x, y)) ** 2).sum(axis=1) < d2).any():
            continue
        occ[gy, gx] = i
        kept.append(i)
        if len(kept) == count:
            break
    return cand[kept].astype(np.int64)


def render_projections(projector, angles_deg: torch.Tensor, coords: torch.Tensor, shape: tuple[int, int],
                       chunk: int = 256) -> torch.Tensor:
    """Sum of the particles' projections placed on a micrograph ``[ny, nx]`` (no CTF, no noise).

    ``angles_deg`` ``[P, 3]`` RELION angles, ``coords`` ``[P, 2]`` integer pixels (x, y) where each projection's
    centre pixel ``(N//2, N//2)`` lands. Projections are computed ``chunk`` at a time in one batched call and
    scatter-added (pixels falling outside the micrograph are dropped).
    """
    ny, nx = shape
    dev = angles_deg.device
    out = torch.zeros(ny * nx, dtype=torch.float32, device=dev)
    for c0 in range(0, angles_deg.shape[0], chunk):
        a = angles_deg[c0:c0 + chunk]
        xy = coords[c0:c0 + chunk].to(dev).long()
        rot = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).to(torch.float32)
        ft = projector.project(rot, None)  # [B, n, n//2+1]
        n = ft.shape[-2]
        imgs = irfft2_centered(ft, n)  # [B, n, n]
        off = torch.arange(n, device=dev) - n // 2
        ys = xy[:, 1, None, None] + off[None, :, None]  # [B, n, 1]
        xs = xy[:, 0, None, None] + off[None, None, :]  # [B, 1, n]
        ys, xs = torch.broadcast_tensors(ys, xs)
        valid = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
        out.index_add_(0, (ys * nx + xs)[valid], imgs[valid].to(torch.float32))
    return out.view(ny, nx)


# ------------------------------------------------------------------------------------------------ image formation


def apply_ctf_micrograph(image: torch.Tensor, pixel_size: float, defocus_u: float, defocus_v: float,
                         defocus_angle: float, voltage: float = 300.0, cs: float = 2.7,
                         amplitude_contrast: float = 0.1, phase_shift: float = 0.0, bfactor: float = 0.0
                         ) -> torch.Tensor:
    """Multiply a micrograph ``[ny, nx]`` by the CTF in Fourier space (the whole image at once).

    A non-square micrograph is zero-padded to the square of its longer side, filtered and cropped back.
    """
    ny, nx = image.shape
    n = max(ny, nx)
    img = image
    if ny != nx:
        img = torch.zeros(n, n, dtype=image.dtype, device=image.device)
        img[:ny, :nx] = image
    # the CTF is real and even, so the phase origin of the FT does not matter: plain rfft2/irfft2
    params = {"rlnDefocusU": defocus_u, "rlnDefocusV": defocus_v, "rlnDefocusAngle": defocus_angle,
              "rlnPhaseShift": phase_shift, "rlnCtfBfactor": bfactor}
    c = ctf_images(n, pixel_size, params, voltage, cs, amplitude_contrast, device=image.device)[0]
    out = torch.fft.irfft2(torch.fft.rfft2(img) * c, s=(n, n))
    return out[:ny, :nx]


def ice_background(shape: tuple[int, int], offset: float, gradient_x: float, gradient_y: float,
                   device=None) -> torch.Tensor:
    """Smooth ice-thickness background ``offset + gx·(x − nx/2)/nx + gy·(y − ny/2)/ny`` (``gx``, ``gy`` =
    change across the whole micrograph, same units as the image)."""
    ny, nx = shape
    x = (torch.arange(nx, device=device, dtype=torch.float32) - nx / 2) / nx
    y = (torch.arange(ny, device=device, dtype=torch.float32) - ny / 2) / ny
    return offset + gradient_x * x[None, :] + gradient_y * y[:, None]


def blob_image(blobs: np.ndarray, shape: tuple[int, int], edge_px: float = BLOB_EDGE_PX, device=None) -> torch.Tensor:
    """Contamination image: soft-edged discs ``(x, y, radius_px, amplitude)``, a raised-cosine edge of
    ``edge_px`` outside the radius. Each disc is evaluated in its own bounding window (few large blobs)."""
    ny, nx = shape
    out = torch.zeros(ny, nx, dtype=torch.float32, device=device)
    for x, y, r, amp in np.asarray(blobs, dtype=np.float64).reshape(-1, 4):
        x0, x1 = max(0, int(math.floor(x - r - edge_px))), min(nx, int(math.ceil(x + r + edge_px)) + 1)
        y0, y1 = max(0, int(math.floor(y - r - edge_px))), min(ny, int(math.ceil(y + r + edge_px)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = torch.arange(x0, x1, device=device, dtype=torch.float32) - x
        gy = torch.arange(y0, y1, device=device, dtype=torch.float32) - y
        d = torch.sqrt(gy[:, None] ** 2 + gx[None, :] ** 2) - r
        w = torch.where(d <= 0, torch.ones_like(d),
                        torch.where(d >= edge_px, torch.zeros_like(d), 0.5 + 0.5 * torch.cos(math.pi * d / edge_px)))
        out[y0:y1, x0:x1] += float(amp) * w
    return out


def ice_thickness_map(shape: tuple[int, int], direction_rad: float, sine_fraction: float = 0.0,
                      sine_period_px: float = 1.0, sine_direction_rad: float = 0.0, sine_phase_rad: float = 0.0,
                      device=None) -> torch.Tensor:
    """Relative ice thickness ``t`` ``[ny, nx]`` in ``[0, 1]`` (0 = thinnest, 1 = thickest pixel).

    ``t`` is the min–max normalised sum of a linear ramp across the micrograph (from −½ to ½ along the unit
    vector at ``direction_rad`` from the x axis, measured over the micrograph's extent in that direction) and
    ``sine_fraction · sin(2π·u/sine_period_px + sine_phase_rad)`` with ``u`` the position (px) along
    ``sine_direction_rad``. ``sine_fraction = 0``: a pure linear ramp.
    """
    ny, nx = shape
    y = torch.arange(ny, device=device, dtype=torch.float32)[:, None] - (ny - 1) / 2.0
    x = torch.arange(nx, device=device, dtype=torch.float32)[None, :] - (nx - 1) / 2.0
    c, s = math.cos(direction_rad), math.sin(direction_rad)
    extent = abs(c) * (nx - 1) + abs(s) * (ny - 1)
    t = (c * x + s * y) / max(extent, 1.0)
    if sine_fraction:
        u = math.cos(sine_direction_rad) * x + math.sin(sine_direction_rad) * y
        t = t + sine_fraction * torch.sin(2 * math.pi * u / float(sine_period_px) + sine_phase_rad)
    t = t.expand(ny, nx)
    lo, hi = t.min(), t.max()
    return (t - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(t)


def carbon_edge_mask(shape: tuple[int, int], hole: tuple[float, float, float], edge_px: float = 3.0,
                     device=None) -> torch.Tensor:
    """Carbon film around a hole: ``[ny, nx]`` in ``[0, 1]``, 1 on the carbon (outside the circle
    ``hole = (x, y, radius)`` in pixels), 0 in the hole, a raised-cosine edge of ``edge_px`` just outside the
    radius."""
    ny, nx = shape
    hx, hy, hr = (float(v) for v in hole)
    y = torch.arange(ny, device=device, dtype=torch.float64)[:, None] - hy
    x = torch.arange(nx, device=device, dtype=torch.float64)[None, :] - hx
    d = torch.sqrt(x * x + y * y) - hr
    if edge_px <= 0:
        return (d > 0).to(torch.float32)
    w = torch.where(d <= 0, torch.zeros_like(d),
                    torch.where(d >= edge_px, torch.ones_like(d), 0.5 - 0.5 * torch.cos(math.pi * d / edge_px)))
    return w.to(torch.float32)


def random_carbon_edge(shape: tuple[int, int], hole_radius_px: float, coverage: tuple[float, float],
                       rng: np.random.Generator) -> tuple[float, float, float]:
    """A hole ``(x, y, radius)`` (px) whose rim crosses the micrograph so that the carbon covers a fraction of it
    drawn uniformly from ``coverage``: the hole centre lies on a random direction from the micrograph centre at
    the distance that leaves that fraction outside the circle (bisection on a grid of ≤ 256² points)."""
    ny, nx = shape
    frac = float(rng.uniform(*coverage))
    ang = float(rng.uniform(0, 2 * math.pi))
    step = max(1, min(ny, nx) // 256)
    gy, gx = np.mgrid[0:ny:step, 0:nx:step]
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0

    def carbon_fraction(dist: float) -> float:
        hx, hy = cx + dist * math.cos(ang), cy + dist * math.sin(ang)
        return float((((gx - hx) ** 2 + (gy - hy) ** 2) > hole_radius_px ** 2).mean())

    lo, hi = 0.0, hole_radius_px + math.hypot(nx, ny)
    for _ in range(40):  # carbon fraction grows with the distance of the hole centre
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if carbon_fraction(mid) < frac else (lo, mid)
    d = 0.5 * (lo + hi)
    return cx + d * math.cos(ang), cy + d * math.sin(ang), float(hole_radius_px)


def particle_signal_variance(image: torch.Tensor, coords: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Per particle, the variance of ``image`` ``[ny, nx]`` within ``radius_px`` of its coordinate ``(x, y)``
    (pixels outside the micrograph are ignored). Returns ``[P]``."""
    ny, nx = image.shape
    r = int(math.ceil(radius_px))
    off = torch.arange(-r, r + 1, device=image.device)
    disc = (off[:, None] ** 2 + off[None, :] ** 2) <= radius_px ** 2
    xy = coords.to(image.device).long()
    ys = (xy[:, 1, None, None] + off[None, :, None]).expand(-1, -1, len(off))
    xs = (xy[:, 0, None, None] + off[None, None, :]).expand(-1, len(off), -1)
    valid = disc[None] & (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
    vals = image[ys.clamp(0, ny - 1), xs.clamp(0, nx - 1)].to(torch.float64) * valid
    cnt = valid.sum(dim=(1, 2)).clamp(min=1)
    mean = vals.sum(dim=(1, 2)) / cnt
    return (vals ** 2).sum(dim=(1, 2)) / cnt - mean ** 2


# ------------------------------------------------------------------------------------------------ the simulation


@dataclass
class MicrographSimulation:
    """What :func:`simulate_micrographs` wrote."""

    micrographs_star: Path
    coords_list_star: Path
    truth_star: Path  #: micrographs_truth.star
    contamination_star: Path | None
    map_path: Path | None
    micrograph_paths: list[Path]
    coordinate_paths: list[Path]
    geometry: list[MicrographGeometry]
    micrographs: pd.DataFrame  #: the data_micrographs table
    truth: pd.DataFrame  #: micrographs_truth.star: per micrograph ice, noise σ, signal variance, counts
    noise_sigmas: np.ndarray  #: [n_micrographs] noise standard deviation used
    signal_variances: np.ndarray  #: [n_micrographs] particle signal variance (NaN without particles)


def simulate_micrographs(
    volume,
    n_micrographs: int,
    pixel_size: float,
    snr: float,
    out_dir: str | os.PathLike,
    *,
    size: int | tuple[int, int] = 1024,
    particles_per_micrograph: int = 50,
    min_distance_px: float | None = None,
    edge_px: int | None = None,
    seed: int = 0,
    defocus_range: tuple[float, float] = (10000.0, 25000.0),
    astigmatism_A: float = 1000.0,
    phase_shift_range: tuple[float, float] | None = None,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    ctf: bool = True,
    dark_particles: bool = True,
    ice_offset: float = 0.0,
    ice_gradient: float = 0.0,
    n_blobs: int | tuple[int, int] = 0,
    blob_radius_A: tuple[float, float] = (100.0, 300.0),
    blob_amplitude: float = 5.0,
    blob_probability: float = 1.0,
    blob_amplitude_noise: float | None = None,
    blob_dark_fraction: float = 0.7,
    blob_edge_px: float = BLOB_EDGE_PX,
    ice_darkening: float = 0.0,
    ice_noise_increase: float = 0.0,
    ice_sine_fraction: float = 0.0,
    ice_sine_period_A: tuple[float, float] = (1500.0, 4000.0),
    carbon_probability: float = 0.0,
    carbon_amplitude: float = 1.5,
    carbon_coverage: tuple[float, float] = (0.1, 0.3),
    carbon_hole_radius_A: float = 6000.0,
    signal_radius_px: float | None = None,
    noise_sigma: float | None = None,
    dtype: str = "float32",
    chunk: int = 256,
    image_root: str | os.PathLike | None = None,
    mic_dir: str = "Micrographs",
    write_map: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> MicrographSimulation:
    """Simulate micrographs of ``volume`` with particles at known, non-overlapping coordinates.

    Args:
        volume: ``[N, N, N]`` map ``[z, y, x]`` centred at voxel ``N//2``.
        n_micrographs: number of micrographs.
        pixel_size: Å per pixel (volume and micrographs).
        snr: particle SNR (module docstring); ``inf`` for noise-free micrographs.
        out_dir: output folder (created).
        size: micrograph side (square) or ``(ny, nx)`` in pixels.
        particles_per_micrograph: particles per micrograph (fewer when they do not fit).
        min_distance_px: minimum distance between particle centres (default ``2·radius + 2`` px with the particle
            radius of :func:`~cryopipe.sim.particles.estimate_particle_radius`).
        edge_px: minimum distance from the micrograph edges (default ``N//2``: the whole box is inside).
        seed: random seed (every random choice, including the noise).
        defocus_range, astigmatism_A, phase_shift_range: per-micrograph CTF (Å, Å, degrees), as
            :func:`~cryopipe.sim.particles.random_ctf_parameters`.
        voltage, cs, amplitude_contrast: optics (kV, mm, fraction).
        ctf: apply the CTF (``False``: projections only).
        dark_particles: negate the image (particles dark, as in raw micrographs).
        ice_offset, ice_gradient: ice background: offset ``U[−1, 1]·ice_offset`` and a linear ramp of total size
            ``ice_gradient`` across the micrograph in a random direction, both in units of the particle signal
            standard deviation.
        n_blobs: contamination blobs per micrograph (soft discs; ``blob_dark_fraction`` of them dark), radius
            uniform in ``blob_radius_A``, amplitude ``blob_amplitude`` × signal standard deviation × U[0.5, 1].
            Particles are kept clear of them. A pair ``(lo, hi)``: a count uniform in ``lo … hi`` per micrograph.
        blob_probability: fraction of micrographs that get blobs at all (each micrograph drawn independently).
        blob_amplitude_noise: blob amplitude in units of the noise σ instead (× U[0.5, 1]).
        blob_dark_fraction: probability that a blob is dark (default 0.7).
        blob_edge_px: width of the blobs' raised-cosine edge (px).
        ice_darkening: ice-thickness map ``t`` in [0, 1] (:func:`ice_thickness_map`, random ramp direction):
            the image is darkened by ``ice_darkening · σ · t`` (σ = noise standard deviation).
        ice_noise_increase: the noise standard deviation is ``σ · (1 + ice_noise_increase · t)``.
        ice_sine_fraction, ice_sine_period_A: sinusoidal part of the thickness map (relative to the ramp's
            range) and the range its period is drawn from (Å).
        carbon_probability: fraction of micrographs with a carbon edge (:func:`random_carbon_edge`: the rim of a
            hole of radius ``carbon_hole_radius_A``, carbon covering a fraction drawn from ``carbon_coverage``),
            darker by ``carbon_amplitude`` × σ; no particles on the carbon.
        signal_radius_px: radius of the SNR measurement (default: the particle radius).
        noise_sigma: use this noise standard deviation instead of deriving it from ``snr``.
        dtype: ``"float32"`` or ``"float16"`` micrographs.
        chunk: particles projected per batched call.
        image_root: directory that ``rlnMicrographName`` paths are relative to (default ``out_dir``).
        mic_dir: sub-folder for micrographs and their truth coordinate files.
        write_map: also write ``truth_map.mrc``.
        device: compute device.
    """
    if n_micrographs < 1:
        raise CryopipeError(f"number of micrographs must be >= 1 (got {n_micrographs})")
    if pixel_size <= 0:
        raise CryopipeError(f"pixel size must be > 0 Å (got {pixel_size})")
    if dtype not in ("float32", "float16"):
        raise CryopipeError(f"micrograph dtype {dtype!r}: use float32 or float16")
    shape = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
    dev = resolve_device(device)
    vol = _volume_tensor(volume, dev)
    box = vol.shape[-1]
    radius = estimate_particle_radius(vol)
    sig_radius = float(signal_radius_px) if signal_radius_px is not None else radius
    min_d = float(min_distance_px) if min_distance_px is not None else 2 * radius + 2
    edge = int(edge_px) if edge_px is not None else box // 2
    out = Path(out_dir)
    (out / mic_dir).mkdir(parents=True, exist_ok=True)
    root = Path(image_root) if image_root is not None else out
    projector = Projector(vol, pad=2)

    ss = np.random.SeedSequence(int(seed))
    geo_ss, form_ss, hard_ss = ss.spawn(3)  # the first two as before the hard-data options (same streams)
    rng = np.random.default_rng(geo_ss)
    form_rng = np.random.default_rng(form_ss)
    hard_rng = np.random.default_rng(hard_ss)  # draws of the hard-data options only
    blob_range = (int(n_blobs), int(n_blobs)) if np.ndim(n_blobs) == 0 else (int(n_blobs[0]), int(n_blobs[1]))
    any_blobs = blob_range[1] > 0
    ice_map_on = bool(ice_darkening or ice_noise_increase)
    ctf_cols = random_ctf_parameters(n_micrographs, form_rng, defocus_range, astigmatism_A, phase_shift_range)
    digits = max(3, len(str(n_micrographs)))

    geometries: list[MicrographGeometry] = []
    mic_paths: list[Path] = []
    coord_paths: list[Path] = []
    truth_rows: list[dict] = []
    blob_rows: list[dict] = []
    sigma = noise_sigma
    sig_var = float("nan")
    iterator = range(n_micrographs)
    if progress:
        from cryopipe.pipeline.log import progress as progress_lines

        iterator = progress_lines(iterator, desc="simulate micrographs")
    for m in iterator:
        # ---- geometry
        blob_r = (blob_radius_A[0] / pixel_size, blob_radius_A[1] / pixel_size)
        n_b = blob_range[0]
        if blob_range[1] != blob_range[0]:
            n_b = int(hard_rng.integers(blob_range[0], blob_range[1] + 1))
        if any_blobs and blob_probability < 1.0 and not hard_rng.uniform() < blob_probability:
            n_b = 0
        blobs = random_blobs(n_b, shape, blob_r, 1.0, rng, dark_fraction=blob_dark_fraction)  # amplitude: below
        hole, allowed = None, None
        if carbon_probability > 0 and hard_rng.uniform() < carbon_probability:
            hole = random_carbon_edge(shape, carbon_hole_radius_A / pixel_size, carbon_coverage, hard_rng)
            gy, gx = np.ogrid[0:shape[0], 0:shape[1]]
            allowed = np.hypot(gx - hole[0], gy - hole[1]) < hole[2] - radius
        coords = place_particles(particles_per_micrograph, shape, min_d, edge, rng, exclude=blobs,
                                 exclude_margin_px=radius + max(BLOB_EDGE_PX, blob_edge_px), allowed=allowed)
        angles = random_orientations(len(coords), rng).numpy()
        geom = MicrographGeometry(shape=shape, coords=coords, angles=angles, blobs=blobs, carbon_hole=hole)
        coords_t = torch.as_tensor(coords, device=dev)
        img = render_projections(projector, torch.as_tensor(angles, dtype=torch.float32, device=dev), coords_t,
                                 shape, chunk=chunk)
        # ---- image formation
        if ctf:
            img = apply_ctf_micrograph(img, pixel_size, float(ctf_cols["rlnDefocusU"][m]),
                                       float(ctf_cols["rlnDefocusV"][m]), float(ctf_cols["rlnDefocusAngle"][m]),
                                       voltage, cs, amplitude_contrast, float(ctf_cols["rlnPhaseShift"][m]))
        if dark_particles:
            img = -img
        if len(coords):
            sig_var = float(particle_signal_variance(img, coords_t, sig_radius).mean())
            if noise_sigma is None:
                sigma = noise_sigma_for_snr(sig_var, snr)
        unit = math.sqrt(sig_var) if not math.isnan(sig_var) else 1.0
        noise_unit = float(sigma) if sigma is not None else 1.0
        if blob_amplitude_noise is not None:
            geom.blobs[:, 3] *= blob_amplitude_noise * noise_unit
        else:
            geom.blobs[:, 3] *= blob_amplitude * unit
        off = float(form_rng.uniform(-1, 1)) * ice_offset * unit
        direction = float(form_rng.uniform(0, 2 * math.pi))
        gx, gy = ice_gradient * unit * math.cos(direction), ice_gradient * unit * math.sin(direction)
        if ice_offset or ice_gradient:
            img = img + ice_background(shape, off, gx, gy, device=dev)
        if len(geom.blobs):
            img = img + blob_image(geom.blobs, shape, edge_px=blob_edge_px, device=dev)
        thickness = None
        ice_row: dict = {}
        if ice_map_on:
            t_dir = float(hard_rng.uniform(0, 2 * math.pi))
            s_dir = float(hard_rng.uniform(0, 2 * math.pi))
            s_phase = float(hard_rng.uniform(0, 2 * math.pi))
            s_period = float(hard_rng.uniform(*ice_sine_period_A)) / pixel_size
            thickness = ice_thickness_map(shape, t_dir, ice_sine_fraction, s_period, s_dir, s_phase, device=dev)
            img = img - (ice_darkening * noise_unit) * thickness
            ice_row = {"cryopipeIceThicknessDirection": math.degrees(t_dir),
                       "cryopipeIceSineDirection": math.degrees(s_dir), "cryopipeIceSinePeriod": s_period,
                       "cryopipeIceSinePhase": math.degrees(s_phase),
                       "cryopipeIceDarkening": ice_darkening * noise_unit,
                       "cryopipeIceNoiseIncrease": float(ice_noise_increase)}
        if hole is not None:
            img = img - (carbon_amplitude * noise_unit) * carbon_edge_mask(shape, hole, device=dev)
        if carbon_probability > 0:  # radius −1: no carbon on this micrograph
            hx, hy, hr = hole if hole is not None else (0.0, 0.0, -1.0)
            ice_row.update({"cryopipeCarbonHoleX": hx, "cryopipeCarbonHoleY": hy, "cryopipeCarbonHoleRadius": hr})
        if sigma is None:
            raise CryopipeError(f"micrograph {m + 1} has no particles (and none before it), so the noise level cannot "
                                "be set from the SNR; give noise_sigma or make room for particles")
        if sigma > 0:
            gen = seeded_generator(int(form_ss.generate_state(1)[0]), m, dev)
            thicker = (1.0 + ice_noise_increase * thickness) if thickness is not None and ice_noise_increase else None
            img = add_gaussian_noise(img, sigma, gen, thicker)
        # ---- files
        name = f"mic{m + 1:0{digits}d}"
        mic_path = out / mic_dir / f"{name}.mrc"
        write_mrc(mic_path, img.cpu().numpy(), pixel_size, dtype=np.float16 if dtype == "float16" else np.float32)
        coord_path = out / mic_dir / f"{name}_truth.star"
        write_star(coord_path, {"": pd.DataFrame({
            "rlnCoordinateX": coords[:, 0].astype(np.float64), "rlnCoordinateY": coords[:, 1].astype(np.float64),
            "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2]})})
        mic_name = os.path.relpath(mic_path, root)
        truth_rows.append({"rlnMicrographName": mic_name, "cryopipeNumberOfParticles": len(coords),
                           "cryopipeSignalVariance": sig_var,
                           "cryopipeIceOffset": off, "cryopipeIceGradientX": gx, "cryopipeIceGradientY": gy,
                           "cryopipeNoiseSigma": float(sigma), "cryopipeNumberOfBlobs": len(geom.blobs), **ice_row})
        for bx, by, br, ba in geom.blobs:
            blob_rows.append({"rlnMicrographName": mic_name, "rlnCoordinateX": float(bx), "rlnCoordinateY": float(by),
                              "cryopipeBlobRadius": float(br), "cryopipeBlobAmplitude": float(ba)})
        geometries.append(geom)
        mic_paths.append(mic_path)
        coord_paths.append(coord_path)

    mic_names = [r["rlnMicrographName"] for r in truth_rows]
    mics = pd.DataFrame({"rlnMicrographName": mic_names, "rlnOpticsGroup": 1})
    if ctf:
        mics["rlnDefocusU"] = ctf_cols["rlnDefocusU"]
        mics["rlnDefocusV"] = ctf_cols["rlnDefocusV"]
        mics["rlnCtfAstigmatism"] = np.abs(ctf_cols["rlnDefocusU"] - ctf_cols["rlnDefocusV"])
        mics["rlnDefocusAngle"] = ctf_cols["rlnDefocusAngle"]
        if phase_shift_range is not None:
            mics["rlnPhaseShift"] = ctf_cols["rlnPhaseShift"]
        mics["rlnCtfFigureOfMerit"] = 1.0
        mics["rlnCtfMaxResolution"] = 2.0 * pixel_size
    optics = optics_table(pixel_size, box, voltage, cs, amplitude_contrast, "micrographs")
    mics_star = out / "micrographs.star"
    write_star(mics_star, {"optics": optics, "micrographs": mics})
    list_star = out / "coords_truth_list.star"
    write_star(list_star, {"coordinate_files": pd.DataFrame({
        "rlnMicrographName": mic_names,
        "rlnMicrographCoordinates": [os.path.relpath(p, root) for p in coord_paths]})})
    truth_star = out / "micrographs_truth.star"
    truth_df = pd.DataFrame(truth_rows)
    write_star(truth_star, {"micrographs": truth_df})
    cont_star = None
    if any_blobs:
        cont_star = out / "contamination_truth.star"
        cols = ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "cryopipeBlobRadius", "cryopipeBlobAmplitude"]
        write_star(cont_star, {"contamination": pd.DataFrame(blob_rows, columns=cols)})
    map_path = None
    if write_map:
        map_path = out / "truth_map.mrc"
        write_mrc(map_path, vol.cpu().numpy(), pixel_size)
    return MicrographSimulation(
        micrographs_star=mics_star, coords_list_star=list_star, truth_star=truth_star, contamination_star=cont_star,
        map_path=map_path, micrograph_paths=mic_paths, coordinate_paths=coord_paths, geometry=geometries,
        micrographs=mics, truth=truth_df, noise_sigmas=truth_df["cryopipeNoiseSigma"].to_numpy(),
        signal_variances=truth_df["cryopipeSignalVariance"].to_numpy())
