"""``cryopipe reconstruct-tomogram``: tomograms from aligned tilt series (like ``relion_tomo_reconstruct_tomogram``).

For each tilt series of ``--t`` (or only ``--tn``) the tilt images are Fourier-binned by ``--bin``, optionally
phase-flipped (``--ctf``), weighted per tilt by a Wiener/exact-weighting filter (``--SNR``) and back-projected slab
by slab (see :mod:`cryopipe.tomo.tomogram`). Output, as RELION: ``<o>/tomograms/rec_<name>.mrc`` (voxel
``bin·px`` Å, size ``(w/bin, h/bin, d/bin)``; voxel ``(i, j, k)`` is tomogram position ``bin·(k, j, i)`` unbinned
px), with ``--generate_split_tomograms`` also ``rec_<name>_half1.mrc`` / ``_half2.mrc`` (tilts of even / odd rank
in dose order, for denoising), a PNG of the central XY and XZ sections ``rec_<name>.png``, and ``<o>/tomograms.star``
(the reconstructed tilt series only, with rlnTomoReconstructedTomogram[Half1/Half2], rlnTomoTomogramBinning and
the rlnTomoSizeX/Y/Z used, as RELION; their per-tilt STAR files are rewritten to ``<o>/tilt_series/``).

Deviations from RELION: ``--bin`` defaults to 8 (RELION: 1); ``--w/--h/--d`` default to rlnTomoSizeX/Y/Z; CTF
correction is phase flipping with one defocus per tilt (no depth dependence); split tomograms use odd/even tilts,
not even/odd movie frames; ``--j`` is accepted and ignored (torch's own threads are used).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.tilt_geometry import projection_matrices
from cryopipe.engine.backend import add_dask_arguments, job_backend
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import MrcStack, mrc_info
from cryopipe.io.tomography import TiltSeries, TomogramSet, path_for_star, read_tomograms, write_tomograms
from cryopipe.tomo.tomogram import (
    DEFAULT_MAX_SAMPLES,
    iter_tomogram_slabs,
    output_shape,
    prepare_tilt_stack,
    split_by_dose,
    write_tomogram,
)

HELP = "tomograms from aligned tilt series by weighted back-projection (like relion_tomo_reconstruct_tomogram)"


@dataclass
class TomogramResult:
    """What was written for one tilt series."""

    name: str
    path: Path
    halves: tuple[Path, Path] | None
    png: Path | None
    shape: tuple[int, int, int]  # (nz, ny, nx)
    pixel_size: float  # Å
    seconds: float
    stats: dict = field(default_factory=dict)


def _size(ts: TiltSeries, w: int | None, h: int | None, d: int | None) -> tuple[int, int, int]:
    """Unbinned ``(w, h, d)``: the options, else rlnTomoSizeX/Y/Z."""
    given = (w, h, d)
    if all(v is not None for v in given):
        size = tuple(int(v) for v in given)
    else:
        try:
            default = ts.tomogram_size
        except CryopipeError as exc:
            raise CryopipeError(f"tomogram {ts.name}: give --w --h --d (no rlnTomoSizeX/Y/Z: {exc})") from None
        size = tuple(int(v if v is not None else dv) for v, dv in zip(given, default))
    if min(size) <= 0:
        raise CryopipeError(f"tomogram {ts.name}: size {size[0]}x{size[1]}x{size[2]} px must be positive (--w --h --d)")
    return size  # type: ignore[return-value]


def _ctf_parameters(ts: TiltSeries, tilts: np.ndarray) -> dict:
    return dict(defocus=ts.defocus()[tilts], pixel_size=ts.pixel_size, voltage=ts.voltage, cs=ts.cs,
                amplitude_contrast=ts.amplitude_contrast)


def reconstruct_one(ts: TiltSeries, out_path: Path, *, binning: float, size: tuple[int, int, int],
                    tilts: np.ndarray | None = None, ctf: bool = False, snr: float = 10.0,
                    slab_voxels: int = 1 << 26, max_samples: int = DEFAULT_MAX_SAMPLES,
                    device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Reconstruct tilt series ``ts`` (all tilts, or rows ``tilts``) into the MRC file ``out_path`` (atomic,
    streamed slab by slab). Returns the header statistics and the shape."""
    dev = resolve_device(device)
    rows = np.arange(ts.n_tilts) if tilts is None else np.asarray(tilts, dtype=np.int64)
    if rows.size == 0:
        raise CryopipeError(f"tomogram {ts.name}: no tilts to reconstruct")
    # the tomogram centre (w//2, h//2, d//2) enters P_f: the size used is the one asked for (RELION 5 does the same)
    angles = ts.tilt_angles()[rows]
    P = projection_matrices(angles[:, 0], angles[:, 1], angles[:, 2], ts.shifts_angst()[rows], ts.pixel_size, size,
                            ts.image_size)
    shape = output_shape(size, binning)
    if min(shape) < 1:
        raise CryopipeError(f"tomogram {ts.name}: {size[0]}x{size[1]}x{size[2]} px at --bin {binning:g} leaves no "
                            "voxels; use a smaller binning")
    thickness = shape[0] * binning
    stack = prepare_tilt_stack(lambda i: ts.read_images(rows[i]), P, ts.image_size, binning, thickness, snr=snr,
                               ctf=_ctf_parameters(ts, rows) if ctf else None, device=dev)
    slabs = iter_tomogram_slabs(stack, shape, binning, thickness, slab_voxels=slab_voxels, max_samples=max_samples)
    report = None
    if progress:
        from cryopipe.pipeline.log import log

        def report(done: int, total: int) -> None:
            log(f"  {ts.name}: {done}/{total} z-sections")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = write_tomogram(out_path, slabs, shape, ts.pixel_size * binning, progress=report)
    return {"shape": shape, **stats}


def reconstruct_unless_done(ts: TiltSeries, out_path: Path, only_do_unfinished: bool, *, binning: float,
                            size: tuple[int, int, int], **kwargs) -> dict:
    """:func:`reconstruct_one`, unless ``only_do_unfinished`` and ``out_path`` already holds a tomogram of the
    expected shape (files are written atomically, so one that exists is complete): then its header statistics."""
    shape = output_shape(size, binning)
    if only_do_unfinished and out_path.exists():
        info = mrc_info(out_path)
        if info.shape == shape:
            return {"shape": shape, "min": info.dmin, "max": info.dmax, "mean": info.dmean, "rms": info.rms,
                    "skipped": True}
    return reconstruct_one(ts, out_path, binning=binning, size=size, **kwargs)


def save_sections_png(mrc_path: Path, png_path: Path, title: str) -> None:
    """PNG of the central XY (z = nz//2) and XZ (y = ny//2) sections of a tomogram (read memory-mapped)."""
    from matplotlib.figure import Figure

    with MrcStack(mrc_path) as vol:
        nz = len(vol)
        xy = vol[nz // 2]
        ny = xy.shape[0]
        xz = np.stack([vol[z][ny // 2] for z in range(nz)])
    fig = Figure(figsize=(6, 6 * (xy.shape[0] + xz.shape[0]) / max(xy.shape[1], 1) + 0.6))
    axes = fig.subplots(2, 1, gridspec_kw={"height_ratios": [xy.shape[0], max(xz.shape[0], 1)]})
    for ax, img, label in zip(axes, (xy, xz), ("XY (central z)", "XZ (central y)")):
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        ax.set_title(f"{title}: {label}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, png_path)


@dataclass
class TomogramJob:
    """What every per-tilt-series task of :func:`reconstruct_tomograms` needs (sent once per run; paths, not
    pixels): the tomogram set's STAR file (absolute; a worker reads it and the tilt images itself), the output
    folder (absolute) and the options (see :func:`reconstruct_tomograms`)."""

    tomograms_star: str
    out_dir: str
    binning: float
    binned_angpix: float | None
    w: int | None
    h: int | None
    d: int | None
    ctf: bool
    snr: float
    split: bool
    slab_mb: float
    device: str | None
    png: bool
    only_do_unfinished: bool
    progress: bool
    _tset: object = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_tset"] = None  # a worker reads the STAR files itself
        return d

    def tomograms(self) -> TomogramSet:
        if self._tset is None:
            self._tset = read_tomograms(self.tomograms_star)
        return self._tset

    def binning_for(self, ts: TiltSeries) -> float:
        """The binning of ``ts``: ``--binned_angpix`` / pixel size when given, else ``--bin``."""
        b = float(self.binned_angpix) / ts.pixel_size if self.binned_angpix and self.binned_angpix > 0 else float(
            self.binning)
        if b <= 0:
            raise CryopipeError(f"--bin {b:g}: must be > 0")
        return b


def reconstruct_tilt_series(job: TomogramJob, snapshot, name: str, device=None) -> TomogramResult:
    """The unit of work of ``reconstruct-tomogram`` (issue 15): tomogram ``name`` (and its halves, its PNG) written
    under ``job.out_dir/tomograms/`` (atomically; with ``only_do_unfinished`` files already there are kept).
    ``snapshot`` is unused (no model); ``device`` (a Dask worker's) overrides ``job.device``. Runs in this process
    or on a Dask worker (:mod:`cryopipe.engine.backend`)."""
    from cryopipe.pipeline.log import log

    ts = job.tomograms()[name]
    t0 = time.perf_counter()
    b = job.binning_for(ts)
    size = _size(ts, job.w, job.h, job.d)
    shape = output_shape(size, b)
    slab_voxels = max(shape[1] * shape[2], int(job.slab_mb * 2**20 / 4))
    progress = job.progress
    if progress:
        log(f"reconstructing {name}: {ts.n_tilts} tilts of {ts.image_size[0]}x{ts.image_size[1]} px -> "
            f"{shape[2]}x{shape[1]}x{shape[0]} voxels of {ts.pixel_size * b:.3g} Å (bin {b:g}"
            f"{', CTF phase flip' if job.ctf else ''}, SNR {job.snr:g})")
    path = Path(job.out_dir) / "tomograms" / f"rec_{name}.mrc"
    kw = dict(binning=b, size=size, ctf=job.ctf, snr=job.snr, slab_voxels=slab_voxels,
              device=device if device is not None else job.device, progress=progress)
    stats = reconstruct_unless_done(ts, path, job.only_do_unfinished, **kw)
    if progress and stats.get("skipped"):
        log(f"  {name}: {path} is already there (--only_do_unfinished)")
    halves = None
    if job.split:
        first, second = split_by_dose(ts.pre_exposure())
        if first.size == 0 or second.size == 0:
            raise CryopipeError(f"tomogram {name}: --generate_split_tomograms needs at least 2 tilts")
        halves = (path.with_name(f"rec_{name}_half1.mrc"), path.with_name(f"rec_{name}_half2.mrc"))
        for rows, half in zip((first, second), halves):
            if progress:
                log(f"  {name}: half tomogram {half.name} from {rows.size} tilts")
            reconstruct_unless_done(ts, half, job.only_do_unfinished, tilts=rows, **kw)
    png_path = None
    if job.png:
        png_path = path.with_suffix(".png")
        if not (stats.get("skipped") and png_path.exists()):
            save_sections_png(path, png_path, f"rec_{name}")
    return TomogramResult(name, path, halves, png_path, tuple(stats["shape"]), ts.pixel_size * b,
                          time.perf_counter() - t0, {k: v for k, v in stats.items() if k not in ("shape",)})


def reconstruct_tomograms(tomograms_star: str | Path, output_dir: str | Path, *, tomo_name: str | None = None,
                          binning: float = 8.0, binned_angpix: float | None = None, w: int | None = None,
                          h: int | None = None, d: int | None = None, ctf: bool = False, snr: float = 10.0,
                          split: bool = False, slab_mb: float = 256.0, device: str | torch.device | None = None,
                          png: bool = True, only_do_unfinished: bool = False,
                          progress: bool = True, backend=None) -> list[TomogramResult]:
    """Reconstruct the tomograms of ``tomograms_star`` (all, or ``tomo_name``) into ``output_dir/tomograms/`` and
    write ``output_dir/tomograms.star`` (see the module docstring). ``slab_mb``: size of one output slab;
    ``only_do_unfinished``: keep tomograms (and halves, PNGs) already written by an interrupted run. ``backend``
    (:func:`cryopipe.engine.backend.make_backend`; default in-process): where the tilt series are reconstructed,
    one task per tilt series; ``tomograms.star`` is written here, in the set's order."""
    from cryopipe.engine.backend import InProcess
    from cryopipe.pipeline.log import log

    backend = backend if backend is not None else InProcess()
    tset = read_tomograms(tomograms_star)
    names = tset.names if tomo_name in (None, "", "*") else [tset[tomo_name].name]
    out_dir = Path(output_dir)
    (out_dir / "tomograms").mkdir(parents=True, exist_ok=True)
    if snr <= 0:
        raise CryopipeError(f"--SNR {snr:g}: must be > 0")
    job = TomogramJob(str(Path(tomograms_star).absolute()), str(out_dir.absolute()), binning, binned_angpix, w, h,
                      d, ctf, snr, split, slab_mb, None if device is None else str(device), png, only_do_unfinished,
                      progress and not backend.distributed)
    for name in names:  # bad options fail here, before any task runs
        job.binning_for(tset[name])
        _size(tset[name], w, h, d)
    job._tset = tset
    results = backend.map(reconstruct_tilt_series, job, None, list(names))
    for r in results:
        ts = tset[r.name]
        ts.globals["rlnTomoReconstructedTomogram"] = path_for_star(r.path)
        if r.halves is not None:
            ts.globals["rlnTomoReconstructedTomogramHalf1"] = path_for_star(r.halves[0])
            ts.globals["rlnTomoReconstructedTomogramHalf2"] = path_for_star(r.halves[1])
        b = job.binning_for(ts)
        size = _size(ts, w, h, d)
        ts.globals["rlnTomoTomogramBinning"] = b
        ts.globals.update(rlnTomoSizeX=size[0], rlnTomoSizeY=size[1], rlnTomoSizeZ=size[2])
        skipped = r.stats.pop("skipped", False)
        if progress:
            log(f"  {r.name}: {'kept' if skipped else 'wrote'} {r.path} in {r.seconds:.1f} s (sd {r.stats['rms']:.3g})")
    done = TomogramSet({r.name: tset[r.name] for r in results}, out_dir / "tomograms.star")
    write_tomograms(out_dir / "tomograms.star", done, tilt_series_dir=out_dir / "tilt_series")
    if progress:
        log(f"wrote {out_dir / 'tomograms.star'} ({len(results)} tomogram{'s' if len(results) != 1 else ''})")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t", dest="tomograms", required=True, help="tomograms.star (RELION 5 or 4 layout)")
    p.add_argument("--tn", dest="tomo_name", default=None, help="only this tomogram (rlnTomoName); default: all")
    p.add_argument("--o", dest="output", default=None,
                   help="output: Tomograms/jobNNN/ in a project (default: a new job) or a plain directory; writes "
                        "tomograms/rec_<name>.mrc (+ .png) and tomograms.star")
    p.add_argument("--w", type=int, default=None, help="tomogram width, unbinned px (default rlnTomoSizeX)")
    p.add_argument("--h", type=int, default=None, help="tomogram height, unbinned px (default rlnTomoSizeY)")
    p.add_argument("--d", type=int, default=None, help="tomogram thickness, unbinned px (default rlnTomoSizeZ)")
    p.add_argument("--bin", dest="binning", type=float, default=8.0, help="binning factor (RELION's default is 1)")
    p.add_argument("--binned_angpix", type=float, default=None, help="OR: pixel size (Å) of the tomogram")
    p.add_argument("--ctf", action="store_true", help="CTF correction by phase flipping (one defocus per tilt)")
    p.add_argument("--SNR", dest="snr", type=float, default=10.0, help="SNR assumed by the Wiener weighting")
    p.add_argument("--generate_split_tomograms", dest="split", action="store_true",
                   help="also write tomograms from the even/odd tilts in dose order (for denoising)")
    p.add_argument("--j", type=int, default=1, help="accepted for RELION compatibility (torch's threads are used)")
    p.add_argument("--slab_mb", type=float, default=256.0, help="size of one output slab held in memory (MB)")
    p.add_argument("--only_do_unfinished", action="store_true",
                   help="continue an interrupted job: keep the tomograms it already wrote")
    p.add_argument("--no_png", dest="png", action="store_false", help="do not write the central-section PNGs")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dask_arguments(p)


def _continuing(args: argparse.Namespace) -> bool:
    """``--only_do_unfinished`` on a job folder that exists continues it; on a new one it simply runs."""
    return bool(args.only_do_unfinished and args.output and Path(args.output).exists())


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    tomograms_file = Path(args.tomograms)
    if not tomograms_file.exists():
        raise CryopipeError(f"{tomograms_file}: no such file (--t)")
    tset = read_tomograms(tomograms_file)  # bad files and an unknown --tn fail here, before the job folder exists
    for name in (tset.names if args.tomo_name in (None, "", "*") else [args.tomo_name]):
        tset[name].check_images()  # missing images, tilt-count or pixel-size disagreement
    if args.snr <= 0:
        raise CryopipeError(f"--SNR {args.snr:g}: must be > 0")
    if args.binning <= 0 and not (args.binned_angpix and args.binned_angpix > 0):
        raise CryopipeError(f"--bin {args.binning:g}: must be > 0")
    with open_job_dir(args.output, "Tomograms", ProcessLabel.RECONSTRUCT_TOMOGRAMS,
                      inputs=[(tomograms_file, NodeType.TOMOGRAMS)], params=vars(args), is_tomo=True,
                      continue_job=_continuing(args)) as job, job_backend(args, log, "tilt series") as backend:
        t0 = time.perf_counter()
        results = reconstruct_tomograms(tomograms_file, job.dir, tomo_name=args.tomo_name, binning=args.binning,
                                        binned_angpix=args.binned_angpix, w=args.w, h=args.h, d=args.d, ctf=args.ctf,
                                        snr=args.snr, split=args.split, slab_mb=args.slab_mb, device=args.device,
                                        png=args.png, only_do_unfinished=args.only_do_unfinished, backend=backend)
        job.add_output(job.path("tomograms.star"), NodeType.TOMOGRAMS)
        log(f"{len(results)} tomogram(s) in {time.perf_counter() - t0:.1f} s")
    return 0
