"""RELION's τ² correction by the average CTF² wired into the optimisers (issue 12): in runs without half-sets
(the de novo initial model) on CTF-premultiplied tomographic particles, ``MlOptimiser::setAverageCTF2`` →
``BackProjector::updateSSNRarrays(..., correct_tau2_by_avgctf2)`` divides ``1/τ²`` by the shell's average CTF², so
``data_vs_prior`` is that average times its uncorrected value.

RELION's average (re-derived from ``storeWeightedSums`` / ``setAverageCTF2``), per shell ``s = round(|k|)``:

* 3D pseudo-subtomograms: ``Σ_b Σ_k |C3_b(k)| / Σ_b Σ_k M_b(k)`` over the FFTW half volume's coefficients with
  ``M ≥ --subtomo_multi_thr`` (``sumw_ctf2 / sumw_stMulti``);
* 2D stacks: ``Σ_images Σ_k c²(k) / (N_images · Npix(s))`` (``sumw_ctf2 / (sumw_group · Npix_per_shell)``, the
  group weight counted once per tilt image).

Single particles are not premultiplied: RELION applies no correction, and neither do we (``_average_ctf2`` None).
The weights here make ``C / M`` the same for every coefficient of a shell of one particle and Hermitian-symmetric
on the ``kx = 0`` plane, so the expected value does not depend on how the half grid's redundant coefficients are
counted (RELION counts both halves of the ``kx = 0`` plane, the engine one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.core.geometry import euler_to_matrix
from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings, random_blob_volume
from cryopipe.engine.stream import ParticleSet
from cryopipe.engine.subtomo_batch import SUBTOMO_MULTI_THR
from cryopipe.engine.tomo_optimiser import StackOptimiser3D, SubtomoOptimiser3D
from cryopipe.engine.vdam import initial_model_rule

N_BOX = 16
NS = N_BOX // 2 + 1


def _radius_3d(n: int) -> np.ndarray:
    f = np.fft.fftfreq(n, 1.0 / n)
    kz, ky, kx = np.meshgrid(f, f, np.arange(n // 2 + 1), indexing="ij")
    return np.sqrt(kz * kz + ky * ky + kx * kx), kz, ky, kx


def _shell_profile(shell: np.ndarray) -> np.ndarray:
    """A CTF²-like fall-off per shell (0.9 at the origin to ~0.1 at Nyquist)."""
    return 0.1 + 0.8 * np.exp(-(shell / 5.0) ** 2)


def _subtomo_weights(N: int, seed: int) -> np.ndarray:
    """``[N, 2n, n, n//2+1]`` weight volumes: ``M_b = m_b·g(k)``, ``C3_b = a_b·h(shell)·M_b`` (``a_b`` of either
    sign, RELION takes ``|C3|``), and 1 % of the coefficients below the multiplicity threshold with a huge ``C3``
    (RELION zeroes them; counted, they would dominate the average)."""
    n = N_BOX
    r, kz, ky, kx = _radius_3d(n)
    shell = np.round(r)
    g = 0.5 + np.cos(0.7 * kz) ** 2 + 0.5 * np.cos(0.3 * ky) ** 2 + 0.1 * kx  # Hermitian on kx = 0
    rng = np.random.default_rng(seed)
    w = np.zeros((N, 2 * n, n, n // 2 + 1), np.float64)
    low = (np.abs(np.sin(3.1 * kz + 1.7 * ky + 0.9 * kx)) < 0.01) & (kx > 0)  # a few coefficients, off kx = 0
    for b in range(N):
        M = rng.uniform(0.5, 3.0) * g
        M[low] = 0.001  # below --subtomo_multi_thr (0.01)
        C3 = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 2.0) * _shell_profile(shell) * M
        C3[low] = 1.0e4
        w[b, :n], w[b, n:] = C3, M
    assert low.any() and (0.001 < SUBTOMO_MULTI_THR)
    return w.astype(np.float32)


def _relion_average_ctf2_subtomo(w: np.ndarray) -> np.ndarray:
    """RELION's loop: every FFTW half-volume coefficient with ``|k| <= n/2`` and ``M ≥ thr`` adds ``|C3|`` and
    ``M`` to its shell ``round(|k|)``."""
    n = N_BOX
    r, _, _, _ = _radius_3d(n)
    shell = np.round(r).astype(int)
    inside = r <= n / 2
    num, den = np.zeros(NS), np.zeros(NS)
    for b in range(w.shape[0]):
        C3, M = np.abs(w[b, :n].astype(np.float64)), w[b, n:].astype(np.float64)
        keep = inside & (M >= SUBTOMO_MULTI_THR)
        np.add.at(num, shell[keep], C3[keep])
        np.add.at(den, shell[keep], M[keep])
    return np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)


def _subtomo_optimiser(w: np.ndarray, vols: np.ndarray, grad: bool) -> SubtomoOptimiser3D:
    N = vols.shape[0]
    ps = ParticleSet(N_BOX, 10.0, lambda idx: vols[idx], None, np.zeros(N, np.int64), np.zeros(N, np.int64))
    s = Refine3DSettings(particle_diameter=120.0, healpix_order=0, offset_range=0.0, oversampling=0, batch_size=12,
                         ini_high=-1.0, n_iter=4, random_seed=2, split_halves=False, auto_refine=False, grad=grad,
                         sigma_noise_particles=N, flatten_solvent=False)
    rule = initial_model_rule(s.n_iter, s.tau2_fudge, {}) if grad else None
    return SubtomoOptimiser3D(ps, s, lambda idx: w[np.asarray(idx)], update_rule=rule)


def _one_iteration(make, corrected: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(data_vs_prior [K, ns], the optimiser's average CTF²)`` after one iteration from random blobs, with the
    correction or with it switched off (the hook returning None, as for single particles)."""
    opt = make()
    if not corrected:
        opt._average_ctf2 = lambda: None
    opt.initialise(None)
    opt.iterate()
    avg = opt.avg_ctf2 if corrected else None
    return opt.model.data_vs_prior[0].clone(), avg


def test_subtomo_average_ctf2_is_relions_sum_over_the_multiplicity():
    N = 24
    w = _subtomo_weights(N, seed=1)
    vols = np.zeros((N, N_BOX, N_BOX, N_BOX), np.float32)
    opt = _subtomo_optimiser(w, vols, grad=False)
    got = opt._average_ctf2().numpy()
    expect = _relion_average_ctf2_subtomo(w)
    assert np.allclose(got, expect, rtol=1e-6, atol=0), np.c_[got, expect]
    assert 0.05 < got[1:].min() and got[1:].max() < 2.0
    # the noise denominators from the same pass: unchanged, the mean over the particles of _noise_counts (n²·Σ M)
    old = sum(opt._noise_counts(b).sum(dim=0) for b in opt._batches(np.arange(N))) / N
    assert torch.allclose(opt.npix, old.clamp_min(1e-12), rtol=1e-12)


@pytest.mark.parametrize("grad", [True, False], ids=["vdam", "em_no_halves"])
def test_data_vs_prior_of_an_iteration_is_corrected_by_the_average_ctf2(grad):
    """One iteration of the initial-model (VDAM) and of the EM path without half-sets on pseudo-subtomograms:
    ``data_vs_prior`` = (RELION's average CTF², hand-computed) × the same iteration's uncorrected value, in every
    shell with data. Without the wiring the ratio is 1 (the average here is 0.1–0.9)."""
    N = 24
    w = _subtomo_weights(N, seed=3)
    g = torch.Generator().manual_seed(11)
    truth = random_blob_volume(N_BOX, 4.0, g)
    from cryopipe.core.fourier import irfft3_centered, rfft3_centered

    C3 = torch.from_numpy(np.abs(w[:, :N_BOX]))  # noisy blobs, premultiplied in 3D
    vols = (irfft3_centered(rfft3_centered(truth)[None] * C3, N_BOX)
            + 0.05 * torch.randn(N, N_BOX, N_BOX, N_BOX, generator=g)).numpy()
    make = lambda: _subtomo_optimiser(w, vols, grad=grad)  # noqa: E731
    dvp1, avg = _one_iteration(make, corrected=True)
    dvp0, _ = _one_iteration(make, corrected=False)
    expect_avg = _relion_average_ctf2_subtomo(w)
    assert np.allclose(avg.numpy(), expect_avg, rtol=1e-6)
    has_data = (dvp0[0] > 0) & (dvp0[0] < 999.0)
    has_data[0] = False
    assert int(has_data.sum()) >= 3, dvp0
    ratio = (dvp1[0][has_data] / dvp0[0][has_data]).numpy()
    assert np.allclose(ratio, expect_avg[has_data.numpy()], rtol=1e-5), np.c_[ratio, expect_avg[has_data.numpy()]]


class _Stacks:
    """One tilt series of 2D stacks (the interface StackOptimiser3D reads): 9 tilts, some invisible per particle,
    ``c_bf(k) = u_bf·sqrt(h(shell))`` with ``u`` random per image (dose-weight-like)."""

    def __init__(self, N: int, seed: int):
        F = 9
        tilts = torch.linspace(-60.0, 60.0, F, dtype=torch.float64)
        self.rotations = [euler_to_matrix(torch.zeros_like(tilts), tilts, torch.zeros_like(tilts))]
        self.ts_index = np.zeros(N, np.int64)
        rng = np.random.default_rng(seed)
        self.visible = rng.uniform(size=(N, F)) > 0.25
        self.visible[:, F // 2] = True
        self.u = rng.uniform(0.2, 1.0, (N, F))
        f = np.fft.fftfreq(N_BOX, 1.0 / N_BOX)
        ky, kx = np.meshgrid(f, np.arange(N_BOX // 2 + 1), indexing="ij")
        self.shell = np.round(np.sqrt(ky * ky + kx * kx))
        self.images = rng.normal(size=(N, F, N_BOX, N_BOX)).astype(np.float32)

    def read(self, idx, data: bool = True):
        from cryopipe.core.fourier import rfft2_centered

        idx = np.asarray(idx)
        ft = rfft2_centered(torch.from_numpy(self.images[idx])) if data else None
        return ft, self.visible[idx]

    def ctf(self, idx):
        idx = np.asarray(idx)
        c = -self.u[idx][:, :, None, None] * np.sqrt(_shell_profile(self.shell))[None, None]
        return torch.from_numpy(c.astype(np.float32))


def test_stack_average_ctf2_is_relions_per_image_average():
    """2D stacks: ``Σ_images Σ_k c² / (N_images·Npix)`` over the visible tilts = ``h(shell)·mean(u²)`` here."""
    N = 20
    stacks = _Stacks(N, seed=5)
    ps = ParticleSet(N_BOX, 10.0, lambda idx: None, None, np.zeros(N, np.int64), np.zeros(N, np.int64))
    s = Refine3DSettings(particle_diameter=N_BOX * 10.0, healpix_order=0, offset_range=0.0, oversampling=0,
                         batch_size=8, ini_high=-1.0, n_iter=1, split_halves=False, auto_refine=False)
    opt = StackOptimiser3D(ps, s, stacks)
    got = opt._average_ctf2().numpy()
    u2 = np.sum(stacks.u ** 2 * stacks.visible) / np.sum(stacks.visible)
    expect = _shell_profile(np.arange(NS)) * u2
    assert np.allclose(got, expect, rtol=1e-5), np.c_[got, expect]
    # the noise denominators are unchanged: visible tilts × coefficients per shell (one pass computes both)
    per_image = opt._set_for(np.arange(N)).shell_sum(torch.ones(opt._set_for(np.arange(N)).size,
                                                                dtype=torch.float64), NS) / stacks.visible.shape[1]
    assert torch.allclose(opt.npix, per_image * stacks.visible.sum() / N)


def test_single_particles_get_no_correction():
    """RELION corrects only CTF-premultiplied data; single particles are not (the E-step applies the CTF)."""
    assert Optimiser3D._average_ctf2(object.__new__(Optimiser3D)) is None
