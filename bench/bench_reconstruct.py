"""Benchmark: `cryopipe reconstruct` on simulated particles with known angles (issue: foundation).

Simulates 5,000 particles of PDB 3ENL (box 64, 1.5 Å/px, per-particle CTF, SNR 0.1), reconstructs them with CTF
correction through the command line (a child process, so its peak memory is its own), and records the FSC against
the ground-truth map: the resolution where it crosses 0.5 must be <= 2.5 x the pixel size (3.75 Å).

Writes bench/results/reconstruct.json and prints a summary.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cryopipe.core.fsc import fsc, resolution_at  # noqa: E402
from cryopipe.io.mrc import read_mrc  # noqa: E402

N_PARTICLES = int(os.environ.get("BENCH_N", 5000))
BOX = 64
APIX = 1.5
SNR = 0.1


def main() -> int:
    exe = [sys.executable, "-m", "cryopipe"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(exe + ["simulate", "--what", "particles", "--o", "sim/", "--n", str(N_PARTICLES), "--box",
                              str(BOX), "--angpix", str(APIX), "--snr", str(SNR), "--seed", "11"],
                       cwd=tmp, check=True, capture_output=True)
        t_sim = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(exe + ["reconstruct", "--i", "sim/particles_truth.star", "--o", "rec.mrc", "--ctf"],
                       cwd=tmp, check=True, capture_output=True)
        t_rec = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # max over children (Linux: KiB)
        rec, p = read_mrc(Path(tmp) / "rec.mrc")
        truth, _ = read_mrc(Path(tmp) / "sim" / "truth_map.mrc")
    f = fsc(torch.from_numpy(rec), torch.from_numpy(truth))
    res05 = float(resolution_at(f, 0.5, p, rec.shape[0]))
    res0143 = float(resolution_at(f, 0.143, p, rec.shape[0]))
    result = {
        "benchmark": "reconstruct",
        "n_particles": N_PARTICLES, "box": BOX, "pixel_size_A": APIX, "snr": SNR, "ctf": True,
        "fsc_truth_0.5_A": round(res05, 3), "fsc_truth_0.143_A": round(res0143, 3),
        "target_fsc_0.5_A": 2.5 * APIX, "pass": res05 <= 2.5 * APIX,
        "simulate_seconds": round(t_sim, 2), "reconstruct_seconds": round(t_rec, 2),
        "reconstruct_images_per_s_including_startup": round(N_PARTICLES / t_rec, 1),
        "peak_rss_mb_max_child": round(peak_mb, 1),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "fsc_truth": [round(float(x), 4) for x in f],
    }
    out = HERE / "results" / "reconstruct.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"reconstruct: {N_PARTICLES} particles box {BOX} @ {APIX} Å, SNR {SNR}: FSC(truth)=0.5 at {res05:.2f} Å "
          f"(target <= {2.5 * APIX:.2f} Å: {'PASS' if result['pass'] else 'FAIL'}), 0.143 at {res0143:.2f} Å; "
          f"reconstruct {t_rec:.1f} s wall incl. start-up, peak RSS {peak_mb:.0f} MB -> {out}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
