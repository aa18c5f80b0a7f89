"""Benchmark: refine3d iterations in-process and on a loopback Dask ``LocalCluster`` (issue 15), the 3D sibling
of ``bench_dask.py`` (whose helpers it uses: the same runs, timing, comparison and output).

Simulates ``BENCH_N`` particles (default 400) of PDB 3ENL (``cryopipe simulate``, box ``BENCH_BOX`` = 40, 4 Å/px,
SNR 0.1, CTF) into a temporary project, then runs ``BENCH_ITERS`` (default 4) iterations of a gold-standard 3D
auto-refinement (two half-sets, HEALPix order ``BENCH_HEALPIX`` = 2 (15°), offsets ±3 px step 1, no oversampling,
batch 32, ``--norm --scale --ctf --zero_mask --flatten_solvent``, the reference = the simulation's truth
low-passed to 30 Å and rescaled to the particles' greyscale) with the same seed:

* in-process with torch's default threads (2 here) and with 1 thread;
* ``--dask local:W`` for W in ``BENCH_WORKERS`` (default ``1,2``): CPU worker processes with one torch thread
  each (``BENCH_CHUNKS`` = 2 chunks per worker and half-set), reading the particles themselves from the stack; the
  client (M-step, FSC, accuracies, sampling) on 1 thread.

Reports seconds per iteration (iterations 2.., after the first), the speed-up over the in-process runs, efficiency
= speed-up over the 1-thread run / workers, the seconds per iteration spent in the distributed E-step (the
backend's ``map``: scatter, tasks, gather), the scheduler's overhead per iteration and the largest difference
between the half maps of each run and the in-process ones. The scheduler overhead is measured as for class2d: a
no-op chunk step sent through the same ``map`` with the last iteration's snapshot (the model: both half maps) and
the real chunks (indices and their rows' poses); each no-op task returns what a real chunk returns (zeroed
back-projector grids of the current size, zeroed particle sums, its rows' poses) but computes nothing, so the
transfer of the results is included and the workers' reference set-up and E-step are not. The machine is shared:
the load average before each run is recorded, and the CPU seconds of this (client) process over each run's
iterations (the worker processes' CPU time is not included).

Writes bench/results/dask_refine3d_<tag>.json (``BENCH_TAG``, default ``cpu_2core``) and prints a summary.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from bench_dask import (  # noqa: E402
    CHUNKS,
    TAG,
    WORKERS,
    _Timed,
    compare_runs,
    cpu_runs,
    iterate_timed,
    map_overhead,
    print_runs,
    simulated_particles,
    write_result,
)
from cryopipe.engine.backend import split_chunks  # noqa: E402
from cryopipe.engine.optimiser3d import Optimiser3D, ParticleState3D, Refine3DSettings  # noqa: E402
from cryopipe.engine.particle_input import load_particles  # noqa: E402
from cryopipe.engine.refine3d_files import load_reference  # noqa: E402
from cryopipe.engine.refine3d_step import PoseRecords, Refine3DItem, Refine3DPartial, Refine3DSnapshot  # noqa: E402

N = int(os.environ.get("BENCH_N", 400))
BOX = int(os.environ.get("BENCH_BOX", 40))
ITERS = int(os.environ.get("BENCH_ITERS", 4))
HEALPIX = int(os.environ.get("BENCH_HEALPIX", 2))
BATCH = 32


def settings() -> Refine3DSettings:
    return Refine3DSettings(n_iter=ITERS, healpix_order=HEALPIX, oversampling=0, offset_range=3.0, offset_step=1.0,
                            particle_diameter=BOX * 4.0 * 0.8, batch_size=BATCH, ini_high=30.0,
                            sigma_noise_particles=N, n_accuracy_particles=20, random_seed=5, do_norm=True,
                            do_scale=True, split_halves=True, auto_refine=True)


def _noop_chunk(optimiser, snap: Refine3DSnapshot, item: Refine3DItem, device=None, r_max: int = 0
                ) -> Refine3DPartial:
    """What :func:`~cryopipe.engine.refine3d_step.refine3d_chunk` returns (back-projector grids of ``r_max``,
    particle sums, the chunk's poses), all zero or unchanged: the scheduler path without the compute."""
    from cryopipe.engine.reference3d import ClassBackProjectors
    from cryopipe.engine.stream import ParticleSums

    m, p = snap.model, optimiser.p
    bps = ClassBackProjectors(m.n_classes, optimiser.n, optimiser.s.pad, r_max=r_max)
    data, weight = bps.sums()
    sums = ParticleSums.zeros(m.n_classes, p.n_optics_groups, m.n_shells, p.n_groups, torch.device("cpu"))
    return Refine3DPartial(int(item.group), data, weight, sums, item.start, 0.0)


def _overhead(opt: Optimiser3D, backend) -> float:
    """The scheduler's own cost per iteration (module docstring): the next iteration's snapshot and chunks
    (built as ``Optimiser3D._estep_distributed`` builds them) through ``map`` with :func:`_noop_chunk`."""
    snap = Refine3DSnapshot(opt.iteration + 1, opt.model, opt.sampling, False)
    _, _, r_cur = opt._coefficient_sets(False)
    items = []
    for gi, h in enumerate((1, 2)):
        order = np.nonzero(opt.state.subset == h)[0]
        n_chunks = backend.n_chunks(-(-order.size // BATCH))
        items += [Refine3DItem(gi, c, PoseRecords.take(opt.state, c)) for c in split_chunks(order, n_chunks, BATCH)]
    return map_overhead(backend, _noop_chunk, opt, snap, items, r_max=r_cur)


def run(ps, origin, reference: torch.Tensor, backend, label: str, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    timed = _Timed(backend) if backend.distributed else backend
    opt = Optimiser3D(ps, settings(), state=ParticleState3D.empty(ps.size, origin), backend=timed)
    opt.initialise(reference, absolute_greyscale=False)
    cpu0 = time.process_time()
    out = {"label": label, **iterate_timed(opt, timed, ITERS), "load_average_before": load,
           "client_cpu_s": time.process_time() - cpu0, "client_threads": torch.get_num_threads(),
           "resolution_A": float(1.0 / opt.model.current_resolution) if opt.model.current_resolution > 0 else None,
           "ave_pmax": float(opt.model.ave_pmax)}
    out["scheduler_overhead_s"] = _overhead(opt, backend) if backend.distributed else None
    out["result"] = opt.model.vols.detach().cpu().clone()  # [2 halves, K, n, n, n]
    return out


def main() -> int:
    with simulated_particles(N, BOX) as sim:
        _, ps, origin = load_particles(sim / "particles.star", "3D refinement")
        reference = load_reference(sim / "truth_map.mrc", ps.n, ps.pixel_size)
        runs = cpu_runs(lambda be, label, threads: run(ps, origin, reference, be, label, threads), WORKERS, CHUNKS)
    ref = compare_runs(runs, "max_abs_diff_maps")
    result = {"benchmark": "dask_refine3d", "particles": N, "box": BOX, "iterations": ITERS,
              "healpix_order": HEALPIX, "batch_size": BATCH, "chunks_per_worker": CHUNKS,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "maps_abs_max": float(ref.abs().max()),
              "runs": runs}
    out = write_result(result, f"dask_refine3d_{TAG}.json")
    print(f"refine3d, {N} particles, box {BOX}, HEALPix order {HEALPIX}, {ITERS} iterations (warm = iterations 2..)")
    print_runs(runs, "max_abs_diff_maps")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
