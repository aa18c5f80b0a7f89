"""Simulated tilt series with ground truth, written as a RELION 5 tomography project.

Per tomogram: a tilt scheme (range, step, dose-symmetric or bidirectional order → rlnMicrographPreExposure), a
"true" per-tilt alignment (XTilt/YTilt/ZRot/shifts) and astigmatic defocus, particles in a slab (random positions
and orientations, or on a sphere / cylinder lattice standing on the surface), then the noise-free images of the
forward model (:func:`cryopipe.sim.tiltseries_forward.render_tilt_series`: Fourier slices, depth-corrected CTF,
dose weight, protein dark) plus white Gaussian noise.

**SNR** = (signal variance inside the particle footprints of the tilt closest to 0°) / (noise variance), where the
signal variance is the mean over that tilt's particles (centres inside the image) of the variance of the
noise-free image within the particle radius of the projected centre; the same white-noise σ is added to every tilt
of the tomogram (set per tomogram from its own particles and defocus).

**Imperfections** for later refinement are injected between the truth and the metadata a user gets: per-tilt
shift (Å) / angle (°) / defocus (Å) errors, per-particle position (Å) and angle (°) errors are Gaussian with the
given standard deviations and appear only in the main STAR files (the images follow the truth); a smooth per-tilt
image warp (RMS displacement in Å, the low-order terms of
:data:`~cryopipe.sim.tiltseries_geometry.WARP_TERMS`) displaces each particle's image by the field's value at its
projected centre (locally rigid: the field varies little over one particle) and is recorded only in the truth
per-tilt tables (``cryopipeWarpX1..K`` / ``cryopipeWarpY1..K``, Å).

Output (``out_dir``), like the RELION fixture: ``tomograms.star``, ``tilt_series/<TS>.star`` (metadata with the
injected errors), ``tilt_series/<TS>.mrcs`` (images, float32 or float16), ``particles.star``,
``optimisation_set.star``; ``truth/truth_map.mrc``, ``truth/tomograms.star`` + ``truth/tilt_series/<TS>.star``
(true values; same images), ``truth/particles.star`` (true poses, plus ``cryopipePoseError*`` columns),
``truth/optimisation_set.star``. Paths inside the STAR files are relative to the working directory (the project
directory) when the output lies below it, else absolute.
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
from cryopipe.core.geometry import axis_angle_matrix, euler_to_matrix, matrix_to_euler, random_orientations
from cryopipe.core.projector import Projector
from cryopipe.core.tilt_geometry import centered_angstrom, project_points, projection_matrices
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import MrcStackWriter, format_image_name, write_mrc
from cryopipe.io.tomography import TiltSeries, TomogramSet, path_for_star, write_tomograms
from cryopipe.io.tomo_particles import TomoParticles, write_optimisation_set, write_tomo_particles
from cryopipe.sim.micrographs import particle_signal_variance
from cryopipe.sim.particles import _volume_tensor, estimate_particle_radius, noise_sigma_for_snr
from cryopipe.sim.tiltseries_forward import TiltOptics, default_render_box, render_tilt_series
from cryopipe.sim.tiltseries_geometry import (
    LATTICES,
    SURFACE_PRIOR_ANGLES,
    cylinder_lattice,
    normal_frames,
    random_alignment,
    random_slab_positions,
    random_tilt_defocus,
    random_warp_coefficients,
    sphere_lattice,
    tilt_scheme,
    warp_displacement_px,
)

__all__ = ["Perturbations", "TomogramTruth", "TiltSeriesSimulation", "place_tomogram_particles",
           "simulate_tilt_series"]

_ALIGN = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot")
_SHIFTS = ("rlnTomoXShiftAngst", "rlnTomoYShiftAngst")
_CENTERED = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
_ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
_SUBTOMO = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


@dataclass(frozen=True)
class Perturbations:
    """Standard deviations of the errors injected into the main STAR files (0: none), and the RMS (Å) of the
    per-tilt image warp applied to the images (recorded only in the truth)."""

    tilt_shift_A: float = 0.0  #: per tilt, each of rlnTomoX/YShiftAngst
    tilt_angle_deg: float = 0.0  #: per tilt, each of rlnTomoXTilt/YTilt/ZRot
    defocus_A: float = 0.0  #: per tilt, added to rlnDefocusU and V alike
    warp_A: float = 0.0  #: RMS displacement of the smooth per-tilt image warp (truth only)
    particle_shift_A: float = 0.0  #: per particle, each of rlnCenteredCoordinateX/Y/ZAngst
    particle_angle_deg: float = 0.0  #: per particle, rotation by N(0, σ) about a random axis

    def check(self) -> None:
        for name, value in vars(self).items():
            if not (value >= 0 and math.isfinite(value)):
                raise CryopipeError(f"--perturb_{name.rsplit('_', 1)[0]} = {value}: must be a number >= 0")


@dataclass
class TomogramTruth:
    """The true geometry of one simulated tomogram (px = rlnTomoTiltSeriesPixelSize)."""

    name: str
    P: np.ndarray  #: [F, 4, 4] true projection matrices (file order = ascending tilt angle)
    positions_px: np.ndarray  #: [N, 3] decentred tomogram px
    orientations: np.ndarray  #: [N, 3, 3] A = A_sub·A_particle
    noise_sigma: float
    signal_variance: float
    images: np.ndarray | None = None  #: [F, H, W] written images (keep_images=True)
    clean_images: np.ndarray | None = None  #: [F, H, W] noise-free images (keep_images=True)


@dataclass
class TiltSeriesSimulation:
    """What :func:`simulate_tilt_series` wrote."""

    out_dir: Path
    tomograms_star: Path
    particles_star: Path
    optimisation_set: Path
    truth_tomograms_star: Path
    truth_particles_star: Path
    truth_optimisation_set: Path
    map_path: Path
    stack_paths: dict[str, Path]
    truth: dict[str, TomogramTruth]
    tilts_truth: dict[str, pd.DataFrame]
    tilts_main: dict[str, pd.DataFrame]
    particles_truth: pd.DataFrame
    particles_main: pd.DataFrame
    render_box: int = 0
    particle_radius_px: float = 0.0
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ particles


def place_tomogram_particles(n: int, lattice: str, tomogram_size, thickness_px: float, radius_px: float,
                             rng: np.random.Generator, lattice_radius_px: float | None = None,
                             spacing_px: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(positions [P, 3] px, A_true [P, 3, 3], A_sub [P, 3, 3])`` of up to ``n`` particles.

    ``random``: uniform in the slab, ≥ 2 radii apart, uniform orientations, ``A_sub = I``. ``sphere`` /
    ``cylinder`` (axis in the xy plane at a random angle): one surface centred in the tomogram, radius
    ``lattice_radius_px`` (default: the largest that fits the slab), lattice ``spacing_px`` (default 2.2 particle
    radii), orientations normal to the surface (:func:`~cryopipe.sim.tiltseries_geometry.normal_frames`); points
    outside the tomogram's x/y margins are dropped and at most ``n`` are kept (a random subset)."""
    if lattice not in LATTICES:
        raise CryopipeError(f"--lattice {lattice!r}: use one of {', '.join(LATTICES)}")
    X, Y, Z = (float(s) for s in tomogram_size)
    if lattice == "random":
        pos = random_slab_positions(n, tomogram_size, thickness_px, radius_px, 2.0 * radius_px, rng)
        A = euler_to_matrix(*random_orientations(len(pos), rng).unbind(-1)).numpy()
        return pos, A, np.broadcast_to(np.eye(3), A.shape).copy()
    radius = lattice_radius_px if lattice_radius_px is not None else thickness_px / 2 - radius_px
    spacing = spacing_px if spacing_px is not None else 2.2 * radius_px
    if radius <= 0:
        raise CryopipeError(f"a {lattice} of radius {radius:g} px does not fit: give a larger --thickness or "
                            "--lattice_radius")
    centre = np.array([X / 2, Y / 2, Z / 2])
    if lattice == "sphere":
        pos, normals = sphere_lattice(centre, radius, spacing)
    else:
        phi = rng.uniform(0, math.pi)
        pos, normals = cylinder_lattice(centre, [math.cos(phi), math.sin(phi), 0.0], radius, max(X, Y), spacing)
    inside = ((pos[:, 0] >= radius_px) & (pos[:, 0] <= X - radius_px) & (pos[:, 1] >= radius_px)
              & (pos[:, 1] <= Y - radius_px) & (pos[:, 2] >= 0) & (pos[:, 2] <= Z - 1))
    pos, normals = pos[inside], normals[inside]
    if len(pos) > n:
        keep = np.sort(rng.choice(len(pos), n, replace=False))
        pos, normals = pos[keep], normals[keep]
    A_true, A_sub, _ = normal_frames(normals, rng)
    return pos, A_true, A_sub


def _random_rotations(n: int, sigma_deg: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rotations by ``N(0, sigma_deg)`` about uniformly random axes: ``(matrices [n, 3, 3], |angle| [n])``."""
    axis = rng.normal(size=(n, 3))
    angle = rng.normal(0.0, sigma_deg, n) if sigma_deg > 0 else np.zeros(n)
    return axis_angle_matrix(torch.as_tensor(axis), torch.as_tensor(angle)).numpy(), np.abs(angle)


def _particle_tables(name: str, pos: np.ndarray, A_true: np.ndarray, A_sub: np.ndarray, lattice: str,
                     pixel_size: float, size, pert: Perturbations, rng: np.random.Generator
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The particles' rows of the truth and the main (perturbed) ``particles.star``."""
    n = len(pos)
    centred = centered_angstrom(pos, pixel_size, size).numpy().reshape(-1, 3)
    sub_angles = matrix_to_euler(torch.as_tensor(A_sub)).numpy().reshape(-1, 3) if lattice != "random" \
        else np.zeros((n, 3))
    A_sub_used = euler_to_matrix(*torch.as_tensor(sub_angles).unbind(-1)).numpy().reshape(-1, 3, 3)
    rest = matrix_to_euler(torch.as_tensor(np.swapaxes(A_sub_used, 1, 2) @ A_true)).numpy().reshape(-1, 3)
    shift_err = rng.normal(0.0, pert.particle_shift_A, (n, 3)) if pert.particle_shift_A > 0 else np.zeros((n, 3))
    R_err, angle_err = _random_rotations(n, pert.particle_angle_deg, rng)
    rest_main = matrix_to_euler(torch.as_tensor(np.swapaxes(A_sub_used, 1, 2) @ A_true @ R_err)).numpy()
    rest_main = rest_main.reshape(-1, 3)

    def table(coords: np.ndarray, angles: np.ndarray) -> pd.DataFrame:
        t = pd.DataFrame({"rlnTomoName": [name] * n, "rlnTomoParticleName": [f"{name}/{i + 1}" for i in range(n)]})
        for j, lab in enumerate(_CENTERED):
            t[lab] = coords[:, j]
        for lab in _ORIGINS:
            t[lab] = 0.0
        for j, lab in enumerate(_SUBTOMO):
            t[lab] = sub_angles[:, j]
        for j, lab in enumerate(_ANGLES):
            t[lab] = angles[:, j]
        if lattice != "random":
            t["rlnAngleTiltPrior"] = SURFACE_PRIOR_ANGLES[1]
            t["rlnAnglePsiPrior"] = SURFACE_PRIOR_ANGLES[2]
        t["rlnRandomSubset"] = 1 + np.arange(n) % 2
        return t

    truth = table(centred, rest)
    for j, axis in enumerate("XYZ"):
        truth[f"cryopipePoseErrorShift{axis}Angst"] = shift_err[:, j]
    truth["cryopipePoseErrorAngle"] = angle_err
    return truth, table(centred + shift_err, rest_main)


# ------------------------------------------------------------------------------------------------ per-tilt tables


def _tilt_tables(name: str, nominal: np.ndarray, pre: np.ndarray, tilt_axis: float, align: dict, defocus: dict,
                 image_names: list[str], pert: Perturbations, warp: np.ndarray | None, rng: np.random.Generator
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Truth and main (perturbed) per-tilt tables, RELION 5 columns in the fixture's order."""
    F = len(nominal)
    base = pd.DataFrame({"rlnMicrographName": image_names, "rlnTomoNominalStageTiltAngle": nominal,
                         "rlnTomoNominalTiltAxisAngle": np.full(F, tilt_axis), "rlnMicrographPreExposure": pre})
    truth = base.copy()
    for lab, v in {**defocus, **align}.items():
        truth[lab] = v
    main = truth.copy()
    if pert.defocus_A > 0:
        e = rng.normal(0.0, pert.defocus_A, F)
        main["rlnDefocusU"] += e
        main["rlnDefocusV"] += e
    if pert.tilt_angle_deg > 0:
        for lab in _ALIGN:
            main[lab] += rng.normal(0.0, pert.tilt_angle_deg, F)
    if pert.tilt_shift_A > 0:
        for lab in _SHIFTS:
            main[lab] += rng.normal(0.0, pert.tilt_shift_A, F)
    if warp is not None:
        for d, axis in enumerate("XY"):
            for k in range(warp.shape[-1]):
                truth[f"cryopipeWarp{axis}{k + 1}"] = warp[:, d, k]
    return truth, main


def _global_row(name: str, optics: TiltOptics, size, dose_per_tilt: float) -> dict:
    return {"rlnTomoName": name, "rlnVoltage": optics.voltage, "rlnSphericalAberration": optics.cs,
            "rlnAmplitudeContrast": optics.amplitude_contrast, "rlnMicrographOriginalPixelSize": optics.pixel_size,
            "rlnTomoHand": optics.hand, "rlnTomoTiltSeriesPixelSize": optics.pixel_size,
            "rlnTomoSizeX": int(size[0]), "rlnTomoSizeY": int(size[1]), "rlnTomoSizeZ": int(size[2]),
            "rlnTomoImportFractionalDose": float(dose_per_tilt), "rlnOpticsGroupName": "optics1"}


# ------------------------------------------------------------------------------------------------ images


def _render_and_write(projector: Projector, P: torch.Tensor, pos: torch.Tensor, A: torch.Tensor,
                      defocus: torch.Tensor, pre: torch.Tensor, image_size, optics: TiltOptics, box: int,
                      shifts: torch.Tensor | None, snr: float, radius_px: float, zero_tilt: int, path: Path,
                      dtype, generator: torch.Generator, tilt_batch: int, keep: bool
                      ) -> tuple[float, float, np.ndarray | None, np.ndarray | None]:
    """Render every tilt (``tilt_batch`` at a time), add noise and write the stack ``path``; returns
    ``(noise σ, signal variance, images or None, clean images or None)``."""
    W, H = image_size
    F = P.shape[0]

    def render(f0: int, f1: int) -> torch.Tensor:
        return render_tilt_series(projector, P[f0:f1], pos, A, defocus[f0:f1], pre[f0:f1], (W, H), optics,
                                  box=box, image_shifts_px=None if shifts is None else shifts[:, f0:f1])

    zero = render(zero_tilt, zero_tilt + 1)[0]
    q0 = project_points(P[zero_tilt:zero_tilt + 1], pos)[:, 0, :2]
    if shifts is not None:
        q0 = q0 + shifts[:, zero_tilt]
    inside = (q0[:, 0] >= 0) & (q0[:, 0] < W) & (q0[:, 1] >= 0) & (q0[:, 1] < H)
    var = particle_signal_variance(zero, torch.floor(q0[inside] + 0.5), radius_px) if bool(inside.any()) else None
    sig_var = float(var.mean()) if var is not None else float(zero.var())
    sigma = noise_sigma_for_snr(sig_var, snr) if sig_var > 0 else 0.0
    images = np.empty((F, H, W), np.float32) if keep else None
    clean = np.empty((F, H, W), np.float32) if keep else None
    with MrcStackWriter(path, F, (H, W), optics.pixel_size, dtype=dtype) as writer:
        for f0 in range(0, F, tilt_batch):
            f1 = min(F, f0 + tilt_batch)
            img = render(f0, f1)
            if keep:
                clean[f0:f1] = img.cpu().numpy()
            if sigma > 0:
                img = img + sigma * torch.randn(img.shape, generator=generator, device=img.device)
            out = img.cpu().numpy()
            writer[f0:f1] = out
            if keep:
                images[f0:f1] = out.astype(dtype).astype(np.float32)
    return sigma, sig_var, images, clean


# ------------------------------------------------------------------------------------------------ the simulation


def _check(n_tomograms, particles_per_tomogram, pixel_size, image_size, thickness_A, snr, dtype, tilt_batch):
    if n_tomograms < 1:
        raise CryopipeError(f"--n_tomograms {n_tomograms}: must be >= 1")
    if particles_per_tomogram < 1:
        raise CryopipeError(f"--particles_per_tomogram {particles_per_tomogram}: must be >= 1")
    if not pixel_size > 0:
        raise CryopipeError(f"--angpix {pixel_size}: must be > 0 Å")
    if len(image_size) != 2 or min(image_size) < 16:
        raise CryopipeError(f"--image_size {image_size}: give W H (px), each >= 16")
    if not thickness_A > 0:
        raise CryopipeError(f"--thickness {thickness_A}: must be > 0 Å")
    if not snr > 0:
        raise CryopipeError(f"--snr {snr}: must be > 0 (inf: noise-free)")
    if dtype not in ("float32", "float16"):
        raise CryopipeError(f"image dtype {dtype!r}: use float32 or float16")
    if tilt_batch < 1:
        raise CryopipeError(f"tilt batch {tilt_batch}: must be >= 1")


def simulate_tilt_series(
    volume,
    pixel_size: float,
    out_dir: str | os.PathLike,
    *,
    n_tomograms: int = 2,
    particles_per_tomogram: int = 20,
    image_size: tuple[int, int] = (400, 360),
    tomogram_size: tuple[int, int, int] | None = None,
    thickness_A: float = 800.0,
    tilt_range: tuple[float, float] = (-60.0, 60.0),
    tilt_step: float = 3.0,
    order: str = "dose-symmetric",
    dose_per_tilt: float = 3.0,
    lattice: str = "random",
    lattice_radius_A: float | None = None,
    spacing_A: float | None = None,
    tilt_axis_deg: float = 85.0,
    alignment_jitter: float = 1.0,
    defocus_range: tuple[float, float] = (25000.0, 45000.0),
    astigmatism_A: float = 800.0,
    hand: float = -1.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.07,
    snr: float = 0.1,
    perturbations: Perturbations = Perturbations(),
    dtype: str = "float32",
    render_box: int | None = None,
    seed: int = 0,
    tilt_batch: int = 8,
    keep_images: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> TiltSeriesSimulation:
    """Simulate ``n_tomograms`` tilt series of particles of ``volume`` and write them (module docstring).

    Args:
        volume: ``[N, N, N]`` map ``[z, y, x]`` (centre voxel ``N//2``), positive = protein.
        pixel_size: Å per px of the map and the tilt images (4–10 Å typical).
        out_dir: output folder (created).
        n_tomograms, particles_per_tomogram: counts (lattices may hold fewer particles).
        image_size: ``(W, H)`` px of the tilt images.
        tomogram_size: rlnTomoSizeX/Y/Z (px; default ``(W, H, thickness)`` rounded to even).
        thickness_A: slab thickness (Å) holding the particle centres (± thickness/2 − radius about the
            tomogram's mid-plane) and the default sphere/cylinder radius.
        tilt_range, tilt_step, order, dose_per_tilt: tilt scheme
            (:func:`~cryopipe.sim.tiltseries_geometry.tilt_scheme`; e/Å² per tilt).
        lattice, lattice_radius_A, spacing_A: particle arrangement (:func:`place_tomogram_particles`).
        tilt_axis_deg, alignment_jitter: true alignment
            (:func:`~cryopipe.sim.tiltseries_geometry.random_alignment`; rlnTomoNominalTiltAxisAngle).
        defocus_range, astigmatism_A: per-tomogram defocus (Å;
            :func:`~cryopipe.sim.tiltseries_geometry.random_tilt_defocus`).
        hand: rlnTomoHand (±1) used for the depth-dependent defocus.
        voltage, cs, amplitude_contrast: optics.
        snr: signal-to-noise ratio (module docstring); ``inf`` for noise-free images.
        perturbations: errors injected into the main STAR files and the image warp (:class:`Perturbations`).
        dtype: ``"float32"`` or ``"float16"`` (MRC mode 12) images.
        render_box: box each particle image is computed in (px; default
            :func:`~cryopipe.sim.tiltseries_forward.default_render_box`).
        seed: random seed (geometry, metadata and noise).
        tilt_batch: tilts rendered at once (memory ~ ``tilt_batch·W·H`` floats plus the particle boxes).
        keep_images: also return the written and the noise-free images in :class:`TomogramTruth`.
        device: compute device (default: CUDA if available).
    """
    _check(n_tomograms, particles_per_tomogram, pixel_size, image_size, thickness_A, snr, dtype, tilt_batch)
    perturbations.check()
    for label, value in (("--lattice_radius", lattice_radius_A), ("--lattice_spacing", spacing_A)):
        if value is not None and not value > 0:
            raise CryopipeError(f"{label} {value}: must be > 0 Å")
    if hand not in (-1.0, 1.0):
        raise CryopipeError(f"--hand {hand}: must be 1 or -1")
    dev = resolve_device(device)
    vol = _volume_tensor(volume, dev)
    out = Path(out_dir)
    (out / "tilt_series").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    W, H = int(image_size[0]), int(image_size[1])
    thickness_px = thickness_A / pixel_size
    size = tuple(int(s) for s in tomogram_size) if tomogram_size is not None else \
        (W, H, 2 * int(math.ceil(thickness_px / 2)))
    optics = TiltOptics(pixel_size, voltage, cs, amplitude_contrast, float(hand))
    nominal, pre = tilt_scheme(tilt_range[0], tilt_range[1], tilt_step, order, dose_per_tilt)
    zero_tilt = int(np.argmin(np.abs(nominal)))
    radius_px = estimate_particle_radius(vol)
    box = render_box
    if box is None:
        box = default_render_box(vol.shape[-1], max(defocus_range) + astigmatism_A + thickness_A, pixel_size,
                                 voltage, cs)
    projector = Projector(vol, pad=2)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    seeds = np.random.SeedSequence(int(seed)).spawn(n_tomograms)

    names = [f"TS_{t + 1:02d}" for t in range(n_tomograms)]
    truth_ts, main_ts, truths, stacks = {}, {}, {}, {}
    tilts_truth, tilts_main, parts_truth, parts_main = {}, {}, [], []
    iterator = list(enumerate(names))
    if progress:
        from cryopipe.pipeline.log import progress as progress_lines

        iterator = progress_lines(iterator, desc="simulate tilt series")
    for t, name in iterator:
        rng = np.random.default_rng(seeds[t])
        align = random_alignment(nominal, tilt_axis_deg, rng, alignment_jitter)
        defocus = random_tilt_defocus(len(nominal), defocus_range, astigmatism_A, rng)
        pos, A_true, A_sub = place_tomogram_particles(
            particles_per_tomogram, lattice, size, thickness_px, radius_px, rng,
            None if lattice_radius_A is None else lattice_radius_A / pixel_size,
            None if spacing_A is None else spacing_A / pixel_size)
        if len(pos) == 0:
            raise CryopipeError(f"no particle fits tomogram {name} ({size[0]}x{size[1]}x{size[2]} px, lattice "
                                f"{lattice}); use a larger --image_size, --thickness or --lattice_radius")
        P = projection_matrices(align["rlnTomoXTilt"], align["rlnTomoYTilt"], align["rlnTomoZRot"],
                                np.stack([align[s] for s in _SHIFTS], 1), pixel_size, size, (W, H)).to(dev)
        pos_t = torch.as_tensor(pos, dtype=torch.float64, device=dev)
        warp = random_warp_coefficients(len(nominal), perturbations.warp_A, rng) if perturbations.warp_A > 0 else None
        shifts = None
        if warp is not None:
            shifts = warp_displacement_px(warp, project_points(P, pos_t)[..., :2], (W, H), pixel_size)
        stack = out / "tilt_series" / f"{name}.mrcs"
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seeds[t].generate_state(1)[0]))
        defocus_t = torch.as_tensor(np.stack([defocus[k] for k in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")],
                                             1), device=dev)
        sigma, sig_var, images, clean = _render_and_write(
            projector, P, pos_t, torch.as_tensor(A_true, device=dev), defocus_t,
            torch.as_tensor(pre, device=dev), (W, H), optics, box, shifts, snr, radius_px, zero_tilt, stack,
            np_dtype, gen, tilt_batch, keep_images)
        image_names = format_image_name(np.arange(len(nominal)), path_for_star(stack))
        tilts_truth[name], tilts_main[name] = _tilt_tables(name, nominal, pre, tilt_axis_deg, align, defocus,
                                                           image_names, perturbations, warp, rng)
        pt, pm = _particle_tables(name, pos, A_true, A_sub, lattice, pixel_size, size, perturbations, rng)
        parts_truth.append(pt)
        parts_main.append(pm)
        glob = _global_row(name, optics, size, dose_per_tilt)
        truth_ts[name] = TiltSeries(name, glob, tilts_truth[name], Path.cwd())
        main_ts[name] = TiltSeries(name, glob, tilts_main[name], Path.cwd())
        truths[name] = TomogramTruth(name, P.cpu().numpy(), pos, A_true, sigma, sig_var, images, clean)
        stacks[name] = stack

    return _write_outputs(out, vol, pixel_size, truth_ts, main_ts, parts_truth, parts_main, truths, stacks,
                          tilts_truth, tilts_main, box, radius_px)


def _write_outputs(out: Path, vol: torch.Tensor, pixel_size: float, truth_ts: dict, main_ts: dict,
                   parts_truth: list, parts_main: list, truths: dict, stacks: dict, tilts_truth: dict,
                   tilts_main: dict, box: int, radius_px: float) -> TiltSeriesSimulation:
    """Write the STAR files and the truth map (layout in the module docstring)."""
    map_path = out / "truth" / "truth_map.mrc"
    write_mrc(map_path, vol.cpu().numpy(), pixel_size)
    paths = {}
    for key, folder, series, parts in (("main", out, main_ts, parts_main), ("truth", out / "truth", truth_ts,
                                                                            parts_truth)):
        tomo_star = folder / "tomograms.star"
        part_star = folder / "particles.star"
        opt_star = folder / "optimisation_set.star"
        write_tomograms(tomo_star, TomogramSet(series), folder / "tilt_series")
        write_tomo_particles(part_star, TomoParticles({}, None, pd.concat(parts, ignore_index=True)))
        write_optimisation_set(opt_star, {"rlnTomoParticlesFile": part_star, "rlnTomoTomogramsFile": tomo_star})
        paths[key] = (tomo_star, part_star, opt_star)
    return TiltSeriesSimulation(
        out_dir=out, tomograms_star=paths["main"][0], particles_star=paths["main"][1],
        optimisation_set=paths["main"][2], truth_tomograms_star=paths["truth"][0],
        truth_particles_star=paths["truth"][1], truth_optimisation_set=paths["truth"][2], map_path=map_path,
        stack_paths=stacks, truth=truths, tilts_truth=tilts_truth, tilts_main=tilts_main,
        particles_truth=pd.concat(parts_truth, ignore_index=True),
        particles_main=pd.concat(parts_main, ignore_index=True), render_box=box, particle_radius_px=radius_px)
