"""cryopipe mask-create: RELION relion_mask_create fixture, distance-transform exactness, options, CLI, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from cryopipe.cli import main as cli_main
from cryopipe.core.mask_ops import (
    auto_mask,
    combine_threshold,
    extend_mask,
    raised_crown_mask,
    soft_edge,
    squared_distance_to,
)
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star
from cryopipe.core.mask_ops import create_mask

FIXTURE_ARGS = ["--ini_threshold", "0.004976", "--extend_inimask", "2", "--width_soft_edge", "3", "--angpix", "3"]


@pytest.fixture(scope="module")
def ref_map(relion_dir):
    return read_mrc(relion_dir / "ref_map.mrc")


def test_fixture_mask_identical(relion_dir, ref_map):
    """relion_mask_create --ini_threshold 0.004976 --extend_inimask 2 --width_soft_edge 3 (fixtures §8)."""
    vol, apix = ref_map
    ref, _ = read_mrc(relion_dir / "mask.mrc")
    ours = create_mask(vol, apix, ini_threshold=0.004976, extend_inimask=2, width_soft_edge=3, device="cpu")
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours == 1.0, ref == 1.0)  # binary (extended) part identical
    np.testing.assert_array_equal(ours > 0, ref > 0)  # soft-edge support identical
    assert np.abs(ours - ref).max() < 1e-6
    assert abs((ours == 1).mean() - 0.19994) < 1e-4 and abs((ours > 0).mean() - 0.3404) < 1e-4


def _edt_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance to the nearest True voxel (independent reference: scipy, no wrap-around)."""
    return ndimage.distance_transform_edt(~mask)


@pytest.mark.parametrize("radius", [1.0, 2.0, 2.5, 4.7])
def test_truncated_distance_transform_exact(radius):
    rng = np.random.default_rng(3)
    m = rng.random((23, 30, 27)) < 0.02
    d2 = squared_distance_to(torch.from_numpy(m), radius).numpy()
    ref = _edt_to(m) ** 2
    near = ref < radius ** 2
    np.testing.assert_allclose(d2[near], ref[near], atol=1e-9)
    assert (d2[~near] >= radius ** 2 - 1e-9).all()


def test_extend_shrink_and_soft_edge_against_reference():
    rng = np.random.default_rng(5)
    blobs = ndimage.gaussian_filter(rng.standard_normal((32, 32, 32)), 2.0)
    b = blobs > 0.05
    t = torch.from_numpy(b)
    # extend by 3: 0-voxels with a 1-voxel at distance < 3 (strict) become 1
    np.testing.assert_array_equal(extend_mask(t, 3).numpy(), b | (_edt_to(b) < 3))
    # shrink by 2: 1-voxels with a 0-voxel at distance < 2 become 0
    np.testing.assert_array_equal(extend_mask(t, -2).numpy(), b & ~(_edt_to(~b) < 2))
    # soft edge of width 4
    d = _edt_to(b)
    ref = np.where(b, 1.0, np.where(d < 4, 0.5 + 0.5 * np.cos(np.pi * d / 4), 0.0))
    np.testing.assert_allclose(soft_edge(t, 4).numpy(), ref, atol=1e-6)


def test_combinations_and_invert_binary(ref_map):
    vol, apix = ref_map
    other = np.roll(vol, 5, axis=2)
    thr = 0.01
    v, o = torch.from_numpy(vol), torch.from_numpy(other)
    expected = {"and": (vol > thr) & (other > thr), "or": (vol > thr) | (other > thr),
                "and_not": (vol > thr) & (other < thr), "or_not": (vol > thr) | (other < thr)}
    for op, ref in expected.items():
        np.testing.assert_array_equal(combine_threshold(v, o, thr, op).numpy(), ref)
        m = create_mask(vol, apix, ini_threshold=thr, other=other, op=op, device="cpu")
        np.testing.assert_array_equal(m, ref.astype(np.float32))
    soft = create_mask(vol, apix, ini_threshold=thr, extend_inimask=1, width_soft_edge=4, device="cpu")
    inv = create_mask(vol, apix, ini_threshold=thr, extend_inimask=1, width_soft_edge=4, invert=True, device="cpu")
    np.testing.assert_allclose(inv, 1.0 - soft, atol=1e-7)
    # --binary: the soft mask at 0.5 = the extended binary mask grown by w/2 (d <= 2 for w = 4)
    binm = create_mask(vol, apix, ini_threshold=thr, extend_inimask=1, width_soft_edge=4, binary=True, device="cpu")
    ext = (vol >= thr) | (_edt_to(vol >= thr) < 1)
    np.testing.assert_array_equal(binm, (ext | (_edt_to(ext) <= 2.0 + 1e-9)).astype(np.float32))
    assert set(np.unique(binm)) <= {0.0, 1.0}


def test_lowpass_then_threshold(ref_map):
    """--lowpass 12 Å: thresholding the map low-pass filtered by RELION's raised-cosine filter (numpy reference)."""
    vol, apix = ref_map
    n = vol.shape[0]
    ft = np.fft.rfftn(vol.astype(np.float64))
    k = np.fft.fftfreq(n, 1.0 / n)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(n // 2 + 1)[None, None, :] ** 2)
    shell = math.floor(n * apix / 12.0 + 0.5)
    filt = np.clip((r - (shell - 1)) / 2.0, 0, 1)
    filt = 0.5 + 0.5 * np.cos(np.pi * filt)
    filtered = np.fft.irfftn(ft * filt, s=vol.shape, axes=(0, 1, 2))
    ours = create_mask(vol, apix, ini_threshold=0.01, lowpass=12.0, device="cpu")
    ref = (filtered >= 0.01).astype(np.float32)
    assert (ours != ref).sum() <= 2  # float32 vs float64 filtering may flip voxels exactly at the threshold
    assert (ours != create_mask(vol, apix, ini_threshold=0.01, device="cpu")).sum() > 100


def test_denovo_crown():
    m = raised_crown_mask(40, 5.0, 12.0, 3.0).numpy()
    c = 20
    assert m[c, c, c] == 0.0 and m[c, c, c + 8] == 1.0  # centre empty, shell full
    assert abs(m[c, c, c + 13] - 0.75) < 1e-6  # outer edge: 0.5 - 0.5 cos(pi (15 - 13) / 3)
    assert abs(m[c, c + 3, c] - 0.25) < 1e-6  # inner edge: 0.5 - 0.5 cos(pi (3 - 2) / 3)
    assert m[c, c, c + 16] == 0.0 and m[0, 0, 0] == 0.0


def test_auto_mask_gpu_matches_cpu(ref_map):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    vol = torch.from_numpy(ref_map[0])
    cpu = auto_mask(vol, 0.004976, 2, 3)
    gpu = auto_mask(vol.cuda(), 0.004976, 2, 3).cpu()
    assert torch.equal(cpu, gpu)


def test_cli_file_and_job(relion_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref, _ = read_mrc(relion_dir / "mask.mrc")
    assert cli_main(["mask-create", "--i", str(relion_dir / "ref_map.mrc"), "--o", "out/mask.mrc", *FIXTURE_ARGS]) == 0
    m, apix = read_mrc(tmp_path / "out" / "mask.mrc")
    assert apix == pytest.approx(3.0) and np.abs(m - ref).max() < 1e-6
    assert not (tmp_path / "default_pipeline.star").exists()  # a plain file, no job bookkeeping
    # project job
    assert cli_main(["mask-create", "--i", str(relion_dir / "ref_map.mrc"), *FIXTURE_ARGS]) == 0
    job = tmp_path / "MaskCreate" / "job001"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert np.abs(read_mrc(job / "mask.mrc")[0] - ref).max() < 1e-6
    nodes = read_star(tmp_path / "default_pipeline.star")["pipeline_nodes"]
    row = nodes[nodes["rlnPipeLineNodeName"] == "MaskCreate/job001/mask.mrc"]
    assert list(row["rlnPipeLineNodeTypeLabel"]) == ["Mask3D.mrc.relion"]


def test_cli_errors_leave_nothing(relion_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = tmp_path / "small.mrc"
    from cryopipe.io.mrc import write_mrc

    write_mrc(small, np.zeros((32, 32, 32), np.float32), 3.0)
    rc = cli_main(["mask-create", "--i", str(relion_dir / "ref_map.mrc"), "--and", str(small), "--o", "m.mrc"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "small.mrc" in err and "shape" in err and len(err.splitlines()) == 1
    rc = cli_main(["mask-create", "--i", str(tmp_path / "missing.mrc")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "missing.mrc" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.mrc").exists() and not (tmp_path / "MaskCreate").exists()
