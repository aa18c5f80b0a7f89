"""The single-particle E-step and M-step on 3D pseudo-subtomograms (:mod:`cryopipe.engine.subtomo_batch`): the
reference rotated in 3D, RELION's CTF² weights and multiplicity, 3D translations; on RELION's fixture particles
(RELION's own pseudo-subtomograms and ours, which equal them) at their known true poses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.core.fourier import fourier_rescale
from cryopipe.core.fsc import fsc
from cryopipe.core.geometry import axis_angle_matrix, matrix_to_euler
from cryopipe.core.masks import soft_spherical_mask
from cryopipe.engine.coefficients import volume_coefficient_set
from cryopipe.engine.estep import EStepSettings, TranslationGrid, expectation
from cryopipe.engine.orientations3d import OrientationSet3D
from cryopipe.engine.reference3d import ClassBackProjectors, ClassReferences3D
from cryopipe.engine.subtomo_batch import multiplicity_per_shell, prepare_subtomo_batch, split_subtomo_weights
from cryopipe.io.mrc import read_mrc
from cryopipe.io.tomo_particles import read_tomo_particles
from cryopipe.io.tomography import read_tomograms
from cryopipe.tomo.particle_sets import particles_per_tilt_series, tilt_series_geometry
from cryopipe.tomo.subtomograms import pseudo_subtomograms

CROP, BOX, BIN = 32, 64, 2.0  # RELION's Subtomo_bin2: 8 Å voxels, 256 Å box


@pytest.fixture(scope="module")
def fixture_subtomos(relion_tomo_dir):
    """Our pseudo-subtomograms of all 24 particles (equal to RELION's, tests/test_subtomo.py), their orientations
    in the subtomogram frame, the truth at 8 Å, and RELION's own volumes of the 4 particles it kept."""
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    particles = read_tomo_particles(relion_tomo_dir / "particles.star", tomograms)
    data, weights, orient, names = [], [], [], []
    for group in particles_per_tilt_series(particles, tomograms):
        geometry = tilt_series_geometry(group.tilt_series)
        images = torch.from_numpy(group.tilt_series.read_images())
        sub = group.subtomogram_matrices.double()
        batch = pseudo_subtomograms(images, geometry, group.positions_px, sub, BOX, CROP, BIN)
        data.append(batch.data)
        weights.append(batch.weights)
        orient.append(sub.transpose(1, 2) @ group.orientations.double())  # A_subᵀ·A: the rlnAngle* matrix
        names += [f"{group.tilt_series.name}/{i + 1}" for i in range(len(group.rows))]
    truth, _ = read_mrc(relion_tomo_dir / "truth" / "truth_map.mrc")  # 64³ at 4 Å
    reference = fourier_rescale(torch.from_numpy(truth).double(), CROP).float()  # 32³ at 8 Å
    relion = {}
    for ts, n in (("TS_01", 1), ("TS_01", 2), ("TS_02", 1), ("TS_02", 2)):
        d, _ = read_mrc(relion_tomo_dir / "Subtomo_bin2" / "Subtomograms" / ts / f"{n}_data.mrc")
        w, _ = read_mrc(relion_tomo_dir / "Subtomo_bin2" / "Subtomograms" / ts / f"{n}_weights.mrc")
        relion[names.index(f"{ts}/{n}")] = (torch.from_numpy(d.copy()), torch.from_numpy(w.copy()))
    return torch.cat(data), torch.cat(weights), torch.cat(orient), reference, relion


def _orientations(matrices: torch.Tensor) -> OrientationSet3D:
    """An explicit orientation set (no grid, no children) of RELION matrices ``[R, 3, 3]``."""
    angles = matrix_to_euler(matrices.double())
    R = angles.shape[0]
    zeros = torch.zeros(R, dtype=torch.long)
    return OrientationSet3D(angles, angles[:, None], 0, 360.0, 0, zeros, zeros, torch.arange(R))


def _candidates(truth: torch.Tensor) -> torch.Tensor:
    """Each particle's true orientation followed by three 10° rotations of it: ``[4·N, 3, 3]``."""
    out = []
    for A in truth:
        out.append(A)
        for axis in ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.3, 0.9, 0.3)):
            out.append(A @ axis_angle_matrix(torch.tensor(axis, dtype=torch.float64), 10.0))
    return torch.stack(out)


def _estep(volumes, weights, orient, reference):
    vset = volume_coefficient_set(CROP, CROP // 2 - 1)
    ctf2, multi = split_subtomo_weights(weights)
    # noise-free data: a flat σ² of the order of the data power gives a sharp, well-defined posterior (RELION's
    # units: the engine's 1e-5 for its FT/n² volume coefficients is 1e-5/n² for RELION's FT/n³)
    sigma2 = torch.full((CROP // 2 + 1,), 1e-5 / CROP ** 2, dtype=torch.float64)
    mask = soft_spherical_mask(CROP, 11.0, 3.0)  # ~180 Å: the particle, not its neighbours
    batch = prepare_subtomo_batch(volumes, ctf2, multi, vset, vset.size, sigma2, mask=mask)
    orientations = _orientations(_candidates(orient))
    refs = ClassReferences3D.from_volumes(reference[None], vset, vset.size, orientations)
    # the data's scale (RELION's subtomo units): least squares of X against C3·V̂(Aᵀk) at the true poses
    pred = refs.coarse()[0, ::4]
    cp = pred * batch.ctf
    scale = float((batch.X * cp.conj()).real.sum() / cp.abs().square().sum())
    refs = ClassReferences3D.from_volumes(reference[None] * scale, vset, vset.size, orientations)
    steps = torch.tensor([-1.0, 0.0, 1.0])
    grid = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), dim=-1).reshape(-1, 3)
    trans = TranslationGrid(grid, grid[:, None])
    settings = EStepSettings(n=CROP, k=vset.k, shell=vset.shell, coarse_size=vset.size, n_shells=CROP // 2 + 1,
                             oversampling=False)
    return expectation(batch, refs, trans, settings), refs, vset


def test_true_poses_win_on_our_subtomograms(fixture_subtomos):
    """Every particle's posterior peaks at its own true orientation (not 10° away, nor another particle's) and
    at zero 3D offset: the reference rotated in 3D against CTF²-weighted, multiplicity-normalised data."""
    data, weights, orient, reference, _ = fixture_subtomos
    result, _, _ = _estep(data, weights, orient, reference)
    n = data.shape[0]
    assert result.best_coarse.tolist() == [4 * b for b in range(n)]
    assert torch.all(result.best_offset.abs() < 1e-6), result.best_offset
    assert float(result.pmax.min()) > 0.9


def test_true_poses_win_on_relions_subtomograms(fixture_subtomos):
    """The same on RELION's own *_data.mrc / *_weights.mrc files of the 4 particles it kept."""
    _, _, orient, reference, relion = fixture_subtomos
    idx = sorted(relion)
    data = torch.stack([relion[i][0] for i in idx])
    weights = torch.stack([relion[i][1] for i in idx])
    result, _, _ = _estep(data, weights, orient[idx], reference)
    assert result.best_coarse.tolist() == [4 * b for b in range(len(idx))]
    assert torch.all(result.best_offset.abs() < 1e-6), result.best_offset


def test_m_step_sums_rebuild_the_particle(fixture_subtomos, relion_tomo_dir):
    """The E-step's sums, back-projected with the reference rotated in 3D, give the particle: FSC with the truth
    ≥ 0.9 to 17 Å from these 24 particles (0.94 measured; Nyquist 16 Å), and the map correlates with RELION's
    reconstruction at the same poses (0.988 measured)."""
    data, weights, orient, reference, _ = fixture_subtomos
    result, refs, vset = _estep(data, weights, orient, reference)
    bp = ClassBackProjectors(1, CROP)
    bp.add(result, refs)
    rec = bp.reconstruct()[0]
    curve = fsc(rec, reference)
    shell_17A = int(math.floor(CROP * 8.0 / 17.0))
    assert float(curve[1:shell_17A + 1].min()) > 0.9, np.round(curve.numpy(), 3)
    relion, _ = read_mrc(relion_tomo_dir / "ReconstructParticle_bin2" / "merged.mrc")  # 40³, 8 Å, tapered
    relion = torch.from_numpy(relion.copy())[4:36, 4:36, 4:36]
    mask = soft_spherical_mask(CROP, 11.0, 3.0)
    cc = np.corrcoef((rec * mask).numpy().ravel(), (relion * mask).numpy().ravel())[0, 1]
    assert cc > 0.97, cc
    # RELION's noise-spectrum denominator: Σ multiplicity per shell, positive where the set has coefficients
    counts = multiplicity_per_shell(split_subtomo_weights(weights)[1], vset, CROP // 2 + 1)
    assert counts.shape == (data.shape[0], CROP // 2 + 1) and bool((counts[:, 1:CROP // 2] > 0).all())


def test_m_step_sums_are_relions_back_projection(fixture_subtomos, relion_tomo_dir):
    """RELION's M-step for pseudo-subtomograms (``storeWeightedSums`` with premultiplied data): each particle adds
    its unmasked data ``X/σ²`` and the weight ``Σc²/σ²`` (no multiplicity, no further CTF factor) at ``Aᵀk``. At
    the true poses (one orientation per particle, no shifts: every weight is 1) the engine's sums equal that
    accumulation computed directly from the volumes (RELION's ``FT/n³`` and σ²; the engine's coefficients are
    ``FT/n²``, so ``S = data_R/n`` and ``W = weight_R/n²``), and the map correlates with RELION's
    relion_tomo_reconstruct_particle map at the same poses (>= 0.98; 0.99 measured)."""
    data, weights, orient, reference, _ = fixture_subtomos
    n = CROP
    vset = volume_coefficient_set(n, n // 2 - 1)
    ctf2, multi = split_subtomo_weights(weights)
    sigma2 = torch.full((n // 2 + 1,), 1e-5 / n ** 2, dtype=torch.float64)  # RELION's units
    mask = soft_spherical_mask(n, 11.0, 3.0)
    batch = prepare_subtomo_batch(data, ctf2, multi, vset, vset.size, sigma2, mask=mask)
    refs = ClassReferences3D.from_volumes(reference[None], vset, vset.size, _orientations(orient))
    zero = torch.zeros(1, 3)
    settings = EStepSettings(n=n, k=vset.k, shell=vset.shell, coarse_size=vset.size, n_shells=n // 2 + 1,
                             oversampling=False)
    result = expectation(batch, refs, TranslationGrid(zero, zero[:, None]), settings)
    N = data.shape[0]
    assert result.best_coarse.tolist() == list(range(N)) and float(result.pmax.min()) > 0.999
    # RELION's accumulation, from the files: X_R = FT(d)/n³ (unmasked), zero where M < 0.01
    X_R = vset.gather(torch.fft.rfftn(torch.fft.ifftshift(data.double(), dim=(-3, -2, -1)), dim=(-3, -2, -1)))
    X_R = X_R / float(n ** 3)
    C3 = vset.gather(ctf2.double()).abs()
    kept = vset.gather(multi.double()) >= 0.01
    data_R = torch.where(kept, X_R / 1e-5 * n ** 2, torch.zeros((), dtype=X_R.dtype))
    weight_R = torch.where(kept, C3 / 1e-5 * n ** 2, torch.zeros((), dtype=C3.dtype))
    order = torch.argsort(result.sample_coarse)  # sample of particle b
    S, W = result.S[order].to(torch.complex128), result.W[order].double()
    # (the DC term included: the engine's sums keep it for every kind of particle; RELION's weight there is 0)
    assert torch.allclose(S * n, data_R, rtol=1e-4, atol=1e-5 * float(data_R.abs().max()))
    assert torch.allclose(W * n ** 2, weight_R, rtol=1e-4, atol=1e-6 * float(weight_R.max()))
    # inserted at Aᵀk they are the back-projector's data and weight volumes, and the map is RELION's
    bp = ClassBackProjectors(1, n)
    bp.add(result, refs)
    from cryopipe.core.backprojector import BackProjector

    direct = BackProjector(n, pad=bp.pad, r_max=bp.r_max)
    direct.insert_points(data_R / n, weight_R / n ** 2, orient, vset.k)
    w_ours, w_direct = bp.bps[0].weight.double(), direct.weight.double()
    assert torch.allclose(w_ours, w_direct, rtol=1e-4, atol=1e-6 * float(w_direct.max()))
    d_ours, d_direct = bp.bps[0].data.to(torch.complex128), direct.data.to(torch.complex128)
    assert torch.allclose(d_ours, d_direct, rtol=1e-4, atol=1e-5 * float(d_direct.abs().max()))
    rec = bp.reconstruct()[0]
    relion, _ = read_mrc(relion_tomo_dir / "ReconstructParticle_bin2" / "merged.mrc")  # 40³, 8 Å, tapered
    relion = torch.from_numpy(relion.copy())[4:36, 4:36, 4:36]
    cc = np.corrcoef((rec * mask).numpy().ravel(), (relion * mask).numpy().ravel())[0, 1]
    assert cc >= 0.98, cc


def test_noise_spectrum_in_relions_units():
    """σ² of pseudo-subtomograms follows RELION's normalisation (3D transforms divided by ``n³``; per real /
    imaginary component; E-step variance ``σ²·M``): white-noise volumes of variance ``v`` per voxel with
    multiplicity ``M`` and ``Σc² = 1`` everywhere have ``σ² = v/(2·n³·M)`` in every shell, both in the initial
    estimate and after an iteration's noise update (a zero reference: the residuals are the data). The engine's
    own ``FT/n²`` coefficients would give ``n²`` times that."""
    from cryopipe.engine.optimiser3d import Refine3DSettings
    from cryopipe.engine.stream import ParticleSet
    from cryopipe.engine.tomo_optimiser import SubtomoOptimiser3D

    n, N, v, M = 16, 24, 4.0, 2.0
    gen = torch.Generator().manual_seed(5)
    vols = (torch.randn(N, n, n, n, generator=gen, dtype=torch.float64) * math.sqrt(v)).float().numpy()
    w = np.zeros((N, 2 * n, n, n // 2 + 1), np.float32)
    w[:, :n], w[:, n:] = 1.0, M
    ps = ParticleSet(n, 5.0, lambda idx: vols[idx], None, np.zeros(N, np.int64), np.zeros(N, np.int64))
    s = Refine3DSettings(particle_diameter=2 * n * 5.0, healpix_order=0, offset_range=0.0, oversampling=0,
                         batch_size=12, ini_high=-1.0, do_ctf=False, flatten_solvent=False, n_iter=1)
    opt = SubtomoOptimiser3D(ps, s, lambda idx: w[idx])  # particle sphere larger than the box: no masking
    opt.initialise(torch.zeros(n, n, n), absolute_greyscale=True)
    expected = v / (2.0 * n ** 3 * M)
    ratio = (opt.model.sigma2_noise[0] / expected)[1:].numpy()
    assert np.all(np.abs(ratio - 1.0) < 0.08), ratio.round(3)
    opt.model.sigma2_noise = opt.model.sigma2_noise * 10.0  # the update must bring it back
    opt.iterate()
    # the run log's peak memory per batch (issue 12): measured for both batches of 12
    assert opt.memory.batches == 2 and opt.memory.peak > 0 and "peak memory per batch" in opt.memory_line()
    ratio = (opt.model.sigma2_noise[0] / expected)[1:].numpy()
    assert np.all(np.abs(ratio - 1.0) < 0.08), ratio.round(3)


def test_tilt_prior_keeps_tilt_near_the_prior_on_noise():
    """RELION's --sigma_tilt (:mod:`cryopipe.engine.tomo_priors`): on pure-noise pseudo-subtomograms a global
    search puts the particles anywhere (tilts 20–148° measured), with a 5° prior centred on 90° every tilt stays
    within 3σ of it (the prior's cut-off)."""
    from cryopipe.engine.optimiser3d import Refine3DSettings, random_blob_volume
    from cryopipe.engine.stream import ParticleSet
    from cryopipe.engine.tomo_optimiser import SubtomoOptimiser3D
    from cryopipe.engine.tomo_priors import AnglePriors

    n, N = 16, 24
    vols = torch.randn(N, n, n, n, generator=torch.Generator().manual_seed(7)).numpy()
    w = np.ones((N, 2 * n, n, n // 2 + 1), np.float32)
    ps = ParticleSet(n, 5.0, lambda idx: vols[idx], None, np.zeros(N, np.int64), np.zeros(N, np.int64))
    ref = random_blob_volume(n, 5.0, torch.Generator().manual_seed(3))
    spread = {}
    for sigma in (0.0, 5.0):
        s = Refine3DSettings(particle_diameter=60.0, healpix_order=1, offset_range=0.0, oversampling=0,
                             batch_size=12, ini_high=-1.0, do_ctf=False, n_iter=1)
        opt = SubtomoOptimiser3D(ps, s, lambda idx: w[idx])
        opt.angle_priors = AnglePriors(np.full(N, 90.0), np.zeros(N), sigma, 0.0)
        opt.initialise(ref, absolute_greyscale=False)
        opt.iterate()
        spread[sigma] = float(np.abs(opt.state.angles[:, 1] - 90.0).max())
    assert spread[5.0] <= 15.0 + 1e-6 and spread[0.0] > 30.0, spread
