"""CTF: RELION's formula, sign conventions, astigmatism angle, phase shift, B-factor and first-peak masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.core.ctf import ctf_1d, ctf_2d, ctf_at, ctf_gamma, first_peak_mask, wavelength_A
from cryopipe.errors import CryopipeError


def _relion_ctf_numpy(kx, ky, du, dv, ang, kv, cs, q0, phase, bfac, scale):
    """Straight transcription of the formula in reference/conventions.md (independent of the module's algebra)."""
    v = kv * 1e3
    lam = 12.2643247 / np.sqrt(v * (1 + 0.978466e-6 * v))
    k2 = kx**2 + ky**2
    theta = np.arctan2(ky, kx)
    df = du * np.cos(theta - np.deg2rad(ang)) ** 2 + dv * np.sin(theta - np.deg2rad(ang)) ** 2
    gamma = (-np.pi * lam * df * k2 + np.pi / 2 * cs * 1e7 * lam**3 * k2**2
             - np.deg2rad(phase) - np.arctan(q0 / np.sqrt(1 - q0**2)))
    return -np.sin(gamma) * np.exp(-bfac * k2 / 4) * scale


def _grid(n, apix):
    ky = np.fft.fftfreq(n) * n
    kx = np.arange(n // 2 + 1)
    kyy, kxx = np.meshgrid(ky, kx, indexing="ij")
    return kxx / (n * apix), kyy / (n * apix)


def test_wavelength():
    # standard relativistic wavelengths (Å)
    assert wavelength_A(300) == pytest.approx(0.0196876, abs=2e-7)
    assert wavelength_A(200) == pytest.approx(0.0250795, abs=2e-7)
    assert wavelength_A(100) == pytest.approx(0.0370146, abs=2e-7)
    t = wavelength_A(torch.tensor([300.0, 200.0], dtype=torch.float64))
    np.testing.assert_allclose(t.cpu().numpy(), [wavelength_A(300), wavelength_A(200)], rtol=1e-14)


def test_ctf_at_zero_frequency_and_phase_shift_sign():
    for q0 in (0.0, 0.07, 0.1, 0.5):
        c = ctf_2d(32, 1.5, 12000.0, 11000.0, 20.0, amplitude_contrast=q0)
        assert float(c[0, 0, 0]) == pytest.approx(q0, abs=1e-7)  # CTF(0) = +Q0
    # with a phase plate of phi degrees: CTF(0) = sin(phi + asin(Q0))
    for phi in (30.0, 90.0):
        c = ctf_2d(32, 1.5, 12000.0, 11000.0, 20.0, amplitude_contrast=0.1, phase_shift=phi)
        assert float(c[0, 0, 0]) == pytest.approx(math.sin(math.radians(phi) + math.asin(0.1)), abs=1e-7)
    # scale multiplies; with underfocus the CTF rises from +Q0 towards +1 before its first zero (RELION's sign)
    c = ctf_2d(256, 1.0, 20000.0, 20000.0, 0.0, scale=0.5)
    assert float(c[0, 0, 0]) == pytest.approx(0.05, abs=1e-7)
    assert 0.05 < float(c[0, 0, 2]) < float(c[0, 0, 3]) < 0.5


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 137.0])
def test_matches_independent_formula_on_grid(angle):
    n, apix = 96, 1.3
    params = dict(du=21000.0, dv=17500.0, ang=angle, kv=300.0, cs=2.7, q0=0.1, phase=0.0, bfac=0.0, scale=1.0)
    kx, ky = _grid(n, apix)
    expect = _relion_ctf_numpy(kx, ky, **params)
    got = ctf_2d(n, apix, params["du"], params["dv"], angle)
    assert got.shape == (1, n, n // 2 + 1) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].cpu().numpy(), expect, atol=2e-6)


def _zeros_along(defocus, kv, cs, q0, m_max):
    """Analytic k (Å⁻¹) of the first CTF zeros γ = −mπ (m = 1..m_max), non-astigmatic defocus."""
    lam = wavelength_A(kv)
    a = math.pi * lam * defocus
    b = math.pi / 2 * cs * 1e7 * lam**3
    c = math.atan(q0 / math.sqrt(1 - q0**2))
    ks = []
    for m in range(1, m_max + 1):
        # b u^2 − a u − c + mπ = 0, smallest positive root
        c0 = m * math.pi - c
        u = (a - math.sqrt(a * a - 4 * b * c0)) / (2 * b)
        ks.append(math.sqrt(u))
    return np.array(ks)


def test_astigmatic_zero_crossings_along_u_and_v():
    du, dv, ang = 25000.0, 18000.0, 30.0
    ku = _zeros_along(du, 300, 2.7, 0.1, 6)
    kv = _zeros_along(dv, 300, 2.7, 0.1, 6)
    tu = math.radians(ang)
    tv = tu + math.pi / 2
    cu = ctf_at(torch.as_tensor(ku * math.cos(tu)), torch.as_tensor(ku * math.sin(tu)), du, dv, ang)
    cv = ctf_at(torch.as_tensor(kv * math.cos(tv)), torch.as_tensor(kv * math.sin(tv)), du, dv, ang)
    np.testing.assert_allclose(cu.cpu().numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(cv.cpu().numpy(), 0.0, atol=1e-5)
    # the U zeros are NOT zeros along V (the angle convention matters)
    cuv = ctf_at(torch.as_tensor(ku * math.cos(tv)), torch.as_tensor(ku * math.sin(tv)), du, dv, ang)
    assert np.abs(cuv.cpu().numpy()).max() > 0.3
    # direction -theta is not equivalent to theta for a 30 degree angle
    cneg = ctf_at(torch.as_tensor(ku * math.cos(-tu)), torch.as_tensor(ku * math.sin(-tu)), du, dv, ang)
    assert np.abs(cneg.cpu().numpy()).max() > 0.3


def test_sign_changes_on_grid_axes_at_analytic_zeros():
    """On the half-complex grid: +x axis (row 0) has defocus U for angle 0; +y axis (column 0) has U for angle 90."""
    n, apix = 512, 1.0
    du, dv = 24000.0, 16000.0
    for ang, axis in ((0.0, "x"), (90.0, "y")):
        c = ctf_2d(n, apix, du, dv, ang)[0]
        line = c[0, : n // 2 + 1] if axis == "x" else c[: n // 2 + 1, 0]
        line = line.cpu().numpy().astype(np.float64)
        k = np.arange(n // 2 + 1) / (n * apix)
        crossings = np.nonzero(np.sign(line[1:]) != np.sign(line[:-1]))[0]
        zeros = _zeros_along(du, 300, 2.7, 0.1, 5)
        # each analytic zero lies between the two samples where the sign flips
        for z, i in zip(zeros, crossings[:5]):
            assert k[i] <= z <= k[i + 1]
        # and the other axis is governed by V
        other = c[: n // 2 + 1, 0] if axis == "x" else c[0, : n // 2 + 1]
        other = other.cpu().numpy().astype(np.float64)
        crossings_o = np.nonzero(np.sign(other[1:]) != np.sign(other[:-1]))[0]
        for z, i in zip(_zeros_along(dv, 300, 2.7, 0.1, 5), crossings_o[:5]):
            assert k[i] <= z <= k[i + 1]


def test_phase_shift_and_bfactor_rows():
    n, apix = 64, 2.0
    kx, ky = _grid(n, apix)
    base = dict(du=15000.0, dv=14000.0, ang=44.0, kv=200.0, cs=2.0, q0=0.07, scale=1.0)
    for phase, bfac in ((60.0, 0.0), (0.0, 150.0), (77.3, 173.4)):
        expect = _relion_ctf_numpy(kx, ky, phase=phase, bfac=bfac, **base)
        got = ctf_2d(n, apix, base["du"], base["dv"], base["ang"], voltage=base["kv"], cs=base["cs"],
                     amplitude_contrast=base["q0"], phase_shift=phase, bfactor=bfac)[0]
        np.testing.assert_allclose(got.cpu().numpy(), expect, atol=2e-6)
    # B-factor: exact exp(-B k^2/4) envelope relative to B = 0
    c0 = ctf_2d(n, apix, 15000.0, 14000.0, 44.0)[0].double()
    cb = ctf_2d(n, apix, 15000.0, 14000.0, 44.0, bfactor=100.0)[0].double()
    k2 = torch.as_tensor(kx**2 + ky**2, device=c0.device)
    sel = c0.abs() > 0.05
    np.testing.assert_allclose((cb[sel] / c0[sel]).cpu().numpy(), torch.exp(-25.0 * k2[sel]).cpu().numpy(), rtol=2e-5)
    # 90 degree phase shift turns -sin into -cos... i.e. CTF(phi=90) = cos(gamma0) with gamma0 at phi=0
    g0 = ctf_gamma(torch.as_tensor(kx), torch.as_tensor(ky), 15000.0, 14000.0, 44.0)
    c90 = ctf_2d(n, apix, 15000.0, 14000.0, 44.0, phase_shift=90.0)[0]
    np.testing.assert_allclose(c90.cpu().numpy(), torch.cos(g0).cpu().numpy(), atol=2e-6)


def test_batched_parameters_and_pixel_size():
    n = 48
    du = torch.tensor([8000.0, 15000.0, 30000.0], dtype=torch.float64)
    dv = du - 700.0
    ang = torch.tensor([10.0, 100.0, 170.0], dtype=torch.float64)
    phase = torch.tensor([0.0, 45.0, 0.0], dtype=torch.float64)
    bfac = torch.tensor([0.0, 0.0, 80.0], dtype=torch.float64)
    apix = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    c = ctf_2d(n, apix, du, dv, ang, phase_shift=phase, bfactor=bfac)
    assert c.shape == (3, n, n // 2 + 1) and c.dtype == torch.float32 and c.device == du.device
    for i in range(3):
        single = ctf_2d(n, float(apix[i]), float(du[i]), float(dv[i]), float(ang[i]), phase_shift=float(phase[i]),
                        bfactor=float(bfac[i]))
        torch.testing.assert_close(c[i].cpu(), single[0].cpu())
        kx, ky = _grid(n, float(apix[i]))
        expect = _relion_ctf_numpy(kx, ky, float(du[i]), float(dv[i]), float(ang[i]), 300.0, 2.7, 0.1,
                                   float(phase[i]), float(bfac[i]), 1.0)
        np.testing.assert_allclose(c[i].cpu().numpy(), expect, atol=2e-6)
    with pytest.raises(CryopipeError):
        ctf_2d(n, 1.0, du, dv[:2], 0.0)


def test_bad_parameters_raise():
    with pytest.raises(CryopipeError, match="rlnAmplitudeContrast"):
        ctf_2d(16, 1.0, 1e4, 1e4, 0.0, amplitude_contrast=1.5)
    with pytest.raises(CryopipeError, match="rlnVoltage"):
        ctf_2d(16, 1.0, 1e4, 1e4, 0.0, voltage=0.0)
    with pytest.raises(CryopipeError, match="pixel size"):
        ctf_2d(16, 0.0, 1e4, 1e4, 0.0)


def test_ctf_1d_matches_2d_axis_and_options():
    n, apix = 128, 1.2
    k = torch.arange(n // 2 + 1, dtype=torch.float64) / (n * apix)
    c1 = ctf_1d(k, 12000.0, bfactor=50.0)
    c2 = ctf_2d(n, apix, 12000.0, 12000.0, 0.0, bfactor=50.0)[0, 0]
    torch.testing.assert_close(c1.cpu(), c2.cpu())
    # broadcasting to [B, K]
    cb = ctf_1d(k[None, :], torch.tensor([[10000.0], [20000.0]], dtype=torch.float64))
    assert cb.shape == (2, n // 2 + 1)
    c = ctf_2d(n, apix, 12000.0, 11000.0, 30.0)
    torch.testing.assert_close(ctf_2d(n, apix, 12000.0, 11000.0, 30.0, abs_value=True), c.abs())
    torch.testing.assert_close(ctf_2d(n, apix, 12000.0, 11000.0, 30.0, phase_flip=True),
                               torch.where(c < 0, -1.0, 1.0))


def _brute_force_first_peak(kx, ky, du, dv, ang, kv, cs, q0, phase, samples=2000):
    """For each frequency: |γ| < π/2 along the whole segment from 0 to k (dense sampling)."""
    s = np.linspace(0.0, 1.0, samples)[:, None]
    kxf, kyf = kx.reshape(1, -1) * s, ky.reshape(1, -1) * s
    g = ctf_gamma(torch.as_tensor(kxf), torch.as_tensor(kyf), du, dv, ang, kv, cs, q0, phase).cpu().numpy()
    return (np.abs(g) < np.pi / 2).all(axis=0).reshape(kx.shape), g[-1].reshape(kx.shape)


@pytest.mark.parametrize(
    "du,dv,ang,apix,cs,phase",
    [
        (15000.0, 12000.0, 30.0, 1.0, 2.7, 0.0),   # ordinary underfocus, astigmatic
        (-3000.0, -2000.0, 0.0, 1.0, 2.7, 0.0),    # overfocus: gamma increases monotonically
        (2000.0, 2000.0, 0.0, 0.3, 2.7, 0.0),      # near focus, tiny pixel: gamma comes back within ±π/2
        (20000.0, 20000.0, 0.0, 1.0, 0.0, 40.0),   # Cs = 0 (linear in k²) with a phase shift
    ],
)
def test_first_peak_mask_against_brute_force(du, dv, ang, apix, cs, phase):
    n = 64
    kx, ky = _grid(n, apix)
    expect, gamma = _brute_force_first_peak(kx, ky, du, dv, ang, 300.0, cs, 0.1, phase)
    got = first_peak_mask(n, apix, du, dv, ang, cs=cs, phase_shift=phase)[0].cpu().numpy()
    # ignore grid points whose |γ| is within sampling error of π/2
    sure = np.abs(np.abs(gamma) - np.pi / 2) > 1e-3
    assert (got[sure] == expect[sure]).all()
    assert expect.any() and (~expect).any()
    pw = first_peak_mask(n, apix, du, dv, ang, cs=cs, phase_shift=phase, pointwise=True)[0].cpu().numpy()
    np.testing.assert_array_equal(pw, np.abs(gamma) < np.pi / 2)
    if apix == 0.3:
        # RELION's pointwise rule re-admits high frequencies here; the radial rule does not
        assert (pw & ~got).any()


def test_intact_until_first_peak():
    n, apix = 64, 2.0
    mask = first_peak_mask(n, apix, 20000.0, 18000.0, 10.0)
    c = ctf_2d(n, apix, 20000.0, 18000.0, 10.0, bfactor=40.0, scale=0.8)
    ci = ctf_2d(n, apix, 20000.0, 18000.0, 10.0, bfactor=40.0, scale=0.8, intact_until_first_peak=True)
    kx, ky = _grid(n, apix)
    env = 0.8 * np.exp(-10.0 * (kx**2 + ky**2))
    np.testing.assert_allclose(ci[mask].cpu().numpy(), env[mask[0].cpu().numpy()], rtol=1e-6)
    torch.testing.assert_close(ci[~mask], c[~mask])
    # outside the mask (just past the peak) |CTF| starts below 1·envelope; inside, the raw CTF is < envelope
    assert (c[mask].abs() <= torch.as_tensor(env[mask[0].cpu().numpy()], device=c.device).float() + 1e-6).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_ctf_on_cuda_matches_cpu():
    du = torch.tensor([10000.0, 25000.0], device="cuda")
    c = ctf_2d(128, 1.1, du, du - 500.0, torch.tensor([20.0, 160.0], device="cuda"), phase_shift=10.0, bfactor=30.0)
    assert c.device.type == "cuda" and c.dtype == torch.float32
    ref = ctf_2d(128, 1.1, du.cpu(), du.cpu() - 500.0, torch.tensor([20.0, 160.0]), phase_shift=10.0, bfactor=30.0)
    torch.testing.assert_close(c.cpu(), ref, atol=1e-5, rtol=0)
