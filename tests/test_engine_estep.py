"""Engine E-step: coefficient sets, GEMM squared differences, posterior/pruning, exact recovery of in-plane angle,
shift and class on noise-free data, additivity of the M-step sufficient statistics, back-rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.core.fourier import irfft2_centered, phase_shift_2d, rfft2_centered
from cryopipe.engine.batch import prepare_batch
from cryopipe.engine.coefficients import coefficient_set
from cryopipe.engine.estep import (
    EStepSettings,
    TranslationGrid,
    expectation,
    shift_phases,
    significant_mask,
    squared_differences,
)
from cryopipe.engine.reference2d import (
    ClassReferences2D,
    back_rotate_sums,
    coefficients_to_images,
    gridding_correction_2d,
    images_to_coefficients,
)
from cryopipe.engine.sampling import InPlaneSampling, psi_step_adjusted, translation_grid

from engine_helpers import simulate


def test_coefficient_set_layout():
    n = 48
    full = coefficient_set(n, n // 2)
    # RELION's Npix_per_shell: half grid, shells round(|k|) <= n/2, without the kx=0, ky<0 half column
    counts = np.zeros(n // 2 + 1)
    for i in range(n):
        ky = i if i < n // 2 else i - n
        for kx in range(n // 2 + 1):
            if kx == 0 and ky < 0:
                continue
            s = int(round(math.hypot(kx, ky)))
            if s <= n // 2:
                counts[s] += 1
    assert np.array_equal(full.shell_counts().numpy(), counts)
    assert torch.all(full.radius[1:] >= full.radius[:-1])  # sorted: smaller sets are prefixes
    sub = full.prefix(10)
    assert torch.equal(sub.flat, full.flat[:sub.size]) and int(sub.shell.max()) == 10
    # gather/scatter round trip gives back the low-pass filtered real image
    img = torch.randn(3, n, n, dtype=torch.float64)
    ft = rfft2_centered(img)
    back = irfft2_centered(full.scatter(full.gather(ft)), n)
    keep = torch.round(torch.sqrt(torch.fft.rfftfreq(n, 1 / n)[None] ** 2 +
                                  torch.fft.fftfreq(n, 1 / n)[:, None] ** 2)) <= n // 2
    keep[n // 2, 0] = False  # (kx=0, ky=-n/2): in the excluded half column (RELION), its own mate
    expect = irfft2_centered(ft * keep, n)
    assert torch.allclose(back, expect, atol=1e-10)


def test_psi_step_and_translations_like_relion():
    assert psi_step_adjusted(12) == pytest.approx(11.25)  # the fixture run's rlnPsiStep
    assert psi_step_adjusted(6) == pytest.approx(5.625)
    assert psi_step_adjusted(11.25) == pytest.approx(11.25)
    t = translation_grid(5, 2)  # --offset_range 5 --offset_step 2
    assert t.shape[0] == 21 and float(t.norm(dim=1).max()) <= 5 + 1e-6
    s = InPlaneSampling(11.25, 5, 2, oversampling=1)
    fine = s.fine_psi()
    assert fine.numel() == 64 and float(fine[1] - fine[0]) == pytest.approx(5.625)
    ch = s.translation_children(torch.zeros(1, 2))[0]
    assert sorted(map(tuple, ch.tolist())) == [(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)]


def test_squared_differences_equal_direct_sum():
    g = torch.Generator().manual_seed(3)
    B, P, M, n = 4, 60, 7, 32
    cs = coefficient_set(n, 8)
    P = cs.size
    X = torch.complex(torch.randn(B, P, generator=g), torch.randn(B, P, generator=g))
    C = torch.randn(B, P, generator=g)
    inv = torch.rand(B, P, generator=g) + 0.5
    refs = torch.complex(torch.randn(M, P, generator=g), torch.randn(M, P, generator=g))
    t = torch.tensor([[0.0, 0.0], [1.5, -2.0], [-0.5, 3.0]])
    d2 = squared_differences(X, C, inv, refs, shift_phases(cs.k, t, n))
    # direct: translate the images with the core phase shift (content moves by +t) and sum |X_t − C·R|²/σ²
    half = cs.scatter(X.to(torch.complex128))
    for ti in range(t.shape[0]):
        Xt = cs.gather(phase_shift_2d(half, t[ti].expand(B, 2).double(), n))
        diff = Xt[:, None, :] - C[:, None, :].double() * refs[None].to(torch.complex128)
        direct = 0.5 * (diff.abs().square() * inv[:, None, :].double()).sum(-1)
        assert torch.allclose(d2[:, ti, :].double(), direct, rtol=1e-4, atol=1e-3)


def test_significant_mask():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert significant_mask(w, 0.79).tolist()[0] == [True, True, False, False, False]
    assert significant_mask(w, 0.81).tolist()[0] == [True, True, True, False, False]
    assert significant_mask(w, 0.999, max_significant=2).tolist()[0] == [True, True, False, False, False]
    assert significant_mask(w, 0.999).tolist()[1] == [True, False, False, False, False]


def _setup(relion_dir, N=24, seed=5, oversampling=1, snr=None):
    samp = InPlaneSampling(psi_step_adjusted(12.0), 2.0, 1.0, oversampling=oversampling)
    fine_psi = samp.fine_psi() if oversampling else samp.coarse_psi()
    fine_t = samp.fine_translations() if oversampling else samp.coarse_translations()
    g = np.random.default_rng(seed)
    ipsi = g.integers(0, fine_psi.numel(), N)
    it = g.integers(0, fine_t.shape[0], N)
    # truth on the final grid: the particle's origin o is found as translation t = o (X shifted by +o)
    sim = simulate(relion_dir, N=N, n=32, snr=snr, seed=seed, psi=fine_psi[ipsi].numpy(),
                   origin=fine_t[it].numpy(), ctf=True)
    return samp, sim


def _estep_inputs(samp, sim, cs, oversampling=1, coarse_r=8):
    n = sim.n
    full = coefficient_set(n, n // 2)
    P = cs.size
    Pc = full.count_upto(coarse_r) if oversampling else P
    K = sim.views.shape[0]
    cpsi = samp.coarse_psi()
    src = ClassReferences2D(sim.views, cs, Pc, cpsi, samp.psi_children(cpsi) if oversampling else None)
    tc = samp.coarse_translations()
    tg = TranslationGrid(tc, samp.translation_children(tc) if oversampling else tc[:, None])
    st = EStepSettings(n=n, k=cs.k, shell=cs.shell, coarse_size=Pc, n_shells=n // 2 + 1,
                       oversampling=bool(oversampling))
    from cryopipe.core.ctf import ctf_2d

    c = sim.ctf
    ctf = ctf_2d(n, sim.pixel_size, torch.tensor(c["defocus_u"]), torch.tensor(c["defocus_v"]),
                 torch.tensor(c["defocus_angle"]))
    sigma2 = torch.full((1, n // 2 + 1), 1e-6, dtype=torch.float64)
    return full, P, src, tg, st, ctf, sigma2, K


@pytest.mark.parametrize("oversampling", [1, 0])
def test_estep_recovers_true_angle_shift_class_noise_free(relion_dir, oversampling):
    samp, sim = _setup(relion_dir, oversampling=oversampling)
    cs = coefficient_set(sim.n, 14)
    full, P, src, tg, st, ctf, sigma2, K = _estep_inputs(samp, sim, cs, oversampling)
    B = sim.images.shape[0]
    batch = prepare_batch(torch.from_numpy(sim.images), full, P, sigma2, torch.zeros(B, dtype=torch.long),
                          ctf=ctf, n_classes=K)
    res = expectation(batch, src, tg, st)
    S = src.n_children
    psi = src.final_psi()[res.best_coarse * S + res.best_child] if oversampling else src.final_psi()[res.best_coarse]
    assert np.array_equal(res.best_class.numpy(), sim.klass)
    err = (psi.numpy() - sim.psi + 180) % 360 - 180
    assert np.abs(err).max() < 1e-3
    assert np.abs(res.best_offset.numpy() - sim.origin).max() < 1e-5
    assert float(res.pmax.min()) > 0.9  # noise-free and sigma² small: sharp posteriors


def test_sufficient_statistics_add_over_batches(relion_dir):
    samp, sim = _setup(relion_dir, N=18, seed=9, snr=1.0)
    cs = coefficient_set(sim.n, 10)
    full, P, src, tg, st, ctf, sigma2, K = _estep_inputs(samp, sim, cs)
    sigma2 = sigma2 * 5000  # noisy: broad posteriors, many significant samples
    imgs = torch.from_numpy(sim.images)
    B = imgs.shape[0]
    origins = torch.tensor(np.random.default_rng(0).uniform(-1, 1, (B, 2)), dtype=torch.float32)
    Rf = src.final_psi().numel()

    def run(idx):
        b = prepare_batch(imgs[idx], full, P, sigma2, torch.zeros(len(idx), dtype=torch.long), ctf=ctf[idx],
                          origins=origins[idx], n_classes=K, prior_centre=-origins[idx][:, None, :].expand(-1, K, 2),
                          mask=None)
        st.sigma2_offset = 4.0
        r = expectation(b, src, tg, st)
        S = torch.zeros(K * Rf, P, dtype=torch.complex64).index_add_(
            0, r.sample_class * Rf + r.sample_coarse * src.n_children + r.sample_child, r.S)
        W = torch.zeros(K * Rf, P).index_add_(0, r.sample_class * Rf + r.sample_coarse * src.n_children
                                              + r.sample_child, r.W)
        return r, S, W

    whole, S, W = run(torch.arange(B))
    a, Sa, Wa = run(torch.arange(0, 7))
    b, Sb, Wb = run(torch.arange(7, B))
    assert float(whole.n_significant.float().mean()) > 3  # the test exercises real mixtures
    assert torch.allclose(Sa + Sb, S, rtol=1e-4, atol=1e-4 * float(S.abs().max()))
    assert torch.allclose(Wa + Wb, W, rtol=1e-4, atol=1e-4 * float(W.abs().max()))
    for name in ("wsum_class", "wsum_sigma2_noise", "sumw_group", "wsum_orient"):
        assert torch.allclose(getattr(a, name) + getattr(b, name), getattr(whole, name), rtol=1e-4), name
    assert torch.allclose(a.wsum_sigma2_offset + b.wsum_sigma2_offset, whole.wsum_sigma2_offset, rtol=1e-4)
    assert torch.allclose(torch.cat([a.loglik, b.loglik]), whole.loglik, rtol=1e-5)
    assert torch.allclose(torch.cat([a.norm_residual, b.norm_residual]), whole.norm_residual, rtol=1e-4)


def test_noise_sums_per_group_equal_per_image_path(relion_dir):
    """The noise spectrum sums from the sample sums (per optics group, no per-image GEMM) equal the per-image
    expected residuals summed per group, with two optics groups of different σ²."""
    samp, sim = _setup(relion_dir, N=12, seed=11, snr=1.0)
    cs = coefficient_set(sim.n, 10)
    full, P, src, tg, st, ctf, sigma2, K = _estep_inputs(samp, sim, cs)
    sigma2 = torch.cat([sigma2 * 3000, sigma2 * 6000])
    og = torch.tensor([0, 1] * 6)
    b = prepare_batch(torch.from_numpy(sim.images), full, P, sigma2, og, ctf=ctf, n_classes=K)
    st.n_optics_groups = 2
    st.compute_corrections = True
    a = expectation(b, src, tg, st)
    st.compute_corrections = False
    g = expectation(b, src, tg, st)
    assert torch.allclose(a.S, g.S) and torch.allclose(a.wsum_class, g.wsum_class)
    assert torch.allclose(a.wsum_sigma2_noise, g.wsum_sigma2_noise, rtol=2e-4)
    assert g.sumw_group.tolist() == [6.0, 6.0]
    assert not torch.allclose(g.wsum_sigma2_noise[0], g.wsum_sigma2_noise[1], rtol=1e-3)  # groups kept apart
    # per-image residuals: the norm correction sum equals Σ_p E|X_t − C·R|² + power beyond the set
    assert torch.allclose(a.norm_residual.sum(), a.wsum_sigma2_noise.sum(), rtol=1e-5)


def test_back_rotation_recovers_class_image(relion_dir):
    """Sums of a class seen at every ψ with unit weights, rotated back, give the class image (interpolation +
    gridding correction)."""
    sim = simulate(relion_dir, N=1, n=32, snr=None, ctf=False)
    n = 32
    cs = coefficient_set(n, n // 2 - 1)
    psi = torch.arange(0, 360, 5.625)
    src = ClassReferences2D(sim.views[:1], cs, cs.size, psi, None)
    S = src.coarse()  # [1, R, P]: the class at every angle
    W = torch.ones(S.shape)
    data, weight = back_rotate_sums(S, W, psi, cs)
    img = coefficients_to_images(data / weight, cs) / gridding_correction_2d(n, 2 * n)
    truth = coefficients_to_images(images_to_coefficients(sim.views[:1], cs), cs)
    cc = torch.corrcoef(torch.stack([img.reshape(-1), truth.reshape(-1)]))[0, 1]
    assert float(cc) > 0.995
    scale = float((img * truth).sum() / truth.square().sum())
    assert scale == pytest.approx(1.0, abs=0.03)


def test_fine_pass_sub_batches_give_the_same_statistics(relion_dir):
    """A small ``fine_budget`` splits the fine pass into image sub-batches: same weights, sums and poses."""
    samp, sim = _setup(relion_dir, N=16, seed=4, snr=1.0)
    cs = coefficient_set(sim.n, 10)
    full, P, src, tg, st, ctf, sigma2, K = _estep_inputs(samp, sim, cs)
    sigma2 = sigma2 * 5000  # broad posteriors
    imgs = torch.from_numpy(sim.images)
    B = imgs.shape[0]
    b = prepare_batch(imgs, full, P, sigma2, torch.zeros(B, dtype=torch.long), ctf=ctf, n_classes=K)
    Rf = src.final_psi().numel()
    out = []
    for budget in (1 << 30, 1):
        st.fine_budget = budget
        r = expectation(b, src, tg, st)
        rows = r.sample_class * Rf + r.sample_coarse * src.n_children + r.sample_child
        S = torch.zeros(K * Rf, P, dtype=torch.complex64).index_add_(0, rows, r.S)
        W = torch.zeros(K * Rf, P).index_add_(0, rows, r.W)
        out.append((r, S, W))
    (r1, S1, W1), (r2, S2, W2) = out
    assert r2.extra.get("sub_batches") == B  # budget 1: one image per sub-batch
    assert float(r1.n_significant.float().mean()) > 3
    assert torch.allclose(S1, S2, rtol=1e-4, atol=1e-4 * float(S1.abs().max()))
    assert torch.allclose(W1, W2, rtol=1e-4, atol=1e-4 * float(W1.abs().max()))
    for name in ("wsum_class", "wsum_sigma2_noise", "wsum_orient", "loglik", "pmax"):
        assert torch.allclose(getattr(r1, name), getattr(r2, name), rtol=1e-4), name
    assert torch.equal(r1.best_class, r2.best_class) and torch.equal(r1.best_coarse, r2.best_coarse)


@pytest.mark.parametrize("noise", [1.0, 5000.0])
def test_sparse_and_dense_paths_agree(relion_dir, monkeypatch, noise):
    """The fine pass and the M-step sums take a dense GEMM over the batch's union when many cells are in play and
    a gather over the significant cells otherwise (estep.DENSE_FRACTION): both give the same weights, poses and
    sums, for sharp (σ² × 1) and broad (σ² × 5000) posteriors."""
    import cryopipe.engine.estep as es

    samp, sim = _setup(relion_dir, N=16, seed=4, snr=1.0)
    cs = coefficient_set(sim.n, 10)
    full, P, src, tg, st, ctf, sigma2, K = _estep_inputs(samp, sim, cs)
    imgs = torch.from_numpy(sim.images)
    B = imgs.shape[0]
    b = prepare_batch(imgs, full, P, sigma2 * noise, torch.zeros(B, dtype=torch.long), ctf=ctf, n_classes=K)
    st.compute_corrections = True
    out = []
    for frac in (0.0, 2.0):  # 0: always dense; 2: never
        monkeypatch.setattr(es, "DENSE_FRACTION", frac)
        out.append(expectation(b, src, tg, st))
    d, s = out
    assert torch.allclose(d.S, s.S, rtol=1e-4, atol=1e-5 * float(d.S.abs().max()))
    assert torch.allclose(d.W, s.W, rtol=1e-5)
    for name in ("pmax", "loglik", "wsum_class", "wsum_sigma2_noise", "norm_residual", "scale_xa",
                 "wsum_offset_rel"):
        assert torch.allclose(getattr(d, name), getattr(s, name), rtol=1e-4, atol=1e-6), name
    assert torch.equal(d.best_class, s.best_class) and torch.equal(d.best_coarse, s.best_coarse)
    assert torch.equal(d.n_significant, s.n_significant)
