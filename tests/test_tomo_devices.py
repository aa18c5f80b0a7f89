"""The tilt-series jobs give the same results on CPU and on CUDA (issue 10: "runs on CPU and CUDA with the same
code"), on RELION's fixture tilt series.

The second device is CUDA; without a CUDA device these tests are skipped. ``CRYOPIPE_TEST_SECOND_DEVICE=cpu``
runs them with CPU as the second device too, which checks the tests themselves on a machine without a GPU
(device strings are passed through every job's ``device=`` argument, so only the device differs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cryopipe.io.mrc import read_mrc
from cryopipe.jobs.reconstruct_particle import reconstruct_particle
from cryopipe.jobs.reconstruct_tomogram import reconstruct_tomograms
from cryopipe.jobs.subtomo import subtomo

SECOND = os.environ.get("CRYOPIPE_TEST_SECOND_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(SECOND == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (or CRYOPIPE_TEST_SECOND_DEVICE=cpu)")


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def test_reconstruct_particle_same_maps(relion_tomo_dir):
    maps = {dev: reconstruct_particle(relion_tomo_dir / "particles.star", relion_tomo_dir / "tomograms.star",
                                      box=48, crop=40, binning=2, device=dev, progress=False)
            for dev in ("cpu", SECOND)}
    for name in ("half1", "half2", "merged"):
        assert _relative_difference(getattr(maps["cpu"], name), getattr(maps[SECOND], name)) < 1e-4, name
    assert maps["cpu"].n_images == maps[SECOND].n_images


@pytest.mark.parametrize("stack2d", [False, True], ids=["3d", "stack2d"])
def test_subtomo_same_volumes(relion_tomo_dir, tmp_path, stack2d):
    for dev in ("cpu", SECOND):
        subtomo(relion_tomo_dir / "particles.star", relion_tomo_dir / "tomograms.star", tmp_path / dev, box=64,
                crop=32, binning=2, stack2d=stack2d, device=dev, progress=False)
    files = sorted(p.relative_to(tmp_path / "cpu") for p in (tmp_path / "cpu").rglob("*.mrc*"))
    assert files and files == sorted(p.relative_to(tmp_path / SECOND) for p in (tmp_path / SECOND).rglob("*.mrc*"))
    for rel in files:
        a, b = read_mrc(tmp_path / "cpu" / rel)[0], read_mrc(tmp_path / SECOND / rel)[0]
        assert a.shape == b.shape and _relative_difference(a, b) < 1e-4, rel


def test_reconstruct_tomogram_same_volume(relion_tomo_dir, tmp_path):
    for dev in ("cpu", SECOND):
        reconstruct_tomograms(relion_tomo_dir / "tomograms.star", tmp_path / dev, tomo_name="TS_01", binning=8,
                              w=304, h=336, d=96, device=dev, png=False, progress=False)
    rel = sorted(p.relative_to(tmp_path / "cpu") for p in (tmp_path / "cpu").rglob("*.mrc"))
    assert rel
    for r in rel:
        a, b = read_mrc(tmp_path / "cpu" / r)[0], read_mrc(tmp_path / SECOND / r)[0]
        assert a.shape == b.shape and _relative_difference(a, b) < 1e-4, r
