"""Benchmark (issue 11, item 3): the gradient-driven initial model on pure noise — does ⟨Pmax⟩ drift upwards?

``BENCH_N`` (400) images of white Gaussian noise, box ``BENCH_BOX`` (48) at 4 Å/px with CTF parameters, K 1,
``BENCH_ITERS`` (30) VDAM iterations with the test_noise_3d settings (HEALPix order 1, offsets ±2 px). Per iteration:
⟨Pmax⟩, current resolution and image size, the mini-batch size, τ² fudge, step size, the update's per-shell FSC
estimate (mean over shells 1..r_cur) and the reference power (mean |F|² over shells 1..r_cur relative to the noise
σ²), the noise σ² and the reference τ² over those shells, the offset prior σ and the RMS particle origin (pixels).
``BENCH_VARIANT`` names a variant of the update rule for comparison (default: the engine's).

Writes ``bench/results/noise_3d_initialmodel.json`` (or ``..._<variant>.json``) and prints a table.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings  # noqa: E402
from cryopipe.engine.stream import ParticleSet  # noqa: E402
from cryopipe.engine.vdam import initial_model_rule  # noqa: E402

N = int(os.environ.get("BENCH_N", 400))
BOX = int(os.environ.get("BENCH_BOX", 48))
ITERS = int(os.environ.get("BENCH_ITERS", 30))
APIX = 4.0
VARIANT = os.environ.get("BENCH_VARIANT", "")


def noise_particles(n: int, box: int, apix: float, seed: int = 3) -> ParticleSet:
    g = np.random.default_rng(seed)
    images = g.normal(0.0, 1.0, (n, box, box)).astype(np.float32)
    du = g.uniform(8000, 24000, n)
    ctf = dict(defocus_u=du, defocus_v=du + g.uniform(-500, 500, n), defocus_angle=g.uniform(0, 180, n),
               voltage=np.full(n, 300.0), cs=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1),
               phase_shift=np.zeros(n), bfactor=np.zeros(n), scale=np.ones(n))
    return ParticleSet(box, apix, lambda i: images[i], ctf, np.zeros(n, np.int64), np.arange(n) // 40)


def settings(n_iter: int, n: int, box: int, apix: float) -> Refine3DSettings:
    return Refine3DSettings(healpix_order=1, oversampling=0, offset_range=2.0, offset_step=1.0,
                            particle_diameter=0.7 * box * apix, batch_size=100, ini_high=40.0,
                            sigma_noise_particles=n, n_accuracy_particles=10, random_seed=2, n_iter=n_iter,
                            grad=True, split_halves=False, auto_refine=False)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
    s = settings(ITERS, N, BOX, APIX)
    rule = initial_model_rule(s.n_iter, s.tau2_fudge, {})
    opt = Optimiser3D(noise_particles(N, BOX, APIX), s, update_rule=rule)
    t_cpu = os.times()
    t0 = time.perf_counter()
    opt.initialise()
    rows = []
    for _ in range(ITERS):
        r = opt.iterate()
        m = opt.model
        rc = max(1, int(m.current_size) // 2)
        fsc = rule.last_fsc.detach().cpu().to(torch.float64)[0]
        ssnr = m.data_vs_prior[0, 0].to(torch.float64)
        rows.append(dict(iteration=r.iteration, pmax=float(r.ave_pmax), resolution_A=float(r.resolution_A),
                         image_size=int(r.current_size), subset=int(r.n_particles),
                         tau2_fudge=float(m.tau2_fudge), step=float(rule.step(r.iteration)),
                         mean_update_fsc=float(fsc[1:rc + 1].mean()),
                         mean_ssnr=float(ssnr[1:rc + 1].mean()),
                         # the noise model the E-step uses (mean σ² over shells 1..r_cur) and the reference power
                         # there (mean τ² of the references this iteration aligned against)
                         mean_sigma2_noise=float(m.sigma2_noise[:, 1:rc + 1].to(torch.float64).mean()),
                         mean_reference_tau2=float(m.tau2[0, 0, 1:rc + 1].to(torch.float64).mean()),
                         sigma_offset_px=float(m.sigma2_offset) ** 0.5,
                         rms_origin_px=float(np.sqrt((opt.state.origin ** 2).sum(axis=1).mean()))))
        print(json.dumps(rows[-1]), flush=True)
    t1 = os.times()
    result = dict(n_particles=N, box=BOX, pixel_size=APIX, iterations=ITERS, variant=VARIANT or "engine",
                  threads=torch.get_num_threads(), wall_seconds=time.perf_counter() - t0,
                  cpu_seconds=(t1.user + t1.system) - (t_cpu.user + t_cpu.system),
                  load_average_at_end=os.getloadavg()[0],
                  peak_rss_GB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, per_iteration=rows)
    out = HERE / "results" / (f"noise_3d_initialmodel_{VARIANT}.json" if VARIANT else "noise_3d_initialmodel.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"{N} noise images, box {BOX}: Pmax {[round(r['pmax'], 3) for r in rows]}; "
          f"{result['cpu_seconds']:.0f} CPU-s, load {result['load_average_at_end']:.1f}")


if __name__ == "__main__":
    main()
