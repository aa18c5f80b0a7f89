"""Run the benchmarks in bench/ (all, or those named on the command line) and print their summaries.

Each ``bench/bench_<name>.py`` is a script that writes ``bench/results/<name>.json`` (machine-readable) and prints a
short human summary. Usage: ``bash run.sh bench [name ...]`` (e.g. ``bash run.sh bench projection reconstruct``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        wanted = set(argv)
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
        missing = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if missing:
            print(f"unknown benchmark(s): {', '.join(sorted(missing))}; available: "
                  f"{', '.join(s.stem.removeprefix('bench_') for s in sorted(HERE.glob('bench_*.py')))}", file=sys.stderr)
            return 2
    failed = []
    for s in scripts:
        print(f"=== {s.stem} ===", flush=True)
        rc = subprocess.call([sys.executable, str(s)], cwd=HERE.parent)
        if rc != 0:
            failed.append(s.stem)
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
