"""``cryopipe reconstruct``: a 3D map from particles with known orientations (like ``relion_reconstruct``).

Each particle image X (origin ``o`` px, Euler angles rot/tilt/psi, CTF C) is shifted by ``+o`` into the reference
frame, and ``C·X̂`` with weight ``C²`` (or ``X̂`` with weight 1 without ``--ctf``) is inserted into a padded 3D Fourier
grid. Particles are streamed from their stacks in batches: each batch maps to back-projection sums that simply add,
so memory is bounded by one batch plus the 3D grids, and batches could be spread over devices or workers.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.symmetry import symmetry_operators
from cryopipe.engine.backend import InProcess, add_dask_arguments, make_backend, split_chunks
from cryopipe.engine.backproject_step import ReconstructInputs, backproject_rows, new_backprojector
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import ImageReader, write_mrc
from cryopipe.io.particles import ctf_parameters, euler_angles, origins_px, pixel_sizes, read_particles

HELP = "3D reconstruction from particles with known angles and origins (like relion_reconstruct)"


@dataclass
class ReconstructionResult:
    """A reconstructed map and what went into it."""

    volume: np.ndarray  # [N, N, N] float32, z/y/x
    pixel_size: float  # Å
    n_particles: int
    seconds: float


def reconstruct_particles(
    star_path: str | Path,
    *,
    ctf: bool = False,
    sym: str = "C1",
    subset: int | None = None,
    class_number: int | None = None,
    angpix: float | None = None,
    maxres: float | None = None,
    pad: int = 2,
    box: int | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = True,
    backend=None,
) -> ReconstructionResult:
    """Reconstruct a map from the particles in ``star_path`` (RELION 3.0 or 3.1+ STAR).

    Parameters
    ----------
    ctf: weight by each particle's CTF (``C·X`` inserted, ``C²`` accumulated) as ``relion_reconstruct --ctf``.
    sym: point group (C1, Cn, Dn, T, O, I); each image is inserted once per symmetry copy.
    subset: only particles with ``rlnRandomSubset`` equal to this (1 or 2), for half maps.
    class_number: only particles with ``rlnClassNumber`` equal to this.
    angpix: pixel size (Å) of the images; by default from the STAR optics table.
    maxres: highest resolution (Å) inserted; Nyquist by default.
    box: output box (px); images are Fourier-rescaled to it (pixel size scaled accordingly). Default: image size.
    batch_size: images per streamed batch.
    backend: where the batches run (:func:`cryopipe.engine.backend.make_backend`; default in-process). Workers
        read the images themselves (names are sent, not pixels); their sums are added in a fixed order.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    star_path = Path(star_path)
    data = read_particles(star_path)
    table = data.particles
    keep = np.ones(len(table), dtype=bool)
    if subset is not None:
        if "rlnRandomSubset" not in table.columns:
            raise CryopipeError(f"{star_path}: --subset {subset} asked but there is no rlnRandomSubset column "
                                "(split the particles into halves first, or leave out --subset)")
        keep &= table["rlnRandomSubset"].to_numpy() == subset
    if class_number is not None:
        if "rlnClassNumber" not in table.columns:
            raise CryopipeError(f"{star_path}: --class {class_number} asked but there is no rlnClassNumber column")
        keep &= table["rlnClassNumber"].to_numpy() == class_number
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise CryopipeError(f"{star_path}: no particles left to reconstruct after selecting subset/class")
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        if col not in table.columns:
            raise CryopipeError(f"{star_path}: column {col} is missing; reconstruction needs particle orientations "
                                "(run a refinement first, or use a STAR file with angles)")
    if "rlnImageName" not in table.columns:
        raise CryopipeError(f"{star_path}: column rlnImageName is missing; cannot find the particle images")

    apix_all = pixel_sizes(data) if angpix is None else np.full(len(table), float(angpix))
    apix = float(apix_all[idx[0]])
    if not np.allclose(apix_all[idx], apix, rtol=1e-4):
        raise CryopipeError(f"{star_path}: particles have different pixel sizes ({sorted(set(np.round(apix_all[idx], 4)))} Å); "
                            "reconstruct one optics group at a time or rescale the particles to one pixel size")
    angles = euler_angles(data)[idx]
    origins = origins_px(data)[idx][:, :2] if angpix is None else _origins_px_with(data, float(angpix))[idx][:, :2]
    ctf_par = ctf_parameters(data) if ctf else None

    names = table["rlnImageName"].to_numpy()[idx]
    reader = ImageReader(names, root_dir=image_root_dir(star_path, str(names[0])))
    n_img = int(reader.image_shape[-1])
    n_out = int(box) if box else n_img
    if n_out % 2:
        raise CryopipeError(f"--box {n_out}: the output box size must be even")
    apix_out = apix * n_img / n_out
    r_max = None
    if maxres is not None and maxres > 0:
        r_max = min(n_out / 2.0, n_out * apix_out / maxres)

    ops = symmetry_operators(sym).to(dev)
    inputs = ReconstructInputs(names, str(reader.root_dir), np.ascontiguousarray(angles),
                               np.ascontiguousarray(origins), None if ctf_par is None else
                               {k: np.asarray(v)[idx] for k, v in ctf_par.items()}, n_img, n_out, apix_out, pad,
                               r_max, int(batch_size), _reader=reader)
    bp = new_backprojector(inputs, dev)
    be = backend if backend is not None else InProcess()
    chunks = split_chunks(np.arange(idx.size), be.n_chunks(-(-idx.size // int(batch_size))), int(batch_size))
    ranges = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
    if be.distributed:
        for part in be.map(backproject_rows, inputs, None, ranges):  # added in chunk order: deterministic
            bp.data += part.data.to(bp.data.device)
            bp.weight += part.weight.to(bp.weight.device)
    else:
        it = ranges
        if progress:
            from cryopipe.pipeline.log import progress as progress_lines

            it = progress_lines(ranges, desc="reconstruct")
        for r in it:
            backproject_rows(inputs, None, r, device=dev, into=bp)
    # symmetry is applied once to the summed statistics (each operator adds a rotated copy of the grids)
    vol = bp.reconstruct(symmetry=ops if ops.shape[0] > 1 else None)
    return ReconstructionResult(vol.float().cpu().numpy(), apix_out, int(idx.size), time.perf_counter() - t0)


def _origins_px_with(data, angpix: float) -> np.ndarray:
    """Origins in pixels of a user-given pixel size (Å columns divided by it)."""
    t = data.particles
    out = np.zeros((len(t), 3))
    for j, ax in enumerate("XYZ"):
        col = f"rlnOrigin{ax}Angst"
        if col in t.columns:
            out[:, j] = t[col].to_numpy(dtype=float) / angpix
    return out


def image_root_dir(star_path: Path, first_image_name: str) -> Path:
    """Directory that the image names of a STAR file are relative to.

    RELION writes image names relative to the project directory (the directory it ran in), so the current
    directory is tried first; if the first image's stack is not found there, the STAR file's own directory is
    used (files moved together with their stacks).
    """
    stack = first_image_name.split("@", 1)[-1]
    if (Path.cwd() / stack).exists() or Path(stack).is_absolute():
        return Path.cwd()
    return Path(star_path).resolve().parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="input", required=True, help="particles STAR file (RELION 3.0 or 3.1+) with angles")
    p.add_argument("--o", dest="output", default=None,
                   help="output: a map file name ending in .mrc (as relion_reconstruct), or a job folder "
                        "(Reconstruct/jobNNN/, or none: a new job in the project in the current directory)")
    p.add_argument("--ctf", action="store_true", help="apply CTF correction (weight by each particle's CTF)")
    p.add_argument("--sym", default="C1", help="point-group symmetry (C1, Cn, Dn, T, O, I)")
    p.add_argument("--subset", type=int, default=None, help="only particles with this rlnRandomSubset (1 or 2)")
    p.add_argument("--class", dest="class_number", type=int, default=None, help="only particles of this rlnClassNumber")
    p.add_argument("--angpix", type=float, default=None, help="pixel size (Å); default from the STAR optics")
    p.add_argument("--maxres", type=float, default=-1, help="maximum resolution (Å) to insert; <=0 means Nyquist")
    p.add_argument("--pad", type=int, default=2, help="padding factor of the Fourier grids")
    p.add_argument("--newbox", dest="box", type=int, default=None, help="output box size (Fourier rescaling)")
    p.add_argument("--batch_size", type=int, default=512, help="particles per streamed batch")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dask_arguments(p)


def main(args: argparse.Namespace) -> int:
    kwargs = dict(ctf=args.ctf, sym=args.sym, subset=args.subset, class_number=args.class_number,
                  angpix=args.angpix, maxres=args.maxres, pad=args.pad, box=args.box, batch_size=args.batch_size,
                  device=args.device)
    backend = make_backend(getattr(args, "dask", None), getattr(args, "dask_batches_per_worker", 1))
    try:
        return _main(args, kwargs, backend)
    finally:
        backend.close()


def _main(args: argparse.Namespace, kwargs: dict, backend) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    kwargs = dict(kwargs, backend=backend)
    out_arg = args.output
    if out_arg and str(out_arg).endswith(".mrc"):
        # relion_reconstruct style: --o names the map file; no job folder
        res = reconstruct_particles(args.input, **kwargs)
        out = Path(out_arg)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_mrc(out, res.volume, res.pixel_size)
        print(f"reconstructed {res.n_particles} particles into {out} ({res.volume.shape[0]}^3, "
              f"{res.pixel_size:.3f} Å/px) in {res.seconds:.1f} s")
        return 0
    with open_job_dir(out_arg, "Reconstruct", ProcessLabel.RECONSTRUCT, inputs=[(args.input, NodeType.PARTICLES)],
                      params=vars(args)) as job:
        log(f"reconstructing {args.input} (ctf={'yes' if args.ctf else 'no'}, sym={args.sym})")
        res = reconstruct_particles(args.input, **kwargs)
        out = job.path("reconstruct.mrc")
        write_mrc(out, res.volume, res.pixel_size)
        job.add_output(out, NodeType.DENSITY_MAP)
        log(f"reconstructed {res.n_particles} particles into {out} ({res.volume.shape[0]}^3, "
            f"{res.pixel_size:.3f} Å/px) in {res.seconds:.1f} s")
    return 0
