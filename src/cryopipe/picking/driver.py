"""The autopick driver (``cryopipe autopick``): the micrographs of a STAR file (:class:`MicrographSet`), a picker
(any :data:`PickFunction`: the LoG picker here, template matching in :mod:`cryopipe.picking.template`) and
:func:`run_autopick`, which does the rest: micrograph loop, "continue", coordinate files, list file, summary and
pictures, in RELION's layout (:mod:`cryopipe.jobs.autopick`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.picking.common import (
    PickTable,
    coordinate_file_name,
    read_coordinate_file,
    save_picks_png,
    thumbnail,
    write_coordinate_list,
    write_summary,
)

__all__ = ["PickFunction", "MicrographSet", "read_micrograph_set", "resolve_micrograph", "read_micrograph",
           "MicrographContext", "LoGOptions", "log_picker", "AutopickResult", "pick_one_micrograph", "run_autopick"]


#: A picker: ``(micrograph [H, W] tensor, pixel size Å, context) -> PickTable``.
PickFunction = Callable[[torch.Tensor, float, "MicrographContext"], PickTable]


@dataclass
class MicrographSet:
    """The micrographs of an input STAR file.

    Attributes:
        star_path: the STAR file.
        names: ``rlnMicrographName`` values, in file order.
        pixel_size: ``rlnMicrographPixelSize`` (Å) shared by all optics groups, or None if absent.
        ctf: per micrograph a dict of CTF parameters (``defocus_u``, ``defocus_v``, ``defocus_angle``,
            ``voltage``, ``cs``, ``amplitude_contrast``, ``phase_shift``; Å, degrees, kV, mm), or None when the
            file has no ``rlnDefocusU``.
    """

    star_path: Path
    names: list[str]
    pixel_size: float | None
    ctf: list[dict[str, float]] | None = None

    def __len__(self) -> int:
        return len(self.names)


def read_micrograph_set(path: str | os.PathLike, angpix: float | None = None) -> MicrographSet:
    """Read a micrographs STAR file (RELION 3.1+ ``optics`` + ``micrographs``, or 3.0) with
    :func:`cryopipe.io.particles.read_particles`.

    The pixel size is ``rlnMicrographPixelSize`` (all optics groups must agree within 0.01 Å, as in RELION);
    ``angpix`` overrides it. With ``angpix``, a bare RELION 3.0 list of ``rlnMicrographName`` (no optics
    columns) is accepted too. CTF parameters are read when the file has ``rlnDefocusU``.
    """
    from cryopipe.io.particles import ctf_parameters, pixel_sizes, read_particles
    from cryopipe.io.star import read_star

    path = Path(path)
    try:
        data = read_particles(path, pixel_size=angpix)
    except InputFileError as exc:
        if angpix is None:
            raise InputFileError(path, exc.problem, "give --angpix, or a micrographs STAR file with an optics table "
                                                    "(rlnMicrographPixelSize)") from None
        table = next((b for b in read_star(path).values()
                      if isinstance(b, pd.DataFrame) and "rlnMicrographName" in b), None)
        if table is None:
            raise
        return MicrographSet(star_path=path, names=[str(v) for v in table["rlnMicrographName"]], pixel_size=angpix)
    if "rlnMicrographName" not in data.particles:
        raise InputFileError(path, f"data_{data.block_name} has no rlnMicrographName",
                             "give a micrographs STAR file (e.g. CtfFind/jobNNN/micrographs_ctf.star)")
    names = [str(v) for v in data.particles["rlnMicrographName"]]
    pixel_size = angpix
    if pixel_size is None:
        vals = pixel_sizes(data)
        if len(vals) and np.any(np.abs(vals - vals[0]) > 0.01):
            raise InputFileError(path, f"optics groups have different rlnMicrographPixelSize {sorted(set(vals))}",
                                 "pick each optics group separately (split the file), as RELION requires")
        pixel_size = float(vals[0]) if len(vals) else None
    ctf = None
    if "rlnDefocusU" in data.particles:
        params = ctf_parameters(data)
        keys = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "phase_shift")
        ctf = [{k: float(params[k][i]) for k in keys} for i in range(len(names))]
    return MicrographSet(star_path=path, names=names, pixel_size=pixel_size, ctf=ctf)


def resolve_micrograph(name: str, star_path: Path, root: Path) -> Path:
    """File of a micrograph: ``root/name`` if it exists, else ``<folder of the STAR file>/name``."""
    p = Path(name)
    if p.is_absolute():
        return p
    for base in (root, star_path.parent):
        cand = base / p
        if cand.exists():
            return cand
    raise InputFileError(root / p, f"micrograph {name} (from {star_path}) not found",
                         "run from the project directory, or fix rlnMicrographName")


def read_micrograph(path: Path, device: torch.device) -> torch.Tensor:
    """A micrograph as a ``[H, W]`` float32 tensor on ``device`` (first section of a stack/volume)."""
    from cryopipe.io.mrc import read_mrc

    data, _ = read_mrc(path, finite=True)
    if data.ndim == 3:
        data = data[0]
    if data.ndim != 2:
        raise InputFileError(path, f"is not a 2D micrograph (shape {data.shape})", "give micrographs, not movies")
    return torch.from_numpy(np.ascontiguousarray(data)).to(device)


@dataclass(frozen=True)
class MicrographContext:
    """What a picker may need besides the image: index in the input (for seeds), CTF parameters, file name."""

    index: int
    name: str
    ctf: Mapping[str, float] | None = None


@dataclass(frozen=True)
class LoGOptions:
    """``--LoG`` options (RELION names in brackets); see :func:`cryopipe.picking.log.log_pick`."""

    diam_min: float                      # --LoG_diam_min (Å)
    diam_max: float                      # --LoG_diam_max (Å)
    invert: bool = False                 # --Log_invert (white particles)
    adjust_threshold: float = 0.0        # --LoG_adjust_threshold (σ)
    upper_threshold: float = 99999.0     # --LoG_upper_threshold (σ)
    neighbour: float = 100.0             # --LoG_neighbour (%)
    max_search: float = 5.0              # --Log_max_search
    use_ctf: bool = False                # --LoG_use_ctf
    lowpass: float | None = 20.0         # --lowpass (Å)
    shrink: float = 0.0                  # --shrink
    outlier_zscore: float = 8.0          # --outlier_removal_zscore
    skip_side: int = 0                   # --skip_side (px)
    optimise_scale: bool = True          # not --skip_optimise_scale
    robust_threshold: bool = False       # --LoG_robust_threshold (cryopipe only: median/MAD statistics)
    random_seed: int = 1                 # --random_seed (padding noise of non-square micrographs)


def log_picker(opts: LoGOptions, fom_map_writer: Callable[[MicrographContext, object], None] | None = None
               ) -> PickFunction:
    """A :data:`PickFunction` running the LoG picker with ``opts``."""
    from cryopipe.picking.log import log_fom_maps, log_pick_from_maps

    def pick(micrograph: torch.Tensor, pixel_size: float, ctx: MicrographContext) -> PickTable:
        if opts.use_ctf and ctx.ctf is None:
            raise CryopipeError(f"--LoG_use_ctf: no CTF parameters for {ctx.name} (the input STAR has no rlnDefocusU; "
                                "use the CtfFind output)")
        maps = log_fom_maps(micrograph, pixel_size, opts.diam_min, opts.diam_max, lowpass=opts.lowpass,
                            shrink=opts.shrink, invert=opts.invert, max_search=opts.max_search,
                            outlier_zscore=opts.outlier_zscore, use_ctf=opts.use_ctf, ctf=ctx.ctf,
                            optimise_scale=opts.optimise_scale, seed=opts.random_seed + ctx.index)
        if fom_map_writer is not None:
            fom_map_writer(ctx, maps)
        return log_pick_from_maps(maps, pixel_size, opts.diam_min, opts.diam_max,
                                  adjust_threshold=opts.adjust_threshold, upper_threshold=opts.upper_threshold,
                                  neighbour=opts.neighbour, skip_side=opts.skip_side,
                                  robust_threshold=opts.robust_threshold)

    return pick


@dataclass
class AutopickResult:
    """What :func:`run_autopick` did."""

    coordinate_list: Path
    n_micrographs: int
    n_picked_now: int
    n_skipped: int
    n_picks: int                         # total over all coordinate files of the input
    seconds_per_micrograph: float
    coordinate_files: dict[str, str] = field(default_factory=dict)  # micrograph name -> coordinate file


def pick_one_micrograph(path: Path, picker: PickFunction, pixel_size: float, ctx: MicrographContext,
                        device: torch.device) -> PickTable:
    """Read one micrograph and run ``picker`` on it."""
    return picker(read_micrograph(path, device), pixel_size, ctx)


def run_autopick(mics: MicrographSet, odir: str, picker: PickFunction, *, pixel_size: float,
                 pickname: str = "autopick", only_unfinished: bool = False, root: str | os.PathLike = ".",
                 device: torch.device | str | None = None, png: bool = True, png_per_mic: bool = False,
                 display_diameter: float | None = None, backend=None) -> AutopickResult:
    """Pick every micrograph of ``mics`` and write RELION's outputs into ``odir``.

    Args:
        mics: the input micrographs.
        odir: output directory as written into the list file (relative to ``root``, e.g. ``"AutoPick/job004/"``).
        picker: the picking function.
        pixel_size: Å per micrograph pixel.
        pickname: RELION ``--pickname`` (coordinate files ``*_<pickname>.star``, list ``<pickname>.star``).
        only_unfinished: skip micrographs whose coordinate file exists (RELION ``--only_do_unfinished``).
        root: project directory (micrograph names and ``odir`` are relative to it).
        device: torch device for the picking.
        png, png_per_mic: write ``<odir>/picks.png`` / one PNG per micrograph.
        display_diameter: circle diameter (Å) in the pictures (default: 20 pixels).
        backend: where the micrographs are picked (:func:`cryopipe.engine.backend.make_backend`; default in this
            process): chunks of micrographs go to :func:`cryopipe.picking.pick_step.pick_micrographs`, which
            writes their coordinate files; the list file, summary and pictures are written here, in input order.
    """
    from cryopipe.core.device import resolve_device
    from cryopipe.pipeline.log import log, progress

    root = Path(os.path.abspath(root))
    dev = resolve_device(device)
    out_dir = Path(odir) if Path(odir).is_absolute() else root / odir
    out_dir.mkdir(parents=True, exist_ok=True)
    coord_names = [coordinate_file_name(name, odir, pickname) for name in mics.names]
    if len(set(coord_names)) != len(coord_names):
        dup = pd.Series(coord_names)[pd.Series(coord_names).duplicated()].iloc[0]
        raise InputFileError(mics.star_path, f"two micrographs map to the same coordinate file {dup}",
                             "give micrographs unique names")

    todo = [i for i, c in enumerate(coord_names) if not (only_unfinished and (root / c).exists())]
    if len(todo) < len(mics):
        log(f"autopick: {len(mics) - len(todo)} micrograph(s) already have coordinate files, skipped (continue)")
    from cryopipe.engine.backend import split_chunks
    from cryopipe.picking.pick_step import PickInputs, PickItem, pick_micrographs

    t0 = time.perf_counter()
    inputs = PickInputs(picker, float(pixel_size), png_per_mic, display_diameter)
    items = [PickItem(MicrographContext(index=i, name=mics.names[i], ctf=mics.ctf[i] if mics.ctf is not None else None),
                      str(resolve_micrograph(mics.names[i], mics.star_path, root)), str(root / coord_names[i]))
             for i in todo]
    if backend is not None and backend.distributed and items:
        chunks = split_chunks(np.arange(len(items)), backend.n_chunks(len(items)), 1)
        backend.map(pick_micrographs, inputs, None, [[items[k] for k in c] for c in chunks])
    else:
        for it in progress(items, desc="picking"):
            pick_micrographs(inputs, None, [it], device=dev)
    per_mic = (time.perf_counter() - t0) / max(len(todo), 1)

    # list file, summary and picture over everything that has a coordinate file
    have = [i for i, c in enumerate(coord_names) if (root / c).exists()]
    list_path = out_dir / f"{pickname}.star"
    write_coordinate_list(list_path, [mics.names[i] for i in have], [coord_names[i] for i in have])
    counts, means = [], []
    for i in have:
        tab = read_coordinate_file(root / coord_names[i])
        counts.append(len(tab))
        f = tab["rlnAutopickFigureOfMerit"].to_numpy(dtype=float) if "rlnAutopickFigureOfMerit" in tab else np.zeros(0)
        means.append(float(f.mean()) if len(f) else 0.0)
    write_summary(out_dir / "summary.star", [mics.names[i] for i in have], means, counts)
    total = int(sum(counts))
    if have:
        log(f"autopick: {total} particles from {len(have)} micrographs, on average "
            f"{total / len(have):.0f} per micrograph ({per_mic:.2f} s per picked micrograph)")
    if png and have:
        sel = [have[k] for k in np.unique(np.linspace(0, len(have) - 1, min(4, len(have))).round().astype(int))]
        items = [(resolve_micrograph(mics.names[i], mics.star_path, root), mics.names[i], root / coord_names[i])
                 for i in sel]
        _png_for(out_dir / "picks.png", items, pixel_size, display_diameter)
    return AutopickResult(coordinate_list=list_path, n_micrographs=len(mics), n_picked_now=len(todo),
                          n_skipped=len(mics) - len(todo), n_picks=total, seconds_per_micrograph=per_mic,
                          coordinate_files={mics.names[i]: coord_names[i] for i in have})


PICKS_PNG_LOWPASS_A = 20.0  # the picks pictures show micrographs low-passed here (RELION's manual-picking default)


def _png_for(target: Path, items: list[tuple[Path, str, Path]], pixel_size: float,
             display_diameter: float | None) -> None:
    """Picture of micrographs ``(file, name, coordinate file)`` with their picks, low-passed at
    :data:`PICKS_PNG_LOWPASS_A`; PNG at ``target`` (a ``.star`` target becomes ``.png``)."""
    panels = []
    for path, name, coords in items:
        img, b = thumbnail(read_micrograph(path, torch.device("cpu")), pixel_size=pixel_size,
                           lowpass_A=PICKS_PNG_LOWPASS_A)
        tab = read_coordinate_file(coords)
        radius = 0.5 * display_diameter / pixel_size if display_diameter else 10.0 * b
        panels.append((img, b, tab, radius, f"{name}: {len(tab)} picks"))
    png = target.with_suffix(".png") if target.suffix == ".star" else target
    save_picks_png(png, panels, suptitle="circles coloured by rlnAutopickFigureOfMerit")


def _fom_map_writer(root: Path, odir: str, pickname: str, pixel_size: float):
    """``--write_fom_maps``: ``<coordinate root>_<pickname>_bestLoG.mrc`` / ``_bestSize.mrc`` (work grid)."""
    from cryopipe.io.mrc import write_mrc

    def write(ctx: MicrographContext, maps) -> None:
        base = root / coordinate_file_name(ctx.name, odir, pickname)[: -len(".star")]
        base.parent.mkdir(parents=True, exist_ok=True)
        apix = pixel_size / maps.scale
        write_mrc(f"{base}_bestLoG.mrc", maps.best_fom.cpu().numpy(), apix)
        write_mrc(f"{base}_bestSize.mrc", maps.best_diameter.cpu().numpy(), apix)

    return write
