"""Tests for cryopipe.core.fsc (against RELION 5 relion_postprocess output) and cryopipe.core.masks."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryopipe.core.fsc import fsc, resolution_at, shell_resolutions
from cryopipe.core.masks import soft_circular_mask, soft_spherical_mask


def _read(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mrcfile.read(path), dtype=np.float32).copy())


@pytest.fixture(scope="module")
def post(relion_dir):
    d = relion_dir / "postprocess"
    table = starfile.read(d / "postprocess.star")["fsc"]
    return {
        "h1": _read(d / "half1.mrc"),
        "h2": _read(d / "half2.mrc"),
        "mask": _read(relion_dir / "mask.mrc"),
        "fsc": table,
        "general": starfile.read(d / "postprocess.star")["general"],
    }


def test_fsc_unmasked_matches_relion(post):
    ours = fsc(post["h1"], post["h2"]).numpy()
    theirs = post["fsc"]["rlnFourierShellCorrelationUnmaskedMaps"].to_numpy()
    assert ours.shape == theirs.shape == (25,)
    assert np.abs(ours - theirs).max() < 1e-3


def test_fsc_masked_matches_relion(post):
    m = post["mask"]
    ours = fsc(post["h1"] * m, post["h2"] * m).numpy()
    theirs = post["fsc"]["rlnFourierShellCorrelationMaskedMaps"].to_numpy()
    assert np.abs(ours - theirs).max() < 1e-3


def test_resolution_and_shell_table_match_relion(post):
    tab = post["fsc"]
    res = shell_resolutions(48, 3.0).numpy()
    assert np.allclose(res, tab["rlnAngstromResolution"].to_numpy(), rtol=1e-6)
    corrected = torch.tensor(tab["rlnFourierShellCorrelationCorrected"].to_numpy())
    final = float(np.asarray(post["general"]["rlnFinalResolution"]).reshape(-1)[0])
    assert math.isclose(resolution_at(corrected, 0.143, 3.0, 48), final, rel_tol=1e-5)


def test_fsc_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, 32, generator=g, dtype=torch.float64)
    b = torch.randn(32, 32, 32, generator=g, dtype=torch.float64)
    f_same = fsc(a, 3.0 * a)
    assert torch.allclose(f_same, torch.ones_like(f_same))
    f_neg = fsc(a, -a)
    assert torch.allclose(f_neg, -torch.ones_like(f_neg))
    # independent noise: FSC ~ 0 within a few 1/sqrt(n_shell)
    f_ind = fsc(a, b)[2:]
    assert float(f_ind.abs().max()) < 0.3
    assert abs(float(f_ind.mean())) < 0.05
    # 2D FRC
    img = torch.randn(40, 40, generator=g, dtype=torch.float64)
    assert fsc(img, img).shape == (21,)


def test_resolution_at_edge_cases():
    f = torch.tensor([1.0, 0.9, 0.8, 0.5, 0.1, 0.0])
    assert resolution_at(f, 0.143, 2.0, 10) == pytest.approx(10 * 2.0 / 3)
    assert resolution_at(f, 0.95, 2.0, 10) == 999.0
    assert resolution_at(torch.ones(6), 0.143, 2.0, 10) == pytest.approx(2 * 2.0)


@pytest.mark.parametrize("n", [32, 33])
def test_soft_spherical_mask(n):
    radius, edge = 8.0, 4.0
    m = soft_spherical_mask(n, radius, edge, device="cpu", dtype=torch.float64)
    assert m.shape == (n, n, n)
    c = n // 2
    assert m[c, c, c] == 1.0
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) - c,) * 3, indexing="ij")
    r = torch.sqrt(x**2 + y**2 + z**2)
    assert torch.all(m[r <= radius] == 1)
    assert torch.all(m[r >= radius + edge] == 0)
    band = (r > radius) & (r < radius + edge)
    expect = 0.5 + 0.5 * torch.cos(math.pi * (r[band] - radius) / edge)
    assert torch.allclose(m[band], expect)
    # point along +x at radius + edge/2 is exactly 0.5
    assert m[c, c, c + 10] == pytest.approx(0.5)
    # symmetric about the centre voxel
    inner = m[c - 12 : c + 13, c - 12 : c + 13, c - 12 : c + 13]
    assert torch.allclose(inner, inner.flip(0).flip(1).flip(2))


def test_soft_circular_mask_and_hard_edge():
    m = soft_circular_mask(20, 5.0, 3.0, device="cpu", dtype=torch.float64)
    assert m.shape == (20, 20)
    assert m[10, 10] == 1.0 and m[10, 15] == 1.0 and m[10, 18] == 0.0
    assert m[10, 16] == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 3))
    hard = soft_circular_mask(20, 5.0, 0.0, device="cpu")
    assert hard[10, 15] == 1.0 and hard[10, 16] == 0.0
    assert hard.sum() == sum(1 for i in range(20) for j in range(20) if (i - 10) ** 2 + (j - 10) ** 2 <= 25)
