"""Plots of a refinement / initial model (issue 14 item 6): resolution and gold-standard FSC per iteration and the
angular distribution, read from RELION-named iteration files, as Figure objects (no pyplot, no backend switch)."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from cryopipe.io.star import write_star
from cryopipe.plots.refinement import (
    angular_distribution_figure,
    fsc_figure,
    read_refinement_history,
    resolution_figure,
    write_refinement_plots,
)

BOX, APIX = 32, 2.0


def _write_run(folder, resolutions, half_sets=True, n_particles=4000, seed=0):
    shells = np.arange(BOX // 2 + 1)
    for it, res_A in enumerate(resolutions):
        fsc = 1.0 / (1.0 + np.exp((shells - BOX * APIX / res_A) * 1.5)) if half_sets else np.zeros(shells.size)
        blocks = {"model_general": {"rlnCurrentResolution": res_A},
                  "model_class_1": pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": shells / (BOX * APIX),
                                                 "rlnGoldStandardFsc": fsc})}
        for half in (("_half1", "_half2") if half_sets else ("",)):
            write_star(folder / f"run_it{it:03d}{half}_model.star", blocks)
    rng = np.random.default_rng(seed)
    rot = rng.uniform(-180, 180, n_particles)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n_particles)))  # uniform over the sphere
    write_star(folder / f"run_it{len(resolutions) - 1:03d}_data.star",
               {"particles": pd.DataFrame({"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": 0.0 * rot})})


def test_history_and_figures_show_the_run(tmp_path):
    _write_run(tmp_path, [30.0, 12.0, 8.0, 6.5])
    history = read_refinement_history(tmp_path / "run")
    assert history.iterations.tolist() == [0, 1, 2, 3]
    assert history.resolutions.tolist() == [30.0, 12.0, 8.0, 6.5]
    assert sorted(history.fsc) == [0, 1, 2, 3] and history.rot.size == 4000
    fig = resolution_figure(history)
    line = fig.axes[0].lines[0]
    assert line.get_ydata().tolist() == [30.0, 12.0, 8.0, 6.5] and "6.50 Å at iteration 3" in fig.axes[0].get_title()
    fsc = fsc_figure(history)
    assert len([ln for ln in fsc.axes[0].lines if np.size(ln.get_xdata()) == BOX // 2 + 1]) == 4
    assert any(t.get_text().strip() == "0.143" for t in fsc.axes[0].texts)
    assert fsc.axes[1].get_xlabel() == "resolution (Å)"  # the Å axis on top
    angles = angular_distribution_figure(history.rot, history.tilt)
    density = angles.axes[0].collections[0].get_array()
    assert float(np.mean(density)) == pytest.approx(1.0, rel=0.05)  # uniform directions: 1 per solid angle
    assert "matplotlib.pyplot" not in sys.modules


def test_written_files_and_a_run_without_half_sets(tmp_path):
    _write_run(tmp_path, [40.0, 20.0], half_sets=False)
    written = write_refinement_plots(tmp_path / "run")
    assert [p.name for p in written] == ["run_resolution.png", "run_angdist.png", "run_plots.pdf"]
    for p in written:
        head = p.read_bytes()[:4]
        assert head == (b"%PDF" if p.suffix == ".pdf" else b"\x89PNG"), p
    assert write_refinement_plots(tmp_path / "none") == []  # nothing to plot yet
