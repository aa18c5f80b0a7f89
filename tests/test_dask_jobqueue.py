"""The README's dask-jobqueue SLURM example (issue 15 item 5), run as written against a fake SLURM: ``sbatch`` on
PATH is a shell script that starts the submitted job script on this machine in its own process group (and prints
``Submitted batch job <pid>``), ``scancel`` ends that group. Only the site-specific values of the example are
replaced (the Python of the environment, the scheduler port, 2 jobs instead of 4); the workers it starts run
``cryopipe reconstruct --dask scheduler.json`` and give the in-process map. Skipped without dask-jobqueue."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")

README = Path(__file__).resolve().parents[1] / "README.md"

FAKE_SBATCH = """#!/usr/bin/env bash
# fake sbatch: run the job script here, in its own process group, and say its id as SLURM does
set -e
job="$FAKE_SLURM_DIR/job_$$.sh"
cp "${@: -1}" "$job"
setsid bash "$job" > "$job.log" 2>&1 < /dev/null &
echo "$!" >> "$FAKE_SLURM_DIR/jobs"
echo "Submitted batch job $!"
"""

FAKE_SCANCEL = """#!/usr/bin/env bash
# fake scancel: end the job's process group
kill -TERM -- "-$1" 2>/dev/null || true
"""


def readme_slurm_example() -> str:
    """The README's ``slurm_cluster.py`` code block."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith("# slurm_cluster.py")]
    assert len(found) == 1, "README: no (or several) ```python blocks starting with '# slurm_cluster.py'"
    return found[0]


def _site_values(code: str) -> str:
    """The example with this machine's values (each replacement must apply: the README cannot drift away)."""
    for old, new in (('python="/path/to/cryopipe/.venv/bin/python"', f"python={sys.executable!r}"),
                     ('scheduler_options={"port": 8786}', 'scheduler_options={"port": 0, "host": "127.0.0.1"}'),
                     ("cluster.scale(jobs=4)", "cluster.scale(jobs=2)")):
        assert old in code, f"README slurm example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def _end_jobs(fake: Path) -> None:
    """End the process groups our fake sbatch started (only those)."""
    jobs = fake / "jobs"
    for pid in (jobs.read_text().split() if jobs.exists() else []):
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_readme_slurm_example_on_a_fake_slurm(tmp_path, monkeypatch):
    from cryopipe.cli import main as cli
    from cryopipe.io.mrc import read_mrc

    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (tmp_path / "slurm_cluster.py").write_text(_site_values(readme_slurm_example()))
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_DIR=str(fake),
               OMP_NUM_THREADS="1")
    monkeypatch.chdir(tmp_path)
    assert cli(["simulate", "--what", "particles", "--n", "40", "--box", "24", "--angpix", "4", "--seed", "2"]) == 0
    star = "Simulate/job001/particles_truth.star"
    assert cli(["reconstruct", "--i", star, "--ctf", "--o", "a.mrc", "--batch_size", "8"]) == 0

    proc = subprocess.Popen([sys.executable, "slurm_cluster.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (tmp_path / "scheduler.json").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t0 < 60, "the example wrote no scheduler.json"
            time.sleep(0.2)
        jobs = (fake / "jobs").read_text().split()
        assert len(jobs) == 2  # two worker jobs went through sbatch
        script = next(fake.glob("job_*.sh")).read_text()
        assert "#SBATCH --gres=gpu:1" in script and "MALLOC_TRIM_THRESHOLD_" in script and sys.executable in script
        from distributed import Client

        with Client(scheduler_file=str(tmp_path / "scheduler.json"), timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
        assert cli(["reconstruct", "--i", star, "--ctf", "--o", "b.mrc", "--batch_size", "8", "--dask",
                    "scheduler.json", "--dask_batches_per_worker", "2"]) == 0
        a, b = read_mrc("a.mrc")[0], read_mrc("b.mrc")[0]
        assert np.allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _end_jobs(fake)
