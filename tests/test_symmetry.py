"""Point groups in RELION's conventions: orders, closure, axes, and volume symmetrisation."""

from __future__ import annotations

import math

import pytest
import torch

from cryopipe.core.geometry import axis_angle_matrix
from cryopipe.core.symmetry import (
    RELION_ICOS_AXES,
    canonical_symmetry_name,
    symmetrise_volume,
    symmetry_group_order,
    symmetry_operators,
)
from cryopipe.errors import CryopipeError

ORDERS = {
    "C1": 1, "C2": 2, "C7": 7, "C12": 12, "CI": 2, "CS": 2, "D1": 2, "D2": 4, "D7": 14, "T": 12, "O": 24,
    "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60,
    # improper groups RELION also accepts
    "C4V": 8, "C3H": 6, "S4": 4, "D3V": 12, "D3H": 12, "TD": 24, "TH": 24, "OH": 48, "IH": 120, "I1H": 120,
    "I3H": 120, "I4H": 120,
}
PROPER = {"C1", "C2", "C7", "C12", "D1", "D2", "D7", "T", "O", "I", "I1", "I2", "I3", "I4"}
PHI = (1 + math.sqrt(5)) / 2


def _contains(G: torch.Tensor, M: torch.Tensor, tol=1e-8) -> bool:
    return bool((G - M).abs().amax(dim=(-1, -2)).min() < tol)


def _rot(axis, angle):
    return axis_angle_matrix(torch.tensor(axis, dtype=torch.float64), angle)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_orders_closure_inverses(name):
    G = symmetry_operators(name, device="cpu")
    n = ORDERS[name]
    assert G.shape == (n, 3, 3) and symmetry_group_order(name) == n
    torch.testing.assert_close(G[0], torch.eye(3, dtype=torch.float64))
    # orthogonal; proper groups have det +1
    torch.testing.assert_close(G @ G.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(n, 3, 3))
    det = torch.linalg.det(G)
    if name in PROPER:
        assert torch.allclose(det, torch.ones_like(det))
    else:
        assert (det < 0).sum() == n // 2
    # closure: every product is in the set; all elements distinct
    prods = (G[:, None] @ G[None]).reshape(-1, 3, 3)
    d = (prods[:, None] - G[None]).abs().amax(dim=(-1, -2)).min(dim=1).values
    assert float(d.max()) < 1e-9
    pair = (G[:, None] - G[None]).abs().amax(dim=(-1, -2)) + 10 * torch.eye(n, dtype=torch.float64)
    assert float(pair.min()) > 1e-3
    for M in G.transpose(-1, -2):  # inverses
        assert _contains(G, M)


def test_relion_axis_conventions():
    z, x, y = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    assert _contains(symmetry_operators("C7", "cpu"), _rot(z, 360 / 7))
    assert not _contains(symmetry_operators("C7", "cpu"), _rot(x, 180))
    D5 = symmetry_operators("D5", "cpu")
    assert _contains(D5, _rot(z, 72)) and _contains(D5, _rot(x, 180))
    O = symmetry_operators("O", "cpu")
    for ax in (x, y, z):
        assert _contains(O, _rot(ax, 90))
    assert _contains(O, _rot((1.0, 1.0, 1.0), 120))
    T = symmetry_operators("T", "cpu")  # RELION: 3-fold on z, 2-fold on (0, 0.816496, 0.577350)
    assert _contains(T, _rot(z, 120)) and _contains(T, _rot((0.0, 0.816496, 0.577350), 180), tol=1e-6)
    assert not _contains(T, _rot(z, 180))
    # Ci is the inversion, Cs the mirror through the xy plane
    torch.testing.assert_close(symmetry_operators("Ci", "cpu")[1], -torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(symmetry_operators("cs", "cpu")[1], torch.diag(torch.tensor([1.0, 1.0, -1.0],
                                                                                         dtype=torch.float64)))


def test_icosahedral_settings():
    I2 = symmetry_operators("I", "cpu")
    torch.testing.assert_close(I2, symmetry_operators("I2", "cpu"))
    # I2 (RELION default): 2-folds on x, y, z; 5-fold along (1, 0, φ); 3-fold along (0, 1/φ, φ)
    for ax in ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)):
        assert _contains(I2, _rot(ax, 180))
    assert _contains(I2, _rot((1.0, 0.0, PHI), 72)) and _contains(I2, _rot((0.0, 1 / PHI, PHI), 120))
    # ... and not the 90-degree-turned setting (5-folds along (0, ±1, ±φ)), nor a 5-fold on z
    assert not _contains(I2, _rot((0.0, 0.0, 1.0), 72)) and not _contains(I2, _rot((0.0, 1.0, PHI), 72))
    # I1 is I2 turned by 90 degrees about y (5-fold along (φ, 0, -1))
    Ry = _rot((0.0, 1.0, 0.0), 90)
    I1 = symmetry_operators("I1", "cpu")
    for M in Ry @ I2 @ Ry.T:
        assert _contains(I1, M)
    assert _contains(I1, _rot((PHI, 0.0, -1.0), 72))
    # I3 and I4: 5-fold on z; mirror images of each other through x = 0; 2-fold towards -x / +x
    I3, I4 = symmetry_operators("I3", "cpu"), symmetry_operators("I4", "cpu")
    assert _contains(I3, _rot((0.0, 0.0, 1.0), 72)) and _contains(I4, _rot((0.0, 0.0, 1.0), 72))
    assert _contains(I3, _rot((-1.0, 0.0, PHI), 180)) and _contains(I4, _rot((1.0, 0.0, PHI), 180))
    M = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    for R in M @ I3 @ M:
        assert _contains(I4, R)
    assert not _contains(I3, _rot((1.0, 0.0, PHI), 180))


@pytest.mark.parametrize("name", sorted(RELION_ICOS_AXES))
def test_icosahedral_generators_match_relion_decimals(name):
    """RELION's decimal generator axes (symmetries.cpp) are in our (exactly closed) groups to < 1e-7."""
    G = symmetry_operators(name, "cpu")
    for fold, axis in RELION_ICOS_AXES[name]:
        for j in range(1, fold):
            assert _contains(G, _rot(axis, 360.0 * j / fold), tol=1e-7)


def test_names():
    assert canonical_symmetry_name("i") == "I2" and canonical_symmetry_name(" d7 ") == "D7"
    for bad in ("X3", "C0", "Q", "S3", "D"):
        with pytest.raises(CryopipeError):
            symmetry_operators(bad, "cpu")
    with pytest.raises(CryopipeError, match="not defined in RELION"):
        symmetry_operators("I5", "cpu")


def _blobs(n, centres, sigma):
    r = torch.arange(n, dtype=torch.float64) - n // 2
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    pos = torch.stack([xx, yy, zz], -1)
    d2 = ((pos[None] - centres[:, None, None, None, :]) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * sigma**2)).sum(0)


@pytest.mark.parametrize("name", ["C4", "D3", "T", "I"])
def test_symmetrise_volume(name):
    n = 32
    G = symmetry_operators(name, "cpu")
    p = torch.tensor([[5.0, 2.0, 3.0], [-3.0, 6.0, 1.5]], dtype=torch.float64)
    # symmetric volume: blobs at R·p for every operator (V(R x) = V(x))
    centres = torch.einsum("gij,kj->gki", G, p).reshape(-1, 3)
    sym = _blobs(n, centres, 2.0)
    out = symmetrise_volume(sym, name)
    assert out.shape == sym.shape and out.dtype == sym.dtype
    rel = float((out - sym).norm() / sym.norm())
    assert rel < 0.03, rel  # trilinear interpolation error only (C4: exact up to the box edge)
    if name == "C4":
        assert rel < 1e-6
    # an asymmetric volume changes, and becomes the symmetric one / |G|
    asym = _blobs(n, p, 2.0)
    out_a = symmetrise_volume(asym, name)
    assert float((out_a - asym).norm() / asym.norm()) > 0.5
    assert float((out_a - sym / len(G)).norm() / (sym / len(G)).norm()) < 0.03
    # float32 and batched input
    both = symmetrise_volume(torch.stack([sym, asym]).float(), name)
    assert both.dtype == torch.float32 and both.shape == (2, n, n, n)
    torch.testing.assert_close(both[1].double(), out_a, atol=2e-5, rtol=0)


def test_symmetrise_rotates_about_box_centre_n_over_2():
    # even box: a blob on the z axis through voxel N//2 is C4-invariant only about that centre
    n = 24
    v = _blobs(n, torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64), 1.5)
    torch.testing.assert_close(symmetrise_volume(v, "C4"), v, atol=1e-12, rtol=0)
    shifted = _blobs(n, torch.tensor([[0.5, 0.0, 5.0]], dtype=torch.float64), 1.5)
    assert float((symmetrise_volume(shifted, "C4") - shifted).abs().max()) > 0.05
