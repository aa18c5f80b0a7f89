"""Scale-out through Dask (issue 15 item 3): the tilt-series jobs ``reconstruct-tomogram``, ``subtomo`` (3D and
``--stack2d``) and ``reconstruct-particle`` with one task per tilt series on a 2-worker loopback ``LocalCluster``
(worker processes that read the tilt images and write the files themselves) give the in-process outputs on the
shared RELION tilt series (2 tilt series, 24 particles); ``--only_do_unfinished`` redoes only what is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from cryopipe.cli import main as cli  # noqa: E402
from cryopipe.engine.backend import make_backend  # noqa: E402
from cryopipe.io.mrc import read_mrc  # noqa: E402


@pytest.fixture(scope="module")
def scheduler():
    """A 2-worker loopback ``LocalCluster`` (worker processes), joined by its address as a cluster would be."""
    be = make_backend("local:2")
    assert be.n_workers == 2
    yield be.client.scheduler.address
    be.close()


def _same_text(a: Path, b: Path, job_a: str, job_b: str) -> None:
    assert a.read_text().replace(job_a, "JOB") == b.read_text().replace(job_b, "JOB"), a.name


def _files(job: Path, pattern: str) -> dict[str, Path]:
    return {p.relative_to(job).as_posix(): p for p in sorted(job.rglob(pattern))}


def test_reconstruct_tomogram_per_tilt_series(relion_tomo_dir, scheduler, tmp_path, monkeypatch):
    """Both tomograms (and their halves) made by two workers equal the in-process ones, tomograms.star too; a
    continued run (``--only_do_unfinished``) on the cluster remakes only the missing tomogram."""
    monkeypatch.chdir(tmp_path)
    base = ["reconstruct-tomogram", "--t", str(relion_tomo_dir / "tomograms.star"), "--bin", "8", "--no_png",
            "--generate_split_tomograms"]
    assert cli(base + ["--o", "Tomograms/job001/"]) == 0
    assert cli(base + ["--o", "Tomograms/job002/", "--dask", scheduler]) == 0
    a, b = _files(tmp_path / "Tomograms/job001", "*.mrc"), _files(tmp_path / "Tomograms/job002", "*.mrc")
    assert len(a) == 6 and a.keys() == b.keys()  # 2 tomograms + 2 halves each
    for k in a:
        x, y = read_mrc(a[k])[0], read_mrc(b[k])[0]
        assert x.shape == y.shape and np.allclose(x, y, rtol=0, atol=1e-6 * np.abs(x).max()), k
    _same_text(tmp_path / "Tomograms/job001/tomograms.star", tmp_path / "Tomograms/job002/tomograms.star",
               "Tomograms/job001/", "Tomograms/job002/")

    gone, kept = b["tomograms/rec_TS_01.mrc"], b["tomograms/rec_TS_02.mrc"]
    stamp = kept.stat().st_mtime_ns
    gone.unlink()
    assert cli(base + ["--o", "Tomograms/job002/", "--only_do_unfinished", "--dask", scheduler]) == 0
    assert kept.stat().st_mtime_ns == stamp  # not reconstructed again
    assert np.allclose(read_mrc(gone)[0], read_mrc(a["tomograms/rec_TS_01.mrc"])[0], rtol=0,
                       atol=1e-6 * np.abs(read_mrc(gone)[0]).max())


@pytest.mark.parametrize("stack2d", [False, True], ids=["3d", "stack2d"])
def test_subtomo_per_tilt_series(relion_tomo_dir, scheduler, tmp_path, monkeypatch, stack2d):
    """Every particle's files written by two workers equal the in-process ones, and so does particles.star (the
    rows assembled in the input's order); a continued run redoes the batch of a removed particle only."""
    monkeypatch.chdir(tmp_path)
    base = ["subtomo", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "32", "--crop", "24", "--bin",
            "4", "--max_dose", "60"] + (["--stack2d"] if stack2d else [])
    assert cli(base + ["--o", "PseudoSubtomo/job001/"]) == 0
    assert cli(base + ["--o", "PseudoSubtomo/job002/", "--dask", scheduler]) == 0
    ja, jb = tmp_path / "PseudoSubtomo/job001", tmp_path / "PseudoSubtomo/job002"
    pattern = "*.mrcs" if stack2d else "*.mrc"
    a, b = _files(ja, pattern), _files(jb, pattern)
    assert len(a) == (24 if stack2d else 48) and a.keys() == b.keys()
    for k in a:  # equal up to float rounding (FFTs with another thread count on the workers)
        x, y = read_mrc(a[k])[0], read_mrc(b[k])[0]
        assert x.shape == y.shape and np.allclose(x, y, rtol=0, atol=1e-5 * np.abs(x).max()), k
    _same_text(ja / "particles.star", jb / "particles.star", "PseudoSubtomo/job001/", "PseudoSubtomo/job002/")

    names = sorted(k for k in b if k.startswith("Subtomograms/TS_02/"))
    gone, kept = b[names[0]], [b[k] for k in b if k.startswith("Subtomograms/TS_01/")]
    stamps = [p.stat().st_mtime_ns for p in kept]
    gone.unlink()
    assert cli(base + ["--o", "PseudoSubtomo/job002/", "--only_do_unfinished", "--dask", scheduler]) == 0
    x = read_mrc(a[names[0]])[0]
    assert np.allclose(read_mrc(gone)[0], x, rtol=0, atol=1e-5 * np.abs(x).max())
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # the other tilt series' files are not written again
    if not stack2d:  # (2D stacks of kept particles lose rlnTomoVisibleFrames on continuation, as in-process)
        _same_text(ja / "particles.star", jb / "particles.star", "PseudoSubtomo/job001/", "PseudoSubtomo/job002/")


def test_reconstruct_particle_per_tilt_series(relion_tomo_dir, scheduler, tmp_path, monkeypatch):
    """Half maps from per-tilt-series sums added in the set's order equal the in-process maps (one accumulator)."""
    monkeypatch.chdir(tmp_path)
    base = ["reconstruct-particle", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "24", "--bin",
            "4", "--max_dose", "60"]
    assert cli(base + ["--o", "rp1"]) == 0
    assert cli(base + ["--o", "rp2", "--dask", scheduler]) == 0
    for name in ("half1.mrc", "half2.mrc", "merged.mrc"):
        x, px = read_mrc(tmp_path / "rp1" / name)
        y, py = read_mrc(tmp_path / "rp2" / name)
        assert px == py and np.abs(x).max() > 0
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * np.abs(x).max(), err_msg=name)


@pytest.fixture(scope="module")
def subtomograms(relion_tomo_dir, tmp_path_factory):
    """The fixture's 24 particles as 3D pseudo-subtomograms and as 2D stacks (crop 16 at 16 Å/px), and the true
    map at that size as the reference."""
    import os

    import torch

    from cryopipe.core.fourier import fourier_rescale
    from cryopipe.io.mrc import write_mrc

    here = tmp_path_factory.mktemp("dask_tomo_refine")
    cwd = os.getcwd()
    os.chdir(here)
    try:
        for name, extra in (("S3d", []), ("S2d", ["--stack2d"])):
            assert cli(["subtomo", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "32", "--crop",
                        "16", "--bin", "4", "--o", name] + extra) == 0
    finally:
        os.chdir(cwd)
    truth, apix = read_mrc(relion_tomo_dir / "truth" / "truth_map.mrc")
    write_mrc(here / "ref16.mrc", fourier_rescale(torch.from_numpy(truth), 16).numpy(), apix * truth.shape[0] / 16)
    return here


@pytest.mark.parametrize("form", ["3d", "2d"])
def test_tomographic_refine3d_on_two_workers_equals_in_process(subtomograms, scheduler, tmp_path, monkeypatch,
                                                                form):
    """refine3d --ios on pseudo-subtomograms (SubtomoOptimiser3D; a global-search iteration with a tilt prior
    centred on the particles' current angles (no rlnAngleTiltPrior in the file), then the final one) and on 2D
    stacks (StackOptimiser3D; local searches from the start, so the chunks read their particles' poses) with its
    chunks on two worker processes gives the in-process map and poses."""
    from cryopipe.io.star import read_star

    monkeypatch.chdir(subtomograms)
    base = ["refine3d", "--ios", f"S{form}/optimisation_set.star", "--ref", "ref16.mrc", "--iter", "2",
            "--healpix_order", "1", "--offset_range", "2", "--offset_step", "1", "--particle_diameter", "180",
            "--ini_high", "40"] + (["--sigma_ang", "10"] if form == "2d" else ["--sigma_tilt", "30"])
    out = tmp_path / "a"
    assert cli(base + ["--o", f"{out}/run"]) == 0
    assert cli(base + ["--o", f"{tmp_path}/b/run", "--dask", scheduler, "--dask_batches_per_worker", "2"]) == 0
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc"):
        x, y = read_mrc(out / name)[0], read_mrc(tmp_path / "b" / name)[0]
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-4 * np.abs(x).max(), err_msg=name)
    a, b = read_star(out / "run_data.star")["particles"], read_star(tmp_path / "b/run_data.star")["particles"]
    assert len(a) == 24
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnOriginZAngst", "rlnMaxValueProbDistribution"):
        np.testing.assert_allclose(b[col].to_numpy(float), a[col].to_numpy(float), atol=1e-3, err_msg=col)
