"""bench/bench_sta.py's de novo stage (``--stop_after align_symmetry``) runs the same commands, with the same
arguments, as the first three steps of :func:`cryopipe.jobs.demo_tomo.run_sta_path` (issue 12): the commands are
recorded by a stub runner (no job runs) and the map/pose scores are stubbed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import cryopipe.io.star
import cryopipe.io.tomo_particles
import cryopipe.jobs.demo_tomo as demo_tomo

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_sta.py"


class _Stop(Exception):
    pass


class _Recorder:
    """Records each command's argv (as strings); raises :class:`_Stop` at the first ``refine3d``."""

    def __init__(self):
        self.commands: list[list[str]] = []

    def __call__(self, argv, device=True):
        argv = [str(a) for a in argv]
        if argv[0] == "refine3d":
            raise _Stop
        self.commands.append(argv)
        return {}


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_sta", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    score = {"fsc_truth_0.5_A": 40.0, "symmetry_axes_error_deg": 1.0}
    for target in (module, demo_tomo):
        monkeypatch.setattr(target, "_map_score", lambda *a, **k: dict(score))
    monkeypatch.setattr(module, "_pose_score", lambda *a, **k: {"angular_error_median_deg": 5.0,
                                                                 "angular_error_p90_deg": 9.0})
    monkeypatch.setattr(cryopipe.io.star, "read_star", lambda path: {"particles": [0] * 7})
    monkeypatch.setattr(cryopipe.io.tomo_particles, "optimisation_set_entries",
                        lambda path: {"rlnTomoParticlesFile": "InitialModel/job003/run_it015_data.star"})
    return module


@pytest.mark.parametrize("stack2d", [False, True])
def test_denovo_stage_runs_the_full_paths_first_commands(bench, stack2d):
    cfg = demo_tomo.StaConfig(n_tomograms=3, particles_per_tomogram=11, initial_iter=7, stack2d=stack2d, seed=5)
    full, denovo = _Recorder(), _Recorder()
    with pytest.raises(_Stop):
        demo_tomo.run_sta_path(cfg, full, job0=4)
    s = bench.run_denovo(cfg, denovo, job0=4)
    assert [c[0] for c in denovo.commands] == ["subtomo", "initialmodel", "align-symmetry"]
    assert denovo.commands == full.commands
    assert ("--stack2d" in denovo.commands[0]) == stack2d
    t = bench.targets(s, cfg)
    assert t["denovo_limit_A"] == 2 * 2 * cfg.angpix * cfg.coarse_bin and t["denovo_ok"] and t["c6_axis_ok"]
    assert "final_fsc_truth_0.5_A" not in t  # no ladder in the de novo stage
    assert s["initialmodel_poses"]["angular_error_median_deg"] == 5.0
