"""Multi-particle refinement of tilt series, end to end: stages of parameter groups, sub-iterations with a ramped
resolution limit, L-BFGS per tilt series, new half-maps and masked gold-standard FSC before and after (as M).

Schedule (M's ``PerformMultiParticleRefinement``): for each stage (a set of groups and a number of sub-iterations)
and each sub-iteration ``i`` of ``n``, the refinement limit is the fraction ``f₀ + (1 − f₀)·i/(n − 1)`` of
``k_max = box·px/resolution`` (``f₀`` = ``first_fraction``, M's 80 %), and every tilt series is refined in turn
(its corrections then applied to its metadata and reset to zero). A stage with ``ctf`` or ``defocus`` starts, in
its first sub-iteration, with M's exhaustive defocus search (``defocus_search_A``: every tilt's defocus tried on a
1D grid, the best kept, then L-BFGS). With ``rounds`` > 1 the whole schedule runs again against half-maps
reconstructed from the refined parameters (M's next run: the references improve, and the limit follows their
masked FSC). CTF refinement is refused when the species'
masked FSC resolution is worse than ``ctf_minresolution`` (M: ``MinimumCTFRefinementResolution``).

Mask (as M): the user's binary mask is softened by a raised cosine of ``3·max(1, resolution/(2·px))`` px; without a
mask, a sphere of the particle diameter. The references are the masked half-maps; the FSC before (``iter 0``:
half-maps reconstructed at the input metadata) and after (at the refined metadata) is the masked FSC (0.143).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas
import torch

from cryopipe.core.ctf import beam_tilt_zernike
from cryopipe.core.fsc import fsc, resolution_at
from cryopipe.core.geometry import matrix_to_euler
from cryopipe.core.mask_ops import soft_edge
from cryopipe.core.masks import soft_spherical_mask
from cryopipe.core.projector import Projector
from cryopipe.core.tilt_geometry import project_points, projection_matrices, visible_in_tilts
from cryopipe.errors import CryopipeError
from cryopipe.io.tomography import TiltSeries, TomogramSet
from cryopipe.io.tomo_particles import TomoParticles, to_centered_coordinates
from cryopipe.mpr.forward import Species, TiltSeriesData, bake, zero_parameters
from cryopipe.mpr.optimise import RefineStats, refine_tilt_series
from cryopipe.mpr.parameters import CTF_GROUPS, GROUPS
from cryopipe.mpr.reconstruct import reconstruct_halves
from cryopipe.tomo.particle_sets import particles_per_tilt_series

__all__ = ["Stage", "MprOptions", "MprResult", "prepare_tilt_series", "tilt_images", "without_images",
           "make_species", "species_mask", "masked_fsc", "run_mpr", "updated_particles", "updated_tomograms",
           "relion30_table", "check_stages", "species_setup", "RunStart", "start_run", "refine_data_sets",
           "trajectory_tables", "optics_metadata", "format_vector", "parse_vector", "MAG_LABELS",
           "optics_row_metadata", "particle_optics_metadata", "padded_weighted_mean"]


@dataclass(frozen=True)
class Stage:
    groups: tuple[str, ...]
    iterations: int = 3


@dataclass
class MprOptions:
    stages: list[Stage]
    resolution_A: float = 0.0  # refinement limit (Å); <= 0: the species' masked FSC resolution
    first_tilts: int = 0  # use only the N lowest-dose tilts (0: all)
    ctf_minresolution: float = 8.0  # Å (M's CLI default)
    first_fraction: float = 0.8
    lbfgs_iterations: int = 10
    tolerance: float = 1e-4  # stop L-BFGS after 2 iterations that gained < this NCC (0: all lbfgs_iterations)
    warp_grid: tuple[int, int] = (3, 3)
    symmetry: str = "C1"
    batch_pairs: int = 256
    reconstruct: bool = True  # new half-maps + FSC after
    reconstruct_snr: float = -1.0  # > 0: Wiener division Σc² + 1/snr in the half-maps (<= 0: RELION's heuristic)
    defocus_search_A: float = 0.0  # > 0: M's exhaustive per-tilt defocus search over ±this (Å) before L-BFGS
    defocus_search_step_A: float = 100.0  # its grid step (Å)
    rounds: int = 1  # runs of all stages; each later one against half-maps reconstructed at the refined metadata
    pose_samples: int = 1  # temporal samples of each particle's pose over dose (group temporalposes; 1: none)
    alternate: bool = True  # particle groups and the others refined in turn (optimise.refine_tilt_series)


@dataclass
class MprResult:
    data: dict[str, TiltSeriesData]  # refined metadata per tilt series
    half1: torch.Tensor | None  # new half-maps (refined metadata)
    half2: torch.Tensor | None
    baseline_half1: torch.Tensor | None  # half-maps at the input metadata
    baseline_half2: torch.Tensor | None
    mask: torch.Tensor
    pixel_size: float  # map pixel (Å)
    species_resolution: float  # masked FSC of the given half-maps (Å)
    fsc_before: torch.Tensor | None
    fsc_after: torch.Tensor | None
    resolution_before: float
    resolution_after: float
    log: list[str] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)


def tilt_images(ts: TiltSeries, device=None) -> torch.Tensor:
    """The tilt images ``[F, H, W]`` (float32) of one tilt series."""
    return torch.from_numpy(ts.read_images()).to(device=device, dtype=torch.float32)


def without_images(data: TiltSeriesData) -> TiltSeriesData:
    """``data`` with a zero-memory stand-in of its images' shape (tilt series are loaded one at a time)."""
    F, H, W = data.images.shape
    return replace(data, images=torch.zeros(1, 1, 1, device=data.images.device).expand(F, H, W))


def prepare_tilt_series(ts: TiltSeries, positions: torch.Tensor, orientations: torch.Tensor,
                        half_sets: torch.Tensor, box: int, binning: float, first_tilts: int = 0,
                        warp_grid: tuple[int, int] = (1, 1), device=None, load_images: bool = True,
                        pose_samples: int = 1) -> TiltSeriesData:
    """:class:`TiltSeriesData` of one tilt series: its images (``load_images``; else a zero-memory stand-in, see
    :func:`without_images`) and metadata, and the (particle, tilt) pairs used — centre at least ``box·binning/2`` px
    inside the image, among the ``first_tilts`` lowest-dose tilts (0: all); the magnification matrix and Zernike
    coefficients of its global row when present (:func:`optics_metadata`); with ``pose_samples`` > 1 zero
    trajectories of that many temporal samples."""
    def t(x):
        return torch.as_tensor(np.array(x, dtype=np.float64), device=device)

    W, H = ts.image_size
    images = tilt_images(ts, device) if load_images else \
        torch.zeros(1, 1, 1, device=device).expand(ts.n_tilts, H, W)
    angles, shifts = t(ts.tilt_angles()), t(ts.shifts_angst())
    pre = t(ts.pre_exposure())
    F = len(pre)
    P = projection_matrices(angles[:, 0], angles[:, 1], angles[:, 2], shifts, ts.pixel_size, ts.tomogram_size,
                            ts.image_size).to(device)
    pos = positions.to(device=device, dtype=torch.float64)
    q = project_points(P, pos)
    visible = visible_in_tilts(q[..., :2], ts.image_size, box * binning / 2.0)
    if first_tilts and first_tilts < F:
        keep = torch.zeros(F, dtype=torch.bool, device=device)
        keep[torch.argsort(pre, stable=True)[:first_tilts]] = True
        visible &= keep[None, :]
    gx, gy = warp_grid
    data = TiltSeriesData(images, angles, shifts, t(ts.defocus()), pre, t(ts.ctf_scale()),
                          torch.zeros(F, 2, gy, gx, dtype=torch.float64, device=device), pos,
                          orientations.to(device=device, dtype=torch.float64), half_sets.to(device).long(),
                          torch.nonzero(visible), ts.pixel_size, ts.tomogram_size, ts.hand, ts.defocus_slope,
                          ts.voltage, ts.cs, ts.amplitude_contrast, ts.bfactor_per_dose)
    data = replace(data, **optics_metadata(ts, device))
    if pose_samples > 1:
        z = torch.zeros(len(pos), int(pose_samples), 3, dtype=torch.float64, device=device)
        data = replace(data, trajectory_angles=z, trajectory_shifts=z.clone())
    return data


#: global-table columns of the anisotropic magnification matrix (RELION's optics convention)
MAG_LABELS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


def parse_vector(value, label: str, where: str) -> list[float]:
    """RELION's vector value ``[a,b,c]`` (or ``a,b,c``) as floats; a one-line error naming ``where`` and the column
    otherwise."""
    text = str(value).strip().strip("[]")
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CryopipeError(f"{where}: {label} = {value!r} is not a list of numbers like [0.1,0,0.2]; fix it") from None


def optics_metadata(ts: TiltSeries, device=None) -> dict:
    """``mag_matrix`` / ``odd_zernike`` / ``even_zernike`` of :class:`TiltSeriesData` from the tilt series' global
    row (rlnMagMat00..11, rlnOddZernike, rlnEvenZernike; absent: None)."""
    return optics_row_metadata(ts.globals, f"tomogram {ts.name} in tomograms.star", device)


def optics_row_metadata(row, where: str, device=None) -> dict:
    """``mag_matrix`` / ``odd_zernike`` / ``even_zernike`` from one table row (a dict or pandas row: rlnMagMat00..11,
    rlnOddZernike, rlnEvenZernike; each absent: left out); ``where`` names the row in errors."""
    out: dict = {}
    if any(lab in row for lab in MAG_LABELS):
        values = [float(row.get(lab, 1.0 if lab in ("rlnMagMat00", "rlnMagMat11") else 0.0)) for lab in MAG_LABELS]
        out["mag_matrix"] = torch.tensor(values, dtype=torch.float64, device=device).reshape(2, 2)
    for label, key in (("rlnOddZernike", "odd_zernike"), ("rlnEvenZernike", "even_zernike")):
        if label in row:
            out[key] = torch.tensor(parse_vector(row[label], label, where), dtype=torch.float64, device=device)
    return out


def particle_optics_metadata(particles: TomoParticles, rows: np.ndarray, device=None) -> dict:
    """:func:`optics_row_metadata` of the optics-table row of the particles ``rows`` (e.g. one tilt series'), when
    they all belong to one optics group (else {}): the values RELION 5's tomography programs keep there."""
    o, t = particles.optics, particles.particles
    if o is None or "rlnOpticsGroup" not in t.columns or "rlnOpticsGroup" not in o.columns or not len(rows):
        return {}
    groups = np.unique(pandas.to_numeric(t["rlnOpticsGroup"].iloc[rows], errors="coerce"))
    match = o[pandas.to_numeric(o["rlnOpticsGroup"], errors="coerce") == groups[0]]
    if len(groups) != 1 or len(match) != 1:
        return {}
    return optics_row_metadata(match.iloc[0], f"{particles._where} optics group {groups[0]:g}", device)


def format_vector(values) -> str:
    """A vector as RELION writes it in a STAR file: ``[a,b,c]``."""
    return "[" + ",".join(f"{float(v):.9g}" for v in values) + "]"


def species_mask(mask: torch.Tensor | None, box: int, pixel_size: float, diameter_A: float,
                 resolution_A: float) -> torch.Tensor:
    """Soft mask ``[box³]``: the binary ``mask`` (> 0.5) with a raised-cosine edge of ``3·max(1, res/(2·px))`` px,
    or (no mask) a sphere of ``diameter_A`` with a 3-px edge."""
    if mask is None:
        return soft_spherical_mask(box, diameter_A / (2.0 * pixel_size), 3.0).float()
    width = 3.0 * max(1.0, resolution_A / (2.0 * pixel_size))
    return soft_edge(mask > 0.5, width).float()


def masked_fsc(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor, pixel_size: float
               ) -> tuple[torch.Tensor, float]:
    """(masked FSC curve ``[box//2+1]``, resolution at 0.143 in Å)."""
    curve = fsc(half1 * mask, half2 * mask)
    return curve, resolution_at(curve, 0.143, pixel_size, half1.shape[-1])


def make_species(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor, binning: float, pad: float = 2.0,
                 dtype=torch.float32) -> Species:
    """Padded Fourier grids of the masked half-maps (:class:`cryopipe.core.projector.Projector`)."""
    projs = [Projector(h * mask, pad=pad, dtype=dtype) for h in (half1, half2)]
    return Species(torch.stack([p.data for p in projs]), projs[0].centre, projs[0].pad, half1.shape[-1], binning)


def check_stages(stages) -> None:
    """One-line error for an unknown or empty group list or a negative sub-iteration count."""
    for st in stages:
        bad = [g for g in st.groups if g not in GROUPS]
        if bad or not st.groups:
            raise CryopipeError(f"--stage {','.join(st.groups)}: unknown group {bad[0] if bad else '(none)'}; "
                                f"use a comma-separated list of {', '.join(GROUPS)}")
        if st.iterations < 0:
            raise CryopipeError(f"--iter {st.iterations}: must be >= 0")


def species_setup(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor | None, map_pixel_size: float,
                  diameter_A: float, options: MprOptions, say: Callable[[str], None], device=None
                  ) -> tuple[float, float, float, torch.Tensor]:
    """``(species resolution Å, refinement resolution Å, k_full Fourier px, soft mask)`` of the half-maps; a
    one-line error when CTF groups are asked for on a species worse than ``options.ctf_minresolution``."""
    box = int(half1.shape[-1])
    res_mask = species_mask(None if mask is None else mask.to(device), box, map_pixel_size, diameter_A,
                            max(options.resolution_A, 2 * map_pixel_size))
    species_curve, species_res = masked_fsc(half1, half2, res_mask.to(device), map_pixel_size)
    say(f"species: masked FSC of the given half-maps reaches {species_res:.2f} Å (0.143)")
    wants_ctf = any(set(CTF_GROUPS) & set(st.groups) and st.iterations > 0 for st in options.stages)
    if wants_ctf and species_res > options.ctf_minresolution:
        raise CryopipeError(f"--stage ...{'/'.join(CTF_GROUPS)}: the species resolution {species_res:.2f} Å is worse "
                            f"than --ctf_minresolution {options.ctf_minresolution:g} Å; refine geometry first (M "
                            "refuses CTF refinement then) or raise --ctf_minresolution")
    resolution = options.resolution_A if options.resolution_A > 0 else species_res
    k_full = min(box * map_pixel_size / resolution, box // 2 - 1)
    soft = species_mask(None if mask is None else mask.to(device), box, map_pixel_size, diameter_A, resolution)
    return species_res, resolution, k_full, soft


@dataclass
class RunStart:
    """What every run (tilt series or particle stacks) starts from: the half-maps on the device, the species
    (:func:`species_setup`), the log lines and their writer ``say``, and the start time."""

    half1: torch.Tensor
    half2: torch.Tensor
    species_res: float
    resolution: float
    k_full: float
    soft: torch.Tensor
    lines: list[str]
    say: Callable[[str], None]
    t0: float

    @property
    def box(self) -> int:
        return int(self.half1.shape[-1])


def start_run(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor | None, map_pixel_size: float,
              diameter_A: float, options: MprOptions, device=None, log: Callable[[str], None] = print) -> RunStart:
    """The half-maps as float32 on ``device``, a logger that also keeps the lines, and the species set-up."""
    t0 = time.perf_counter()
    half1, half2 = half1.to(device=device, dtype=torch.float32), half2.to(device=device, dtype=torch.float32)
    lines: list[str] = []

    def say(msg: str) -> None:
        lines.append(msg)
        log(msg)

    species_res, resolution, k_full, soft = species_setup(half1, half2, mask, map_pixel_size, diameter_A, options,
                                                          say, device)
    return RunStart(half1, half2, species_res, resolution, k_full, soft, lines, say, t0)


def run_mpr(particles: TomoParticles, tomograms: TomogramSet, half1: torch.Tensor, half2: torch.Tensor,
            map_pixel_size: float, mask: torch.Tensor | None, diameter_A: float, options: MprOptions,
            device=None, log: Callable[[str], None] = print) -> MprResult:
    """Refine ``particles`` in ``tomograms`` against the half-maps (``[b³]``, pixel ``map_pixel_size`` Å)."""
    check_stages(options.stages)
    if any("temporalposes" in st.groups for st in options.stages) and options.pose_samples < 2:
        raise CryopipeError("--stage ...temporalposes: give --pose_samples 2 or more (temporal samples of each "
                            "particle's pose over dose)")
    run = start_run(half1, half2, mask, map_pixel_size, diameter_A, options, device, log)
    box = run.box
    datas: dict[str, TiltSeriesData] = {}
    series: dict[str, TiltSeries] = {}
    binning = None
    for group in particles_per_tilt_series(particles, tomograms):
        ts = group.tilt_series
        b = map_pixel_size / ts.pixel_size
        if binning is not None and abs(b - binning) > 1e-4:
            raise CryopipeError(f"tomogram {ts.name}: pixel size {ts.pixel_size} Å differs from the other tilt "
                                "series; refine tilt series of one pixel size together")
        binning = b
        if binning < 1 - 1e-4:
            raise CryopipeError(f"half-map pixel {map_pixel_size} Å is smaller than tomogram {ts.name}'s pixel "
                                f"{ts.pixel_size} Å; give half-maps at the tilt-series pixel size or binned")
        series[ts.name] = ts
        data = prepare_tilt_series(ts, group.positions_px, group.orientations, group.half_sets, box, binning,
                                   options.first_tilts, options.warp_grid, device, load_images=False,
                                   pose_samples=options.pose_samples)
        from_optics = particle_optics_metadata(particles, group.rows, device)  # tomograms.star's values first
        datas[ts.name] = replace(data, **{k: v for k, v in from_optics.items() if getattr(data, k) is None})
    if not datas:
        raise CryopipeError("no particles in the given tomograms")
    n_pairs = sum(len(d.pairs) for d in datas.values())
    run.say(f"{len(particles)} particles, {len(datas)} tilt series, {n_pairs} particle-tilt pairs, box {box}, "
            f"{map_pixel_size:.3f} Å/px, refinement limit {run.resolution:.2f} Å")
    return refine_data_sets(datas, lambda name: tilt_images(series[name], device), run, map_pixel_size, binning,
                            options)


def defocus_offsets(options: MprOptions) -> torch.Tensor | None:
    """The defocus offsets (Å) of the exhaustive search at a CTF stage's first sub-iteration, or None (off)."""
    if options.defocus_search_A <= 0:
        return None
    n = int(options.defocus_search_A // options.defocus_search_step_A)
    return torch.arange(-n, n + 1, dtype=torch.float64) * options.defocus_search_step_A


def _refine_stages(datas, load_images, species: Species, k_full: float, box: int, map_pixel_size: float,
                   n_pairs: int, options: MprOptions, stats: list[dict], say, round_index: int, sync=None) -> None:
    """One run of the stages × sub-iterations against ``species`` (module docstring); ``datas`` updated in place,
    one stats entry and log line per sub-iteration."""
    for si, stage in enumerate(options.stages, start=1):
        for it in range(stage.iterations):
            frac = 1.0 if stage.iterations == 1 else \
                options.first_fraction + (1 - options.first_fraction) * it / (stage.iterations - 1)
            k_max = max(2.5, frac * k_full)
            res_it = box * map_pixel_size / k_max
            before = after = 0.0
            run = RefineStats(0, 0, 0, 0, 0.0, 0.0)
            search = defocus_offsets(options) if it == 0 else None
            for name in datas:
                data = replace(datas[name], images=load_images(name))
                params = zero_parameters(data)
                r = refine_tilt_series(data, species, params, stage.groups, k_max,
                                       lbfgs_iterations=options.lbfgs_iterations, batch_pairs=options.batch_pairs,
                                       tolerance=options.tolerance, defocus_search_A=search,
                                       alternate=options.alternate)
                datas[name] = without_images(bake(data, params, stage.groups))
                w = len(data.pairs) / n_pairs
                before += w * r.score_before
                after += w * r.score_after
                run = RefineStats(0, 0, run.evaluations + r.evaluations, run.pair_evaluations + r.pair_evaluations,
                                  run.seconds + r.seconds, run.cpu_seconds + r.cpu_seconds)
            if sync is not None:
                sync(datas)
            stats.append({"round": round_index, "stage": si, "groups": list(stage.groups), "subiteration": it + 1,
                          "resolution_A": res_it, "score_before": before, "score_after": after, "evaluations": run.evaluations,
                          "pair_evaluations": run.pair_evaluations, "seconds": run.seconds,
                          "cpu_seconds": run.cpu_seconds})
            say(f"round {round_index} stage {si} ({','.join(stage.groups)}) sub-iteration {it + 1}/{stage.iterations}: limit "
                f"{res_it:.2f} Å, score {before:.4f} -> {after:.4f}, {run.evaluations} evaluations, "
                f"{run.pair_evaluations / max(run.seconds, 1e-9):.0f} pair evaluations/s, {run.seconds:.1f} s")


def refine_data_sets(datas: dict[str, TiltSeriesData], load_images: Callable[[str], torch.Tensor], run: RunStart,
                     map_pixel_size: float, binning: float, options: MprOptions,
                     sync: Callable[[dict[str, TiltSeriesData]], None] | None = None) -> MprResult:
    """The schedule of the module docstring on prepared data sets (tilt series, or particle stacks from
    :mod:`cryopipe.mpr.spa`) whose images ``load_images(name)`` gives, one data set in memory at a time:
    baseline half-maps, stages × sub-iterations of :func:`refine_tilt_series` per data set (corrections baked
    into ``datas`` in place), half-maps and FSC after. ``sync(datas)`` (optional) runs after every sub-iteration,
    e.g. to make parameters that several data sets share one value again (:func:`cryopipe.mpr.spa.shared_beam_tilt`)."""
    half1, half2, soft, species_res, k_full = run.half1, run.half2, run.soft, run.species_res, run.k_full
    say, lines, t0 = run.say, run.lines, run.t0
    box = int(half1.shape[-1])
    device = half1.device
    n_pairs = sum(len(d.pairs) for d in datas.values())

    def loaded():  # one data set's images in memory at a time
        for name, d in datas.items():
            yield replace(d, images=load_images(name))

    fsc_before = fsc_after = h1_before = h2_before = h1_after = h2_after = None
    res_before = res_after = float("nan")
    if options.reconstruct:
        h1_before, h2_before, _ = reconstruct_halves(loaded(), box, binning, options.symmetry, device=device,
                                                 snr=options.reconstruct_snr)
        fsc_before, res_before = masked_fsc(h1_before, h2_before, soft, map_pixel_size)
        say(f"iter 0: half-maps at the input metadata: masked FSC resolution {res_before:.2f} Å")

    species = make_species(half1, half2, soft, binning)
    stats: list[dict] = []
    for rnd in range(max(1, options.rounds)):
        if rnd > 0:  # M's next run: references reconstructed from the refined parameters, limit from their FSC
            r1, r2, _ = reconstruct_halves(loaded(), box, binning, options.symmetry, device=device,
                                           snr=options.reconstruct_snr)
            _, res_round = masked_fsc(r1, r2, soft, map_pixel_size)
            if options.resolution_A <= 0:
                k_full = min(box * map_pixel_size / res_round, box // 2 - 1)
            species = make_species(r1, r2, soft, binning)
            say(f"round {rnd + 1}/{options.rounds}: references reconstructed at the refined metadata, masked FSC "
                f"{res_round:.2f} Å, refinement limit {box * map_pixel_size / k_full:.2f} Å")
        _refine_stages(datas, load_images, species, k_full, box, map_pixel_size, n_pairs, options, stats, say,
                       rnd + 1, sync)
    if options.reconstruct and any(st.iterations > 0 for st in options.stages):
        h1_after, h2_after, _ = reconstruct_halves(loaded(), box, binning, options.symmetry, device=device,
                                                 snr=options.reconstruct_snr)
        fsc_after, res_after = masked_fsc(h1_after, h2_after, soft, map_pixel_size)
        say(f"after refinement: masked FSC resolution {res_after:.2f} Å (before {res_before:.2f} Å); "
            f"{time.perf_counter() - t0:.1f} s in all")
    return MprResult(datas, h1_after, h2_after, h1_before, h2_before, soft, map_pixel_size, species_res, fsc_before,
                     fsc_after, res_before, res_after, lines, stats)


def updated_particles(particles: TomoParticles, tomograms: TomogramSet,
                      datas: dict[str, TiltSeriesData]) -> TomoParticles:
    """RELION 5 particles (centred Å coordinates) with the refined positions and orientations; origins and
    subtomogram angles kept (``coordinate = (p − size/2)·px + A_sub·origin``, ``rlnAngle* = Euler(A_subᵀ·A)``);
    refined magnification / aberrations also into the optics table (:func:`_write_particle_optics`)."""
    out = to_centered_coordinates(particles, tomograms)
    t = out.particles
    names = out.tomo_names
    sub = out.subtomogram_matrices()
    origins = out._columns(("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"), 0.0)
    for name, data in datas.items():
        rows = np.flatnonzero(names == name)
        px = data.pixel_size
        half = np.array([s / 2.0 for s in data.tomogram_size])
        pos = data.positions.cpu().numpy()
        centred = (pos - half) * px + np.einsum("nij,nj->ni", sub[rows], origins[rows])
        A = data.orientations.cpu()
        angles = matrix_to_euler(torch.from_numpy(np.swapaxes(sub[rows], 1, 2)).to(A.dtype) @ A).numpy()
        for j, axis in enumerate("XYZ"):
            t.iloc[rows, t.columns.get_loc(f"rlnCenteredCoordinate{axis}Angst")] = centred[:, j]
        for j, lab in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            if lab not in t.columns:
                t[lab] = 0.0
            t.iloc[rows, t.columns.get_loc(lab)] = angles[:, j]
    _write_particle_optics(out, datas)
    return out


def relion30_table(datas: dict[str, TiltSeriesData]) -> pandas.DataFrame:
    """The refined particles as M's RELION 3.0 species table (``CreateSpecies``): rlnMicrographName
    ``<TomoName>.tomostar``, rlnCoordinateX/Y/Z (decentred unbinned px, origins applied), rlnAngleRot/Tilt/Psi of the
    full orientation ``A_sub·A_particle``, rlnRandomSubset, and rlnMagnification 10000 with rlnDetectorPixelSize = the
    tilt-series pixel (µm·1e-4 = Å), so that pixel size = rlnDetectorPixelSize·1e4/rlnMagnification."""
    rows = []
    for name, d in datas.items():
        pos = d.positions.cpu().numpy()
        ang = matrix_to_euler(d.orientations.cpu()).numpy().reshape(-1, 3)
        rows.append(pandas.DataFrame({"rlnMicrographName": [f"{name}.tomostar"] * len(pos),
                                  "rlnCoordinateX": pos[:, 0], "rlnCoordinateY": pos[:, 1], "rlnCoordinateZ": pos[:, 2],
                                  "rlnAngleRot": ang[:, 0], "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
                                  "rlnRandomSubset": d.half_sets.cpu().numpy().astype(int),
                                  "rlnMagnification": 10000.0, "rlnDetectorPixelSize": d.pixel_size}))
    return pandas.concat(rows, ignore_index=True)


def _optics_values(data: TiltSeriesData | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(magnification [2, 2], odd [K], even [K])`` of a tilt series as RELION keeps them: the odd coefficients
    with the beam tilt folded in (RELION's ``TiltHelper::insertTilt``); None (unrefined): identity and zeros."""
    mag = data.mag_matrix if data is not None and data.mag_matrix is not None else torch.eye(2, dtype=torch.float64)
    odd = data.odd_zernike if data is not None and data.odd_zernike is not None else torch.zeros(6, dtype=torch.float64)
    if data is not None and data.beam_tilt is not None:
        bt = data.beam_tilt[0].cpu()
        tilt = beam_tilt_zernike(bt[0], bt[1], data.voltage, data.cs)
        n = max(len(odd), 6)
        odd = torch.nn.functional.pad(odd.cpu(), (0, n - len(odd))) + torch.nn.functional.pad(tilt, (0, n - 6))
    even = data.even_zernike if data is not None and data.even_zernike is not None else torch.zeros(9, dtype=torch.float64)
    return mag.cpu(), odd.cpu(), even.cpu()


def _optics_columns(mag: torch.Tensor, odd: torch.Tensor, even: torch.Tensor) -> dict:
    """STAR values: rlnMagMat00..11 (floats), rlnOddZernike / rlnEvenZernike (``[a,b,…]``)."""
    out = {lab: float(v) for lab, v in zip(MAG_LABELS, mag.reshape(-1).tolist())}
    out.update(rlnOddZernike=format_vector(odd.tolist()), rlnEvenZernike=format_vector(even.tolist()))
    return out


def _global_optics(data: TiltSeriesData | None) -> dict:
    """Global-row values of a tilt series' refined magnification matrix and aberrations (:func:`_optics_values`);
    an unrefined tilt series (None) gets the identity and zeros, as every row needs the columns."""
    return _optics_columns(*_optics_values(data))


def padded_weighted_mean(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted mean of tensors whose last dimension may differ (coefficient vectors of different maximum order),
    each zero-padded to the longest."""
    n = max(v.shape[-1] for v in vectors)
    stack = torch.stack([torch.nn.functional.pad(v, (0, n - v.shape[-1])) for v in vectors])
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device)
    return (stack * w.reshape(-1, *([1] * (stack.dim() - 1)))).sum(0) / w.sum()


def _write_particle_optics(out: TomoParticles, datas: dict[str, TiltSeriesData]) -> None:
    """The magnification matrix and Zernike vectors into the particles' optics table, where RELION 5's tomography
    programs keep them (per optics group): each group gets the particle-weighted mean of its tilt series' values
    (:func:`_optics_values`; exact when a group is one tilt series); groups without refined particles keep theirs
    (identity / zeros in a new column)."""
    if out.optics is None or "rlnOpticsGroup" not in out.particles.columns or \
            not any(_has_optics(d) for d in datas.values()):
        return
    o = out.optics
    defaults = _global_optics(None)
    for lab, value in defaults.items():
        if lab not in o.columns:
            o[lab] = value
    groups = pandas.to_numeric(out.particles["rlnOpticsGroup"], errors="coerce").to_numpy()
    names = out.tomo_names
    for i, g in enumerate(pandas.to_numeric(o["rlnOpticsGroup"], errors="coerce").to_numpy()):
        counts = {n: float(np.sum((groups == g) & (names == n))) for n in datas}
        used = [n for n, c in counts.items() if c > 0]
        if not used:
            continue
        values = [_optics_values(datas[n]) for n in used]
        weights = [counts[n] for n in used]
        mean = [padded_weighted_mean([v[j] for v in values], weights) for j in range(3)]
        for lab, value in _optics_columns(*mean).items():
            o.iloc[i, o.columns.get_loc(lab)] = value


def _has_optics(data: TiltSeriesData) -> bool:
    return data.mag_matrix is not None or data.odd_zernike is not None or data.even_zernike is not None \
        or data.beam_tilt is not None


def updated_tomograms(tomograms: TomogramSet, datas: dict[str, TiltSeriesData]) -> TomogramSet:
    """A copy of the tomogram set with the refined per-tilt angles, shifts and defocus, and (when any tilt series
    has them) the magnification matrix and Zernike coefficients in every global row (:func:`_global_optics`)."""
    series = {}
    optics = any(_has_optics(d) for d in datas.values())
    for ts in tomograms:
        tilts = ts.tilts.copy()
        globals_ = dict(ts.globals)
        if optics and (ts.name in datas or not any(lab in globals_ for lab in MAG_LABELS)):
            globals_.update(_global_optics(datas.get(ts.name)))
        if ts.name in datas:
            d = datas[ts.name]
            values = {"rlnTomoXTilt": d.angles[:, 0], "rlnTomoYTilt": d.angles[:, 1], "rlnTomoZRot": d.angles[:, 2],
                      "rlnTomoXShiftAngst": d.shifts[:, 0], "rlnTomoYShiftAngst": d.shifts[:, 1],
                      "rlnDefocusU": d.defocus[:, 0], "rlnDefocusV": d.defocus[:, 1],
                      "rlnDefocusAngle": d.defocus[:, 2]}
            for lab, v in values.items():
                tilts[lab] = v.cpu().numpy()
        series[ts.name] = TiltSeries(ts.name, globals_, tilts, ts.root, ts.star_file)
    return TomogramSet(series, tomograms.path)


def trajectory_tables(datas: dict[str, TiltSeriesData]) -> dict[str, pandas.DataFrame]:
    """Per tilt series (with several temporal samples) one table of its particles' poses over dose, rows in the
    order of the tilt series' particles in particles.star: ``cryopipeTrajectoryDX1..S`` / ``DY`` / ``DZ`` (Å,
    tomogram frame) and ``cryopipeTrajectoryRotX1..S`` / ``RotY`` / ``RotZ`` (deg, rotation vector ``v``: the
    sample's orientation is ``A·Exp(v)``, ``A`` = the particle's orientation in particles.star), sample ``s`` at
    the pre-exposure ``D_min + s/(S−1)·(D_max − D_min)`` of the tilt series; the samples' mean is zero (the
    particle's pose in particles.star is their mean)."""
    out = {}
    for name, d in datas.items():
        if d.trajectory_angles is None:
            continue
        cols = {}
        for prefix, values in (("D", d.trajectory_shifts), ("Rot", d.trajectory_angles)):
            v = values.cpu().numpy()
            for j, axis in enumerate("XYZ"):
                for s_ in range(v.shape[1]):
                    cols[f"cryopipeTrajectory{prefix}{axis}{s_ + 1}"] = v[:, s_, j]
        out[name] = pandas.DataFrame(cols)
    return out
