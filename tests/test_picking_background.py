"""Local background / noise normalisation and contamination masks for picking on hard micrographs (issue 11):
``cryopipe.picking.background`` and ``autopick --flatten --contamination_mask``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.io.mrc import read_mrc
from cryopipe.picking.background import (
    ContaminationOptions,
    contamination_aware_picker,
    contamination_distance,
    flatten_micrograph,
    micrograph_background,
)
from cryopipe.picking.evaluate import score_picks
from cryopipe.picking.log import log_pick
from cryopipe.jobs.simulate import build_volume
from cryopipe.sim.micrographs import HARD_MICROGRAPHS, ice_thickness_map, simulate_micrographs

APIX = 3.0


@pytest.fixture(scope="module")
def hard_set(tmp_path_factory):
    """Two 1024² micrographs at 3 Å/px of the D2 assembly of 3ENL (~135 Å), SNR 0.2 (the noise per Å² of SNR 0.05 at
    1.5 Å/px), the hard recipe: the first
    with 2-3 dark blobs and a carbon edge, the second with the ice gradient only."""
    vol, _ = build_volume("3enl", None, APIX, sym="D2")
    out = tmp_path_factory.mktemp("hard")
    kw = dict(HARD_MICROGRAPHS, blob_probability=1.0, carbon_probability=1.0, carbon_coverage=(0.2, 0.2))
    a = simulate_micrographs(vol, 1, APIX, 0.2, out / "a", size=1024, particles_per_micrograph=40, seed=7,
                             write_map=False, **kw)
    kw.update(n_blobs=0, carbon_probability=0.0)
    b = simulate_micrographs(vol, 1, APIX, 0.2, out / "b", size=1024, particles_per_micrograph=40, seed=8,
                             write_map=False, **kw)
    return [(torch.from_numpy(read_mrc(s.micrograph_paths[0])[0]), s.geometry[0], s.truth.iloc[0]) for s in (a, b)]


def _truth_contamination(geom, shape, grow=0.0):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    mask = np.zeros(shape, bool)
    for bx, by, br, _ in geom.blobs:
        mask |= np.hypot(xx - bx, yy - by) < br + grow
    if geom.carbon_hole is not None:
        hx, hy, hr = geom.carbon_hole
        mask |= np.hypot(xx - hx, yy - hy) > hr - grow
    return mask


def test_mask_finds_blobs_and_carbon_and_nothing_on_clean_ice(hard_set):
    (mic, geom, _), (clean, _, _) = hard_set
    bg = micrograph_background(mic, APIX)
    found = bg.full("contamination").numpy()
    truth = _truth_contamination(geom, mic.shape)
    assert 2 <= len(geom.blobs) <= 3 and geom.carbon_hole is not None
    assert found[truth].mean() > 0.95  # contamination covered
    assert found[~_truth_contamination(geom, mic.shape, grow=40)].mean() < 0.01  # ice > 40 px away: left alone
    # no particle centre is inside the mask
    assert float(contamination_distance(bg, torch.from_numpy(geom.coords.astype(float))).min()) > 0
    assert not bool(micrograph_background(clean, APIX).contamination.any())


def test_flattened_micrograph_has_unit_noise_across_the_ice_gradient(hard_set):
    """Thick and thin ice (20 % noise difference, 1.3 σ darker) both come out with mean ≈ 0 and σ ≈ 1."""
    _, (clean, geom, row) = hard_set
    flat = flatten_micrograph(clean, micrograph_background(clean, APIX), pixel_size=APIX).double()
    t = ice_thickness_map(clean.shape, np.radians(row.cryopipeIceThicknessDirection),
                          HARD_MICROGRAPHS["ice_sine_fraction"], row.cryopipeIceSinePeriod,
                          np.radians(row.cryopipeIceSineDirection), np.radians(row.cryopipeIceSinePhase))
    raw = clean.double()
    for sel in (t < 0.25, t > 0.75):
        assert int(sel.sum()) > 20000
        assert abs(float(flat[sel].mean())) < 0.05 and float(flat[sel].std()) == pytest.approx(1.0, abs=0.05)
    # the raw micrograph differs by > 15 % in σ and by ~1 σ in mean between the two
    ratio = float(raw[t > 0.75].std() / raw[t < 0.25].std())
    assert ratio > 1.12
    assert float(raw[t < 0.25].mean() - raw[t > 0.75].mean()) > 0.7 * float(raw[t < 0.25].std())


def test_log_with_flatten_and_mask_holds_near_contamination(hard_set):
    """LoG with the robust threshold: on the raw micrograph picks gather on the blob and carbon rims; with
    --flatten --contamination_mask none lies on contamination and the precision recovers."""
    mic, geom, _ = hard_set[0]
    truth = geom.coords.astype(float)
    tol = 0.3 * 135 / APIX
    kw = dict(lowpass=20.0, shrink=0.0, adjust_threshold=4.0, robust_threshold=True)
    raw = log_pick(mic, APIX, 100, 150, **kw)
    picker = contamination_aware_picker(lambda m, a, c: log_pick(m, a, 100, 150, **kw),
                                        ContaminationOptions(flatten=True, reject=True))
    clean = picker(mic, APIX, None)
    on = _truth_contamination(geom, mic.shape)

    def n_on(p):
        xy = p.xy().numpy().round().astype(int).clip(0, 1023)
        return int(on[xy[:, 1], xy[:, 0]].sum())

    s_raw, s_clean = score_picks(raw.xy().numpy(), truth, tol), score_picks(clean.xy().numpy(), truth, tol)
    assert n_on(raw) >= 3 and n_on(clean) == 0
    assert s_clean.precision > s_raw.precision + 0.2 and s_clean.precision > 0.75
    assert s_clean.recall >= s_raw.recall and s_clean.recall > 0.9


def test_options_off_return_the_picker_itself():
    def picker(m, a, c):
        return None

    assert contamination_aware_picker(picker, ContaminationOptions()) is picker


def test_autopick_job_flatten_and_contamination_mask(tmp_path, monkeypatch):
    """``cryopipe autopick --LoG --flatten --contamination_mask`` in a project made by ``simulate --hard
    --carbon_edge 1``: the options reach the picker (no pick on the carbon film, which the plain run picks on)."""
    from cryopipe.cli import main as cli
    from cryopipe.io.star import read_star

    monkeypatch.chdir(tmp_path)
    assert cli(["simulate", "--what", "micrographs", "--n", "1", "--mic_size", "768", "--n_per_mic", "20",
                "--snr", "0.2", "--sym", "D2", "--hard", "--carbon_edge", "1", "--seed", "3", "--device", "cpu"]) == 0
    truth = read_star(tmp_path / "Simulate" / "job001" / "micrographs_truth.star")["micrographs"].iloc[0]
    hole = (truth.cryopipeCarbonHoleX, truth.cryopipeCarbonHoleY, truth.cryopipeCarbonHoleRadius)
    common = ["autopick", "--i", "Simulate/job001/micrographs.star", "--LoG", "--LoG_diam_min", "110",
              "--LoG_diam_max", "150", "--LoG_robust_threshold", "--LoG_adjust_threshold", "2", "--no_png"]
    on_carbon = []
    for odir, extra in (("AutoPick/job002/", []), ("AutoPick/job003/", ["--flatten", "--contamination_mask"])):
        assert cli(common + ["--odir", odir] + extra) == 0
        files = read_star(tmp_path / odir / "autopick.star")["coordinate_files"]
        picks = read_star(tmp_path / files["rlnMicrographCoordinates"].iloc[0])[""]
        xy = picks[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
        on_carbon.append(int((np.hypot(xy[:, 0] - hole[0], xy[:, 1] - hole[1]) > hole[2]).sum()))
    assert on_carbon[0] > 0 and on_carbon[1] == 0
