"""``cryopipe demo --tomo`` (the subtomogram-averaging tutorial path on a simulated C6 lattice) at a tiny size:
every step runs through the command-line entry point, writes its RELION files and is scored against the truth (the
quality itself is measured by ``demo --tomo`` at its full size and
by bench/bench_sta.py, not here: see the last test). Plus the pose-error score it uses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cryopipe.core.geometry import angular_distance, axis_angle_matrix, euler_to_matrix
from cryopipe.io.star import read_star
from cryopipe.io.tomo_particles import read_optimisation_set
from cryopipe.tomo.evaluate import pose_errors

#: ~95 CPU-s: 24 particles of one tilt series (16 tilts, SNR 2), 10 Å/px, coarse box 12 at bin 2, fine 24 at bin 1
TINY = dict(n_tomograms=1, particles_per_tomogram=24, angpix=10.0, tilt_step=8.0, snr=2.0, coarse_box=14,
            coarse_crop=12, fine_box=28, fine_crop=24, diameter=220.0, initial_iter=6, refine1_iter=2,
            refine2_iter=2)


def test_pose_errors_recover_a_global_rotation_up_to_c6():
    """Poses that are the truth in another frame (``A_true·S_i·Q``, a random C6 operator ``S_i`` per particle)
    plus 2° of noise: Q is recovered (up to C6) and the errors are the noise, not the symmetry jumps; without the
    symmetry (C1) the jumps show."""
    g = torch.Generator().manual_seed(0)
    n = 60
    A_true = euler_to_matrix(*(torch.rand(3, n, generator=g, dtype=torch.float64) * torch.tensor([[360.0], [180.0],
                                                                                               [360.0]])))
    Q = euler_to_matrix(torch.tensor(30.0), torch.tensor(50.0), torch.tensor(70.0)).to(torch.float64)
    S = euler_to_matrix(torch.randint(0, 6, (n,), generator=g).to(torch.float64) * 60.0, torch.zeros(n),
                        torch.zeros(n)).to(torch.float64)
    noise_deg = torch.full((n,), 2.0, dtype=torch.float64)
    R_noise = axis_angle_matrix(torch.randn(n, 3, generator=g, dtype=torch.float64), noise_deg)
    err, Q_est = pose_errors(A_true @ S @ Q @ R_noise, A_true, "C6")
    assert err.median() == pytest.approx(2.0, abs=0.5) and float(err.max()) < 4.0
    ops = euler_to_matrix(torch.arange(6, dtype=torch.float64) * 60.0, torch.zeros(6), torch.zeros(6))
    assert float(angular_distance(Q_est, ops.to(torch.float64) @ Q).min()) < 1.0  # Q up to the symmetry
    err_c1, _ = pose_errors(A_true @ S @ Q @ R_noise, A_true, "C1")
    assert float(err_c1.median()) > 30.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from cryopipe.jobs.demo_tomo import StaConfig, run_demo_tomo

    root = tmp_path_factory.mktemp("demo_tomo") / "proj"
    return root, run_demo_tomo(root, StaConfig(**TINY), subprocess=False)


def test_every_step_ran_and_wrote_relions_files(demo):
    root, s = demo
    commands = [st["command"].split()[1] for st in s["steps"]]
    assert commands == ["simulate", "subtomo", "initialmodel", "align-symmetry", "refine3d", "star", "subtomo",
                        "reconstruct-particle", "refine3d", "mask-create", "postprocess"]
    assert all(st["rc"] == 0 and st["cpu_seconds"] > 0 for st in s["steps"])
    assert json.loads((root / "demo_tomo_summary.json").read_text())["steps"] == s["steps"]
    n = s["simulate"]["n_particles"]
    for sub, box in (("PseudoSubtomo/job002", 12), ("PseudoSubtomo/job006", 24)):
        star = read_star(root / sub / "particles.star")
        assert len(star["particles"]) == n and int(star["optics"]["rlnImageSize"].iloc[0]) == box
        assert (root / sub / "optimisation_set.star").exists()
    for ref in ("InitialModel/job003/run", "Refine3D/job004/run", "Refine3D/job008/run"):
        entries = read_optimisation_set(root / f"{ref}_optimisation_set.star", root=root)
        assert entries["rlnTomoParticlesFile"].exists() and entries["rlnTomoTomogramsFile"].exists(), ref
    for f in ("InitialModel/job003/initial_model.mrc", "InitialModel/job003/initial_model_C6.mrc",
              "Refine3D/job004/run_class001.mrc", "Refine3D/job008/run_half1_class001_unfil.mrc",
              "ReconstructParticleTomo/job007/merged.mrc", "MaskCreate/job009/mask.mrc",
              "PostProcess/job010/postprocess_masked.mrc"):
        assert (root / f).exists(), f
    centred = read_star(root / "Recenter/job005/particles.star")
    assert {"general", "optics", "particles"} <= set(centred)
    procs = read_star(root / "default_pipeline.star")["pipeline_processes"]
    assert set(procs["rlnPipeLineProcessStatusLabel"]) == {"Succeeded"}


def test_every_step_is_scored_against_the_truth(demo):
    """Every step's map is scored against the truth (after rigid alignment) and its poses too. Whether the final
    map beats the de novo start is NOT asserted at this tiny size: with 24 particles the path is chaotic (the same
    commands reached 21.8 Å or stayed at 48 Å depending on the torch thread count and on the state that earlier
    tests leave in the process), so a quality assertion here was a flaky test. The quality is measured by
    ``cryopipe demo --tomo`` (80 particles: de novo 46 Å → 18.3 Å after the ladder) and ``bench/bench_sta.py``."""
    _, s = demo
    for key in ("initialmodel", "align_symmetry", "refine3d_coarse", "reconstruct_particle", "refine3d_fine",
                "postprocess"):
        assert math.isfinite(s[key]["fsc_truth_0.5_A"]) and s[key]["fsc_truth_0.5_A"] > 0, key
    assert 0.0 <= s["align_symmetry"]["symmetry_axes_error_deg"] <= 90.0
    for key in ("refine3d_coarse", "refine3d_fine"):
        assert s[key]["angular_error_median_deg"] >= 0 and s[key]["reported_resolution_A"] > 0
    assert s["postprocess"]["resolution_0.143_A"] > 0
