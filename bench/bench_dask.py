"""Benchmark: class2d iterations in-process and on a loopback Dask ``LocalCluster`` (issue 15).

Simulates ``BENCH_N`` particles (default 600) of PDB 3ENL (``cryopipe simulate``, box ``BENCH_BOX`` = 40, 4 Å/px,
SNR 0.1) into a temporary project, then runs ``BENCH_ITERS`` (default 3) iterations of 2D classification
(``BENCH_K`` = 8 classes, ψ step 10°, offsets ±3 px step 1, no oversampling, batch 32, no --zero_mask) with the
same seed:

* in-process with torch's default threads (2 here) and with 1 thread;
* ``--dask local:W`` for W in ``BENCH_WORKERS`` (default ``1,2``; on the 16-core device machine ``1,2,4,8``):
  CPU worker processes with one torch thread each (``BENCH_CHUNKS`` = 2 chunks per worker), reading the particles
  themselves from the stack; the client (M-step, accuracies) on 1 thread;
* with ``BENCH_GPU=1`` (a machine with a GPU): in-process on ``cuda`` and ``--dask local:G`` for G in
  ``BENCH_GPU_WORKERS`` (default ``1``) workers pinned round-robin to the GPUs (worker i on cuda:(i mod GPUs)),
  the speed-up of those against the in-process 1-thread CPU run and the in-process GPU run.

Reports seconds per iteration (iterations 2.., after the first), the speed-up over the in-process runs (default
threads and 1 thread), efficiency = speed-up over the 1-thread run / workers (each worker has one thread), the
scheduler's overhead per iteration (a no-op step through the same scatter / submit / gather path: model snapshot
sent, chunks returned), and the largest difference between the class averages of each run and the in-process
ones. The machine is shared: the load average before each run is recorded. ``bench_dask_refine3d.py`` does the
same for refine3d with this module's helpers.

Writes bench/results/dask_<tag>.json (``BENCH_TAG``, default ``cpu_2core``) and prints a summary.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cryopipe.cli import main as cli  # noqa: E402
from cryopipe.engine.backend import InProcess, make_backend, split_chunks  # noqa: E402
from cryopipe.engine.classify2d import Class2DSettings, Optimiser2D  # noqa: E402
from cryopipe.engine.class2d_step import ParticleRows2D  # noqa: E402
from cryopipe.jobs.class2d import load_particles  # noqa: E402

N = int(os.environ.get("BENCH_N", 600))
K = int(os.environ.get("BENCH_K", 8))
BOX = int(os.environ.get("BENCH_BOX", 40))
ITERS = int(os.environ.get("BENCH_ITERS", 3))
CHUNKS = int(os.environ.get("BENCH_CHUNKS", 2))
TAG = os.environ.get("BENCH_TAG", "cpu_2core")
WORKERS = [int(w) for w in os.environ.get("BENCH_WORKERS", "1,2").split(",") if w.strip()]
GPU = os.environ.get("BENCH_GPU", "0") not in ("", "0")
GPU_WORKERS = [int(w) for w in os.environ.get("BENCH_GPU_WORKERS", "1").split(",") if w.strip()]


def _noop(static, snapshot, item, device=None):
    """A step that does nothing: what the scheduler path costs by itself."""
    return item.index.size


class _Timed:
    """A backend wrapper that adds up the wall time of ``map`` (the distributed E-step, transfers included)."""

    def __init__(self, backend):
        self.be, self.seconds = backend, 0.0
        self.distributed = backend.distributed

    def n_chunks(self, hint: int) -> int:
        return self.be.n_chunks(hint)

    def map(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.be.map(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def settings() -> Class2DSettings:
    return Class2DSettings(n_classes=K, n_iter=ITERS, particle_diameter=BOX * 4.0 * 0.8, psi_step=10,
                           offset_range=3, offset_step=1, oversampling=0, random_seed=7, batch_size=32,
                           zero_mask=False, n_accuracy_particles=20)


def iterate_timed(opt, backend, iters: int) -> dict:
    """Run ``iters`` iterations of ``opt`` (its backend: ``backend``, a :class:`_Timed` when distributed): seconds
    per iteration (``opt.iterate().seconds``), their mean over iterations 2.. and, when distributed, the seconds
    spent in the backend's ``map`` per iteration."""
    secs, estep = [], []
    for _ in range(iters):
        before = getattr(backend, "seconds", 0.0)
        secs.append(opt.iterate().seconds)
        estep.append(getattr(backend, "seconds", 0.0) - before)
    out = {"seconds_per_iteration": secs, "warm_mean_s": float(np.mean(secs[1:] or secs))}
    if backend.distributed:  # the E-step on the workers (map: scatter, tasks, gather); the rest runs on the client
        out["distributed_estep_s"] = estep
        out["warm_mean_distributed_estep_s"] = float(np.mean(estep[1:] or estep))
    return out


def map_overhead(backend, fn, static, snapshot, items, repeats: int = 5, **kwargs) -> float:
    """Median wall seconds of ``backend.map(fn, static, snapshot, items)`` over ``repeats`` calls: with a no-op
    ``fn``, the scheduler's own cost per iteration (snapshot scattered, tasks submitted, results gathered)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.map(fn, static, snapshot, items, **kwargs)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def run(ps, origin, backend, label: str, threads: int | None = None, device: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    from cryopipe.engine.classify2d import ParticleState2D

    timed = _Timed(backend) if backend.distributed else backend
    opt = Optimiser2D(ps, settings(), state=ParticleState2D.empty(ps.size, origin), backend=timed, device=device)
    opt.initialise()
    out = {"label": label, **iterate_timed(opt, timed, ITERS), "load_average_before": load,
           "client_threads": torch.get_num_threads()}
    overhead = None
    if backend.distributed:
        # the scheduler's own cost: the same snapshot and chunking through scatter/submit/gather, no compute
        chunks = split_chunks(np.arange(ps.size), backend.n_chunks(0), 32)
        rows = [ParticleRows2D(c, origin[c], np.ones(c.size)) for c in chunks]
        overhead = map_overhead(backend, _noop, ps, opt.model, rows)
    out["scheduler_overhead_s"] = overhead
    out["result"] = opt.model.refs.detach().cpu().clone()
    return out


def cpu_runs(run_one, workers: list[int], chunks: int) -> list[dict]:
    """The CPU runs of the benchmark, in this order: in-process with torch's default threads (2 here), in-process
    with 1 thread, then ``--dask local:W`` (W in ``workers``, CPU workers of one thread each, ``chunks`` chunks per
    worker; the client on 1 thread). ``run_one(backend, label, threads)`` returns one run's dict."""
    torch.set_num_threads(2)
    default_threads = torch.get_num_threads()
    runs = [run_one(InProcess(), f"in-process, {default_threads} threads", default_threads),
            run_one(InProcess(), "in-process, 1 thread", 1)]
    # the client (M-step, accuracies, predictions) with 1 thread: on 2 shared cores 2 threads are slower
    torch.set_num_threads(1)
    for w in workers:
        be = make_backend(f"local:{w}", chunks, gpus=0)  # CPU workers, even where GPUs exist
        try:
            r = run_one(be, f"dask local:{w} CPU ({chunks} chunks/worker)", None)
        finally:
            be.close()
        r["workers"] = w
        runs.append(r)
    return runs


def compare_runs(runs: list[dict], diff_name: str) -> torch.Tensor:
    """Add to each run its speed-up over the first (in-process, default threads) and second (in-process, 1
    thread) run, efficiency = speed-up over the 1-thread run / workers (each worker has one thread; GPU-pinned
    runs: over the in-process cuda run / GPU workers), and ``diff_name``: the largest absolute difference of its
    ``result`` tensor (removed) from the first run's. Returns the first run's result."""
    base, base1 = runs[0]["warm_mean_s"], runs[1]["warm_mean_s"]
    ref = runs[0]["result"]
    for r in runs:
        r["speedup_vs_in_process"] = base / r["warm_mean_s"]
        r["speedup_vs_in_process_1thread"] = base1 / r["warm_mean_s"]
        if "workers" in r:
            r["efficiency"] = r["speedup_vs_in_process_1thread"] / r["workers"]
        if "gpu_workers" in r:
            gpu_base = next(x["warm_mean_s"] for x in runs if x["label"] == "in-process, cuda")
            r["speedup_vs_in_process_cuda"] = gpu_base / r["warm_mean_s"]
            r["efficiency"] = r["speedup_vs_in_process_cuda"] / r["gpu_workers"]
        r[diff_name] = float((r.pop("result") - ref).abs().max())
    return ref


def print_runs(runs: list[dict], diff_name: str) -> None:
    for r in runs:
        extra = ""
        if r.get("scheduler_overhead_s") is not None and "efficiency" in r:
            extra = (f", efficiency {r['efficiency']:.2f}, E-step on workers {r['warm_mean_distributed_estep_s']:.2f} s,"
                     f" scheduler overhead {r['scheduler_overhead_s']:.3f} s/iter")
        print(f"  {r['label']:<36} {r['warm_mean_s']:6.2f} s/iter  speed-up {r['speedup_vs_in_process']:.2f} "
              f"(vs 1 thread {r['speedup_vs_in_process_1thread']:.2f}){extra}"
              f"  (load {r['load_average_before']:.1f}; max |Δ| {r[diff_name]:.1e})")


@contextmanager
def simulated_particles(n: int, box: int, snr: float = 0.1) -> Iterator[Path]:
    """A temporary project (the working directory inside the block) with ``n`` simulated particles of PDB 3ENL
    (``cryopipe simulate``, box ``box``, 4 Å/px, SNR ``snr``, seed 1); yields the ``Simulate/job001/`` folder
    (``particles.star``, ``truth_map.mrc``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            assert cli(["simulate", "--what", "particles", "--n", str(n), "--box", str(box), "--angpix", "4",
                        "--snr", str(snr), "--seed", "1"]) == 0
            yield Path(tmp) / "Simulate/job001"
        finally:
            os.chdir(cwd)


def write_result(result: dict, name: str) -> Path:
    out = HERE / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return out


def main() -> int:
    with simulated_particles(N, BOX) as sim:
        _, ps, origin = load_particles(sim / "particles.star")
        runs = cpu_runs(lambda be, label, threads: run(ps, origin, be, label, threads), WORKERS, CHUNKS)
        if GPU:
            runs.append(run(ps, origin, InProcess(), "in-process, cuda", 1, device="cuda"))
            for w in GPU_WORKERS:
                be = make_backend(f"local:{w}", CHUNKS)  # pinned: worker i on cuda:(i mod GPUs)
                try:
                    r = run(ps, origin, be, f"dask local:{w} GPU-pinned ({be.gpus} GPUs, {CHUNKS} chunks/worker)")
                finally:
                    be.close()
                r["gpu_workers"] = w
                runs.append(r)
    ref = compare_runs(runs, "max_abs_diff_refs")
    result = {"benchmark": "dask", "particles": N, "box": BOX, "classes": K, "iterations": ITERS,
              "chunks_per_worker": CHUNKS, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
              "refs_abs_max": float(ref.abs().max()), "runs": runs}
    out = write_result(result, f"dask_{TAG}.json")
    print(f"class2d, {N} particles, box {BOX}, K {K}, {ITERS} iterations (warm = iterations 2..)")
    print_runs(runs, "max_abs_diff_refs")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
