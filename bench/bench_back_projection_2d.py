"""Benchmark: the two back-rotations of the 2D M-step side by side (issue 11).

``back_project_sums`` (RELION's ``backrotate2D``: bilinear scatter of every observation coefficient onto the
padded grid; the EM M-step since 55468de) against ``back_rotate_sums`` (a padded FFT of each (class, ψ) sum,
sampled at every box coefficient; gradient rules, and the EM M-step before). Random sums of the shapes of a full
iteration, for each case: ``K`` classes, box ``n``, ``R`` in-plane angles, all coefficients to Nyquist
(``r_max = n/2``): the class2d_hard fixture's late iterations (K 10, box 96, 120 ψ) and ``bench_class2d.py``'s
K 50 box 64 case. Best of ``BENCH_REPEATS`` (3) wall times each, ``BENCH_THREADS`` (2) threads, CPU, or CUDA when
present. Both give sums on different grids, so only time and peak memory are compared here; their agreement with
RELION is the business of ``tests/test_reference2d_backproject.py`` and the same-state tests.

Writes ``bench/results/back_projection_2d.json`` and prints a summary.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cryopipe.engine.coefficients import coefficient_set  # noqa: E402
from cryopipe.engine.reference2d import PaddedGrid, back_project_sums, back_rotate_sums  # noqa: E402

CASES = [(10, 96, 120), (50, 64, 128)]  # (K, n, R)
REPEATS = int(os.environ.get("BENCH_REPEATS", 3))


def best_time(fn) -> float:
    times = []
    for _ in range(REPEATS):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for K, n, R in CASES:
        cset = coefficient_set(n, n // 2, device=dev)
        P = cset.size
        S = torch.complex(torch.randn(K, R, P, generator=gen), torch.randn(K, R, P, generator=gen)).to(dev)
        W = torch.rand(K, R, P, generator=gen).to(dev)
        psi = torch.arange(R, dtype=torch.float32, device=dev) * (360.0 / R)
        grid = PaddedGrid.make(n, n // 2, 2, device=dev)
        scatter = best_time(lambda: back_project_sums(S, W, psi, cset, grid))
        gather = best_time(lambda: back_rotate_sums(S, W, psi, cset, 2))
        rows.append(dict(K=K, box=n, n_psi=R, coefficients=P, padded_grid_points=int(grid.flat.numel()),
                         back_project_sums_s=round(scatter, 3), back_rotate_sums_s=round(gather, 3)))
        print(f"K {K}, box {n}, {R} psi, {P} coefficients: back_project_sums {scatter:.2f} s, "
              f"back_rotate_sums {gather:.2f} s")
    out = HERE / "results" / "back_projection_2d.json"
    out.write_text(json.dumps(dict(benchmark="back_projection_2d", device=str(dev),
                                   threads=torch.get_num_threads(), repeats=REPEATS, cases=rows,
                                   load_average=os.getloadavg()), indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
