"""Gradient (VDAM) mode: RELION's schedules (subset size, step size, tau2_fudge) and the update rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.engine.coefficients import coefficient_set
from cryopipe.engine.vdam import (
    GradSchedule,
    GradUpdate,
    class_step,
    default_subset_sizes,
    step_size,
    subset_size,
    tau2_fudge_value,
)


def test_schedule_phases_and_subset_sizes():
    sch = GradSchedule(200)  # RELION GUI: 200 mini-batches, 30 % initial, 20 % final
    assert (sch.ini_iter, sch.inbetween_iter, sch.fin_iter) == (60, 100, 40)
    N = 100000
    ini, fin = default_subset_sizes(N, "2d")
    assert (ini, fin) == (500, 5000)
    assert default_subset_sizes(1000, "2d") == (200, 1000)
    assert default_subset_sizes(10 ** 7, "initial_model") == (5000, 50000)
    assert subset_size(10, sch, ini, fin, N) == 500
    assert subset_size(110, sch, ini, fin, N) == 500 + round(50 / 100 * 4500)
    assert subset_size(170, sch, ini, fin, N) == 5000
    assert subset_size(199, sch, ini, fin, N, grad_em_iters=5) == -1  # final EM iterations use all particles
    assert subset_size(10, sch, ini, fin, 400) == -1  # subset larger than the data


def test_step_size_and_tau2_fudge_sigmoids():
    sch = GradSchedule(200)
    # 2D: scheme "3-step" for base 0.3: starts at 0.9, sigmoid centred at ini + inbetween/4, ends at 0.3
    assert step_size(0, sch) == pytest.approx(0.9, abs=1e-3)
    assert step_size(60 + 25, sch) == pytest.approx(0.6, abs=1e-6)  # midpoint of the sigmoid
    assert step_size(199, sch) == pytest.approx(0.3, abs=1e-3)
    assert step_size(50, sch, kind="3d") == 0.3  # 3D classification: plain
    assert step_size(0, sch, kind="initial_model") == pytest.approx(0.9, abs=1e-3)
    assert step_size(199, sch, kind="initial_model") == pytest.approx(0.5, abs=1e-3)
    steps = [step_size(i, sch) for i in range(200)]
    assert np.all(np.diff(steps) <= 1e-12)
    # tau2_fudge rises from 1 to T around ini + inbetween/8
    assert tau2_fudge_value(0, sch, 4.0) == pytest.approx(1.0, abs=1e-3)
    assert tau2_fudge_value(60 + 12.5, sch, 4.0) == pytest.approx(2.5, abs=1e-6)
    assert tau2_fudge_value(199, sch, 4.0) == pytest.approx(4.0, abs=1e-6)
    assert tau2_fudge_value(10, sch, 4.0, kind="3d") == 4.0
    k = class_step(0.3, torch.tensor([0.0, 0.01, 0.5]))
    assert float(k[0]) == 0.0 and float(k[2]) == pytest.approx(0.3, abs=1e-4) and 0 < float(k[1]) < 0.3


def test_grad_update_converges_to_the_data():
    """With consistent pseudo-halves (data = weight·F_true + noise), repeated VDAM steps approach F_true at
    the data (heavy-ball momentum: ~1 % after 100 steps) from a weak random start (RELION never starts from zeros:
    the FSC estimate of a shell is 2T·⟨|F|⟩/noise, so an all-zero reference would not move)."""
    cs = coefficient_set(32, 12)
    g = torch.Generator().manual_seed(0)
    K, P = 2, cs.size
    F_true = torch.complex(torch.randn(K, P, generator=g), torch.randn(K, P, generator=g)).to(torch.complex128)
    weight = torch.full((2, K, P), 200.0, dtype=torch.float64)
    rule = GradUpdate(GradSchedule(100), kind="2d", T=2.0)
    F = 0.1 * torch.complex(torch.randn(K, P, generator=g), torch.randn(K, P, generator=g)).to(torch.complex128)
    pdf = torch.tensor([0.5, 0.5])
    tau2 = torch.ones(K, 13, dtype=torch.float64)
    for it in range(100):
        noise = 0.05 * torch.complex(torch.randn(2, K, P, generator=g), torch.randn(2, K, P, generator=g))
        data = weight * F_true[None] + weight * noise
        F = rule(data, weight, F, tau2, cs.shell, 2.0, 5, 12, pdf, it)
    err = float((F - F_true).abs().norm() / F_true.abs().norm())
    assert err < 0.05
    # a class without particles does not move
    F2 = rule(data, weight, F, tau2, cs.shell, 2.0, 5, 12, torch.tensor([1.0, 0.0]), 100)
    assert torch.equal(F2[1], F[1])


def _three_views_2d(relion_dir, N: int, n_classes: int):
    """``(sim, particle set, settings)``: N simulated 32² particles of 3 views (SNR 0.5) for 2D gradient runs."""
    import numpy as np

    from cryopipe.engine.classify2d import Class2DSettings, ParticleSet2D

    from engine_helpers import simulate

    torch.set_num_threads(2)
    sim = simulate(relion_dir, N=N, n=32, snr=0.5, seed=1, max_shift=2.0)
    ps = ParticleSet2D(sim.n, sim.pixel_size, lambda i: sim.images[i], sim.ctf, np.zeros(N, dtype=np.int64),
                       np.zeros(N, dtype=np.int64))
    s = Class2DSettings(n_classes=n_classes, particle_diameter=110, zero_mask=True, psi_step=15, offset_range=2,
                        offset_step=1, random_seed=3, batch_size=N, n_accuracy_particles=10, n_iter=10)
    return sim, ps, s


def test_class2d_gradient_mode_keeps_true_views(relion_dir):
    """Wiring of the gradient mode in the 2D optimiser (mini-batches, pseudo-halves by particle parity, class-frame
    back-rotation, VDAM update): started from the true views, particles are assigned correctly and each class
    average stays its view (a broken rotation, halving or update direction scrambles them within an iteration)."""
    import numpy as np

    from cryopipe.engine.classify2d import Optimiser2D

    from engine_helpers import best_aligned_correlation

    N = 120
    sim, ps, s = _three_views_2d(relion_dir, N, n_classes=3)
    rule = GradUpdate(GradSchedule(10), ini_subset=60, fin_subset=100, T=2.0)
    opt = Optimiser2D(ps, s, update_rule=rule)
    opt.initialise()
    opt.from_scratch = False
    opt.model.refs = sim.views.clone()
    for _ in range(2):
        opt.iterate()
    assert opt.model.tau2_fudge == pytest.approx(tau2_fudge_value(2, GradSchedule(10), 2.0))
    seen = opt.state.klass >= 0
    assert 50 <= int(seen.sum()) < N  # mini-batches: not every particle was visited
    assert (opt.state.klass[seen] == sim.klass[seen]).mean() >= 0.95
    # VDAM's fixed point is the data average damped by its FSC-like estimate f (step·(1 − f)·F pulls poorly
    # measured frequencies to 0), so with mini-batches of 60 the averages soften: each must still match its own
    # view better than the others
    cc = np.array([[best_aligned_correlation(opt.model.refs[k], sim.views[t], 4) for t in range(3)]
                   for k in range(3)])
    assert np.all(np.argmax(cc, axis=1) == np.arange(3)), cc


def test_replace_inactive_class_copies_the_busiest_class():
    """``--class_inactivity_threshold``: in the in-between phase, the least-used class (pdf < threshold/K_active)
    takes the momenta of the class with the largest pdf·|update|² (first pseudo-half's first moment × 0.9);
    outside that phase, above the threshold or with threshold 0 nothing happens."""
    cs = coefficient_set(16, 6)
    g = torch.Generator().manual_seed(1)
    K, P = 3, cs.size
    sched = GradSchedule(10)  # in-between phase: iterations 4..7
    cur = torch.complex(torch.randn(K, P, generator=g), torch.randn(K, P, generator=g)).to(torch.complex128)
    w = torch.full((2, K, P), 50.0, dtype=torch.float64)
    data = w * (cur[None] + torch.tensor([0.1, 2.0, 0.1], dtype=torch.float64)[None, :, None])  # class 1 moves most
    pdf = torch.tensor([0.5, 0.48, 0.02], dtype=torch.float64)
    off = GradUpdate(sched, kind="2d", class_inactivity_threshold=0.0)
    off(data, w, cur, torch.ones(K, 7), cs.shell, 2.0, 5, 6, pdf, 5)
    assert off.replace_inactive_class(pdf, 5) is None
    rule = GradUpdate(sched, kind="2d", class_inactivity_threshold=0.1)
    rule(data, w, cur, torch.ones(K, 7), cs.shell, 2.0, 5, 6, pdf, 5)
    assert rule.replace_inactive_class(pdf, 2) is None  # initial phase
    assert rule.replace_inactive_class(torch.tensor([0.5, 0.45, 0.05]), 5) is None  # 0.05 >= 0.1/3
    assert rule.replace_inactive_class(pdf, 5) == (2, 1)
    assert torch.equal(rule.m1[1, 2], rule.m1[1, 1]) and torch.allclose(rule.m1[0, 2], 0.9 * rule.m1[0, 1])
    assert torch.equal(rule.m2[2], rule.m2[1])


def test_class2d_gradient_mode_replaces_an_empty_class(relion_dir):
    """Wiring in the 2D optimiser: a class that lost its particles becomes a copy of another class (reference and
    prior), so that VDAM can split it again."""
    from cryopipe.engine.classify2d import Optimiser2D

    N = 120
    sim, ps, s = _three_views_2d(relion_dir, N, n_classes=4)
    rule = GradUpdate(GradSchedule(10), ini_subset=60, fin_subset=100, T=2.0, class_inactivity_threshold=0.1)
    opt = Optimiser2D(ps, s, update_rule=rule)
    opt.initialise()
    opt.from_scratch = False
    opt.model.refs = torch.cat([sim.views.clone(), torch.zeros(1, 32, 32)])  # class 4: nothing looks like it
    opt.model.pdf_class = torch.tensor([0.33, 0.33, 0.33, 0.01], dtype=torch.float64)
    opt.iteration = 4  # the next iteration (5) is in the in-between phase
    opt.iterate()
    assert opt.replaced is not None and opt.replaced[0] == 3
    drop, src = opt.replaced
    assert torch.equal(opt.model.refs[drop], opt.model.refs[src])
    assert float(opt.model.pdf_class[drop]) > 0.01
