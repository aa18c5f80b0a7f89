"""``cryopipe mpr``: multi-particle refinement of tilt series against two half-maps (as Warp's M).

Staged like M: ``--stage poses,shifts --iter 3 --stage poses,shifts,stageangles,ctf --iter 2`` (``--iter`` once
applies to every stage; ``--iter 0`` alone only reconstructs half-maps at the input metadata and reports their
masked FSC, M's baseline). Groups: poses (particle angles + positions), shifts (per-tilt image shifts), imagewarp
(per-tilt cubic B-spline displacement grid, ``--warp_grid``), stageangles (per-tilt XTilt/YTilt/ZRot), ctf
(per-tilt defocus + astigmatism; refused when the species is worse than ``--ctf_minresolution``), temporalposes
(each particle's pose as ``--pose_samples`` temporal samples over dose, M's trajectories), magnification (per tilt
series 2×2 matrix, RELION's rlnMagMat), oddzernike (beam tilt + trefoil) and evenzernike (4th-order symmetric
aberrations); the Zernike groups are CTF groups (refused like ctf). See :mod:`cryopipe.mpr.parameters` for units.

A project job like the others (:func:`cryopipe.pipeline.project.open_job_dir`): without ``--o`` a new
``MultiParticle/jobNNN/`` in the project here, entered in ``default_pipeline.star`` as process ``cryopipe.mpr``
(inputs: particles, tomograms, half-maps, mask; output nodes: particles.star, tomograms.star, half1.mrc) with its
``job.star``, ``note.txt``, ``run.out`` and exit marker; ``--o Type/jobNNN/`` or any directory as for every job.
Outputs in the job folder (each file written atomically): ``particles.star`` (RELION 5 tomography, refined poses),
``particles_relion30.star`` (the same as M's RELION 3.0 species table, :func:`cryopipe.mpr.driver.relion30_table`),
``tomograms.star`` + ``tilt_series/<TS>.star`` (refined per-tilt angles, shifts, defocus; image names unchanged),
``image_warp.star`` (with imagewarp: one table per tilt series, one row per tilt, columns
``cryopipeWarpX1..K`` / ``cryopipeWarpY1..K`` = node displacements in Å, nodes row-major (y, then x) on a
``gx × gy`` grid spanning pixel 0 … W−1 / 0 … H−1, ``data_general`` holds the grid size),
``pose_trajectories.star`` (with ``--pose_samples`` > 1: one table per tilt series, rows = its particles in
particles.star order, per-sample position and rotation-vector deviations from the particle's mean pose,
:func:`cryopipe.mpr.driver.trajectory_tables`; particles.star holds the mean), magnification and aberrations in
tomograms.star's global rows (per tilt series: rlnMagMat00..11, rlnOddZernike with the beam tilt folded in as
RELION does, rlnEvenZernike; written when any of them is refined or given; read back from there) and in
particles.star's optics table (per optics group, the particle-weighted mean of its tilt series: where RELION 5's
tomography programs read them), ``half1.mrc``,
``half2.mrc`` (refined), ``half1_iter0.mrc``, ``half2_iter0.mrc`` (input metadata), ``fsc.star`` + ``fsc.png``
(masked FSC before/after), ``mpr_log.txt`` (one line per sub-iteration: score, resolution) and
``mpr_stats.json``.

Single particles (no ``--tomograms`` / ``--ios``): ``--i`` is a RELION 3.0/3.1 particles STAR with rlnImageName
stacks, CTF columns and rlnRandomSubset (:mod:`cryopipe.mpr.spa`); groups poses, defocus (per particle), ctf
(per-particle defocus + astigmatism), beamtilt (per optics group), and for particles of one optics group
magnification, oddzernike and evenzernike. Outputs: ``particles.star`` (RELION 3.1, refined angles, origins,
per-particle rlnDefocusU/V/Angle, rlnBeamTiltX/Y, rlnMagMat00..11, rlnOddZernike, rlnEvenZernike in the optics
table), the half-maps, FSC, log and stats as above. Half-maps use a Wiener division (``--wiener_snr``, default 1
for single particles).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.fsc import shell_resolutions
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.atomic import atomic_path
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.particles import read_particles, write_particles
from cryopipe.io.star import write_star
from cryopipe.io.tomo_particles import check_inside, read_optimisation_set, read_tomo_particles, write_tomo_particles
from cryopipe.io.tomography import read_tomograms, write_tomograms
from cryopipe.mpr.driver import (MprOptions, Stage, check_stages, relion30_table, run_mpr, trajectory_tables,
                                 updated_particles, updated_tomograms)
from cryopipe.mpr.parameters import GROUPS
from cryopipe.mpr.spa import SPA_NAME, check_spa_stages, run_mpr_spa, updated_spa_particles

#: job folder type and pipeline process label (RELION has no multi-particle refinement job: a cryopipe.* label)
JOB_TYPE_DIR = "MultiParticle"

HELP = ("multi-particle refinement of tilt series (poses, per-tilt shifts/warp/angles, CTF) or single particles "
        "(poses, per-particle defocus, beam tilt) against half-maps, as M")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="particles", default=None,
                   help="particles STAR (RELION 5, or 4 coordinates; or single particles when no --tomograms/--ios)")
    p.add_argument("--tomograms", default=None, help="tomograms.star")
    p.add_argument("--ios", default=None, help="optimisation_set.star (particles, tomograms, reference half-maps)")
    p.add_argument("--half1", default=None, help="unfiltered half-map 1 (default: the optimisation set's)")
    p.add_argument("--half2", default=None, help="unfiltered half-map 2")
    p.add_argument("--mask", default=None, help="binary mask (softened internally); default: sphere of --diameter")
    p.add_argument("--diameter", type=float, required=True, help="particle diameter (Å)")
    p.add_argument("--sym", default="C1", help="point-group symmetry of the reconstructions")
    p.add_argument("--o", dest="output", default=None,
                   help="output: MultiParticle/jobNNN/ of the project here (default: a new job), or any directory")
    p.add_argument("--stage", action="append", default=None,
                   help=f"comma-separated groups refined together ({', '.join(GROUPS)}); repeat for stages")
    p.add_argument("--iter", action="append", type=int, default=None,
                   help="sub-iterations per stage (once: every stage; 0 alone: baseline only)")
    p.add_argument("--first_tilts", type=int, default=0, help="use only the N lowest-dose tilts (0: all)")
    p.add_argument("--resolution", type=float, default=0.0,
                   help="refinement resolution limit (Å); <= 0: the half-maps' masked FSC resolution")
    p.add_argument("--ctf_minresolution", type=float, default=8.0,
                   help="refuse CTF refinement when the species is worse than this (Å)")
    p.add_argument("--first_iteration_fraction", type=float, default=0.8,
                   help="resolution limit of a stage's first sub-iteration, as a fraction of the final one")
    p.add_argument("--lbfgs_iter", type=int, default=10, help="L-BFGS iterations per tilt series and sub-iteration")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="stop L-BFGS when 2 iterations raise the NCC by less than this (0: always --lbfgs_iter)")
    p.add_argument("--warp_grid", type=int, nargs=2, default=(3, 3), metavar=("GX", "GY"),
                   help="image-warp grid nodes (x, y)")
    p.add_argument("--pose_samples", type=int, default=1,
                   help="temporal samples of each particle's pose over dose (group temporalposes; 1: one pose)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run all stages this many times, each later round against half-maps reconstructed at the "
                        "refined metadata (its limit from their masked FSC), as running M again")
    p.add_argument("--joint", action="store_true",
                   help="refine particle poses and the per-tilt (per-micrograph) groups together in one L-BFGS run; by "
                        "default they alternate within each sub-iteration (tilt groups with poses fixed, then poses), "
                        "which converges the particle angles faster")
    p.add_argument("--defocus_search", type=float, default=0.0,
                   help="CTF stages: try each tilt's (particle's) defocus on a grid of ±this Å before L-BFGS (0: off)")
    p.add_argument("--defocus_search_step", type=float, default=100.0, help="grid step of --defocus_search (Å)")
    p.add_argument("--beamtilt_per_micrograph", action="store_true",
                   help="single particles: one beam tilt per micrograph (written per particle) instead of per optics "
                        "group")
    p.add_argument("--spa_images_per_set", type=int, default=4096,
                   help="single particles: images read from disk and held in memory per set (<= 0: all at once)")
    p.add_argument("--batch_size", type=int, default=256, help="particle-tilt pairs per batch (memory bound)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--wiener_snr", type=float, default=None,
                   help="half-maps: divide by Σc² + 1/SNR (> 0) instead of RELION's heuristic (<= 0); default 1 "
                        "for single particles, heuristic for tilt series")


def _stages(args) -> list[Stage]:
    groups = args.stage or []
    iters = args.iter or [3]
    if not groups:
        if iters != [0]:
            raise CryopipeError("give --stage GROUPS (e.g. --stage poses,shifts), or --iter 0 for the baseline only")
        return [Stage(("poses",), 0)]
    if len(iters) == 1:
        iters = iters * len(groups)
    if len(iters) != len(groups):
        raise CryopipeError(f"{len(groups)} --stage options but {len(iters)} --iter options: give one --iter per "
                            "stage, or one for all")
    return [Stage(tuple(g.strip() for g in s.split(",") if g.strip()), it) for s, it in zip(groups, iters)]


def _is_spa(args) -> bool:
    """Single-particle mode: particles given without tomograms or an optimisation set."""
    return args.tomograms is None and args.ios is None


def _inputs(args):
    if _is_spa(args):
        files = {"particles": args.particles, "half1": args.half1, "half2": args.half2}
        for key, value in files.items():
            if value is None:
                raise CryopipeError(f"no {key} file: give --{'i' if key == 'particles' else key} (single particles; "
                                    "give --tomograms or --ios for tilt series)")
            if not Path(value).exists():
                raise CryopipeError(f"{value}: no such file (--{'i' if key == 'particles' else key})")
        if args.mask and not Path(args.mask).exists():
            raise CryopipeError(f"{args.mask}: no such file (--mask)")
        return files
    entries = read_optimisation_set(args.ios) if args.ios else {}
    files = {"particles": args.particles or entries.get("rlnTomoParticlesFile"),
             "tomograms": args.tomograms or entries.get("rlnTomoTomogramsFile"),
             "half1": args.half1 or entries.get("rlnTomoReferenceMap1File"),
             "half2": args.half2 or entries.get("rlnTomoReferenceMap2File")}
    for key, value in files.items():
        if value is None:
            raise CryopipeError(f"no {key} file: give --{'i' if key == 'particles' else key} or --ios")
        if not Path(value).exists():
            raise CryopipeError(f"{value}: no such file (--{'i' if key == 'particles' else key})")
    if args.mask and not Path(args.mask).exists():
        raise CryopipeError(f"{args.mask}: no such file (--mask)")
    return files


def _maps(files, mask_path):
    h1, px1 = read_mrc(files["half1"], finite=True)
    h2, px2 = read_mrc(files["half2"], finite=True)
    if h1.ndim != 3 or len(set(h1.shape)) != 1 or h1.shape != h2.shape:
        raise InputFileError(files["half2"], f"half-maps must be cubes of one size (got {h1.shape} and {h2.shape})",
                             "give the two unfiltered half-maps of one reconstruction")
    if abs(px1 - px2) > 1e-3 * px1:
        raise InputFileError(files["half2"], f"pixel size {px2} Å differs from half1's {px1} Å", "use matching maps")
    mask = None
    if mask_path:
        m, _ = read_mrc(mask_path, finite=True)
        if m.shape != h1.shape:
            raise InputFileError(mask_path, f"mask shape {m.shape} differs from the half-maps' {h1.shape}",
                                 "give a mask made on the half-maps' box")
        mask = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
    return torch.from_numpy(np.array(h1, dtype=np.float32)), torch.from_numpy(np.array(h2, dtype=np.float32)), \
        float(px1), mask


def _write_fsc(out: Path, result) -> None:
    box = result.mask.shape[-1]
    res = shell_resolutions(box, result.pixel_size).numpy()
    table = pd.DataFrame({"rlnSpectralIndex": np.arange(box // 2 + 1), "rlnAngstromResolution": res,
                          "rlnResolution": np.where(np.arange(box // 2 + 1) > 0, 1.0 / res, 0.0)})
    for label, curve in (("cryopipeFscMaskedBefore", result.fsc_before), ("cryopipeFscMaskedAfter", result.fsc_after)):
        if curve is not None:
            table[label] = curve.cpu().numpy()
    general = {"cryopipeResolutionBefore": result.resolution_before, "cryopipeResolutionAfter": result.resolution_after,
               "cryopipeSpeciesResolution": result.species_resolution}
    write_star(out / "fsc.star", {"general": general, "fsc": table}, version=50001)
    from matplotlib.figure import Figure  # a bare Figure rendered by Agg (as cryopipe.plots): no global backend

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(111)
    for curve, name in ((result.fsc_before, f"before ({result.resolution_before:.2f} Å)"),
                        (result.fsc_after, f"after ({result.resolution_after:.2f} Å)")):
        if curve is not None:
            ax.plot(table["rlnResolution"], curve.cpu().numpy(), label=name)
    ax.axhline(0.143, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("masked FSC")
    ax.legend()
    with atomic_path(out / "fsc.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _write_warp(out: Path, datas, grid) -> None:
    blocks: dict = {"general": {"cryopipeWarpGridX": grid[0], "cryopipeWarpGridY": grid[1]}}
    for name, d in datas.items():
        w = d.warp.cpu().numpy().reshape(d.warp.shape[0], 2, -1)
        cols = {f"cryopipeWarp{a}{k + 1}": w[:, j, k] for j, a in enumerate("XY") for k in range(w.shape[-1])}
        blocks[name] = pd.DataFrame(cols)
    write_star(out / "image_warp.star", blocks, version=50001)


def main(args: argparse.Namespace) -> int:
    stages = _stages(args)
    check_stages(stages)
    spa = _is_spa(args)
    if spa:
        check_spa_stages(stages)
    files = _inputs(args)
    if args.diameter <= 0:
        raise CryopipeError(f"--diameter {args.diameter:g}: must be > 0 Å")
    if args.first_tilts < 0 or args.batch_size < 1 or args.lbfgs_iter < 1 or min(args.warp_grid) < 1 \
            or args.rounds < 1 or args.defocus_search < 0 or args.defocus_search_step <= 0 or args.pose_samples < 1:
        raise CryopipeError("--first_tilts and --defocus_search must be >= 0, --batch_size, --lbfgs_iter, --rounds, "
                            "--pose_samples and --warp_grid >= 1, --defocus_search_step > 0")
    if spa:
        spa_particles = read_particles(files["particles"])
    else:
        tomograms = read_tomograms(files["tomograms"])
        particles = read_tomo_particles(files["particles"], tomograms)
        check_inside(particles, tomograms)
    half1, half2, px, mask = _maps(files, args.mask)
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    inputs = [(files["particles"], NodeType.PARTICLES), (files.get("tomograms"), NodeType.TOMOGRAMS),
              (files["half1"], NodeType.HALFMAP), (files["half2"], NodeType.HALFMAP), (args.mask, NodeType.MASK3D)]
    with open_job_dir(args.output, JOB_TYPE_DIR, ProcessLabel.MPR, inputs=inputs, params=vars(args),
                      is_tomo=not spa) as job:
        _run(args, job, spa, stages, files, half1, half2, px, mask,
             spa_particles if spa else None, None if spa else (particles, tomograms))
    return 0


def _run(args, job, spa: bool, stages, files, half1, half2, px, mask, spa_particles, tomo) -> None:
    """The refinement and its files in the job folder (module docstring); outputs declared as pipeline nodes."""
    from cryopipe.pipeline.project import NodeType

    out = job.path()
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(f"mpr: {msg}", flush=True)
        log_lines.append(msg)

    options = MprOptions(stages=stages, resolution_A=args.resolution, first_tilts=args.first_tilts,
                         ctf_minresolution=args.ctf_minresolution, first_fraction=args.first_iteration_fraction,
                         lbfgs_iterations=args.lbfgs_iter, tolerance=args.tolerance,
                         warp_grid=tuple(args.warp_grid), symmetry=args.sym,
                         batch_pairs=args.batch_size, rounds=args.rounds, defocus_search_A=args.defocus_search,
                         defocus_search_step_A=args.defocus_search_step, pose_samples=args.pose_samples,
                         alternate=not args.joint,
                         reconstruct_snr=args.wiener_snr if args.wiener_snr is not None else (1.0 if spa else -1.0))
    if spa:
        result = run_mpr_spa(spa_particles, half1, half2, px, mask, args.diameter, options,
                             root_dir=Path(files["particles"]).parent, device=resolve_device(args.device), log=log,
                             beam_tilt_per_micrograph=args.beamtilt_per_micrograph,
                             images_per_set=args.spa_images_per_set)
    else:
        particles, tomograms = tomo
        result = run_mpr(particles, tomograms, half1, half2, px, mask, args.diameter, options,
                         device=resolve_device(args.device), log=log)
    refined = any(st.iterations > 0 for st in stages)
    if result.baseline_half1 is not None:
        write_mrc(out / "half1_iter0.mrc", result.baseline_half1.cpu().numpy(), px)
        write_mrc(out / "half2_iter0.mrc", result.baseline_half2.cpu().numpy(), px)
    if refined and spa:
        write_particles(out / "particles.star", updated_spa_particles(
            spa_particles, result.data[SPA_NAME], beam_tilt_per_micrograph=args.beamtilt_per_micrograph))
    elif refined:
        write_tomo_particles(out / "particles.star", updated_particles(particles, tomograms, result.data))
        write_star(out / "particles_relion30.star", {"": relion30_table(result.data)}, version=None)
        write_tomograms(out / "tomograms.star", updated_tomograms(tomograms, result.data), out / "tilt_series")
        job.add_output(out / "tomograms.star", NodeType.TOMOGRAMS)
        if any("imagewarp" in st.groups for st in stages):
            _write_warp(out, result.data, args.warp_grid)
        trajectories = trajectory_tables(result.data)
        if trajectories:
            write_star(out / "pose_trajectories.star", {"general": {"cryopipePoseSamples": args.pose_samples},
                                                        **trajectories}, version=50001)
    if refined:
        write_mrc(out / "half1.mrc", result.half1.cpu().numpy(), px)
        write_mrc(out / "half2.mrc", result.half2.cpu().numpy(), px)
        job.add_output(out / "particles.star", NodeType.PARTICLES)
        job.add_output(out / "half1.mrc", NodeType.HALFMAP)
    _write_fsc(out, result)
    with atomic_path(out / "mpr_log.txt") as tmp:
        tmp.write_text("\n".join(log_lines) + "\n")
    with atomic_path(out / "mpr_stats.json") as tmp:
        tmp.write_text(json.dumps({"subiterations": result.stats, "resolution_before": result.resolution_before,
                                   "resolution_after": result.resolution_after,
                                   "species_resolution": result.species_resolution}, indent=1))
