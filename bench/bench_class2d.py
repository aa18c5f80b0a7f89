"""Benchmark: 2D classification (engine E-step/M-step) — seconds per iteration, peak memory, GEMM FLOP rate.

Simulates ``BENCH_N`` particles (default 10,000) of PDB 3ENL (box ``BENCH_BOX`` = 64, 2 Å/px, random orientations
over the sphere, random ψ and shifts of ±4 px, per-particle astigmatic CTF, SNR 0.05) in memory, then runs
``BENCH_ITERS`` (default 3) iterations of 2D classification with ``BENCH_K`` classes (default 50; ψ step 6°,
offsets ±5 px step 2 px, adaptive oversampling 1, like RELION's GUI defaults) on the default device
(``$CRYOPIPE_DEVICE``, else CUDA if available).

Reports seconds per iteration (after a warm-up iteration), peak memory (CUDA: max allocated; CPU: max RSS), the
matrix-multiplication FLOPs of one iteration (``torch.utils.flop_counter``; the GEMMs are the E-step scores and the
M-step sums) divided by the iteration time — the *achieved* GEMM rate over the whole iteration — and the machine's
float32 GEMM rate measured on 4096² matrices, and their ratio.

Writes bench/results/class2d.json (or class2d_<device>.json with BENCH_TAG) and prints a summary. On a 2-core CPU
use small settings, e.g. ``BENCH_N=1000 BENCH_K=10 BENCH_BOX=48``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cryopipe.core.ctf import ctf_2d  # noqa: E402
from cryopipe.core.device import default_device  # noqa: E402
from cryopipe.core.fourier import irfft2_centered, rfft2_centered  # noqa: E402
from cryopipe.core.geometry import euler_to_matrix  # noqa: E402
from cryopipe.core.projector import Projector  # noqa: E402
from cryopipe.engine.classify2d import Class2DSettings, Optimiser2D, ParticleSet2D  # noqa: E402
from cryopipe.sim.atomic import load_model, potential_map  # noqa: E402

N = int(os.environ.get("BENCH_N", 10000))
K = int(os.environ.get("BENCH_K", 50))
BOX = int(os.environ.get("BENCH_BOX", 64))
ITERS = int(os.environ.get("BENCH_ITERS", 3))
APIX = float(os.environ.get("BENCH_APIX", 2.0))
SNR = 0.05
BATCH = int(os.environ.get("BENCH_BATCH", 0))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gemm_rate(dev: torch.device, n: int = 4096, reps: int = 5) -> float:
    """Measured float32 GEMM rate (FLOP/s) on ``n × n`` matrices."""
    if dev.type == "cpu":
        n = 2048
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    a @ b
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def simulate(dev: torch.device) -> tuple[np.ndarray, dict]:
    vol = torch.from_numpy(potential_map(load_model("3enl"), BOX, APIX, device="cpu"))
    pr = Projector(vol.to(dev))
    g = np.random.default_rng(12)
    rot = g.uniform(0, 360, N)
    tilt = np.degrees(np.arccos(g.uniform(-1, 1, N)))
    psi = g.uniform(0, 360, N)
    org = g.uniform(-4, 4, (N, 2))
    du = g.uniform(8000, 25000, N)
    dv = du + g.uniform(-800, 800, N)
    da = g.uniform(0, 180, N)
    out = np.empty((N, BOX, BOX), dtype=np.float32)
    sig = None
    gen = torch.Generator(device=dev).manual_seed(13)
    for s in range(0, N, 1000):
        sl = slice(s, min(N, s + 1000))
        A = euler_to_matrix(*(torch.tensor(a[sl], dtype=torch.float32, device=dev) for a in (rot, tilt, psi)))
        img = pr.project_images(A, shifts_px=-torch.tensor(org[sl], dtype=torch.float32, device=dev))
        c = ctf_2d(BOX, APIX, torch.tensor(du[sl], device=dev), torch.tensor(dv[sl], device=dev),
                   torch.tensor(da[sl], device=dev))
        img = irfft2_centered(rfft2_centered(img) * c, BOX)
        if sig is None:
            sig = float(img.std())
        img = img + torch.randn(img.shape, generator=gen, device=dev) * sig / math.sqrt(SNR)
        out[sl] = img.cpu().numpy()
    ctf = dict(defocus_u=du, defocus_v=dv, defocus_angle=da, voltage=np.full(N, 300.0), cs=np.full(N, 2.7),
               amplitude_contrast=np.full(N, 0.1), phase_shift=np.zeros(N), bfactor=np.zeros(N), scale=np.ones(N))
    return out, ctf


def main() -> int:
    dev = default_device()
    peak_gemm = gemm_rate(dev)
    t0 = time.perf_counter()
    images, ctf = simulate(dev)
    t_sim = time.perf_counter() - t0
    ps = ParticleSet2D(BOX, APIX, lambda i: images[i], ctf, np.zeros(N, dtype=np.int64), np.zeros(N, dtype=np.int64))
    batch = BATCH or (512 if dev.type == "cuda" else 128)
    s = Class2DSettings(n_classes=K, tau2_fudge=2.0, particle_diameter=0.8 * BOX * APIX, zero_mask=True,
                        psi_step=6.0, offset_range=5.0, offset_step=2.0, oversampling=1, random_seed=1,
                        batch_size=batch, n_iter=ITERS + 2)
    opt = Optimiser2D(ps, s, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    opt.initialise()
    _sync(dev)
    t_init = time.perf_counter() - t0
    reps = []
    rep = opt.iterate()  # warm-up (also the random-seed iteration)
    reps.append(rep)
    times = []
    for _ in range(ITERS):
        _sync(dev)
        t0 = time.perf_counter()
        rep = opt.iterate()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        reps.append(rep)
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        opt.iterate()
    flops = float(fc.get_total_flops())
    sec = float(np.median(times))
    peak_mem = (torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    result = {
        "benchmark": "class2d",
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
        "n_particles": N, "box": BOX, "pixel_size_A": APIX, "n_classes": K, "snr": SNR,
        "psi_step_deg": opt.sampling.psi_step, "offset_range_px": 5, "offset_step_px": 2, "oversampling": 1,
        "batch_size": batch,
        "simulate_seconds": round(t_sim, 2), "initialise_seconds": round(t_init, 2),
        "seconds_per_iteration": round(sec, 3), "iteration_seconds": [round(t, 3) for t in times],
        "particles_per_second": round(N / sec, 1),
        "gemm_flops_per_iteration": flops,
        "achieved_gemm_flop_rate": flops / sec,
        "machine_gemm_flop_rate_fp32": peak_gemm,
        "fraction_of_machine_gemm_rate": flops / sec / peak_gemm,
        "peak_memory_mb": round(peak_mem, 1),
        "resolution_A": [round(r.resolution_A, 2) for r in reps],
        "current_size": [r.current_size for r in reps],
        "ave_pmax": [round(r.ave_pmax, 4) for r in reps],
        "changes_classes": [round(r.changes_classes, 4) for r in reps],
    }
    out = HERE / "results" / f"class2d{('_' + os.environ['BENCH_TAG']) if os.environ.get('BENCH_TAG') else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"class2d: {N} particles, box {BOX}, K={K} on {result['device']}: {sec:.2f} s/iteration "
          f"({N / sec:.0f} particles/s); GEMMs {flops / 1e12:.2f} TFLOP/iteration -> "
          f"{flops / sec / 1e12:.3f} TFLOP/s achieved vs {peak_gemm / 1e12:.3f} TFLOP/s machine fp32 GEMM "
          f"({100 * flops / sec / peak_gemm:.1f} %); peak memory {peak_mem:.0f} MB; resolution "
          f"{reps[-1].resolution_A:.1f} Å, <Pmax> {reps[-1].ave_pmax:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
