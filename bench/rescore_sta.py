"""Re-score a kept ``bench_sta.py`` project with the current scoring (issue 12), without re-running any job.

The map scores of the benchmark align each map to the truth by a rigid search; that search can settle on a wrong
local optimum (for a low-resolution C6 ring even the mirrored hand), which once made a correct 2D-stack
refinement look like an over-claim (FSC(truth) 42.7 Å "mirrored" where the map, turned by the frame rotation its
particles' poses give, matches the truth to 18.3 Å). This script re-reads the jobs of each form (their folders
from the commands recorded in the JSON), scores the refine3d, reconstruct-particle and postprocess maps with
:func:`cryopipe.jobs.demo_tomo._map_score` given the poses' frame rotation, and writes the results under
``"rescored"`` in each form of the JSON, next to the original scores (which are kept).

Usage: ``python bench/rescore_sta.py [--json bench/results/sta_c6_cpu.json] [--out /tmp/cryopipe_bench_sta]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cryopipe.jobs.demo_tomo import _map_score, _pose_score  # noqa: E402


def _job_of(steps: list[dict], command: str, nth: int = 0) -> str:
    """Output folder (``--o``, prefix stripped) of the ``nth`` recorded step running ``command``."""
    found = [s["command"].split() for s in steps if s["command"].split()[1] == command]
    argv = found[nth]
    out = argv[argv.index("--o") + 1]
    return out if out.endswith("/") else str(Path(out).parent) + "/"


def rescore(form: dict, sim: str = "Simulate/job001/") -> dict:
    truth = Path(sim) / "truth" / "truth_map.mrc"
    parts, tomos = Path(sim) / "truth" / "particles.star", Path(sim) / "truth" / "tomograms.star"

    def poses(star: Path) -> dict:
        return _pose_score(star, Path(sim) / "tomograms.star", parts, tomos, "C6")

    steps = form["steps"]
    ref1, ref2 = _job_of(steps, "refine3d", 0), _job_of(steps, "refine3d", 1)
    rec, rp, pp = _job_of(steps, "star"), _job_of(steps, "reconstruct-particle"), _job_of(steps, "postprocess")
    coarse, after, fine = poses(Path(ref1) / "run_data.star"), poses(Path(rec) / "particles.star"), \
        poses(Path(ref2) / "run_data.star")
    out = {"refine3d_coarse": _map_score(Path(ref1) / "run_class001.mrc", truth, "C6", coarse),
           "reconstruct_particle": _map_score(Path(rp) / "merged.mrc", truth, "C6", after),
           "refine3d_fine": _map_score(Path(ref2) / "run_class001.mrc", truth, "C6", fine),
           "postprocess": _map_score(Path(pp) / "postprocess_masked.mrc", truth, "C6", fine)}
    claim = form["postprocess"]["resolution_0.143_A"]
    out["gold_standard_0.143_A"] = claim
    out["gold_vs_truth_ratio"] = round(claim / out["postprocess"]["fsc_truth_0.5_A"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(HERE / "results" / "sta_c6_cpu.json"))
    ap.add_argument("--out", default="/tmp/cryopipe_bench_sta", help="the kept bench_sta project folder")
    args = ap.parse_args()
    path = Path(args.json).resolve()
    data = json.loads(path.read_text())
    os.chdir(args.out)
    for name, form in data["forms"].items():
        form["rescored"] = rescore(form)
        r = form["rescored"]
        print(f"[{name}] final FSC(truth) 0.5 {r['postprocess']['fsc_truth_0.5_A']} Å "
              f"(alignment: {r['postprocess']['alignment']}); gold-standard {r['gold_standard_0.143_A']} Å = "
              f"{r['gold_vs_truth_ratio']} × truth; refine3d fine {r['refine3d_fine']['fsc_truth_0.5_A']} Å, "
              f"reconstruct-particle {r['reconstruct_particle']['fsc_truth_0.5_A']} Å")
    path.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
