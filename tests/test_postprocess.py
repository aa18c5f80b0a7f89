"""cryopipe postprocess: RELION relion_postprocess fixture, ground-truth half maps, filters, CLI, errors."""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np
import pytest
import torch

from cryopipe.cli import main as cli_main
from cryopipe.core.fourier import irfft3_centered, rfft3_centered, shell_index_3d
from cryopipe.core.postprocess import (
    RelionRandom,
    bfactor_filter,
    fit_straight_line,
    guinier_curve,
    postprocess_maps,
    resolution_shell,
)
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.star import read_star, write_star
from cryopipe.jobs.postprocess import run_postprocess

# RELION's column -> our result attribute
FSC_COLUMNS = {
    "rlnFourierShellCorrelationUnmaskedMaps": "fsc_unmasked",
    "rlnFourierShellCorrelationMaskedMaps": "fsc_masked",
    "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": "fsc_random",
    "rlnFourierShellCorrelationCorrected": "fsc_true",
    "rlnFourierShellCorrelationParticleMaskFraction": "fsc_part_mask",
}


@pytest.fixture(scope="module")
def pp_dir(relion_dir):
    return relion_dir / "postprocess"


@pytest.fixture(scope="module")
def relion_star(pp_dir):
    return read_star(pp_dir / "postprocess.star")


@pytest.fixture(scope="module")
def ours(pp_dir, relion_dir):
    """The fixture command: --mask mask.mrc --angpix 3 --auto_bfac --autob_lowres 10 (RELION's default seed 0)."""
    return run_postprocess(pp_dir / "half1.mrc", pp_dir / "half2.mrc", mask=relion_dir / "mask.mrc", angpix=3,
                           auto_bfac=True, autob_lowres=10, device="cpu")


def test_fsc_tables_match_relion(ours, relion_star):
    fsc = relion_star["fsc"]
    assert len(fsc) == ours.box // 2 + 1 == 25
    i_r = ours.randomize_at
    assert i_r == 7  # first shell with unmasked FSC < 0.8 (20.57 Å)
    for col, attr in FSC_COLUMNS.items():
        ref = fsc[col].to_numpy()
        got = getattr(ours, attr).numpy()
        # all shells, including the phase-randomised ones beyond i_r + 2: same random stream as RELION
        np.testing.assert_allclose(got, ref, atol=1e-3, err_msg=col)
        np.testing.assert_allclose(got[: i_r + 2], ref[: i_r + 2], atol=2e-6, err_msg=col)


def test_numbers_match_relion(ours, relion_star):
    g = relion_star["general"]
    assert ours.resolution == pytest.approx(8.470588, abs=1e-5)  # shell 17
    assert ours.resolution == pytest.approx(g["rlnFinalResolution"], abs=1e-5)
    assert ours.bfactor == pytest.approx(-172.83006, abs=0.5)
    assert ours.slope == pytest.approx(g["rlnFittedSlopeGuinierPlot"], abs=0.05)
    assert ours.intercept == pytest.approx(g["rlnFittedInterceptGuinierPlot"], abs=1e-3)
    assert ours.fit_correlation == pytest.approx(g["rlnCorrelationFitGuinierPlot"], abs=1e-3)
    assert ours.solvent_fraction == pytest.approx(g["rlnParticleBoxFractionSolventMask"], abs=1e-5)
    assert ours.box * ours.pixel_size / ours.randomize_at == pytest.approx(g["rlnRandomiseFrom"], abs=1e-5)
    gu = relion_star["guinier"]
    np.testing.assert_allclose(ours.guinier_in.x.numpy(), gu["rlnResolutionSquared"], atol=1e-6)
    for col, curve in (("rlnLogAmplitudesOriginal", ours.guinier_in), ("rlnLogAmplitudesWeighted",
                       ours.guinier_weighted), ("rlnLogAmplitudesSharpened", ours.guinier_sharpened)):
        np.testing.assert_allclose(curve.y.numpy(), gu[col], atol=1e-4, err_msg=col)


def test_maps_match_relion(ours, pp_dir):
    ref, _ = read_mrc(pp_dir / "postprocess.mrc")
    ref_m, _ = read_mrc(pp_dir / "postprocess_masked.mrc")
    got, got_m = ours.sharpened.numpy(), ours.masked.numpy()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99
    assert np.corrcoef(got_m.ravel(), ref_m.ravel())[0, 1] > 0.99
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()  # same scale, no shift
    assert np.abs(got_m - ref_m).max() < 1e-3 * np.abs(ref_m).max()


def test_other_seed_statistically_equal(pp_dir, relion_dir, relion_star):
    """Another random seed: identical below i_r + 2, close beyond, resolution within one shell (the corrected FSC
    of this small noisy data set hovers around 0.143 between shells 17 and 19)."""
    res = run_postprocess(pp_dir / "half1.mrc", pp_dir / "half2.mrc", mask=relion_dir / "mask.mrc", angpix=3,
                          random_seed=11, device="cpu")
    ref = relion_star["fsc"]["rlnFourierShellCorrelationCorrected"].to_numpy()
    got = res.fsc_true.numpy()
    np.testing.assert_allclose(got[:9], ref[:9], atol=1e-5)
    assert np.abs(got[9:] - ref[9:]).max() < 0.12
    assert np.abs(got[9:] - ref[9:]).max() > 1e-4  # the random phases do differ
    assert abs(res.resolution_shell - 17) <= 1
    assert res.bfactor == 0.0  # neither --auto_bfac nor --adhoc_bfac


def test_relion_random_is_glibc_rand():
    path = ctypes.util.find_library("c")
    if path is None or "libc.so.6" not in path:
        pytest.skip("needs glibc")
    libc = ctypes.CDLL(path)
    for seed in (0, 1, 4242, 3_000_000_000):
        libc.srand(ctypes.c_uint(seed))
        ref = np.array([libc.rand() for _ in range(20000)], dtype=np.int64)
        rng = RelionRandom(seed, block=1024)
        got = torch.cat([rng.integers(5), rng.integers(13000), rng.integers(6995)]).numpy()
        np.testing.assert_array_equal(got, ref)
    ph = RelionRandom(0).uniform(0.0, 2 * math.pi, 1000)
    assert ph.dtype == torch.float32 and float(ph.min()) >= 0 and float(ph.max()) < 2 * math.pi + 1e-6


def _shell_sums(values: torch.Tensor, n: int) -> torch.Tensor:
    idx = shell_index_3d(n).reshape(-1)
    keep = idx < n // 2 + 1
    return torch.zeros(n // 2 + 1, dtype=torch.float64).index_add_(0, idx[keep], values.reshape(-1)[keep])


def test_ground_truth_resolution(relion_dir):
    """Halves = known map + independent white noise: the resolution is where the known FSC crosses 0.143."""
    x, apix = read_mrc(relion_dir / "ref_map.mrc")
    mask = torch.from_numpy(read_mrc(relion_dir / "mask.mrc")[0]).double()
    n = x.shape[0]
    truth = irfft3_centered(rfft3_centered(torch.from_numpy(x).double()) * bfactor_filter(n, apix, 400.0), n)
    sigma = 0.02
    gen = torch.Generator().manual_seed(0)
    h1 = truth + sigma * torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    h2 = truth + sigma * torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    count = _shell_sums(torch.ones(n, n, n // 2 + 1, dtype=torch.float64), n)
    # expected FSC = S / (S + N): E|FT(noise)|^2 = sigma^2 n^3 per coefficient; sigma^2 sum(m^2) after masking
    s = _shell_sums(rfft3_centered(truth).abs() ** 2, n)
    fsc_exp = s / (s + count * sigma ** 2 * n ** 3)
    sm = _shell_sums(rfft3_centered(truth * mask).abs() ** 2, n)
    fsc_exp_m = sm / (sm + count * sigma ** 2 * float((mask ** 2).sum()))

    un = postprocess_maps(h1, h2, apix, None)
    assert abs(un.resolution_shell - resolution_shell(fsc_exp)) <= 1
    assert np.abs((un.fsc_true - fsc_exp).numpy()[1:]).max() < 0.1
    ma = postprocess_maps(h1, h2, apix, mask)
    assert abs(ma.resolution_shell - resolution_shell(fsc_exp_m)) <= 1
    assert np.abs((ma.fsc_true - fsc_exp_m).numpy()[ma.randomize_at + 2:]).max() < 0.12
    assert ma.resolution < un.resolution - 1.0  # the mask removes solvent noise: better resolution


def test_filters_and_fit():
    n, apix = 32, 2.0
    # straight line fit: exact line, weights select points
    xs = torch.linspace(0, 0.1, 20, dtype=torch.float64)
    ys = -25.0 * xs + 3.0
    w = (torch.arange(20) >= 5).double()
    ys_noisy = ys + torch.where(w > 0, torch.zeros(20, dtype=torch.float64), torch.full((20,), 5.0, dtype=torch.float64))
    slope, icpt, r2 = fit_straight_line(xs, ys_noisy, w)
    assert slope == pytest.approx(-25.0) and icpt == pytest.approx(3.0) and r2 == pytest.approx(1.0)
    # B-factor filter: exp(-B s^2 / 4) up to Nyquist, 0 beyond; Guinier slope of a sharpened flat spectrum = -B/4
    f = bfactor_filter(n, apix, -100.0)
    k = shell_index_3d(n)
    assert float(f.flatten()[0]) == 1.0 and float(f[k > n // 2 + 1].abs().max()) == 0.0
    ft = torch.ones(n, n, n // 2 + 1, dtype=torch.complex128) * f
    g = guinier_curve(ft, n, apix, fit_minres=10.0, fit_maxres=4.2)  # Nyquist shell is half empty: left out
    slope, _, _ = fit_straight_line(g.x, g.y, g.w)
    assert slope == pytest.approx(25.0, rel=0.05)  # shells average exp(+25 s^2) over |k| in [i-0.5, i+0.5)


def _write_pair(tmp_path, h1, h2, apix1=3.0, apix2=3.0):
    write_mrc(tmp_path / "run_half1_class001_unfil.mrc", h1, apix1)
    write_mrc(tmp_path / "run_half2_class001_unfil.mrc", h2, apix2)
    return tmp_path / "run_half1_class001_unfil.mrc"


def test_mtf_and_lowpass(pp_dir, tmp_path):
    h1, _ = read_mrc(pp_dir / "half1.mrc")
    h2, _ = read_mrc(pp_dir / "half2.mrc")
    half1 = _write_pair(tmp_path, h1, h2)
    mtf = tmp_path / "mtf.star"
    import pandas as pd

    write_star(mtf, {"": pd.DataFrame({"rlnResolutionInversePixel": np.linspace(0, 0.5, 11),
                                       "rlnMtfValue": np.full(11, 0.5)})})
    plain = run_postprocess(half1, angpix=3, adhoc_bfac=-100, device="cpu")  # --i2 from the half1 -> half2 rule
    corr = run_postprocess(half1, angpix=3, adhoc_bfac=-100, mtf=mtf, device="cpu")
    np.testing.assert_allclose(corr.guinier_mtf.y.numpy()[:-1], plain.guinier_in.y.numpy()[:-1] + math.log(2),
                               atol=1e-9)  # divided by 0.5 below Nyquist
    lp = run_postprocess(half1, angpix=3, adhoc_bfac=-100, low_pass=-1, device="cpu")  # at the final resolution
    ft = rfft3_centered(lp.sharpened.double())
    shell = round(lp.box * lp.pixel_size / lp.resolution)
    k = shell_index_3d(lp.box)
    assert float(ft[k > shell + 1].abs().max()) < 1e-6 * float(ft.abs().max())
    assert lp.applied_lowpass == pytest.approx(lp.resolution)


def test_cli_job_outputs(pp_dir, relion_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["postprocess", "--i", str(pp_dir / "half1.mrc"), "--i2", str(pp_dir / "half2.mrc"), "--mask",
                   str(relion_dir / "mask.mrc"), "--angpix", "3", "--auto_bfac", "--autob_lowres", "10",
                   "--o", "PostProcess/job004/postprocess"])
    assert rc == 0
    job = tmp_path / "PostProcess" / "job004"
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "postprocess_fsc.xml",
                 "postprocess_fsc.png", "postprocess_guinier.png", "logfile.pdf", "RELION_JOB_EXIT_SUCCESS"):
        assert (job / name).exists(), name
    ours = read_star(job / "postprocess.star")
    ref = read_star(pp_dir / "postprocess.star")
    assert list(ours) == list(ref)  # general, fsc, guinier
    for block in ("fsc", "guinier"):
        assert list(ours[block].columns) == list(ref[block].columns)
    assert list(ours["general"]) == list(ref["general"])
    assert ours["general"]["rlnFinalResolution"] == pytest.approx(8.470588, abs=1e-5)
    assert ours["general"]["rlnPostprocessedMap"] == "PostProcess/job004/postprocess.mrc"
    nodes = read_star(tmp_path / "default_pipeline.star")["pipeline_nodes"]
    types = dict(zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeTypeLabel"]))
    assert types["PostProcess/job004/postprocess.star"] == "ProcessData.star.relion.postprocess"
    assert types["PostProcess/job004/postprocess_masked.mrc"] == "DensityMap.mrc.relion.postprocess.masked"
    assert types["PostProcess/job004/logfile.pdf"] == "LogFile.pdf.relion"


@pytest.mark.parametrize("problem", ["box", "pixel", "mask_range", "mask_box", "both_b", "identical", "nan", "zeros"])
def test_bad_input_one_line_no_outputs(pp_dir, relion_dir, tmp_path, monkeypatch, capsys, problem):
    monkeypatch.chdir(tmp_path)
    h1, _ = read_mrc(pp_dir / "half1.mrc")
    h2, _ = read_mrc(pp_dir / "half2.mrc")
    mask = str(relion_dir / "mask.mrc")
    extra: list[str] = []
    if problem == "box":
        half1 = _write_pair(tmp_path, h1, h2[:40, :40, :40])
    elif problem == "pixel":
        half1 = _write_pair(tmp_path, h1, h2, 3.0, 2.5)
    elif problem == "identical":
        half1 = _write_pair(tmp_path, h1, h1.copy())
    elif problem == "nan":
        bad = h2.copy()
        bad[3, 4, 5] = np.nan
        half1 = _write_pair(tmp_path, h1, bad)
    elif problem == "zeros":
        half1 = _write_pair(tmp_path, h1, np.zeros_like(h2))
    else:
        half1 = _write_pair(tmp_path, h1, h2)
    if problem == "mask_range":
        m, _ = read_mrc(relion_dir / "mask.mrc")
        write_mrc(tmp_path / "bad_mask.mrc", m * 1.5, 3.0)
        mask = str(tmp_path / "bad_mask.mrc")
    elif problem == "mask_box":
        write_mrc(tmp_path / "bad_mask.mrc", np.ones((32, 32, 32), np.float32), 3.0)
        mask = str(tmp_path / "bad_mask.mrc")
    elif problem == "both_b":
        extra = ["--auto_bfac", "--adhoc_bfac", "-100"]
    rc = cli_main(["postprocess", "--i", str(half1), "--mask", mask, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert {"box": "box", "pixel": "pixel size", "mask_range": "[0, 1]", "mask_box": "box",
            "both_b": "adhoc_bfac", "identical": "identical", "nan": "non-finite", "zeros": "all zeros"}[problem] in err
    assert not (tmp_path / "PostProcess").exists() and not (tmp_path / "default_pipeline.star").exists()
    with pytest.raises(CryopipeError):
        run_postprocess(tmp_path / "no_such_name.mrc")  # neither half1 nor half2 in the name


def test_rough_guinier_fit_is_reported_and_plots_leave_matplotlib_alone(pp_dir, relion_dir, tmp_path):
    """RELION's fixture fits B over ~10 shells with r² 0.85: said so, not silently; plotting uses bare Figures
    (no pyplot backend switch, which would change a notebook's backend)."""
    import matplotlib

    backend = matplotlib.get_backend()
    res = run_postprocess(pp_dir / "half1.mrc", pp_dir / "half2.mrc", mask=relion_dir / "mask.mrc", angpix=3.0,
                          auto_bfac=True, autob_lowres=10.0)
    assert any("Guinier fit over" in w and "r² 0.85" in w for w in res.warnings), res.warnings
    from cryopipe.plots.postprocess import plot_postprocess

    plot_postprocess(res, tmp_path / "fsc.png", tmp_path / "guinier.png", None, 10.0, 0.0)
    assert (tmp_path / "fsc.png").stat().st_size > 10000 and matplotlib.get_backend() == backend
