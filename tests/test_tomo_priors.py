"""Angle priors of tomographic particles (:mod:`cryopipe.engine.tomo_priors`, RELION --sigma_tilt / --sigma_psi):
the subtomogram frame of 2D stacks, symmetry mates, the prior centres from the particles table."""

from __future__ import annotations

import numpy as np
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
