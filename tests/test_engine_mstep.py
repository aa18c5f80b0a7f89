"""Engine M-step: regularised update, SSNR arrays, noise spectra and RELION's resolution bookkeeping (checked on the
RELION 5 class2d fixture), reference spectra, accuracies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryopipe.engine.accuracy import expected_accuracy, first_crossing, trial_angles
from cryopipe.engine.coefficients import coefficient_set
from cryopipe.engine.mstep import (
    current_resolution_shell,
    estimated_resolution_shell,
    noise_spectrum,
    reference_tau2,
    regularised_update,
    ssnr_arrays,
    total_fourier_coverage,
)
from cryopipe.engine.relion_files import read_model_star


def test_regularised_update_formula():
    cs = coefficient_set(16, 8)
    g = torch.Generator().manual_seed(0)
    K, P = 2, cs.size
    data = torch.complex(torch.randn(K, P, generator=g), torch.randn(K, P, generator=g)).to(torch.complex128)
    weight = torch.rand(K, P, generator=g, dtype=torch.float64) * 10
    tau2 = torch.rand(K, 9, generator=g, dtype=torch.float64) + 0.1
    tau2[1, 6] = 0.0  # RELION: 1/(0.001·weight) where τ² = 0
    T = 2.0
    out = regularised_update(data, weight, tau2, cs.shell, T, minres_map=3, r_max=7)
    sh = cs.shell
    inv = 1.0 / (T * tau2[:, sh])
    inv[1, sh == 6] = 1.0 / (0.001 * weight[1, sh == 6])
    expect = torch.where(sh[None] >= 3, data / (weight + inv), data / weight)
    expect[:, sh > 7] = 0
    assert torch.allclose(out, expect, rtol=1e-12)


def test_ssnr_arrays_per_shell():
    cs = coefficient_set(24, 12)
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(1, cs.size, generator=g, dtype=torch.float64) * 100
    tau2 = torch.full((1, 13), 0.02, dtype=torch.float64)
    s2, dvp, cov = ssnr_arrays(weight, tau2, cs.shell, 13, tau2_fudge=2.0, r_max=10)
    for s in (0, 3, 10):
        w = weight[0, cs.shell == s]
        assert float(s2[0, s]) == pytest.approx(float(len(w) / w.sum()))
        assert float(dvp[0, s]) == pytest.approx(float((w * 2.0 * 0.02).mean()))
        assert float(cov[0, s]) == pytest.approx(float((w * 2.0 * 0.02 >= 1).double().mean()))
    assert float(dvp[0, 11]) == 0.0 and float(dvp[0, 12]) == 0.0


def test_resolution_bookkeeping_matches_relion_fixture(relion_dir):
    """From RELION's own rlnSsnrMap: per-class rlnEstimatedResolution, rlnOverallFourierCompleteness and
    the model's rlnCurrentResolution are reproduced exactly."""
    mf = read_model_star(relion_dir / "class2d" / "run_it005_model.star")
    n, apix = int(mf.general["rlnOriginalImageSize"]), float(mf.general["rlnPixelSize"])
    dvp = torch.as_tensor(mf.ssnr)
    maxres = estimated_resolution_shell(dvp)
    est = n * apix / maxres.double()
    assert np.allclose(est.numpy(), mf.classes["rlnEstimatedResolution"].to_numpy(float), atol=1e-4)
    cov = total_fourier_coverage(torch.as_tensor(mf.fourier_coverage), maxres)
    assert np.allclose(cov.numpy(), mf.classes["rlnOverallFourierCompleteness"].to_numpy(float), atol=1e-6)
    shell = current_resolution_shell(dvp, n, minres_map=5)
    assert n * apix / shell == pytest.approx(float(mf.general["rlnCurrentResolution"]))
    # RELION's SSNR of a shell is T·τ²/σ²_ref (its data_vs_prior with mean weight = 1/σ²_ref): check the file
    T = float(mf.general["rlnTau2FudgeFactor"])
    ok = (mf.sigma2_ref > 0) & (mf.tau2 > 0)
    ratio = mf.ssnr[ok] / (T * mf.tau2[ok] / mf.sigma2_ref[ok])
    assert np.abs(ratio - 1).max() < 1e-3


def test_reference_tau2_is_half_power_per_shell():
    n = 32
    cs = coefficient_set(n, n // 2)
    g = torch.Generator().manual_seed(2)
    F = torch.complex(torch.randn(1, cs.size, generator=g), torch.randn(1, cs.size, generator=g))
    t2 = reference_tau2(F, cs.shell, n // 2 + 1, r_max=10)
    for s in (1, 5, 10):
        assert float(t2[0, s]) == pytest.approx(float(F[0, cs.shell == s].abs().square().mean() / 2), rel=1e-5)
    assert float(t2[0, 11:].abs().max()) == 0.0


def test_noise_spectrum():
    npix = torch.tensor([1.0, 6.0, 12.0, 18.0])
    wsum = torch.tensor([[2.0, 24.0, 0.0, 36.0]], dtype=torch.float64)
    s2 = noise_spectrum(wsum, torch.tensor([2.0]), npix)
    assert s2[0].tolist() == pytest.approx([0.5, 1.0, 1.0, 0.5])  # empty shell 2 takes shell 1's value
    prev = torch.full((2, 4), 7.0, dtype=torch.float64)
    s2 = noise_spectrum(torch.cat([wsum, torch.zeros(1, 4, dtype=torch.float64)]), torch.tensor([2.0, 0.0]),
                        npix, previous=prev)
    assert s2[1].tolist() == [7.0] * 4  # optics group without particles keeps its spectrum


def test_accuracy_first_crossing():
    trials = trial_angles(180.0)
    assert float(trials[0]) == pytest.approx(0.05) and float(trials[-1]) == pytest.approx(180.0, rel=1e-5)
    # difference power growing like δ² per coefficient: score = 0.5·Σ w·δ² → crossing at sqrt(2·4.60517/Σw)
    P = 10
    dp = (trials[:, None] ** 2).expand(-1, P)
    w = torch.full((3, P), 0.1)
    acc, orient = expected_accuracy(dp, w, trials, torch.arange(P) % 3, 3)
    expect = math.sqrt(2 * 4.60517 / (0.1 * P))
    assert float(acc) == pytest.approx(expect, rel=0.05)
    assert float(orient.sum()) == pytest.approx(1.0)
    assert float(first_crossing(torch.zeros(2, trials.numel()), trials)[0]) == pytest.approx(180.0, rel=1e-5)
