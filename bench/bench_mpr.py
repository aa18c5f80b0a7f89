"""Multi-particle refinement (issue 13) on simulated tilt series of the shipped structure (3ENL) with injected errors.

Data: ``--n_tomograms`` tilt series of ``--particles`` particles at ``--apix`` Å (21 tilts ±60°, dose-symmetric, SNR
``--snr``), metadata with per-tilt shift errors (sd 4 Å), stage-angle errors (sd 0.5° on each of X/Y/Z), per-tilt
defocus errors (sd 500 Å) and particle pose errors (4 Å, 3°); no image warp. Half-maps are reconstructed at the
perturbed metadata (as a user would have them), then

* A: ``poses,shifts,stageangles`` × 2 sub-iterations, ``--rounds`` rounds (``MprOptions.rounds``: before each
  later round the half-maps are reconstructed at the refined metadata and become the references, and the
  refinement limit follows their masked FSC — running M again and again); L-BFGS ``--lbfgs`` iterations, no
  early stop;
* then from A, against A's half-maps, one more round of either geometry only (C: ``poses,shifts,stageangles`` × 2)
  or geometry + CTF (B: ``poses,shifts,stageangles,ctf`` × 2, M's per-tilt defocus grid search over
  ±``--defocus_search`` Å first), the same number of sub-iterations.

Reported: per-group RMS error vs the truth before/after (particle positions with their mean removed — the gauge a
half-map reconstruction cannot fix —, particle angles, tilt shifts, stage angles, defocus), masked gold-standard FSC
resolution and FSC(truth) (merged map vs the truth map, 0.5) before / after A / after B / at the true metadata,
particle-tilt evaluations per second and seconds (wall and CPU) per sub-iteration. Writes bench/results/mpr_cpu.json
(``--key``: as one entry of its ``runs``, earlier runs kept). Particle errors are also given with each half-map's own
frame removed (:func:`half_frame_errors`). ``--pose_rounds K`` adds run P: from A, K rounds of ``poses`` alone.

Results (mpr_cpu.json ``runs``; targets particle angles ≤ 1.2°, defocus ≤ 150 Å; 1 torch thread, load 6–16):
2 × 12 particles: angles 2.46 -> 1.47° (1.29° half frames removed), defocus 438 -> 325 Å, FSC(truth) 24 -> 12 Å
(true metadata 9 Å), 27 CPU-s; 2 × 48: FSC(truth) 18 -> 8.5 Å = the true metadata's, tilt shifts 5.4 -> 0.51 Å,
stage angles 0.86 -> 0.22°, defocus 499 -> 220 Å (173 Å over the lowest-dose half of the tilts), but angles only
3.0 -> 2.16°; P (2 rounds of poses alone after A): 1.25° (1.16° half frames removed); 4 × 40: angles 3.2 -> 2.07°,
with P 1.08° (the angle target met), defocus 509 -> 217 Å (141 Å lowest-dose half; the defocus target not met).
These ran the stages' groups in one L-BFGS (now ``--joint``). With the default block-coordinate form
(``MprOptions.alternate``: per-tilt groups, then poses; run ``alternate_2x48``, code 4d40b9c, 256 CPU-s at load 5):
2 × 48 angles 3.0 -> 1.50° after A, 1.49° after B (joint 2.31 / 2.16°), positions 1.78 Å (joint 2.31), tilt shifts
0.49 Å (0.52), defocus 218 Å (220), stage angles 0.25° (joint 0.22°: slightly worse).
With 2 torch threads on the shared cores the same 2 × 12 run took 358 CPU-s (load 19; probably threads spinning):
use ``--threads 1`` under load.

``--imagewarp``: instead, one tilt series of 20 particles whose images carry a smooth per-tilt warp (RMS 8 Å, the
simulator's quadratic terms; metadata otherwise true), half-maps from the unwarped metadata, ``imagewarp`` (3×3
cubic B-spline grid per tilt) × 3 sub-iterations at 10 Å: RMS of (true − refined) displacement over all
particle-tilt pairs before/after. Writes bench/results/mpr_imagewarp_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cryopipe.core.fsc import fsc, resolution_at
from cryopipe.core.geometry import angular_distance
from cryopipe.core.masks import soft_spherical_mask
from cryopipe.io.tomo_particles import read_tomo_particles
from cryopipe.io.tomography import read_tomograms
from cryopipe.mpr.driver import MprOptions, Stage, prepare_tilt_series, run_mpr, updated_particles, updated_tomograms
from cryopipe.mpr.reconstruct import reconstruct_halves
from cryopipe.tomo.particle_sets import particles_per_tilt_series

OUT = Path(__file__).parent / "results"


def errors(datas, ttomos, tparts) -> dict:
    pos_t, A_t, names = tparts.positions_px(ttomos), tparts.orientations(), tparts.tomo_names
    acc = {k: [] for k in ("positions_A", "angles_deg", "angles_common_rotation_removed_deg", "tilt_shifts_A",
                           "stage_angles_deg", "defocus_A", "defocus_lowest_dose_half_A")}
    for name, d in datas.items():
        rows = names == name
        ts = ttomos[name]
        dp = (d.positions.cpu().numpy() - pos_t[rows]) * d.pixel_size
        acc["positions_A"].append(((dp - dp.mean(0)) ** 2).sum(1))
        acc["angles_deg"].append(angular_distance(d.orientations.cpu(), torch.from_numpy(A_t[rows])).numpy() ** 2)
        # the maps' own frame may be rotated by the mean pose error: remove the mean relative rotation too
        E = torch.from_numpy(np.swapaxes(A_t[rows], 1, 2)) @ d.orientations.cpu()
        acc["angles_common_rotation_removed_deg"].append(angular_distance(E, mean_rotation(E).expand_as(E)).numpy()
                                                         ** 2)
        sh = d.shifts.cpu().numpy() - ts.shifts_angst()
        acc["tilt_shifts_A"].append((sh ** 2).sum(1))
        acc["stage_angles_deg"].append(((d.angles.cpu().numpy() - ts.tilt_angles()) ** 2).sum(1))
        dz = (d.defocus.cpu().numpy()[:, :2].mean(1) - ts.defocus()[:, :2].mean(1)) ** 2
        acc["defocus_A"].append(dz)
        acc["defocus_lowest_dose_half_A"].append(dz[np.argsort(ts.pre_exposure(), kind="stable")[:(len(dz) + 1) // 2]])
    return {**{k: float(np.sqrt(np.concatenate(v).mean())) for k, v in acc.items()},
            **half_frame_errors(datas, tparts, ttomos)}


def mean_rotation(E: torch.Tensor) -> torch.Tensor:
    """The rotation ``[3, 3]`` closest to the mean of the rotations ``E`` ``[N, 3, 3]`` (SVD projection)."""
    U, _, Vh = torch.linalg.svd(E.sum(0))
    return U @ torch.diag(torch.tensor([1.0, 1.0, float(torch.linalg.det(U @ Vh))], dtype=U.dtype)) @ Vh


def half_frame_errors(datas, tparts, ttomos) -> dict:
    """Particle errors with each half-map's own frame removed: a rotation ``Q_h`` and shift ``δ_h`` of half-map
    ``h`` with ``A_n → A_n·Q_h`` and ``p_n → p_n + A_n·δ_h`` for its particles change no projection (a gauge that
    no refinement can fix; the halves' frames differ by their particles' mean start errors). RMS over all
    particles of the angle to ``A_true·Q_h`` (``Q_h`` the mean rotation of the half) and of the position error
    left after a least-squares fit of ``a_tomogram + A_true,n·δ_h`` (the per-tomogram mean is the gauge of
    :func:`errors`' ``positions_A``)."""
    pos_t, A_t, names = tparts.positions_px(ttomos), tparts.orientations(), tparts.tomo_names
    dps, Es, Ats, tomo, half = [], [], [], [], []
    for t, (name, d) in enumerate(datas.items()):
        rows = names == name
        dps.append((d.positions.cpu().numpy() - pos_t[rows]) * d.pixel_size)
        Ats.append(A_t[rows])
        Es.append(torch.from_numpy(np.swapaxes(A_t[rows], 1, 2)) @ d.orientations.cpu())
        tomo.append(np.full(int(rows.sum()), t))
        half.append(d.half_sets.cpu().numpy().astype(int) - 1)
    dp, E, At = np.concatenate(dps), torch.cat(Es), np.concatenate(Ats)
    tomo, half = np.concatenate(tomo), np.concatenate(half)
    angles = np.zeros(len(dp))
    for h in np.unique(half):
        sel = torch.from_numpy(half == h)
        angles[sel.numpy()] = angular_distance(E[sel], mean_rotation(E[sel]).expand_as(E[sel])).numpy()
    n_t = int(tomo.max()) + 1
    design = np.zeros((len(dp), 3, 3 * (n_t + 2)))
    for n in range(len(dp)):
        design[n, :, 3 * tomo[n]:3 * tomo[n] + 3] = np.eye(3)
        design[n, :, 3 * (n_t + half[n]):3 * (n_t + half[n]) + 3] = At[n]
    design = design.reshape(-1, 3 * (n_t + 2))
    fit, *_ = np.linalg.lstsq(design, dp.reshape(-1), rcond=None)
    left = (dp.reshape(-1) - design @ fit).reshape(-1, 3)
    dist = np.sqrt((left ** 2).sum(1))
    return {"angles_half_frames_removed_deg": float(np.sqrt((angles ** 2).mean())),
            "positions_half_frames_removed_A": float(np.sqrt((dist ** 2).mean())),
            "angles_half_frames_removed_median_deg": float(np.median(angles)),
            "angles_half_frames_removed_p90_deg": float(np.percentile(angles, 90)),
            "positions_half_frames_removed_median_A": float(np.median(dist))}


def fsc_truth(h1, h2, truth, apix) -> float:
    m = soft_spherical_mask(truth.shape[-1], truth.shape[-1] / 2 - 3, 3).float()
    return resolution_at(fsc(0.5 * (h1 + h2) * m, truth * m), 0.5, apix, truth.shape[-1])


def imagewarp_run(threads: int, out: str) -> None:
    from cryopipe.jobs.simulate import build_volume
    from cryopipe.mpr.driver import make_species, species_mask
    from cryopipe.mpr.forward import bake, pair_geometry
    from cryopipe.mpr.optimise import refine_tilt_series
    from cryopipe.mpr.parameters import TiltSeriesParameters
    from cryopipe.sim.tiltseries import Perturbations, simulate_tilt_series
    from cryopipe.sim.tiltseries_geometry import warp_basis

    t_all, c_all = time.perf_counter(), time.process_time()
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="bench_mpr_warp_"))
    try:
        vol, apix = build_volume("3enl", None, 4.0)
        box = int(vol.shape[-1])
        simulate_tilt_series(vol, apix, "simw", n_tomograms=1, particles_per_tomogram=20, image_size=(320, 288),
                             thickness_A=400.0, tilt_step=6.0, snr=5.0, device="cpu", seed=7,
                             defocus_range=(20000.0, 30000.0), perturbations=Perturbations(warp_A=8.0))
        tt = read_tomograms("simw/truth/tomograms.star")
        g = next(particles_per_tilt_series(read_tomo_particles("simw/truth/particles.star", tt), tt))
        ts = g.tilt_series
        coef = np.stack([np.stack([ts.tilts[f"cryopipeWarp{a}{k + 1}"].to_numpy() for k in range(3)], -1)
                         for a in "XY"], 1)
        grid = (3, 3)
        data = prepare_tilt_series(ts, g.positions_px, g.orientations, g.half_sets, box, 1.0, warp_grid=grid)
        n, f = data.pairs.unbind(-1)
        zero = TiltSeriesParameters.zeros(len(data.positions), len(data.angles), grid)
        xy0 = pair_geometry(data, zero, n, f).xy
        truth_d = torch.einsum("pk,pdk->pd", warp_basis(xy0, ts.image_size), torch.from_numpy(coef)[f])
        h1, h2, _ = reconstruct_halves([data], box, 1.0)
        species = make_species(h1, h2, species_mask(None, box, apix, 0.8 * box * apix, 10.0), 1.0)
        rms = [float(torch.sqrt((truth_d ** 2).sum(1).mean()))]
        subs = []
        for _ in range(3):
            p = TiltSeriesParameters.zeros(len(data.positions), len(data.angles), grid)
            r = refine_tilt_series(data, species, p, ("imagewarp",), box * apix / 10.0, lbfgs_iterations=15)
            data = bake(data, p, ("imagewarp",))
            est = (pair_geometry(data, zero, n, f).xy - xy0) * apix
            rms.append(float(torch.sqrt(((truth_d - est) ** 2).sum(1).mean())))
            subs.append(vars(r))
        result = {"data": {"apix": apix, "box": box, "particles": 20, "tilts": 21, "snr": 5.0, "warp_rms_A": 8.0,
                           "grid": grid, "pairs": len(data.pairs)},
                  "warp_error_rms_A_per_subiteration": rms, "subiterations": subs, "threads": threads,
                  "total_wall_s": time.perf_counter() - t_all, "total_cpu_s": time.process_time() - c_all}
    finally:
        os.chdir(cwd)
    Path(out).write_text(json.dumps(result, indent=1))
    print("image warp RMS error (Å) before and after each sub-iteration:", [round(v, 3) for v in rms])


def simulated_set(args):
    """The simulated tilt series of the module docstring, written under ./sim: ``(apix, box, injected
    perturbations, truth map, tomograms, particles, true tomograms, true particles)``."""
    from cryopipe.jobs.simulate import build_volume
    from cryopipe.sim.tiltseries import Perturbations, simulate_tilt_series

    vol, apix = build_volume("3enl", None, args.apix)
    pert = Perturbations(tilt_shift_A=4.0, tilt_angle_deg=0.5, defocus_A=500.0, particle_shift_A=4.0,
                         particle_angle_deg=3.0)
    simulate_tilt_series(vol, apix, "sim", n_tomograms=args.n_tomograms, particles_per_tomogram=args.particles,
                         image_size=(320, 288), thickness_A=400.0, tilt_step=6.0, snr=args.snr, device="cpu",
                         seed=5, defocus_range=(20000.0, 30000.0), perturbations=pert)
    tomos, ttomos = read_tomograms("sim/tomograms.star"), read_tomograms("sim/truth/tomograms.star")
    return (apix, int(vol.shape[-1]), pert, torch.as_tensor(np.asarray(vol, dtype=np.float32)), tomos,
            read_tomo_particles("sim/particles.star", tomos), ttomos,
            read_tomo_particles("sim/truth/particles.star", ttomos))


def self_reference_run(args) -> dict:
    """How much a particle's own image in its half-map holds its pose back. The same data, the tilt metadata set
    to the truth and only the particle poses perturbed (3°, 4 Å); ``poses`` alone refined for ``--rounds`` rounds
    of 2 sub-iterations (limit ramp 80 → 100 % of the references' masked FSC resolution, as run_mpr), with the
    references (``--variants``):

    * ``own``: gold standard as in M, each particle against its own half-map, reconstructed at the current poses
      before each round (so it holds the particle's image at its current, wrong pose);
    * ``other``: the same maps, each particle against the *other* half-map (same resolution, no trace of the
      particle: the gold standard broken on purpose, a diagnostic only);
    * ``truth_other``: fixed half-maps reconstructed at the true metadata, the other half (the best independent
      reference these particles can give: the floor set by the particle's own noise);
    * ``truth_map``: the simulated map itself for both halves (noise-free, Nyquist: what is left is the particle's
      own noise, its neighbours in the box and any mismatch between simulator and forward model);
    * ``own_fsc_weighted`` (``other_fsc_weighted``): the half-maps times ``sqrt(2·FSC/(1+FSC))`` of their masked
      FSC per shell (the references' noise weighted down, as RELION's postprocess weighting);
    * ``own_limit_nyquist``: ``own`` with the limit at Nyquist instead of the FSC resolution;
    * ``own_lbfgs24``: ``own`` with twice the L-BFGS iterations.

    Reported per variant and round: particle angle RMS error (also with the common rotation removed) and position
    RMS error (mean removed) vs the truth, the references' masked FSC, CPU seconds."""
    from cryopipe.core.fourier import irfft3_centered, rfft3_centered
    from cryopipe.core.postprocess import fsc_weights
    from cryopipe.mpr.driver import make_species, masked_fsc, species_mask
    from cryopipe.mpr.forward import bake, zero_parameters
    from cryopipe.mpr.optimise import refine_tilt_series

    t_all, c_all, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="bench_mpr_selfref_"))
    try:
        apix, box, pert, truth, tomos, parts, ttomos, tparts = simulated_set(args)
        # the perturbed particles placed in the true tilt series: only the poses are wrong
        start_parts = read_tomo_particles("sim/particles.star", ttomos)

        def datas_of(p):
            return {g.tilt_series.name: prepare_tilt_series(g.tilt_series, g.positions_px, g.orientations,
                                                            g.half_sets, box, 1.0)
                    for g in particles_per_tilt_series(p, ttomos)}

        ht1, ht2, _ = reconstruct_halves(datas_of(tparts).values(), box, 1.0)
        mask = species_mask(None, box, apix, 0.8 * box * apix, 10.0)
        variants = {}
        for variant in args.variants.split(","):
            c0 = time.process_time()
            datas = datas_of(start_parts)
            rows = []

            def record(fsc_res):
                e = errors(datas, ttomos, tparts)
                rows.append({"angles_deg": e["angles_deg"], "angles_common_rotation_removed_deg":
                             e["angles_common_rotation_removed_deg"], "positions_A": e["positions_A"],
                             "angles_half_frames_removed_deg": e["angles_half_frames_removed_deg"],
                             "positions_half_frames_removed_A": e["positions_half_frames_removed_A"],
                             "angles_half_frames_removed_median_deg": e["angles_half_frames_removed_median_deg"],
                             "angles_half_frames_removed_p90_deg": e["angles_half_frames_removed_p90_deg"],
                             "reference_masked_fsc_A": fsc_res, "cpu_s": time.process_time() - c0})

            record(None)
            for _ in range(args.rounds):
                h1, h2 = (truth, truth) if variant == "truth_map" else (ht1, ht2) if variant.startswith("truth") \
                    else reconstruct_halves(datas.values(), box, 1.0)[:2]
                curve, res = masked_fsc(h1, h2, mask, apix)
                if "fsc_weighted" in variant:  # each half times sqrt(2·FSC/(1+FSC)) per shell
                    w = fsc_weights(curve, box)
                    h1, h2 = (irfft3_centered(rfft3_centered(h.double()) * w, box).float() for h in (h1, h2))
                if "other" in variant:
                    h1, h2 = h2, h1
                k_full = box // 2 - 1 if variant.endswith("nyquist") else min(box * apix / res, box // 2 - 1)
                species = make_species(h1, h2, mask, 1.0)
                for it in range(2):
                    k_max = max(2.5, (0.8 + 0.2 * it) * k_full)
                    for name, d in datas.items():
                        params = zero_parameters(d)
                        refine_tilt_series(d, species, params, ("poses",), k_max, batch_pairs=256,
                                           lbfgs_iterations=2 * args.lbfgs if variant.endswith("lbfgs24")
                                           else args.lbfgs)
                        datas[name] = bake(d, params, ("poses",))
                record(res)
                print(variant, rows[-1], flush=True)
            variants[variant] = rows
        result = {"data": {"structure": "3enl", "apix": apix, "box": box, "n_tomograms": args.n_tomograms,
                           "particles_per_tomogram": args.particles, "snr": args.snr,
                           "injected": "particle poses only (3 deg, 4 A); tilt metadata true"},
                  "schedule": f"poses x 2 sub-iterations (limit 80 -> 100 % of the references' masked FSC), "
                              f"{args.rounds} rounds, references re-made before each round; L-BFGS {args.lbfgs}",
                  "variants": variants, "doc": self_reference_run.__doc__,
                  "total_wall_s": time.perf_counter() - t_all, "total_cpu_s": time.process_time() - c_all,
                  "load_avg_start": load_start, "load_avg": os.getloadavg()[0],
                  "command": "bench/bench_mpr.py " + " ".join(sys.argv[1:])}
    finally:
        os.chdir(cwd)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--apix", type=float, default=4.0)
    ap.add_argument("--n_tomograms", type=int, default=2)
    ap.add_argument("--particles", type=int, default=12)
    ap.add_argument("--snr", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of run A")
    ap.add_argument("--lbfgs", type=int, default=12, help="L-BFGS iterations per sub-iteration")
    ap.add_argument("--defocus_search", type=float, default=1000.0, help="± defocus grid of run B (Å; 0: off)")
    ap.add_argument("--imagewarp", action="store_true", help="the image-warp recovery run instead (module doc)")
    ap.add_argument("--pose_rounds", type=int, default=0, help="also run P: from A, this many rounds of poses "
                    "alone (reported as after_poses_only_P)")
    ap.add_argument("--self_reference", action="store_true", help="the self-reference diagnostic instead "
                    "(self_reference_run); written under runs[KEY or 'self_reference']")
    ap.add_argument("--variants", default="own,other,truth_other,own_limit_nyquist",
                    help="--self_reference: references to compare (self_reference_run)")
    ap.add_argument("--joint", action="store_true", help="all groups of a stage in one L-BFGS (before issue 13's "
                    "fix; default: particle groups and the others in turn, MprOptions.alternate)")
    ap.add_argument("--key", default=None, help="add this run under runs[KEY] of the existing --out JSON (earlier "
                    "runs kept) instead of overwriting it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.imagewarp:
        imagewarp_run(args.threads, args.out or str(OUT / "mpr_imagewarp_cpu.json"))
        return
    args.out = args.out or str(OUT / "mpr_cpu.json")
    if args.self_reference:
        write_result(args.out, self_reference_run(args), args.key or "self_reference")
        return
    t_all, c_all, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_mpr_"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        apix, box, pert, truth, tomos, parts, ttomos, tparts = simulated_set(args)

        def datas_of(p, t):
            return {g.tilt_series.name: prepare_tilt_series(g.tilt_series, g.positions_px, g.orientations,
                                                            g.half_sets, box, 1.0)
                    for g in particles_per_tilt_series(p, t)}

        d0 = datas_of(parts, tomos)
        h1, h2, _ = reconstruct_halves(d0.values(), box, 1.0)
        ht1, ht2, _ = reconstruct_halves(datas_of(tparts, ttomos).values(), box, 1.0)
        diameter = 0.8 * box * apix
        common = dict(resolution_A=0.0, lbfgs_iterations=args.lbfgs, tolerance=0.0, batch_pairs=256,
                      alternate=not args.joint)
        def geometry(p, t, h1_, h2_, stages, **kw):
            return run_mpr(p, t, h1_, h2_, apix, None, diameter, MprOptions(stages=stages, **{**common, **kw}))

        geo = ("poses", "shifts", "stageangles")
        t_run = time.perf_counter()
        # A: M run again and again: each round against half-maps reconstructed at the previous round's metadata
        a = geometry(parts, tomos, h1, h2, [Stage(geo, 2)], rounds=args.rounds)
        pa, ta = updated_particles(parts, tomos, a.data), updated_tomograms(tomos, a.data)
        tA = time.perf_counter() - t_run
        t_run = time.perf_counter()
        c = geometry(pa, ta, a.half1, a.half2, [Stage(geo, 2)])  # C: one more geometry-only round
        tC = time.perf_counter() - t_run
        t_run = time.perf_counter()
        b = geometry(pa, ta, a.half1, a.half2, [Stage(geo + ("ctf",), 2)], ctf_minresolution=30.0,
                     defocus_search_A=args.defocus_search)  # B: the same round with the CTF (defocus search first)
        tB = time.perf_counter() - t_run
        extra = {}
        if args.pose_rounds:  # P: from A, rounds of poses alone (the particle parameters without the tilt groups)
            pp = geometry(pa, ta, a.half1, a.half2, [Stage(("poses",), 2)], rounds=args.pose_rounds)
            extra = {"errors": errors(pp.data, ttomos, tparts), "masked_fsc_A": pp.resolution_after,
                     "fsc_truth_A": fsc_truth(pp.half1, pp.half2, truth, apix),
                     "schedule": f"A's result + poses x 2 sub-iterations, {args.pose_rounds} rounds"}
        subs = a.stats + c.stats + b.stats
        pe = sum(s["pair_evaluations"] for s in subs)
        sec = sum(s["seconds"] for s in subs)
        cpu = sum(s["cpu_seconds"] for s in subs)
        result = {
            "data": {"structure": "3enl", "apix": apix, "box": box, "n_tomograms": args.n_tomograms,
                     "particles_per_tomogram": args.particles, "tilts": 21, "snr": args.snr,
                     "pairs": sum(len(d.pairs) for d in d0.values()), "injected": vars(pert)},
            "residual_error_rms": {"before": errors(d0, ttomos, tparts), "after_A": errors(a.data, ttomos, tparts),
                                                                      "after_geometry_C": errors(c.data, ttomos, tparts),
                                   "after_geometry_ctf_B": errors(b.data, ttomos, tparts)},
            "masked_fsc_resolution_A": {"before": a.resolution_before, "after_A": a.resolution_after,
                                        "after_geometry_C": c.resolution_after,
                                        "after_geometry_ctf_B": b.resolution_after,
                                        "true_metadata": masked_res(ht1, ht2, a.mask, apix)},
            "fsc_truth_0.5_A": {"before": fsc_truth(h1, h2, truth, apix),
                                "after_A": fsc_truth(a.half1, a.half2, truth, apix),
                                "after_geometry_C": fsc_truth(c.half1, c.half2, truth, apix),
                                "after_geometry_ctf_B": fsc_truth(b.half1, b.half2, truth, apix),
                                "true_metadata": fsc_truth(ht1, ht2, truth, apix)},
            "species_resolution_A": a.species_resolution,
            **({"after_poses_only_P": extra} if extra else {}),
            "schedule": {"A": f"stage {','.join(geo)} x 2 sub-iterations, {args.rounds} rounds (references "
                                  "reconstructed at the refined metadata before each later round)",
                         "C": "A's result + 1 round geometry only", "B": f"A's result + 1 round geometry + ctf, "
                         f"defocus search ±{args.defocus_search:g} Å first", "lbfgs_iterations": args.lbfgs,
                         "alternate": not args.joint,
                         "tolerance": 0.0},
            "speed": {"threads": args.threads, "pair_evaluations_per_s": pe / max(sec, 1e-9),
                      "pair_evaluations_per_cpu_s": pe / max(cpu, 1e-9),
                      "seconds_per_subiteration": sec / len(subs), "cpu_seconds_per_subiteration": cpu / len(subs),
                      "run_A_s": tA, "run_C_s": tC, "run_B_s": tB},
            "subiterations": subs,
            "log": a.log + c.log + b.log,
            "total_wall_s": time.perf_counter() - t_all, "total_cpu_s": time.process_time() - c_all,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device": "cpu", "load_avg": os.getloadavg()[0], "load_avg_start": load_start,
            "command": "bench/bench_mpr.py " + " ".join(sys.argv[1:]),
        }
    finally:
        os.chdir(cwd)
    write_result(args.out, result, args.key)
    r = result
    runs = ("before", "after_A", "after_geometry_C", "after_geometry_ctf_B")
    print("residual RMS error vs truth (" + " / ".join(runs) + "):")
    for k in r["residual_error_rms"]["before"]:
        print(f"  {k:36s} " + " / ".join(f"{r['residual_error_rms'][s][k]:.3f}" for s in runs))
    print("masked FSC resolution (Å):", r["masked_fsc_resolution_A"])
    print("FSC(truth) 0.5 (Å):", r["fsc_truth_0.5_A"])
    print("speed:", r["speed"])
    print(f"total {r['total_wall_s']:.0f} s wall, {r['total_cpu_s']:.0f} CPU-s")


def write_result(out: str, result: dict, key: str | None) -> None:
    """Write ``result`` to ``out``; with ``key``, as ``runs[key]`` of the JSON already there (earlier runs kept)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if key:
        whole = json.loads(path.read_text()) if path.exists() else {}
        whole.setdefault("runs", {})[key] = result
        result = whole
    path.write_text(json.dumps(result, indent=1))


def masked_res(h1, h2, mask, apix) -> float:
    return resolution_at(fsc(h1 * mask, h2 * mask), 0.143, apix, h1.shape[-1])


if __name__ == "__main__":
    main()
