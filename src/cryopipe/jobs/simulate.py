"""``cryopipe simulate``: ground-truth data sets from an atomic model (particle stacks, micrographs or tilt series).

``--what particles``: ``--n`` particle images (random orientations uniform on SO(3), origins within ``±--max_shift``
Å, per-particle astigmatic defocus, white noise at ``--snr``) → ``particles.star`` (what a user would have:
optics, image names, CTF), ``particles_truth.star`` (plus true angles/origins and the junk label
``cryopipeJunkType``), ``truth_map.mrc``, ``Particles/particles_NNNNN.mrcs``.

``--what micrographs``: ``--n`` micrographs with ``--n_per_mic`` particles at known non-overlapping coordinates
(per-micrograph defocus, dark particles, optional ice ramp and contamination) → ``micrographs.star`` (CtfFind-like
columns with the true CTF), ``Micrographs/micNNN.mrc``, ``Micrographs/micNNN_truth.star`` + ``coords_truth_list.star``
(true coordinates and angles), ``micrographs_truth.star``, ``contamination_truth.star``, ``truth_map.mrc``.

``--what tiltseries``: ``--n_tomograms`` tilt series (RELION 5 tomography project, see
:mod:`cryopipe.sim.tiltseries`) with ``--particles_per_tomogram`` particles in a slab of ``--thickness`` Å, random or
on a ``--lattice sphere|cylinder`` (orientations normal to the surface, stored as rlnTomoSubtomogram* priors), tilt scheme
``--tilt_range``/``--tilt_step``/``--order``/``--dose_per_tilt``, noise at ``--snr`` (0° tilt, particle footprints) and
optional ``--perturb_*`` errors in the metadata → ``tomograms.star``, ``tilt_series/TS_NN.star`` + ``.mrcs``,
``particles.star``, ``optimisation_set.star``, ``truth/`` (truth_map.mrc and the true STAR files).

The map comes from ``--model`` (built-in ``3enl`` or a PDB/mmCIF file; gemmi potential, see
:mod:`cryopipe.sim.atomic`), optionally made into a point-group assembly (``--sym``, ``--sym_offset``), or from an
existing ``--map``. Output goes to a job folder ``Simulate/jobNNN/`` of the project in the current directory, or
the ``--o`` folder (the ``--o`` rule of :mod:`cryopipe.pipeline.project`); file names inside STAR files are
relative to the project directory (or the current directory for a plain ``--o`` folder).
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from cryopipe.core.fourier import good_fft_size
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.sim.atomic import load_model, model_radius, potential_map, symmetric_assembly
from cryopipe.sim.micrographs import HARD_MICROGRAPHS, MicrographSimulation, simulate_micrographs
from cryopipe.sim.particles import ParticleSimulation, simulate_particles
from cryopipe.sim.tiltseries import Perturbations, TiltSeriesSimulation, simulate_tilt_series

HELP = "simulate ground-truth particle stacks, micrographs or tilt series from an atomic model (or a map)"

__all__ = ["HELP", "build_volume", "default_box", "simulate_particle_dataset", "simulate_micrograph_dataset",
           "simulate_tiltseries_dataset", "add_arguments", "main"]


def default_box(diameter_A: float, pixel_size: float) -> int:
    """A fast even box holding 1.8 particle diameters (room for the CTF-delocalised signal): 48 for 3ENL at 3 Å."""
    return good_fft_size(int(math.ceil(1.8 * diameter_A / pixel_size)))


def build_volume(
    model: str | os.PathLike = "3enl",
    box: int | None = None,
    pixel_size: float | None = 3.0,
    blur_B: float = 20.0,
    sym: str = "C1",
    sym_offset_A: float | None = None,
    map_path: str | os.PathLike | None = None,
) -> tuple[np.ndarray, float]:
    """The ground-truth map ``[N, N, N]`` (z, y, x) and its pixel size (Å).

    From ``map_path`` (an MRC map; ``box`` / ``pixel_size`` must agree with it when given), or from the atomic
    ``model`` (:func:`cryopipe.sim.atomic.potential_map`, centre of mass at ``N//2``). ``sym`` other than C1 builds
    the assembly of copies placed ``sym_offset_A`` Å off the symmetry centre (default: the closest distance without
    clashes, :func:`cryopipe.sim.atomic.symmetric_assembly`).
    ``box`` None: :func:`default_box` of the (assembly's) diameter.
    """
    if map_path is not None:
        from cryopipe.io.mrc import read_mrc

        vol, apix = read_mrc(map_path)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise InputFileError(map_path, f"the map must be a cube, got shape {vol.shape}", "give a 3D map N×N×N")
        if pixel_size is not None and apix > 0 and abs(apix - pixel_size) > 1e-3 * pixel_size:
            raise InputFileError(map_path, f"pixel size in the header is {apix:g} Å, not --angpix {pixel_size:g}",
                                 "leave out --angpix or resample the map")
        if box is not None and vol.shape[0] != box:
            raise InputFileError(map_path, f"box is {vol.shape[0]}, not --box {box}", "leave out --box")
        apix = pixel_size if apix <= 0 else apix
        if apix is None or apix <= 0:
            raise InputFileError(map_path, "the header has no pixel size", "give --angpix")
        vol = np.asarray(vol, dtype=np.float32)
        bad = ~np.isfinite(vol)
        if bad.any():
            raise InputFileError(map_path, f"{int(bad.sum())} voxels are NaN or infinite (first at index "
                                 f"{tuple(int(i) for i in np.argwhere(bad)[0])} z, y, x)", "give a finite map")
        if float(vol.max()) == float(vol.min()):
            raise InputFileError(map_path, f"the map is constant ({float(vol.min()):g} everywhere): nothing to "
                                 "project", "give a map with density")
        return vol, float(apix)
    if pixel_size is None or pixel_size <= 0:
        raise CryopipeError(f"--angpix must be > 0 Å (got {pixel_size})")
    st = load_model(model)
    radius = model_radius(st)
    if sym.upper() != "C1":
        st = symmetric_assembly(st, sym, sym_offset_A)
        radius = model_radius(st)
    n = int(box) if box is not None else default_box(2 * radius, pixel_size)
    if n * pixel_size < 2 * radius:
        raise CryopipeError(f"--box {n} × {pixel_size:g} Å = {n * pixel_size:g} Å is smaller than the particle "
                            f"diameter {2 * radius:.0f} Å; use a larger box")
    return potential_map(st, n, pixel_size, blur_B=blur_B), float(pixel_size)


def simulate_particle_dataset(out_dir: str | os.PathLike, *, model: str | os.PathLike = "3enl",
                              map_path: str | os.PathLike | None = None, box: int | None = None,
                              pixel_size: float | None = 3.0, blur_B: float = 20.0, sym: str = "C1",
                              sym_offset_A: float | None = None, n: int = 1000, snr: float = 0.1,
                              **kwargs) -> ParticleSimulation:
    """Build the map (:func:`build_volume`) and simulate ``n`` particles into ``out_dir``
    (:func:`cryopipe.sim.particles.simulate_particles`; ``kwargs`` are passed on)."""
    vol, apix = build_volume(model, box, pixel_size, blur_B, sym, sym_offset_A, map_path)
    return simulate_particles(vol, n, apix, snr, out_dir, **kwargs)


def simulate_micrograph_dataset(out_dir: str | os.PathLike, *, model: str | os.PathLike = "3enl",
                                map_path: str | os.PathLike | None = None, box: int | None = None,
                                pixel_size: float | None = 3.0, blur_B: float = 20.0, sym: str = "C1",
                                sym_offset_A: float | None = None, n: int = 10, snr: float = 0.5,
                                **kwargs) -> MicrographSimulation:
    """Build the map (:func:`build_volume`) and simulate ``n`` micrographs into ``out_dir``
    (:func:`cryopipe.sim.micrographs.simulate_micrographs`; ``kwargs`` are passed on)."""
    vol, apix = build_volume(model, box, pixel_size, blur_B, sym, sym_offset_A, map_path)
    return simulate_micrographs(vol, n, apix, snr, out_dir, **kwargs)


def simulate_tiltseries_dataset(out_dir: str | os.PathLike, *, model: str | os.PathLike = "3enl",
                                map_path: str | os.PathLike | None = None, box: int | None = None,
                                pixel_size: float | None = 6.0, blur_B: float = 20.0, sym: str = "C1",
                                sym_offset_A: float | None = None, **kwargs) -> TiltSeriesSimulation:
    """Build the map (:func:`build_volume`) and simulate tilt series into ``out_dir``
    (:func:`cryopipe.sim.tiltseries.simulate_tilt_series`; ``kwargs`` are passed on)."""
    vol, apix = build_volume(model, box, pixel_size, blur_B, sym, sym_offset_A, map_path)
    return simulate_tilt_series(vol, apix, out_dir, **kwargs)


# ------------------------------------------------------------------------------------------------ command line


def _float(text: str) -> float:
    """A float that also accepts ``inf``."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--what", choices=("particles", "micrographs", "tiltseries"), default="particles",
                   help="simulate a particle stack, micrographs with particles at known coordinates, or tilt series")
    p.add_argument("--o", dest="output", default=None,
                   help="output: a job folder (Simulate/jobNNN/, or none: a new job in the project in the current "
                        "directory) or any other folder")
    g = p.add_argument_group("map")
    g.add_argument("--model", default="3enl", help="atomic model: built-in name (3enl) or a PDB/mmCIF file")
    g.add_argument("--map", dest="map_path", default=None, help="use this MRC map instead of an atomic model")
    g.add_argument("--box", type=int, default=None, help="box size (px); default 1.8 particle diameters")
    g.add_argument("--angpix", type=float, default=None,
                   help="pixel size (Å; default: the --map header, else 3, tilt series 6)")
    g.add_argument("--blur", type=float, default=20.0, help="B-factor (Å²) added to every atom")
    g.add_argument("--sym", default="C1", help="build a point-group assembly of the model (C1: the model itself)")
    g.add_argument("--sym_offset", type=float, default=None,
                   help="distance (Å) of each copy from the symmetry centre (default: closest without clashes)")
    g = p.add_argument_group("data")
    g.add_argument("--n", type=int, default=None,
                   help="number of particles (--what particles, default 1000) or micrographs (default 10)")
    g.add_argument("--snr", type=_float, default=None,
                   help="signal-to-noise ratio at the particle (inf: no noise); default 0.1 particles, 0.5 micrographs")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--no_ctf", action="store_true", help="no CTF (plain projections)")
    g.add_argument("--defocus_min", type=float, default=None, help="smallest defocus (Å; default 5000 / 10000)")
    g.add_argument("--defocus_max", type=float, default=None, help="largest defocus (Å; default 30000 / 25000)")
    g.add_argument("--astigmatism", type=float, default=None, help="largest |defocusU − defocusV| (Å)")
    g.add_argument("--phase_shift", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="phase-plate phase shift range (degrees)")
    g.add_argument("--voltage", type=float, default=300.0, help="voltage (kV)")
    g.add_argument("--cs", type=float, default=2.7, help="spherical aberration (mm)")
    g.add_argument("--q0", type=float, default=0.1, help="amplitude contrast")
    g.add_argument("--float16", action="store_true", help="write images in float16 (MRC mode 12)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g = p.add_argument_group("particles (--what particles)")
    g.add_argument("--max_shift", type=float, default=6.0, help="origins uniform within ± this (Å)")
    g.add_argument("--bfactor", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="per-particle CTF B-factor range (Å²)")
    g.add_argument("--frac_empty", type=float, default=0.0, help="fraction of empty-ice (noise-only) images")
    g.add_argument("--frac_contamination", type=float, default=0.0, help="fraction of contamination (blob) images")
    g.add_argument("--truth_in_main", action="store_true", help="also write true angles/origins into particles.star")
    g.add_argument("--batch_size", type=int, default=1000, help="images computed per batch")
    g.add_argument("--images_per_stack", type=int, default=10000, help="images per .mrcs file")
    g = p.add_argument_group("micrographs (--what micrographs)")
    g.add_argument("--mic_size", type=int, default=1024, help="micrograph side (px)")
    g.add_argument("--n_per_mic", type=int, default=50, help="particles per micrograph")
    g.add_argument("--min_distance", type=float, default=None,
                   help="minimum distance between particle centres (px; default particle diameter + 2)")
    g.add_argument("--ice_offset", type=float, default=0.0, help="ice offset range (units of the particle signal sd)")
    g.add_argument("--ice_gradient", type=float, default=0.0,
                   help="ice ramp across the micrograph (units of the particle signal sd)")
    g.add_argument("--n_blobs", type=int, default=0, help="contamination blobs per micrograph")
    g.add_argument("--hard", action="store_true",
                   help="micrographs as hard as real data (issue 11; cryopipe.sim.micrographs.HARD_MICROGRAPHS): thicker ice "
                        "up to 1.3 noise σ darker and 20 %% noisier (ramp + sinusoid), 2-3 dark blobs of 300-600 Å on 60 %% "
                        "of the micrographs (replaces --n_blobs)")
    g.add_argument("--carbon_edge", type=float, default=0.0,
                   help="fraction of micrographs with a carbon edge (the rim of the hole; carbon 1.5 noise σ darker, no "
                        "particles on it)")
    _add_tiltseries_arguments(p)


def _add_tiltseries_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tilt series (--what tiltseries; defocus default 25000..45000 Å, astigmatism 800 Å)")
    g.add_argument("--n_tomograms", type=int, default=2, help="number of tilt series")
    g.add_argument("--particles_per_tomogram", type=int, default=20, help="particles per tomogram (at most)")
    g.add_argument("--image_size", type=int, nargs=2, default=(400, 360), metavar=("W", "H"),
                   help="tilt image size (px)")
    g.add_argument("--tomogram_size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="rlnTomoSizeX/Y/Z (px; default W H thickness)")
    g.add_argument("--thickness", type=float, default=800.0, help="slab thickness holding the particles (Å)")
    g.add_argument("--tilt_range", type=float, nargs=2, default=(-60.0, 60.0), metavar=("MIN", "MAX"),
                   help="tilt range (degrees)")
    g.add_argument("--tilt_step", type=float, default=3.0, help="tilt step (degrees)")
    g.add_argument("--order", choices=("dose-symmetric", "bidirectional"), default="dose-symmetric",
                   help="acquisition order (sets rlnMicrographPreExposure)")
    g.add_argument("--dose_per_tilt", type=float, default=3.0, help="dose per tilt image (e/Å²)")
    g.add_argument("--lattice", choices=("random", "sphere", "cylinder"), default="random",
                   help="particle arrangement: random in the slab, or on a sphere / cylinder surface (normal "
                        "orientations)")
    g.add_argument("--lattice_radius", type=float, default=None,
                   help="sphere/cylinder radius (Å; default: the largest that fits the slab)")
    g.add_argument("--lattice_spacing", type=float, default=None,
                   help="distance between lattice points (Å; default 2.2 particle radii)")
    g.add_argument("--tilt_axis", type=float, default=85.0, help="tilt-axis angle (degrees, rlnTomoZRot)")
    g.add_argument("--alignment_jitter", type=float, default=1.0,
                   help="scale of the random true per-tilt alignment (0: ideal geometry)")
    g.add_argument("--hand", type=float, default=-1.0, help="rlnTomoHand (1 or -1)")
    g.add_argument("--render_box", type=int, default=None,
                   help="box (px) each particle image is computed in (default: map box + 2x CTF delocalisation)")
    g.add_argument("--tilt_batch", type=int, default=8, help="tilt images rendered at once")
    g.add_argument("--perturb_tilt_shift", type=float, default=0.0,
                   help="sd of per-tilt shift errors in the metadata (Å)")
    g.add_argument("--perturb_tilt_angle", type=float, default=0.0,
                   help="sd of per-tilt XTilt/YTilt/ZRot errors in the metadata (degrees)")
    g.add_argument("--perturb_defocus", type=float, default=0.0, help="sd of per-tilt defocus errors (Å)")
    g.add_argument("--perturb_warp", type=float, default=0.0,
                   help="RMS (Å) of a smooth per-tilt image warp applied to the images (truth STAR only)")
    g.add_argument("--perturb_particle_shift", type=float, default=0.0,
                   help="sd of per-particle position errors (Å, each axis)")
    g.add_argument("--perturb_particle_angle", type=float, default=0.0,
                   help="sd of per-particle orientation errors (degrees, about random axes)")


def _ctf_kwargs(args: argparse.Namespace, what: str) -> dict:
    lo, hi = (5000.0, 30000.0) if what == "particles" else (10000.0, 25000.0)
    kw = dict(defocus_range=(args.defocus_min if args.defocus_min is not None else lo,
                             args.defocus_max if args.defocus_max is not None else hi),
              voltage=args.voltage, cs=args.cs, amplitude_contrast=args.q0, ctf=not args.no_ctf,
              phase_shift_range=tuple(args.phase_shift) if args.phase_shift else None,
              dtype="float16" if args.float16 else "float32", seed=args.seed, device=args.device)
    if args.astigmatism is not None:
        kw["astigmatism_A"] = args.astigmatism
    return kw


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    what = args.what
    n = args.n if args.n is not None else (1000 if what == "particles" else 10)
    snr = args.snr if args.snr is not None else (0.5 if what == "micrographs" else 0.1)
    angpix = args.angpix
    if angpix is None and not args.map_path:   # with --map: the map header's pixel size
        angpix = 6.0 if what == "tiltseries" else 3.0
    map_kw = dict(model=args.model, map_path=args.map_path, box=args.box, pixel_size=angpix,
                  blur_B=args.blur, sym=args.sym, sym_offset_A=args.sym_offset)
    with open_job_dir(args.output, "Simulate", ProcessLabel.SIMULATE, params=vars(args)) as job:
        out = job.dir
        src = args.map_path or args.model
        if what == "tiltseries":
            res = _run_tiltseries(args, job, snr, map_kw)
        elif what == "particles":
            log(f"simulating {n} particles of {src} (SNR {snr:g}, seed {args.seed})")
            res = simulate_particle_dataset(
                out, n=n, snr=snr, **map_kw, **_ctf_kwargs(args, what), max_shift_A=args.max_shift,
                bfactor_range=tuple(args.bfactor) if args.bfactor else None, frac_empty=args.frac_empty,
                frac_contamination=args.frac_contamination, truth_in_main=args.truth_in_main,
                batch_size=args.batch_size, images_per_stack=args.images_per_stack, image_root=job.root,
                progress=True)
            job.add_output(res.star_path, NodeType.PARTICLES)
            job.add_output(res.truth_path, NodeType.PARTICLES)
            log(f"wrote {job.relpath(res.star_path)} ({n} images in {len(res.stack_paths)} stack(s)), truth in "
                f"{job.relpath(res.truth_path)}; noise sd {res.noise_sigma:.4g}, signal variance "
                f"{res.signal_variance:.4g} within {res.signal_radius_px:.1f} px")
        else:
            log(f"simulating {n} micrographs of {src} ({args.n_per_mic} particles each, SNR {snr:g}, seed {args.seed})")
            res = simulate_micrograph_dataset(
                out, n=n, snr=snr, **map_kw, **_ctf_kwargs(args, what), size=args.mic_size,
                particles_per_micrograph=args.n_per_mic, min_distance_px=args.min_distance,
                ice_offset=args.ice_offset, ice_gradient=args.ice_gradient,
                **({**HARD_MICROGRAPHS} if args.hard else {"n_blobs": args.n_blobs}),
                carbon_probability=args.carbon_edge, image_root=job.root, progress=True)
            job.add_output(res.micrographs_star, NodeType.MICROGRAPHS_CTF)
            job.add_output(res.coords_list_star, NodeType.COORDS)
            n_parts = sum(len(g.coords) for g in res.geometry)
            log(f"wrote {job.relpath(res.micrographs_star)} ({n} micrographs, {n_parts} particles), true "
                f"coordinates in {job.relpath(res.coords_list_star)}")
        if res.map_path is not None:
            job.add_output(res.map_path, NodeType.DENSITY_MAP)
    return 0


def _run_tiltseries(args: argparse.Namespace, job, snr: float, map_kw: dict) -> TiltSeriesSimulation:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType

    if args.no_ctf or args.phase_shift:
        raise CryopipeError("--no_ctf and --phase_shift are not available with --what tiltseries")
    pert = Perturbations(tilt_shift_A=args.perturb_tilt_shift, tilt_angle_deg=args.perturb_tilt_angle,
                         defocus_A=args.perturb_defocus, warp_A=args.perturb_warp,
                         particle_shift_A=args.perturb_particle_shift, particle_angle_deg=args.perturb_particle_angle)
    defocus = (args.defocus_min if args.defocus_min is not None else 25000.0,
               args.defocus_max if args.defocus_max is not None else 45000.0)
    log(f"simulating {args.n_tomograms} tilt series of {args.map_path or args.model} ({args.lattice}, "
        f"{args.particles_per_tomogram} particles each, SNR {snr:g}, seed {args.seed})")
    res = simulate_tiltseries_dataset(
        job.dir, **map_kw, n_tomograms=args.n_tomograms, particles_per_tomogram=args.particles_per_tomogram,
        image_size=tuple(args.image_size), tomogram_size=args.tomogram_size, thickness_A=args.thickness,
        tilt_range=tuple(args.tilt_range), tilt_step=args.tilt_step, order=args.order,
        dose_per_tilt=args.dose_per_tilt, lattice=args.lattice, lattice_radius_A=args.lattice_radius,
        spacing_A=args.lattice_spacing, tilt_axis_deg=args.tilt_axis, alignment_jitter=args.alignment_jitter,
        defocus_range=defocus, astigmatism_A=args.astigmatism if args.astigmatism is not None else 800.0,
        hand=args.hand, voltage=args.voltage, cs=args.cs, amplitude_contrast=args.q0, snr=snr, perturbations=pert,
        dtype="float16" if args.float16 else "float32", render_box=args.render_box, seed=args.seed,
        tilt_batch=args.tilt_batch, device=args.device, progress=True)
    job.add_output(res.tomograms_star, NodeType.TOMOGRAMS)
    job.add_output(res.particles_star, NodeType.PARTICLES)
    job.add_output(res.optimisation_set, NodeType.TOMO_OPTIMISATION_SET)
    job.add_output(res.truth_optimisation_set, NodeType.TOMO_OPTIMISATION_SET)
    n_parts = len(res.particles_main)
    sigmas = ", ".join(f"{k} {v.noise_sigma:.3g}" for k, v in res.truth.items())
    log(f"wrote {job.relpath(res.tomograms_star)} ({len(res.truth)} tilt series, {n_parts} particles, render box "
        f"{res.render_box} px), truth in {job.relpath(res.truth_optimisation_set)}; noise sd {sigmas}")
    return res
