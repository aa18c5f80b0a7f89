"""Micrographs as hard as real data (issue 11): ice-thickness map (darker and noisier where thicker), large dark
contamination, carbon edge; the old settings keep their random streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.io.mrc import read_mrc
from cryopipe.sim.atomic import load_model, potential_map
from cryopipe.sim.micrographs import (
    HARD_MICROGRAPHS,
    carbon_edge_mask,
    ice_thickness_map,
    random_carbon_edge,
    simulate_micrographs,
)


@pytest.fixture(scope="module")
def small_volume():
    return potential_map(load_model("3enl"), 48, 3.0)


def test_thickness_map_is_a_normalised_ramp_plus_sine():
    t = ice_thickness_map((64, 96), direction_rad=0.0)
    assert float(t.min()) == 0.0 and float(t.max()) == pytest.approx(1.0)
    assert torch.allclose(t[0], t[-1]) and bool((t[0, 1:] > t[0, :-1]).all())  # along +x only
    t2 = ice_thickness_map((64, 64), math.pi / 2, sine_fraction=0.3, sine_period_px=20.0)
    assert 0.0 <= float(t2.min()) and float(t2.max()) <= 1.0 + 1e-6
    # the sinusoid (along x) makes rows non-constant; the ramp (along y) makes the mean grow with y
    assert float(t2[10].std()) > 0.05 and float(t2[-5:].mean()) > float(t2[:5].mean()) + 0.5


def test_carbon_edge_covers_the_requested_fraction():
    rng = np.random.default_rng(0)
    hole = random_carbon_edge((512, 512), 2000.0, (0.2, 0.2), rng)
    mask = carbon_edge_mask((512, 512), hole, edge_px=0.0)
    assert float(mask.mean()) == pytest.approx(0.2, abs=0.01)
    soft = carbon_edge_mask((512, 512), hole, edge_px=4.0)
    assert 0.19 < float(soft.mean()) < 0.21 and float(soft.min()) == 0.0 and float(soft.max()) == 1.0


def test_hard_recipe_darkens_and_adds_noise_where_ice_is_thick(tmp_path, small_volume):
    """Fixed noise σ = 1: the local mean falls by ≈ ice_darkening·t and the local σ rises by ≈ 1 + 0.2·t;
    contamination and carbon are where the truth says, with no particles on them."""
    kw = dict(HARD_MICROGRAPHS, blob_probability=1.0, carbon_probability=1.0, carbon_amplitude=2.0,
              carbon_coverage=(0.2, 0.2), ice_sine_fraction=0.0)
    sim = simulate_micrographs(small_volume, 1, 3.0, 0.05, tmp_path, size=768, particles_per_micrograph=20,
                               seed=4, noise_sigma=1.0, write_map=False, **kw)
    img = torch.from_numpy(read_mrc(sim.micrograph_paths[0])[0]).double()
    row = sim.truth.iloc[0]
    geom = sim.geometry[0]
    t = ice_thickness_map((768, 768), math.radians(row.cryopipeIceThicknessDirection)).double()
    assert row.cryopipeIceDarkening == pytest.approx(1.3)
    # pixels away from particles, blobs and carbon
    yy, xx = np.mgrid[0:768, 0:768]
    free = np.hypot(xx - geom.carbon_hole[0], yy - geom.carbon_hole[1]) < geom.carbon_hole[2] - 10
    for bx, by, br, amp in geom.blobs:
        assert amp < 0 and 3.0 - 1e-9 <= -amp <= 6.0 + 1e-9  # dark, 3-6 noise σ
        free &= np.hypot(xx - bx, yy - by) > br + 10
    for cx, cy in geom.coords:
        free &= np.hypot(xx - cx, yy - cy) > 30
        assert not any(np.hypot(cx - bx, cy - by) < br for bx, by, br, _ in geom.blobs)
    assert np.hypot(geom.coords[:, 0] - geom.carbon_hole[0], geom.coords[:, 1] - geom.carbon_hole[1]).max() \
        < geom.carbon_hole[2]
    assert 2 <= len(geom.blobs) <= 3 and len(geom.coords) > 5
    free_t = torch.from_numpy(free)
    assert int(free_t.sum()) > 50000
    # local mean: least-squares slope of the image against t over the free pixels = −ice_darkening
    tf, vf = t[free_t], img[free_t]
    slope = float(((tf - tf.mean()) * (vf - vf.mean())).sum() / ((tf - tf.mean()) ** 2).sum())
    assert slope == pytest.approx(-1.3, abs=0.08)
    # local σ: residual variance in the thinner and thicker halves of the free pixels
    r = vf + 1.3 * tf
    lo, hi = tf < tf.median(), tf >= tf.median()
    expect = float((1 + 0.2 * tf[hi]).pow(2).mean().sqrt() / (1 + 0.2 * tf[lo]).pow(2).mean().sqrt())
    assert expect > 1.03 and float(r[hi].std() / r[lo].std()) == pytest.approx(expect, abs=0.01)
    # carbon darker by carbon_amplitude (thickness-corrected)
    carbon = torch.from_numpy(np.hypot(xx - geom.carbon_hole[0], yy - geom.carbon_hole[1]) > geom.carbon_hole[2] + 10)
    for bx, by, br, _ in geom.blobs:
        carbon &= torch.from_numpy(np.hypot(xx - bx, yy - by) > br + 10)
    resid_c = float((img + 1.3 * t)[carbon].mean() - (img + 1.3 * t)[free_t].mean())
    assert resid_c == pytest.approx(-2.0, abs=0.1)


def test_old_settings_do_not_draw_from_the_new_stream(tmp_path, small_volume):
    """With the new options at their defaults the micrographs are those of the same settings with the new options
    named explicitly; turning on only the carbon edge leaves the ice, noise and particle orientations streams alone."""
    base = dict(size=384, particles_per_micrograph=10, seed=9, n_blobs=1, write_map=False)
    a = simulate_micrographs(small_volume, 1, 3.0, 0.1, tmp_path / "a", **base)
    b = simulate_micrographs(small_volume, 1, 3.0, 0.1, tmp_path / "b", **base, blob_probability=1.0,
                             blob_dark_fraction=0.7, ice_darkening=0.0, carbon_probability=0.0)
    assert np.array_equal(read_mrc(a.micrograph_paths[0])[0], read_mrc(b.micrograph_paths[0])[0])
    assert np.array_equal(a.geometry[0].blobs, b.geometry[0].blobs)


def test_simulate_job_hard_and_carbon_edge(tmp_path, monkeypatch):
    """``cryopipe simulate --what micrographs --hard --carbon_edge 1``: the recipe's ice columns and the carbon hole
    are in micrographs_truth.star."""
    from cryopipe.cli import main as cli
    from cryopipe.io.star import read_star

    monkeypatch.chdir(tmp_path)
    rc = cli(["simulate", "--what", "micrographs", "--n", "1", "--mic_size", "512", "--n_per_mic", "4", "--snr", "0.05",
              "--hard", "--carbon_edge", "1", "--device", "cpu"])
    assert rc == 0
    truth = read_star(tmp_path / "Simulate" / "job001" / "micrographs_truth.star")["micrographs"]
    assert float(truth["cryopipeIceNoiseIncrease"].iloc[0]) == pytest.approx(0.2)
    assert float(truth["cryopipeCarbonHoleRadius"].iloc[0]) > 0
