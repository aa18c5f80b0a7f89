"""Benchmark: does our 2D EM follow RELION's from the same state? (issue 11, the emptied class of ``class2d_hard``)

On RELION's ``class2d_hard`` fixture our class2d from its own blob start empties one of 10 classes where RELION 5's
single run (seed 4321) keeps all 10. Two measurements separate "a different algorithm" from "a different start":

1. **Same state, both programs.** RELION 3.1.3 (``relion_refine`` on the PATH; Debian's package, installed with
   ``apt-get install relion``, is not part of ``run.sh setup``) runs
   ``BENCH_ITERS`` iterations of the fixture's command on the same particles (float16 stack converted to float32,
   exact, as RELION 3.1 cannot read MRC mode 12; all particles in one group, so that RELION 3.1's per-group noise
   spectra are one spectrum, as RELION 4/5's per optics group; ``--skip_gridding``, RELION 4/5's default M-step,
   where RELION 3.1 grids iteratively). Our class2d then continues from RELION's own
   iteration-1 files (``--continue run_it001_optimiser.star``) for the same iterations, once with our default
   offset prior and once with ``relion_offset_prior``. Classes keep their identity (both start from RELION's
   iteration-1 references), so the class distributions are compared class by class, iteration by iteration,
   together with the current resolution, image size and ⟨Pmax⟩. RELION's and our seconds per iteration are
   measured in the same run on the same cores.
2. **Different starts, our program.** Our class2d from its own blob start with ``BENCH_SEEDS`` random seeds for
   ``BENCH_ITERS`` iterations: the smallest class per iteration and how many classes end below 0.5 %.

Environment: ``BENCH_ITERS`` (default 5), ``BENCH_SEEDS`` (default ``1,2,3,4,5,6``), ``BENCH_THREADS`` (2),
``BENCH_OUT`` (work folder). Without ``relion_refine`` part 1 is skipped and says so. Writes
``bench/results/class2d_relion_continue.json`` and prints a summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import bench_class2d_hard as hard  # noqa: E402  (the fixture's options and particle list)
from cryopipe.engine.relion_files import read_model_star  # noqa: E402
from cryopipe.io.mrc import read_mrc, write_mrc  # noqa: E402
from cryopipe.io.star import read_star, write_star  # noqa: E402
from cryopipe.jobs.class2d import classify_2d  # noqa: E402

ITERS = int(os.environ.get("BENCH_ITERS", 5))
SEEDS = [int(s) for s in os.environ.get("BENCH_SEEDS", "1,2,3,4,5,6").split(",") if s]
OUT = Path(os.environ.get("BENCH_OUT", "/tmp/cryopipe_bench_class2d_relion_continue"))
RELION_SEED = 4321  # the fixture's run
RELION_ARGS = ["--K", "10", "--tau2_fudge", "2", "--particle_diameter", "150", "--ctf", "--zero_mask",
               "--psi_step", "6", "--offset_range", "5", "--offset_step", "2", "--norm", "--scale", "--pad", "2",
               "--oversampling", "1", "--dont_combine_weights_via_disc", "--pool", "30",
               # RELION 3.1 grids iteratively in the M-step by default; RELION 4/5 (and cryopipe) skip it
               "--skip_gridding"]
EMPTY = 0.005  # a class below 0.5 % of the particles counts as emptied


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _summary(model_star: Path) -> dict:
    m = read_model_star(model_star)
    pdf = m.classes["rlnClassDistribution"].to_numpy(float)
    return dict(resolution_A=round(float(m.general["rlnCurrentResolution"]), 2),
                image_size=int(m.general["rlnCurrentImageSize"]), pmax=round(float(m.general["rlnAveragePmax"]), 4),
                class_distribution=[round(float(x), 4) for x in pdf])


def _relion_input(folder: Path) -> Path:
    """The fixture's particles for RELION 3.1: float32 stack, one group for all particles."""
    d = hard.FIXTURE / "class2d_hard"
    folder.mkdir(parents=True, exist_ok=True)
    stack, apix = read_mrc(d / "particles.mrcs")
    write_mrc(folder / "particles.mrcs", np.asarray(stack, dtype=np.float32), apix)
    blocks = read_star(d / "particles.star")
    parts = blocks["particles"].copy()
    parts["rlnGroupName"] = "all"
    blocks["particles"] = parts
    write_star(folder / "particles.star", blocks)
    return folder / "particles.star"


def run_relion(folder: Path, threads: int) -> dict:
    star = _relion_input(folder)
    out = folder / "out"  # RELION wants an existing output folder
    out.mkdir(exist_ok=True)
    cmd = ["relion_refine", "--i", star.name, "--o", "out/run", "--iter", str(ITERS), "--random_seed", str(RELION_SEED),
           "--j", str(threads)] + RELION_ARGS
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(folder / "relion.log", "w") as log:
        subprocess.run(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    stamps = [(out / f"run_it{i:03d}_model.star").stat().st_mtime for i in range(ITERS + 1)]
    return dict(command=" ".join(cmd), wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
                seconds_per_iteration=[round(b - a, 1) for a, b in zip(stamps[:-1], stamps[1:])],
                per_iteration=[_summary(out / f"run_it{i:03d}_model.star") for i in range(1, ITERS + 1)],
                output=str(out))


def continue_ours(relion_folder: Path, folder: Path, offset_prior: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    stamps = []

    def log(*args) -> None:
        if " ".join(str(a) for a in args).startswith("iteration "):
            stamps.append(time.perf_counter())

    s = dataclasses.replace(hard._settings(ITERS), relion_offset_prior=offset_prior)
    cpu0, t0 = _self_cpu(), time.perf_counter()
    here = Path.cwd()
    os.chdir(relion_folder)  # RELION's file names are relative to its project folder (where it ran)
    try:
        classify_2d(None, folder.resolve() / "run", s, root=relion_folder, log=log,
                    continue_from=Path("out") / "run_it001_optimiser.star",
                    overrides={"n_iter": ITERS, "relion_offset_prior": offset_prior})
    finally:
        os.chdir(here)
    wall, cpu = time.perf_counter() - t0, _self_cpu() - cpu0
    return dict(relion_offset_prior=offset_prior, wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
                seconds_per_iteration=[round(b - a, 1) for a, b in zip([t0] + stamps[:-1], stamps)],
                per_iteration=[_summary(folder / f"run_it{i:03d}_model.star") for i in range(2, ITERS + 1)])


def seed_sweep(folder: Path) -> list[dict]:
    rows = []
    for seed in SEEDS:
        out = folder / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        star = hard._particles(out)
        classify_2d(star, out / "run", dataclasses.replace(hard._settings(ITERS), random_seed=seed), root=out,
                    log=lambda *a: None)
        its = [_summary(out / f"run_it{i:03d}_model.star") for i in range(1, ITERS + 1)]
        rows.append(dict(seed=seed, smallest_class_per_iteration=[min(r["class_distribution"]) for r in its],
                         classes_below_half_percent_at_end=int(sum(x < EMPTY for x in its[-1]["class_distribution"])),
                         final_sorted=sorted(its[-1]["class_distribution"], reverse=True)))
    return rows


def _compare(relion: dict, ours: dict) -> list[dict]:
    rows = []
    for it, (r, o) in enumerate(zip(relion["per_iteration"][1:], ours["per_iteration"]), start=2):
        pr, po = np.asarray(r["class_distribution"]), np.asarray(o["class_distribution"])
        rows.append(dict(iteration=it, max_abs_class_difference=round(float(np.abs(pr - po).max()), 4),
                         relion_smallest=round(float(pr.min()), 4), ours_smallest=round(float(po.min()), 4),
                         relion_below_half_percent=int((pr < EMPTY).sum()), ours_below_half_percent=int((po < EMPTY).sum()),
                         resolution_A=(r["resolution_A"], o["resolution_A"]), image_size=(r["image_size"], o["image_size"]),
                         pmax=(r["pmax"], o["pmax"])))
    return rows


def main() -> None:
    threads = int(os.environ.get("BENCH_THREADS", 2))
    torch.set_num_threads(threads)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    result: dict = dict(fixture=str(hard.FIXTURE / "class2d_hard"), iterations=ITERS, threads=threads, seeds=SEEDS,
                        relion5_fixture_per_iteration=[_summary(hard.FIXTURE / "class2d_hard" / f"run_it{i:03d}_model.star")
                                                       for i in range(1, min(ITERS, 8) + 1)])
    if shutil.which("relion_refine"):
        version = subprocess.run(["relion_refine", "--version"], capture_output=True, text=True).stdout.strip()
        relion = run_relion(OUT / "relion", threads)
        relion["version"] = version.splitlines()[0] if version else "unknown"
        result["relion"] = relion
        result["ours_from_relion_it001"] = []
        for prior in (False, True):
            ours = continue_ours(OUT / "relion", OUT / f"ours_prior{int(prior)}", prior)
            ours["compared_with_relion"] = _compare(relion, ours)
            result["ours_from_relion_it001"].append(ours)
    else:
        result["relion"] = "relion_refine not on the PATH: the same-state comparison was not run"
    result["seed_sweep_blob_start"] = seed_sweep(OUT / "seeds")
    result["load_average_at_end"] = os.getloadavg()[0]
    res = HERE / "results" / "class2d_relion_continue.json"
    res.write_text(json.dumps(result, indent=1))
    print(f"class2d_hard, {ITERS} iterations, {threads} threads")
    if isinstance(result["relion"], dict):
        r = result["relion"]
        print(f"RELION ({r['version']}): {r['wall_seconds']} s wall, {r['cpu_seconds']} CPU-s; per iteration "
              f"{r['seconds_per_iteration']}")
        for ours in result["ours_from_relion_it001"]:
            print(f"ours from RELION's iteration 1 (relion_offset_prior={ours['relion_offset_prior']}): "
                  f"{ours['wall_seconds']} s wall, {ours['cpu_seconds']} CPU-s; per iteration {ours['seconds_per_iteration']}")
            for row in ours["compared_with_relion"]:
                print(f"  it {row['iteration']}: max |Δ class fraction| {row['max_abs_class_difference']:.4f}; smallest "
                      f"RELION {row['relion_smallest']:.4f} ours {row['ours_smallest']:.4f}; < 0.5 %: "
                      f"{row['relion_below_half_percent']} / {row['ours_below_half_percent']}; res {row['resolution_A']}; "
                      f"size {row['image_size']}; Pmax {row['pmax']}")
    else:
        print(result["relion"])
    for row in result["seed_sweep_blob_start"]:
        print(f"seed {row['seed']}: smallest class per iteration {row['smallest_class_per_iteration']}; "
              f"{row['classes_below_half_percent_at_end']} below 0.5 % at the end")
    print(f"wrote {res}")


if __name__ == "__main__":
    main()
