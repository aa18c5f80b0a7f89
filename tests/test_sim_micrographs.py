"""sim.micrographs: particles where the truth says, CTF/negation recipe vs the RELION fixture micrograph,
SNR, ice ramp and contamination blobs where recorded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.core.ctf import ctf_2d
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.projector import Projector
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star
from cryopipe.sim.micrographs import (
    apply_ctf_micrograph,
    particle_signal_variance,
    place_particles,
    render_projections,
    simulate_micrographs,
)

APIX = 3.0
BOX = 48


@pytest.fixture(scope="module")
def ref_map(relion_dir):
    return read_mrc(relion_dir / "ref_map.mrc")[0]


@pytest.fixture(scope="module")
def projector(ref_map):
    return Projector(torch.as_tensor(ref_map), pad=2)


def _projections(projector, truth) -> np.ndarray:
    angles = [torch.tensor(truth[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    return projector.project_images(euler_to_matrix(*angles).float()).numpy()


def _window(img: np.ndarray, x: int, y: int, n: int) -> np.ndarray:
    return img[y - n // 2:y - n // 2 + n, x - n // 2:x - n // 2 + n]


def test_recipe_reproduces_relion_fixture_micrograph(relion_dir, projector):
    """Fixture mic001 (README §6): our render + whole-micrograph CTF + negation of its truth particles explains it:
    regression slope 1, residual = its noise σ 0.4389, signal variance as documented (0.0963)."""
    mic, apix = read_mrc(relion_dir / "mic" / "Micrographs" / "mic001.mrc")
    truth = read_star(relion_dir / "mic" / "Micrographs" / "mic001_truth.star")[""]
    coords = torch.as_tensor(truth[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()).long()
    angles = torch.as_tensor(truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), dtype=torch.float32)
    clean = -apply_ctf_micrograph(render_projections(projector, angles, coords, mic.shape), apix, 15000, 14000, 30)
    assert float(particle_signal_variance(clean, coords, 12.5).mean()) == pytest.approx(0.0963, abs=5e-4)
    m, c = torch.as_tensor(mic, dtype=torch.float64), clean.to(torch.float64)
    slope = float((m * c).sum() / (c * c).sum())
    assert slope == pytest.approx(1.0, abs=0.05)
    assert float((m - c).std()) == pytest.approx(0.4389, rel=0.01)


def test_place_particles_respects_distances():
    rng = np.random.default_rng(0)
    blobs = np.array([[300.0, 300.0, 80.0]])
    xy = place_particles(60, (600, 800), 40, 30, rng, exclude=blobs, exclude_margin_px=15)
    assert len(xy) == 60
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
    assert d.min() >= 40
    assert xy[:, 0].min() >= 30 and xy[:, 0].max() < 800 - 30 and xy[:, 1].min() >= 30 and xy[:, 1].max() < 600 - 30
    assert np.sqrt(((xy - blobs[0, :2]) ** 2).sum(-1)).min() >= 95
    # a full micrograph gives fewer particles, not overlapping ones
    xy = place_particles(500, (200, 200), 50, 10, rng)
    assert 4 < len(xy) < 500
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
    assert d.min() >= 50


def test_particles_are_at_truth_coordinates(tmp_path, ref_map, projector):
    """No CTF, no noise: each window at a truth coordinate equals the projection at the truth angles."""
    res = simulate_micrographs(ref_map, 2, APIX, math.inf, tmp_path / "plain", size=(384, 448),
                               particles_per_micrograph=12, min_distance_px=BOX * 1.415, ctf=False, dark_particles=False,
                               seed=4, device="cpu")
    lst = read_star(res.coords_list_star)["coordinate_files"]
    assert len(lst) == 2
    for _, row in lst.iterrows():
        mic, apix = read_mrc(tmp_path / "plain" / row["rlnMicrographName"])
        assert mic.shape == (384, 448) and apix == APIX
        truth = read_star(tmp_path / "plain" / row["rlnMicrographCoordinates"])[""]
        assert len(truth) == 12
        expected = _projections(projector, truth)
        for (x, y), e in zip(truth[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy().astype(int), expected):
            np.testing.assert_allclose(_window(mic, x, y, BOX), e, atol=1e-5 * np.abs(e).max())
        # nothing else on the micrograph: blank out the particle boxes and the rest is zero
        rest = mic.copy()
        for x, y in truth[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy().astype(int):
            rest[y - BOX // 2:y + BOX // 2, x - BOX // 2:x + BOX // 2] = 0
        assert np.abs(rest).max() < 1e-5 * np.abs(mic).max()


def test_ctf_micrograph_peaks_at_truth(tmp_path, ref_map, projector):
    """With CTF and negation (no noise), cross-correlating each truth window with the expected CTF'd, negated
    projection peaks at zero shift and correlates highly."""
    res = simulate_micrographs(ref_map, 1, APIX, math.inf, tmp_path / "ctf", size=512, particles_per_micrograph=10,
                               min_distance_px=110, edge_px=60, seed=9, defocus_range=(8000, 12000), device="cpu")
    mics = read_star(res.micrographs_star)
    optics = mics["optics"].iloc[0]
    assert optics["rlnMicrographPixelSize"] == APIX and optics["rlnVoltage"] == 300
    row = mics["micrographs"].iloc[0]
    mic = read_mrc(tmp_path / "ctf" / row["rlnMicrographName"])[0]
    truth = read_star(res.coordinate_paths[0])[""]
    n = 96  # a larger window keeps most of the CTF-delocalised signal
    proj = _projections(projector, truth)
    padded = np.zeros((len(proj), n, n), np.float32)
    padded[:, n // 2 - BOX // 2:n // 2 + BOX // 2, n // 2 - BOX // 2:n // 2 + BOX // 2] = proj
    ctf = ctf_2d(n, APIX, row["rlnDefocusU"], row["rlnDefocusV"], row["rlnDefocusAngle"], device="cpu")[0].numpy()
    expected = -np.fft.irfft2(np.fft.rfft2(padded) * ctf, s=(n, n))
    for (x, y), e in zip(truth[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy().astype(int), expected):
        w = _window(mic, x, y, n)
        cc = np.corrcoef(w.ravel(), e.ravel())[0, 1]
        assert cc > 0.95, cc
        xc = np.fft.irfft2(np.fft.rfft2(w) * np.conj(np.fft.rfft2(e)), s=(n, n))
        peak = np.unravel_index(np.argmax(xc), xc.shape)
        assert peak == (0, 0)


def test_measured_snr_and_noise(tmp_path, ref_map):
    kw = dict(size=512, particles_per_micrograph=20, seed=21, device="cpu", signal_radius_px=12.5)
    clean = simulate_micrographs(ref_map, 2, APIX, math.inf, tmp_path / "clean", **kw)
    noisy = simulate_micrographs(ref_map, 2, APIX, 0.5, tmp_path / "noisy", **kw)
    for k in range(2):
        assert noisy.noise_sigmas[k] == pytest.approx(math.sqrt(noisy.signal_variances[k] / 0.5))
        a = read_mrc(clean.micrograph_paths[k])[0].astype(np.float64)
        b = read_mrc(noisy.micrograph_paths[k])[0].astype(np.float64)
        noise = b - a
        truth = read_star(clean.coordinate_paths[k])[""]
        c = np.arange(-13, 14)
        disc = (c[:, None] ** 2 + c[None, :] ** 2) <= 12.5 ** 2
        sv = np.mean([a[y - 13:y + 14, x - 13:x + 14][disc].var()
                      for x, y in truth[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy().astype(int)])
        assert sv / noise.var() == pytest.approx(0.5, rel=0.10)
        assert abs(noise.mean()) < 0.01 * noise.std()
    mt = read_star(noisy.truth_star)["micrographs"]
    np.testing.assert_allclose(mt["cryopipeNoiseSigma"], noisy.noise_sigmas)
    # a fixed noise level instead of the SNR
    fixed = simulate_micrographs(ref_map, 1, APIX, 0.5, tmp_path / "fixed", noise_sigma=0.3, **kw)
    assert fixed.noise_sigmas[0] == 0.3


def test_contamination_and_ice_where_recorded(tmp_path, ref_map):
    res = simulate_micrographs(ref_map, 2, APIX, math.inf, tmp_path / "blobs", size=768, particles_per_micrograph=15,
                               n_blobs=3, blob_radius_A=(120, 180), blob_amplitude=6.0, ice_offset=2.0,
                               ice_gradient=3.0, seed=5, dtype="float16", device="cpu")
    blobs = read_star(res.contamination_star)["contamination"]
    ice = read_star(res.truth_star)["micrographs"]
    assert len(blobs) == 6
    yy, xx = np.mgrid[0:768, 0:768]
    for k, (_, irow) in enumerate(ice.iterrows()):
        mic = read_mrc(tmp_path / "blobs" / irow["rlnMicrographName"])[0].astype(np.float64)
        unit = math.sqrt(irow["cryopipeSignalVariance"])
        ramp = (irow["cryopipeIceOffset"] + irow["cryopipeIceGradientX"] * (xx - 384) / 768
                + irow["cryopipeIceGradientY"] * (yy - 384) / 768)
        assert abs(irow["cryopipeIceGradientX"]) + abs(irow["cryopipeIceGradientY"]) > 0.5 * unit
        resid = mic - ramp
        mine = blobs[blobs["rlnMicrographName"] == irow["rlnMicrographName"]]
        inside = np.zeros(mic.shape, bool)
        for _, b in mine.iterrows():
            d = np.sqrt((xx - b["rlnCoordinateX"]) ** 2 + (yy - b["rlnCoordinateY"]) ** 2)
            core = d < b["cryopipeBlobRadius"] - 2
            assert abs(b["cryopipeBlobAmplitude"]) > 2 * unit
            # inside a recorded blob the micrograph sits at the blob's amplitude (no particle is placed there)
            np.testing.assert_allclose(np.median(resid[core]), b["cryopipeBlobAmplitude"], rtol=0.02,
                                       atol=0.05 * unit)
            inside |= d < b["cryopipeBlobRadius"] + 10
        # outside the blobs: ramp + particles only (median ~ 0 after removing the ramp)
        assert abs(np.median(resid[~inside])) < 0.05 * unit
        truth = read_star(res.coordinate_paths[k])[""]
        for _, b in mine.iterrows():
            dist = np.hypot(truth["rlnCoordinateX"] - b["rlnCoordinateX"], truth["rlnCoordinateY"] - b["rlnCoordinateY"])
            assert dist.min() > b["cryopipeBlobRadius"]
