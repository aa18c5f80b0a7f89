"""Tomogram reconstruction (cryopipe.tomo.tomogram, `cryopipe reconstruct-tomogram`) against RELION 5.0.1's
``Tomograms/tomograms/rec_TS_01.mrc`` (bin 4, README 2e) and the truth geometry of the fixture particles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryopipe.cli import main as cli_main
from cryopipe.core.fourier import lowpass_real
from cryopipe.core.tilt_geometry import projection_matrices
from cryopipe.io.mrc import mrc_info, read_mrc
from cryopipe.io.star import read_star
from cryopipe.io.tomography import read_tomograms
from cryopipe.tomo.evaluate import dark_centroids, position_errors
from cryopipe.tomo.tomogram import (
    fourier_bin,
    iter_tomogram_slabs,
    output_shape,
    phase_flip_signs,
    prepare_tilt_stack,
    reconstruct_tomogram,
    split_by_dose,
    weighting_filters,
    write_tomogram,
)

SIZE = (304, 336, 96)  # the --w --h --d of the RELION run
BIN = 4


def lowpass(volume: np.ndarray, res_px: float = 4.0) -> np.ndarray:
    """Hard low-pass of a volume to ``res_px`` voxels (|k| <= 1/res_px cycles/voxel)."""
    return lowpass_real(torch.from_numpy(np.asarray(volume, dtype=np.float64)), 1.0 / res_px).numpy()


def cc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _stack(ts, zrot_sign: float = 1.0, snr: float = 10.0):
    a = ts.tilt_angles()
    P = projection_matrices(a[:, 0], a[:, 1], zrot_sign * a[:, 2], ts.shifts_angst(), ts.pixel_size, SIZE,
                            ts.image_size)
    shape = output_shape(SIZE, BIN)
    return prepare_tilt_stack(ts.read_images, P, ts.image_size, BIN, shape[0] * BIN, snr=snr), shape


@pytest.fixture(scope="module")
def ts01(relion_tomo_dir):
    return read_tomograms(relion_tomo_dir / "tomograms.star")["TS_01"]


@pytest.fixture(scope="module")
def relion_rec(relion_tomo_dir):
    return read_mrc(relion_tomo_dir / "Tomograms" / "tomograms" / "rec_TS_01.mrc")


@pytest.fixture(scope="module")
def ours(ts01):
    stack, shape = _stack(ts01)
    return stack, shape, reconstruct_tomogram(stack, shape, BIN, shape[0] * BIN)


def test_shape_and_correlation_with_relion(ours, relion_rec):
    _, shape, vol = ours
    ref, px = relion_rec
    assert vol.shape == ref.shape == (24, 84, 76) == shape
    assert px == pytest.approx(16.0)
    c = cc(lowpass(vol), lowpass(ref))
    assert c >= 0.9, c
    # RELION's top/bottom sections carry wrap-around artefacts of its 3D FFT division; inside they agree closer
    c_in = cc(lowpass(vol)[2:-2], lowpass(ref)[2:-2])
    assert c_in >= 0.95, c_in


def _subvoxel_peak(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Shift (z, y, x voxels) of the cross-correlation peak of ``a`` against ``b`` (parabolic sub-voxel fit)."""
    xc = np.fft.irfftn(np.fft.rfftn(a - a.mean()) * np.conj(np.fft.rfftn(b - b.mean())), s=a.shape, axes=(0, 1, 2))
    i = np.array(np.unravel_index(np.argmax(xc), xc.shape))
    shift = []
    for ax in range(3):
        values = []
        for d in (-1, 0, 1):
            j = i.copy()
            j[ax] = (j[ax] + d) % xc.shape[ax]
            values.append(xc[tuple(j)])
        lo, mid, hi = values
        whole = (i[ax] + xc.shape[ax] // 2) % xc.shape[ax] - xc.shape[ax] // 2
        shift.append(whole + 0.5 * (lo - hi) / (lo - 2 * mid + hi))
    return np.array(shift)


def test_cross_correlation_peak_at_zero_shift(ours, relion_rec):
    """Same geometry as RELION to 0.05 voxel (0.2 unbinned px; an offset of 1 unbinned px shows as 0.23)."""
    shift = _subvoxel_peak(lowpass(ours[2]), lowpass(relion_rec[0]))
    assert np.abs(shift).max() < 0.05, shift


def test_particles_at_their_voxels(ours, relion_rec, relion_tomo_dir):
    """Voxel (i, j, k) = tomogram position 4·(k, j, i) px: each TS_01 particle's density is centred on its true
    position / 4 in our map (each to 0.2 voxel, on average to 0.05 voxel = 0.2 unbinned px) and where RELION's map
    has it (0.4 voxel: RELION's map has wrap-around artefacts near its top and bottom)."""
    geometry = json.loads((relion_tomo_dir / "truth" / "truth_geometry.json").read_text())
    pos = np.array([p["position_px_decentred"] for p in geometry["particles"] if p["name"].startswith("TS_01/")])
    pos = pos / BIN
    assert len(pos) == 12
    ours_c = dark_centroids(torch.from_numpy(ours[2]), torch.from_numpy(pos)).numpy()
    relion_c = dark_centroids(torch.from_numpy(relion_rec[0]), torch.from_numpy(pos)).numpy()
    errors = position_errors(torch.from_numpy(ours[2]), torch.from_numpy(pos * BIN), BIN).numpy()
    np.testing.assert_allclose(errors, np.linalg.norm(ours_c - pos, axis=1), atol=1e-9)
    error = ours_c - pos
    assert np.abs(error).max() < 0.2, np.abs(error).max(axis=0)
    assert np.abs(error.mean(axis=0)).max() < 0.05, error.mean(axis=0)
    assert np.abs(ours_c - relion_c).max() < 0.4, np.abs(ours_c - relion_c).max(axis=0)


def test_wrong_tilt_axis_is_detected(ts01, relion_rec):
    stack, shape = _stack(ts01, zrot_sign=-1.0)
    wrong = reconstruct_tomogram(stack, shape, BIN, shape[0] * BIN)
    assert cc(lowpass(wrong), lowpass(relion_rec[0])) < 0.3


def test_weighting_matters(ts01, relion_rec):
    """Almost no weighting (SNR → 0 makes the filter flat) correlates clearly worse: the test sees the filter."""
    stack, shape = _stack(ts01, snr=1e-4)
    flat = reconstruct_tomogram(stack, shape, BIN, shape[0] * BIN)
    assert cc(lowpass(flat), lowpass(relion_rec[0])) < 0.85


def test_slab_by_slab_equals_one_pass(ours, tmp_path):
    stack, shape, vol = ours
    tiny = reconstruct_tomogram(stack, shape, BIN, shape[0] * BIN, slab_voxels=1, max_samples=5000)
    np.testing.assert_allclose(tiny, vol, rtol=1e-5, atol=1e-6 * np.abs(vol).max())
    path = tmp_path / "rec.mrc"
    stats = write_tomogram(path, iter_tomogram_slabs(stack, shape, BIN, shape[0] * BIN, slab_voxels=3 * 84 * 76),
                           shape, 16.0)
    written, px = read_mrc(path)
    assert px == pytest.approx(16.0) and not mrc_info(path).is_stack
    np.testing.assert_allclose(written, vol, rtol=1e-5, atol=1e-6 * np.abs(vol).max())
    assert stats["rms"] == pytest.approx(float(vol.std()), rel=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["rec.mrc"]  # the temporary file was renamed


def test_filters_and_binning():
    # at k = 0 every tilt overlaps: w = 1 / (Σ 1/|n_gz| + 1/SNR)
    R = projection_matrices([0.0, 0.0], [0.0, 60.0], [0.0, 0.0], np.zeros((2, 2)), 1.0, (64, 64, 16), (64, 64))
    w = weighting_filters(R[:, :3, :3], (32, 32), (64, 64), 16.0, snr=10.0)
    assert w[:, 0, 0] == pytest.approx(torch.full((2,), 1 / (1 + 2 + 0.1)), rel=1e-5)
    # across the tilt axis (x) far from the overlap region a tilt's own plane is all there is:
    # w = 1 / (1/|n_fz| + 1/SNR); along the tilt axis (y) the planes always meet
    assert float(w[0, 0, 16]) == pytest.approx(1 / 1.1, rel=1e-5)
    assert float(w[1, 0, 16]) == pytest.approx(1 / 2.1, rel=1e-5)
    assert float(w[0, 16, 0]) == pytest.approx(1 / 3.1, rel=1e-5)
    # Fourier binning keeps values of a smooth image and puts binned pixel x_b at unbinned 2·x_b
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    img = torch.cos(2 * torch.pi * (xx / 16 + yy / 24))[None]
    binned = fourier_bin(img, (24, 32), zero_dc=False)
    torch.testing.assert_close(binned[0], img[0, ::2, ::2], atol=1e-5, rtol=0)


def test_phase_flip_signs():
    # first CTF zero of a 20000 Å defocus at 300 kV (Cs 2.7 mm, Q0 0.07) lies near 1/(sqrt(λ·Δf)) ≈ 1/19.7 Å⁻¹
    s = phase_flip_signs(torch.tensor([[20000.0, 20000.0, 0.0]]), 2.0, (200, 200), (200, 200), 300.0, 2.7, 0.07)
    k = np.arange(101) / (200 * 2.0)
    row = s[0, 0].numpy()
    assert row[0] == 1 and row.min() == -1
    first_zero = k[np.argmax(row < 0)]
    assert 1 / 22 < first_zero < 1 / 18


def test_split_by_dose():
    first, second = split_by_dose([9.0, 0.0, 3.0, 6.0, 12.0])
    assert first.tolist() == [1, 3, 4] and second.tolist() == [0, 2]


def test_cli(relion_tomo_dir, tmp_path, capsys):
    out = tmp_path / "Tomograms"
    rc = cli_main(["reconstruct-tomogram", "--t", str(relion_tomo_dir / "tomograms.star"), "--tn", "TS_01",
                   "--o", str(out), "--w", "304", "--h", "336", "--d", "96", "--bin", "4",
                   "--generate_split_tomograms", "--j", "2"])
    assert rc == 0
    rec, px = read_mrc(out / "tomograms" / "rec_TS_01.mrc")
    ref, _ = read_mrc(relion_tomo_dir / "Tomograms" / "tomograms" / "rec_TS_01.mrc")
    assert rec.shape == ref.shape and px == pytest.approx(16.0)
    assert cc(lowpass(rec), lowpass(ref)) >= 0.9
    halves = [read_mrc(out / "tomograms" / f"rec_TS_01_half{i}.mrc")[0] for i in (1, 2)]
    for half in halves:
        assert half.shape == rec.shape
        assert cc(lowpass(half), lowpass(rec)) > 0.8
    assert (out / "tomograms" / "rec_TS_01.png").stat().st_size > 1000
    table = read_star(out / "tomograms.star")["global"]
    assert table["rlnTomoName"].tolist() == ["TS_01"]
    for col in ("rlnTomoReconstructedTomogram", "rlnTomoReconstructedTomogramHalf1",
                "rlnTomoReconstructedTomogramHalf2"):
        assert Path(table[col].iloc[0]).resolve().exists()
    assert float(table["rlnTomoTomogramBinning"].iloc[0]) == 4.0
    assert "z-sections" in capsys.readouterr().out
    # bad input: one line on stderr, exit status 1
    rc = cli_main(["reconstruct-tomogram", "--t", str(relion_tomo_dir / "tomograms.star"), "--tn", "TS_99",
                   "--o", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "TS_99" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_job_in_a_project(relion_tomo_dir, tmp_path, monkeypatch):
    """Without --o the job is Tomograms/job001/ of the project in the current directory, recorded with RELION 5's
    process label and its tomograms.star as the output node."""
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["reconstruct-tomogram", "--t", str(relion_tomo_dir / "tomograms.star"), "--tn", "TS_02",
                   "--bin", "8", "--no_png"])
    assert rc == 0
    assert (tmp_path / "Tomograms" / "job001" / "tomograms" / "rec_TS_02.mrc").exists()
    pipe = read_star(tmp_path / "default_pipeline.star")
    procs = pipe["pipeline_processes"]
    assert procs["rlnPipeLineProcessName"].tolist() == ["Tomograms/job001/"]
    assert procs["rlnPipeLineProcessTypeLabel"].tolist() == ["relion.reconstructtomograms"]
    assert procs["rlnPipeLineProcessStatusLabel"].tolist() == ["Succeeded"]
    assert "Tomograms/job001/tomograms.star" in pipe["pipeline_nodes"]["rlnPipeLineNodeName"].tolist()
    # an interrupted job continues: finished tomograms are kept, missing ones are made
    rc = cli_main(["reconstruct-tomogram", "--t", str(relion_tomo_dir / "tomograms.star"), "--bin", "8", "--no_png",
                   "--o", "Tomograms/job001/", "--only_do_unfinished"])
    assert rc == 0
    done = tmp_path / "Tomograms" / "job001" / "tomograms" / "rec_TS_02.mrc"
    made = tmp_path / "Tomograms" / "job001" / "tomograms" / "rec_TS_01.mrc"
    assert made.exists()
    before = done.stat().st_mtime_ns
    made.unlink()
    rc = cli_main(["reconstruct-tomogram", "--t", str(relion_tomo_dir / "tomograms.star"), "--bin", "8", "--no_png",
                   "--o", "Tomograms/job001/", "--only_do_unfinished"])
    assert rc == 0 and made.exists() and done.stat().st_mtime_ns == before
    assert read_star(tmp_path / "Tomograms" / "job001" / "tomograms.star")["global"]["rlnTomoName"].tolist() == [
        "TS_01", "TS_02"]
