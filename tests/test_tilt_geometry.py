"""Tilt-series geometry against RELION 5's own projection matrices and conventions (shared/fixtures/relion_tomo)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryopipe.core import tilt_geometry as tg
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.errors import CryopipeError
from cryopipe.io.star import read_star


def _tilt_table(fixture_dir, name):
    return read_star(fixture_dir / "tilt_series" / f"{name}.star")[name]


def _projections(fixture_dir):
    glob = read_star(fixture_dir / "tomograms.star")["global"]
    out = {}
    for _, row in glob.iterrows():
        t = _tilt_table(fixture_dir, row.rlnTomoName)
        size = (row.rlnTomoSizeX, row.rlnTomoSizeY, row.rlnTomoSizeZ)
        P = tg.projection_matrices(t.rlnTomoXTilt.values, t.rlnTomoYTilt.values, t.rlnTomoZRot.values,
                                   np.stack([t.rlnTomoXShiftAngst, t.rlnTomoYShiftAngst], 1), 4.0, size, (320, 288))
        out[row.rlnTomoName] = (P, size, t)
    return out


def test_projection_matrices_equal_relions(relion_tomo_dir):
    truth = json.loads((relion_tomo_dir / "truth" / "truth_geometry.json").read_text())
    for name, (P, size, t) in _projections(relion_tomo_dir).items():
        expected = torch.tensor(truth["tomograms"][name]["projection_matrices"], dtype=torch.float64)
        assert (P - expected).abs().max() < 1e-9
        angles, shifts = tg.decompose_projection_matrices(expected, 4.0, size, (320, 288))
        assert np.allclose(angles.numpy(), np.stack([t.rlnTomoXTilt, t.rlnTomoYTilt, t.rlnTomoZRot], 1), atol=1e-9)
        assert np.allclose(shifts.numpy(), np.stack([t.rlnTomoXShiftAngst, t.rlnTomoYShiftAngst], 1), atol=1e-9)


def test_particle_positions_and_orientations_equal_the_truth(relion_tomo_dir):
    truth = json.loads((relion_tomo_dir / "truth" / "truth_geometry.json").read_text())
    parts = read_star(relion_tomo_dir / "particles.star")["particles"]
    sizes = {n: tuple(v["size"]) for n, v in truth["tomograms"].items()}
    for i, row in parts.iterrows():
        sub = euler_to_matrix(*torch.tensor([row.rlnTomoSubtomogramRot, row.rlnTomoSubtomogramTilt,
                                             row.rlnTomoSubtomogramPsi], dtype=torch.float64))
        p = tg.particle_positions_px(
            [[row.rlnCenteredCoordinateXAngst, row.rlnCenteredCoordinateYAngst, row.rlnCenteredCoordinateZAngst]],
            [[row.rlnOriginXAngst, row.rlnOriginYAngst, row.rlnOriginZAngst]], sub[None], 4.0, sizes[row.rlnTomoName])
        assert np.allclose(p[0].numpy(), truth["particles"][i]["position_px_decentred"], atol=1e-9)
        A = tg.subtomogram_orientations(
            [[row.rlnTomoSubtomogramRot, row.rlnTomoSubtomogramTilt, row.rlnTomoSubtomogramPsi]],
            [[row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi]])
        assert np.allclose(A[0].numpy(), truth["particles"][i]["A_total"], atol=1e-5)
        back = tg.centered_angstrom(p, 4.0, sizes[row.rlnTomoName])
        assert np.allclose(back[0].numpy(), truth["particles"][i]["position_A_centred"], atol=1e-9)


def test_tilt_axis_direction_and_depth():
    # ZRot 90°: the specimen y axis (tilt axis) maps to image −x; a point above the centre (z > 0) tilted by +30°
    # about y moves to +x in the unrotated frame and its depth is cos(30°)·z.
    P = tg.projection_matrices([0.0], [30.0], [0.0], [[0.0, 0.0]], 1.0, (100, 100, 100), (100, 100))
    q = tg.project_points(P, torch.tensor([[50.0, 50.0, 60.0]], dtype=torch.float64))[0, 0]
    assert torch.allclose(q, torch.tensor([50 + 10 * 0.5, 50.0, 10 * np.cos(np.pi / 6)], dtype=torch.float64))
    P = tg.projection_matrices([0.0], [0.0], [90.0], [[0.0, 0.0]], 1.0, (100, 100, 100), (100, 100))
    q = tg.project_points(P, torch.tensor([[50.0, 60.0, 50.0]], dtype=torch.float64))[0, 0]
    assert torch.allclose(q, torch.tensor([40.0, 50.0, 0.0], dtype=torch.float64), atol=1e-12)


def test_non_rigid_matrix_is_refused():
    P = tg.projection_matrices([0.0], [10.0], [85.0], [[3.0, -2.0]], 2.0, (64, 64, 32), (64, 64))
    P[0, 0, 0] *= 1.05
    with pytest.raises(CryopipeError, match="tilt 1 is not a rotation"):
        tg.decompose_projection_matrices(P, 2.0, (64, 64, 32), (64, 64))


def test_depth_defocus_follows_the_hand():
    u, v = tg.depth_defocus(torch.tensor([20000.0]), torch.tensor([19000.0]), torch.tensor([[10.0]]), -1, 4.0)
    assert float(u) == 20000.0 - 40.0 and float(v) == 19000.0 - 40.0
    u, _ = tg.depth_defocus(torch.tensor([20000.0]), torch.tensor([19000.0]), torch.tensor([[10.0]]), 1, 4.0, 2.0)
    assert float(u) == 20080.0


def test_dose_weights_critical_exposure():
    w = tg.dose_weights(64, 4.0, [0.0, 30.0], cutoff_fraction=0.01)
    assert torch.all(w[0] == 1)
    assert float(w[1, 0, 0]) == 1.0
    k = 10 / (64 * 4.0)  # Fourier pixel (0, 10)
    assert np.isclose(float(w[1, 0, 10]), np.exp(-30 / (2 * (0.245 * k ** -1.665 + 2.81))), rtol=1e-6)
    assert float(w[1, 0, 32]) < float(w[1, 0, 10])
    wb = tg.dose_weights(16, 4.0, [10.0], bfactor_per_dose=4.0)
    assert np.isclose(float(wb[0, 0, 4]), np.exp(-4.0 * 10 * (4 / 64) ** 2 / 4), rtol=1e-6)


def test_visibility_margin_and_dose():
    xy = torch.tensor([[[10.0, 50.0], [50.0, 50.0], [90.0, 50.0]]])
    vis = tg.visible_in_tilts(xy, (100, 100), 16, pre_exposure=[0.0, 3.0, 6.0], max_dose=5.0)
    assert vis.tolist() == [[False, True, False]]
