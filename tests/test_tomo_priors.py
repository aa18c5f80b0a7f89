"""Angle priors of tomographic particles (:mod:`cryopipe.engine.tomo_priors`, RELION --sigma_tilt / --sigma_psi / --sigma_rot):
the subtomogram frame of 2D stacks, symmetry mates, the prior centres from the particles table."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd
import torch

from cryopipe.core.geometry import euler_to_matrix, matrix_to_euler
from cryopipe.core.symmetry import symmetry_operators
from cryopipe.engine.orientations3d import healpix_orientations
from cryopipe.engine.tomo_priors import AnglePriors, angle_log_prior, prior_centres


def test_stack_frame_prior_equals_the_subtomogram_frame_prior():
    """Orientations refined in the tomogram frame (2D stacks) get the prior of their subtomogram-frame angles
    ``A_subᵀ·R``: the same numbers as evaluating those angles directly."""
    grid = healpix_orientations(1).coarse  # [R, 3]
    rng = np.random.default_rng(2)
    angles = [torch.tensor(float(v), dtype=torch.float64) for v in rng.uniform(0, 360, 3)]
    frames = euler_to_matrix(*angles)[None].numpy()  # one A_sub [1, 3, 3]
    pr = AnglePriors(np.array([70.0]), np.array([40.0]), 12.0, 20.0)
    R = euler_to_matrix(grid[:, 0], grid[:, 1], grid[:, 2]).double()
    in_sub = matrix_to_euler(torch.as_tensor(frames[0]).T.double()[None] @ R)  # the subtomogram-frame angles
    direct = angle_log_prior(in_sub, pr, np.array([0]))
    framed = angle_log_prior(grid, AnglePriors(pr.tilt, pr.psi, 12.0, 20.0, frames=frames), np.array([0]))
    finite = torch.isfinite(direct)
    assert torch.equal(finite, torch.isfinite(framed)) and int(finite.sum()) > 0
    assert torch.allclose(direct[finite], framed[finite], atol=1e-3)
    # a particle whose prior is an orientation of the grid scores it best
    assert int(torch.argmax(direct)) == int(torch.argmin((in_sub[:, 1] - 70.0).abs() / 12.0 + (
        ((in_sub[:, 2] - 40.0 + 180.0) % 360.0 - 180.0).abs()) / 20.0))


def test_symmetry_mates_and_centres():
    """A 2-fold about x (D2) turns a direction's tilt into 180° − tilt: a tilt prior at 150° accepts tilt 30° with
    D2 (the nearest mate counts) and not without; centres come from rlnAngleTiltPrior where given (999 = none),
    else the input tilt."""
    grid = torch.tensor([[0.0, 30.0, 0.0], [0.0, 150.0, 0.0]], dtype=torch.float64)
    pr = AnglePriors(np.array([150.0]), np.array([0.0]), 10.0, 0.0)
    c1 = angle_log_prior(grid, pr, np.array([0]))
    d2 = angle_log_prior(grid, pr, np.array([0]), symmetry_operators("D2"))
    assert torch.isinf(c1[0, 0]) and abs(float(c1[0, 1])) < 1e-6
    assert abs(float(d2[0, 0])) < 1e-6 and abs(float(d2[0, 1])) < 1e-6
    t = pd.DataFrame({"rlnAngleTilt": [10.0, 20.0], "rlnAnglePsi": [5.0, 6.0], "rlnAngleTiltPrior": [90.0, 999.0]})
    tilt, psi = prior_centres(t)
    assert tilt.tolist() == [90.0, 20.0] and psi.tolist() == [5.0, 6.0]


def _directions(angles: torch.Tensor) -> torch.Tensor:
    """RELION ``Euler_angles2direction`` of ``[R, 3]`` (rot, tilt, psi) degrees → ``[R, 3]``."""
    rot, tilt = torch.deg2rad(angles[:, 0]), torch.deg2rad(angles[:, 1])
    return torch.stack([torch.cos(rot) * torch.sin(tilt), torch.sin(rot) * torch.sin(tilt), torch.cos(tilt)], -1)


def test_sigma_rot_with_sigma_tilt_is_a_prior_on_the_direction():
    """RELION ``selectOrientationsWithNonZeroPriorProbability`` with σ_rot and σ_tilt: a Gaussian in the angle
    between the direction and the prior's (rot, tilt) direction, σ = max(σ_rot, σ_tilt), cut at 3σ; psi apart."""
    grid = healpix_orientations(1).coarse.double()
    pr = AnglePriors(np.array([60.0]), np.array([0.0]), 8.0, 0.0, rot=np.array([120.0]), sigma_rot=12.0)
    lp = angle_log_prior(grid, pr, np.array([0]))[0].double()
    prior_dir = _directions(torch.tensor([[120.0, 60.0, 0.0]], dtype=torch.float64))[0]
    d = torch.rad2deg(torch.acos((_directions(grid) @ prior_dir).clamp(-1, 1)))
    inside = d < 36.0
    assert int(inside.sum()) > 0 and not bool(inside.all())
    assert torch.isinf(lp[~inside]).all()
    assert torch.allclose(lp[inside], -d[inside] ** 2 / (2 * 12.0 ** 2), atol=1e-3)
    # the tilt alone would accept directions of any rot at tilt 60°: the direction prior does not
    tilt_only = angle_log_prior(grid, AnglePriors(np.array([60.0]), np.array([0.0]), 8.0, 0.0), np.array([0]))[0]
    assert int(torch.isfinite(tilt_only).sum()) > int(inside.sum())


def test_sigma_rot_alone_restrains_the_directions_plane():
    """σ_rot alone (RELION ``calculateDeltaRot``): the angle of the direction out of the plane through z at the
    prior's rot: every tilt at rot = prior (and prior + 180°) is free, rot + 90° at tilt 90° is out."""
    grid = torch.tensor([[30.0, 10.0, 0.0], [30.0, 80.0, 50.0], [210.0, 45.0, 0.0], [120.0, 90.0, 0.0],
                         [40.0, 90.0, 0.0]], dtype=torch.float64)
    pr = AnglePriors(np.array([0.0]), np.array([0.0]), 0.0, 0.0, rot=np.array([30.0]), sigma_rot=5.0)
    lp = angle_log_prior(grid, pr, np.array([0]))[0].double()
    assert torch.allclose(lp[:3], torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.isinf(lp[3])
    assert float(lp[4]) == pytest.approx(-10.0 ** 2 / (2 * 25.0), abs=1e-3)  # 10° out of the plane at tilt 90°
    t = pd.DataFrame({"rlnAngleRot": [10.0, 20.0], "rlnAngleTilt": [1.0, 2.0], "rlnAnglePsi": [3.0, 4.0],
                      "rlnAngleRotPrior": [999.0, 77.0]})
    tilt, psi, rot = prior_centres(t, with_rot=True)
    assert rot.tolist() == [10.0, 77.0] and tilt.tolist() == [1.0, 2.0]


def test_refine3d_accepts_sigma_rot():
    import argparse

    from cryopipe.jobs import refine3d

    p = argparse.ArgumentParser()
    refine3d.add_arguments(p)
    args = p.parse_args(["--i", "x.star", "--o", "out/run", "--sigma_rot", "7", "--sigma_tilt", "5"])
    assert args.sigma_rot == 7.0


def test_missing_priors_follow_the_current_angles():
    """RELION re-centres a missing prior (999 / no column) on the particle's current angle every iteration; given
    priors stay. With ``follow_current`` the centres follow the refined angles passed for the rows (turned into
    the subtomogram frame for particles refined in another frame)."""
    t = pd.DataFrame({"rlnAngleRot": [0.0, 0.0], "rlnAngleTilt": [30.0, 30.0], "rlnAnglePsi": [0.0, 0.0],
                      "rlnAngleTiltPrior": [999.0, 30.0]})
    tilt, psi = prior_centres(t, missing_as_nan=True)
    assert np.isnan(tilt[0]) and tilt[1] == 30.0 and np.isnan(psi).all()
    state = {"angles": np.array([[0.0, 30.0, 0.0], [0.0, 30.0, 0.0]])}
    pr = AnglePriors(tilt, psi, 5.0, 0.0, follow_current=True)
    grid = torch.tensor([[0.0, 30.0, 0.0], [0.0, 70.0, 0.0]], dtype=torch.float64)
    first = angle_log_prior(grid, pr, np.array([0, 1]), current_angles=state["angles"])
    assert abs(float(first[0, 0])) < 1e-6 and torch.isinf(first[0, 1]) and torch.isinf(first[1, 1])
    state["angles"] = np.array([[0.0, 70.0, 0.0], [0.0, 70.0, 0.0]])  # the next iteration's angles
    later = angle_log_prior(grid, pr, np.array([0, 1]), current_angles=state["angles"])
    assert torch.isinf(later[0, 0]) and abs(float(later[0, 1])) < 1e-6  # particle 0 follows its angle
    assert abs(float(later[1, 0])) < 1e-6 and torch.isinf(later[1, 1])  # particle 1 keeps its given prior
    # another frame: the centre is the current angle in the subtomogram frame A_subᵀ·R
    frames = euler_to_matrix(*[torch.tensor(v, dtype=torch.float64) for v in (20.0, 40.0, 60.0)])[None].numpy()
    R = torch.as_tensor(frames[0]) @ euler_to_matrix(*[torch.tensor(v, dtype=torch.float64) for v in (0, 70.0, 0)])
    state["angles"] = matrix_to_euler(R[None]).numpy().repeat(2, axis=0)
    pr_f = AnglePriors(tilt, psi, 5.0, 0.0, frames=frames.repeat(2, axis=0), follow_current=True)
    assert pr_f.centres(np.array([0]), state["angles"][:1])[0][0] == pytest.approx(70.0, abs=1e-6)
