"""The Python API (issue 14 item 7): the main functions importable from ``cryopipe`` (lazily: ``import cryopipe``
loads no torch), called on small arrays; messages through ``logging.getLogger("cryopipe")`` and still into a
job's run.out."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

import cryopipe
from cryopipe.errors import CryopipeError

N = 24
APIX = 4.0


def _blob_volume(n: int = N, seed: int = 0) -> np.ndarray:
    """An asymmetric object: a few Gaussian blobs of different sizes inside a radius n/3."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    vol = np.zeros((n, n, n))
    for _ in range(6):
        c = rng.uniform(-n / 5, n / 5, 3)
        s = rng.uniform(1.5, 3.0)
        vol += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def _random_angles(count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-180, 180, count), np.degrees(np.arccos(rng.uniform(-1, 1, count))),
                     rng.uniform(-180, 180, count)], axis=1)


def test_import_is_lazy_and_the_names_are_exported():
    code = "import sys, cryopipe; print('torch' in sys.modules, 'cryopipe.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    for name in cryopipe.__all__:
        assert callable(getattr(cryopipe, name)), name
    assert "reconstruct" in dir(cryopipe)
    with pytest.raises(AttributeError):
        cryopipe.no_such_function  # noqa: B018


def test_project_then_reconstruct_recovers_the_map_with_origins_and_ctf():
    vol = _blob_volume()
    angles = _random_angles(600)
    origins = np.random.default_rng(2).uniform(-6, 6, (600, 2))  # Å
    ctf = {"defocus_u": np.full(600, 8000.0), "defocus_v": np.full(600, 7000.0), "defocus_angle": 30.0}
    images = cryopipe.project(vol, angles, APIX, origins_A=origins)
    assert images.shape == (600, N, N)
    rec = cryopipe.reconstruct(images, angles, APIX, origins_A=origins)
    curve = cryopipe.fsc(rec, vol)
    assert curve.shape == (N // 2 + 1,) and float(curve[1:9].min()) > 0.95
    wrong = cryopipe.reconstruct(images, angles, APIX)  # origins ignored: a blurred map
    assert float(cryopipe.fsc(wrong, vol)[4:9].mean()) < float(curve[4:9].mean()) - 0.1
    with_ctf = cryopipe.project(vol, angles, APIX, origins_A=origins, ctf=ctf)
    rec_ctf = cryopipe.reconstruct(with_ctf, angles, APIX, origins_A=origins, ctf=ctf)
    assert float(cryopipe.fsc(rec_ctf, vol)[1:7].min()) > 0.9
    res = cryopipe.resolution(cryopipe.fsc(rec, vol), APIX)
    assert 2 * APIX <= res < 3.5 * APIX


def test_fsc_resolution_lowpass_and_ctf_values():
    vol = _blob_volume()
    assert cryopipe.resolution(cryopipe.fsc(vol, vol), APIX) == pytest.approx(2 * APIX)  # Nyquist
    noise = np.random.default_rng(3).normal(size=vol.shape).astype(np.float32)
    assert cryopipe.resolution(cryopipe.fsc(vol, noise), APIX) > 20 * APIX
    low = cryopipe.lowpass(noise, 4 * APIX, APIX, edge_px=0)  # cut-off shell N/4
    power = np.abs(np.fft.fftshift(np.fft.fftn(low))) ** 2
    k = np.sqrt(sum(g ** 2 for g in np.mgrid[:N, :N, :N] - N // 2))
    assert power[k > N / 4 + 0.5].max() < 1e-8 * power.max() and power[k < N / 4 - 1].min() > 0
    images = cryopipe.lowpass(noise[:3], 4 * APIX, APIX)  # a stack of 3 images [3, N, N]: 2D filtering
    assert images.shape == (3, N, N) and np.abs(images).max() < np.abs(noise[:3]).max()
    c = cryopipe.ctf(N, APIX, 10000.0, amplitude_contrast=0.1)
    assert c.shape == (N, N // 2 + 1)
    assert c[0, 0] == pytest.approx(0.1, abs=1e-6)  # DC: +amplitude contrast (RELION's −sin γ)
    astig = cryopipe.ctf(N, APIX, 10000.0, 6000.0, defocus_angle=45.0)
    assert not np.allclose(astig, c)


def test_pick_log_finds_blobs_on_an_array():
    rng = np.random.default_rng(4)
    size, apix, diameter = 256, 5.0, 100.0
    y, x = np.mgrid[:size, :size]
    centres = [(60, 70), (180, 60), (120, 190), (200, 200)]
    mic = rng.normal(0, 0.2, (size, size))
    for cy, cx in centres:
        mic -= np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (diameter / apix / 4) ** 2))  # dark particles
    picks = cryopipe.pick_log(mic.astype(np.float32), apix, 80.0, 120.0)
    assert list(picks.columns[:3]) == ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"]
    xy = picks[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
    for cy, cx in centres:
        assert np.hypot(xy[:, 0] - cx, xy[:, 1] - cy).min() < 4, (cx, cy)


def test_postprocess_on_half_maps():
    vol = _blob_volume()
    rng = np.random.default_rng(5)
    half1 = vol + rng.normal(0, 0.05, vol.shape).astype(np.float32)
    half2 = vol + rng.normal(0, 0.05, vol.shape).astype(np.float32)
    res = cryopipe.postprocess(half1, half2, APIX)
    assert res.fsc_true.shape == (N // 2 + 1,) and 2 * APIX <= res.resolution < 6 * APIX
    assert tuple(res.sharpened.shape) == (N, N, N)


def test_bad_arrays_are_one_line_errors():
    vol = _blob_volume()
    bad = vol.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(CryopipeError, match="NaN"):
        cryopipe.fsc(vol, bad)
    with pytest.raises(CryopipeError, match="angles"):
        cryopipe.reconstruct(np.zeros((4, N, N)), np.zeros((3, 3)), APIX)
    with pytest.raises(CryopipeError, match="defocus_u"):
        cryopipe.reconstruct(np.zeros((4, N, N)), np.zeros((4, 3)), APIX, ctf={"voltage": 300})


def test_file_functions_and_readers(tmp_path):
    vol = _blob_volume()
    cryopipe.write_mrc(tmp_path / "m.mrc", vol, APIX)
    back, apix = cryopipe.read_mrc(tmp_path / "m.mrc")
    assert apix == pytest.approx(APIX) and np.array_equal(back, vol)
    from cryopipe.jobs.refine3d import refine_3d

    assert cryopipe.refine_3d is refine_3d


def test_messages_go_through_the_cryopipe_logger_and_into_run_out(tmp_path, capsys):
    from cryopipe.pipeline.log import log, tee_output, warn

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("cryopipe")
    keep = Keep()
    logger.addHandler(keep)
    try:
        with tee_output(tmp_path / "run.out", tmp_path / "run.err", tmp_path):
            log("iteration 3/25")
            warn("few shells")
    finally:
        logger.removeHandler(keep)
    assert [(r.levelname, r.getMessage()) for r in records] == [("INFO", "iteration 3/25"),
                                                               ("WARNING", "few shells")]
    assert "] iteration 3/25" in (tmp_path / "run.out").read_text()
    assert "] WARNING: few shells" in (tmp_path / "run.err").read_text()
    captured = capsys.readouterr()
    assert "iteration 3/25" in captured.out and "few shells" in captured.err
    logger.setLevel(logging.WARNING)  # a notebook quietening cryopipe
    try:
        log("hidden")
    finally:
        logger.setLevel(logging.INFO)
    assert "hidden" not in capsys.readouterr().out
