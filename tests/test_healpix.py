"""HEALPix NEST sampling (re-derived, no healpy), asymmetric units, orientation grids and perturbation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.core.geometry import angular_distance, euler_to_matrix, viewing_direction
from cryopipe.core.healpix import (
    ang2pix_nest,
    angular_step,
    asymmetric_unit_pixels,
    healpix_directions,
    healpix_vectors,
    next_random_perturbation,
    npix,
    orientation_grid,
    oversampled_directions,
    oversampled_psi,
    perturb_orientations,
    pix2ang_nest,
    psi_angles,
)
from cryopipe.core.symmetry import symmetry_group_order, symmetry_operators
from cryopipe.errors import CryopipeError

# (order, NEST pixel, cos(theta), phi) from healpy 1.20.1 `pix2ang(2**order, pix, nest=True)` (reference values;
# healpy is not a dependency). Our implementation matched healpy to 1e-15 for every pixel of orders 0-7.
HEALPY_REFERENCE = [
    (0, 0, 0.6666666666666666, 0.7853981633974483), (0, 6, 6.123233995736766e-17, 3.141592653589793),
    (0, 7, 6.123233995736766e-17, 4.71238898038469), (0, 8, -0.6666666666666667, 0.7853981633974483),
    (0, 11, -0.6666666666666667, 5.497787143782138), (1, 0, 0.33333333333333326, 0.7853981633974483),
    (1, 24, -0.33333333333333337, 3.141592653589793), (1, 27, 0.33333333333333326, 3.141592653589793),
    (1, 37, -0.6666666666666667, 2.748893571891069), (1, 43, -0.33333333333333337, 3.926990816987241),
    (1, 47, -0.33333333333333337, 5.497787143782138), (2, 0, 0.16666666666666669, 0.7853981633974483),
    (2, 10, 0.6666666666666666, 0.19634954084936207), (2, 43, 0.8125, 3.4033920413889427),
    (2, 96, -0.5000000000000002, 3.141592653589793), (2, 160, -0.9791666666666666, 3.9269908169872414),
    (2, 191, -0.16666666666666657, 5.497787143782138), (3, 0, 0.08333333333333341, 0.7853981633974483),
    (3, 218, 0.6666666666666666, 5.595961914206819), (3, 230, 0.6666666666666666, 5.203262832508095),
    (3, 384, -0.5833333333333331, 3.141592653589793), (3, 670, -0.5000000000000002, 4.221515128261284),
    (3, 767, -0.08333333333333329, 5.497787143782138), (4, 0, 0.041666666666666664, 0.7853981633974483),
    (4, 16, 0.20833333333333337, 0.9817477042468102), (4, 1535, 0.625, 1.5707963267948966),
    (4, 1536, -0.625, 3.141592653589793), (4, 2803, -0.20833333333333326, 3.926990816987241),
    (4, 3071, -0.04166666666666676, 5.497787143782138), (5, 0, 0.020833333333333277, 0.7853981633974483),
    (5, 1615, 0.6458333333333333, 2.1598449493429825), (5, 6144, -0.6458333333333331, 3.141592653589793),
    (5, 9794, -0.7799479166666669, 2.084325895170151), (5, 10091, -0.3125, 2.405281875404685),
    (5, 12287, -0.020833333333333377, 5.497787143782138), (6, 0, 0.010416666666666673, 0.7853981633974483),
    (6, 5853, 0.7626953125, 2.6616271092913526), (6, 22999, 0.09375000000000008, 1.4480778637640452),
    (6, 24576, -0.65625, 3.141592653589793), (6, 40130, -0.47916666666666674, 2.3439226438892593),
    (6, 49151, -0.010416666666666774, 5.497787143782138), (7, 0, 0.005208333333333372, 0.7853981633974483),
    (7, 54740, 0.7021280924479167, 6.2637126254424595), (7, 59578, 0.6041666666666666, 4.841243366567083),
    (7, 67161, -0.33333333333333337, 0.16566992509164924), (7, 98304, -0.6614583333333331, 3.141592653589793),
    (7, 196607, -0.00520833333333325, 5.497787143782138),
]


def _random_unit(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def _covering_radius_deg(points: torch.Tensor, probes: torch.Tensor) -> float:
    d = (probes @ points.T).max(dim=1).values.clamp(-1, 1)
    return math.degrees(float(torch.acos(d).max()))


def test_counts_steps_and_reference_pixels():
    for order in range(8):
        rot, tilt = healpix_directions(order, device="cpu")
        assert rot.shape == (12 * 4**order,) == tilt.shape and npix(order) == 12 * 4**order
        assert angular_step(order) == pytest.approx(360.0 / (6 * 2**order))
    assert [angular_step(o) for o in range(6)] == [60.0, 30.0, 15.0, 7.5, 3.75, 1.875]
    for order, pix, z, phi in HEALPY_REFERENCE:
        zz, pp = pix2ang_nest(order, torch.tensor([pix]))
        assert float(zz) == pytest.approx(z, abs=1e-14)
        assert float(pp) == pytest.approx(phi, abs=1e-13)
    with pytest.raises(CryopipeError):
        healpix_directions(-1)
    with pytest.raises(CryopipeError):
        pix2ang_nest(1, torch.tensor([48]))


@pytest.mark.parametrize("order", [1, 3])
def test_ring_structure(order):
    """Iso-latitude rings: 4i pixels in north-cap ring i, 4·nside in the belt, equally spaced in phi."""
    ns = 2**order
    z, phi = pix2ang_nest(order, torch.arange(npix(order)))
    rings = {}
    for zi, pi in zip(z.tolist(), phi.tolist()):
        rings.setdefault(round(zi, 12), []).append(pi)
    assert len(rings) == 4 * ns - 1
    for zi, ph in rings.items():
        i = round(math.sqrt(3 * ns * ns * (1 - abs(zi)))) if abs(zi) > 2 / 3 else ns
        expected = 4 * min(i, ns)
        assert len(ph) == expected
        ph = np.sort(np.array(ph))
        np.testing.assert_allclose(np.diff(ph), 2 * np.pi / expected, atol=1e-12)
    # equal-area pixels: mean z over the sphere is 0 and the pixel-count in each cap matches the cap area
    assert abs(float(z.mean())) < 1e-12
    north_cap = int((z > 2 / 3 + 1e-12).sum())
    assert north_cap == 2 * ns * (ns - 1)


def test_rot_tilt_convention_matches_viewing_direction():
    rot, tilt = healpix_directions(3, device="cpu")
    assert float(rot.min()) >= -180 and float(rot.max()) <= 180
    assert float(tilt.min()) > 0 and float(tilt.max()) < 180
    v = healpix_vectors(3, device="cpu")
    torch.testing.assert_close(viewing_direction(euler_to_matrix(rot, tilt, torch.zeros_like(rot))), v)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_uniform_coverage(order):
    v = healpix_vectors(order, device="cpu")
    step = angular_step(order)
    cos = v @ v.T
    cos.fill_diagonal_(-2.0)
    nn = torch.rad2deg(torch.acos(cos.max(dim=1).values.clamp(-1, 1)))
    assert float(nn.max()) < 1.2 * step and float(nn.min()) > 0.6 * step
    assert 0.8 * step < float(nn.mean()) < 1.0 * step
    cover = _covering_radius_deg(v, _random_unit(20000, order))
    assert 0.6 * step < cover < 0.8 * step


def test_nest_hierarchy():
    for order in range(0, 6):
        ns = 2**order
        children = torch.arange(npix(order + 1))
        parents = children // 4
        zc, pc = pix2ang_nest(order + 1, children)
        # each child's centre lies inside its parent pixel
        torch.testing.assert_close(ang2pix_nest(order, zc, pc), parents)
        vp = healpix_vectors(order, device="cpu")[parents]
        vc = healpix_vectors(order + 1, device="cpu")
        ang = torch.rad2deg(torch.acos((vp * vc).sum(1).clamp(-1, 1)))
        assert float(ang.max()) < 0.8 * angular_step(order), ns


def test_ang2pix_roundtrip_and_random_points():
    for order in range(0, 8):
        z, phi = pix2ang_nest(order, torch.arange(npix(order)))
        torch.testing.assert_close(ang2pix_nest(order, z, phi), torch.arange(npix(order)))
    # random directions land in a pixel whose centre is within the covering radius, and are more often in the
    # pixel of the nearest centre than not
    x = _random_unit(5000, 11)
    order = 3
    p = ang2pix_nest(order, x[:, 2], torch.atan2(x[:, 1], x[:, 0]))
    v = healpix_vectors(order, device="cpu")
    ang = torch.rad2deg(torch.acos((v[p] * x).sum(1).clamp(-1, 1)))
    assert float(ang.max()) < 0.9 * angular_step(order)
    assert float(((x @ v.T).argmax(1) == p).double().mean()) > 0.8


def test_orientation_grid_c1_layout_and_psi():
    g = orientation_grid(2, device="cpu")
    assert g.shape == (192 * 24, 3) and g.dtype == torch.float64
    rot, tilt = healpix_directions(2, device="cpu")
    torch.testing.assert_close(g[::24, 0], rot)
    torch.testing.assert_close(g[::24, 1], tilt)
    torch.testing.assert_close(g[:24, 2], torch.arange(24, dtype=torch.float64) * 15.0)
    g10 = orientation_grid(1, psi_step=10.0, device="cpu")
    assert g10.shape == (48 * 36, 3)
    # RELION rounds the number of psi samples up: a 7 degree request gives 52 samples of 6.923 degrees
    p = psi_angles(7.0)
    assert p.numel() == 52 and float(p[1]) == pytest.approx(360 / 52)


@pytest.mark.parametrize("sym", ["C2", "C5", "D2", "D7", "T", "O", "I", "I3", "Ci", "Cs"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_asymmetric_unit(sym, order):
    pix = asymmetric_unit_pixels(order, sym, device="cpu")
    n, g = npix(order), symmetry_group_order(sym)
    assert pix.numel() > 0 and bool((pix[1:] > pix[:-1]).all())
    assert pix.numel() <= 1.25 * n / g + 8
    assert pix.numel() >= 0.95 * n / g
    ops = symmetry_operators(sym, device="cpu")
    v = healpix_vectors(order, device="cpu")[pix]
    # no two kept directions are symmetry copies of each other
    copies = torch.einsum("gij,nj->gni", ops, v)  # [G, K, 3]
    cos = torch.einsum("gni,mi->gnm", copies, v)
    eye = torch.eye(len(v), dtype=torch.bool)
    cos[0][eye] = -2.0  # a direction equals itself under the identity
    fixed = (copies - v[None]).norm(dim=-1) < 1e-9  # R·v = v (v on an axis / mirror plane) is not a duplicate
    cos[:, eye] = torch.where(fixed, torch.full_like(cos[:, eye], -2.0), cos[:, eye])
    assert float(cos.max()) < 1 - 1e-9
    # the symmetry copies of the kept directions cover the sphere as well as the full grid does
    probes = _random_unit(20000, order)
    full = _covering_radius_deg(healpix_vectors(order, device="cpu"), probes)
    sym_cover = _covering_radius_deg(copies.reshape(-1, 3), probes)
    assert sym_cover <= 1.08 * full, (sym_cover, full)  # both are estimates from random probes


def test_asymmetric_unit_c1_and_grid_with_symmetry():
    torch.testing.assert_close(asymmetric_unit_pixels(2, "C1", device="cpu"), torch.arange(192))
    torch.testing.assert_close(asymmetric_unit_pixels(2, None, device="cpu"), torch.arange(192))
    pix = asymmetric_unit_pixels(3, "D2", device="cpu")
    g = orientation_grid(3, sym="D2", device="cpu")
    assert g.shape == (pix.numel() * 48, 3)
    rot, tilt = healpix_directions(3, device="cpu")
    torch.testing.assert_close(g[::48, 0], rot[pix])
    torch.testing.assert_close(g[::48, 1], tilt[pix])


def test_perturbation_is_a_fixed_right_multiplied_rotation():
    g0 = orientation_grid(1, device="cpu")
    g1 = orientation_grid(1, perturb=0.5, device="cpu")
    assert g1.shape == g0.shape
    A0 = euler_to_matrix(g0[:, 0], g0[:, 1], g0[:, 2])
    A1 = euler_to_matrix(g1[:, 0], g1[:, 1], g1[:, 2])
    p = 0.5 * angular_step(1)
    P = euler_to_matrix(torch.tensor(p, dtype=torch.float64), p, p)
    torch.testing.assert_close(A1, A0 @ P)
    d = angular_distance(A1, A0)
    torch.testing.assert_close(d, torch.full_like(d, float(angular_distance(P, torch.eye(3, dtype=torch.float64)))))
    assert float(d[0]) > 5.0
    torch.testing.assert_close(orientation_grid(1, perturb=0.0, device="cpu"), g0)
    g00 = perturb_orientations(g0, 0.0)  # same rotations, RELION's angle ranges (psi in (-180, 180])
    torch.testing.assert_close(euler_to_matrix(g00[:, 0], g00[:, 1], g00[:, 2]), A0)
    assert float(g00[:, 2].max()) <= 180.0


def test_next_random_perturbation():
    gen = torch.Generator().manual_seed(3)
    x, seen = 0.0, []
    for _ in range(200):
        x = next_random_perturbation(x, 0.5, gen)
        assert -0.5 <= x <= 0.5
        seen.append(x)
    assert min(seen) < -0.3 and max(seen) > 0.3  # keeps changing strongly (wraps around)
    gen2 = torch.Generator().manual_seed(3)
    assert next_random_perturbation(0.0, 0.5, gen2) == seen[0]
    assert next_random_perturbation(0.2, 0.0) == 0.0
    with pytest.raises(CryopipeError):
        next_random_perturbation(0.0, 1.5)


def test_oversampling():
    pix = torch.tensor([0, 5, 47])
    rot, tilt = oversampled_directions(1, pix, 2)
    assert rot.shape == (3, 16) == tilt.shape
    r2, t2 = healpix_directions(3, device="cpu")
    torch.testing.assert_close(rot[1], r2[5 * 16:6 * 16])
    torch.testing.assert_close(tilt[2], t2[47 * 16:48 * 16])
    psi = oversampled_psi(torch.tensor([0.0, 30.0], dtype=torch.float64), 30.0, 1)
    torch.testing.assert_close(psi, torch.tensor([[-7.5, 7.5], [22.5, 37.5]], dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_grid_on_cuda():
    g = orientation_grid(2, sym="C2", device="cuda")
    assert g.device.type == "cuda"
    torch.testing.assert_close(g.cpu(), orientation_grid(2, sym="C2", device="cpu"))
