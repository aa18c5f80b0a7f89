"""``cryopipe subtomo``: pseudo-subtomograms or 2D particle stacks from tilt series (like ``relion_tomo_subtomo``,
the "Extract subtomos" job).

Files, as RELION lays them out (paths relative to the project directory):

* 3D (default): ``Subtomograms/<TomoName>/<n>_data.mrc`` (``crop³`` real space, CTF·dose-premultiplied, contrast
  inverted, in the subtomogram frame; pixel ``bin·px``) and ``<n>_weights.mrc`` (``Σ(CTF·W)²`` then the
  multiplicity, FFTW half layout ``[2·crop, crop, crop//2+1]``; header pixel ``1/(bin·px)``).
* ``--stack2d``: ``Subtomograms/<TomoName>/<n>_stack2d.mrcs``: the premultiplied visible tilt images
  (``crop²``), rlnTomoVisibleFrames records which tilts they are.
* ``particles.star``: ``data_general`` (rlnTomoSubTomosAre2DStacks), optics gain rlnCtfDataAreCtfPremultiplied 1,
  rlnImageDimensionality (3 or 2), rlnTomoSubtomogramBinning, rlnImagePixelSize, rlnImageSize; particles gain
  rlnImageName (and rlnCtfImage in 3D); origins are folded into the centred coordinates (unless
  ``--dont_apply_offsets``); particles visible in fewer than ``--min_frames`` tilts are left out.
* ``optimisation_set.star`` (particles + tomograms) for the refinement.

Particles are processed per tilt series in batches; each particle's files are written atomically, so
``--only_do_unfinished`` continues an interrupted run without redoing finished particles.
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
    TomoParticles,
    read_tomo_particles,
    to_centered_coordinates,
    write_optimisation_set,
    write_tomo_particles,
)
from cryopipe.io.tomography import read_tomograms
from cryopipe.jobs.reconstruct_particle import check_inputs, input_files
from cryopipe.tomo.particle_images import check_box_sizes
from cryopipe.tomo.particle_sets import particles_per_tilt_series, tilt_series_geometry
from cryopipe.tomo.subtomograms import particle_stacks_2d, pseudo_subtomograms

HELP = "pseudo-subtomograms or 2D particle stacks from tilt series (like relion_tomo_subtomo)"

_ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
_CENTERED = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")


def particle_file_root(particle_name: str, tomo_name: str) -> str:
    """``Subtomograms/<TomoName>/<n>`` for particle name ``<TomoName>/<n>`` (or a bare ``<n>``)."""
    name = str(particle_name)
    return f"Subtomograms/{name}" if "/" in name else f"Subtomograms/{tomo_name}/{name}"


def fold_origins(particles: TomoParticles) -> None:
    """Centred coordinates ``c − A_sub·origin`` and origins 0, in place (what RELION's subtomo writes)."""
    table = particles.particles
    if not all(c in table.columns for c in _ORIGINS):
        return
    origins = table[list(_ORIGINS)].to_numpy(dtype=np.float64)
    A_sub = particles.subtomogram_matrices()
    table.loc[:, list(_CENTERED)] = table[list(_CENTERED)].to_numpy(dtype=np.float64) - np.einsum(
        "nij,nj->ni", A_sub, origins)
    table.loc[:, list(_ORIGINS)] = 0.0


def _visible_frames(visible: torch.Tensor) -> str:
    return "[" + ",".join(str(int(v)) for v in visible.tolist()) + "]"


@dataclass
class SubtomoInputs:
    """What every per-tilt-series task of :func:`subtomo` needs (sent once per run): the output folder (absolute)
    and the options of :func:`subtomo`."""

    output_dir: str
    box: int
    crop: int
    binning: float
    stack2d: bool
    float16: bool
    max_dose: float | None
    min_frames: int
    do_ctf: bool
    cutoff_fraction: float
    only_do_unfinished: bool
    batch_particles: int
    device: str | None
    progress: bool


@dataclass
class SubtomoItem:
    """One tilt series' particles: the tilt series (metadata; a worker reads its images), the particle ``names``
    ``[N]``, unbinned decentred ``positions [N, 3]`` (px) and the ``frames [N, 3, 3]`` the volumes are written in."""

    tilt_series: object
    names: np.ndarray
    positions: torch.Tensor
    frames: torch.Tensor


@dataclass
class SubtomoFiles:
    """What one tilt series' task wrote, per particle of the item (None where nothing: not visible): the image
    file (``_data.mrc`` / ``_stack2d.mrcs``), the weights file (3D) and rlnTomoVisibleFrames (2D, new files
    only)."""

    images: list
    weights: list
    visible_frames: list


def subtomo_tilt_series(inputs: SubtomoInputs, snapshot, item: SubtomoItem, device=None) -> SubtomoFiles:
    """The unit of work of ``subtomo`` (issue 15): the pseudo-subtomograms (or 2D stacks) of one tilt series'
    particles, in batches, each particle's files written atomically under ``inputs.output_dir``; with
    ``only_do_unfinished`` particles whose files exist are kept. ``snapshot`` is unused (no model); ``device``
    (a Dask worker's) overrides ``inputs.device``."""
    t0 = time.perf_counter()
    dev = resolve_device(device if device is not None else inputs.device)
    ts = item.tilt_series
    roots = [Path(inputs.output_dir) / particle_file_root(n, ts.name) for n in item.names]
    suffix = "_stack2d.mrcs" if inputs.stack2d else "_data.mrc"
    todo = [k for k, r in enumerate(roots) if not (inputs.only_do_unfinished and Path(f"{r}{suffix}").exists())]
    out = SubtomoFiles([None] * len(roots), [None] * len(roots), [None] * len(roots))
    images = torch.from_numpy(ts.read_images()).to(dev) if todo else None
    geometry = tilt_series_geometry(ts, dev)
    box, crop, binning = inputs.box, inputs.crop, inputs.binning
    dtype = np.float16 if inputs.float16 else np.float32
    for start in range(0, len(roots), inputs.batch_particles):
        ks = list(range(start, min(start + inputs.batch_particles, len(roots))))
        if images is None or not any(k in todo for k in ks):
            _record_existing(ks, roots, suffix, inputs.stack2d, out)
            continue
        sel = torch.tensor(ks)
        if inputs.stack2d:
            stacks, visible = particle_stacks_2d(images, geometry, item.positions[sel].to(dev), box, crop, binning,
                                                 inputs.cutoff_fraction, inputs.max_dose, inputs.min_frames,
                                                 inputs.do_ctf)
        else:
            batch = pseudo_subtomograms(images, geometry, item.positions[sel].to(dev), item.frames[sel].to(dev), box,
                                        crop, binning, inputs.cutoff_fraction, inputs.max_dose, inputs.min_frames,
                                        inputs.do_ctf)
            visible = batch.visible
        for j, k in enumerate(ks):
            if not bool(visible[j].any()):
                continue
            out.visible_frames[k] = _visible_frames(visible[j])
            root = roots[k]
            root.parent.mkdir(parents=True, exist_ok=True)
            if inputs.stack2d:
                write_mrc(f"{root}_stack2d.mrcs", stacks[j].cpu().numpy(), ts.pixel_size * binning, dtype=dtype)
                out.images[k] = f"{root}_stack2d.mrcs"
            else:
                write_mrc(f"{root}_weights.mrc", batch.weights[j].cpu().numpy(), 1.0 / (ts.pixel_size * binning),
                          dtype=dtype)
                write_mrc(f"{root}_data.mrc", batch.data[j].cpu().numpy(), ts.pixel_size * binning, dtype=dtype)
                out.images[k] = f"{root}_data.mrc"
                out.weights[k] = f"{root}_weights.mrc"
    if inputs.progress:
        print(f"subtomo: {ts.name}: {len(roots)} particles ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def subtomo(particles_file, tomograms_file, output_dir, *, box: int, crop: int | None = None, binning: float = 1.0,
            stack2d: bool = False, float16: bool = False, max_dose: float | None = None, min_frames: int = 1,
            do_ctf: bool = True, cutoff_fraction: float = 0.01, apply_orientations: bool = False,
            apply_offsets: bool = True, only_do_unfinished: bool = False, batch_particles: int = 32,
            relpath=None, device=None, progress: bool = True, backend=None) -> TomoParticles:
    """Write every particle's pseudo-subtomogram (or 2D stack) under ``output_dir`` and return the particle set
    that describes them (not yet written). ``relpath`` turns an output path into the name written into the STAR
    file (default: as given). ``backend`` (:func:`cryopipe.engine.backend.make_backend`; default in-process):
    where the tilt series are processed, one task per tilt series (:func:`subtomo_tilt_series`); the particle
    table is assembled here in the input's order."""
    from cryopipe.engine.backend import InProcess

    backend = backend if backend is not None else InProcess()
    crop = check_box_sizes(box, crop, binning)
    relpath = relpath or (lambda p: str(p))
    output_dir = Path(output_dir)
    tomograms = read_tomograms(tomograms_file)
    particles = read_tomo_particles(particles_file, tomograms)
    particles = to_centered_coordinates(particles, tomograms)
    image_names = np.empty(len(particles), dtype=object)
    ctf_names = np.empty(len(particles), dtype=object)
    visible_frames = np.empty(len(particles), dtype=object)
    keep = np.zeros(len(particles), dtype=bool)
    groups = list(particles_per_tilt_series(particles, tomograms))
    pixel_sizes = sorted({round(g.tilt_series.pixel_size, 6) for g in groups})
    if len(pixel_sizes) > 1:
        raise CryopipeError(f"{tomograms_file}: tilt series of different pixel sizes {pixel_sizes}; "
                            "extract them separately")
    names = particles.particles["rlnTomoParticleName"].to_numpy()
    items = [SubtomoItem(g.tilt_series, names[g.rows],
                         g.positions_px if apply_offsets else _coordinates_px(particles, g, g.tilt_series),
                         g.orientations if apply_orientations else g.subtomogram_matrices) for g in groups]
    inputs = SubtomoInputs(str(output_dir.absolute()), box, crop, binning, stack2d, float16, max_dose, min_frames,
                           do_ctf, cutoff_fraction, only_do_unfinished, batch_particles,
                           None if device is None else str(device), progress and not backend.distributed)
    for group, files in zip(groups, backend.map(subtomo_tilt_series, inputs, None, items)):
        for k, row in enumerate(group.rows):
            if files.images[k] is None:
                continue
            keep[row] = True
            image_names[row] = relpath(_as_given(files.images[k], output_dir))
            if files.weights[k] is not None:
                ctf_names[row] = relpath(_as_given(files.weights[k], output_dir))
            visible_frames[row] = files.visible_frames[k]
        if progress and backend.distributed:
            print(f"subtomo: {group.tilt_series.name}: {group.rows.size} particles", flush=True)
    if not keep.any():
        raise CryopipeError(f"{particles_file}: no particle is visible in at least {min_frames} tilt(s)")
    return _output_particles(particles, keep, image_names, ctf_names, visible_frames, stack2d, box, crop, binning,
                             apply_offsets)


def _as_given(path: str, output_dir: Path) -> str:
    """A file written under the absolute output folder, spelled under ``output_dir`` as the caller gave it."""
    return str(output_dir / Path(path).relative_to(output_dir.absolute()))


def _coordinates_px(particles, group, ts) -> torch.Tensor:
    table = particles.particles.iloc[group.rows]
    centered = table[list(_CENTERED)].to_numpy(dtype=np.float64)
    half = np.array([s / 2.0 for s in ts.tomogram_size])
    return torch.from_numpy(centered / ts.pixel_size + half)


def _record_existing(ks, roots, suffix, stack2d, out: SubtomoFiles) -> None:
    """Record the files of particles ``ks`` that an earlier run wrote (``--only_do_unfinished``)."""
    for k in ks:
        path = Path(f"{roots[k]}{suffix}")
        if path.exists():
            out.images[k] = str(path)
            if not stack2d:
                out.weights[k] = f"{roots[k]}_weights.mrc"


def _output_particles(particles, keep, image_names, ctf_names, visible_frames, stack2d, box, crop, binning,
                      apply_offsets) -> TomoParticles:
    out = particles.copy()
    if apply_offsets:
        fold_origins(out)
    table = out.particles
    table["rlnImageName"] = image_names
    if stack2d:
        table["rlnTomoVisibleFrames"] = visible_frames
    else:
        table["rlnCtfImage"] = ctf_names
    out.particles = table[keep].reset_index(drop=True)
    out.general = {"rlnTomoSubTomosAre2DStacks": 1 if stack2d else 0}
    optics = out.optics.copy()
    optics["rlnCtfDataAreCtfPremultiplied"] = 1
    optics["rlnImageDimensionality"] = 2 if stack2d else 3
    optics["rlnTomoSubtomogramBinning"] = float(binning)
    optics["rlnImagePixelSize"] = optics["rlnTomoTiltSeriesPixelSize"].astype(float) * float(binning)
    optics["rlnImageSize"] = int(crop)
    out.optics = optics
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="optimisation_set", default=None, help="optimisation_set.star (particles + tomograms)")
    p.add_argument("--p", dest="particles", default=None, help="particles STAR file (overrides --i)")
    p.add_argument("--t", dest="tomograms", default=None, help="tomograms.star (overrides --i)")
    p.add_argument("--o", dest="output", default=None,
                   help="job folder (PseudoSubtomo/jobNNN/; none: a new job in the project here) or a plain "
                        "output directory")
    p.add_argument("--b", dest="box", type=int, required=True, help="2D box in binned pixels (cut before the CTF)")
    p.add_argument("--crop", type=int, default=-1, help="final box in binned pixels (<= 0: = --b)")
    p.add_argument("--bin", dest="binning", type=float, default=1.0, help="binning factor")
    p.add_argument("--stack2d", action="store_true", help="write 2D stacks of the visible tilts (RELION 5)")
    p.add_argument("--float16", action="store_true", help="write MRC mode 12 (half the disk)")
    p.add_argument("--max_dose", type=float, default=-1.0, help="use only tilts with pre-exposure <= this (e/Å²)")
    p.add_argument("--min_frames", type=int, default=1, help="leave out particles visible in fewer tilts")
    p.add_argument("--no_ctf", action="store_true", help="do not premultiply by the CTF (dose weights only)")
    p.add_argument("--cutoff_fract", dest="cutoff_fraction", type=float, default=0.01,
                   help="ignore frequencies where the dose weight is below this fraction")
    p.add_argument("--apply_orientations", action="store_true",
                   help="write the subtomograms in the particle frame (A_sub·A) instead of the subtomogram frame")
    p.add_argument("--dont_apply_offsets", action="store_true",
                   help="extract at the coordinates without the origins (and keep the origins)")
    p.add_argument("--only_do_unfinished", action="store_true",
                   help="keep particles whose files exist (continue an interrupted run)")
    p.add_argument("--batch_size", dest="batch_particles", type=int, default=32, help="particles per batch")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--j", type=int, default=1, help="accepted for RELION compatibility (threads: torch decides)")
    add_dask_arguments(p)


def _continuing(args: argparse.Namespace) -> bool:
    """``--only_do_unfinished`` on a job folder that exists continues it; on a new one it simply runs."""
    return bool(args.only_do_unfinished and args.output and Path(args.output).exists())


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    particles_file, tomograms_file = input_files(args.optimisation_set, args.particles, args.tomograms)
    check_inputs(particles_file, tomograms_file)
    check_box_sizes(args.box, args.crop, args.binning)
    with open_job_dir(args.output, "PseudoSubtomo", ProcessLabel.PSEUDOSUBTOMO,
                      inputs=[(particles_file, NodeType.PARTICLES), (tomograms_file, NodeType.TOMOGRAMS)],
                      params=vars(args), is_tomo=True, continue_job=_continuing(args)) as job, \
            job_backend(args, log, "tilt series") as backend:
        log(f"extracting {'2D stacks' if args.stack2d else 'pseudo-subtomograms'} of {particles_file} "
            f"(box {args.box}, crop {args.crop if args.crop > 0 else args.box}, bin {args.binning:g})")
        t0 = time.perf_counter()
        out = subtomo(particles_file, tomograms_file, job.dir, box=args.box, crop=args.crop, binning=args.binning,
                      stack2d=args.stack2d, float16=args.float16,
                      max_dose=args.max_dose if args.max_dose > 0 else None, min_frames=args.min_frames,
                      do_ctf=not args.no_ctf, cutoff_fraction=args.cutoff_fraction,
                      apply_orientations=args.apply_orientations, apply_offsets=not args.dont_apply_offsets,
                      only_do_unfinished=args.only_do_unfinished, batch_particles=args.batch_particles,
                      relpath=job.relpath, device=args.device, backend=backend)
        star = job.path("particles.star")
        write_tomo_particles(star, out)
        job.add_output(star, NodeType.PARTICLES)
        write_optimisation_set(job.path("optimisation_set.star"),
                               {"rlnTomoParticlesFile": star, "rlnTomoTomogramsFile": Path(tomograms_file).resolve()})
        job.add_output(job.path("optimisation_set.star"), NodeType.TOMO_OPTIMISATION_SET)
        seconds = time.perf_counter() - t0
        log(f"wrote {len(out)} particles in {seconds:.1f} s ({len(out) / max(seconds, 1e-9):.1f} particles/s)")
    return 0


