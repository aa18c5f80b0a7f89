"""Tilt-series simulator: the forward model reproduces RELION-consistent fixture tilt series; simulated series put
particles where core.tilt_geometry projects them; lattices, SNR, injected errors and the CLI's files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.core.geometry import angular_distance, euler_to_matrix
from cryopipe.core.projector import Projector
from cryopipe.io.mrc import mrc_info, read_mrc
from cryopipe.io.tomography import read_tomograms
from cryopipe.io.tomo_particles import read_optimisation_set, read_tomo_particles
from cryopipe.sim.tiltseries import Perturbations, place_tomogram_particles, simulate_tilt_series
from cryopipe.sim.tiltseries_forward import TiltOptics, render_particle_boxes, render_tilt_series
from cryopipe.sim.tiltseries_geometry import tilt_scheme

FIXTURE_TILTS = [0, 10, 19, 20, 21, 30, 40]  # file rows: −60°, −30°, −3°, 0° (dose 0), +3°, +30°, +60°


def _nyquist_disc(images: np.ndarray) -> np.ndarray:
    """Images restricted to frequencies inside the Nyquist circle (drops the corners of the square spectrum)."""
    H, W = images.shape[-2:]
    keep = (np.fft.rfftfreq(W)[None, :] ** 2 + np.fft.fftfreq(H)[:, None] ** 2) < 0.25 * 0.97
    return np.fft.irfft2(np.fft.rfft2(images) * keep, s=(H, W))


def _cc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


_PROJECTORS: dict = {}


def _fixture_projector(d, padded: bool) -> Projector:
    """The fixture's recipe (map zero-padded to the 128 render box, 2x oversampled) or the map's own box."""
    if padded not in _PROJECTORS:
        vol = read_mrc(d / "truth" / "truth_map.mrc")[0]
        if padded:
            vol = np.pad(vol, 32)
        _PROJECTORS[padded] = Projector(torch.from_numpy(np.ascontiguousarray(vol)), pad=2)
    return _PROJECTORS[padded]


def _render_fixture(d, name: str, tilts, hand_sign: float = 1.0, padded: bool = True):
    tomos = read_tomograms(d / "tomograms.star")
    ts = tomos[name]
    parts = read_tomo_particles(d / "particles.star", tomos)
    rows = parts.tomo_names == name
    optics = TiltOptics(ts.pixel_size, ts.voltage, ts.cs, ts.amplitude_contrast, hand_sign * ts.hand)
    out = render_tilt_series(
        _fixture_projector(d, padded), ts.projection_matrices()[tilts],
        torch.as_tensor(parts.positions_px(tomos)[rows]), torch.as_tensor(parts.orientations()[rows]),
        torch.as_tensor(ts.defocus()[tilts]), torch.as_tensor(ts.pre_exposure()[tilts]), ts.image_size, optics,
        box=128)
    return out.numpy(), ts.read_images(tilts)


@pytest.mark.parametrize("name", ["TS_01", "TS_02"])
def test_forward_model_reproduces_fixture_tilt_series(relion_tomo_dir, name):
    ours, relion = _render_fixture(relion_tomo_dir, name, FIXTURE_TILTS)
    cc = _cc(ours, relion)
    print(name, np.round(cc, 5))
    assert cc.min() >= 0.99
    # the whole residual lies in the corners of the square spectrum beyond Nyquist (our slices stop at the
    # Nyquist circle); inside it the images agree to float16 precision
    cc_disc = _cc(_nyquist_disc(ours), _nyquist_disc(relion))
    print(name, "inside Nyquist", np.round(cc_disc, 7))
    assert cc_disc.min() >= 0.99999
    scale = (ours * relion).sum() / (ours * ours).sum()
    assert abs(scale - 1) < 2e-3


def test_forward_model_with_map_box_slices(relion_tomo_dir):
    """Default path: slices at the map's box (64), zero-padded to the render box in real space (cheaper)."""
    ours, relion = _render_fixture(relion_tomo_dir, "TS_01", FIXTURE_TILTS, padded=False)
    assert _cc(ours, relion).min() >= 0.99
    assert _cc(_nyquist_disc(ours), _nyquist_disc(relion)).min() >= 0.9998


def test_fixture_rejects_wrong_hand(relion_tomo_dir):
    ours, relion = _render_fixture(relion_tomo_dir, "TS_01", [0, 40], hand_sign=-1.0)
    assert _cc(_nyquist_disc(ours), _nyquist_disc(relion)).min() < 0.99999


def test_dose_symmetric_scheme_matches_fixture(relion_tomo_dir):
    tomos = read_tomograms(relion_tomo_dir / "tomograms.star")
    angles, pre = tilt_scheme(-60, 60, 3, "dose-symmetric", 3.0)
    np.testing.assert_allclose(angles, tomos["TS_01"].tilts["rlnTomoNominalStageTiltAngle"].to_numpy())
    np.testing.assert_allclose(pre, tomos["TS_01"].pre_exposure())
    angles, pre = tilt_scheme(-6, 6, 3, "bidirectional", 2.0)
    np.testing.assert_allclose(pre, [8, 6, 0, 2, 4])
