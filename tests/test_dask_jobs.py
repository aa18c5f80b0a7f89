"""Scale-out through Dask (issue 15): ``cryopipe autopick`` and ``cryopipe extract`` per micrograph on a 2-worker
loopback ``LocalCluster`` (worker processes that read the micrographs and write the coordinate files / stacks
themselves) give the in-process outputs; ``--continue`` keeps what is done."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from cryopipe.cli import main as cli  # noqa: E402
from cryopipe.engine.backend import make_backend  # noqa: E402
from cryopipe.io.mrc import read_mrc  # noqa: E402
from cryopipe.io.star import read_star  # noqa: E402

LOG = ["--LoG", "--LoG_diam_min", "60", "--LoG_diam_max", "100", "--no_png"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with 3 simulated 256² micrographs (6 particles each)."""
    d = tmp_path_factory.mktemp("daskjobs")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert cli(["simulate", "--what", "micrographs", "--n", "3", "--mic_size", "256", "--n_per_mic", "6",
                    "--snr", "1", "--seed", "5", "--device", "cpu"]) == 0
    finally:
        os.chdir(cwd)
    return d


@pytest.fixture(scope="module")
def scheduler():
    """A 2-worker loopback ``LocalCluster`` (worker processes) started once; the jobs join it by its address
    (``--dask tcp://127.0.0.1:PORT``, as they would join a cluster's scheduler)."""
    be = make_backend("local:2")
    assert be.n_workers == 2
    yield be.client.scheduler.address
    be.close()


def _files(job: Path, pattern: str) -> dict[str, Path]:
    return {p.relative_to(job).as_posix(): p for p in sorted(job.rglob(pattern))}


def _without_job(text: str, job: str) -> str:
    return text.replace(job, "JOB/")


def test_autopick_and_extract_on_two_workers_equal_in_process(project, scheduler, monkeypatch):
    monkeypatch.chdir(project)
    mics = "Simulate/job001/micrographs.star"
    assert cli(["autopick", "--i", mics, "--odir", "AutoPick/job002/"] + LOG) == 0
    assert cli(["autopick", "--i", mics, "--odir", "AutoPick/job003/", "--dask", scheduler,
                "--dask_batches_per_worker", "2"] + LOG) == 0
    a = _files(project / "AutoPick/job002", "*_autopick.star")
    b = _files(project / "AutoPick/job003", "*_autopick.star")
    assert len(a) == 3 and a.keys() == b.keys()
    n_picks = 0
    for k in a:  # the same coordinates and figures of merit, byte for byte
        assert a[k].read_text() == b[k].read_text(), k
        n_picks += len(read_star(a[k])[""])
    assert n_picks >= 6
    for name in ("autopick.star", "summary.star"):  # list and summary in micrograph order
        assert (_without_job((project / "AutoPick/job002" / name).read_text(), "AutoPick/job002/")
                == _without_job((project / "AutoPick/job003" / name).read_text(), "AutoPick/job003/")), name

    ext = ["extract", "--i", mics, "--coord_list", "AutoPick/job002/autopick.star", "--extract_size", "32",
           "--scale", "24", "--norm", "--invert_contrast", "--white_dust", "3", "--black_dust", "3", "--batch", "4"]
    assert cli(ext + ["--o", "Extract/job004/"]) == 0
    assert cli(ext + ["--o", "Extract/job005/", "--dask", scheduler, "--dask_batches_per_worker", "1"]) == 0
    sa, sb = _files(project / "Extract/job004", "*.mrcs"), _files(project / "Extract/job005", "*.mrcs")
    assert len(sa) == 3 and sa.keys() == sb.keys()
    for k in sa:  # the same particle stacks (dust noise seeded per micrograph)
        x, y = read_mrc(sa[k])[0], read_mrc(sb[k])[0]
        assert x.shape == y.shape and np.allclose(x, y, rtol=0, atol=1e-5 * np.abs(x).max()), k
    for k in _files(project / "Extract/job004", "*_extract.star"):
        assert (_without_job((project / "Extract/job004" / k).read_text(), "Extract/job004/")
                == _without_job((project / "Extract/job005" / k).read_text(), "Extract/job005/")), k
    pa = _without_job((project / "Extract/job004/particles.star").read_text(), "Extract/job004/")
    pb = _without_job((project / "Extract/job005/particles.star").read_text(), "Extract/job005/")
    assert pa == pb and pa.count("@Extract") == 0 and pa.count("@JOB/") == n_picks


def test_template_autopick_on_two_workers_equals_in_process(project, scheduler, monkeypatch):
    """Template picking (``--ref gauss``; the picker holds its prepared references) with FOM maps written by the
    workers gives the in-process coordinate files and maps."""
    monkeypatch.chdir(project)
    base = ["autopick", "--i", "Simulate/job001/micrographs.star", "--ref", "gauss", "--particle_diameter", "90",
            "--no_png", "--write_fom_maps"]
    assert cli(base + ["--odir", "AutoPick/job006/"]) == 0
    assert cli(base + ["--odir", "AutoPick/job007/", "--dask", scheduler]) == 0
    a = _files(project / "AutoPick/job006", "*_autopick.star")
    b = _files(project / "AutoPick/job007", "*_autopick.star")
    assert len(a) == 3 and a.keys() == b.keys()
    assert all(a[k].read_text() == b[k].read_text() for k in a)
    ma, mb = _files(project / "AutoPick/job006", "*_fom.mrcs"), _files(project / "AutoPick/job007", "*_fom.mrcs")
    assert len(ma) == 3 and ma.keys() == mb.keys()
    assert all(np.array_equal(read_mrc(ma[k])[0], read_mrc(mb[k])[0]) for k in ma)


def test_continue_with_dask_keeps_finished_micrographs(project, monkeypatch):
    """``--continue`` with ``--dask``: only the micrographs without outputs are redone
    (the others keep their files), and the job's STAR files equal a complete run's."""
    monkeypatch.chdir(project)
    mics = "Simulate/job001/micrographs.star"
    dask = ["--dask", "local:2:threads"]
    assert cli(["autopick", "--i", mics, "--odir", "AutoPick/job010/"] + LOG) == 0
    job = project / "AutoPick/job010"
    coords = _files(job, "*_autopick.star")
    ref = {k: p.read_text() for k, p in coords.items()}
    first, *rest = sorted(coords)
    coords[first].unlink()
    stamp = {k: coords[k].stat().st_mtime_ns for k in rest}
    assert cli(["autopick", "--i", mics, "--odir", "AutoPick/job010/", "--continue"] + dask + LOG) == 0
    assert coords[first].read_text() == ref[first]
    assert all(coords[k].stat().st_mtime_ns == stamp[k] for k in rest)  # not picked again

    ext = ["extract", "--i", mics, "--coord_list", "AutoPick/job010/autopick.star", "--extract_size", "32",
           "--norm", "--o", "Extract/job011/"]
    assert cli(ext) == 0
    ejob = project / "Extract/job011"
    whole = (ejob / "particles.star").read_text()
    stacks = _files(ejob, "*.mrcs")
    first, *rest = sorted(stacks)
    pix = read_mrc(stacks[first])[0]
    stacks[first].unlink()
    stamp = {k: stacks[k].stat().st_mtime_ns for k in rest}
    assert cli(ext + ["--continue"] + dask) == 0
    assert np.array_equal(read_mrc(stacks[first])[0], pix)
    assert all(stacks[k].stat().st_mtime_ns == stamp[k] for k in rest)  # not extracted again
    assert (ejob / "particles.star").read_text() == whole


def test_lost_scheduler_then_continue_in_process(relion_dir, tmp_path, monkeypatch):
    """class2d on a scheduler that is shut down mid-run ends with the one-line "lost the Dask scheduler" error
    (no traceback through cryopipe; Dask's client logs its failed reconnection) and keeps its finished
    iterations; ``class2d --continue <last _optimiser.star>`` in this process finishes the run with the classes
    and assignments of an uninterrupted in-process run (issue 15 item 4; the continuation restarts from the
    written files, float32 images and rounded STAR values, hence rtol 1e-4 as in test_class2d)."""
    import logging
    import subprocess
    import sys
    import time

    from distributed import LocalCluster

    from cryopipe.io.particles import read_particles

    from engine_helpers import write_particle_stack

    write_particle_stack(relion_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    common = ["class2d", "--i", "particles.star", "--K", "2", "--iter", "3", "--ctf", "--particle_diameter", "110",
              "--psi_step", "20", "--offset_range", "2", "--offset_step", "1", "--random_seed", "7",
              "--batch_size", "8"]
    # worker threads in this process behind a TCP scheduler, so that the job (a subprocess) can lose it
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                           dashboard_address=":0", silence_logs=logging.ERROR)
    env = dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="3s", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "cryopipe"] + common + ["--o", "d/run", "--dask",
                            cluster.scheduler_address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        t0 = time.monotonic()
        while not (tmp_path / "d/run_it001_optimiser.star").exists() and proc.poll() is None:
            assert time.monotonic() - t0 < 120, "class2d --dask did not finish iteration 1"
            time.sleep(0.02)
    finally:
        cluster.close()  # the scheduler goes away while iteration 2 runs
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "cryopipe/" not in err and "cryopipe\\" not in err  # no traceback through cryopipe (Dask may log its own)
    last = err.strip().splitlines()[-1]
    assert last.startswith("cryopipe class2d: error: --dask tcp://") and "lost the Dask scheduler" in last, err
    assert "_optimiser.star" in last
    done = sorted((tmp_path / "d").glob("run_it*_optimiser.star"))
    assert done and not (tmp_path / "d/run_it003_optimiser.star").exists()  # it did stop mid-run

    assert cli(["class2d", "--continue", str(done[-1].relative_to(tmp_path)), "--o", "d/run", "--iter", "3"]) == 0
    assert cli(common + ["--o", "full/run"]) == 0
    a, b = read_mrc(tmp_path / "full/run_it003_classes.mrcs")[0], read_mrc(tmp_path / "d/run_it003_classes.mrcs")[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
    da = read_particles(tmp_path / "full/run_it003_data.star").particles
    db = read_particles(tmp_path / "d/run_it003_data.star").particles
    assert np.array_equal(da["rlnClassNumber"].to_numpy(), db["rlnClassNumber"].to_numpy())
    np.testing.assert_allclose(db["rlnAnglePsi"].to_numpy(float), da["rlnAnglePsi"].to_numpy(float), atol=1e-3)


def _echo_or_raise(static, snapshot, item, device=None):
    """A chunk step for the error tests: returns ``item``, raises it when it is an exception."""
    if isinstance(item, Exception):
        raise item
    return item


def test_task_errors_pass_through_and_a_closed_cluster_is_a_lost_scheduler(monkeypatch):
    """A task's own error reaches the caller as it is (a user error stays a one-line CryopipeError, a bug or a
    missing file its own type); once the scheduler is gone (here: its cluster closed, so the client has no scheduler
    connection) the
    next iteration's map is the one-line "lost the Dask scheduler" error, whatever Dask raised."""
    from cryopipe.errors import CryopipeError

    be = make_backend("local:1:threads")
    try:
        assert be.map(_echo_or_raise, None, None, [1, 2, 3]) == [1, 2, 3]
        with pytest.raises(CryopipeError, match="^bad micrograph$"):
            be.map(_echo_or_raise, None, None, [1, CryopipeError("bad micrograph")])
        with pytest.raises(ZeroDivisionError):
            be.map(_echo_or_raise, None, None, [ZeroDivisionError("bug")])
        with pytest.raises(FileNotFoundError):  # a worker's OSError is not a lost scheduler
            be.map(_echo_or_raise, None, None, [FileNotFoundError("no such micrograph")])
        be._cluster.close()
        with pytest.raises(CryopipeError, match="lost the Dask scheduler.*--continue"):
            be.map(_echo_or_raise, None, None, [1])
    finally:
        be.client.close()


def test_no_dask_import_for_picking_and_extraction():
    import subprocess
    import sys

    code = ("import sys, cryopipe.jobs.autopick, cryopipe.jobs.extract, cryopipe.picking.pick_step, "
            "cryopipe.extraction.extract_step; assert 'distributed' not in sys.modules and 'dask' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
