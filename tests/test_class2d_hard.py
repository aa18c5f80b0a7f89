"""2D classification on RELION's ``class2d_hard`` fixture (fixtures README §11: 2,000 RELION-projected particles of a
D2 tetramer, box 96, 3 Å/px, SNR 0.05, un-normalised float16, 30 micrographs, with RELION 5's model.star of every
iteration), and on a pure-noise stack.

The failure (issue 11): cryopipe's iteration-0 τ² was the power spectrum of full-resolution random-subset averages,
i.e. mostly their noise (SSNR ≈ 5 out to Nyquist), so iteration 1 ran at image size 96 (6 Å) and fitted noise
(⟨Pmax⟩ ≈ 0.9). RELION starts from those averages low-passed to 0.07·box shells (41 Å here), turns them into random
Gaussian blobs (RELION ≥ 4), low-passes and masks again, and works at that resolution in iteration 1 (image size 34):
its iteration-0 SSNR falls below 1 at 36 Å and below 0.01 by ~20 Å.

Subset: the first ``N_SUB`` particles (15 micrographs) with ``K_SUB`` classes, i.e. 200 particles per class as in
RELION's run (2,000 / 10). The iteration-0 τ² does not depend on the subset (it is set by the low-passed, blobbed
start, measured: within 1.1–1.7× of RELION's for 500–2,000 particles and 3–10 classes), and the SSNR scales with
the particles per class (``N·pdf/σ²·τ²``), which the subset keeps; the M-step's per-class statistics (and hence the
resolution estimate, the maximum over classes) are those of classes of ~200 particles, like RELION's. RELION's
runs differ by ±1–2 shells with the random seed (multi-threaded EM, README), ours too: the resolution is checked at
the issue's tolerance, ±25 % of RELION's at the same iteration.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cryopipe.engine.classify2d import Class2DSettings, Optimiser2D, ParticleSet2D
from cryopipe.engine.relion_files import read_model_star
from cryopipe.io.mrc import read_mrc
from cryopipe.io.particles import read_particles, write_particles
from cryopipe.jobs.class2d import classify_2d
from cryopipe.sim.class_quality import (best_match_correlation, best_projection_correlation,
                                        high_frequency_power_ratio)

torch.set_num_threads(2)

N_SUB, K_SUB, N_ITER = 1000, 5, 6
N_SIM, K_SIM = 600, 3  # our own hard set (sim_hard_run)
NYQUIST_A = 6.0


def _gmean(a: np.ndarray) -> np.ndarray:
    """Geometric mean over classes (axis 0) of positive spectra."""
    return np.exp(np.log(np.maximum(a, 1e-300)).mean(axis=0))


def _subset_run(relion_dir: Path, out: Path, relion_offset_prior: bool = False) -> dict:
    """Our class2d with RELION's options (``--K 10 --tau2_fudge 2 --particle_diameter 150 --ctf --zero_mask
    --psi_step 6 --offset_range 5 --offset_step 2 --norm --scale``, K reduced with the subset) on the subset."""
    d = relion_dir / "class2d_hard"
    data = read_particles(d / "particles.star")
    data.particles = data.particles.iloc[:N_SUB].copy()
    data.particles["rlnImageName"] = [n.split("@")[0] + "@" + str(d / "particles.mrcs")
                                      for n in data.particles["rlnImageName"]]
    write_particles(out / "particles.star", data)
    s = Class2DSettings(n_classes=K_SUB, n_iter=N_ITER, tau2_fudge=2, particle_diameter=150, do_ctf=True,
                        zero_mask=True, psi_step=6, offset_range=5, offset_step=2, do_norm=True, do_scale=True,
                        random_seed=1, relion_offset_prior=relion_offset_prior)
    t0 = time.perf_counter()
    classify_2d(out / "particles.star", out / "run", s, root=out, log=lambda *a: None)
    seconds = time.perf_counter() - t0
    ours = [read_model_star(out / f"run_it{i:03d}_model.star") for i in range(N_ITER + 1)]
    relion = [read_model_star(d / f"run_it{i:03d}_model.star") for i in range(N_ITER + 1)]
    mics = sorted(set(data.particles["rlnMicrographName"].astype(str)))
    return dict(ours=ours, relion=relion, seconds=seconds, micrographs=mics, out=out, fixture=d)


@pytest.fixture(scope="module")
def hard_run(relion_dir, tmp_path_factory):
    return _subset_run(relion_dir, tmp_path_factory.mktemp("class2d_hard"))


def test_iteration0_model_like_relion(hard_run):
    """Iteration 0: τ² and SSNR fall off like RELION's (within 3× per shell where RELION's SSNR > 0.01), the SSNR
    drops below 1 at RELION's shell and is tiny at high resolution; noise spectrum, offset σ and groups as RELION's."""
    m, r = hard_run["ours"][0], hard_run["relion"][0]
    g = m.general
    assert float(g["rlnSigmaOffsetsAngst"]) == pytest.approx(float(r.general["rlnSigmaOffsetsAngst"]))  # 10 Å
    # one group per micrograph (RELION: rlnMicrographName when there is no rlnGroupName)
    assert int(g["rlnNrGroups"]) == len(hard_run["micrographs"])
    assert sorted(m.groups["rlnGroupName"].astype(str)) == hard_run["micrographs"]
    assert set(hard_run["micrographs"]) <= set(r.groups["rlnGroupName"].astype(str))
    # noise spectrum (shell 0 excluded: RELION fills the background of its "zero" mask with the mean)
    s2o, s2r = m.sigma2_noise[0, 1:], r.sigma2_noise[0, 1:]
    assert np.all(np.abs(s2o / s2r - 1.0) < 0.1), np.round(s2o / s2r, 3)
    ssnr_r, ssnr_o = _gmean(r.ssnr), _gmean(m.ssnr)
    tau_r, tau_o = _gmean(r.tau2), _gmean(m.tau2)
    shells = np.nonzero(ssnr_r > 0.01)[0]
    shells = shells[shells >= 1]
    assert shells.size >= 10
    for name, o, rr in (("tau2", tau_o, tau_r), ("ssnr", ssnr_o, ssnr_r)):
        ratio = o[shells] / rr[shells]
        assert np.all((ratio > 1 / 3) & (ratio < 3)), (name, dict(zip(shells.tolist(), np.round(ratio, 2))))
    first_below = lambda v: int(np.nonzero(v[1:] < 1.0)[0][0]) + 1  # noqa: E731
    assert abs(first_below(ssnr_o) - first_below(ssnr_r)) <= 1  # RELION: shell 8 (36 Å)
    assert np.all(m.ssnr[:, 20:] < 0.01)  # before the fix: ~5 out to Nyquist
    # the first iteration works at the low-pass of the start, as RELION's (image size 34)
    assert int(hard_run["ours"][1].general["rlnCurrentImageSize"]) == int(
        hard_run["relion"][1].general["rlnCurrentImageSize"]) == 34


def _compare_iterations(run: dict, pmax_tolerance: float) -> None:
    """Resolution within ±25 % of RELION's and coarser than 2× Nyquist, image size within ±25 % (≤ the box),
    ⟨Pmax⟩ within ``pmax_tolerance`` of RELION's, at every iteration."""
    rows = []
    for it in range(1, N_ITER + 1):
        go, gr = run["ours"][it].general, run["relion"][it].general
        res_o, res_r = float(go["rlnCurrentResolution"]), float(gr["rlnCurrentResolution"])
        size_o, size_r = int(go["rlnCurrentImageSize"]), int(gr["rlnCurrentImageSize"])
        pmax_o, pmax_r = float(go["rlnAveragePmax"]), float(gr["rlnAveragePmax"])
        rows.append((it, res_o, res_r, size_o, size_r, round(pmax_o, 3), pmax_r))
    msg = "\n".join(f"it {r[0]}: res {r[1]:.2f}/{r[2]:.2f} Å, size {r[3]}/{r[4]}, Pmax {r[5]}/{r[6]}" for r in rows)
    for it, res_o, res_r, size_o, size_r, pmax_o, pmax_r in rows:
        assert res_o > 2.0 * NYQUIST_A, msg
        assert abs(res_o / res_r - 1.0) <= 0.25 + 1e-6, msg
        assert size_o <= 64 and abs(size_o / size_r - 1.0) <= 0.25, msg
        assert abs(pmax_o - pmax_r) <= pmax_tolerance, msg


def test_resolution_and_pmax_follow_relion(hard_run):
    """Per iteration: resolution within ±25 % of RELION's and never near Nyquist, image size within ±25 % of
    RELION's (well below the box), ⟨Pmax⟩ within 0.2 of RELION's; group scales and noise like RELION's.

    This subset (1,000 particles, 5 classes, each mixing more views than RELION's 10) is not RELION's run: its
    classes are blurrier, and the resolution is the best over 5 classes instead of 10, so it lags RELION's full run
    at the last iterations (measured 20.6 against 16.9 Å and ⟨Pmax⟩ 0.49 against 0.65 at iteration 6; with 600
    particles in 3 classes 22.2 Å, outside ±25 %). The like-for-like checks are ``test_class2d_relion_continue.py``
    and ``test_class2d_relion_plain_continue.py`` (from RELION's own state: resolution and image size equal) and
    ``bench/bench_class2d_hard.py`` (RELION's 2,000 particles and K 10: resolution and image size equal to
    RELION 5's at all 8 iterations, ⟨Pmax⟩ within 0.1)."""
    _compare_iterations(hard_run, pmax_tolerance=0.2)
    last_o, last_r = hard_run["ours"][-1], hard_run["relion"][-1]
    sc = last_o.groups["rlnGroupScaleCorrection"].to_numpy(float)
    assert np.all((sc > 0.9) & (sc < 1.1))  # RELION it008: 0.962–1.052
    # noise spectrum: within 8 % beyond 30 Å (one shell of RELION's is 6 % off its neighbours); below, the
    # residual also holds the structural variety that K_SUB = 5 classes explain less well than RELION's 10
    # (measured: ours up to 16 % higher there)
    s2 = last_o.sigma2_noise[0] / last_r.sigma2_noise[0]
    assert np.all(np.abs(s2[10:-1] - 1.0) < 0.08) and np.all(np.abs(s2[1:10] - 1.0) < 0.2), np.round(s2, 3)


def test_with_relions_offset_prior_pmax_within_issue_tolerance(relion_dir, tmp_path):
    """The same subset with RELION's own offset prior (``--relion_offset_prior``, the posterior width RELION has):
    resolution and image size as above, ⟨Pmax⟩ within the issue's 0.15 of RELION's at every iteration (measured:
    resolution within one shell, 36 → 18 Å against RELION's 36 → 16.9 Å; ⟨Pmax⟩ at most 0.105 apart, 0.545
    against 0.650 at iteration 6)."""
    _compare_iterations(_subset_run(relion_dir, tmp_path, relion_offset_prior=True), pmax_tolerance=0.15)


def test_relion_offset_prior_gives_relions_offset_sigma(relion_dir, tmp_path):
    """``relion_offset_prior`` (RELION's offset prior: rounded old offset in pixels + translation in Å, distance
    scaled by apix² again, taken at the coarse translation for all its children): σ_offset of iterations 1–3 within
    20 % of RELION's on the fixture (4.74 / 4.58 / 4.73 Å); the textbook prior gives 7.9 / 8.3 / 8.4 Å here (7.4–7.8 Å
    on the full fixture). 300 particles, K 2 (σ_offset follows from the prior and the particles' shifts, not from
    K). On this subset the earlier form of the option (fractional offsets, prior at each fine translation) also
    passes; on the full fixture it drifted 4.0 → 3.1 → 2.7 Å (iterations 1–3), the present form 4.4 / 4.2 / 4.3."""
    d = relion_dir / "class2d_hard"
    data = read_particles(d / "particles.star")
    data.particles = data.particles.iloc[:300].copy()
    data.particles["rlnImageName"] = [n.split("@")[0] + "@" + str(d / "particles.mrcs")
                                      for n in data.particles["rlnImageName"]]
    write_particles(tmp_path / "particles.star", data)
    s = Class2DSettings(n_classes=2, n_iter=3, tau2_fudge=2, particle_diameter=150, do_ctf=True, zero_mask=True,
                        psi_step=6, offset_range=5, offset_step=2, do_norm=True, do_scale=True, random_seed=1,
                        relion_offset_prior=True)
    classify_2d(tmp_path / "particles.star", tmp_path / "run", s, root=tmp_path, log=lambda *a: None)
    rows = [(float(read_model_star(tmp_path / f"run_it{it:03d}_model.star").general["rlnSigmaOffsetsAngst"]),
             float(read_model_star(d / f"run_it{it:03d}_model.star").general["rlnSigmaOffsetsAngst"]))
            for it in (1, 2, 3)]
    assert all(abs(o / r - 1.0) <= 0.2 for o, r in rows), [(round(o, 2), r) for o, r in rows]


def test_class_averages_are_clean(hard_run):
    """Fixture README §11 (c), and the issue's "correlate with RELION's after in-plane alignment": no noise texture
    beyond the resolution (power at 12–6 Å over power at 100–20 Å inside a 75 Å disc ≤ 0.005 per class; RELION's
    it008 classes: ≤ 0.0013; a noise-fitting run: ≫ 0.01), and the classes look like projections of the truth and
    like RELION's classes. The projection correlation (20 Å) is measured on RELION's own classes by the
    same code (median 0.96); our subset has 5 classes of ~200 particles after 6 iterations where RELION has 10 after
    8, so each of ours mixes more views: its thresholds are lower here; the full-size run with RELION's K and
    iterations is `bench/bench_class2d_hard.py` (target median ≥ 0.93)."""
    out, d = hard_run["out"], hard_run["fixture"]
    ours = torch.as_tensor(read_mrc(out / f"run_it{N_ITER:03d}_classes.mrcs")[0])
    relion = torch.as_tensor(read_mrc(d / "run_it008_classes.mrcs")[0])
    hf_o, hf_r = high_frequency_power_ratio(ours, 3.0), high_frequency_power_ratio(relion, 3.0)
    assert float(hf_r.max()) < 0.0015  # the measure reproduces the README's numbers for RELION's classes
    assert float(hf_o.max()) <= 0.005, hf_o
    vol = torch.as_tensor(read_mrc(d / "ref_map.mrc")[0])
    cc = best_projection_correlation(ours, 3.0, vol, 3.0, n_projections=500)
    assert float(cc.median()) >= 0.85 and float(cc.min()) >= 0.8, cc
    # each of our classes looks like one of RELION's after in-plane alignment (measured 0.84–0.96, median 0.93; the
    # 0.84 class mixes views that RELION's 10 classes keep apart)
    match = best_match_correlation(ours, 3.0, relion)
    assert float(match.min()) >= 0.8 and float(match.median()) >= 0.9, match


def test_pmax_stays_low_on_pure_noise():
    """200 images of white Gaussian noise (box 64, 3 Å/px, CTF parameters), K 3, ψ step 12°: ⟨Pmax⟩ stays low and
    the resolution stays at the low-resolution start (before the fix: image size 64 = Nyquist at iteration 1,
    ⟨Pmax⟩ 0.75, and 0.4–0.75 in iterations 1–5)."""
    N, n, apix = 200, 64, 3.0
    g = np.random.default_rng(5)
    imgs = g.normal(0.0, 1.0, (N, n, n)).astype(np.float32)
    du = g.uniform(8000, 24000, N)
    ctf = dict(defocus_u=du, defocus_v=du + g.uniform(-500, 500, N), defocus_angle=g.uniform(0, 180, N),
               voltage=np.full(N, 300.0), cs=np.full(N, 2.7), amplitude_contrast=np.full(N, 0.1),
               phase_shift=np.zeros(N), bfactor=np.zeros(N), scale=np.ones(N))
    ps = ParticleSet2D(n, apix, lambda i: imgs[i], ctf, np.zeros(N, np.int64), np.arange(N) // 50)
    s = Class2DSettings(n_classes=3, tau2_fudge=2, particle_diameter=0.7 * n * apix, zero_mask=True, psi_step=12,
                        offset_range=5, offset_step=2, do_norm=True, do_scale=True, random_seed=1, batch_size=100,
                        n_accuracy_particles=20)
    opt = Optimiser2D(ps, s)
    opt.initialise()
    reps = [opt.iterate() for _ in range(5)]
    pmax = [r.ave_pmax for r in reps]
    res = [r.resolution_A for r in reps]
    assert max(pmax) < 0.1, pmax  # measured 0.000 → 0.03 (EM still fits the noise slowly: ~0.1 by iteration 8)
    assert pmax[0] < 0.02, pmax
    assert min(res) >= 30.0, res  # the start is 48 Å (0.07·box shells); shell 5 (minres_map) is 38 Å
    assert max(r.current_size for r in reps) <= 34, [r.current_size for r in reps]


@pytest.fixture(scope="module")
def sim_hard_run(relion_dir, tmp_path_factory):
    """Our own hard set, made to the fixture's recipe with our simulator: 600 projections of the fixture's D2
    tetramer (box 96, 3 Å/px, CTF, SNR 0.05 in a 64 Å disc), **not normalised** (×40 and +0.02, one ±10 % gain
    per micrograph of 67 particles), float16; class2d with RELION's options, K 3, 6 iterations."""
    from cryopipe.sim.particles import SCALE_LABEL, simulate_particles

    out = tmp_path_factory.mktemp("class2d_sim_hard")
    vol, apix = read_mrc(relion_dir / "class2d_hard" / "ref_map.mrc")
    simulate_particles(vol, N_SIM, 3.0, 0.05, out, seed=11, max_shift_A=6.0, defocus_range=(8000.0, 24000.0),
                       signal_radius_px=64.0 / 3.0, dtype="float16", intensity_scale=40.0, intensity_offset=0.02,
                       micrograph_scale_spread=0.1, particles_per_micrograph=67, batch_size=200)
    s = Class2DSettings(n_classes=K_SIM, n_iter=N_ITER, tau2_fudge=2, particle_diameter=150, do_ctf=True,
                        zero_mask=True, psi_step=6, offset_range=5, offset_step=2, do_norm=True, do_scale=True,
                        random_seed=1)
    classify_2d(out / "particles.star", out / "run", s, root=out, log=lambda *a: None)
    truth = read_particles(out / "particles_truth.star").particles
    return dict(out=out, volume=torch.as_tensor(vol), truth=truth, scale_label=SCALE_LABEL,
                models=[read_model_star(out / f"run_it{i:03d}_model.star") for i in range(N_ITER + 1)])


def test_hard_simulated_set_behaves_like_relion_on_the_fixture(sim_hard_run):
    """On our own hard set the run behaves as RELION's does on the fixture (no RELION run of this set exists, so
    the checks are RELION's trajectory on the fixture, §11: the start at 36–41 Å and image size 34, the
    resolution coarser than 2× Nyquist throughout, image size ≤ 64, ⟨Pmax⟩ low at first and rising), clean
    class averages that look like the truth, and norm corrections that follow the per-micrograph gains."""
    models = sim_hard_run["models"]
    res = [float(m.general["rlnCurrentResolution"]) for m in models[1:]]
    size = [int(m.general["rlnCurrentImageSize"]) for m in models[1:]]
    pmax = [float(m.general["rlnAveragePmax"]) for m in models[1:]]
    msg = f"res {np.round(res, 1)}, size {size}, Pmax {np.round(pmax, 3)}"
    assert size[0] == 34 and all(s <= 64 for s in size), msg
    assert min(res) > 2.0 * NYQUIST_A, msg
    assert pmax[0] < 0.15 and pmax[-1] > pmax[0], msg
    out = sim_hard_run["out"]
    ours = torch.as_tensor(read_mrc(out / f"run_it{N_ITER:03d}_classes.mrcs")[0])
    assert float(high_frequency_power_ratio(ours, 3.0).max()) <= 0.005
    cc = best_projection_correlation(ours, 3.0, sim_hard_run["volume"], 3.0, n_projections=500)
    assert float(cc.median()) >= 0.85, cc
    # a gain multiplies signal and noise alike, so the per-image norm correction absorbs it (as RELION's does:
    # rlnNormCorrection ∝ the image's scale) and the group scale corrections (signal relative to noise) stay ~1
    truth = sim_hard_run["truth"]
    gain = truth.groupby("rlnMicrographName")[sim_hard_run["scale_label"]].first()
    data = read_particles(out / f"run_it{N_ITER:03d}_data.star").particles
    norm = data.groupby("rlnMicrographName")["rlnNormCorrection"].mean()
    assert len(gain) == len(norm) == 9
    r = float(np.corrcoef(gain.to_numpy(float), norm[gain.index].to_numpy(float))[0, 1])
    assert r > 0.9, (r, gain.round(3).tolist(), norm[gain.index].round(3).tolist())
    sc = models[-1].groups["rlnGroupScaleCorrection"].to_numpy(float)
    assert np.all((sc > 0.9) & (sc < 1.1)), sc
