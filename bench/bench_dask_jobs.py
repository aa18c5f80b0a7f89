"""Benchmark: ``cryopipe autopick --LoG`` and ``cryopipe extract`` in-process and per micrograph on a loopback Dask
``LocalCluster`` (issue 15).

Simulates ``BENCH_MICS`` micrographs (default 8) of ``BENCH_SIZE``² pixels (default 1024, 3 Å/px, 40 particles of
PDB 3ENL each, SNR 0.5) into a temporary project, then runs with the same options

* autopick (LoG, diameters 60-100 Å) and extract (box 64, ``--norm``, dust removal at 3σ) in this process with one
  torch thread (``--j 1`` / ``torch.set_num_threads(1)``);
* the same on ``local:1`` and ``local:2`` clusters (worker processes with one torch thread each; the cluster is
  started before the timed call, its workers import the step modules, and that start-up time is reported
  separately; the job joins it by its address).

Reports per run the wall seconds and the client's CPU seconds (the workers' CPU is not included), seconds per
micrograph, speed-up over the in-process run, efficiency = speed-up / workers, and whether the outputs equal the
in-process ones (coordinate files byte for byte; stacks within 1e-5 of their maximum). The machine is shared: the
load average before each run is recorded.

Writes bench/results/dask_jobs_<tag>.json (``BENCH_TAG``, default ``cpu_2core``) and prints a summary.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def _timed(fn) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    assert fn() == 0
    return time.perf_counter() - t, time.process_time() - c


def _warm_up() -> None:
    import cryopipe.extraction.extract_step  # noqa: F401
    import cryopipe.picking.log  # noqa: F401
    import cryopipe.picking.pick_step  # noqa: F401


def main() -> None:
    from cryopipe.cli import main as cli
    from cryopipe.engine.backend import make_backend
    from cryopipe.io.mrc import read_mrc

    n_mics = int(os.environ.get("BENCH_MICS", 8))
    size = int(os.environ.get("BENCH_SIZE", 1024))
    tag = os.environ.get("BENCH_TAG", "cpu_2core")
    torch.set_num_threads(1)
    d = Path(tempfile.mkdtemp(prefix="bench_dask_jobs_"))
    os.chdir(d)
    assert cli(["simulate", "--what", "micrographs", "--n", str(n_mics), "--mic_size", str(size), "--n_per_mic", "40",
                "--snr", "0.5", "--seed", "1", "--device", "cpu"]) == 0
    mics = "Simulate/job001/micrographs.star"
    pick = ["autopick", "--i", mics, "--LoG", "--LoG_diam_min", "60", "--LoG_diam_max", "100", "--no_png", "--j", "1"]
    ext = ["extract", "--i", mics, "--coord_list", "AutoPick/job002/autopick.star", "--extract_size", "64", "--norm",
           "--white_dust", "3", "--black_dust", "3"]
    runs: list[dict] = []
    job = 2
    ref_pick = ref_ext = None
    for workers in (0, 1, 2):
        be = None
        startup = 0.0
        if workers:
            t = time.perf_counter()
            be = make_backend(f"local:{workers}")
            be.client.run(_warm_up)  # workers import torch and the step modules (part of the start-up)
            startup = time.perf_counter() - t
        dask = ["--dask", be.client.scheduler.address] if be else []
        for what, args in (("autopick", pick), ("extract", ext)):
            load = os.getloadavg()[0]
            out = f"AutoPick/job{job:03d}/" if what == "autopick" else f"Extract/job{job:03d}/"
            flag = "--odir" if what == "autopick" else "--o"
            wall, cpu = _timed(lambda: cli(args + [flag, out] + dask))
            pattern = "*_autopick.star" if what == "autopick" else "*.mrcs"
            files = {p.relative_to(d / out).as_posix(): p for p in sorted((d / out).rglob(pattern))}
            if what == "autopick":
                got = {k: p.read_text() for k, p in files.items()}
                ref_pick = ref_pick or got
                equal = got == ref_pick
            else:
                got = {k: read_mrc(p)[0] for k, p in files.items()}
                ref_ext = ref_ext or got
                equal = got.keys() == ref_ext.keys() and all(
                    np.allclose(got[k], ref_ext[k], rtol=0, atol=1e-5 * np.abs(ref_ext[k]).max()) for k in got)
            runs.append(dict(job=what, workers=workers, cluster_startup_s=round(startup, 2), wall_s=round(wall, 3),
                             client_cpu_s=round(cpu, 3), s_per_micrograph=round(wall / n_mics, 3),
                             load_before=round(load, 2), equal_to_in_process=bool(equal)))
            job += 1
        if be is not None:
            be.close()
    for r in runs:
        base = next(x for x in runs if x["job"] == r["job"] and x["workers"] == 0)
        r["speedup"] = round(base["wall_s"] / r["wall_s"], 3)
        r["efficiency"] = round(r["speedup"] / max(1, r["workers"]), 3) if r["workers"] else None
    res = dict(micrographs=n_mics, size=size, particles_per_micrograph=40, runs=runs,
               conditions="2 shared CPU cores (other agents' work running); in-process 1 torch thread, workers 1 "
                          "thread each; cluster start-up (incl. workers importing the step modules) excluded "
                          "from wall_s")
    out = HERE / "results" / f"dask_jobs_{tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"{'job':9s} {'workers':>7s} {'wall s':>7s} {'cpu s':>6s} {'s/mic':>6s} {'speedup':>7s} {'eff':>5s} "
          f"{'load':>5s} equal")
    for r in runs:
        print(f"{r['job']:9s} {r['workers']:7d} {r['wall_s']:7.2f} {r['client_cpu_s']:6.2f} "
              f"{r['s_per_micrograph']:6.2f} {r['speedup']:7.2f} {r['efficiency'] or 0:5.2f} "
              f"{r['load_before']:5.1f} {r['equal_to_in_process']}")
    print(f"cluster start-up: {[r['cluster_startup_s'] for r in runs if r['workers']][::2]} s; wrote {out}")


if __name__ == "__main__":
    main()
