"""Multi-particle refinement groups after the first ones (issue 13, item 3): poses over dose (temporal samples),
anisotropic magnification, odd and even Zernike aberrations. Each is recovered on the small simulated tilt series
of test_mpr (12 particles of 3ENL at 6 Å, 21 tilts), refining the group alone against half-maps of the true
metadata. Magnification and trefoil are put into the *images* (resampled / phase-filtered as the microscope would
record them), so the model's convention is tested too; the 4th-order terms and the trajectories over dose are put
into the *metadata* of the true tilt series (the images stay those of the truth), which tests that the group is
seen and refined, not the sign convention (that is test_mpr_conventions' job: the even terms against a change
of Cs in the images, the magnification's M·k against resampled images)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_mpr import BOX, sim  # noqa: F401  (the module-scoped simulated tilt series)

from cryopipe.core.ctf import beam_tilt_phase, beam_tilt_zernike, zernike_phase
from cryopipe.errors import CryopipeError
from cryopipe.io.tomo_particles import read_tomo_particles
from cryopipe.io.tomography import read_tomograms, write_tomograms
from cryopipe.mpr.driver import (MprOptions, Stage, make_species, prepare_tilt_series, run_mpr, species_mask,
                                 trajectory_tables, updated_tomograms)
from cryopipe.mpr.forward import bake, make_band, zero_parameters
from cryopipe.mpr.optimise import pair_centres, refine_tilt_series, score_and_gradient, tilt_series_score
from cryopipe.mpr.parameters import (MAG_UNIT, dose_sample_weights, even_from_fourth_order,
                                     odd_from_trefoil)
from cryopipe.tomo.particle_sets import particles_per_tilt_series

LIMIT_A = 14.0


@pytest.fixture(scope="module")
def truth(sim):  # noqa: F811
    """The true tilt series (images + true metadata), the species of the true half-maps and its band."""
    here = sim["dir"]
    tomos = read_tomograms(here / "sim/truth/tomograms.star")
    g = next(particles_per_tilt_series(read_tomo_particles(here / "sim/truth/particles.star", tomos), tomos))
    data = prepare_tilt_series(g.tilt_series, g.positions_px, g.orientations, g.half_sets, BOX, 1.0)
    species = make_species(sim["true_half1"], sim["true_half2"],
                           species_mask(None, BOX, sim["apix"], 120.0, LIMIT_A), 1.0)
    return {"data": data, "species": species, "k_max": BOX * sim["apix"] / LIMIT_A, "tomos": tomos,
            "group": g}


def _refine(truth, data, groups, iterations=12):
    """Refine ``groups`` of ``data`` (from zero corrections) against the true species; the corrections found."""
    params = zero_parameters(data)
    refine_tilt_series(data, truth["species"], params, groups, truth["k_max"], lbfgs_iterations=iterations)
    return params


def test_zernike_and_beam_tilt_conventions():
    """RELION's odd coefficients of a beam tilt (beam_tilt_zernike) give exactly beam_tilt_phase; the trefoil and
    4th-order coefficients (odd_from_trefoil, even_from_fourth_order) give the pure ρ³·cos/sin 3φ and ρ⁴·… terms
    in ZERNIKE_UNIT_A units (1 rad at 0.1 Å⁻¹)."""
    gen = torch.Generator().manual_seed(0)
    kx, ky = (0.1 * torch.randn(200, generator=gen, dtype=torch.float64) for _ in range(2))
    bt = torch.tensor([0.7, -0.3], dtype=torch.float64)
    odd = beam_tilt_zernike(bt[0], bt[1], 300.0, 2.7)
    assert torch.allclose(zernike_phase(kx, ky, odd, odd=True), beam_tilt_phase(kx, ky, bt[0], bt[1], 300.0, 2.7),
                          rtol=1e-12, atol=1e-14)
    rho, phi = torch.sqrt(kx * kx + ky * ky) / 0.1, torch.atan2(ky, kx)
    t = torch.tensor([0.4, -0.9], dtype=torch.float64)
    assert torch.allclose(zernike_phase(kx, ky, odd_from_trefoil(t), odd=True),
                          rho ** 3 * (t[0] * torch.sin(3 * phi) + t[1] * torch.cos(3 * phi)), atol=1e-12)
    e = torch.tensor([0.3, -0.2, 0.5, 0.7, -1.1], dtype=torch.float64)
    want = rho ** 4 * (e[0] * torch.sin(4 * phi) + e[1] * torch.sin(2 * phi) + e[2] + e[3] * torch.cos(2 * phi)
                       + e[4] * torch.cos(4 * phi))
    assert torch.allclose(zernike_phase(kx, ky, even_from_fourth_order(e), odd=False), want, atol=1e-12)
    w = dose_sample_weights(torch.tensor([0.0, 30.0, 10.0, 20.0]), 3)
    assert torch.allclose(w, torch.tensor([[1, 0, 0], [0, 0, 1], [1 / 3, 2 / 3, 0], [0, 2 / 3, 1 / 3]],
                                          dtype=torch.float64))


def test_new_groups_gradient_matches_finite_differences(sim):  # noqa: F811
    """Autograd gradient (batches of 7 pairs) of −NCC·P equals central differences for the trajectories (2 samples),
    the magnification matrix, the trefoil and the 4th-order terms, at a random non-zero point (float64)."""
    data = sim["data"]
    S = 2
    data = replace(data, pairs=data.pairs[::6], trajectory_angles=torch.zeros(len(data.positions), S, 3,
                                                                             dtype=torch.float64),
                   trajectory_shifts=torch.zeros(len(data.positions), S, 3, dtype=torch.float64))
    species = make_species(sim["half1"], sim["half2"], species_mask(None, BOX, sim["apix"], 120.0, 12.0), 1.0,
                           dtype=torch.float64)
    band = make_band(data, species, k_max=BOX * sim["apix"] / 14.0)
    centres = pair_centres(data)
    gen = torch.Generator().manual_seed(2)
    params = zero_parameters(data)
    for t in params.__dict__.values():
        t.copy_(0.3 * torch.randn(t.shape, generator=gen, dtype=torch.float64))
    groups = ("temporalposes", "magnification", "oddzernike", "evenzernike")
    tensors = params.for_groups(groups)
    assert len(tensors) == 6  # trajectory angles, shifts, magnification, beam tilt, trefoil, 4th order
    score_and_gradient(data, species, band, params, groups, centres, batch_pairs=7)
    n_pairs, h, checked = len(data.pairs), 1e-4, 0
    for t in tensors:
        grad, flat = t.grad.clone().view(-1), t.detach().view(-1)
        for i in torch.randperm(flat.numel(), generator=gen)[:3].tolist():
            if abs(float(grad[i])) < 1e-6:
                continue
            old = float(flat[i])
            flat[i] = old + h
            up = tilt_series_score(data, species, band, params, groups, centres, 1000)
            flat[i] = old - h
            down = tilt_series_score(data, species, band, params, groups, centres, 1000)
            flat[i] = old
            fd = -n_pairs * (up - down) / (2 * h) / 100
            assert abs(fd - float(grad[i])) <= 2e-3 * abs(fd) + 1e-5, (t.shape, i, fd, float(grad[i]))
            checked += 1
    assert checked >= 12


def _magnified(images: torch.Tensor, M: torch.Tensor, upsample: int = 4) -> torch.Tensor:
    """Tilt images seen through the magnification ``M`` (RELION's convention): ``obs(x) = img(c + M⁻ᵀ·(x − c))``
    about the image centre ``c = (W//2, H//2)``, so that ``FT(obs)(k) ∝ FT(img)(M·k)``. Resampled accurately: the
    images are Fourier-padded ``upsample``× (sinc interpolation), resampled bilinearly there, and Fourier-cropped
    back (plain bilinear resampling would blur the CTF rings near Nyquist that carry the frequency signal)."""
    F, H, W = images.shape
    Hu, Wu = H * upsample, W * upsample
    spectrum = torch.fft.fftshift(torch.fft.rfft2(images.double()), dim=-2)
    big = torch.zeros(F, Hu, Wu // 2 + 1, dtype=spectrum.dtype)
    big[:, Hu // 2 - H // 2:Hu // 2 - H // 2 + H, :W // 2 + 1] = spectrum
    fine = torch.fft.irfft2(torch.fft.ifftshift(big, dim=-2), s=(Hu, Wu)) * upsample ** 2
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    d = torch.stack([x - W // 2, y - H // 2], -1) @ torch.linalg.inv(M.T).T  # rows: M⁻ᵀ·(x − c)
    u = (d + torch.tensor([W // 2, H // 2], dtype=torch.float64)) * upsample  # fine-grid pixels
    grid = torch.stack([2 * u[..., 0] / (Wu - 1) - 1, 2 * u[..., 1] / (Hu - 1) - 1], -1)
    return torch.nn.functional.grid_sample(fine[:, None], grid.expand(F, H, W, 2), align_corners=True)[:, 0].float()


def _aberrated(images: torch.Tensor, odd: torch.Tensor, pixel_size: float) -> torch.Tensor:
    """Tilt images whose FT is multiplied by ``exp(i·φ)``, ``φ`` the odd Zernike phase of RELION coefficients
    ``odd`` at the images' own frequencies (Å⁻¹): what a microscope with that aberration records."""
    F, H, W = images.shape
    ky = torch.fft.fftfreq(H, d=pixel_size, dtype=torch.float64)[:, None].expand(H, W // 2 + 1)
    kx = torch.fft.rfftfreq(W, d=pixel_size, dtype=torch.float64)[None, :].expand(H, W // 2 + 1)
    phase = zernike_phase(kx, ky, odd, odd=True)
    spectrum = torch.fft.rfft2(images.double()) * torch.polar(torch.ones_like(phase), phase)
    return torch.fft.irfft2(spectrum, s=(H, W)).float()


def test_magnification_recovered(truth):
    """Tilt images resampled through an anisotropic magnification ``M = I + E`` (|E| ≈ 2 %, RELION's convention:
    :func:`_magnified`) with metadata that know nothing of it: refining ``magnification`` alone finds ``M`` within
    10 % of ``E`` (Frobenius norm). (A model that moved positions by ``M`` instead of ``Mᵀ`` fails this test.)"""
    E = torch.tensor([[0.015, 0.008], [-0.006, -0.012]], dtype=torch.float64)
    data = truth["data"]
    data = replace(data, images=_magnified(data.images, torch.eye(2, dtype=torch.float64) + E))
    params = _refine(truth, data, ("magnification",))
    residual = MAG_UNIT * params.magnification - E
    print("magnification residual", residual.tolist(), "of", E.tolist())
    assert float(residual.norm()) < 0.1 * float(E.norm()), (residual, E)


def test_trefoil_recovered(truth):
    """Tilt images with a trefoil aberration (their FT times ``exp(i·φ)``, ``φ`` = RELION's Z₃^∓3 of 1.5 and −1.0
    units: 0.55 / 0.36 rad at 14 Å; :func:`_aberrated`) and metadata without it: refining ``oddzernike`` (beam tilt
    + trefoil) finds the trefoil within 20 % of it. The beam tilt refined with it is not checked: at 14 Å a 1 mrad
    tilt changes the phase by only ~0.02 rad, so it is unconstrained here."""
    t0 = torch.tensor([1.5, -1.0], dtype=torch.float64)
    data = truth["data"]
    data = replace(data, images=_aberrated(data.images, odd_from_trefoil(t0), data.pixel_size))
    params = _refine(truth, data, ("oddzernike",))
    residual = params.trefoil - t0
    print("trefoil residual", residual.tolist(), "beam tilt", params.beam_tilt.tolist())
    assert float(residual.norm()) < 0.2 * float(t0.norm()), (residual, t0)


def test_fourth_order_recovered(truth):
    """Metadata with 4th-order symmetric aberrations (rlnEvenZernike of ρ⁴·(sin 4φ, sin 2φ, 1, cos 2φ, cos 4φ) =
    (1, −1.5, 2, 1, −1) units; up to ~1 rad at 14 Å): refining ``evenzernike`` brings them back within 25 % of the
    injected error (norm; seen: 12 %)."""
    e0 = torch.tensor([1.0, -1.5, 2.0, 1.0, -1.0], dtype=torch.float64)
    data = replace(truth["data"], even_zernike=even_from_fourth_order(e0))
    params = _refine(truth, data, ("evenzernike",))
    residual = e0 + params.fourth_order
    print("4th-order residual", residual.tolist())
    assert float(residual.norm()) < 0.25 * float(e0.norm()), (residual, e0)


def test_poses_over_dose_recovered(truth):
    """Metadata whose particles carry a wrong trajectory over dose (2 temporal samples: ±δ in position, sd 4 Å per
    axis, and ±ω in angle, sd 3°, between the lowest and highest dose): refining ``temporalposes`` alone finds the
    opposite trajectory — the RMS residual of the positions in x/y (z is poorly seen in ±60° tilts) falls below
    25 % of the injected one (seen: 3.95 -> 0.37 Å) and of the angles below 50 % (seen: 3.03 -> 0.87°)."""
    data = truth["data"]
    N = len(data.positions)
    gen = torch.Generator().manual_seed(7)
    d = 4.0 * torch.randn(N, 3, generator=gen, dtype=torch.float64)
    w = 3.0 * torch.randn(N, 3, generator=gen, dtype=torch.float64)
    data = replace(data, trajectory_shifts=torch.stack([d, -d], 1), trajectory_angles=torch.stack([w, -w], 1))
    params = _refine(truth, data, ("temporalposes",), iterations=15)
    p = bake(data, params, ("temporalposes",))
    rms = lambda x: float(torch.sqrt((x ** 2).mean()))  # noqa: E731
    before_xy, after_xy = rms(data.trajectory_shifts[..., :2]), rms(p.trajectory_shifts[..., :2])
    before_a, after_a = rms(data.trajectory_angles), rms(p.trajectory_angles)
    print(f"trajectory xy {before_xy:.2f} -> {after_xy:.2f} Å, angles {before_a:.2f} -> {after_a:.2f} deg")
    assert after_xy < 0.25 * before_xy and after_a < 0.5 * before_a


def test_one_pose_sample_is_todays_poses(sim):  # noqa: F811
    """The poses group with ``pose_samples`` 1 (today's model) and with 2 samples whose trajectories are not refined
    (all zero) give bit-identical refined positions and orientations: the trajectory machinery adds exactly
    nothing until its group is refined; ``temporalposes`` with one sample is refused."""
    runs = []
    for samples in (1, 2):
        opts = MprOptions(stages=[Stage(("poses",), 1)], resolution_A=LIMIT_A, lbfgs_iterations=3, reconstruct=False,
                          pose_samples=samples)
        res = run_mpr(sim["parts"], sim["tomos"], sim["half1"], sim["half2"], sim["apix"], None, 120.0, opts,
                      log=lambda m: None)
        runs.append(res.data["TS_01"])
    assert runs[0].trajectory_angles is None and runs[1].trajectory_angles.shape[1] == 2
    assert torch.equal(runs[0].positions, runs[1].positions)
    assert torch.equal(runs[0].orientations, runs[1].orientations)
    assert float((runs[0].positions - sim["data"].positions).abs().max()) > 1e-3  # it did refine
    with pytest.raises(CryopipeError, match="pose_samples"):
        run_mpr(sim["parts"], sim["tomos"], sim["half1"], sim["half2"], sim["apix"], None, 120.0,
                MprOptions(stages=[Stage(("temporalposes",), 1)]), log=lambda m: None)


def test_zernike_groups_refused_on_low_resolution_species(sim):  # noqa: F811
    """oddzernike and evenzernike are CTF groups: refused (one-line error) on the ~20 Å species with
    --ctf_minresolution 8, like ctf."""
    for group in ("oddzernike", "evenzernike"):
        with pytest.raises(CryopipeError, match="ctf_minresolution"):
            run_mpr(sim["parts"], sim["tomos"], sim["half1"], sim["half2"], sim["apix"], None, 120.0,
                    MprOptions(stages=[Stage(("poses", group), 1)], ctf_minresolution=8.0), log=lambda m: None)


def test_optics_and_trajectories_written_as_relion_reads_them(sim, truth, tmp_path):  # noqa: F811
    """A tilt series with a magnification matrix, a beam tilt, odd and even coefficients written by
    updated_tomograms + write_tomograms reads back (prepare_tilt_series) with the same rlnMagMat and
    rlnEvenZernike, the beam tilt folded into rlnOddZernike as RELION does, and the same forward-model score; the
    particles' optics table (where RELION 5's tomography programs read them) gets the same values and reads back
    from particles.star (particle_optics_metadata); the trajectory table has one row per particle and 3 × 2 × S
    columns."""
    from cryopipe.io.star import read_star, write_star

    data = truth["data"]
    S = 2
    traj = torch.randn(len(data.positions), S, 3, dtype=torch.float64)
    data = replace(data, mag_matrix=torch.tensor([[1.01, 0.002], [-0.003, 0.995]], dtype=torch.float64),
                   beam_tilt=torch.tensor([[0.8, -0.4]], dtype=torch.float64),
                   odd_zernike=odd_from_trefoil(torch.tensor([0.5, 0.2], dtype=torch.float64)),
                   even_zernike=even_from_fourth_order(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)),
                   trajectory_angles=traj - traj.mean(1, keepdim=True), trajectory_shifts=traj - traj.mean(1, keepdim=True))
    tomos = truth["tomos"]
    write_tomograms(tmp_path / "tomograms.star", updated_tomograms(tomos, {"TS_01": data}), tmp_path / "ts")
    back_tomos = read_tomograms(tmp_path / "tomograms.star")
    glob = read_star(tmp_path / "tomograms.star")["global"]
    assert {"rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11", "rlnOddZernike", "rlnEvenZernike"} <= set(
        glob.columns)
    g = truth["group"]
    back = prepare_tilt_series(back_tomos["TS_01"], g.positions_px, g.orientations, g.half_sets, BOX, 1.0)
    assert torch.allclose(back.mag_matrix, data.mag_matrix, atol=1e-8)
    assert torch.allclose(back.even_zernike, data.even_zernike, rtol=1e-8)
    expected_odd = data.odd_zernike + beam_tilt_zernike(0.8, -0.4, data.voltage, data.cs)
    assert torch.allclose(back.odd_zernike, expected_odd, rtol=1e-8, atol=1e-12) and back.beam_tilt is None
    species, k_max = truth["species"], truth["k_max"]
    band = make_band(data, species, k_max)
    scores = [tilt_series_score(d, species, band, zero_parameters(d), (), pair_centres(d))
              for d in (replace(data, trajectory_angles=None, trajectory_shifts=None), back)]
    assert abs(scores[0] - scores[1]) < 1e-6 * abs(scores[0]), scores
    from cryopipe.mpr.driver import MAG_LABELS, parse_vector, updated_particles

    from cryopipe.io.tomo_particles import write_tomo_particles
    from cryopipe.mpr.driver import particle_optics_metadata

    parts = read_tomo_particles(sim["dir"] / "sim/truth/particles.star", tomos)
    updated = updated_particles(parts, tomos, {"TS_01": data})
    optics = updated.optics
    write_tomo_particles(tmp_path / "particles.star", updated)
    again = read_tomo_particles(tmp_path / "particles.star", tomos)
    meta = particle_optics_metadata(again, np.arange(len(again.particles)))  # what run_mpr reads when tomograms
    assert torch.allclose(meta["mag_matrix"], data.mag_matrix) and torch.allclose(meta["odd_zernike"], expected_odd)
    assert np.allclose(optics[list(MAG_LABELS)].to_numpy(float)[0], data.mag_matrix.reshape(-1).numpy())
    assert np.allclose(parse_vector(optics["rlnOddZernike"].iloc[0], "odd", "t"), expected_odd.numpy())
    assert np.allclose(parse_vector(optics["rlnEvenZernike"].iloc[0], "even", "t"), data.even_zernike.numpy())
    tables = trajectory_tables({"TS_01": data})
    write_star(tmp_path / "traj.star", tables, version=50001)
    t = read_star(tmp_path / "traj.star")["TS_01"]
    assert len(t) == len(data.positions) and len(t.columns) == 3 * 2 * S
    assert np.allclose(t["cryopipeTrajectoryDX2"].to_numpy(float), data.trajectory_shifts[:, 1, 0].numpy())


def test_command_writes_trajectories_and_optics(sim, tmp_path):  # noqa: F811
    """`cryopipe mpr --stage poses,temporalposes,magnification --pose_samples 2`: pose_trajectories.star (one table
    per tilt series, 2 samples), tomograms.star with rlnMagMat00..11 / rlnOddZernike / rlnEvenZernike, and a
    temporalposes stage without --pose_samples refused with one line and no outputs."""
    from cryopipe.cli import main as cli_main
    from cryopipe.io.mrc import write_mrc
    from cryopipe.io.star import read_star

    here = sim["dir"]
    write_mrc(tmp_path / "h1.mrc", sim["half1"].numpy(), sim["apix"])
    write_mrc(tmp_path / "h2.mrc", sim["half2"].numpy(), sim["apix"])
    common = ["mpr", "--i", str(here / "sim/particles.star"), "--tomograms", str(here / "sim/tomograms.star"),
              "--half1", str(tmp_path / "h1.mrc"), "--half2", str(tmp_path / "h2.mrc"), "--diameter", "120",
              "--iter", "1", "--lbfgs_iter", "2", "--resolution", "14"]
    assert cli_main(common + ["--o", str(tmp_path / "no"), "--stage", "poses,temporalposes"]) == 1
    assert not (tmp_path / "no" / "particles.star").exists()
    assert cli_main(common + ["--o", str(tmp_path / "run"), "--stage", "poses,temporalposes,magnification",
                              "--pose_samples", "2"]) == 0
    traj = read_star(tmp_path / "run" / "pose_trajectories.star")
    assert int(traj["general"]["cryopipePoseSamples"]) == 2 and len(traj["TS_01"]) == len(sim["data"].positions)
    glob = read_star(tmp_path / "run" / "tomograms.star")["global"]
    mag = glob[["rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11"]].to_numpy(float)[0]
    assert np.abs(mag - [1, 0, 0, 1]).max() > 0 and np.abs(mag - [1, 0, 0, 1]).max() < 0.05, mag
    assert str(glob["rlnOddZernike"].iloc[0]).startswith("[")
