"""Beam tilt: the antisymmetric phase of core.ctf.beam_tilt_phase (RELION's selfApplyBeamTilt) and the simulated
particles that carry it (sim.particles)."""

from __future__ import annotations

import math

import numpy as np
import torch

from cryopipe.core.ctf import beam_tilt_phase, wavelength_A
from cryopipe.core.fourier import freq_grid_2d, rfft2_centered
from cryopipe.core.projector import Projector
from cryopipe.io.star import read_star
from cryopipe.sim.particles import particle_images, simulate_particles


def _relion_degrees(n: int, angpix: float, tx: float, ty: float, voltage: float, cs: float) -> np.ndarray:
    """RELION's ``selfApplyBeamTilt`` loop (ctf.cpp), phase in degrees on the half-complex grid ``[n, n//2+1]``."""
    lam = wavelength_A(voltage)
    boxsize = angpix * n
    factor = 0.360 * cs * 10000000 * lam * lam / (boxsize ** 3)
    out = np.zeros((n, n // 2 + 1))
    for i in range(n):
        ip = i if i < n // 2 + 1 else i - n
        for j in range(n // 2 + 1):
            out[i, j] = factor * (ip * ip + j * j) * (ip * ty + j * tx)
    return out


def test_beam_tilt_phase_matches_relion_and_is_odd():
    n, px, tx, ty = 16, 1.3, 0.8, -1.7
    kx, ky = freq_grid_2d(n, dtype=torch.float64)
    phi = beam_tilt_phase(kx / (n * px), ky / (n * px), tx, ty, 300.0, 2.7)
    rows = np.arange(n) != n // 2  # the Nyquist row: RELION's ky = +n/2, cryopipe's (fftfreq) −n/2
    np.testing.assert_allclose(np.rad2deg(phi.numpy())[rows], _relion_degrees(n, px, tx, ty, 300.0, 2.7)[rows],
                               rtol=1e-9, atol=1e-12)
    k = torch.tensor([0.11, -0.07], dtype=torch.float64)
    a = beam_tilt_phase(k[0], k[1], tx, ty)
    assert float(a) != 0.0 and math.isclose(float(beam_tilt_phase(-k[0], -k[1], tx, ty)), -float(a))
    t = torch.tensor([tx, ty], dtype=torch.float64, requires_grad=True)  # differentiable in the beam tilt
    beam_tilt_phase(k[0], k[1], t[0], t[1]).backward()
    assert float(t.grad.abs().sum()) > 0


def test_simulated_particles_carry_the_beam_tilt_phase(tmp_path):
    n, px = 24, 1.5
    g = torch.arange(n, dtype=torch.float32) - n // 2
    vol = torch.exp(-((g[:, None, None] - 2) ** 2 + g[None, :, None] ** 2 + (g[None, None, :] + 3) ** 2) / 8.0)
    proj = Projector(vol, pad=2)
    angles = torch.tensor([[10.0, 40.0, 70.0], [200.0, 100.0, 5.0]])
    plain = particle_images(proj, angles, None, px)
    tilted = particle_images(proj, angles, None, px, beam_tilt_mrad=(2.0, -1.0))
    assert not torch.allclose(plain, tilted, atol=1e-4 * float(plain.abs().max()))
    a, b = rfft2_centered(plain.double()), rfft2_centered(tilted.double())
    kx, ky = freq_grid_2d(n, dtype=torch.float64)
    phi = beam_tilt_phase(kx / (n * px), ky / (n * px), 2.0, -1.0, 300.0, 2.7)
    strong = a.abs() > 1e-3 * float(a.abs().max())
    strong[:, 0, 0] = False
    strong[:, n // 2] = False  # Nyquist row and column (their Hermitian mates lie on the grid itself)
    strong[:, :, n // 2] = False
    diff = torch.angle(b[strong] / a[strong]) - phi.expand_as(a)[strong]
    wrapped = torch.atan2(torch.sin(diff), torch.cos(diff))
    assert float(wrapped.abs().max()) < 1e-3
    sim = simulate_particles(vol.numpy(), 6, px, float("inf"), tmp_path, ctf=True, beam_tilt_mrad=(1.0, 0.5),
                             write_map=False, signal_radius_px=8.0)
    truth_optics = read_star(sim.truth_path)["optics"]
    assert float(truth_optics["rlnBeamTiltX"][0]) == 1.0 and float(truth_optics["rlnBeamTiltY"][0]) == 0.5
    assert "rlnBeamTiltX" not in read_star(sim.star_path)["optics"].columns
