"""Tilt-series simulator: the forward model reproduces RELION-consistent fixture tilt series; simulated series put
particles where core.tilt_geometry projects them; lattices, SNR, injected errors and the CLI's files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.core.geometry import angular_distance, euler_to_matrix
from cryopipe.core.projector import Projector
from cryopipe.io.mrc import mrc_info, read_mrc
from cryopipe.io.tomography import read_tomograms
from cryopipe.io.tomo_particles import read_optimisation_set, read_tomo_particles
from cryopipe.sim.tiltseries import Perturbations, place_tomogram_particles, simulate_tilt_series
from cryopipe.sim.tiltseries_forward import TiltOptics, render_particle_boxes, render_tilt_series
from cryopipe.sim.tiltseries_geometry import tilt_scheme, warp_displacement_px

FIXTURE_TILTS = [0, 10, 19, 20, 21, 30, 40]  # file rows: −60°, −30°, −3°, 0° (dose 0), +3°, +30°, +60°


def _nyquist_disc(images: np.ndarray) -> np.ndarray:
    """Images restricted to frequencies inside the Nyquist circle (drops the corners of the square spectrum)."""
    H, W = images.shape[-2:]
    keep = (np.fft.rfftfreq(W)[None, :] ** 2 + np.fft.fftfreq(H)[:, None] ** 2) < 0.25 * 0.97
    return np.fft.irfft2(np.fft.rfft2(images) * keep, s=(H, W))


def _cc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


_PROJECTORS: dict = {}


def _fixture_projector(d, padded: bool) -> Projector:
    """The fixture's recipe (map zero-padded to the 128 render box, 2x oversampled) or the map's own box."""
    if padded not in _PROJECTORS:
        vol = read_mrc(d / "truth" / "truth_map.mrc")[0]
        if padded:
            vol = np.pad(vol, 32)
        _PROJECTORS[padded] = Projector(torch.from_numpy(np.ascontiguousarray(vol)), pad=2)
    return _PROJECTORS[padded]


def _render_fixture(d, name: str, tilts, hand_sign: float = 1.0, padded: bool = True):
    tomos = read_tomograms(d / "tomograms.star")
    ts = tomos[name]
    parts = read_tomo_particles(d / "particles.star", tomos)
    rows = parts.tomo_names == name
    optics = TiltOptics(ts.pixel_size, ts.voltage, ts.cs, ts.amplitude_contrast, hand_sign * ts.hand)
    out = render_tilt_series(
        _fixture_projector(d, padded), ts.projection_matrices()[tilts],
        torch.as_tensor(parts.positions_px(tomos)[rows]), torch.as_tensor(parts.orientations()[rows]),
        torch.as_tensor(ts.defocus()[tilts]), torch.as_tensor(ts.pre_exposure()[tilts]), ts.image_size, optics,
        box=128)
    return out.numpy(), ts.read_images(tilts)


@pytest.mark.parametrize("name", ["TS_01", "TS_02"])
def test_forward_model_reproduces_fixture_tilt_series(relion_tomo_dir, name):
    ours, relion = _render_fixture(relion_tomo_dir, name, FIXTURE_TILTS)
    cc = _cc(ours, relion)
    print(name, np.round(cc, 5))
    assert cc.min() >= 0.99
    # the whole residual lies in the corners of the square spectrum beyond Nyquist (our slices stop at the
    # Nyquist circle); inside it the images agree to float16 precision
    cc_disc = _cc(_nyquist_disc(ours), _nyquist_disc(relion))
    print(name, "inside Nyquist", np.round(cc_disc, 7))
    assert cc_disc.min() >= 0.99999
    scale = (ours * relion).sum() / (ours * ours).sum()
    assert abs(scale - 1) < 2e-3


def test_forward_model_with_map_box_slices(relion_tomo_dir):
    """Default path: slices at the map's box (64), zero-padded to the render box in real space (cheaper)."""
    ours, relion = _render_fixture(relion_tomo_dir, "TS_01", FIXTURE_TILTS, padded=False)
    assert _cc(ours, relion).min() >= 0.99
    assert _cc(_nyquist_disc(ours), _nyquist_disc(relion)).min() >= 0.9998


def test_fixture_rejects_wrong_hand(relion_tomo_dir):
    ours, relion = _render_fixture(relion_tomo_dir, "TS_01", [0, 40], hand_sign=-1.0)
    assert _cc(_nyquist_disc(ours), _nyquist_disc(relion)).min() < 0.99999


def test_dose_symmetric_scheme_matches_fixture(relion_tomo_dir):
    tomos = read_tomograms(relion_tomo_dir / "tomograms.star")
    angles, pre = tilt_scheme(-60, 60, 3, "dose-symmetric", 3.0)
    np.testing.assert_allclose(angles, tomos["TS_01"].tilts["rlnTomoNominalStageTiltAngle"].to_numpy())
    np.testing.assert_allclose(pre, tomos["TS_01"].pre_exposure())
    angles, pre = tilt_scheme(-6, 6, 3, "bidirectional", 2.0)
    np.testing.assert_allclose(pre, [8, 6, 0, 2, 4])


# ------------------------------------------------------------------------------------------------ simulations


@pytest.fixture(scope="module")
def small_map():
    from cryopipe.jobs.simulate import build_volume

    return build_volume("3enl", None, 6.0)  # 24³ at 6 Å


def _simulate(tmp_path, small_map, **kw):
    vol, apix = small_map
    args = dict(n_tomograms=1, particles_per_tomogram=4, image_size=(192, 160), thickness_A=400.0,
                tilt_range=(-40.0, 40.0), tilt_step=20.0, snr=float("inf"), keep_images=True, device="cpu",
                defocus_range=(20000.0, 30000.0))
    args.update(kw)
    return simulate_tilt_series(vol, apix, tmp_path / "sim", **args)


def _correlation_peak(image: np.ndarray, template: np.ndarray, step: float = 0.01) -> np.ndarray:
    """(x, y) shift maximising the cross-correlation of ``image`` with ``template`` (same shape, template centred
    at index 0): integer peak, then the band-limited correlation evaluated on a ±0.5 px grid of ``step``."""
    H, W = image.shape
    spec = np.fft.fft2(image) * np.conj(np.fft.fft2(template))
    cc = np.fft.ifft2(spec).real
    y0, x0 = np.unravel_index(np.argmax(cc), cc.shape)
    ky, kx = np.fft.fftfreq(H), np.fft.fftfreq(W)
    grid = np.arange(-0.5, 0.5 + step / 2, step)
    ex = np.exp(2j * np.pi * kx[:, None] * (x0 + grid)[None, :])  # [W, G]
    ey = np.exp(2j * np.pi * ky[:, None] * (y0 + grid)[None, :])  # [H, G]
    local = (ey.T @ spec @ ex).real  # [G (y), G (x)]
    iy, ix = np.unravel_index(np.argmax(local), local.shape)
    return np.array([x0 + grid[ix], y0 + grid[iy]])


def test_footprints_sit_at_projected_positions(tmp_path, small_map, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a tomogram smaller than the images keeps every footprint inside them
    sim = _simulate(tmp_path, small_map, particles_per_tomogram=3, hand=1.0, tomogram_size=(150, 124, 66),
                    perturbations=Perturbations(warp_A=6.0))
    # geometry from the written truth files alone
    tomos = read_tomograms(sim.truth_tomograms_star)
    ts = tomos["TS_01"]
    parts = read_tomo_particles(sim.truth_particles_star, tomos)
    P = ts.projection_matrices()
    pos = torch.as_tensor(parts.positions_px(tomos))
    A = torch.as_tensor(parts.orientations())
    images = ts.read_images()
    np.testing.assert_allclose(images, sim.truth["TS_01"].clean_images, atol=1e-6)
    q = torch.einsum("fij,nj->nfi", P[:, :3, :3], pos) + P[:, :3, 3]
    # the image warp recorded in the truth tilt table moves each footprint by the field at its centre
    warp = np.stack([ts.tilts[[f"cryopipeWarp{a}{k}" for k in range(1, 4)]].to_numpy() for a in "XY"], axis=1)
    shift = warp_displacement_px(warp, q[..., :2], ts.image_size, ts.pixel_size)
    assert shift.abs().max() > 0.3
    q[..., :2] += shift
    optics = TiltOptics(ts.pixel_size, ts.voltage, ts.cs, ts.amplitude_contrast, ts.hand)
    projector = Projector(torch.as_tensor(small_map[0]), pad=2)
    box = sim.render_box
    from cryopipe.core.tilt_geometry import depth_defocus, dose_weights

    reach = sim.particle_radius_px + 8.0  # particle radius + CTF delocalisation (6 Å px, ≤ 3 µm defocus)
    checked = 0
    for f in (0, 2, 4):
        du, dv = depth_defocus(ts.defocus()[f:f + 1, 0], ts.defocus()[f:f + 1, 1], q[:, f:f + 1, 2], ts.hand,
                               ts.pixel_size)
        for n in range(len(pos)):
            others = np.delete(q[:, f, :2].numpy(), n, axis=0)
            if len(others) and np.linalg.norm(others - q[n, f, :2].numpy(), axis=1).min() < 2 * reach:
                continue  # an overlapping neighbour would bias the correlation peak
            checked += 1
            template = render_particle_boxes(
                projector, (P[f, :3, :3] @ A[n])[None], du[n], dv[n], torch.as_tensor(ts.defocus()[f:f + 1, 2]),
                dose_weights(box, ts.pixel_size, ts.pre_exposure()[f:f + 1]), torch.zeros(1, 2), box, optics)[0]
            # cross-correlate the tilt image with the centred template (template centre at box//2)
            W, H = ts.image_size
            big = np.zeros((H, W))
            big[:box, :box] = template.numpy()
            big = np.roll(big, (-(box // 2), -(box // 2)), axis=(0, 1))
            found = _correlation_peak(images[f].astype(np.float64), big)
            np.testing.assert_allclose(found, q[n, f, :2].numpy(), atol=0.02)
    assert checked >= 6


def test_lattice_orientations_are_surface_normals():
    rng = np.random.default_rng(1)
    size = (400, 400, 200)
    pos, A, A_sub = place_tomogram_particles(500, "sphere", size, 200.0, 8.0, rng)
    assert len(pos) > 50
    normal = (pos - np.array(size) / 2) / np.linalg.norm(pos - np.array(size) / 2, axis=1, keepdims=True)
    np.testing.assert_allclose(A[:, :, 2], normal, atol=1e-9)  # the particle's z axis = outward normal
    prior = euler_to_matrix(0.0, 90.0, 0.0).numpy()
    np.testing.assert_allclose((A_sub @ prior)[:, :, 2], normal, atol=1e-9)  # RELION's picker convention
    spins = np.degrees(np.arctan2(A[:, 1, 0], A[:, 0, 0]))
    assert np.std(spins) > 60  # in-plane angles are random
    pos, A, _ = place_tomogram_particles(500, "cylinder", size, 200.0, 8.0, rng)
    axis = np.cross(A[0, :, 2], A[1, :, 2]) if abs(A[0, :, 2] @ A[1, :, 2]) < 0.99 else None
    rel = pos - np.array(size) / 2
    radial = rel - (rel @ _cylinder_axis(A)) [:, None] * _cylinder_axis(A)
    np.testing.assert_allclose(np.linalg.norm(radial, axis=1), 100.0 - 8.0, rtol=1e-9)
    np.testing.assert_allclose(A[:, :, 2], radial / np.linalg.norm(radial, axis=1, keepdims=True), atol=1e-9)
    del axis


def _cylinder_axis(A: np.ndarray) -> np.ndarray:
    """The direction orthogonal to all normals (smallest singular vector)."""
    return np.linalg.svd(A[:, :, 2])[2][-1]


def test_snr_is_measured_as_requested(tmp_path, small_map, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sim = _simulate(tmp_path, small_map, particles_per_tomogram=6, snr=0.5, image_size=(256, 224))
    truth = sim.truth["TS_01"]
    f0 = int(np.argmin(np.abs(sim.tilts_truth["TS_01"]["rlnTomoNominalStageTiltAngle"].to_numpy())))
    clean, noisy = truth.clean_images, truth.images
    noise_var = (noisy - clean).var()
    q = np.einsum("ij,nj->ni", truth.P[f0, :2, :3], truth.positions_px) + truth.P[f0, :2, 3]
    r = sim.particle_radius_px
    yy, xx = np.mgrid[:clean.shape[1], :clean.shape[2]]
    variances = [clean[f0][(xx - round(x)) ** 2 + (yy - round(y)) ** 2 <= r * r].var() for x, y in q]
    assert np.mean(variances) / noise_var == pytest.approx(0.5, rel=0.05)
    assert noise_var == pytest.approx(truth.noise_sigma ** 2, rel=0.05)


def test_perturbations_recorded_between_truth_and_main(tmp_path, small_map, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pert = Perturbations(tilt_shift_A=4.0, tilt_angle_deg=0.5, defocus_A=300.0, warp_A=5.0,
                         particle_shift_A=6.0, particle_angle_deg=3.0)
    sim = _simulate(tmp_path, small_map, perturbations=pert, tilt_step=5.0, particles_per_tomogram=8)
    truth = read_tomograms(sim.truth_tomograms_star)["TS_01"].tilts
    main = read_tomograms(sim.tomograms_star)["TS_01"].tilts
    F = len(truth)
    assert F == 17
    for labels, sd in ((["rlnTomoXShiftAngst", "rlnTomoYShiftAngst"], 4.0),
                       (["rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot"], 0.5), (["rlnDefocusU"], 300.0)):
        diff = (main[labels] - truth[labels]).to_numpy()
        assert 0.5 * sd < diff.std() < 1.6 * sd
    np.testing.assert_allclose(main["rlnDefocusU"] - truth["rlnDefocusU"], main["rlnDefocusV"] - truth["rlnDefocusV"])
    assert (main["rlnMicrographPreExposure"] == truth["rlnMicrographPreExposure"]).all()
    assert (main["rlnMicrographName"] == truth["rlnMicrographName"]).all()  # the same images
    warp = truth[[c for c in truth.columns if c.startswith("cryopipeWarp")]].to_numpy()
    assert warp.shape == (F, 6) and not any(c.startswith("cryopipe") for c in main.columns)
    assert 0.5 * 5.0 < np.sqrt((warp ** 2).sum(1).mean()) < 1.6 * 5.0  # RMS displacement over the image
    tomos_t, tomos_m = read_tomograms(sim.truth_tomograms_star), read_tomograms(sim.tomograms_star)
    pt = read_tomo_particles(sim.truth_particles_star, tomos_t)
    pm = read_tomo_particles(sim.particles_star, tomos_m)
    shift = (pm.positions_px(tomos_m) - pt.positions_px(tomos_t)) * 6.0
    recorded = pt.particles[[f"cryopipePoseErrorShift{a}Angst" for a in "XYZ"]].to_numpy()
    np.testing.assert_allclose(shift, recorded, atol=1e-6)
    angle = angular_distance(torch.as_tensor(pm.orientations()), torch.as_tensor(pt.orientations())).numpy()
    np.testing.assert_allclose(angle, pt.particles["cryopipePoseErrorAngle"].to_numpy(), atol=1e-3)
    assert 0.3 * 3.0 < np.median(angle) < 2.0 * 3.0
    # without perturbations the main files equal the truth
    sim0 = _simulate(tmp_path / "zero", small_map, tilt_step=20.0)
    t0 = read_tomograms(sim0.truth_tomograms_star)["TS_01"].tilts
    m0 = read_tomograms(sim0.tomograms_star)["TS_01"].tilts
    assert np.allclose(t0[m0.columns].select_dtypes("number"), m0.select_dtypes("number"))


def test_cli_writes_files_io_tomography_reads(tmp_path, monkeypatch, capsys):
    from cryopipe.cli import main as cli

    monkeypatch.chdir(tmp_path)
    rc = cli(["simulate", "--what", "tiltseries", "--o", "ts", "--n_tomograms", "2", "--particles_per_tomogram", "3",
              "--image_size", "128", "96", "--thickness", "300", "--tilt_range", "-30", "30", "--tilt_step", "15",
              "--order", "bidirectional", "--angpix", "8", "--snr", "1", "--float16", "--lattice", "cylinder",
              "--lattice_radius", "120", "--sym", "C2", "--device", "cpu", "--perturb_tilt_shift", "2"])
    assert rc == 0
    opt = read_optimisation_set(tmp_path / "ts" / "optimisation_set.star")
    tomos = read_tomograms(opt["rlnTomoTomogramsFile"])
    assert tomos.names == ["TS_01", "TS_02"]
    ts = tomos["TS_02"]
    assert ts.n_tilts == 5 and ts.image_size == (128, 96) and ts.pixel_size == 8.0
    np.testing.assert_allclose(ts.pre_exposure(), [12, 9, 0, 3, 6])  # 0, +15, +30, −15, −30
    assert ts.read_images().shape == (5, 96, 128)
    assert mrc_info(tmp_path / "ts" / "tilt_series" / "TS_02.mrcs").mode == 12  # float16
    parts = read_tomo_particles(opt["rlnTomoParticlesFile"], tomos)
    assert len(parts) >= 2 and parts.positions_px(tomos).shape == (len(parts), 3)
    assert np.allclose(parts.particles["rlnAngleTilt"], 90.0, atol=1e-3)
    truth = read_optimisation_set(tmp_path / "ts" / "truth" / "optimisation_set.star")
    assert read_tomograms(truth["rlnTomoTomogramsFile"])["TS_01"].read_images().shape == (5, 96, 128)
    assert (tmp_path / "ts" / "truth" / "truth_map.mrc").exists()
    capsys.readouterr()
    for bad in (["--snr", "0"], ["--n_tomograms", "0"], ["--lattice", "sphere", "--lattice_radius", "-5"],
                ["--image_size", "8", "8"], ["--perturb_defocus", "-1"], ["--hand", "2"]):
        assert cli(["simulate", "--what", "tiltseries", "--o", "bad", "--device", "cpu", "--angpix", "8"] + bad) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("cryopipe simulate: error:"), err


def test_reconstruct_particle_round_trip(tmp_path, small_map, monkeypatch):
    """cryopipe's relion_tomo_reconstruct_particle on the truth files gives back the map; on the main files (with
    injected tilt-shift and particle-angle errors) it is visibly worse."""
    from cryopipe.jobs.reconstruct_particle import reconstruct_particle

    monkeypatch.chdir(tmp_path)
    vol = small_map[0]
    sim = _simulate(tmp_path, small_map, n_tomograms=2, particles_per_tomogram=8, image_size=(256, 224),
                    thickness_A=500.0, tilt_range=(-60.0, 60.0), tilt_step=6.0,
                    perturbations=Perturbations(tilt_shift_A=6.0, particle_angle_deg=4.0), keep_images=False)
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    inside = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) < (n // 2 - 1) ** 2

    def cc(a, b):
        a, b = a[inside] - a[inside].mean(), b[inside] - b[inside].mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    truth = reconstruct_particle(sim.truth_particles_star, sim.truth_tomograms_star, box=32, crop=n, device="cpu",
                                 progress=False)
    main = reconstruct_particle(sim.particles_star, sim.tomograms_star, box=32, crop=n, device="cpu", progress=False)
    assert cc(truth.merged, vol) > 0.93
    assert cc(main.merged, vol) < cc(truth.merged, vol) - 0.03
