"""The 3D jobs on pure noise (issue 11: "check the 3D jobs for the same failure"): the 2D failure was a resolution
estimate that jumped to Nyquist at iteration 1 and stayed there, fitting noise. Gold-standard auto-refine and the
gradient-driven initial model, given images of white noise, must keep the resolution at the low-resolution start
and the image size well below the box.

Measured by hand (not a test, too slow): the initial model on 300 noise images (box 40) for 18 iterations keeps the
resolution at 24 Å (the start) and image size 30, while ⟨Pmax⟩ drifts from 0.02 to 0.19 (the model slowly fits the
noise it is built from once the mini-batch reaches the whole set; RELION's behaviour on the same data is unknown).
In this file's smaller initial-model run ⟨Pmax⟩ was 0.70 in iteration 1: the random blobs were scaled to a signal
power that the per-coefficient clamp of ``|X|² − σ²`` invents from pure noise (~0.37 σ² per coefficient), so the first
posteriors were sharp on noise. With the clamp after summing it is 0.05, then 0.17 and 0.14: the later drift is not
asserted (open, issue 11)."""

from __future__ import annotations

import numpy as np
import torch

from cryopipe.engine.optimiser3d import Optimiser3D, Refine3DSettings, random_blob_volume
from cryopipe.engine.stream import ParticleSet
from cryopipe.engine.vdam import initial_model_rule

N, BOX, APIX = 120, 32, 4.0


def _noise_particles(seed: int = 3) -> ParticleSet:
    g = np.random.default_rng(seed)
    images = g.normal(0.0, 1.0, (N, BOX, BOX)).astype(np.float32)
    du = g.uniform(8000, 24000, N)
    ctf = dict(defocus_u=du, defocus_v=du + g.uniform(-500, 500, N), defocus_angle=g.uniform(0, 180, N),
               voltage=np.full(N, 300.0), cs=np.full(N, 2.7), amplitude_contrast=np.full(N, 0.1),
               phase_shift=np.zeros(N), bfactor=np.zeros(N), scale=np.ones(N))
    return ParticleSet(BOX, APIX, lambda i: images[i], ctf, np.zeros(N, np.int64), np.arange(N) // 40)


def _settings(**kw) -> Refine3DSettings:
    base = dict(healpix_order=1, oversampling=0, offset_range=2.0, offset_step=1.0, particle_diameter=0.7 * BOX * APIX,
                batch_size=80, ini_high=40.0, sigma_noise_particles=N, n_accuracy_particles=10, random_seed=2)
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
