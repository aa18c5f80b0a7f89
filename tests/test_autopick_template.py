"""Template picking (RELION ``relion_autopick --ref``): FOM against a direct real-space computation, the ψ
convention, true particles on the RELION fixture micrograph, FOM-map round trip, contamination rejection,
minimum distance, RELION's peak pruning against a literal re-implementation, reference handling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.star import read_star, write_star
from cryopipe.picking.template import (
    TemplateOptions,
    auto_particle_diameter,
    gauss_reference,
    make_template_picker,
    prepare_references,
    prune_peak_clusters,
    read_reference_images,
    read_template_maps,
    remove_close_neighbours,
    template_fom_maps,
    template_pick,
    template_pick_from_maps,
    write_template_maps,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine is shared: one intra-op thread avoids OpenMP spin-waiting on small tensors
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _match(px, py, tx, ty, tol):
    """(number of picks within ``tol`` px of a true particle, number of true particles with a pick within tol)."""
    if len(px) == 0:
        return 0, 0
    d = np.sqrt((np.asarray(px)[:, None] - tx[None]) ** 2 + (np.asarray(py)[:, None] - ty[None]) ** 2)
    return int((d.min(1) < tol).sum()), int((d.min(0) < tol).sum())


@pytest.fixture(scope="module")
def mic001(relion_dir):
    mic, apix = read_mrc(relion_dir / "mic" / "Micrographs" / "mic001.mrc")
    truth = read_star(relion_dir / "mic" / "Micrographs" / "mic001_truth.star")[""]
    row = read_star(relion_dir / "mic" / "micrographs_ctf.star")["micrographs"].iloc[0]
    ctf = {"defocus_u": float(row.rlnDefocusU), "defocus_v": float(row.rlnDefocusV),
           "defocus_angle": float(row.rlnDefocusAngle), "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}
    return torch.from_numpy(mic), apix, truth, ctf


@pytest.fixture(scope="module")
def class_refs(relion_dir, mic001):
    imgs, header_apix, names, is3d = read_reference_images(relion_dir / "class2d" / "run_it005_classes.mrcs")
    assert not is3d and imgs.shape == (4, 48, 48) and header_apix == pytest.approx(3.0)
    return prepare_references(imgs, mic001[1], particle_diameter=100, invert=True, psi_step=10, names=names)


@pytest.fixture(scope="module")
def mic001_maps(mic001, class_refs):
    mic, apix, truth, ctf = mic001
    return template_fom_maps(mic, class_refs, lowpass=20, shrink=0, ctf=ctf)


# ------------------------------------------------------------------------------------------------ the FOM


def _direct_fom(mic: torch.Tensor, ref: torch.Tensor, radius: int, psis: list[int], relion_mean: bool = False):
    """RELION's FOM by direct real-space sums (periodic micrograph), for ψ multiples of 90° (exact rotations)."""
    n, b = mic.shape[0], ref.shape[0]
    x = mic.double()
    x = (x - x.mean()) / x.std(unbiased=False)
    c = torch.arange(b) - b // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    disc = (yy ** 2 + xx ** 2) < radius * radius

    def corr(img, k):  # out[s] = sum_d k[d] img[s + d]
        out = torch.zeros(n, n, dtype=torch.float64)
        for i, j in zip(*torch.nonzero(k != 0, as_tuple=True)):
            out += k[i, j] * torch.roll(img, shifts=(-(int(i) - b // 2), -(int(j) - b // 2)), dims=(0, 1))
        return out

    bg = (~disc).double()
    mean = corr(x, bg) / bg.sum()
    sd = torch.sqrt(corr(x * x, bg) / bg.sum() - mean ** 2)
    a = ref.double()
    nd = int(disc.sum())
    sa2 = float((a[disc] ** 2).sum()) / (nd + 1)
    # local-mean term: the whole reference / n (= its DC coefficient; this reference lies inside the disc), or
    # RELION's disc sum / (n + 1)
    sa = float(a[disc].sum()) / (nd + 1) if relion_mean else float(a.sum()) / nd
    em1 = math.expm1(sa2 / 2)
    best = torch.full((n, n), -math.inf, dtype=torch.float64)
    best_psi = torch.zeros(n, n, dtype=torch.float64)
    for psi in psis:
        # A(ψ) = euler(0, 0, ψ): the rotated reference is f(Aᵀ·(x, y)), Aᵀ(x, y) = (cx − sy, sx + cy)
        cs, sn = round(math.cos(math.radians(psi))), round(math.sin(math.radians(psi)))
        src_x = cs * xx - sn * yy + b // 2
        src_y = sn * xx + cs * yy + b // 2
        ok = (src_x >= 0) & (src_x < b) & (src_y >= 0) & (src_y < b)
        rot = torch.where(ok, a[src_y.clamp(0, b - 1), src_x.clamp(0, b - 1)], torch.zeros_like(a))
        log_p = (corr(x, rot) / nd - mean * sa) / sd - sa2 / 2
        fom = torch.expm1(log_p) / em1
        upd = fom > best
        best = torch.where(upd, fom, best)
        best_psi = torch.where(upd, torch.full_like(best, float(psi)), best_psi)
    return best, best_psi, mean, sd, math.exp(sa2 / 2)


def test_fom_maps_match_direct_real_space_computation():
    """Work grid = micrograph (shrink 1, no lowpass): background mean/σ exactly, the FOM (Fourier-space rotation
    by bilinear interpolation of the 8× padded reference FT) to 1 %, best ψ at > 99 % of the pixels."""
    g = torch.Generator().manual_seed(0)
    n, b = 96, 24
    c = torch.arange(b, dtype=torch.float64) - b // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    ref = torch.exp(-((xx - 2) ** 2 + (yy + 1) ** 2) / 8.0) + 0.6 * torch.exp(-((xx + 2.5) ** 2 + (yy - 3) ** 2) / 4.5)
    mic = torch.randn(n, n, generator=g, dtype=torch.float64)
    mic[18:42, 28:52] += 2 * ref
    refs = prepare_references(ref[None].float(), 1.0, particle_diameter=24, psi_step=90)
    assert refs.radius_px == 10
    maps = template_fom_maps(mic.float(), refs, shrink=1.0)
    assert maps.work_size == n and maps.scale == 1.0
    fom, psi, mean, sd, e = _direct_fom(mic, refs.images[0], refs.radius_px, [0, 90, 180, 270])
    assert torch.allclose(maps.mean.double(), mean, atol=1e-5)
    assert torch.allclose(maps.stddev.double(), sd, atol=1e-5)
    assert float(maps.expected_ratio[0]) - 1 == pytest.approx(e - 1, rel=5e-3)
    err = (maps.fom[0].double() - fom).abs() / fom.abs().clamp(min=1.0)
    assert float(err.max()) < 0.01
    assert float((maps.psi[0].double() == psi).double().mean()) > 0.99
    relion = template_fom_maps(mic.float(), refs, shrink=1.0, relion_mean_term=True)
    fom_r, _, _, _, _ = _direct_fom(mic, refs.images[0], refs.radius_px, [0, 90, 180, 270], relion_mean=True)
    assert float(((relion.fom[0].double() - fom_r).abs() / fom_r.abs().clamp(min=1.0)).max()) < 0.01


def test_fom_invariant_to_local_background_offset(mic001, class_refs):
    """A uniform −1.5 σ patch (thicker ice) leaves the FOM inside it unchanged (the local mean cancels exactly
    in C − μ·ΣA/n); RELION's disc-sum term shifts it by a sizeable fraction of the FOM spread with --ctf."""
    mic, apix, truth, ctf = mic001
    patched = mic.clone()
    patched[200:800, 200:800] -= 1.5 * float(mic.std())
    for relion, lo, hi in ((False, 0.0, 0.02), (True, 0.1, 10.0)):
        a = template_fom_maps(mic, class_refs, lowpass=20, shrink=0, ctf=ctf, relion_mean_term=relion)
        b = template_fom_maps(patched, class_refs, lowpass=20, shrink=0, ctf=ctf, relion_mean_term=relion)
        i0, i1 = int(300 * a.scale), int(700 * a.scale)
        shift = float((b.fom[:, i0:i1, i0:i1] - a.fom[:, i0:i1, i0:i1]).abs().max())
        assert lo <= shift < hi, (relion, shift)
        assert float(b.mean[i0:i1, i0:i1].mean()) < -0.7  # in units of the (patched) micrograph σ


def _rotated_projections(relion_dir, ctf=None):
    """320² micrograph of ref_map projections at one (rot, tilt) with 6 different ψ (RELION convention,
    core.projector), optionally × CTF and negated, SNR 1 noise; and the ψ = 0 projection in noise units."""
    from cryopipe.core.geometry import euler_to_matrix
    from cryopipe.core.projector import Projector
    from cryopipe.sim.micrographs import apply_ctf_micrograph, particle_signal_variance, render_projections

    vol, apix = read_mrc(relion_dir / "ref_map.mrc")
    proj = Projector(torch.from_numpy(vol))
    psis = torch.tensor([0.0, 37.0, 95.0, 151.0, 212.0, 299.0])
    rot, tilt = 40.0, 70.0
    coords = torch.tensor([[60, 70], [160, 60], [260, 80], [70, 250], [170, 160], [255, 255]])
    angles = torch.stack([torch.full_like(psis, rot), torch.full_like(psis, tilt), psis], dim=1)
    img = render_projections(proj, angles, coords, (320, 320))  # 320 px: work grid = micrograph (shrink 1)
    if ctf is not None:
        img = -apply_ctf_micrograph(img, apix, ctf["defocus_u"], ctf["defocus_v"], ctf["defocus_angle"])
    sigma = math.sqrt(float(particle_signal_variance(img, coords, 13).mean()) / 1.0)
    img = img + sigma * torch.randn(img.shape, generator=torch.Generator().manual_seed(1))
    ref = proj.project_images(euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(0.0))[None].float())
    return img, ref / sigma, apix, coords, psis


def test_psi_convention_and_positions_on_rotated_projections(relion_dir):
    """One reference = the ψ = 0 projection: every particle is found at its pixel with its ψ (within the 5° step),
    FOM ≈ 1 (the likelihood ratio of a noisy copy of the reference itself)."""
    img, ref, apix, coords, psis = _rotated_projections(relion_dir)
    refs = prepare_references(ref, apix, particle_diameter=110, psi_step=5)
    picks = template_pick(img, refs, TemplateOptions(threshold=0.5))
    assert len(picks) == 6
    d = np.hypot(picks.x.numpy()[:, None] - coords[:, 0].numpy()[None], picks.y.numpy()[:, None] - coords[:, 1].numpy()[None])
    j = d.argmin(1)
    assert sorted(j.tolist()) == list(range(6)) and d.min(1).max() == 0.0
    dpsi = (picks.psi.numpy() - psis.numpy()[j] + 180) % 360 - 180
    assert np.abs(dpsi).max() <= 3.5
    assert 0.7 < float(picks.fom.min()) and float(picks.fom.max()) < 1.4


def test_ctf_multiplies_references(relion_dir):
    """Micrograph × CTF (25000 Å defocus: sign flips inside an 8 Å band), dark particles: with --ctf --invert
    the ψ = 0 projection finds all six at FOM ≈ 1; without --ctf none passes the threshold."""
    ctf = {"defocus_u": 25000.0, "defocus_v": 24000.0, "defocus_angle": 20.0}
    img, ref, apix, coords, psis = _rotated_projections(relion_dir, ctf)
    refs = prepare_references(ref, apix, particle_diameter=110, psi_step=5, invert=True)
    picks = template_pick(img, refs, TemplateOptions(lowpass=8, ctf=True, threshold=0.5), ctf=ctf)
    assert len(picks) == 6 and 0.8 < float(picks.fom.min()) and float(picks.fom.max()) < 1.5
    assert _match(picks.x.numpy(), picks.y.numpy(), coords[:, 0].numpy(), coords[:, 1].numpy(), 1.0) == (6, 6)
    assert len(template_pick(img, refs, TemplateOptions(lowpass=8, threshold=0.5))) == 0
    with pytest.raises(CryopipeError, match="--ctf needs CTF parameters"):
        template_pick(img, refs, TemplateOptions(lowpass=8, ctf=True))


def test_class_averages_find_all_particles_on_fixture_micrograph(mic001, mic001_maps, class_refs):
    """RELION's own 2D class averages (--invert --ctf, lowpass 20 Å, shrink 0): all 25 true particles, no false
    picks at a threshold above the noise peaks; positions within the work-grid quantisation (1/scale ≈ 3.3 px)."""
    mic, apix, truth, ctf = mic001
    tx, ty = truth["rlnCoordinateX"].to_numpy(), truth["rlnCoordinateY"].to_numpy()
    maps = mic001_maps
    assert maps.work_size == 308 and maps.box == 48 and maps.radius_px == 15
    picks = template_pick_from_maps(maps, threshold=2.0)
    good, found = _match(picks.x.numpy(), picks.y.numpy(), tx, ty, 3.5)
    assert found == 25 and good == len(picks) == 25
    assert set(picks.class_number.tolist()) <= {1, 2, 3, 4}
    assert bool((picks.diameter == 100.0).all())
    # true particles have FOM well above 1 (the references are weaker than these SNR-0.5 particles), noise < 1.5
    assert float(picks.fom.min()) > 2.5
    low = template_pick_from_maps(maps, threshold=0.25)
    assert len(low) > 100  # RELION's CLI default threshold picks noise on this micrograph
    # without --ctf the (CTF-corrected) class averages hardly match the CTF-modulated particles: at the true
    # positions the FOM drops from ~4.6 to ~0.2; --ctf_intact_first_peak (CTF = 1 before its first peak, i.e. the
    # whole 20 Å band at this defocus) behaves like no CTF
    def at_truth(m):
        f, _, _ = m.best()
        r0, c0 = m.first_index()
        i = np.rint(ty * m.scale).astype(int) + r0
        j = np.rint(tx * m.scale).astype(int) + c0
        return np.array([float(f[a - 1:a + 2, b - 1:b + 2].max()) for a, b in zip(i, j)])

    with_ctf = at_truth(maps)
    no_ctf = at_truth(template_fom_maps(mic, class_refs, lowpass=20, shrink=0))
    intact = at_truth(template_fom_maps(mic, class_refs, lowpass=20, shrink=0, ctf=ctf, ctf_intact_first_peak=True))
    assert np.median(with_ctf) > 10 * np.median(no_ctf)
    assert np.allclose(intact, no_ctf, atol=0.02)
    # a strong ice ramp (2 σ across) with --highpass 300 Å: the same 25 particles
    ramp = mic + 2 * float(mic.std()) * torch.linspace(0, 1, mic.shape[1])[None, :]
    hp = template_pick(ramp, class_refs, TemplateOptions(lowpass=20, shrink=0, ctf=True, threshold=2.0, highpass=300),
                       ctf=ctf)
    assert _match(hp.x.numpy(), hp.y.numpy(), tx, ty, 3.5) == (25, 25) and len(hp) == 25


def test_projections_of_3d_map_as_references(relion_dir, mic001):
    """--ref ref_map.mrc --healpix_order 0: 12 projections; all 25 particles found with few false picks."""
    mic, apix, truth, ctf = mic001
    imgs, header_apix, names, is3d = read_reference_images(relion_dir / "ref_map.mrc", healpix_order=0)
    assert is3d and imgs.shape == (12, 48, 48) and names[0].startswith("rot=")
    c2, _, _, _ = read_reference_images(relion_dir / "ref_map.mrc", healpix_order=0, sym="C2")
    assert 5 <= c2.shape[0] < 12
    refs = prepare_references(imgs, apix, particle_diameter=100, invert=True, psi_step=15)
    picks = template_pick(mic, refs, TemplateOptions(lowpass=20, shrink=0, ctf=True, threshold=1.5), ctf=ctf)
    good, found = _match(picks.x.numpy(), picks.y.numpy(), truth["rlnCoordinateX"].to_numpy(),
                         truth["rlnCoordinateY"].to_numpy(), 3.5)
    assert found == 25 and good >= 0.95 * len(picks)


def test_non_square_micrograph_coordinates(mic001, class_refs):
    """A non-square crop (padded with noise to a square internally) gives the same particles at the same
    micrograph coordinates."""
    mic, apix, truth, ctf = mic001
    crop = mic[:, :700]
    ax, ay = truth["rlnCoordinateX"].to_numpy(), truth["rlnCoordinateY"].to_numpy()
    inside = ax < 700 - 24 - 4  # whole box inside the crop
    picks = template_pick(crop, class_refs, TemplateOptions(lowpass=20, shrink=0, ctf=True, threshold=2.0), ctf=ctf)
    _, found = _match(picks.x.numpy(), picks.y.numpy(), ax[inside], ay[inside], 3.5)
    good, _ = _match(picks.x.numpy(), picks.y.numpy(), ax, ay, 3.5)  # cut particles at the edge may be picked
    assert found == int(inside.sum()) and good == len(picks)
    assert float(picks.x.max()) < 700 - 24


# ------------------------------------------------------------------------------------------------ FOM maps


def test_fom_map_roundtrip_repick_is_identical(tmp_path, mic001_maps, class_refs, mic001):
    maps = mic001_maps
    stack, star = write_template_maps(tmp_path / "Micrographs" / "mic001_autopick", maps, class_refs.names,
                                      {"lowpass": 20.0})
    assert stack.name == "mic001_autopick_fom.mrcs" and star.exists()
    data, apix_map = read_mrc(stack)
    assert data.shape == (5 + 2 * 4, 308, 308) and apix_map == pytest.approx(3.0 * 1024 / 308, rel=1e-5)
    back, settings = read_template_maps(tmp_path / "Micrographs" / "mic001_autopick")
    assert settings == {"lowpass": 20.0}
    assert torch.equal(back.fom, maps.fom) and torch.equal(back.psi, maps.psi)
    assert torch.equal(back.stddev, maps.stddev) and torch.equal(back.mean, maps.mean)
    assert (back.work_size, back.size, back.shape, back.box, back.radius_px) == \
        (maps.work_size, maps.size, maps.shape, maps.box, maps.radius_px)
    for kw in ({"threshold": 2.0}, {"threshold": 0.25}, {"threshold": 0.5, "min_distance": 150.0},
               {"threshold": 0.3, "max_stddev_noise": 1.02, "skip_side": 40}):
        a, b = template_pick_from_maps(maps, **kw), template_pick_from_maps(back, **kw)
        for name in ("x", "y", "fom", "class_number", "psi", "diameter"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (kw, name)


def test_picker_writes_then_reads_maps_same_picks(tmp_path, mic001, class_refs):
    """The job's picking function: --write_fom_maps run, then --read_fom_maps with a new threshold gives the
    coordinates of a fresh run with that threshold (and does not need the micrograph)."""
    mic, apix, truth, ctf = mic001

    class Ctx:
        index, name = 0, "Micrographs/mic001.mrc"

    Ctx.ctf = ctf
    base = lambda ctx: tmp_path / "mic001_autopick"  # noqa: E731
    o1 = TemplateOptions(lowpass=20, shrink=0, ctf=True, threshold=2.0)
    o2 = TemplateOptions(lowpass=20, shrink=0, ctf=True, threshold=0.4, min_distance=100.0)
    first = make_template_picker(class_refs, o1, maps_base=base, write_maps=True)(mic, apix, Ctx)
    warnings: list[str] = []
    again = make_template_picker(class_refs, o2, maps_base=base, read_maps=True, warn=warnings.append)(
        torch.zeros(1, 1), apix, Ctx)
    fresh = make_template_picker(class_refs, o2)(mic, apix, Ctx)
    assert len(first) == 25 and not warnings
    for name in ("x", "y", "fom", "class_number", "psi"):
        assert torch.equal(getattr(again, name), getattr(fresh, name))
    o3 = TemplateOptions(lowpass=30, shrink=0, ctf=True, threshold=0.4)
    make_template_picker(class_refs, o3, maps_base=base, read_maps=True, warn=warnings.append)(mic, apix, Ctx)
    assert len(warnings) == 1 and "lowpass" in warnings[0]
    with pytest.raises(CryopipeError, match="--write_fom_maps"):
        make_template_picker(class_refs, o2, maps_base=lambda c: tmp_path / "nothing", read_maps=True)(mic, apix, Ctx)


# ------------------------------------------------------------------------------------------------ peaks


def test_max_stddev_noise_rejects_picks_on_contamination(relion_dir, tmp_path):
    """Simulated micrograph with strong contamination blobs: without --max_stddev_noise picks land on the blob
    edges; with a maximum of 1.05 (the background σ is ≈ 1 in normalised units; RELION's GUI suggests 1.1) none
    do, and every true particle is still found."""
    from cryopipe.sim.micrographs import simulate_micrographs

    vol, apix = read_mrc(relion_dir / "ref_map.mrc")
    sim = simulate_micrographs(torch.from_numpy(vol), 1, apix, 0.2, tmp_path, size=512, particles_per_micrograph=20,
                               n_blobs=3, blob_radius_A=(60, 150), blob_amplitude=5, seed=3, write_map=False,
                               device="cpu")
    mic, _ = read_mrc(sim.micrograph_paths[0])
    geom = sim.geometry[0]
    row = sim.micrographs.iloc[0]
    ctf = {"defocus_u": row.rlnDefocusU, "defocus_v": row.rlnDefocusV, "defocus_angle": row.rlnDefocusAngle}
    imgs, _, _, _ = read_reference_images(relion_dir / "ref_map.mrc", healpix_order=0)
    refs = prepare_references(imgs / sim.noise_sigmas[0], apix, particle_diameter=90, invert=True, psi_step=10)
    maps = template_fom_maps(torch.from_numpy(mic), refs, lowpass=20, shrink=0, ctf=ctf)
    blobs = geom.blobs

    def near_blob(p):
        db = np.hypot(p.x.numpy()[:, None] - blobs[None, :, 0], p.y.numpy()[:, None] - blobs[None, :, 1]) - blobs[None, :, 2]
        return int((db.min(1) < 15).sum())

    loose = template_pick_from_maps(maps, threshold=0.3)
    strict = template_pick_from_maps(maps, threshold=0.3, max_stddev_noise=1.05)
    assert near_blob(loose) >= 3 and near_blob(strict) == 0
    tx, ty = geom.coords[:, 0].astype(float), geom.coords[:, 1].astype(float)
    good, found = _match(strict.x.numpy(), strict.y.numpy(), tx, ty, 8)
    assert found == len(tx) == 20 and good >= len(strict) - 2
    # --min_avg_noise: a very high minimum rejects everything
    assert len(template_pick_from_maps(maps, threshold=0.3, min_avg_noise=5.0)) == 0


def test_min_distance_respected(mic001_maps):
    maps = mic001_maps
    s = np.float32(maps.scale)
    counts = []
    for md in (30.0, 60.0, 120.0, 240.0):
        p = template_pick_from_maps(maps, threshold=1.0, min_distance=md)
        xw = np.rint(p.x.numpy() * s)
        yw = np.rint(p.y.numpy() * s)
        d2 = (xw[:, None] - xw[None]) ** 2 + (yw[:, None] - yw[None]) ** 2
        np.fill_diagonal(d2, np.inf)
        md_px = round(md / maps.pixel_size)
        assert d2.min() > float(np.float32(md_px * md_px) * s * s)
        counts.append(len(p))
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0


def _relion_prune(peaks, link_d2, min_d2):
    """Literal re-implementation of RELION's prunePeakClusters loops (list erasing, cluster order)."""
    peaks = list(peaks)
    pruned = []
    while peaks:
        cluster = [peaks.pop(0)]
        k = 0
        while k < len(cluster):
            mx, my = cluster[k][0], cluster[k][1]
            i = 0
            while i < len(peaks):
                if (mx - peaks[i][0]) ** 2 + (my - peaks[i][1]) ** 2 < link_d2:
                    cluster.append(peaks.pop(i))
                else:
                    i += 1
            k += 1
        while cluster:
            best = max(cluster, key=lambda p: p[2])  # first of the maximal ones
            pruned.append(best)
            cluster = [p for p in cluster if (p[0] - best[0]) ** 2 + (p[1] - best[1]) ** 2 >= min_d2]
    return pruned


def test_prune_and_remove_close_match_relion_loops():
    rng = np.random.default_rng(5)
    for trial in range(20):
        n = int(rng.integers(1, 150))
        x = rng.integers(0, 120, n)
        y = rng.integers(0, 120, n)
        f = rng.permutation(n).astype(np.float64)  # distinct FOMs (RELION resolves ties by cluster order)
        link, mind = float(rng.uniform(2, 12)) ** 2, float(rng.uniform(3, 20)) ** 2
        if trial % 2:  # integer limits: pairs exactly at the limit are not linked / not suppressed (strict <)
            link, mind = float(int(link)), float(int(mind))
        keep = prune_peak_clusters(x, y, f, link, mind)
        ref = _relion_prune(list(zip(x.tolist(), y.tolist(), f.tolist(), range(n))), link, mind)
        assert keep.tolist() == [p[3] for p in ref]
        kept = remove_close_neighbours(x, y, mind)
        brute = [i for i in range(n) if min([(x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2 for j in range(n) if j != i]
                                            or [1e10]) > mind]
        assert kept.tolist() == brute


# ------------------------------------------------------------------------------------------------ references


def test_reference_files_and_preparation(tmp_path, relion_dir):
    # STAR with rlnReferenceImage "NNN@file" relative to the STAR file's folder (RELION model.star)
    imgs, apix, names, is3d = read_reference_images(relion_dir / "class2d" / "run_it005_model.star", root=tmp_path)
    direct, _ = read_mrc(relion_dir / "class2d" / "run_it005_classes.mrcs")
    assert not is3d and names[1].startswith("00000002@") and np.array_equal(imgs.numpy(), direct)
    # rlnImageName, relative to the project root
    write_mrc(tmp_path / "refs.mrcs", direct[[2, 0]], 3.0)
    write_star(tmp_path / "refs.star", {"": pd.DataFrame({"rlnImageName": ["000001@refs.mrcs", "000002@refs.mrcs"]})})
    sub, _, _, _ = read_reference_images(tmp_path / "refs.star", root=tmp_path)
    assert np.array_equal(sub.numpy(), direct[[2, 0]])
    with pytest.raises(CryopipeError, match="rlnReferenceImage or rlnImageName"):
        write_star(tmp_path / "bad.star", {"": pd.DataFrame({"rlnCoordinateX": [1.0]})})
        read_reference_images(tmp_path / "bad.star")

    # automatic diameter (RELION: central row, first..last pixel differing from the corner)
    disc = (torch.arange(48)[:, None] - 24) ** 2 + (torch.arange(48)[None, :] - 24) ** 2 < 100
    assert auto_particle_diameter(disc[None].float(), 2.0) == pytest.approx(18 * 2.0)
    refs = prepare_references(disc[None].float(), 2.0)
    assert refs.particle_diameter == pytest.approx(36.0) and refs.radius_px == 9 - 2

    # --angpix_ref: references at 6 Å for 3 Å micrographs are Fourier-padded to twice the box, values scaled by
    # b/new (RELION), the particle disc applied at the micrograph pixel size; --invert flips the sign
    big = prepare_references(torch.from_numpy(direct), 3.0, pixel_size_ref=6.0, particle_diameter=120, invert=True,
                             shrink_particle_mask=0)
    assert big.box == 96 and big.radius_px == 20
    same = prepare_references(torch.from_numpy(direct), 6.0, particle_diameter=120, shrink_particle_mask=0)
    assert same.box == 48 and same.radius_px == 10
    # 4× the pixels, values × 0.5: the sums over the same physical disc differ by 2
    assert float(-big.images.sum()) / 2 == pytest.approx(float(same.images.sum()), rel=0.03)
    with pytest.raises(CryopipeError, match="larger than the reference box"):
        prepare_references(torch.from_numpy(direct), 3.0, particle_diameter=200)

    # Gaussian blob: box 1.5·round(d/apix) made even, σ = box/6, peak gauss_max
    g = gauss_reference(100.0, 3.0, 0.1)
    assert g.shape == (1, 50, 50) and float(g.max()) == pytest.approx(0.1)
    assert float(g[0, 25, 25 + 8]) == pytest.approx(0.1 * math.exp(-64 / (2 * (50 / 6) ** 2)), rel=1e-5)


# ------------------------------------------------------------------------------------------------ the job


def _run_job(argv: list[str]) -> int:
    import argparse

    from cryopipe.jobs import autopick

    p = argparse.ArgumentParser()
    autopick.add_arguments(p)
    return autopick.main(p.parse_args(argv))


def test_autopick_job_template_write_then_read_fom_maps(tmp_path, relion_dir, monkeypatch):
    """``cryopipe autopick --ref class_averages.star --invert --ctf``: RELION outputs; --write_fom_maps then
    --continue --read_fom_maps with a new threshold equals a fresh run at that threshold; plain --continue only
    picks micrographs without coordinates."""
    import os

    proj = tmp_path / "proj"
    (proj / "Micrographs").mkdir(parents=True)
    (proj / "Class2D" / "job008").mkdir(parents=True)
    os.symlink(relion_dir / "mic" / "Micrographs" / "mic001.mrc", proj / "Micrographs" / "mic001.mrc")
    (proj / "micrographs_ctf.star").write_text((relion_dir / "mic" / "micrographs_ctf.star").read_text())
    os.symlink(relion_dir / "class2d" / "run_it005_classes.mrcs", proj / "Class2D" / "job008" / "classes.mrcs")
    write_star(proj / "class_averages.star", {"": pd.DataFrame(
        {"rlnReferenceImage": [f"{i:06d}@Class2D/job008/classes.mrcs" for i in (1, 2, 3, 4)]})})
    monkeypatch.chdir(proj)
    base = ["--i", "micrographs_ctf.star", "--ref", "class_averages.star", "--invert", "--ctf", "--ang", "10",
            "--particle_diameter", "100", "--lowpass", "20", "--shrink", "0", "--no_png", "--j", "1"]
    assert _run_job(base + ["--odir", "AutoPick/job004/", "--threshold", "2", "--write_fom_maps"]) == 0
    job = proj / "AutoPick" / "job004"
    coords = read_star(job / "Micrographs" / "mic001_autopick.star")[""]
    assert len(coords) == 25 and set(coords["rlnClassNumber"]) <= {1, 2, 3, 4}
    assert {"rlnAutopickFigureOfMerit", "rlnAnglePsi"} <= set(coords.columns)
    assert (job / "Micrographs" / "mic001_autopick_fom.mrcs").exists()
    assert read_star(job / "autopick.star")["coordinate_files"]["rlnMicrographCoordinates"].tolist() == \
        ["AutoPick/job004/Micrographs/mic001_autopick.star"]
    procs = read_star(proj / "default_pipeline.star")["pipeline_processes"]
    assert procs["rlnPipeLineProcessTypeLabel"].tolist() == ["relion.autopick.ref2d"]

    # re-pick from the maps (continue) with other peak settings == a fresh job with those settings
    new = ["--threshold", "0.5", "--min_distance", "90", "--max_stddev_noise", "1.05"]
    assert _run_job(base + ["--odir", "AutoPick/job004/", "--continue", "--read_fom_maps"] + new) == 0
    fresh_args = base + ["--odir", "AutoPick/job005/"] + new
    assert _run_job(fresh_args) == 0
    a = read_star(job / "Micrographs" / "mic001_autopick.star")[""]
    b = read_star(proj / "AutoPick" / "job005" / "Micrographs" / "mic001_autopick.star")[""]
    assert len(a) != 25 and a.equals(b)

    # plain --continue keeps existing coordinate files
    stamp = (proj / "AutoPick" / "job005" / "Micrographs" / "mic001_autopick.star").stat().st_mtime_ns
    assert _run_job(base + ["--odir", "AutoPick/job005/", "--continue", "--threshold", "3"]) == 0
    assert (proj / "AutoPick" / "job005" / "Micrographs" / "mic001_autopick.star").stat().st_mtime_ns == stamp

    # a 3D map (projections, relion.autopick.ref3d) and the Gaussian blob
    os.symlink(relion_dir / "ref_map.mrc", proj / "ref_map.mrc")
    common = ["--i", "micrographs_ctf.star", "--particle_diameter", "100", "--no_png", "--j", "1"]
    assert _run_job(common + ["--odir", "AutoPick/job006/", "--ref", "ref_map.mrc", "--healpix_order", "0",
                              "--invert", "--ctf", "--ang", "20", "--threshold", "1.5"]) == 0
    c3 = read_star(proj / "AutoPick" / "job006" / "Micrographs" / "mic001_autopick.star")[""]
    truth = read_star(relion_dir / "mic" / "Micrographs" / "mic001_truth.star")[""]
    tx, ty = truth["rlnCoordinateX"].to_numpy(), truth["rlnCoordinateY"].to_numpy()
    assert _match(c3["rlnCoordinateX"], c3["rlnCoordinateY"], tx, ty, 3.5)[1] == 25
    assert _run_job(common + ["--odir", "AutoPick/job007/", "--ref", "gauss", "--gauss_max", "0.3",
                              "--invert", "--threshold", "0.5"]) == 0
    cg = read_star(proj / "AutoPick" / "job007" / "Micrographs" / "mic001_autopick.star")[""]
    assert _match(cg["rlnCoordinateX"], cg["rlnCoordinateY"], tx, ty, 6)[1] >= 20 and set(cg["rlnAnglePsi"]) == {0.0}
    labels = read_star(proj / "default_pipeline.star")["pipeline_processes"]["rlnPipeLineProcessTypeLabel"].tolist()
    assert labels == ["relion.autopick.ref2d", "relion.autopick.ref2d", "relion.autopick.ref3d",
                      "relion.autopick.ref2d"]

    with pytest.raises(CryopipeError, match="one picking method"):
        _run_job(base + ["--LoG", "--LoG_diam_min", "50", "--LoG_diam_max", "80"])
    with pytest.raises(CryopipeError, match="exclude each other"):
        _run_job(base + ["--read_fom_maps", "--write_fom_maps"])
