"""The 3D jobs on pure noise (issue 11: "check the 3D jobs for the same failure"): the 2D failure was a resolution
estimate that jumped to Nyquist at iteration 1 and stayed there, fitting noise. Gold-standard auto-refine and the
gradient-driven initial model, given images of white noise, must keep the resolution at the low-resolution start
and the image size well below the box.

Measured by hand (not a test, too slow): the initial model on 300 noise images (box 40) for 18 iterations keeps the
resolution at 24 Å (the start) and image size 30, while ⟨Pmax⟩ drifts from 0.02 to 0.19 (the model slowly fits the
noise it is built from once the mini-batch reaches the whole set; RELION's behaviour on the same data is unknown).
In this file's smaller initial-model run ⟨Pmax⟩ was 0.70 in iteration 1: the random blobs were scaled to a signal
power that the per-coefficient clamp of ``|X|² − σ²`` invents from pure noise (~0.37 σ² per coefficient), so the first
posteriors were sharp on noise. With the clamp after summing it is 0.05, then 0.17 and 0.14. The later drift
(issue 11 item 3: ⟨Pmax⟩ near 0.6 after 20 iterations) is reproduced by ``bench/bench_noise_3d.py`` and bounded
by the last tests here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings, random_blob_volume
from cryopipe.engine.stream import ParticleSet
from cryopipe.engine.vdam import initial_model_rule

N, BOX, APIX = 120, 32, 4.0


def _noise_particles(seed: int = 3, n: int = N, box: int = BOX) -> ParticleSet:
    g = np.random.default_rng(seed)
    images = g.normal(0.0, 1.0, (n, box, box)).astype(np.float32)
    du = g.uniform(8000, 24000, n)
    ctf = dict(defocus_u=du, defocus_v=du + g.uniform(-500, 500, n), defocus_angle=g.uniform(0, 180, n),
               voltage=np.full(n, 300.0), cs=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1),
               phase_shift=np.zeros(n), bfactor=np.zeros(n), scale=np.ones(n))
    return ParticleSet(box, APIX, lambda i: images[i], ctf, np.zeros(n, np.int64), np.arange(n) // 40)


def _settings(n: int = N, box: int = BOX, **kw) -> Refine3DSettings:
    base = dict(healpix_order=1, oversampling=0, offset_range=2.0, offset_step=1.0, particle_diameter=0.7 * box * APIX,
                batch_size=80, ini_high=40.0, sigma_noise_particles=n, n_accuracy_particles=10, random_seed=2)
    base.update(kw)
    return Refine3DSettings(**base)


def test_auto_refine_on_noise_stays_at_low_resolution():
    opt = Optimiser3D(_noise_particles(), _settings(n_iter=4))
    gen = torch.Generator().manual_seed(1)
    opt.initialise(random_blob_volume(BOX, 0.3 * BOX, gen), absolute_greyscale=False)
    reports = [opt.iterate() for _ in range(2)]
    res = [r.resolution_A for r in reports]
    sizes = [r.current_size for r in reports]
    # the gold-standard FSC of noise half-maps keeps the resolution at the start (shell minres_map = 5: 25.6 Å), and
    # the image size at RELION's floor 2·(minres_map + incr_size)
    assert min(res) >= 25.0, res
    assert max(sizes) <= 2 * (opt.s.minres_map + opt.s.incr_size), sizes
    assert reports[0].ave_pmax < 0.1, [r.ave_pmax for r in reports]  # measured 0.05 (0.70 before the fix)
    assert all(not r.final for r in reports)


def test_initial_model_on_noise_stays_at_low_resolution():
    s = _settings(n_iter=6, grad=True, split_halves=False, auto_refine=False)
    opt = Optimiser3D(_noise_particles(), s, update_rule=initial_model_rule(s.n_iter, s.tau2_fudge, {}))
    opt.initialise()
    reports = [opt.iterate() for _ in range(3)]
    res = [r.resolution_A for r in reports]
    sizes = [r.current_size for r in reports]
    assert min(res) >= 25.0, res
    assert max(sizes) <= 2 * (opt.s.minres_map + opt.s.incr_size), sizes
    assert reports[0].ave_pmax < 0.1, [r.ave_pmax for r in reports]  # measured 0.05 (0.70 before the fix)


def test_initial_model_on_noise_30_iterations_does_not_run_away():
    """Issue 11 item 3: 400 noise images (box 48), 30 VDAM iterations (``bench/bench_noise_3d.py`` is the same run
    with a per-iteration table). The resolution stays at the start and the image size at its floor throughout, and
    the update's per-shell FSC estimate (momentum noise against reference amplitude, RELION's ``reconstructGrad``)
    stays well below 0.5. ⟨Pmax⟩ does climb (measured: 0.03 → 0.68 by iteration 19, then 0.59–0.66): the
    reference keeps the part of the noise that both pseudo-halves agree on because both were aligned to it, and the
    offset prior narrows as the posteriors concentrate (σ_offset 0.98 → 0.35 px, where RELION's 2 Å² lower bound
    now holds it; without the bound it fell further and ⟨Pmax⟩ went in a saw-tooth 0.22–0.71). The noise σ² stays
    within 4 %. Every rule on that path (gradient, moments, FSC estimate with the zero half-set floor of a run without
    halves, T := 1, per-class step, σ², offset and prior updates with μ = 0 once the mini-batch is the whole set) was
    checked against RELION 5's ``backprojector.cpp`` / ``ml_optimiser.cpp``: RELION's VDAM is expected to do the
    same. The ⟨Pmax⟩ bound is a regression ceiling on that measured behaviour, not a property of a correct result."""
    n, box = 400, 48
    s = _settings(n=n, box=box, n_iter=30, grad=True, split_halves=False, auto_refine=False, batch_size=100)
    rule = initial_model_rule(s.n_iter, s.tau2_fudge, {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bench: 39 CPU-s (two threads cost more CPU on shared cores)
    try:
        opt = Optimiser3D(_noise_particles(n=n, box=box), s, update_rule=rule)
        opt.initialise()
        reports, fsc = [], []
        for _ in range(30):
            reports.append(opt.iterate())
            rc = max(1, opt.model.current_size // 2)
            fsc.append(float(rule.last_fsc[0, 1:rc + 1].mean()))
    finally:
        torch.set_num_threads(threads)
    res = [r.resolution_A for r in reports]
    sizes = [r.current_size for r in reports]
    pmax = [round(r.ave_pmax, 3) for r in reports]
    assert min(res) >= 25.0, res
    assert max(sizes) <= 2 * (opt.s.minres_map + opt.s.incr_size), sizes
    assert max(fsc) < 0.5, fsc  # measured 0.29-0.42
    assert pmax[0] < 0.05 and max(pmax) < 0.8, pmax


def test_offset_prior_variance_has_relions_lower_bound():
    """RELION ``--min_sigma2_offset`` (2 Å²): the offset prior's variance never drops below it after an update. On
    noise the posterior concentrates and ``Σw|Δo|²`` shrinks each iteration; without the bound σ_offset fell to
    0.46 px (1.8 Å at 4 Å/px) by iteration 16 of ``bench/bench_noise_3d.py`` and kept falling, sharpening ⟨Pmax⟩
    through the prior alone (a saw-tooth 0.22–0.71; with the bound it stays at 0.35 px and ⟨Pmax⟩ at 0.59–0.68)."""
    from types import SimpleNamespace

    from cryopipe.engine.stream import MIN_SIGMA2_OFFSET_A2, ParticleSums, update_particle_model

    G, ns = 1, 9
    sums = ParticleSums.zeros(1, G, ns, 1, torch.device("cpu"))
    sums.wsum_class += 10.0
    sums.sumw_group += 10.0
    sums.wsum_sigma2_noise += 1.0
    # Σw|Δo|² over Σw = 10 and D = 2: 0.2 → 0.01 px² (0.16 Å² at 4 Å/px: raised to 2 Å² = 0.125 px²); 20 → 1 px²
    for wsum, expect in ((0.2, MIN_SIGMA2_OFFSET_A2 / 16.0), (20.0, 1.0)):
        sums.wsum_sigma2_offset.fill_(wsum)
        model = SimpleNamespace(pixel_size=4.0, sigma2_offset=1.0, sigma2_noise=None, LL=0.0, ave_pmax=0.0)
        update_particle_model(model, sums, torch.full((ns,), 4.0), do_norm=False, do_scale=False)
        assert model.sigma2_offset == pytest.approx(expect)
