"""BackProjector vs RELION 5 relion_reconstruct (reconstruct_noctf / reconstruct_ctf fixtures), plus additivity,
symmetry and Wiener-prior behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.core.backprojector import BackProjector, soft_mask_outside_map
from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import irfft2_centered, phase_shift_2d, rfft2_centered, rfft3_centered, shell_index_3d
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.projector import Projector
from cryopipe.core.symmetry import symmetrise_volume, symmetry_operators
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star

APIX = 3.0
N = 48


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.array(a, dtype=np.float64))


def _cc(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.to(torch.float64) - a.to(torch.float64).mean()
    b = b.to(torch.float64) - b.to(torch.float64).mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _random_rotations(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rot = torch.rand(m, generator=g, dtype=torch.float64) * 360
    tilt = torch.rad2deg(torch.acos(2 * torch.rand(m, generator=g, dtype=torch.float64) - 1))
    psi = torch.rand(m, generator=g, dtype=torch.float64) * 360
    return euler_to_matrix(rot, tilt, psi)


@pytest.fixture(scope="module")
def ref_map(relion_dir) -> torch.Tensor:
    return torch.from_numpy(read_mrc(relion_dir / "ref_map.mrc")[0].copy())


@pytest.fixture(scope="module")
def projector(ref_map) -> Projector:
    return Projector(ref_map, pad=2)


def _relion_like_reconstruction(relion_dir, projector, name: str, use_ctf: bool) -> torch.Tensor:
    """Recreate relion_project's 2000 images with our projector (shown to match relion_project in
    test_projector.py), then reconstruct them as relion_reconstruct does (images re-centred by +origin,
    DC zeroed, CTF·X with CTF² weights)."""
    parts = read_star(relion_dir / f"recon2000_{name}_angles.star")["particles"]
    A = euler_to_matrix(_t(parts["rlnAngleRot"]), _t(parts["rlnAngleTilt"]), _t(parts["rlnAnglePsi"]))
    o = torch.stack([_t(parts["rlnOriginXAngst"]), _t(parts["rlnOriginYAngst"])], dim=-1) / APIX
    F = projector.project(A, shifts_px=-o)
    ctf = None
    if use_ctf:
        ctf = ctf_2d(N, APIX, _t(parts["rlnDefocusU"]), _t(parts["rlnDefocusV"]), _t(parts["rlnDefocusAngle"]),
                     voltage=300.0, cs=2.7, amplitude_contrast=0.1, device="cpu")
        F = F * ctf
    images = irfft2_centered(F, N)  # what relion_project writes (real images)
    X = phase_shift_2d(rfft2_centered(images), o.to(torch.float32), N)  # relion_reconstruct: shift by +origin
    bp = BackProjector(N, pad=2, device="cpu")
    bp.insert(X, A, ctf=ctf, zero_dc=True)
    return bp.reconstruct()


@pytest.mark.parametrize("name,use_ctf", [("noctf", False), ("ctf", True)])
def test_reconstruction_matches_relion_reconstruct(relion_dir, projector, name, use_ctf):
    ours = _relion_like_reconstruction(relion_dir, projector, name, use_ctf).to(torch.float64)
    theirs = torch.from_numpy(read_mrc(relion_dir / f"reconstruct_{name}.mrc")[0].copy()).to(torch.float64)
    assert ours.shape == theirs.shape == (N, N, N)
    assert _cc(ours, theirs) > 0.999
    scale = float((ours * theirs).sum() / (ours * ours).sum())  # LSQ: theirs ≈ scale · ours
    assert abs(scale - 1.0) < 0.01
    assert float((ours - theirs).norm() / theirs.norm()) < 0.01
    assert float(ours.mean()) == pytest.approx(float(theirs.mean()), rel=0.01)
    # same centre: the circular cross-correlation peaks at zero shift
    xc = torch.fft.ifftn(torch.fft.fftn(ours) * torch.fft.fftn(theirs).conj()).real
    assert int(xc.argmax()) == 0
    # and the reconstruction is faithful to the projected map (as RELION's: cc 0.949 with ref_map)
    ref = torch.from_numpy(read_mrc(relion_dir / "ref_map.mrc")[0].copy())
    assert _cc(ours, ref) == pytest.approx(_cc(theirs, ref), abs=0.002)


def test_statistics_add_and_merge(projector):
    A = _random_rotations(60, seed=1)
    F = projector.project(A)
    whole = BackProjector(N, device="cpu")
    whole.insert(F, A)
    a, b = BackProjector(N, device="cpu"), BackProjector(N, device="cpu")
    a.insert(F[:25], A[:25])
    b.insert(F[25:], A[25:])
    a.merge(b)
    assert torch.allclose(a.data, whole.data, atol=1e-3)
    assert torch.allclose(a.weight, whole.weight, atol=1e-4)
    sequential = BackProjector(N, device="cpu")
    sequential.insert(F[:10], A[:10], chunk_pixels=50)
    sequential.insert(F[10:], A[10:])
    assert torch.allclose(sequential.data, whole.data, atol=1e-3)
    # the weight of one image sums to its number of inserted coefficients (trilinear weights sum to 1)
    one = BackProjector(N, device="cpu")
    one.insert(F[:1], A[:1])
    assert float(one.weight.sum()) == pytest.approx(one._flat.numel(), rel=1e-5)
    # CTF multiplies data by CTF and weight by CTF²; per-image weights scale both
    ctf = torch.full((1, N, N // 2 + 1), 0.5)
    c = BackProjector(N, device="cpu")
    c.insert(F[:1], A[:1], ctf=ctf, weights=torch.tensor([4.0]))
    assert torch.allclose(c.data, one.data * 2.0, atol=1e-5)
    assert torch.allclose(c.weight, one.weight * 1.0, atol=1e-6)
    # reconstruct does not modify the statistics
    before = whole.data.clone()
    whole.reconstruct()
    assert torch.equal(before, whole.data)
    with pytest.raises(CryopipeError):
        whole.merge(BackProjector(N, pad=3, device="cpu"))


def test_symmetry_equals_inserting_symmetry_copies(ref_map):
    sym = symmetry_operators("C3", device="cpu")
    vol = symmetrise_volume(ref_map, "C3")
    proj = Projector(vol)
    A = _random_rotations(10, seed=2)
    F = proj.project(A)
    bp_sym = BackProjector(N, device="cpu")
    bp_sym.insert(F, A)
    rec_sym = bp_sym.reconstruct(symmetry=sym)
    # equivalent: every image inserted once per operator g at orientation A·g
    bp_exp = BackProjector(N, device="cpu")
    Ag = (A[:, None] @ sym[None]).reshape(-1, 3, 3)
    bp_exp.insert(F.repeat_interleave(sym.shape[0], dim=0), Ag)
    rec_exp = bp_exp.reconstruct()
    assert _cc(rec_sym, rec_exp) > 0.99
    rec_plain = bp_sym.reconstruct()
    assert _cc(rec_sym, vol) > _cc(rec_plain, vol) + 0.03
    # operators given without the identity give the same result
    rec_noid = bp_sym.reconstruct(symmetry=sym[1:])
    assert torch.allclose(rec_noid, rec_sym)
    # C1 operator set is a no-op
    assert torch.allclose(bp_sym.reconstruct(symmetry=symmetry_operators("C1", device="cpu")), rec_plain)


def test_wiener_prior(ref_map, projector):
    vol = ref_map.to(torch.float64)
    A = _random_rotations(400, seed=3)
    clean = projector.project_images(A).to(torch.float64)
    sigma = 1.0  # real-space noise s.d. (the clean projections have s.d. ~0.4): low SNR
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    X = rfft2_centered(noisy)
    sigma2_f = N * N * sigma**2  # noise power per Fourier coefficient in cryopipe's FT convention
    bp = BackProjector(N, device="cpu")
    bp.insert(X, A, weights=torch.full((A.shape[0],), 1.0 / sigma2_f))
    # true signal power per shell
    ft = rfft3_centered(vol)
    shells = shell_index_3d(N).reshape(-1)
    p = (ft.abs() ** 2).reshape(-1)
    keep = shells <= N // 2
    tau2 = torch.zeros(N // 2 + 1, dtype=torch.float64).index_add_(0, shells[keep], p[keep])
    tau2 /= torch.zeros(N // 2 + 1, dtype=torch.float64).index_add_(0, shells[keep], torch.ones_like(p[keep]))
    plain = bp.reconstruct().to(torch.float64)
    wiener = bp.reconstruct(tau2=tau2).to(torch.float64)
    err_plain = float((plain - vol).norm() / vol.norm())
    err_wiener = float((wiener - vol).norm() / vol.norm())
    assert err_wiener < 0.7 * err_plain
    assert _cc(wiener, vol) > _cc(plain, vol)
    # a vanishing prior shrinks the map to ~0; a huge prior gives the unregularised estimate
    tiny = bp.reconstruct(tau2=tau2 * 1e-9)
    assert float(tiny.norm()) < 0.01 * float(plain.norm())
    huge = bp.reconstruct(tau2=tau2 * 1e9)
    assert torch.allclose(huge, plain.to(torch.float32), atol=1e-4 * float(plain.abs().max()))
    # tau2_fudge multiplies tau2
    assert torch.allclose(bp.reconstruct(tau2=tau2, tau2_fudge=4.0), bp.reconstruct(tau2=4.0 * tau2), atol=1e-6)
    # the Fourier estimate follows data / (weight + 1/(pad³·T·tau2[round(r/pad)])) where the prior dominates
    F = bp.fourier_estimate(tau2=tau2, tau2_fudge=2.0)
    d, w = bp._enforce_hermitian(bp.data, bp.weight)
    c = bp.centre
    for (x, y, z) in [(4, 0, 0), (10, 6, -3), (20, -14, 9), (31, 12, 12)]:
        r = (x * x + y * y + z * z) ** 0.5
        expect = d[z + c, y + c, x] / (w[z + c, y + c, x] + 1.0 / (8.0 * 2.0 * float(tau2[round(r / 2)])))
        assert complex(F[z + c, y + c, x]) == pytest.approx(complex(expect), rel=1e-4, abs=1e-9)
    with pytest.raises(CryopipeError):
        bp.reconstruct(tau2=-tau2)


def test_nearest_neighbour_and_r_max(projector, ref_map):
    A = _random_rotations(800, seed=5)
    F = projector.project(A)
    nn = BackProjector(N, interpolation="nearest", device="cpu")
    nn.insert(F, A)
    assert _cc(nn.reconstruct(), ref_map) > 0.9
    tri = BackProjector(N, device="cpu")
    tri.insert(F, A)
    low = tri.reconstruct(r_max=8)
    ft = rfft3_centered(low.to(torch.float64))
    r = shell_index_3d(N)
    # soft masking / gridding correction in real space leak a little power beyond r_max; it must be tiny
    assert float((ft.abs()[r > 10] ** 2).sum()) < 1e-3 * float((ft.abs()[r <= 8] ** 2).sum())
    # a back-projector built for r_max = 12 inserts only |k| <= 12 and reconstructs the low-passed map
    assert BackProjector(N, r_max=11.2, device="cpu").r_max == 12  # rounded up, as relion_reconstruct --maxres
    assert BackProjector(N, r_max=12.0, device="cpu").r_max == 12
    small = BackProjector(N, r_max=12, device="cpu")
    assert small.R == 24 and small.data.shape == (51, 51, 26)
    small.insert(F, A)
    rec12 = small.reconstruct().to(torch.float64)
    assert _cc(rec12, tri.reconstruct(r_max=12)) > 0.999
    ref_lp = torch.fft.irfftn(rfft3_centered(ref_map.to(torch.float64)) * (shell_index_3d(N) <= 12), s=(N, N, N))
    ref_lp = torch.fft.fftshift(ref_lp)
    assert _cc(rec12, ref_lp) > 0.98


def test_soft_mask_outside_map():
    v = torch.ones(16, 16, 16) * 3.0
    v[0, 0, 0] = 100.0  # a corner spike is replaced by the background average
    out = soft_mask_outside_map(v)
    assert float(out[8, 8, 8]) == 3.0
    assert float(out[0, 0, 0]) < 100.0
    assert torch.allclose(out[0, 0, 0], out[0, 0, 1])


def test_fourier_estimate_follows_relion_reconstruct_rules(projector):
    """Independent (loop-based, as RELION's code is written) evaluation of enforceHermitianSymmetry and the
    skip-gridding weight floor, compared with fourier_estimate on every voxel."""
    A = _random_rotations(3, seed=7)
    noise = torch.randn(3, N, N, generator=torch.Generator().manual_seed(8))
    X = projector.project(A) + rfft2_centered(noise)
    bp = BackProjector(N, device="cpu", dtype=torch.float64)
    bp.insert(X, A)
    d = bp.data.numpy().copy()
    w = bp.weight.numpy().copy()
    c = bp.centre
    # RELION enforceHermitianSymmetry: x = 0 plane, z from -c to c, y from (z < 0 ? 0 : 1) to c
    for iz in range(-c, c + 1):
        for iy in range(0 if iz < 0 else 1, c + 1):
            fsum = d[iz + c, iy + c, 0] + np.conj(d[-iz + c, -iy + c, 0])
            d[iz + c, iy + c, 0] = fsum
            d[-iz + c, -iy + c, 0] = np.conj(fsum)
            s = w[iz + c, iy + c, 0] + w[-iz + c, -iy + c, 0]
            w[iz + c, iy + c, 0] = s
            w[-iz + c, -iy + c, 0] = s
    R, pad, rmax = bp.R, bp.pad, bp.r_max
    zz, yy, xx = np.meshgrid(np.arange(-c, c + 1), np.arange(-c, c + 1), np.arange(0, c + 1), indexing="ij")
    r2 = xx**2 + yy**2 + zz**2
    d[r2 > R * R] = 0
    w[r2 > R * R] = 0
    ires = np.floor(np.sqrt(r2) / pad).astype(int)
    avg = np.zeros(rmax)
    cnt = np.zeros(rmax)
    sel = r2 < R * R
    np.add.at(avg, ires[sel], w[sel])
    np.add.at(cnt, ires[sel], 1)
    avg /= 1000 * cnt
    w_eff = np.maximum(w, avg[np.minimum(ires, rmax - 1)])
    expect = d / w_eff
    got = bp.fourier_estimate().numpy()
    floored = (w < avg[np.minimum(ires, rmax - 1)]) & (np.abs(d) > 0)
    assert floored.sum() > 10  # the floor is exercised
    assert np.allclose(got, expect, rtol=1e-9, atol=1e-12)
    # the estimate is Hermitian on the x = 0 plane
    p = got[:, :, 0]
    assert np.allclose(p, np.conj(p[::-1, ::-1]), atol=1e-12)
