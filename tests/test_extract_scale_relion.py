"""Extraction with ``--scale`` against RELION's own rescaled extraction (issue 11).

The references in ``tests/data/relion31_extract_scale/`` were written by RELION 3.1.3's ``relion_preprocess`` from
the shared ``mic/`` fixture (see that folder's README for the commands and the version check against RELION 5).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

REFERENCE = Path(__file__).parent / "data" / "relion31_extract_scale"


def _run_extract(*argv: str) -> int:
    from cryopipe.jobs import extract as job

    parser = argparse.ArgumentParser(prog="cryopipe extract")
    job.add_arguments(parser)
    return job.main(parser.parse_args(list(argv)))


@pytest.fixture()
def mic_inputs(relion_dir, tmp_path, monkeypatch):
    src = relion_dir / "mic"
    for name in ("Micrographs/mic001.mrc", "Micrographs/mic001_truth.star", "micrographs_ctf.star",
                 "coords_truth_list.star"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("scaled_size", [32, 48])
def test_rescaled_extraction_equals_relion_preprocess(mic_inputs, scaled_size):
    background_radius = scaled_size * 3 // 8  # 24 px of the 64 px box, in rescaled pixels
    out = f"Extract/scale{scaled_size}/"
    assert _run_extract("--i", "micrographs_ctf.star", "--coord_list", "coords_truth_list.star", "--o", out,
                        "--extract", "--extract_size", "64", "--scale", str(scaled_size), "--norm",
                        "--bg_radius", str(background_radius), "--invert_contrast") == 0
    with mrcfile.open(mic_inputs / out / "Micrographs" / "mic001.mrcs", permissive=True) as m:
        ours = np.asarray(m.data, dtype=np.float64)
        assert float(m.voxel_size.x) == pytest.approx(3.0 * 64 / scaled_size)
    reference_stack = REFERENCE / f"Extract_truth_scale{scaled_size}" / "Micrographs" / "mic001.mrcs"
    with mrcfile.open(reference_stack, permissive=True) as m:
        reference = np.asarray(m.data, dtype=np.float64)
    assert ours.shape == reference.shape == (25, scaled_size, scaled_size)
    # in units of the normalised background σ; the unscaled extraction agrees to ~1e-4 the same way
    assert np.abs(ours - reference).max() < 2e-4

    ours_star = starfile.read(mic_inputs / out / "particles.star")
    reference_star = starfile.read(REFERENCE / f"particles_truth_scale{scaled_size}.star")
    for column in ("rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality", "rlnMicrographOriginalPixelSize"):
        assert ours_star["optics"][column].to_numpy(float) == pytest.approx(
            reference_star["optics"][column].to_numpy(float)), column
    shared = [c for c in reference_star["particles"].columns
              if c in ours_star["particles"].columns and c not in ("rlnImageName", "rlnMicrographName")]
    assert {"rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU", "rlnAnglePsi"} <= set(shared)
    for column in shared:
        np.testing.assert_allclose(ours_star["particles"][column].to_numpy(float),
                                   reference_star["particles"][column].to_numpy(float), atol=1e-5, err_msg=column)
    ours_index = ours_star["particles"]["rlnImageName"].str.partition("@")[0].astype(int).to_numpy()
    reference_index = reference_star["particles"]["rlnImageName"].str.partition("@")[0].astype(int).to_numpy()
    np.testing.assert_array_equal(ours_index, reference_index)
