"""``cryopipe demo --tomo``: the subtomogram-averaging tutorial path on a simulated C6 lattice, as the commands a
user types, each scored against the simulator's truth.

Steps (each a real ``cryopipe`` command run in a fresh project folder; printed as ``$ cryopipe ...``):

1. ``simulate --what tiltseries --sym C6 --lattice cylinder``: a C6 assembly of 3ENL standing on a cylinder
   (orientations normal to the surface, stored as rlnTomoSubtomogram* priors), RELION 5 files + ``truth/``.
2. ``subtomo`` at the coarse binning (3D pseudo-subtomograms, or 2D stacks with ``stack2d``).
3. ``initialmodel --ios`` in C1 from random blobs: FSC against the truth after rigid alignment.
4. ``align-symmetry --sym C6 --apply_sym``: the C6 axis found (angle to the truth's axis) and applied.
5. ``refine3d --ios --sym C6 --finer_faster``: gold-standard refinement at the coarse binning; FSC vs truth, the
   reported resolution, the median angular error of the poses (after the best global rotation, up to C6).
6. ``star --center --center_Z``: re-centre the particles on the refined map's centre of mass (density above 15 %
   of the maximum: the assembly) along its axis; the particle centres' error against the true centres before and
   after.
7. ``subtomo`` at the finer binning from the re-centred particles.
8. ``reconstruct-particle --sym C6``: the reference at the finer binning from the tilt series (RELION 5 tutorial).
9. ``refine3d --ios --sym C6`` with local searches from the poses of step 5.
10. ``mask-create`` from the refined map; 11. ``postprocess``: masked gold-standard FSC 0.143 vs the truth's
    FSC 0.5 crossing (the claim must not exceed what the map has).

Maps are compared with the truth after rigid alignment (:func:`cryopipe.sim.map_scores.aligned_fsc_summary`: the de
novo frame and hand are arbitrary; where poses exist, the frame rotation they give is tried too, since the rigid
search can settle on a wrong optimum); poses with :func:`cryopipe.tomo.evaluate.pose_errors`. The summary (printed, and
``demo_tomo_summary.json`` in the project) holds every command with its wall time, CPU seconds and peak memory.

Commands run as subprocesses (``python -m cryopipe ...``, what a user types; per-step CPU time and peak RSS from
``os.wait4``) or in-process (``subprocess=False``: the same command-line entry point without the interpreter
start-up, for tests).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess as sp
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cryopipe.errors import CryopipeError

__all__ = ["StaConfig", "Runner", "simulate_lattice", "run_sta_path", "run_demo_tomo", "main_tomo", "print_summary"]

SUMMARY_NAME = "demo_tomo_summary.json"


@dataclass(frozen=True)
class StaConfig:
    """Sizes of the simulated data set and of each step (Å, px at the tilt-series pixel size unless said)."""

    n_tomograms: int = 2
    particles_per_tomogram: int = 40
    angpix: float = 8.0  #: tilt-series pixel size (Å); the C6 assembly (≈190 Å) is a 42³ map at 8 Å
    image_size: tuple[int, int] = (320, 288)
    thickness: float = 640.0  #: slab (Å); the cylinder radius is the largest that fits it
    tilt_step: float = 4.0  #: ±60°, dose-symmetric, 3 e/Å² per tilt
    snr: float = 0.1  #: per tilt image
    lattice: str = "cylinder"
    stack2d: bool = False  #: 2D stacks instead of 3D pseudo-subtomograms
    coarse_bin: int = 2
    coarse_box: int = 24
    coarse_crop: int = 20
    fine_bin: int = 1
    fine_box: int = 40
    fine_crop: int = 32
    diameter: float = 240.0  #: mask diameter (Å)
    initial_iter: int = 15
    refine1_iter: int = 5
    refine2_iter: int = 4
    refine2_healpix: int = 4  #: HEALPix order of the fine refinement's local searches (4: 1.9°)
    refine2_sigma_ang: float = 2.0  #: local searches (σ, degrees) of the fine refinement
    seed: int = 1


class Runner:
    """Runs ``cryopipe`` commands (subprocess or in-process), prints them and records wall time, CPU seconds and
    peak memory of each in ``steps``."""

    def __init__(self, subprocess: bool = True, device: str | None = None):
        self.subprocess = subprocess
        self.device = device
        self.steps: list[dict] = []

    def __call__(self, argv: list[str], device: bool = True) -> dict:
        argv = [str(a) for a in argv] + (["--device", self.device] if device and self.device else [])
        line = "cryopipe " + " ".join(argv)
        print(f"\n$ {line}", flush=True)
        t0 = time.perf_counter()
        if self.subprocess:
            proc = sp.Popen([sys.executable, "-m", "cryopipe", *argv])
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            rc, cpu, rss = proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0
        else:
            from cryopipe.cli import main as cli_main

            c0 = time.process_time()
            saved, sys.argv = sys.argv, ["cryopipe", *argv]  # each job's note.txt records its own command
            try:
                rc = cli_main(argv)
            finally:
                sys.argv = saved
            cpu = time.process_time() - c0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # peak of this process so far
        step = {"command": line, "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(cpu, 2),
                "peak_rss_MB": round(rss, 1), "rc": rc}
        self.steps.append(step)
        if rc != 0:
            raise CryopipeError(f"demo step failed (exit {rc}): {line}")
        return step


# ------------------------------------------------------------------------------------------------ scores


def _map_score(path: Path, truth: Path, sym: str = "C1", poses: dict | None = None) -> dict:
    """:func:`cryopipe.jobs.demo._aligned_fsc_summary`, also trying the frame rotation the particles' ``poses``
    (:func:`_pose_score`) imply."""
    from cryopipe.jobs.demo import _aligned_fsc_summary

    rotations = [poses["frame_rotation"]] if poses and "frame_rotation" in poses else None
    return _aligned_fsc_summary(path, truth, sym, rotations)


def _pose_score(data_star: Path, tomograms_star: Path, truth_star: Path, truth_tomograms: Path, sym: str) -> dict:
    """Median / 90th-percentile angular error (degrees, :func:`~cryopipe.tomo.evaluate.pose_errors`) and median
    distance (Å) of the particle centres (coordinates − A_sub·origins) from the true centres."""
    import torch

    from cryopipe.io.tomo_particles import read_tomo_particles
    from cryopipe.io.tomography import read_tomograms
    from cryopipe.tomo.evaluate import pose_errors

    t_sets = read_tomograms(truth_tomograms)
    truth = read_tomo_particles(truth_star, t_sets)
    sets = read_tomograms(tomograms_star)
    est = read_tomo_particles(data_star, sets)
    index = {n: i for i, n in enumerate(truth.particles["rlnTomoParticleName"])}
    rows = np.array([index[n] for n in est.particles["rlnTomoParticleName"]])
    err, Q = pose_errors(torch.as_tensor(est.orientations()), torch.as_tensor(truth.orientations()[rows]), sym)
    apix = float(sets[sets.names[0]].pixel_size)
    dist = np.linalg.norm(est.positions_px(sets) - truth.positions_px(t_sets)[rows], axis=1) * apix
    return {"angular_error_median_deg": round(float(err.median()), 2),
            "angular_error_p90_deg": round(float(err.quantile(0.9)), 2),
            "position_error_median_A": round(float(np.median(dist)), 2), "n_particles": int(len(rows)),
            "frame_rotation": [[round(float(v), 6) for v in row] for row in Q.tolist()]}


def _refine_score(prefix: Path, truth: Path, sym: str, poses: dict) -> dict:
    from cryopipe.io.star import read_star

    out = _map_score(Path(f"{prefix}_class001.mrc"), truth, sym, poses)
    general = read_star(Path(f"{prefix}_model.star"))["model_general"]
    out["reported_resolution_A"] = round(float(general["rlnCurrentResolution"]), 2)
    return {**out, **poses}


# ------------------------------------------------------------------------------------------------ the path


def simulate_lattice(cfg: StaConfig, run: Runner, job_dir: str = "Simulate/job001/") -> dict:
    """Step 1 (in the current directory): simulate the C6 lattice data set into ``job_dir``; returns its scores
    (particle count, sizes)."""
    from cryopipe.io.mrc import read_mrc
    from cryopipe.io.star import read_star

    run(["simulate", "--what", "tiltseries", "--o", job_dir, "--sym", "C6", "--angpix", cfg.angpix,
         "--n_tomograms", cfg.n_tomograms, "--particles_per_tomogram", cfg.particles_per_tomogram,
         "--lattice", cfg.lattice, "--image_size", *cfg.image_size, "--thickness", cfg.thickness,
         "--tilt_step", cfg.tilt_step, "--snr", cfg.snr, "--seed", cfg.seed])
    truth = Path(job_dir) / "truth" / "truth_map.mrc"
    return {"n_particles": len(read_star(Path(job_dir) / "particles.star")["particles"]),
            "n_tomograms": cfg.n_tomograms, "pixel_size_A": cfg.angpix,
            "truth_box": int(read_mrc(truth)[0].shape[-1]), "snr_per_tilt": cfg.snr}


def run_sta_path(cfg: StaConfig, run: Runner, sim: str = "Simulate/job001/", job0: int = 2) -> dict:
    """Steps 2-11 (module docstring) in the current directory (a project) on the simulation in ``sim``; returns
    the scores. Job folders are numbered from ``job0`` (one per command, as the pipeline would)."""
    import torch

    from cryopipe.core.symmetry_align import centre_of_mass
    from cryopipe.io.mrc import read_mrc
    from cryopipe.io.star import read_star

    n = [job0]

    def job(kind: str) -> str:
        name = f"{kind}/job{n[0]:03d}/"
        n[0] += 1
        return name

    s: dict = {"config": asdict(cfg)}
    form = ["--stack2d"] if cfg.stack2d else []
    diam = str(cfg.diameter)
    truth = Path(sim) / "truth" / "truth_map.mrc"
    truth_parts, truth_tomos = Path(sim) / "truth" / "particles.star", Path(sim) / "truth" / "tomograms.star"
    tomos = Path(sim) / "tomograms.star"

    def poses(data_star: Path) -> dict:
        return _pose_score(data_star, tomos, truth_parts, truth_tomos, "C6")

    # 2. coarse pseudo-subtomograms
    sub1 = job("PseudoSubtomo")
    run(["subtomo", "--i", f"{sim}optimisation_set.star", "--o", sub1, "--b", cfg.coarse_box, "--crop",
         cfg.coarse_crop, "--bin", cfg.coarse_bin] + form)
    s["subtomo_coarse"] = {"n_particles": len(read_star(Path(sub1) / "particles.star")["particles"]),
                           "binning": cfg.coarse_bin, "box": cfg.coarse_crop,
                           "pixel_size_A": cfg.angpix * cfg.coarse_bin}
    # 3. de novo initial model in C1
    ini = job("InitialModel")
    run(["initialmodel", "--ios", f"{sub1}optimisation_set.star", "--o", f"{ini}run", "--iter", cfg.initial_iter,
         "--particle_diameter", diam, "--healpix_order", "1", "--offset_range", "2", "--offset_step", "1",
         "--random_seed", cfg.seed])
    s["initialmodel"] = {"blobs": _map_score(Path(ini) / "run_it000_class001.mrc", truth),
                         **_map_score(Path(ini) / "initial_model.mrc", truth)}
    # 4. C6 found and applied
    c6 = f"{ini}initial_model_C6.mrc"
    run(["align-symmetry", "--i", f"{ini}initial_model.mrc", "--o", c6, "--sym", "C6", "--apply_sym"])
    s["align_symmetry"] = _map_score(Path(c6), truth, "C6")
    # 5. gold-standard refinement at the coarse binning
    ref1 = job("Refine3D")
    run(["refine3d", "--ios", f"{ini}run_optimisation_set.star", "--ref", c6, "--o", f"{ref1}run", "--sym", "C6",
         "--iter", cfg.refine1_iter, "--healpix_order", "2", "--auto_local_healpix_order", "3", "--offset_range", "2",
         "--offset_step", "1", "--particle_diameter", diam, "--ini_high", "40", "--finer_faster", "--random_seed",
         cfg.seed])
    s["refine3d_coarse"] = _refine_score(Path(ref1) / "run", truth, "C6", poses(Path(ref1) / "run_data.star"))
    # 6. re-centre on the refined map's centre of mass along the symmetry axis
    vol = torch.from_numpy(read_mrc(Path(ref1) / "run_class001.mrc")[0])
    com = [float(c) for c in centre_of_mass((vol - 0.15 * vol.max()).clamp_min(0))]  # density above 15 % of max
    rec = job("Recenter")
    Path(rec).mkdir(parents=True, exist_ok=True)
    run(["star", "--i", f"{ref1}run_data.star", "--o", f"{rec}particles.star", "--center", "--center_Z",
         f"{com[2]:.3f}"], device=False)
    after = poses(Path(rec) / "particles.star")
    s["recenter"] = {"centre_of_mass_px": [round(c, 3) for c in com], "center_Z_px": round(com[2], 3),
                     "position_error_median_A_before": s["refine3d_coarse"]["position_error_median_A"],
                     "position_error_median_A_after": after["position_error_median_A"]}
    # 7. finer pseudo-subtomograms of the re-centred particles
    sub2 = job("PseudoSubtomo")
    run(["subtomo", "--p", f"{rec}particles.star", "--t", tomos, "--o", sub2, "--b", cfg.fine_box, "--crop",
         cfg.fine_crop, "--bin", cfg.fine_bin] + form)
    # 8. the reference at the finer binning, from the tilt series at the refined poses
    rp = job("ReconstructParticleTomo")
    run(["reconstruct-particle", "--i", f"{sub2}optimisation_set.star", "--o", rp, "--b", cfg.fine_box, "--crop",
         cfg.fine_crop, "--bin", cfg.fine_bin, "--sym", "C6"])
    s["reconstruct_particle"] = _map_score(Path(rp) / "merged.mrc", truth, "C6", after)
    # 9. refinement at the finer binning (local searches)
    ref2 = job("Refine3D")
    fine_apix = cfg.angpix * cfg.fine_bin
    run(["refine3d", "--ios", f"{sub2}optimisation_set.star", "--ref", f"{rp}merged.mrc", "--o", f"{ref2}run",
         "--sym", "C6", "--iter", cfg.refine2_iter, "--healpix_order", cfg.refine2_healpix, "--sigma_ang",
         cfg.refine2_sigma_ang,
         "--offset_range", "2", "--offset_step", "1", "--particle_diameter", diam,
         "--ini_high", f"{max(2.5 * fine_apix, s['refine3d_coarse']['reported_resolution_A']):.1f}",
         "--random_seed", cfg.seed])
    fine_poses = poses(Path(ref2) / "run_data.star")
    s["refine3d_fine"] = _refine_score(Path(ref2) / "run", truth, "C6", fine_poses)
    # 10-11. mask and post-processing
    vol, _ = read_mrc(Path(ref2) / "run_class001.mrc")
    mask = job("MaskCreate")
    run(["mask-create", "--i", f"{ref2}run_class001.mrc", "--o", mask, "--lowpass", f"{3 * fine_apix:g}",
         "--ini_threshold", f"{0.15 * float(vol.max()):.6g}", "--extend_inimask", "2", "--width_soft_edge", "4"])
    pp = job("PostProcess")
    run(["postprocess", "--i", f"{ref2}run_half1_class001_unfil.mrc", "--mask", f"{mask}mask.mrc", "--o", pp,
         "--auto_bfac", "--autob_lowres", f"{4 * fine_apix:g}"])
    general = read_star(Path(pp) / "postprocess.star")["general"]
    final = float(general["rlnFinalResolution"])
    truth_fsc = _map_score(Path(pp) / "postprocess_masked.mrc", truth, "C6", fine_poses)
    s["postprocess"] = {"resolution_0.143_A": round(final, 2), **truth_fsc,
                        "gold_standard_vs_truth_0.5": round(final / truth_fsc["fsc_truth_0.5_A"], 3),
                        "final_pixel_size_A": fine_apix,
                        "fsc_truth_0.5_in_final_pixels": round(truth_fsc["fsc_truth_0.5_A"] / fine_apix, 2)}
    return s


def run_demo_tomo(out_dir: str | os.PathLike = "cryopipe_demo_tomo", cfg: StaConfig = StaConfig(), *,
                  subprocess: bool = True, device: str | None = None, keep: bool = False) -> dict:
    """Run the tutorial's path (module docstring) in a fresh project ``out_dir``; writes and returns the summary."""
    from cryopipe.io.atomic import atomic_path
    from cryopipe.jobs.demo import _chdir, fresh_demo_project

    root = Path(out_dir).resolve()
    fresh_demo_project(root, keep)
    run = Runner(subprocess=subprocess, device=device)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    with _chdir(root):
        summary = {"project": str(root), "simulate": simulate_lattice(cfg, run)}
        summary.update(run_sta_path(cfg, run))
    summary["steps"] = run.steps
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary["total_cpu_seconds"] = round(_cpu_seconds() - c0, 1)
    with atomic_path(root / SUMMARY_NAME) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    return summary


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main_tomo(args) -> int:
    """``cryopipe demo --tomo``: :class:`StaConfig` with ``--n_tomograms``, ``--particles_per_tomogram``, ``--seed``
    (demo's defaults 2, 40, 1), run, print the summary."""
    cfg = StaConfig(n_tomograms=args.n_tomograms, particles_per_tomogram=args.particles_per_tomogram, seed=args.seed)
    print_summary(run_demo_tomo(args.output, cfg, device=args.device, keep=args.keep))
    return 0


def print_summary(s: dict) -> None:
    sim, ini, al, r1, rc, rp, r2, pp = (s[k] for k in ("simulate", "initialmodel", "align_symmetry",
                                                         "refine3d_coarse", "recenter", "reconstruct_particle",
                                                         "refine3d_fine", "postprocess"))
    c = s["config"]
    print("\n================ cryopipe demo --tomo: subtomogram averaging of a C6 lattice ================")
    print(f"project: {s['project']}")
    print(f"simulate      {sim['n_particles']} particles (C6 assembly of 3ENL on a {c['lattice']}) in "
          f"{sim['n_tomograms']} tilt series, {sim['pixel_size_A']} Å/px, SNR {sim['snr_per_tilt']} per tilt")
    print(f"initialmodel  (C1, from blobs at FSC 0.5 {ini['blobs']['fsc_truth_0.5_A']} Å): FSC vs truth 0.5 at "
          f"{ini['fsc_truth_0.5_A']} Å ({ini['pixel_size_A']} Å/px){', hand flipped' if ini['hand_flipped'] else ''}")
    print(f"align-symmetry C6 axis within {al['symmetry_axes_error_deg']}° of the truth's; symmetrised map FSC 0.5 at "
          f"{al['fsc_truth_0.5_A']} Å")
    for name, r in (("refine3d bin %d" % c["coarse_bin"], r1), ("refine3d bin %d" % c["fine_bin"], r2)):
        print(f"{name:13s} gold-standard {r['reported_resolution_A']} Å; FSC vs truth 0.5 at "
              f"{r['fsc_truth_0.5_A']} Å "
              f"({r['pixel_size_A']} Å/px); C6 axis {r.get('symmetry_axes_error_deg')}°; angular error median "
              f"{r['angular_error_median_deg']}° (90 % {r['angular_error_p90_deg']}°); centres "
              f"{r['position_error_median_A']} Å")
        if r is r1:
            print(f"star --center --center_Z {rc['center_Z_px']}: particle centres "
                  f"{rc['position_error_median_A_before']}"
                  f" -> {rc['position_error_median_A_after']} Å from the truth (median)")
            print(f"reconstruct-particle bin {c['fine_bin']} (reference): FSC vs truth 0.5 at "
                  f"{rp['fsc_truth_0.5_A']} Å")
    print(f"postprocess   masked gold-standard 0.143 at {pp['resolution_0.143_A']} Å; masked map vs truth 0.5 at "
          f"{pp['fsc_truth_0.5_A']} Å = {pp['fsc_truth_0.5_in_final_pixels']} × the final pixel "
          f"(claim/truth {pp['gold_standard_vs_truth_0.5']})")
    for st in s["steps"]:
        print(f"  {st['seconds']:7.1f} s {st['cpu_seconds']:7.1f} CPU-s {st['peak_rss_MB']:7.0f} MB  {st['command']}")
    print(f"total {s['total_seconds']:.1f} s ({s['total_cpu_seconds']:.1f} CPU-s); summary in "
          f"{s['project']}/{SUMMARY_NAME}")
