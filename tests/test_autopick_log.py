"""LoG picking: identical picks to RELION 5.0.1 (mic/ fixture), ground-truth blobs, the exact greedy suppression,
work-size rules, and the ``autopick`` job (RELION file layout, pipeline node, continue, PNG)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star
from cryopipe.picking.common import coordinate_file_name, strip_job_prefix
from cryopipe.picking.log import (
    _fft_prime,
    good_fourier_size,
    log_diameters,
    log_fom_maps,
    log_pick,
    log_work_size,
)
from cryopipe.picking.peaks import greedy_disc_suppression

MIC_ARGS = dict(pixel_size=3.0, diam_min=50.0, diam_max=80.0, lowpass=20.0, shrink=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: the shared CI cores are oversubscribed, where every 2-thread op waits ~20 ms for its
    second thread (the picker's results do not depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _table(path: Path):
    blocks = read_star(path)
    return next(b for b in blocks.values() if hasattr(b, "columns"))


@pytest.fixture(scope="module")
def mic001(relion_dir) -> torch.Tensor:
    data, apix = read_mrc(relion_dir / "mic" / "Micrographs" / "mic001.mrc")
    assert apix == pytest.approx(3.0)
    return torch.from_numpy(data)


# ------------------------------------------------------------------------------------------- RELION fixture


@pytest.mark.parametrize("adjust, folder, count", [(0.0, "AutoPick", 1770), (3.0, "AutoPick_thr3", 45)])
def test_log_picks_equal_relion(mic001, relion_dir, adjust, folder, count):
    ref = _table(relion_dir / "mic" / folder / "Micrographs" / "mic001_autopick.star")
    assert len(ref) == count
    picks = log_pick(mic001, MIC_ARGS["pixel_size"], MIC_ARGS["diam_min"], MIC_ARGS["diam_max"],
                     lowpass=20.0, shrink=0.0, adjust_threshold=adjust)
    assert len(picks) == count
    # RELION emits in decreasing FOM: compare row by row (same order), positions and FOMs
    np.testing.assert_allclose(picks.x.numpy(), ref["rlnCoordinateX"].to_numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(picks.y.numpy(), ref["rlnCoordinateY"].to_numpy(), atol=1e-3, rtol=0)
    # the file holds 6 decimals: 1e-4 relative, 2e-6 absolute for the smallest values
    np.testing.assert_allclose(picks.fom.numpy(), ref["rlnAutopickFigureOfMerit"].to_numpy(), rtol=1e-4, atol=2e-6)
    assert np.all(np.diff(picks.fom.numpy()) <= 0)
    assert np.all(picks.class_number.numpy() == 0) and np.all(picks.psi.numpy() == 0)
    d = picks.diameter.numpy()
    assert np.all((d >= 50) & (d <= 80))


def test_log_float64_same_picks(mic001, relion_dir):
    ref = _table(relion_dir / "mic" / "AutoPick_thr3" / "Micrographs" / "mic001_autopick.star")
    picks = log_pick(mic001, 3.0, 50, 80, adjust_threshold=3.0, dtype=torch.float64)
    np.testing.assert_allclose(picks.xy().numpy(), ref[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), atol=1e-3)


@pytest.mark.parametrize("use_ctf", [False, True])
def test_log_finds_true_particles(mic001, relion_dir, use_ctf):
    """Ground truth: all 25 simulated particles are among the threshold-3 picks (RELION's and ours), and the
    25 best picks are the true particles (within 5 px). With --LoG_use_ctf too."""
    truth = _table(relion_dir / "mic" / "Micrographs" / "mic001_truth.star")[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    ctf = dict(defocus_u=15000.0, defocus_v=14000.0, defocus_angle=30.0, voltage=300.0, cs=2.7, amplitude_contrast=0.1)
    picks = log_pick(mic001, 3.0, 50, 80, adjust_threshold=3.0, use_ctf=use_ctf, ctf=ctf if use_ctf else None)
    xy = picks.xy().numpy()
    dist = np.sqrt(((xy[:, None, :] - truth[None]) ** 2).sum(-1))
    assert dist.min(axis=0).max() < 5.0
    top = dist[:25].min(axis=1)
    assert np.all(top < 5.0), top
    assert len(picks) >= 25


def test_use_ctf_needs_parameters(mic001):
    with pytest.raises(CryopipeError, match="CTF"):
        log_pick(mic001, 3.0, 50, 80, use_ctf=True, ctf=None)


# ------------------------------------------------------------------------------------------- work size, filters


def test_work_size_rules():
    # fixture: 1024 px at 3 Å, lowpass 20 -> 2·round(153.6) = 308 (= 4·7·11; 155 = 5·31: accepted)
    assert log_work_size(1024, 3.0, 20.0, 0.0) == 308
    # 0.5 -> 512, but 257 is prime: 510 (256 = 2⁸) is nearer than 518 (260)
    assert log_work_size(1024, 3.0, 20.0, 0.5) == 510
    assert log_work_size(1024, 3.0, None, 1.0) == 1024
    assert log_work_size(1024, 3.0, 20.0, 1.0) == 1024
    # 4096: 2049 = 3·683 -> RELION moves to 4048 (2025 = 3⁴·5²), as its warning says
    assert good_fourier_size(4096, 4096) == 4048
    assert good_fourier_size(4096, 4096, optimise=False) == 4096
    # 410 -> 206 = 2·103: up 412 (207 = 9·23, 412 = 4·103) fails, 408 = 8·3·17 / 205 = 5·41 wins
    assert good_fourier_size(410, 4096) == 408
    for req in range(100, 1200, 2):
        s = good_fourier_size(req, 4096)
        assert s % 2 == 0 and _fft_prime(s) <= 43 and abs(s - req) <= 40
    with pytest.raises(CryopipeError):
        log_work_size(1024, 3.0, 20.0, -1.0)
    with pytest.raises(CryopipeError):
        log_work_size(1024, 3.0, 20.0, 2048)


def test_diameters_relion_order():
    assert log_diameters(50, 80) == [10, 13, 17, 25, 50, 65, 80, 160, 240, 320, 400]
    assert log_diameters(150, 180, 3) == [50, 75, 150, 165, 180, 360, 540]


def test_fom_maps_shapes(mic001):
    maps = log_fom_maps(mic001, 3.0, 50, 80)
    assert maps.work_size == 308 and maps.best_fom.shape == (308, 308)
    assert maps.scale == pytest.approx(308 / 1024)
    assert set(np.unique(maps.best_diameter.numpy())) <= set(log_diameters(50, 80))


# ------------------------------------------------------------------------------------------- greedy suppression


def _relion_greedy(fom: np.ndarray, rad: np.ndarray, upper: float) -> list[tuple[int, int]]:
    """RELION's loop literally: global max (first in row-major order), emit, zero the disc, repeat."""
    f = fom.copy()
    h, w = f.shape
    out = []
    while True:
        idx = int(np.argmax(f))
        if f.flat[idx] <= 0:
            return out
        i, j = divmod(idx, w)
        if f[i, j] < upper:
            out.append((i, j))
        r = int(rad[i, j])
        ii, jj = np.mgrid[max(i - r, 0):min(i + r + 1, h), max(j - r, 0):min(j + r + 1, w)]
        inside = (ii - i) ** 2 + (jj - j) ** 2 < r * r
        f[ii[inside], jj[inside]] = 0
        f[i, j] = 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_relion_loop(seed):
    rng = np.random.default_rng(seed)
    fom = rng.normal(size=(60, 70)).astype(np.float32)
    fom[rng.random(fom.shape) < 0.05] = 1.5  # ties: the first in row-major order must win
    rad = rng.choice([2, 3, 5], size=fom.shape)
    upper = 2.0 if seed == 1 else np.inf
    rows, cols = greedy_disc_suppression(torch.from_numpy(fom), torch.from_numpy(rad), emit_below=upper)
    got = list(zip(rows.tolist(), cols.tolist()))
    assert got == _relion_greedy(fom, rad, upper)
    assert len(got) > 20


# ------------------------------------------------------------------------------------------- synthetic blobs


def _blob_micrograph(h, w, pos, contrast, diam_px=22.0, seed=0):
    """White noise (σ 1) plus Gaussian blobs (2σ = radius = diam_px/2) of the given contrasts at integer (x, y)."""
    g = torch.Generator().manual_seed(seed)
    mic = torch.randn(h, w, generator=g)
    r = int(2 * diam_px)
    off = torch.arange(-r, r + 1, dtype=torch.float32)
    kernel = torch.exp(-(off[:, None] ** 2 + off[None, :] ** 2) / (2 * (diam_px / 4) ** 2))
    for (x, y), c in zip(np.asarray(pos, dtype=int), contrast):
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, h), max(x - r, 0), min(x + r + 1, w)
        mic[y0:y1, x0:x1] += c * kernel[y0 - y + r:y1 - y + r, x0 - x + r:x1 - x + r]
    return mic


def _positions(h, w, n, seed=1, margin=40, min_dist=60):
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        x, y = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        if all((x - a) ** 2 + (y - b) ** 2 > min_dist ** 2 for a, b in pos):
            pos.append((x, y))
    return np.round(np.array(pos))


@pytest.mark.parametrize("transpose", [False, True])
def test_non_square_micrograph_coordinates(transpose):
    """Dark 66 Å blobs on a 600×900 (and 900×600) micrograph at 3 Å/px: the 20 best picks are the 20 blobs,
    each within 5 px (1.5 work pixels of 3.3 px)."""
    h, w = (900, 600) if transpose else (600, 900)
    pos = _positions(h, w, 20)
    mic = _blob_micrograph(h, w, pos, [-1.5] * 20)
    picks = log_pick(mic, 3.0, 50, 80, adjust_threshold=3.0)
    xy = picks.xy().numpy()
    dist = np.sqrt(((xy[:, None, :] - pos[None]) ** 2).sum(-1))
    assert np.all(dist[:20].min(axis=1) < 5.0)
    assert dist.min(axis=0).max() < 5.0
    assert np.all((xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h))


def test_invert_white_particles():
    pos = _positions(600, 600, 15)
    white = _blob_micrograph(600, 600, pos, [1.5] * 15)
    inv = log_pick(white, 3.0, 50, 80, adjust_threshold=3.0, invert=True)
    dark = log_pick(-white, 3.0, 50, 80, adjust_threshold=3.0, invert=False)
    torch.testing.assert_close(inv.x, dark.x)
    torch.testing.assert_close(inv.fom, dark.fom)
    xy = inv.xy().numpy()
    assert np.sqrt(((xy[:, None] - pos[None]) ** 2).sum(-1)).min(axis=0).max() < 5.0
    wrong = log_pick(white, 3.0, 50, 80, adjust_threshold=3.0, invert=False).xy().numpy()
    if len(wrong):
        assert (np.sqrt(((wrong[:, None] - pos[None]) ** 2).sum(-1)).min(axis=0) < 5.0).sum() <= 2


def test_upper_threshold_skips_contamination():
    """An 8× darker blob of particle size (ice ball) is the best pick without an upper threshold and is not
    picked with --LoG_upper_threshold 8, while every particle still is."""
    h, w = 600, 900
    pos = _positions(h, w, 20)
    ice = np.array([[450.0, 300.0]])
    pos = pos[np.sqrt(((pos - ice) ** 2).sum(1)) > 80]
    mic = _blob_micrograph(h, w, np.vstack([pos, ice]), [-1.0] * len(pos) + [-8.0])
    for upper, expect_ice in [(99999.0, True), (8.0, False)]:
        picks = log_pick(mic, 3.0, 50, 80, adjust_threshold=2.0, upper_threshold=upper)
        xy = picks.xy().numpy()
        on_ice = np.sqrt(((xy - ice) ** 2).sum(1)) < 8
        assert bool(on_ice.any()) == expect_ice
        if expect_ice:
            assert on_ice[0]  # the highest FOM
        assert np.sqrt(((xy[:, None] - pos[None]) ** 2).sum(-1)).min(axis=0).max() < 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_log_cuda_matches_cpu(mic001):
    cpu = log_pick(mic001, 3.0, 50, 80, adjust_threshold=3.0)
    gpu = log_pick(mic001.cuda(), 3.0, 50, 80, adjust_threshold=3.0)
    assert gpu.x.device.type == "cuda"
    np.testing.assert_allclose(gpu.xy().cpu().numpy(), cpu.xy().numpy(), atol=1e-6)
    np.testing.assert_allclose(gpu.fom.cpu().numpy(), cpu.fom.numpy(), rtol=1e-4)


# ------------------------------------------------------------------------------------------- names


def test_coordinate_file_names():
    assert strip_job_prefix("MotionCorr/job002/Movies/a.mrc") == "Movies/a.mrc"
    assert strip_job_prefix("Micrographs/mic001.mrc") == "Micrographs/mic001.mrc"
    assert coordinate_file_name("Micrographs/mic001.mrc", "AutoPick/") == "AutoPick/Micrographs/mic001_autopick.star"
    assert coordinate_file_name("MotionCorr/job002/Movies/a.mrc", "AutoPick/job004", "lg") == \
        "AutoPick/job004/Movies/a_lg.star"


# ------------------------------------------------------------------------------------------- the job


def _run(argv: list[str]) -> int:
    from cryopipe.jobs import autopick

    p = argparse.ArgumentParser()
    autopick.add_arguments(p)
    return autopick.main(p.parse_args(argv))


def _project(tmp_path: Path, relion_dir: Path) -> Path:
    proj = tmp_path / "proj"
    (proj / "Micrographs").mkdir(parents=True)
    os.symlink(relion_dir / "mic" / "Micrographs" / "mic001.mrc", proj / "Micrographs" / "mic001.mrc")
    (proj / "micrographs_ctf.star").write_text((relion_dir / "mic" / "micrographs_ctf.star").read_text())
    return proj


def test_autopick_job_relion_outputs(tmp_path, relion_dir, monkeypatch):
    proj = _project(tmp_path, relion_dir)
    monkeypatch.chdir(proj)
    args = ["--i", "micrographs_ctf.star", "--odir", "AutoPick/job004/", "--pickname", "autopick", "--LoG",
            "--LoG_diam_min", "50", "--LoG_diam_max", "80", "--shrink", "0", "--lowpass", "20",
            "--LoG_adjust_threshold", "3"]
    assert _run(args + ["--write_fom_maps"]) == 0
    job = proj / "AutoPick" / "job004"
    ours = _table(job / "Micrographs" / "mic001_autopick.star")
    ref = _table(relion_dir / "mic" / "AutoPick_thr3" / "Micrographs" / "mic001_autopick.star")
    assert list(ours.columns) == list(ref.columns)
    np.testing.assert_allclose(ours[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(),
                               ref[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), atol=1e-3)
    np.testing.assert_allclose(ours["rlnAutopickFigureOfMerit"], ref["rlnAutopickFigureOfMerit"], rtol=1e-4, atol=2e-6)
    lst = read_star(job / "autopick.star")["coordinate_files"]
    assert lst["rlnMicrographName"].tolist() == ["Micrographs/mic001.mrc"]
    assert lst["rlnMicrographCoordinates"].tolist() == ["AutoPick/job004/Micrographs/mic001_autopick.star"]
    summ = _table(job / "summary.star")
    assert int(summ["rlnGroupNrParticles"].iloc[0]) == 45
    assert (job / "picks.png").stat().st_size > 1000
    fom_map, _ = read_mrc(job / "Micrographs" / "mic001_autopick_bestLoG.mrc")
    size_map, _ = read_mrc(job / "Micrographs" / "mic001_autopick_bestSize.mrc")
    assert fom_map.shape == size_map.shape == (308, 308)
    assert set(np.unique(size_map)) <= set(log_diameters(50, 80))
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    pipe = read_star(proj / "default_pipeline.star")
    nodes = pipe["pipeline_nodes"]
    row = nodes[nodes["rlnPipeLineNodeName"] == "AutoPick/job004/autopick.star"]
    assert row["rlnPipeLineNodeTypeLabel"].tolist() == ["MicrographCoordsGroup.star.relion.autopick"]
    procs = pipe["pipeline_processes"]
    assert procs["rlnPipeLineProcessTypeLabel"].tolist() == ["relion.autopick.log"]

    # continue: the existing coordinate file is kept (not re-picked), a missing one is made
    coord = job / "Micrographs" / "mic001_autopick.star"
    coord.write_text(coord.read_text().replace("data_", "data_\n# kept"))
    stamp = coord.read_text()
    assert _run(args + ["--continue"]) == 0
    assert coord.read_text() == stamp
    coord.unlink()
    assert _run(args + ["--continue", "--no_png"]) == 0
    assert len(_table(coord)) == 45
    # the same job without --continue is refused
    with pytest.raises(CryopipeError, match="continue"):
        _run(args)


def test_autopick_job_errors(tmp_path, relion_dir, monkeypatch):
    proj = _project(tmp_path, relion_dir)
    monkeypatch.chdir(proj)
    with pytest.raises(CryopipeError, match="LoG_diam"):
        _run(["--i", "micrographs_ctf.star", "--odir", "out/", "--LoG"])
    with pytest.raises(CryopipeError, match="--LoG"):
        _run(["--i", "micrographs_ctf.star", "--odir", "out/", "--LoG_diam_min", "50", "--LoG_diam_max", "80"])
    (proj / "nopix.star").write_text("data_\nloop_\n_rlnMicrographName #1\nMicrographs/mic001.mrc\n")
    with pytest.raises(CryopipeError, match="angpix"):
        _run(["--i", "nopix.star", "--odir", "out/", "--LoG", "--LoG_diam_min", "50", "--LoG_diam_max", "80"])


def test_robust_threshold_with_strong_contamination():
    """Three large, strongly dark discs (ice, 4× the particle contrast, radius 60–90 px) on a micrograph with 30
    particles: RELION's mean/σ threshold is raised by the disc edges above most particles (and the edges are
    picked); with --LoG_robust_threshold (median/MAD) every particle is found, and with an upper threshold of
    12 no pick lies on the ice."""
    h = w = 800
    ice = np.array([[200.0, 200.0, 70.0], [600.0, 560.0, 90.0], [620.0, 150.0, 60.0]])
    rng = np.random.default_rng(3)
    pos = []
    while len(pos) < 30:
        x, y = rng.uniform(40, w - 40, 2)
        if all((x - a) ** 2 + (y - b) ** 2 > 60 ** 2 for a, b in pos) and \
                all((x - a) ** 2 + (y - b) ** 2 > (r + 40) ** 2 for a, b, r in ice):
            pos.append((x, y))
    pos = np.round(np.array(pos))
    mic = _blob_micrograph(h, w, pos, [-1.0] * len(pos))
    yy, xx = np.mgrid[:h, :w]
    for x, y, r in ice:
        d = np.sqrt((xx - x) ** 2 + (yy - y) ** 2) - r
        disc = np.where(d < 0, 1.0, np.where(d < 8, 0.5 + 0.5 * np.cos(np.pi * np.clip(d, 0, 8) / 8), 0.0))
        mic -= torch.from_numpy(4.0 * disc).float()

    def evaluate(picks):
        xy = picks.xy().numpy()
        recall = (np.sqrt(((xy[:, None] - pos[None]) ** 2).sum(-1)).min(axis=0) < 5.0).mean()
        on_ice = (np.sqrt(((xy[:, None] - ice[None, :, :2]) ** 2).sum(-1)) < ice[None, :, 2] + 5).any(axis=1).sum()
        return recall, on_ice

    recall, on_ice = evaluate(log_pick(mic, 3.0, 50, 80, adjust_threshold=2.0))
    assert recall < 0.7 and on_ice > 10
    recall, on_ice = evaluate(log_pick(mic, 3.0, 50, 80, adjust_threshold=4.0, robust_threshold=True))
    assert recall == 1.0 and on_ice > 10
    recall, on_ice = evaluate(log_pick(mic, 3.0, 50, 80, adjust_threshold=4.0, upper_threshold=12.0,
                                       robust_threshold=True))
    assert recall == 1.0 and on_ice == 0


def test_outlier_pixels_set_to_mean(mic001):
    """Hot pixels (> 8σ) are replaced by the micrograph mean before normalising with the original σ (RELION):
    same picks as a micrograph where they were set to that mean by hand, FOMs scaled by the ratio of the σs."""
    hot = mic001.clone()
    hot[[100, 500, 700, 900], [300, 200, 650, 901]] = 400.0
    mean, sd = float(hot.double().mean()), float(hot.double().std(correction=0))
    assert (400.0 - mean) / sd > 8
    fixed = hot.clone()
    fixed[[100, 500, 700, 900], [300, 200, 650, 901]] = mean
    sd_fixed = float(fixed.double().std(correction=0))
    a = log_pick(hot, 3.0, 50, 80, adjust_threshold=3.0)
    b = log_pick(fixed, 3.0, 50, 80, adjust_threshold=3.0)
    assert len(a) == len(b) == 45
    torch.testing.assert_close(a.xy(), b.xy())
    np.testing.assert_allclose(a.fom.numpy() * sd / sd_fixed, b.fom.numpy(), rtol=1e-4)
    kept = log_pick(hot, 3.0, 50, 80, adjust_threshold=3.0, outlier_zscore=1e9)
    assert not torch.equal(kept.xy(), b.xy())


def test_work_grid_larger_than_micrograph(mic001, relion_dir):
    """--lowpass finer than Nyquist (work size > N): the FT is zero-padded (RELION); on a 512² corner of the
    fixture the true particles inside it are still the best picks."""
    corner = mic001[:512, :512].contiguous()
    maps = log_fom_maps(corner, 3.0, 50, 80, lowpass=5.0)
    assert maps.work_size > 512
    picks = log_pick(corner, 3.0, 50, 80, lowpass=5.0, adjust_threshold=3.0)
    truth = _table(relion_dir / "mic" / "Micrographs" / "mic001_truth.star")[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    truth = truth[(truth < 512 - 24).all(axis=1)]
    assert len(truth) >= 3
    d = np.sqrt(((picks.xy().numpy()[:len(truth), None] - truth[None]) ** 2).sum(-1)).min(axis=1)
    assert np.all(d < 5.0)
