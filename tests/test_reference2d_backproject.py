"""RELION's 2D back-projection and padded-grid reconstruction (issue 11).

``back_project_sums`` must spread every observation coefficient onto the padded grid as RELION's
``BackProjector::backrotate2D`` does (bilinear fractions at ``pad·Aᵀ·v``, the ``kx < 0`` half folded onto its
Hermitian mate, both halves of the ``kx = 0`` column kept apart), checked against a plain loop written from that
description; and the padded-grid reconstruction of noiseless sums must give back the class image.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.engine.coefficients import coefficient_set
from cryopipe.engine.mstep import regularised_update
from cryopipe.engine.reference2d import (
    ClassReferences2D,
    PaddedGrid,
    back_project_sums,
    coefficients_to_images,
    gridding_correction_2d,
    images_to_coefficients,
)


def _loop_back_projection(S, W, psi_deg, k, radius, r_max, pad):
    """Dictionaries (ky, kx) → summed data / weight, one coefficient at a time."""
    data, weight = {}, {}
    for r, psi in enumerate(psi_deg):
        c, s = math.cos(math.radians(psi)), math.sin(math.radians(psi))
        for p in range(len(k)):
            if radius[p] > r_max:
                continue
            x, y = k[p]
            xp, yp = pad * (c * x - s * y), pad * (s * x + c * y)  # Aᵀ·v, A = [[c, s], [−s, c]]
            val, w = complex(S[r, p]), float(W[r, p])
            if xp < 0:
                xp, yp, val = -xp, -yp, val.conjugate()
            x0, y0 = math.floor(xp), math.floor(yp)
            fx, fy = xp - x0, yp - y0
            for dx, dy, f in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                              (1, 1, fx * fy)):
                key = (y0 + dy, x0 + dx)
                data[key] = data.get(key, 0) + f * val
                weight[key] = weight.get(key, 0.0) + f * w
    return data, weight


def test_back_projection_equals_relions_loop():
    n, r_max, pad = 16, 6, 2
    cset = coefficient_set(n, r_max + 1)
    gen = torch.Generator().manual_seed(0)
    psi = torch.tensor([0.0, 17.0, 100.0, 233.5])
    P = cset.size
    S = torch.complex(torch.randn(1, len(psi), P, generator=gen), torch.randn(1, len(psi), P, generator=gen))
    W = torch.rand(1, len(psi), P, generator=gen)
    grid = PaddedGrid.make(n, r_max, pad)
    data, weight = back_project_sums(S, W, psi, cset, grid)
    ref_d, ref_w = _loop_back_projection(S[0].numpy(), W[0].numpy(), psi.tolist(), cset.k.tolist(),
                                         cset.radius.tolist(), r_max, pad)
    for q in range(len(grid.flat)):
        key = (int(grid.p[q, 1]), int(grid.p[q, 0]))
        assert complex(data[0, q]) == pytest.approx(ref_d.get(key, 0), abs=1e-5)
        assert float(weight[0, q]) == pytest.approx(ref_w.get(key, 0.0), abs=1e-5)
    # both halves of the kx = 0 column are grid points of their own
    col = grid.p[grid.p[:, 0] == 0, 1]
    assert (col > 0).any() and (col < 0).any()


def test_padded_reconstruction_returns_the_class_image():
    """Noiseless sums of a smooth image seen at many angles (CTF 1, weight 1): the ML division on the padded grid,
    the crop and the gridding correction give the image back."""
    n, pad = 32, 2
    y, x = torch.meshgrid(torch.arange(n) - n // 2, torch.arange(n) - n // 2, indexing="ij")
    img = torch.exp(-((x - 3.0) ** 2 + (y + 2.0) ** 2) / (2 * 2.5 ** 2)) - 0.5 * torch.exp(
        -((x + 4.0) ** 2 + (y - 1.0) ** 2) / (2 * 1.5 ** 2))
    r_max = n // 2 - 1
    cset = coefficient_set(n, r_max)
    psi = torch.arange(0.0, 360.0, 5.0)
    # observation at angle ψ of class frequency q sits at A·q: rotate the image by ψ in real space via its FT
    refs = ClassReferences2D(img[None], cset, cset.size, psi, pad=pad)
    S = refs.coarse()  # [1, R, P] predictions = the noiseless observations
    W = torch.ones_like(S.real)
    grid = PaddedGrid.make(n, r_max, pad)
    data, weight = back_project_sums(S, W, psi, cset, grid)
    F = regularised_update(data, weight, torch.zeros(1, n // 2 + 1), grid.shell, 1.0, minres_map=n, r_max=r_max,
                           do_map=False)
    out = grid.to_images(F)[0] / gridding_correction_2d(n, pad * n)
    inner = (x ** 2 + y ** 2) < (n // 2 - 4) ** 2
    lp = images_to_coefficients(img[None], cset)  # the image band-limited to r_max, as the sums are
    want = coefficients_to_images(lp, cset)[0]
    err = (out - want)[inner].abs().max() / want[inner].abs().max()
    assert float(err) < 0.03
    assert np.corrcoef(out[inner].numpy(), want[inner].numpy())[0, 1] > 0.999


def test_weight_floor_is_relions_skip_gridding_floor():
    """No weight below 1/1000 of its floor-shell's mean (shells >= r_max use r_max − 1)."""
    w = torch.tensor([[1000.0, 1000.0, 1e-9, 500.0, 1e-12]])
    d = torch.ones(1, 5, dtype=torch.complex128)
    floor_shell = torch.tensor([0, 1, 1, 2, 3])
    shell = floor_shell
    out = regularised_update(d, w, torch.zeros(1, 4), shell, 1.0, minres_map=10, r_max=3, floor_shell=floor_shell)
    mean1 = (1000.0 + 1e-9) / 2
    assert complex(out[0, 2]) == pytest.approx(1000.0 / mean1)
    assert complex(out[0, 1]) == pytest.approx(1 / 1000.0)
    assert complex(out[0, 4]) == pytest.approx(1 / 0.5)  # floor-shell 3 (>= r_max) takes shell 2's: 500/1000
