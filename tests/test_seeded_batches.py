"""Reproducibility of the noise fill (issue 14 item 3, issue 15 item 1): without ``--zero_mask`` the background
outside the particle mask is filled with noise seeded per particle from (run seed, iteration, particle index), so
class2d and refine3d give the same result whatever the batch size, and the same run twice gives the same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.engine.batch import mask_images
from cryopipe.engine.classify2d import Class2DSettings, Optimiser2D, ParticleSet2D
from cryopipe.engine.seeds import particle_normal, particle_seeds

from engine_helpers import simulate

torch.set_num_threads(2)


def test_particle_seeds_are_pure_and_distinct():
    idx = np.arange(100)
    a = particle_seeds(3, 2, idx)
    assert np.array_equal(a[40:60], particle_seeds(3, 2, idx[40:60]))
    assert len(set(a.tolist())) == 100
    for other in (particle_seeds(4, 2, idx), particle_seeds(3, 3, idx), particle_seeds(3, 2, idx, stream=9)):
        assert not np.any(a == other)
    z = particle_normal(a[:3], (8, 8))
    assert torch.equal(z[1], particle_normal(a[1:2], (8, 8))[0])


def test_mask_noise_is_per_particle():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 16, 16, generator=g)
    mask = (torch.arange(16)[:, None] - 8.0) ** 2 + (torch.arange(16)[None, :] - 8.0) ** 2 < 25
    seeds = particle_seeds(1, 1, np.arange(10, 16))
    full = mask_images(img, mask.float(), zero_mask=False, noise_seeds=seeds)
    part = mask_images(img[2:5], mask.float(), zero_mask=False, noise_seeds=seeds[2:5])
    assert torch.equal(full[2:5], part)


def _run_2d(sim, N, batch_size, n_iter=3):
    ps = ParticleSet2D(sim.n, sim.pixel_size, lambda i: sim.images[i], sim.ctf, np.zeros(N, dtype=np.int64),
                       np.zeros(N, dtype=np.int64))
    s = Class2DSettings(n_classes=3, particle_diameter=100, zero_mask=False, psi_step=20, offset_range=2,
                        offset_step=1, oversampling=0, random_seed=11, batch_size=batch_size,
                        n_accuracy_particles=10,
                        do_norm=True, do_scale=True)
    opt = Optimiser2D(ps, s)
    opt.initialise()
    for _ in range(n_iter):
        opt.iterate()
    return opt


def test_class2d_independent_of_batch_size(relion_dir):
    N = 96
    sim = simulate(relion_dir, N=N, n=32, snr=0.5, seed=2)
    a, b = _run_2d(sim, N, 16), _run_2d(sim, N, 48)
    ra, rb = a.model.refs, b.model.refs
    assert torch.allclose(ra, rb, rtol=0, atol=1e-4 * float(ra.abs().max()))
    assert np.array_equal(a.state.klass, b.state.klass)
    assert np.allclose(a.state.psi, b.state.psi, atol=1e-4)
    assert np.allclose(a.state.origin, b.state.origin, atol=1e-5)
    assert np.allclose(a.state.norm, b.state.norm, rtol=1e-4)
    assert torch.allclose(a.model.sigma2_noise, b.model.sigma2_noise, rtol=1e-4)
    assert a.model.LL == pytest.approx(b.model.LL, rel=1e-5)
    # and the same run twice is the same run
    c = _run_2d(sim, N, 16)
    assert torch.allclose(ra, c.model.refs, rtol=0, atol=1e-6 * float(ra.abs().max()))


@pytest.fixture(scope="module")
def project3d(tmp_path_factory):
    import os

    from cryopipe.cli import main as cli

    root = tmp_path_factory.mktemp("seeded3d")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli(["simulate", "--what", "particles", "--n", "96", "--box", "24", "--angpix", "4", "--snr", "1",
                    "--seed", "3"]) == 0
    finally:
        os.chdir(cwd)
    return root


def test_refine3d_independent_of_batch_size(project3d, monkeypatch):
    from cryopipe.engine.optimiser3d import Refine3DSettings
    from cryopipe.io.mrc import read_mrc
    from cryopipe.io.star import read_star
    from cryopipe.jobs.refine3d import refine_3d

    def run(bs: int, out: str):
        s = Refine3DSettings(n_iter=2, healpix_order=1, oversampling=0, offset_range=2.0, offset_step=1.0,
                             particle_diameter=70.0, batch_size=bs, ini_high=25.0, sigma_noise_particles=200,
                             n_accuracy_particles=20, zero_mask=False, random_seed=5)
        refine_3d("Simulate/job001/particles.star", out, s, reference="Simulate/job001/truth_map.mrc",
                  log=lambda *a: None)

    monkeypatch.chdir(project3d)

    run(16, "A/")
    run(48, "B/")
    for name in ("run_it001_half1_class001.mrc", "run_it001_half2_class001.mrc", "run_half1_class001_unfil.mrc"):
        a, b = read_mrc(project3d / "A" / name)[0], read_mrc(project3d / "B" / name)[0]
        assert np.allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max()), name
    pa = read_star(project3d / "A/run_it001_data.star")["particles"]
    pb = read_star(project3d / "B/run_it001_data.star")["particles"]
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.allclose(pa[col], pb[col], atol=1e-3), col
