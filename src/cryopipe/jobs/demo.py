"""``cryopipe demo``: simulate a small data set in a fresh project folder and run every job that exists.

Every step is a real ``cryopipe`` command (the same code path as the command line), run inside the project so
that ``default_pipeline.star`` records the whole workflow and the project opens in RELION. Each step is scored
against the simulator's ground truth, and a summary (printed, and ``demo_summary.json`` in the project) says
what was done and how well.

Steps so far:
1. ``simulate --what particles``: particle stack of PDB 3ENL (enolase) with CTF and noise, truth angles.
2. ``reconstruct --ctf`` from the true angles: FSC against the truth map (0.5 and 0.143 crossings).
3. ``simulate --what micrographs``: micrographs with particles at known positions, contamination blobs.
4. ``autopick --LoG``: Laplacian-of-Gaussian picking; precision / recall against the true coordinates.
5. ``extract``: boxes of the picks, normalised, contrast inverted.
6. ``class2d``: 2D classification of the LoG-picked particles.
7. ``select --classes --auto --recenter``: automatic class selection; re-centred averages become templates.
8. ``autopick --ref``: template picking with those class averages; precision / recall again (the tutorial's
   templates loop: it should beat LoG).
9. ``extract``: the template-picked particles.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cryopipe.errors import CryopipeError

HELP = "simulate a small data set in a fresh project folder and run every job on it, scored against the truth"


@contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _run(argv: list[str], record: list[dict]) -> float:
    """Run one cryopipe command; raise if it fails. Returns its wall time (s)."""
    from cryopipe.cli import main as cli_main

    print(f"\n$ cryopipe {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = cli_main(argv)
    dt = time.perf_counter() - t0
    record.append({"command": "cryopipe " + " ".join(argv), "seconds": round(dt, 2), "rc": rc})
    if rc != 0:
        raise CryopipeError(f"demo step failed (exit {rc}): cryopipe {' '.join(argv)}")
    return dt


def _fsc_summary(map_path: Path, truth_path: Path) -> dict:
    import torch

    from cryopipe.core.fsc import fsc, resolution_at
    from cryopipe.io.mrc import read_mrc

    rec, apix = read_mrc(map_path)
    truth, _ = read_mrc(truth_path)
    f = fsc(torch.from_numpy(rec), torch.from_numpy(truth))
    n = rec.shape[0]
    return {"pixel_size_A": apix, "box": n, "nyquist_A": 2 * apix,
            "fsc_truth_0.5_A": round(float(resolution_at(f, 0.5, apix, n)), 2),
            "fsc_truth_0.143_A": round(float(resolution_at(f, 0.143, apix, n)), 2)}


def _pick_summary(autopick_dir: Path, sim_dir: Path, diameter_A: float, apix: float) -> dict:
    from cryopipe.io.star import read_star
    from cryopipe.picking.evaluate import PickScore, score_picks

    truth_list = read_star(sim_dir / "coords_truth_list.star")["coordinate_files"]
    picks_list = read_star(autopick_dir / "autopick.star")["coordinate_files"]
    picked = dict(zip(picks_list["rlnMicrographName"], picks_list["rlnMicrographCoordinates"]))
    total = PickScore(0, 0, 0)
    for mic, coord_file in zip(truth_list["rlnMicrographName"], truth_list["rlnMicrographCoordinates"]):
        t = read_star(Path(coord_file))[""]
        truth_xy = t[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
        if mic in picked:
            p = read_star(Path(picked[mic]))[""]
            picks_xy = p[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float) if len(p) else np.zeros((0, 2))
        else:
            picks_xy = np.zeros((0, 2))
        total = total + score_picks(picks_xy, truth_xy, 0.3 * diameter_A / apix)
    return total.as_dict()


def run_demo(out_dir: str | os.PathLike = "cryopipe_demo", *, n_particles: int = 3000, n_micrographs: int = 4,
             device: str | None = None, keep: bool = False, seed: int = 1, class2d_k: int = 6,
             class2d_iter: int = 15) -> dict:
    """Run the demo in a fresh project ``out_dir`` (replaced unless ``keep``) and return the summary."""
    root = Path(out_dir).resolve()
    if root.exists() and not keep:
        if root == Path.cwd().resolve() or root in Path.cwd().resolve().parents:
            raise CryopipeError(f"{root}: refusing to replace the current directory; pass another --o")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    dev = ["--device", device] if device else []
    steps: list[dict] = []
    summary: dict = {"project": str(root)}
    t_start = time.perf_counter()
    diameter = 75.0  # Å, 3ENL
    with _chdir(root):
        # 1-2: particles with known angles -> reconstruction
        apix_p = 1.5
        _run(["simulate", "--what", "particles", "--o", "Simulate/job001/", "--n", str(n_particles), "--box", "64",
              "--angpix", str(apix_p), "--snr", "0.1", "--seed", str(seed)] + dev, steps)
        _run(["reconstruct", "--i", "Simulate/job001/particles_truth.star", "--o", "Reconstruct/job002/", "--ctf"]
             + dev, steps)
        summary["reconstruct"] = {"n_particles": n_particles, "snr": 0.1,
                                  **_fsc_summary(Path("Reconstruct/job002/reconstruct.mrc"),
                                                 Path("Simulate/job001/truth_map.mrc"))}
        # 3-5: micrographs -> LoG picking -> extraction
        apix_m = 3.0
        _run(["simulate", "--what", "micrographs", "--o", "Simulate/job003/", "--n", str(n_micrographs),
              "--angpix", str(apix_m), "--mic_size", "1024", "--n_per_mic", "40", "--snr", "0.5",
              "--n_blobs", "1", "--seed", str(seed + 1)] + dev, steps)
        _run(["autopick", "--i", "Simulate/job003/micrographs.star", "--odir", "AutoPick/job004/", "--LoG",
              "--LoG_diam_min", "60", "--LoG_diam_max", "85", "--shrink", "0", "--lowpass", "20",
              "--LoG_adjust_threshold", "3"] + dev, steps)
        summary["autopick_log"] = _pick_summary(Path("AutoPick/job004"), Path("Simulate/job003"), diameter, apix_m)
        _run(["extract", "--i", "Simulate/job003/micrographs.star", "--coord_list", "AutoPick/job004/autopick.star",
              "--o", "Extract/job005/", "--extract_size", "64", "--norm", "--invert_contrast"] + dev, steps)
        from cryopipe.io.particles import read_particles

        summary["extract"] = {"n_particles": len(read_particles(Path("Extract/job005/particles.star")))}
        # 6-9: the templates loop: 2D classes of the LoG picks -> automatic selection -> template picking
        _run(["class2d", "--i", "Extract/job005/particles.star", "--o", "Class2D/job006/", "--K", str(class2d_k),
              "--iter", str(class2d_iter), "--tau2_fudge", "2", "--particle_diameter", "100", "--ctf", "--zero_mask",
              "--random_seed", str(seed)] + dev, steps)
        last = f"Class2D/job006/run_it{class2d_iter:03d}_optimiser.star"
        _run(["select", "--classes", "--i", last, "--o", "Select/job007/", "--auto", "--recenter"], steps)
        _run(["autopick", "--i", "Simulate/job003/micrographs.star", "--odir", "AutoPick/job008/", "--ref",
              "Select/job007/class_averages.star", "--invert", "--ctf", "--ang", "10", "--lowpass", "20", "--shrink", "0",
              "--particle_diameter", "85", "--threshold", "1.0"] + dev, steps)
        summary["autopick_template"] = _pick_summary(Path("AutoPick/job008"), Path("Simulate/job003"), diameter, apix_m)
        _run(["extract", "--i", "Simulate/job003/micrographs.star", "--coord_list", "AutoPick/job008/autopick.star",
              "--o", "Extract/job009/", "--extract_size", "64", "--norm", "--invert_contrast"] + dev, steps)
        summary["extract_template"] = {"n_particles": len(read_particles(Path("Extract/job009/particles.star")))}
    summary["steps"] = steps
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    from cryopipe.io.atomic import atomic_path

    with atomic_path(root / "demo_summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    return summary


def _print_summary(s: dict) -> None:
    r = s["reconstruct"]
    a = s["autopick_log"]
    print("\n================ cryopipe demo: results ================")
    print(f"project: {s['project']}  (open it in RELION: default_pipeline.star)")
    print(f"reconstruct  {r['n_particles']} particles, SNR {r['snr']}, box {r['box']}, {r['pixel_size_A']} Å/px: "
          f"FSC vs truth = 0.5 at {r['fsc_truth_0.5_A']} Å, 0.143 at {r['fsc_truth_0.143_A']} Å "
          f"(Nyquist {r['nyquist_A']} Å)")
    print(f"autopick LoG precision {a['precision']:.3f}, recall {a['recall']:.3f}, F1 {a['f1']:.3f} "
          f"({a['n_matched']} of {a['n_true']} true particles, {a['n_picks']} picks)")
    print(f"extract      {s['extract']['n_particles']} particles")
    t = s.get("autopick_template")
    if t:
        print(f"templates loop: class2d -> select (auto) -> autopick --ref: precision {t['precision']:.3f}, "
              f"recall {t['recall']:.3f}, F1 {t['f1']:.3f} (LoG F1 {a['f1']:.3f}); "
              f"{s['extract_template']['n_particles']} particles extracted")
    for st in s["steps"]:
        print(f"  {st['seconds']:7.1f} s  {st['command']}")
    print(f"total {s['total_seconds']:.1f} s; summary in {s['project']}/demo_summary.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--o", dest="output", default="cryopipe_demo", help="project folder to create (replaced if it exists)")
    p.add_argument("--n_particles", type=int, default=3000, help="simulated particles for the reconstruction")
    p.add_argument("--n_micrographs", type=int, default=4, help="simulated micrographs for picking")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulated data")
    p.add_argument("--class2d_K", dest="class2d_k", type=int, default=6, help="2D classes in the templates loop")
    p.add_argument("--class2d_iter", type=int, default=15, help="2D classification iterations")
    p.add_argument("--keep", action="store_true", help="do not replace an existing project folder (adds jobs)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    s = run_demo(args.output, n_particles=args.n_particles, n_micrographs=args.n_micrographs, device=args.device,
                 keep=args.keep, seed=args.seed, class2d_k=args.class2d_k, class2d_iter=args.class2d_iter)
    _print_summary(s)
    return 0
