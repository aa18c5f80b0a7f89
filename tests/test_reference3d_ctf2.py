"""RELION's τ² correction by the average CTF² for CTF-premultiplied (tomographic) data in runs without half-sets
(``MlOptimiser::setAverageCTF2`` → ``BackProjector::updateSSNRarrays(..., correct_tau2_by_avgctf2)``):
``1/τ²`` divided by the shell's ``Σ c² / Σ M`` where both are positive, so ``data_vs_prior`` (and the Fourier
coverage) scale by that average; σ²_ref does not change (:func:`cryopipe.engine.reference3d.ssnr_3d`)."""

from __future__ import annotations

import pytest
import torch

from cryopipe.engine.reference3d import ClassBackProjectors, average_ctf2, ssnr_3d


def test_data_vs_prior_scales_by_the_average_ctf2():
    n = 16
    bps = ClassBackProjectors(1, n)
    g = torch.Generator().manual_seed(0)
    bp = bps.bps[0]
    bp.weight.copy_(torch.rand(bp.weight.shape, generator=g) * 5.0)
    ns = n // 2 + 1
    tau2 = torch.rand(1, ns, generator=g, dtype=torch.float64) + 0.5
    tau2[0, 3] = 0.0  # τ² = 0: RELION's 1/(0.001·w), not corrected
    ctf2 = torch.full((ns,), 30.0, dtype=torch.float64)
    counts = torch.full((ns,), 120.0, dtype=torch.float64)
    counts[5] = 0.0  # nothing counted: no correction in that shell
    avg = average_ctf2(ctf2, counts)
    assert avg[0] == 0.25 and avg[5] == 0.0
    s0, d0, c0 = ssnr_3d(bps, tau2)
    s1, d1, c1 = ssnr_3d(bps, tau2, avg_ctf2=avg)
    assert torch.equal(s0, s1)
    inside = torch.arange(ns) <= bp.r_max
    for shell in range(1, ns):
        if not bool(inside[shell]):
            continue
        expect = d0[0, shell] * (0.25 if shell not in (3, 5) else 1.0)
        assert float(d1[0, shell]) == pytest.approx(float(expect), rel=1e-9), shell
    assert bool((c1 <= c0 + 1e-12).all()) and float(c1.sum()) < float(c0.sum())
