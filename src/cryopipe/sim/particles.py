"""Simulated single-particle data sets with ground truth (particle stacks + RELION 3.1 STAR files).

The simulation is split in two stages, so that later simulators (micrographs, tilt series) reuse them:

* **geometry** — *what projects where*: orientations (uniform on SO(3)), origins (Å), which rows are junk
  (:func:`cryopipe.core.geometry.random_orientations`, :func:`random_origins`, :func:`project_particles`);
* **image formation** — CTF (:func:`random_ctf_parameters`, :func:`ctf_images`), additive white Gaussian noise
  at a requested SNR (:func:`signal_variance`, :func:`noise_sigma_for_snr`), junk images
  (:func:`contamination_images`).

An image with origin ``o`` (Å) and angles ``(rot, tilt, psi)`` is ``IFT[CTF · shift(P_A V̂, −o/apix)] + noise``,
exactly RELION's prediction model (conventions.md). SNR follows the RELION fixtures: variance of the noise-free
CTF-projection pixels within ``signal_radius_px`` of the box centre, pooled over particles, divided by the noise
variance.

:func:`simulate_particles` streams batches of ``batch_size`` images into ``.mrcs`` stacks, so memory stays
bounded for 10^5+ particles, and writes ``particles.star`` (what a user would have: optics, image names, CTF),
``particles_truth.star`` (the same rows with the true angles/origins and the junk label ``cryopipeJunkType``,
which RELION keeps as an unknown label) and ``truth_map.mrc``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.ctf import beam_tilt_phase, ctf_2d
from cryopipe.core.device import resolve_device
from cryopipe.core.fourier import freq_grid_2d, irfft2_centered
from cryopipe.core.geometry import euler_to_matrix, random_orientations
from cryopipe.core.projector import Projector
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import MrcStackWriter, format_image_name, write_mrc
from cryopipe.io.star import write_star

__all__ = [
    "JUNK_NONE",
    "JUNK_EMPTY",
    "JUNK_CONTAMINATION",
    "JUNK_LABEL",
    "ParticleSimulation",
    "random_origins",
    "seeded_generator",
    "add_gaussian_noise",
    "random_ctf_parameters",
    "estimate_particle_radius",
    "project_particles",
    "particle_images",
    "ctf_images",
    "signal_variance",
    "noise_sigma_for_snr",
    "contamination_images",
    "optics_table",
    "simulate_particles",
]

#: values of the truth column :data:`JUNK_LABEL`
JUNK_NONE, JUNK_EMPTY, JUNK_CONTAMINATION = 0, 1, 2
#: truth column: 0 = particle, 1 = empty ice (noise only), 2 = contamination blob. Not an ``rln`` label, so RELION
#: keeps it as an unknown label ("will ignore (but maintain) values").
JUNK_LABEL = "cryopipeJunkType"
#: truth column of ``views=`` simulations: 1-based index of the particle's (rot, tilt) view, 0 for junk
VIEW_LABEL = "cryopipeViewIndex"
SCALE_LABEL = "cryopipeIntensityScale"  # per-micrograph intensity factor (micrograph_scale_spread > 0)

_CTF_COLUMNS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift"]
_TRUTH_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]


# ------------------------------------------------------------------------------------------------ geometry


def random_origins(n: int, max_shift_A: float, rng: np.random.Generator) -> np.ndarray:
    """``[n, 2]`` origins ``(x, y)`` in Å, each uniform in ``[−max_shift_A, max_shift_A]``."""
    return rng.uniform(-max_shift_A, max_shift_A, (n, 2)) if max_shift_A > 0 else np.zeros((n, 2))


def random_ctf_parameters(
    n: int,
    rng: np.random.Generator,
    defocus_range: tuple[float, float] = (5000.0, 30000.0),
    astigmatism_A: float = 1500.0,
    phase_shift_range: tuple[float, float] | None = None,
    bfactor_range: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Per-particle CTF parameters as RELION columns (Å, degrees, Å²).

    ``rlnDefocusU ~ U[defocus_range]``, ``rlnDefocusV = clip(U + U[−astigmatism_A, astigmatism_A], range)``,
    ``rlnDefocusAngle ~ U[0, 180)``; phase shift (deg) and CTF B-factor (Å²) uniform in their ranges (0 when None);
    ``rlnCtfScalefactor`` = 1.
    """
    lo, hi = float(defocus_range[0]), float(defocus_range[1])
    if not (0 < lo <= hi):
        raise CryopipeError(f"defocus range {defocus_range} Å: need 0 < min <= max (underfocus is positive)")
    du = rng.uniform(lo, hi, n)
    dv = np.clip(du + rng.uniform(-astigmatism_A, astigmatism_A, n), lo, hi) if astigmatism_A > 0 else du.copy()
    ang = rng.uniform(0.0, 180.0, n)
    ps = rng.uniform(*phase_shift_range, n) if phase_shift_range is not None else np.zeros(n)
    bf = rng.uniform(*bfactor_range, n) if bfactor_range is not None else np.zeros(n)
    return {
        "rlnDefocusU": du, "rlnDefocusV": dv, "rlnDefocusAngle": ang,
        "rlnCtfBfactor": bf, "rlnCtfScalefactor": np.ones(n), "rlnPhaseShift": ps,
    }


def estimate_particle_radius(volume: torch.Tensor | np.ndarray, threshold: float = 0.1) -> float:
    """Particle radius (pixels): largest distance from the box centre ``N//2`` of a voxel above
    ``threshold · max(volume)``. For the band-limited 3ENL map (48³, 3 Å) this gives 12.7 px = 38 Å
    (atomic model: 37.3 Å); ringing and noise far out stay below the threshold."""
    v = torch.as_tensor(volume).to(torch.float64)
    n = v.shape[-1]
    vmax = float(v.max())
    if vmax <= 0:
        raise CryopipeError("the volume has no positive density: cannot estimate the particle radius")
    c = torch.arange(n, dtype=torch.float64, device=v.device) - n // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return float(r[v > threshold * vmax].max())


def project_particles(projector, angles_deg: torch.Tensor, origins_px: torch.Tensor | None) -> torch.Tensor:
    """Centred half-complex FTs ``[B, N, N//2+1]`` of the projections at RELION angles ``[B, 3]`` (degrees),
    translated by ``−origin`` (``origins_px`` ``[B, 2]`` = rlnOriginX/Y in pixels, or None): the particle whose
    STAR row carries these angles and origins."""
    rot = euler_to_matrix(angles_deg[:, 0], angles_deg[:, 1], angles_deg[:, 2])
    shifts = None if origins_px is None else -origins_px
    return projector.project(rot.to(torch.float32), shifts)


# ------------------------------------------------------------------------------------------------ image formation


def particle_images(projector, angles_deg: torch.Tensor, origins_px: torch.Tensor | None, pixel_size: float,
                    ctf_params: dict[str, torch.Tensor] | None = None, voltage: float = 300.0, cs: float = 2.7,
                    amplitude_contrast: float = 0.1, beam_tilt_mrad: tuple[float, float] | None = None
                    ) -> torch.Tensor:
    """Noise-free particle images ``[B, N, N]``: ``IFT[CTF · exp(i·φ_bt) · shift(P_A V̂, −origin)]`` — what
    ``relion_project --ctf`` writes for these STAR rows (no CTF when ``ctf_params`` is None). ``ctf_params``:
    RELION CTF columns as ``[B]`` tensors (see :func:`random_ctf_parameters`); ``beam_tilt_mrad``: (x, y) beam
    tilt (rlnBeamTiltX/Y) whose phase :func:`cryopipe.core.ctf.beam_tilt_phase` the images carry (None: none)."""
    ft = project_particles(projector, angles_deg, origins_px)
    n = ft.shape[-2]
    if ctf_params is not None:
        ft = ft * ctf_images(n, pixel_size, ctf_params, voltage, cs, amplitude_contrast).to(ft.device)
    if beam_tilt_mrad is not None and any(float(t) != 0.0 for t in beam_tilt_mrad):
        kx, ky = freq_grid_2d(n, device=ft.device, dtype=torch.float64)
        phi = beam_tilt_phase(kx / (n * pixel_size), ky / (n * pixel_size), float(beam_tilt_mrad[0]),
                              float(beam_tilt_mrad[1]), voltage, cs)
        ft = ft * torch.polar(torch.ones_like(phi), phi).to(ft.dtype)
    return irfft2_centered(ft, n)


def ctf_images(n: int, pixel_size: float, params: dict[str, torch.Tensor | float], voltage: float, cs: float,
               amplitude_contrast: float, device=None) -> torch.Tensor:
    """CTFs ``[B, n, n//2+1]`` for the RELION CTF columns in ``params`` (``[B]`` tensors, or numbers for one
    image: ``B = 1``; rlnCtfBfactor and rlnCtfScalefactor may be left out: 0 and 1) — the one CTF of the
    simulators (particles and micrographs). ``device``: where to compute when no value is a tensor."""
    return ctf_2d(n, pixel_size, params["rlnDefocusU"], params["rlnDefocusV"], params["rlnDefocusAngle"],
                  voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast,
                  phase_shift=params["rlnPhaseShift"], bfactor=params.get("rlnCtfBfactor", 0.0),
                  scale=params.get("rlnCtfScalefactor", 1.0), device=device)


def seeded_generator(stream: int, index: int, device) -> torch.Generator:
    """The noise generator of item ``index`` (a batch's first row, a micrograph's number) of a simulation whose
    noise stream is ``stream``: seeded from ``SeedSequence([stream, index])``, so an item's noise depends on the
    run's seed and the item only — the one noise seeding of the simulators."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(np.random.SeedSequence([int(stream), int(index)]).generate_state(1)[0]))
    return gen


def add_gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator,
                       sigma_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``images + sigma · N(0, 1)`` (drawn from ``generator``; × ``sigma_scale`` per pixel when given, e.g. more
    noise under thicker ice) — the one noise model of the simulators."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    if sigma_scale is not None:
        noise = noise * sigma_scale
    return images + sigma * noise


def _disc(n: int, radius_px: float, device) -> torch.Tensor:
    c = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) <= radius_px ** 2


def signal_variance(images: torch.Tensor, radius_px: float) -> float:
    """Pooled variance of the pixels of ``images`` ``[B, n, n]`` within ``radius_px`` of the centre ``n//2``."""
    mask = _disc(images.shape[-1], radius_px, images.device)
    vals = images[:, mask].to(torch.float64)
    return float(vals.var(unbiased=False))


def noise_sigma_for_snr(signal_var: float, snr: float) -> float:
    """Noise standard deviation for ``SNR = signal_var / sigma²`` (0 for an infinite SNR)."""
    if snr <= 0 or math.isnan(snr):
        raise CryopipeError(f"SNR must be > 0 (got {snr}); use inf for noise-free images")
    return 0.0 if math.isinf(snr) else math.sqrt(signal_var / snr)


def contamination_images(b: int, n: int, signal_std: float, generator: torch.Generator,
                         device=None) -> torch.Tensor:
    """``[b, n, n]`` junk images: 1–3 bright Gaussian blobs each (contamination, no CTF: amplitude contrast).

    Blob centres within ``n/4`` px of the centre, standard deviation ``U[2, 2 + n/10]`` px, peak amplitude
    ``U[3, 8]·signal_std`` (positive = the particles' contrast in an extracted, contrast-inverted stack).
    """
    dev = torch.device(device) if device is not None else generator.device
    k = 3
    u = torch.rand(b, k, 5, generator=generator, device=dev)
    present = torch.arange(k, device=dev)[None, :] < (1 + (u[:, :1, 0] * 3).floor().clamp(max=2))
    cx = n // 2 + (u[..., 1] - 0.5) * (n / 2)
    cy = n // 2 + (u[..., 2] - 0.5) * (n / 2)
    sigma = 2.0 + u[..., 3] * (n / 10)
    amp = (3.0 + 5.0 * u[..., 4]) * signal_std * present
    g = torch.arange(n, device=dev, dtype=torch.float32)
    # a Gaussian blob is separable: exp(-(dx² + dy²)/2σ²) = gx ⊗ gy, summed over blobs by one einsum
    gx = torch.exp(-((g[None, None, :] - cx[..., None]) ** 2) / (2 * sigma[..., None] ** 2))  # [b, k, n]
    gy = torch.exp(-((g[None, None, :] - cy[..., None]) ** 2) / (2 * sigma[..., None] ** 2))
    return torch.einsum("bky,bkx->byx", amp[..., None] * gy, gx).to(torch.float32)


# ------------------------------------------------------------------------------------------------ STAR tables


def optics_table(pixel_size: float, box: int, voltage: float, cs: float, amplitude_contrast: float,
                 kind: str = "particles") -> pd.DataFrame:
    """RELION 3.1 ``data_optics`` with one group ``opticsGroup1``; ``kind`` "particles" or "micrographs"."""
    row = {
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnOpticsGroup": 1,
        "rlnMicrographOriginalPixelSize": float(pixel_size),
        "rlnVoltage": float(voltage),
        "rlnSphericalAberration": float(cs),
        "rlnAmplitudeContrast": float(amplitude_contrast),
    }
    if kind == "particles":
        row.update({"rlnImagePixelSize": float(pixel_size), "rlnImageSize": int(box), "rlnImageDimensionality": 2,
                    "rlnCtfDataAreCtfPremultiplied": 0})
    elif kind == "micrographs":
        row.update({"rlnMicrographPixelSize": float(pixel_size)})
    else:
        raise ValueError(f"optics_table: kind must be 'particles' or 'micrographs', not {kind!r}")
    return pd.DataFrame([row])


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


# ------------------------------------------------------------------------------------------------ the simulation


@dataclass
class ParticleSimulation:
    """What :func:`simulate_particles` wrote."""

    star_path: Path
    truth_path: Path
    map_path: Path | None
    stack_paths: list[Path]
    truth: pd.DataFrame  #: the particles table of the truth file (one row per image)
    noise_sigma: float  #: standard deviation of the added noise (0 for SNR = inf)
    signal_variance: float  #: signal variance used for the SNR (pilot estimate)
    signal_radius_px: float
    optics: pd.DataFrame = field(repr=False, default=None)


def _volume_tensor(volume, device) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise CryopipeError(f"the volume must be a cube [N, N, N], got shape {tuple(v.shape)}")
    return v.to(device=device, dtype=torch.float32)


def simulate_particles(
    volume,
    n: int,
    pixel_size: float,
    snr: float,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    max_shift_A: float = 6.0,
    ctf: bool = True,
    defocus_range: tuple[float, float] = (5000.0, 30000.0),
    astigmatism_A: float = 1500.0,
    phase_shift_range: tuple[float, float] | None = None,
    bfactor_range: tuple[float, float] | None = None,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    beam_tilt_mrad: tuple[float, float] | None = None,
    signal_radius_px: float | None = None,
    frac_empty: float = 0.0,
    frac_contamination: float = 0.0,
    views=None,
    truth_in_main: bool = False,
    batch_size: int = 1000,
    images_per_stack: int = 10000,
    pilot_size: int = 500,
    dtype: str = "float32",
    intensity_scale: float = 1.0,
    intensity_offset: float = 0.0,
    micrograph_scale_spread: float = 0.0,
    particles_per_micrograph: int = 100,
    image_root: str | os.PathLike | None = None,
    stack_dir: str = "Particles",
    write_map: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ParticleSimulation:
    """Simulate ``n`` particle images of ``volume`` and write them with their ground truth.

    Args:
        volume: ``[N, N, N]`` map (array or tensor, ``[z, y, x]``), centred at voxel ``N//2``.
        n: number of images.
        pixel_size: Å per pixel (of the volume and the images).
        snr: signal-to-noise ratio (see module docstring); ``inf`` for noise-free images.
        out_dir: output folder (created); receives ``particles.star``, ``particles_truth.star``,
            ``truth_map.mrc`` and ``<stack_dir>/particles_NNNNN.mrcs``.
        seed: random seed. The geometry/CTF (the STAR files) depend only on ``seed``; the noise on ``seed``,
            ``batch_size`` and ``images_per_stack`` (and the device's random generator).
        max_shift_A: origins uniform in ``±max_shift_A`` Å (x and y).
        ctf: apply a CTF (and write CTF columns); ``False`` gives plain projections.
        defocus_range, astigmatism_A, phase_shift_range, bfactor_range: see :func:`random_ctf_parameters`.
        voltage, cs, amplitude_contrast: optics (kV, mm, fraction).
        beam_tilt_mrad: (x, y) beam tilt of the (one) optics group in mrad: every particle image carries its
            antisymmetric phase (:func:`cryopipe.core.ctf.beam_tilt_phase`); written as rlnBeamTiltX/Y to the
            truth file's optics table only (the user's ``particles.star`` does not know it).
        signal_radius_px: radius of the SNR measurement (default: :func:`estimate_particle_radius` of ``volume``).
        frac_empty, frac_contamination: fractions of junk images (noise only / bright blobs), at random rows.
        views: optional ``[V, 2]`` (rot, tilt) degrees: every particle takes one of these views at random (psi
            stays uniform), e.g. to test 2D classification; the truth file gets ``cryopipeViewIndex`` (1-based,
            0 for junk).
        truth_in_main: also write the true angles and origins into ``particles.star``.
        batch_size: images computed at once (memory ~ ``batch_size · N²`` complex values).
        images_per_stack: images per ``.mrcs`` file (``<stack_dir>/particles_00001.mrcs``, ...).
        pilot_size: true particles (the first non-junk rows) whose noise-free images set the signal variance of
            the SNR.
        dtype: ``"float32"`` or ``"float16"`` (MRC mode 12, as RELION writes for ``--float16``).
        intensity_scale, intensity_offset: the written images are ``scale·g_mic·(signal + noise) + offset``, i.e.
            not normalised (real stacks that were not run through ``relion_preprocess --norm`` have an arbitrary
            scale and mean; the class2d_hard fixture: mean 0.012, sd 1.6).
        micrograph_scale_spread: relative standard deviation of a per-micrograph factor ``g_mic`` (mean 1; drawn
            from its own seed stream, so geometry and noise do not change): what ``--scale`` corrects; the
            factors go to the truth file as ``cryopipeIntensityScale``.
        particles_per_micrograph: rows sharing one (fictitious) ``rlnMicrographName``.
        image_root: directory that ``rlnImageName`` paths are relative to (default ``out_dir``; RELION resolves
            them relative to the project directory, so a job inside a project passes the project root).
        stack_dir: sub-folder of ``out_dir`` for the stacks.
        write_map: write ``truth_map.mrc`` (the input volume).
        device: compute device (default :func:`cryopipe.core.device.default_device`).
    """
    if n < 1:
        raise CryopipeError(f"number of particles must be >= 1 (got {n})")
    if pixel_size <= 0:
        raise CryopipeError(f"pixel size must be > 0 Å (got {pixel_size})")
    if not (0 <= frac_empty and 0 <= frac_contamination and frac_empty + frac_contamination <= 1):
        raise CryopipeError(f"junk fractions empty={frac_empty}, contamination={frac_contamination}: "
                            "each must be >= 0 and their sum <= 1")
    if dtype not in ("float32", "float16"):
        raise CryopipeError(f"image dtype {dtype!r}: use float32 or float16")
    if batch_size < 1:
        raise CryopipeError(f"batch size must be >= 1 (got {batch_size})")
    if not (intensity_scale > 0 and math.isfinite(intensity_scale) and math.isfinite(intensity_offset)
            and 0 <= micrograph_scale_spread < 0.5):
        raise CryopipeError(f"intensity scale {intensity_scale} must be > 0, offset {intensity_offset} finite and "
                            f"micrograph scale spread {micrograph_scale_spread} in [0, 0.5)")
    dev = resolve_device(device)
    vol = _volume_tensor(volume, dev)
    box = vol.shape[-1]
    out = Path(out_dir)
    (out / stack_dir).mkdir(parents=True, exist_ok=True)
    root = Path(image_root) if image_root is not None else out
    radius = float(signal_radius_px) if signal_radius_px is not None else estimate_particle_radius(vol)

    # ---- geometry and CTF parameters for every row (small: ~12 floats per particle)
    ss = np.random.SeedSequence(int(seed))
    geo_seed, noise_seed = ss.spawn(2)
    rng = np.random.default_rng(geo_seed)
    angles = random_orientations(n, rng).numpy()
    view_index = np.full(n, -1, dtype=np.int64)
    if views is not None:
        v = np.asarray(views, dtype=np.float64).reshape(-1, 2)
        if len(v) == 0:
            raise CryopipeError("views: give at least one (rot, tilt) pair in degrees")
        view_index = rng.integers(0, len(v), size=n)
        angles[:, 0], angles[:, 1] = v[view_index, 0], v[view_index, 1]  # psi stays uniform in [0, 360)
    origins_A = random_origins(n, max_shift_A, rng)
    ctf_cols = random_ctf_parameters(n, rng, defocus_range, astigmatism_A, phase_shift_range, bfactor_range)
    junk = np.zeros(n, dtype=np.int64)
    n_empty = int(round(frac_empty * n))
    n_cont = int(round(frac_contamination * n))
    perm = rng.permutation(n)
    junk[perm[:n_empty]] = JUNK_EMPTY
    junk[perm[n_empty:n_empty + n_cont]] = JUNK_CONTAMINATION
    angles[junk != JUNK_NONE] = 0.0
    origins_A[junk != JUNK_NONE] = 0.0
    ppm = max(1, particles_per_micrograph)
    mic_index = np.arange(n) // ppm
    scale_rng = np.random.default_rng(ss.spawn(1)[0])  # a third stream: geometry and noise stay as they were
    mic_factor = np.clip(1.0 + micrograph_scale_spread * scale_rng.standard_normal(int(mic_index[-1]) + 1), 0.1, None)
    gain = torch.as_tensor(intensity_scale * mic_factor[mic_index], dtype=torch.float32, device=dev)

    projector = Projector(vol, pad=2)
    origins_px_all = torch.as_tensor(origins_A / pixel_size, dtype=torch.float32, device=dev)
    angles_all = torch.as_tensor(angles, dtype=torch.float32, device=dev)
    ctf_all = {k: torch.as_tensor(v, dtype=torch.float32, device=dev) for k, v in ctf_cols.items()}

    def clean_images(sel: slice | torch.Tensor) -> torch.Tensor:
        params = {k: v[sel] for k, v in ctf_all.items()} if ctf else None
        return particle_images(projector, angles_all[sel], origins_px_all[sel], pixel_size, params,
                               voltage, cs, amplitude_contrast, beam_tilt_mrad)

    # ---- noise level from a pilot: the noise-free images of the first `pilot_size` true particles
    real = np.flatnonzero(junk == JUNK_NONE)[:max(1, pilot_size)]
    if real.size:
        pilot = clean_images(torch.as_tensor(real, device=dev))
    else:  # only junk: the signal of particles that would have had the first rows' CTFs
        m = min(n, max(1, pilot_size))
        pilot = particle_images(projector, random_orientations(m, rng).to(device=dev, dtype=torch.float32),
                                None, pixel_size,
                                {k: v[:m] for k, v in ctf_all.items()} if ctf else None,
                                voltage, cs, amplitude_contrast)
    sig_var = signal_variance(pilot, radius)
    del pilot
    sigma = noise_sigma_for_snr(sig_var, snr)

    # ---- stream batches into stacks of at most images_per_stack images (batches never straddle two stacks)
    per_stack = max(1, int(images_per_stack))
    stack_paths: list[Path] = []
    image_names = np.empty(n, dtype=object)
    bounds = [(s0, min(s0 + per_stack, n)) for s0 in range(0, n, per_stack)]
    batch_list = [(k, b0, min(b0 + batch_size, s1)) for k, (s0, s1) in enumerate(bounds)
                  for b0 in range(s0, s1, batch_size)]
    iterator = enumerate(batch_list)
    if progress:
        from cryopipe.pipeline.log import progress as progress_lines

        iterator = progress_lines(iterator, total=len(batch_list), desc="simulate particles")
    junk_t = torch.as_tensor(junk, device=dev)
    noise_root = int(noise_seed.generate_state(1)[0])
    np_dtype = np.float16 if dtype == "float16" else np.float32
    writer = None
    try:
        for b, (k, b0, b1) in iterator:
            s0, s1 = bounds[k]
            if b0 == s0:
                path = out / stack_dir / f"particles_{k + 1:05d}.mrcs"
                writer = MrcStackWriter(path, s1 - s0, (box, box), pixel_size, dtype=np_dtype).__enter__()
                stack_paths.append(path)
            sl = slice(b0, b1)
            gen = seeded_generator(noise_root, b0, dev)
            imgs = clean_images(sl)
            jb = junk_t[sl]
            if bool((jb != JUNK_NONE).any()):
                imgs = torch.where((jb == JUNK_NONE)[:, None, None], imgs, torch.zeros_like(imgs))
                cont = jb == JUNK_CONTAMINATION
                n_c = int(cont.sum())
                if n_c:
                    imgs[cont] = contamination_images(n_c, box, math.sqrt(sig_var), gen, device=dev)
            if sigma > 0:
                imgs = add_gaussian_noise(imgs, sigma, gen)
            if intensity_scale != 1.0 or intensity_offset != 0.0 or micrograph_scale_spread > 0:
                imgs = imgs * gain[sl, None, None] + float(intensity_offset)
            writer[b0 - s0:b1 - s0] = imgs.cpu().numpy()
            image_names[sl] = format_image_name(np.arange(b0 - s0, b1 - s0), _rel(stack_paths[-1], root))
            if b1 == s1:
                w, writer = writer, None
                w.__exit__(None, None, None)
    except BaseException:
        if writer is not None:
            writer.__exit__(*sys.exc_info())
        raise

    # ---- STAR files
    optics = optics_table(pixel_size, box, voltage, cs, amplitude_contrast, "particles")
    mic_names = [f"Micrographs/sim_{i + 1:06d}.mrc" for i in mic_index]
    main = pd.DataFrame({"rlnImageName": image_names.astype(str), "rlnMicrographName": mic_names})
    if ctf:
        for col in _CTF_COLUMNS:
            main[col] = ctf_cols[col]
    main["rlnOpticsGroup"] = 1
    truth = main.copy()
    truth["rlnAngleRot"], truth["rlnAngleTilt"], truth["rlnAnglePsi"] = angles[:, 0], angles[:, 1], angles[:, 2]
    truth["rlnOriginXAngst"], truth["rlnOriginYAngst"] = origins_A[:, 0], origins_A[:, 1]
    truth[JUNK_LABEL] = junk
    if micrograph_scale_spread > 0:
        truth[SCALE_LABEL] = mic_factor[mic_index]
    if views is not None:
        truth[VIEW_LABEL] = np.where(junk == JUNK_NONE, view_index + 1, 0)
    if truth_in_main:
        for col in _TRUTH_COLUMNS:
            main[col] = truth[col]
    star_path = out / "particles.star"
    truth_path = out / "particles_truth.star"
    truth_optics = optics.copy()
    if beam_tilt_mrad is not None:
        truth_optics["rlnBeamTiltX"], truth_optics["rlnBeamTiltY"] = float(beam_tilt_mrad[0]), float(beam_tilt_mrad[1])
    write_star(truth_path, {"optics": truth_optics, "particles": truth})
    write_star(star_path, {"optics": optics, "particles": main})
    map_path = None
    if write_map:
        map_path = out / "truth_map.mrc"
        write_mrc(map_path, vol.cpu().numpy(), pixel_size)
    return ParticleSimulation(star_path=star_path, truth_path=truth_path, map_path=map_path,
                              stack_paths=stack_paths, truth=truth, noise_sigma=sigma, signal_variance=sig_var,
                              signal_radius_px=radius, optics=optics)
