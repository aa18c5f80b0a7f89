"""3D plug-ins of the likelihood engine: HEALPix orientation sets and local-search windows, projections of class
volumes as E-step predictions (global and local), the M-step back-projection of the engine's orientation sums,
RELION's SSNR / half-set FSC / gold-standard tau2, and one full EM iteration on noisy simulated particles.

Ground truth: projections of fixtures/relion/ref_map.mrc (RELION-written, Fourier-cropped to 24/32 px)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryopipe.core.backprojector import BackProjector
from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import fourier_rescale, irfft2_centered, irfft3_centered, lowpass, rfft2_centered, \
    rfft3_centered
from cryopipe.core.fsc import fsc
from cryopipe.core.geometry import angular_distance, euler_to_matrix, matrix_to_euler
from cryopipe.core.healpix import angular_step
from cryopipe.core.projector import Projector
from cryopipe.engine.batch import prepare_batch
from cryopipe.engine.coefficients import coefficient_set
from cryopipe.engine.estep import EStepSettings, TranslationGrid, expectation
from cryopipe.engine.mstep import reference_tau2
from cryopipe.engine.orientations3d import (
    direction_distribution,
    healpix_orientations,
    local_batch_order,
    local_orientations,
    orientation_distances,
    proper_symmetry_operators,
)
from cryopipe.engine.reference3d import (
    ClassBackProjectors,
    ClassReferences3D,
    fsc_tau2,
    halfset_fsc,
    join_halves_at_low_resolution,
    ssnr_3d,
)
from cryopipe.engine.sampling import oversample_translations, translation_grid
from cryopipe.io.mrc import read_mrc


@functools.lru_cache(maxsize=4)
def _volume(path: str, n: int) -> tuple[torch.Tensor, float]:
    vol, apix = read_mrc(path)
    return fourier_rescale(torch.from_numpy(vol), n), float(apix) * vol.shape[-1] / n


def volume(relion_dir, n: int) -> tuple[torch.Tensor, float]:
    v, apix = _volume(str(relion_dir / "ref_map.mrc"), n)
    return v.clone(), apix


def random_rotations(N: int, seed: int) -> torch.Tensor:
    """``[N, 3, 3]`` uniformly random RELION matrices (float64)."""
    return torch.tensor(Rotation.random(N, random_state=seed).as_matrix().transpose(0, 2, 1))


def estep_setup(n: int, r: int, coarse_r: int | None, oversampling: int, offset_range: float = 1.5):
    """Coefficient sets, translation grid (step 1 px) and settings; ``coarse_r=None``: single pass."""
    full = coefficient_set(n, n // 2)
    cs = full.prefix(r)
    Pc = full.count_upto(coarse_r) if coarse_r is not None else cs.size
    tc = translation_grid(offset_range, 1.0)
    tg = TranslationGrid(tc, oversample_translations(tc, 1.0, oversampling))
    st = EStepSettings(n=n, k=cs.k, shell=cs.shell, coarse_size=Pc, n_shells=n // 2 + 1,
                       oversampling=oversampling > 0)
    return full, cs, Pc, tg, st


def ctfs(N: int, n: int, apix: float, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    du = torch.tensor(g.uniform(8000, 25000, N))
    return ctf_2d(n, apix, du, du + 300.0, torch.tensor(g.uniform(0, 180, N)))


# ------------------------------------------------------------------------------------------------------------
# orientation sets
# ------------------------------------------------------------------------------------------------------------

def test_healpix_orientations_children_and_perturbation(monkeypatch):
    monkeypatch.setenv("CRYOPIPE_DEVICE", "cpu")  # grid geometry only; CUDA paths are covered by the E-step tests
    g0 = healpix_orientations(1, oversampling=1)
    assert g0.n_coarse == 48 * 12 and g0.n_children == 8  # 12·4 directions × 30° psi; 4 × 2 children
    A = g0.coarse_matrices()
    # children are within half a coarse cell of their parent (HEALPix sub-pixels × ψ ± step/4)
    ch = g0.children
    Ac = euler_to_matrix(ch[..., 0], ch[..., 1], ch[..., 2])
    d = angular_distance(Ac, A[:, None])
    assert float(d.max()) < angular_step(1) and float(d.min()) > 1.0
    # no two coarse samples coincide; every fine sample is distinct
    fine = Ac.reshape(-1, 3, 3)
    dd = orientation_distances(fine[:500], fine)
    dd[torch.arange(500), torch.arange(500)] = 99.0
    assert float(dd.min()) > 1.0
    # RELION's perturbation rotates every sample by the same Euler(p, p, p) on the right
    g1 = healpix_orientations(1, oversampling=1, perturb=0.4)
    p = 0.4 * angular_step(1)
    P = euler_to_matrix(torch.tensor(p, dtype=torch.float64), torch.tensor(p, dtype=torch.float64),
                        torch.tensor(p, dtype=torch.float64))
    assert torch.allclose(g1.coarse_matrices().cpu(), A.cpu() @ P, atol=1e-9)
    Ac1 = euler_to_matrix(g1.children[..., 0], g1.children[..., 1], g1.children[..., 2])
    assert torch.allclose(Ac1, Ac @ P, atol=1e-9)
    # symmetry: the asymmetric unit of C4 keeps about a quarter of the directions
    g4 = healpix_orientations(2, sym="C4", oversampling=0)
    assert g4.n_children == 1 and abs(g4.n_coarse / healpix_orientations(2, oversampling=0).n_coarse - 0.25) < 0.05


def test_local_orientations_window_prior_and_symmetry(monkeypatch):
    monkeypatch.setenv("CRYOPIPE_DEVICE", "cpu")  # window geometry only; CUDA paths are covered by the E-step tests
    grid = healpix_orientations(2, oversampling=1, perturb=0.3)
    prior = matrix_to_euler(random_rotations(6, 11))
    sigma = 6.0
    sub, lp = local_orientations(grid, prior, sigma)
    Ap = euler_to_matrix(prior[:, 0], prior[:, 1], prior[:, 2])
    # brute force over the whole grid: the window is exactly the samples within 3σ, prior −Δ²/(2σ²), normalised
    d_all = angular_distance(grid.coarse_matrices()[None], Ap[:, None])  # [B, R]
    within = d_all <= 3 * sigma
    rows = sub.grid_index
    rows = rows.to(within.device)
    assert torch.equal(torch.nonzero(within.any(dim=0)).reshape(-1), rows)
    assert torch.equal(torch.isfinite(lp), within[:, rows])
    assert torch.allclose(torch.logsumexp(lp.double(), dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    # within a particle's window, log prior + Δ²/(2σ²) is one constant (the normalisation)
    c = lp.double() + d_all[:, rows].square() / (2 * sigma ** 2)
    fin = torch.isfinite(lp)
    spread = torch.where(fin, c, -math.inf).amax(dim=1) - torch.where(fin, c, math.inf).amin(dim=1)
    assert float(spread.max()) < 1e-3
    assert sub.n_coarse < 0.2 * grid.n_coarse  # a local search: a small part of the grid
    # symmetry C2 (2-fold about z): the prior A·R_z(180°) is the same view, so the window is the same
    Rz = torch.tensor([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    prior2 = matrix_to_euler(Ap @ Rz)
    s_a, l_a = local_orientations(grid, prior, sigma, sym="C2")
    s_b, l_b = local_orientations(grid, prior2, sigma, sym="C2")
    assert torch.equal(s_a.grid_index, s_b.grid_index) and torch.allclose(l_a, l_b, atol=1e-4)
    s_c, _ = local_orientations(grid, prior2, sigma)  # without symmetry it is another window
    assert not torch.equal(s_a.grid_index, s_c.grid_index)
    # a window smaller than the grid spacing keeps the nearest sample
    s_t, l_t = local_orientations(grid, prior, 0.01)
    assert torch.equal(torch.isfinite(l_t).sum(dim=1), torch.ones(6, dtype=torch.long))
    nearest = d_all.argmin(dim=1)
    assert torch.equal(s_t.grid_index[torch.isfinite(l_t).double().argmax(dim=1)], nearest)
    # batch ordering groups similar views: consecutive particles are closer than in random order
    many = matrix_to_euler(random_rotations(400, 3))
    perm = local_batch_order(many)
    Am = euler_to_matrix(many[:, 0], many[:, 1], many[:, 2])
    step_sorted = angular_distance(Am[perm[1:]], Am[perm[:-1]]).median()
    step_random = angular_distance(Am[1:], Am[:-1]).median()
    assert float(step_sorted) < 0.5 * float(step_random)
    # ... and the unions of local windows of sorted batches are much smaller (dense data: 3000 particles)
    many = matrix_to_euler(random_rotations(3000, 4))
    perm = local_batch_order(many)
    union = [[local_orientations(grid, many[p[i:i + 50]], 5.0)[0].n_coarse for i in range(0, 3000, 600)]
             for p in (perm, torch.arange(3000))]
    assert sum(union[0]) < 0.6 * sum(union[1])


# ------------------------------------------------------------------------------------------------------------
# predictions
# ------------------------------------------------------------------------------------------------------------

def test_predictions_match_projector_and_spectrum(relion_dir):
    v, _ = volume(relion_dir, 24)
    n = 24
    pr = Projector(v)
    grid = healpix_orientations(1, oversampling=1, perturb=0.2)
    full = coefficient_set(n, n // 2)
    src = ClassReferences3D([pr, Projector(2.0 * v)], full, full.count_upto(6), grid, chunk_bytes=1 << 20)
    c = src.coarse()
    assert c.shape == (2, grid.n_coarse, full.count_upto(6))
    # predictions are the projector's slices (FT / n²) at the coefficient set, for coarse and fine samples
    A = grid.coarse_matrices()[::37]
    ref = full.gather(pr.project(A)) / n ** 2
    inside = full.radius <= n // 2
    assert torch.allclose(c[0, ::37], ref[:, :c.shape[2]], atol=1e-7 * float(ref.abs().max()))
    f = src.fine(torch.tensor([1, 0]), torch.tensor([5, 300]))
    Af = grid.sample_matrices(torch.tensor([300]).repeat(8), torch.arange(8))
    assert torch.allclose(f[1], (full.gather(pr.project(Af)) / n ** 2) * inside, atol=1e-6 * float(ref.abs().max()))
    assert torch.allclose(f[0], 2 * src.fine(torch.tensor([0]), torch.tensor([5]))[0], rtol=1e-5, atol=1e-9)
    # τ² (RELION units of the coefficients) = the mean power of the predictions per shell, and the unpadded map's
    tau2 = src.tau2()[0]
    some = torch.arange(0, grid.n_coarse, 6)
    pw = full.shell_sum((src.fine(torch.zeros(some.numel(), dtype=torch.long), some)
                         .abs().square() / 2).mean(dim=(0, 1)).double()) / full.shell_counts()
    direct = reference_tau2((rfft3_centered(v.double()) / n ** 2)[None], torch.round(torch.sqrt(
        sum(t ** 2 for t in torch.meshgrid(torch.fft.fftfreq(n, 1 / n), torch.fft.fftfreq(n, 1 / n),
                                           torch.fft.rfftfreq(n, 1 / n), indexing="ij")))).long(), n // 2 + 1)[0]
    # same units and spectrum (a wrong n²/pad³ factor would be off by >= 8x); the three binnings differ at low
    # shells where the spectrum is steep (RELION's τ² bins padded voxels of the gridding-corrected map)
    s = slice(1, n // 2 - 1)
    assert torch.allclose(pw[s], direct[s], rtol=0.25)
    assert torch.allclose(direct[4:n // 2 - 1], tau2[4:n // 2 - 1], rtol=0.25)
    assert torch.allclose(direct[s], tau2[s], rtol=0.5)


# ------------------------------------------------------------------------------------------------------------
# (a) global search, noise-free on-grid particles
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("oversampling", [0, 1])
def test_global_search_finds_true_orientation_and_offset(relion_dir, oversampling):
    v, apix = volume(relion_dir, 24)
    n, N = 24, 60
    pr = Projector(v)
    grid = healpix_orientations(1, oversampling=oversampling, perturb=0.3)
    full, cs, Pc, tg, st = estep_setup(n, n // 2 - 1, 6 if oversampling else None, oversampling, 2.0)
    g = np.random.default_rng(4 + oversampling)
    rc = torch.as_tensor(g.integers(0, grid.n_coarse, N))
    ch = torch.as_tensor(g.integers(0, grid.n_children, N))
    A = grid.sample_matrices(rc, ch)
    tf = tg.children.reshape(-1, 2)
    origin = tf[torch.as_tensor(g.integers(0, tf.shape[0], N))]
    ctf = ctfs(N, n, apix, 1)
    imgs = irfft2_centered(rfft2_centered(pr.project_images(A, shifts_px=-origin)) * ctf, n)
    src = ClassReferences3D([pr], cs, Pc, grid)
    # σ² ~ 1/3 of the mean signal power per coefficient (sharp but not degenerate posteriors)
    sigma2 = torch.full((1, n // 2 + 1), 1e-4 if oversampling else 1e-6, dtype=torch.float64)
    batch = prepare_batch(imgs, full, cs.size, sigma2, torch.zeros(N, dtype=torch.long), ctf=ctf, n_classes=1,
                          log_prior_orient=torch.zeros(1, 1, grid.n_coarse))
    res = expectation(batch, src, tg, st)
    best = src.best_angles(res)
    err = angular_distance(euler_to_matrix(best[:, 0], best[:, 1], best[:, 2]), A)
    assert float(err.max()) < 1e-4  # the true sample for every particle
    assert torch.equal(res.best_offset, origin)
    if not oversampling:
        assert float(res.pmax.min()) > 0.5


# ------------------------------------------------------------------------------------------------------------
# (b) local refinement of off-grid orientations around a coarse guess
# ------------------------------------------------------------------------------------------------------------

def test_local_search_refines_off_grid_orientations(relion_dir):
    v, _ = volume(relion_dir, 24)
    n, N = 24, 40
    pr = Projector(v)
    A = random_rotations(N, 5)
    g = np.random.default_rng(1)
    origin = torch.tensor(g.uniform(-1, 1, (N, 2)), dtype=torch.float32)
    imgs = pr.project_images(A, shifts_px=-origin)
    # guesses 9° away from the truth about random axes
    axis = torch.tensor(Rotation.random(N, random_state=7).as_rotvec())
    axis = axis / axis.norm(dim=1, keepdim=True)
    guess_A = torch.tensor(Rotation.from_rotvec((axis * math.radians(9.0)).numpy()).as_matrix()) @ A
    guess = matrix_to_euler(guess_A)
    grid = healpix_orientations(3, oversampling=1, perturb=0.4)  # 7.5° coarse, 3.75° fine
    full, cs, Pc, tg, st = estep_setup(n, n // 2 - 1, 8, 1)
    base = ClassReferences3D([pr], cs, Pc, grid)
    sigma2 = torch.full((1, n // 2 + 1), 1e-5, dtype=torch.float64)
    perm = local_batch_order(guess)
    err = torch.zeros(N, dtype=torch.float64)
    for b0 in range(0, N, 20):
        idx = perm[b0:b0 + 20]
        sub, lp = local_orientations(grid, guess[idx], 5.0)
        assert sub.n_coarse < 0.05 * grid.n_coarse
        src = base.with_orientations(sub)
        batch = prepare_batch(imgs[idx], full, cs.size, sigma2, torch.zeros(idx.numel(), dtype=torch.long),
                              n_classes=1, log_prior_orient=lp[:, None, :])
        res = expectation(batch, src, tg, st)
        best = src.best_angles(res)
        Ab = euler_to_matrix(best[:, 0], best[:, 1], best[:, 2])
        err[idx] = angular_distance(Ab, A[idx].to(Ab.device)).to(err.device)
        # every answer lies inside the particle's own window around its guess
        assert float(angular_distance(Ab, guess_A[idx]).max()) <= 15.0 + 1e-6
        assert float((res.best_offset - origin[idx]).norm(dim=1).max()) < 0.75
    assert float(err.max()) < grid.angular_step  # below the local (coarse) step, from a 9° guess
    assert float(err.median()) < grid.fine_angular_step


# ------------------------------------------------------------------------------------------------------------
# (c) M-step: insertion of the sums equals the back-projector's; weights at the truth reproduce the volume
# ------------------------------------------------------------------------------------------------------------

def test_insert_sums_equal_backprojector_insert(relion_dir):
    v, apix = volume(relion_dir, 24)
    n, N = 24, 40
    A = random_rotations(N, 2)
    ft = rfft2_centered(Projector(v).project_images(A) + 0.01 * torch.randn(N, n, n,
                                                                        generator=torch.Generator().manual_seed(0)))
    ctf = ctfs(N, n, apix, 2)
    cs = coefficient_set(n, 10)
    inv_s2 = 1.0 / (1e-4 * (1 + cs.shell.float()))  # a shell-dependent 1/σ²
    X = cs.gather(ft) / n ** 2
    C = cs.gather(ctf)
    bps = ClassBackProjectors(2, n, r_max=10, chunk_elems=5000)
    cls = torch.arange(N) % 2
    bps.insert_sums(X * C * inv_s2, C.square() * inv_s2, cls, A, cs)
    for k in range(2):
        ref = BackProjector(n, r_max=10)
        sel = cls == k
        ref.insert(ft[sel] / n ** 2, A[sel], ctf=ctf[sel], weights=cs.scatter(inv_s2.expand(int(sel.sum()), -1),
                                                                              hermitian=False))
        scale = float(ref.weight.abs().max())
        assert torch.allclose(bps.bps[k].weight, ref.weight, atol=1e-5 * scale)
        assert torch.allclose(bps.bps[k].data, ref.data, atol=1e-5 * float(ref.data.abs().max()))


def test_mstep_with_true_orientations_reproduces_the_volume(relion_dir):
    v, apix = volume(relion_dir, 24)
    n, N = 24, 300
    pr = Projector(v)
    grid = healpix_orientations(1, oversampling=0, perturb=0.1)
    full, cs, Pc, tg, st = estep_setup(n, n // 2, None, 0, 1.0)
    g = np.random.default_rng(8)
    rc = torch.as_tensor(g.integers(0, grid.n_coarse, N))
    A = grid.sample_matrices(rc)
    origin = tg.coarse[torch.as_tensor(g.integers(0, tg.coarse.shape[0], N))]
    ctf = ctfs(N, n, apix, 3)
    ft = rfft2_centered(pr.project_images(A, shifts_px=-origin)) * ctf
    imgs = irfft2_centered(ft, n)
    src = ClassReferences3D([pr], cs, cs.size, grid)
    sigma2 = torch.full((1, n // 2 + 1), 1e-6, dtype=torch.float64)
    bps = ClassBackProjectors(1, n)
    for b0 in range(0, N, 100):
        idx = torch.arange(b0, b0 + 100)
        batch = prepare_batch(imgs[idx], full, cs.size, sigma2, torch.zeros(100, dtype=torch.long), ctf=ctf[idx],
                              n_classes=1, log_prior_orient=torch.zeros(1, 1, grid.n_coarse))
        res = expectation(batch, src, tg, st)
        assert float(res.pmax.min()) > 0.99  # weights at the truth
        bps.add(res, src)
    got = bps.reconstruct()[0]
    # the same images back-projected at their true orientations and offsets by core.backprojector
    ref_bp = BackProjector(n)
    from cryopipe.core.fourier import phase_shift_2d

    ref_bp.insert(phase_shift_2d(rfft2_centered(imgs), origin, n), A, ctf=ctf)
    want = ref_bp.reconstruct()
    got, want = got.cpu(), want.cpu()
    corr = float(torch.corrcoef(torch.stack([got.reshape(-1), want.reshape(-1)]))[0, 1])
    assert corr > 0.99
    assert float((got * want).sum() / (want * want).sum()) == pytest.approx(1.0, abs=0.02)
    assert float(torch.corrcoef(torch.stack([got.reshape(-1), v.cpu().reshape(-1)]))[0, 1]) > 0.9


# ------------------------------------------------------------------------------------------------------------
# (d) additivity over batches
# ------------------------------------------------------------------------------------------------------------

def test_backprojected_sums_add_over_batches(relion_dir):
    v, apix = volume(relion_dir, 24)
    n, N = 24, 20
    vols = torch.stack([v, irfft3_centered(lowpass(rfft3_centered(v), 25.0, apix), n).roll(1, dims=2)])
    A = random_rotations(N, 9)
    ctf = ctfs(N, n, apix, 4)
    clean = irfft2_centered(rfft2_centered(Projector(v).project_images(A)) * ctf, n)
    imgs = clean + clean.std() * torch.randn(N, n, n, generator=torch.Generator().manual_seed(2))
    grid = healpix_orientations(1, oversampling=1, perturb=0.2)
    full, cs, Pc, tg, st = estep_setup(n, 8, 5, 1)
    src = ClassReferences3D.from_volumes(vols, cs, Pc, grid)
    # tempered (2x the noise variance): broad posteriors, many significant samples per particle
    sigma2 = torch.full((1, n // 2 + 1), 2 * float(clean.std()) ** 2 / (2 * n * n), dtype=torch.float64)
    origins = torch.tensor(np.random.default_rng(0).uniform(-1, 1, (N, 2)), dtype=torch.float32)

    def run(idx):
        b = prepare_batch(imgs[idx], full, cs.size, sigma2, torch.zeros(idx.numel(), dtype=torch.long),
                          ctf=ctf[idx], origins=origins[idx], n_classes=2,
                          log_prior_orient=torch.zeros(1, 2, grid.n_coarse))
        r = expectation(b, src, tg, st)
        bp = ClassBackProjectors(2, n, r_max=8)
        bp.add(r, src)
        return r, bp

    whole, bw = run(torch.arange(N))
    assert float(whole.n_significant.float().mean()) > 3 and set(whole.sample_class.tolist()) == {0, 1}
    _, ba = run(torch.arange(0, 9))
    _, bb = run(torch.arange(9, N))
    ba.merge(bb)
    for k in range(2):
        w = bw.bps[k]
        assert torch.allclose(ba.bps[k].weight, w.weight, rtol=1e-4, atol=1e-4 * float(w.weight.max()))
        assert torch.allclose(ba.bps[k].data, w.data, rtol=1e-4, atol=1e-4 * float(w.data.abs().max()))


# ------------------------------------------------------------------------------------------------------------
# (e) one EM iteration, gold standard
# ------------------------------------------------------------------------------------------------------------

def test_one_em_iteration_improves_fsc_to_truth(relion_dir):
    n, N = 32, 200
    truth, apix = volume(relion_dir, n)
    A = random_rotations(N, 2)
    g = np.random.default_rng(1)
    origin = torch.tensor(g.uniform(-1.0, 1.0, (N, 2)), dtype=torch.float32)
    ctf = ctfs(N, n, apix, 5)
    clean = irfft2_centered(rfft2_centered(Projector(truth).project_images(A, shifts_px=-origin)) * ctf, n)
    noise_sd = float(clean.std()) / math.sqrt(0.1)  # SNR 0.1
    imgs = clean + noise_sd * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    ref = irfft3_centered(lowpass(rfft3_centered(truth), 20.0, apix), n)  # 20 Å low-passed truth
    full, cs, Pc, tg, st = estep_setup(n, n // 2, 8, 1, 1.5)
    st.max_significant = 8
    grid = healpix_orientations(2, oversampling=1, perturb=0.2)
    src = ClassReferences3D.from_volumes(ref[None], cs, Pc, grid)
    sigma2 = torch.full((1, n // 2 + 1), noise_sd ** 2 / (2 * n * n), dtype=torch.float64)  # white noise, FT/n²
    halves = [ClassBackProjectors(1, n), ClassBackProjectors(1, n)]
    for b0 in range(0, N, 50):  # particles 0..99: half 1, 100..199: half 2
        idx = torch.arange(b0, b0 + 50)
        batch = prepare_batch(imgs[idx], full, cs.size, sigma2, torch.zeros(50, dtype=torch.long), ctf=ctf[idx],
                              n_classes=1, log_prior_orient=torch.zeros(1, 1, grid.n_coarse))
        halves[b0 // (N // 2)].add(expectation(batch, src, tg, st), src)
    f_half = halfset_fsc(*halves)[0]
    u1, u2 = halves[0].reconstruct()[0], halves[1].reconstruct()[0]
    f_maps = fsc(u1, u2)
    assert f_half[0] == 1.0 and float(f_half[1:6].min()) > 0.8
    # RELION's estimator (downsampled Σdata/Σweight) of the same quantity as the FSC of the half maps
    assert torch.allclose(f_half[1:11], f_maps[1:11].double(), atol=0.2)
    maps = []
    for h in halves:
        sigma2_ref, _, _ = ssnr_3d(h, torch.zeros(1, n // 2 + 1))
        tau2, dvp = fsc_tau2(f_half[None], sigma2_ref)
        maps.append(h.reconstruct(tau2, 1.0, minres_map=5)[0])
    new = 0.5 * (maps[0] + maps[1])
    before, after = fsc(ref, truth), fsc(new, truth)
    hi = slice(8, 14)  # beyond 20 Å (shell 7.2)
    assert float(before[hi].mean()) < 0.15
    assert float(after[hi].mean()) > float(before[hi].mean()) + 0.25
    assert float(after[1:7].min()) > 0.9


def test_gold_standard_helpers():
    f = torch.tensor([[1.0, 0.9, 0.5, 0.0, -0.2]])
    s2 = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    tau2, dvp = fsc_tau2(f, s2, tau2_fudge=2.0)
    ff = torch.tensor([0.999, 0.9, 0.5, 0.001, 0.001], dtype=torch.float64)
    assert torch.allclose(dvp[0], 2.0 * ff / (1 - ff))
    assert torch.allclose(tau2[0], dvp[0] * s2[0].double())
    _, dvp_w = fsc_tau2(f, s2, whole=True)
    fw = torch.sqrt(2 * ff.clamp_max(0.999) / (ff + 1)).clamp_max(0.999)
    assert torch.allclose(dvp_w[0], fw / (1 - fw))
    # joining halves at low resolution: both get the sum below the radius, nothing changes above it
    n = 16
    h1, h2 = ClassBackProjectors(1, n), ClassBackProjectors(1, n)
    gen = torch.Generator().manual_seed(0)
    for h in (h1, h2):
        h.bps[0].weight.copy_(torch.rand(h.bps[0].weight.shape, generator=gen))
        h.bps[0].data.copy_(torch.randn(h.bps[0].data.shape, dtype=torch.complex64, generator=gen))
    w1, w2 = h1.bps[0].weight.clone(), h2.bps[0].weight.clone()
    join_halves_at_low_resolution(h1, h2, 3)
    R = h1.bps[0].R
    c = torch.arange(-R - 1, R + 2.0)
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + torch.arange(R + 2.0)[None, None, :] ** 2
    low = r2 <= 36
    assert torch.equal(h1.bps[0].weight[low], (w1 + w2)[low]) and torch.equal(h1.bps[0].weight[~low], w1[~low])
    assert torch.equal(h2.bps[0].weight[low], (w1 + w2)[low]) and torch.equal(h2.bps[0].weight[~low], w2[~low])
    # half-set FSC (RELION's downsampled averages): data = G(round(p/pad))·w with a real radial G gives each half's
    # average = G whatever the weights (FSC = 1); negating half 2 on odd shells gives FSC = −1 there
    b = h1.bps[0]
    cz = torch.arange(-R - 1, R + 2.0)
    cell = lambda t: torch.sign(t) * torch.floor(t.abs() / b.pad + 0.5)  # noqa: E731
    rc = torch.sqrt(cell(cz)[:, None, None] ** 2 + cell(cz)[None, :, None] ** 2
                    + cell(torch.arange(R + 2.0))[None, None, :] ** 2)
    G = torch.exp(-rc / 3.0) + 0.1
    sh = torch.floor(rc + 0.5)
    for h, sign in ((h1, torch.ones_like(G)), (h2, torch.where(sh % 2 == 1, -1.0, 1.0))):
        w = torch.rand(G.shape, generator=gen) + 0.5
        h.bps[0].weight.copy_(w)
        h.bps[0].data.copy_((G * sign * w).to(torch.complex64))
    f = halfset_fsc(h1, h2)[0]
    expect = torch.where(torch.arange(n // 2 + 1) % 2 == 1, -1.0, 1.0).double()
    assert torch.allclose(f.cpu(), expect, atol=1e-5)
    # point-group symmetry doubles the weights seen by the SSNR arrays for C2 (σ²_ref halves)
    s_c1 = ssnr_3d(h1, torch.zeros(1, n // 2 + 1))[0]
    s_c2 = ssnr_3d(h1, torch.zeros(1, n // 2 + 1), symmetry="C2")[0]
    assert torch.allclose(s_c1[0, 1:], 2 * s_c2[0, 1:], rtol=0.02)


def test_direction_distribution_counts_views_up_to_symmetry():
    """Particles at HEALPix directions land in their own direction's bin (psi irrelevant); with D2 the
    orientations A and A·G (same projection) land in the same bin; a class without particles is uniform."""
    from cryopipe.core.healpix import healpix_directions

    rot, tilt = healpix_directions(1)
    ang = torch.stack([rot[[3, 3, 17]], tilt[[3, 3, 17]], torch.tensor([0.0, 120.0, 45.0], dtype=torch.float64)], 1)
    r, t, pdf = direction_distribution(ang, torch.tensor([0, 0, 0]), 2, 1, "C1")
    assert r.numel() == 48 and torch.allclose(r, rot) and torch.allclose(t, tilt)
    assert float(pdf[0, 3]) == pytest.approx(2 / 3) and float(pdf[0, 17]) == pytest.approx(1 / 3)
    assert torch.allclose(pdf[1], torch.full((48,), 1 / 48, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    a = torch.rand(50, 3, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0], dtype=torch.float64)
    A = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
    ops = proper_symmetry_operators("D2")
    b = matrix_to_euler(A @ ops[2].to(A.dtype)).reshape(-1, 3)
    rd, _, pa = direction_distribution(a, torch.zeros(50, dtype=torch.long), 1, 2, "D2")
    _, _, pb = direction_distribution(b, torch.zeros(50, dtype=torch.long), 1, 2, "D2")
    assert rd.numel() < 192 and torch.allclose(pa, pb)
