"""A small de novo initial model of tomographic particles, both forms (issue 12): the data of
tests/test_initialmodel_tomo.py (3ENL at 6 Å, two tilt series, 21 tilts ±60°, 48 particles, SNR 5), ``subtomo``
(3D pseudo-subtomograms, and ``--stack2d``; box 32 cropped to 24 unless ``--box`` / ``--crop``), then
``initialmodel`` (6 VDAM iterations, HEALPix order 1), scored against the truth after rigid alignment (FSC 0.5,
hand free). Reports the resolution the run reached (from ``data_vs_prior``; the per-iteration values are in its
log), the final FSC with the truth and the CPU seconds of each initialmodel run (one torch thread).

    PYTHONPATH=<tree>/src python bench/bench_initialmodel_tomo.py --out result.json [--iter 6] [--forms 3d 2d]
        [--box 32 --crop 24]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--iter", type=int, default=6)
    ap.add_argument("--forms", nargs="+", default=["3d", "2d"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--box", type=int, default=32, help="subtomo --b (pixels, 6 Å)")
    ap.add_argument("--crop", type=int, default=24, help="subtomo --crop: the particles' box")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from cryopipe.cli import main as cli_main
    from cryopipe.io.mrc import write_mrc
    from cryopipe.io.star import read_star
    from cryopipe.jobs.simulate import build_volume
    from cryopipe.sim.map_scores import aligned_fsc_summary
    from cryopipe.sim.tiltseries import simulate_tilt_series

    import cryopipe

    here = Path(args.workdir or tempfile.mkdtemp(prefix="bench_im_tomo_"))
    here.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    out_path = Path(args.out).resolve()
    os.chdir(here)
    result = {"code": str(Path(cryopipe.__file__).parent), "iter": args.iter, "box": args.box, "crop": args.crop,
              "load_average": os.getloadavg(),
              "forms": {}}
    try:
        vol, apix = build_volume("3enl", None, 6.0)
        simulate_tilt_series(vol, apix, "Simulate", n_tomograms=2, particles_per_tomogram=24, image_size=(320, 288),
                             thickness_A=400.0, tilt_range=(-60.0, 60.0), tilt_step=6.0, snr=5.0, device="cpu",
                             seed=3, defocus_range=(20000.0, 30000.0))
        write_mrc("truth.mrc", np.asarray(vol, dtype=np.float32), apix)
        for form in args.forms:
            sub = f"Subtomo_{form}"
            extra = ["--stack2d"] if form == "2d" else []
            assert cli_main(["subtomo", "--i", "Simulate/optimisation_set.star", "--b", str(args.box), "--crop",
                             str(args.crop),
                             "--bin", "1", "--o", sub] + extra) == 0
            c0, t0 = _cpu(), time.perf_counter()
            assert cli_main(["initialmodel", "--ios", f"{sub}/optimisation_set.star", "--o", f"IM_{form}/run",
                             "--iter", str(args.iter), "--particle_diameter", "110", "--healpix_order", "1",
                             "--offset_range", "2", "--offset_step", "1"]) == 0
            cpu, wall = _cpu() - c0, time.perf_counter() - t0
            res = []
            for it in range(1, args.iter + 1):
                f = Path(f"IM_{form}") / f"run_it{it:03d}_model.star"
                if f.exists():
                    res.append(round(float(read_star(f)["model_general"]["rlnCurrentResolution"]), 2))
            score = aligned_fsc_summary(Path(f"IM_{form}") / "initial_model.mrc", Path("truth.mrc"))
            result["forms"][form] = {"fsc_truth_0.5_A": score["fsc_truth_0.5_A"], "current_resolution_A": res,
                                     "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}
            print(form, result["forms"][form], flush=True)
    finally:
        os.chdir(cwd)
    out_path.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
