"""``cryopipe reconstruct-particle``: half maps and merged map straight from the tilt series at the particles'
poses (like ``relion_tomo_reconstruct_particle``).

Tilt series are read one at a time and their particles inserted in batches of (particle, tilt) images
(:mod:`cryopipe.tomo.reconstruct_particle`), so memory holds one tilt series plus the Fourier sums. Writes
``half1.mrc``, ``half2.mrc``, ``merged.mrc`` (cropped to ``--crop`` and tapered), ``*_full.mrc`` (``--b`` box,
untapered) when cropping, and ``optimisation_set.star`` pointing at the half maps as the next references.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryopipe.core.device import resolve_device
from cryopipe.engine.backend import add_dask_arguments, job_backend
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import write_mrc
from cryopipe.io.tomo_particles import (
    check_inside,
    read_optimisation_set,
    read_tomo_particles,
    write_optimisation_set,
)
from cryopipe.io.tomography import read_tomograms
from cryopipe.tomo.particle_images import check_box_sizes
from cryopipe.tomo.particle_sets import particles_per_tilt_series, tilt_series_geometry
from cryopipe.tomo.reconstruct_particle import ParticleAccumulator, finalise_map, insert_tilt_series_particles

HELP = "particle half maps straight from tilt series at known poses (like relion_tomo_reconstruct_particle)"


@dataclass
class ParticleMaps:
    """Result of :func:`reconstruct_particle`: maps ``[crop³]`` (float32, z/y/x) and what went into them."""

    half1: np.ndarray
    half2: np.ndarray
    merged: np.ndarray
    merged_full: np.ndarray
    pixel_size: float
    n_particles: int
    n_images: int
    seconds: float


def input_files(optimisation_set=None, particles=None, tomograms=None) -> tuple[Path, Path]:
    """Particles and tomograms files from an optimisation set and/or explicit paths (explicit ones win)."""
    entries = read_optimisation_set(optimisation_set) if optimisation_set else {}
    p = particles or entries.get("rlnTomoParticlesFile")
    t = tomograms or entries.get("rlnTomoTomogramsFile")
    if p is None or t is None:
        raise CryopipeError("give --i optimisation_set.star, or both --p particles.star and --t tomograms.star")
    return Path(p), Path(t)


def check_inputs(particles_file: Path, tomograms_file: Path) -> None:
    """Read and check the inputs before a job folder is made (one-line errors): both files exist and parse, every
    particle names a known tomogram and lies inside it, and the tilt images of the tomograms it uses exist,
    agree in number with their STAR file and in pixel size with rlnTomoTiltSeriesPixelSize."""
    for path in (particles_file, tomograms_file):
        if not Path(path).exists():
            raise CryopipeError(f"{path}: no such file")
    tomograms = read_tomograms(tomograms_file)
    particles = read_tomo_particles(particles_file, tomograms)
    check_inside(particles, tomograms)
    for name in dict.fromkeys(particles.tomo_names.tolist()):
        tomograms[name].check_images()


@dataclass
class ParticleInsertion:
    """What every per-tilt-series task of :func:`reconstruct_particle` needs (sent once per run): box, binning and
    the insertion options of :func:`reconstruct_particle`."""

    box: int
    binning: float
    batch_pairs: int
    do_ctf: bool
    cutoff_fraction: float
    max_dose: float | None
    device: str | None


@dataclass
class TiltSeriesSums:
    """One tilt series' additive sums: ``data`` ``[2, b, b, b//2+1]`` (complex128, Σ c·X per half set),
    ``weight`` (float64, Σ c²) and the number of (particle, tilt) images inserted."""

    data: torch.Tensor
    weight: torch.Tensor
    n_images: int


def insert_tilt_series(inputs: ParticleInsertion, snapshot, group, device=None,
                       into: ParticleAccumulator | None = None) -> TiltSeriesSums | int:
    """The unit of work of ``reconstruct-particle`` (issue 15): insert the particles of one tilt series
    (:class:`~cryopipe.tomo.particle_sets.TiltSeriesParticles`; a worker reads the tilt images itself) into a
    fresh accumulator and return its :class:`TiltSeriesSums`, or into ``into`` (the in-process loop) and return the
    number of images inserted. ``snapshot`` is unused; ``device`` (a Dask worker's) overrides ``inputs.device``."""
    dev = resolve_device(device if device is not None else inputs.device)
    accumulator = into if into is not None else ParticleAccumulator(inputs.box, device=dev)
    dev = accumulator.data.device
    ts = group.tilt_series
    images = torch.from_numpy(ts.read_images()).to(dev)
    used = insert_tilt_series_particles(accumulator, images, tilt_series_geometry(ts, dev), group.positions_px.to(dev),
                                        group.orientations.to(dev), group.half_sets.to(dev), inputs.binning,
                                        batch_pairs=inputs.batch_pairs, do_ctf=inputs.do_ctf,
                                        cutoff_fraction=inputs.cutoff_fraction, max_dose=inputs.max_dose)
    if into is not None:
        return used
    return TiltSeriesSums(accumulator.data, accumulator.weight, used)


def reconstruct_particle(particles_file, tomograms_file, *, box: int, crop: int | None = None, binning: float = 1.0,
                         symmetry: str = "C1", snr: float = -1.0, taper: float = 10.0, do_ctf: bool = True,
                         cutoff_fraction: float = 0.01, max_dose: float | None = None, batch_pairs: int = 512,
                         device=None, progress: bool = True, backend=None) -> ParticleMaps:
    """Reconstruct the particles of ``particles_file`` from the tilt series of ``tomograms_file``. ``backend``
    (:func:`cryopipe.engine.backend.make_backend`; default in-process, one accumulator): where the tilt series are
    inserted, one task per tilt series (:func:`insert_tilt_series`) whose sums are added here in the set's order."""
    t0 = time.perf_counter()
    check_box_sizes(box, crop, binning)
    dev = resolve_device(device)
    tomograms = read_tomograms(tomograms_file)
    particles = read_tomo_particles(particles_file, tomograms)
    groups = list(particles_per_tilt_series(particles, tomograms))
    if not groups:
        raise CryopipeError(f"{particles_file}: no particles")
    pixel_size = groups[0].tilt_series.pixel_size
    for group in groups:
        ts = group.tilt_series
        if abs(ts.pixel_size - pixel_size) > 1e-4 * pixel_size:
            raise CryopipeError(f"{tomograms_file}: tomogram {ts.name} has pixel size {ts.pixel_size} Å, others "
                                f"{pixel_size} Å; reconstruct tilt series of one pixel size together")
    inputs = ParticleInsertion(int(box), float(binning), int(batch_pairs), bool(do_ctf), float(cutoff_fraction),
                               max_dose, None if device is None else str(device))
    accumulator = ParticleAccumulator(box, device=dev)
    n_images = 0

    def report(k: int, group, used: int) -> None:
        if progress:
            print(f"reconstruct-particle: tilt series {k}/{len(groups)} {group.tilt_series.name}: "
                  f"{group.rows.size} particles, {used} images ({time.perf_counter() - t0:.1f} s)", flush=True)

    if backend is None or not backend.distributed:
        for k, group in enumerate(groups, start=1):
            used = insert_tilt_series(inputs, None, group, device=dev, into=accumulator)
            n_images += used
            report(k, group, used)
    else:
        for k, (group, sums) in enumerate(zip(groups, backend.map(insert_tilt_series, inputs, None, groups)), 1):
            accumulator.data += sums.data.to(dev)  # added in the set's order: deterministic
            accumulator.weight += sums.weight.to(dev)
            n_images += sums.n_images
            report(k, group, sums.n_images)
    if symmetry.upper() != "C1":
        accumulator = accumulator.symmetrised(symmetry)
    halves = [finalise_map(accumulator.data[h], accumulator.weight[h], snr, crop, taper)[0] for h in range(2)]
    merged, merged_full = finalise_map(accumulator.data.sum(0), accumulator.weight.sum(0), snr, crop, taper)
    return ParticleMaps(halves[0].cpu().numpy(), halves[1].cpu().numpy(), merged.cpu().numpy(),
                        merged_full.cpu().numpy(), pixel_size * binning, len(particles), n_images,
                        time.perf_counter() - t0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="optimisation_set", default=None, help="optimisation_set.star (particles + tomograms)")
    p.add_argument("--p", dest="particles", default=None, help="particles STAR file (overrides --i)")
    p.add_argument("--t", dest="tomograms", default=None, help="tomograms.star (overrides --i)")
    p.add_argument("--o", dest="output", default=None,
                   help="job folder (ReconstructParticleTomo/jobNNN/; none: a new job in the project here) or a "
                        "plain output directory")
    p.add_argument("--b", dest="box", type=int, required=True, help="box size in binned pixels")
    p.add_argument("--crop", type=int, default=-1, help="final (cropped) box in binned pixels; <= 0: no crop")
    p.add_argument("--bin", dest="binning", type=float, default=1.0, help="binning factor of the output")
    p.add_argument("--sym", default="C1", help="point-group symmetry")
    p.add_argument("--SNR", dest="snr", type=float, default=-1.0,
                   help="Wiener SNR for the CTF division; negative: RELION's heuristic")
    p.add_argument("--taper", type=float, default=10.0, help="spherical taper width (px) of the cropped maps")
    p.add_argument("--no_ctf", action="store_true", help="do not apply the CTF (dose weights only)")
    p.add_argument("--cutoff_fract", dest="cutoff_fraction", type=float, default=0.01,
                   help="ignore frequencies where the dose weight is below this fraction")
    p.add_argument("--max_dose", type=float, default=-1.0, help="use only tilts with pre-exposure <= this (e/Å²)")
    p.add_argument("--batch_size", dest="batch_pairs", type=int, default=512,
                   help="(particle, tilt) images per batch")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--j", type=int, default=1, help="accepted for RELION compatibility (threads: torch decides)")
    add_dask_arguments(p)


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    particles_file, tomograms_file = input_files(args.optimisation_set, args.particles, args.tomograms)
    check_inputs(particles_file, tomograms_file)
    crop = args.crop if args.crop and args.crop > 0 else None
    check_box_sizes(args.box, crop, args.binning)
    with open_job_dir(args.output, "ReconstructParticleTomo", ProcessLabel.RECONSTRUCT_PARTICLE_TOMO,
                      inputs=[(particles_file, NodeType.PARTICLES), (tomograms_file, NodeType.TOMOGRAMS)],
                      params=vars(args), is_tomo=True) as job, job_backend(args, log, "tilt series") as backend:
        log(f"reconstructing the particles of {particles_file} from {tomograms_file} (box {args.box}, "
            f"crop {crop or args.box}, bin {args.binning:g}, sym {args.sym})")
        maps = reconstruct_particle(particles_file, tomograms_file, box=args.box, crop=crop, binning=args.binning,
                                    symmetry=args.sym, snr=args.snr, taper=args.taper, do_ctf=not args.no_ctf,
                                    cutoff_fraction=args.cutoff_fraction,
                                    max_dose=args.max_dose if args.max_dose > 0 else None,
                                    batch_pairs=args.batch_pairs, device=args.device, backend=backend)
        for name, volume in (("half1", maps.half1), ("half2", maps.half2), ("merged", maps.merged)):
            write_mrc(job.path(f"{name}.mrc"), volume, maps.pixel_size)
        if crop:
            write_mrc(job.path("merged_full.mrc"), maps.merged_full, maps.pixel_size)
        job.add_output(job.path("merged.mrc"), NodeType.DENSITY_MAP)
        job.add_output(job.path("half1.mrc"), NodeType.HALFMAP)
        entries = {"rlnTomoParticlesFile": Path(particles_file).resolve(),
                   "rlnTomoTomogramsFile": Path(tomograms_file).resolve(),
                   "rlnTomoReferenceMap1File": job.path("half1.mrc"), "rlnTomoReferenceMap2File": job.path("half2.mrc")}
        write_optimisation_set(job.path("optimisation_set.star"), entries)
        job.add_output(job.path("optimisation_set.star"), NodeType.TOMO_OPTIMISATION_SET)
        log(f"reconstructed {maps.n_particles} particles from {maps.n_images} tilt images into {job.path('merged.mrc')} "
            f"({maps.merged.shape[0]}^3, {maps.pixel_size:.3f} Å/px) in {maps.seconds:.1f} s")
    return 0
