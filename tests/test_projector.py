"""Projector vs RELION 5 relion_project (proj_noctf / proj_ctf fixtures) and analytic checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import irfft2_centered, radius_2d, rfft2_centered
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.projector import Projector, gridding_correction
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star

APIX = 3.0


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.array(a, dtype=np.float64))


@pytest.fixture(scope="module")
def ref_map(relion_dir) -> torch.Tensor:
    vol, apix = read_mrc(relion_dir / "ref_map.mrc")
    assert apix == pytest.approx(APIX)
    return torch.from_numpy(vol.copy())


@pytest.fixture(scope="module")
def projector(ref_map) -> Projector:
    return Projector(ref_map, pad=2, interpolation="trilinear")


def _angles_origins(star_path):
    parts = read_star(star_path)["particles"]
    A = euler_to_matrix(_t(parts["rlnAngleRot"]), _t(parts["rlnAngleTilt"]), _t(parts["rlnAnglePsi"]))
    o = torch.stack([_t(parts["rlnOriginXAngst"]), _t(parts["rlnOriginYAngst"])], dim=-1) / APIX
    return parts, A, o


def _compare(ours: torch.Tensor, theirs: torch.Tensor):
    ours = ours.to(torch.float64)
    theirs = theirs.to(torch.float64)
    a = ours - ours.mean(dim=(1, 2), keepdim=True)
    b = theirs - theirs.mean(dim=(1, 2), keepdim=True)
    cc = (a * b).sum(dim=(1, 2)) / (a.norm(dim=(1, 2)) * b.norm(dim=(1, 2)))
    rel = (ours - theirs).norm(dim=(1, 2)) / theirs.norm(dim=(1, 2))
    scale = (ours * theirs).sum(dim=(1, 2)) / (ours * ours).sum(dim=(1, 2))  # LSQ theirs ≈ scale·ours
    return cc, rel, scale


def _drop_nyquist_shell(imgs: torch.Tensor) -> torch.Tensor:
    """Remove the |k| >= N/2 coefficients: RELION keeps or drops the on-sphere points (kx or ky = ±N/2 on the
    axes) depending on floating-point rounding of |A^T k|², so these 2 coefficients are not reproducible."""
    n = imgs.shape[-1]
    keep = radius_2d(n, dtype=torch.float64) < n / 2 - 0.01
    return irfft2_centered(rfft2_centered(imgs.to(torch.float64)) * keep, n)


def test_projections_match_relion_project(relion_dir, projector):
    _, A, o = _angles_origins(relion_dir / "proj_noctf.star")
    theirs = torch.from_numpy(read_mrc(relion_dir / "proj_noctf.mrcs")[0].copy())
    ours = projector.project_images(A, shifts_px=-o)  # prediction = shift(P, -origin)
    assert ours.shape == theirs.shape == (40, 48, 48)
    cc, rel, scale = _compare(ours, theirs)
    assert float(cc.min()) > 0.9999
    assert float(rel.median()) < 2e-3
    assert float(rel.max()) < 1e-2  # the worst image differs by RELION's rounding-dependent Nyquist point
    assert torch.allclose(scale, torch.ones_like(scale), atol=2e-4)
    # Without the two on-sphere Nyquist coefficients the match is at float precision
    _, rel_in, _ = _compare(_drop_nyquist_shell(ours), _drop_nyquist_shell(theirs))
    assert float(rel_in.max()) < 1e-5


def test_ctf_projections_match_relion_project_ctf(relion_dir, projector):
    parts, A, o = _angles_origins(relion_dir / "proj_ctf.star")
    optics = read_star(relion_dir / "proj_ctf.star")["optics"]
    theirs = torch.from_numpy(read_mrc(relion_dir / "proj_ctf.mrcs")[0].copy())
    ctf = ctf_2d(
        48, APIX, _t(parts["rlnDefocusU"]), _t(parts["rlnDefocusV"]), _t(parts["rlnDefocusAngle"]),
        voltage=float(optics["rlnVoltage"][0]), cs=float(optics["rlnSphericalAberration"][0]),
        amplitude_contrast=float(optics["rlnAmplitudeContrast"][0]), phase_shift=_t(parts["rlnPhaseShift"]),
        bfactor=_t(parts["rlnCtfBfactor"]), scale=_t(parts["rlnCtfScalefactor"]), device="cpu",
    )
    ours = irfft2_centered(projector.project(A, shifts_px=-o) * ctf, 48)
    cc, rel, scale = _compare(ours, theirs)
    phase_rows = _t(parts["rlnPhaseShift"]) > 0
    b_rows = _t(parts["rlnCtfBfactor"]) > 0
    assert int(phase_rows.sum()) == 8 and int(b_rows.sum()) == 8
    assert float(cc.min()) > 0.9999
    assert float(cc[phase_rows].min()) > 0.9999 and float(cc[b_rows].min()) > 0.9999
    assert float(rel[phase_rows].max()) < 1e-2 and float(rel[b_rows].max()) < 1e-2
    assert float(rel.median()) < 2e-3
    assert torch.allclose(scale, torch.ones_like(scale), atol=1e-3)
    _, rel_in, _ = _compare(_drop_nyquist_shell(ours), _drop_nyquist_shell(theirs))
    assert float(rel_in.max()) < 1e-4


def test_projection_is_line_integral(ref_map, projector):
    n = 48
    vol = ref_map.to(torch.float64)
    # Identity orientation: the slice falls on grid points, so the projection is exactly the z-sum of the
    # gridding-corrected map (RELION divides by sinc² before padding), band-limited to |k| <= N/2.
    ours = projector.project_images(torch.eye(3, dtype=torch.float64))[0].to(torch.float64)
    expect = (vol / gridding_correction(n, 96, "trilinear")).sum(dim=0)
    expect = irfft2_centered(rfft2_centered(expect) * (radius_2d(n, dtype=torch.float64) <= n / 2), n)
    assert float((ours - expect).norm() / expect.norm()) < 1e-5
    # hence the DC term is the integral of the gridding-corrected map (1.85 % above the plain sum for this map),
    # exactly what relion_project writes
    assert float(ours.sum()) == pytest.approx(float(expect.sum()), rel=1e-6)
    # Generic orientation against an independent real-space computation: image(x, y) = sum_z V(A^T r),
    # r = (x, y, z) about the centre voxel (trilinear real-space interpolation, so agreement is approximate)
    from scipy.ndimage import map_coordinates

    A = euler_to_matrix(40.0, 65.0, 110.0).to(torch.float64)
    c = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([x, y, z], dim=-1)  # image frame (x, y, z)
    src = r @ A  # rows: (A^T r)^T = r^T A
    coords = np.stack([src[..., 2].numpy(), src[..., 1].numpy(), src[..., 0].numpy()]) + n // 2
    rotated = map_coordinates(vol.numpy(), coords, order=1, mode="constant")
    direct = torch.from_numpy(rotated.sum(axis=0))
    img = projector.project_images(A)[0].to(torch.float64)
    cc = float(((img - img.mean()) * (direct - direct.mean())).sum()
               / ((img - img.mean()).norm() * (direct - direct.mean()).norm()))
    assert cc > 0.99
    # the transposed matrix (a wrong convention) gives a clearly worse match
    img_t = projector.project_images(A.T)[0].to(torch.float64)
    cc_t = float(((img_t - img_t.mean()) * (direct - direct.mean())).sum()
                 / ((img_t - img_t.mean()).norm() * (direct - direct.mean()).norm()))
    assert cc_t < cc - 0.1


def test_batching_chunks_devices_and_shapes(ref_map, projector):
    A = euler_to_matrix(torch.tensor([10.0, 50.0, 200.0]), torch.tensor([30.0, 90.0, 150.0]),
                        torch.tensor([0.0, 45.0, 300.0]))
    full = projector.project(A)
    assert full.shape == (3, 48, 25) and full.dtype == torch.complex64
    small_chunks = projector.project(A, chunk_pixels=10)
    assert torch.equal(full, small_chunks)
    single = projector.project(A[1])
    assert torch.allclose(single[0], full[1])
    # r_max zeroes everything beyond it
    lim = projector.project(A, r_max=10)
    r = radius_2d(48)
    assert torch.all(lim[:, r > 10] == 0)
    assert torch.allclose(lim[:, r <= 10], full[:, r <= 10])
    # shifts: a projection shifted by (dx, dy) equals the unshifted one moved by +shift
    sh = torch.tensor([[2.0, -3.0]] * 3)
    moved = projector.project_images(A, sh)
    base = projector.project_images(A)
    assert torch.allclose(moved, torch.roll(base, shifts=(-3, 2), dims=(-2, -1)), atol=1e-4)
    # real-space projections are consistent with project()
    assert torch.allclose(irfft2_centered(full, 48), base, atol=1e-5)


def test_nearest_neighbour_and_gridding(ref_map):
    nn = Projector(ref_map, pad=2, interpolation="nearest")
    tri = Projector(ref_map, pad=2)
    A = euler_to_matrix(torch.tensor([33.0]), torch.tensor([71.0]), torch.tensor([12.0]))
    a = nn.project_images(A).to(torch.float64)
    b = tri.project_images(A).to(torch.float64)
    cc = float(((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()).norm() * (b - b.mean()).norm()))
    assert cc > 0.98
    g = gridding_correction(48, 96, "trilinear")
    assert g[24, 24, 24] == 1.0
    assert float(g[24, 24, 0]) == pytest.approx(float(torch.sinc(torch.tensor(24 / 96.0))) ** 2)
    with pytest.raises(ValueError):
        Projector(ref_map, interpolation="cubic")
    with pytest.raises(ValueError):
        Projector(ref_map[0])


@pytest.mark.parametrize("n,pad", [(45, 2.0), (32, 3.0), (40, 1.5)])
def test_other_box_sizes_and_padding(n, pad):
    # identity orientation: exact z-sum of the gridding-corrected map (band-limited to |k| <= n//2)
    g = torch.Generator().manual_seed(n)
    vol = torch.randn(n, n, n, generator=g, dtype=torch.float64)
    proj = Projector(vol, pad=pad, dtype=torch.float64)
    img = proj.project_images(torch.eye(3, dtype=torch.float64))[0]
    expect = (vol / gridding_correction(n, proj.padn, "trilinear")).sum(dim=0)
    ft = rfft2_centered(expect)
    kx = torch.arange(n // 2 + 1, dtype=torch.float64)
    rows = torch.arange(n)
    ky = torch.where(rows <= n // 2, rows, rows - n).to(torch.float64)
    keep = (kx[None, :] ** 2 + ky[:, None] ** 2) <= (n // 2) ** 2
    expect = irfft2_centered(ft * keep, n)
    err = float((img - expect).norm() / expect.norm())
    if float(pad).is_integer():  # slice points pad·k fall on grid points: no interpolation at all
        assert err < 1e-6
    else:  # white noise is the worst case for trilinear interpolation between samples
        assert err < 0.5
    # a generic orientation agrees with pad-2 trilinear closely (different padding = different interpolation)
    A = euler_to_matrix(25.0, 80.0, 140.0)
    ref = Projector(vol, pad=4, dtype=torch.float64).project_images(A)[0]
    cc = float(((proj.project_images(A)[0] - ref.mean()) * (ref - ref.mean())).sum()
               / ((proj.project_images(A)[0] - ref.mean()).norm() * (ref - ref.mean()).norm()))
    assert cc > 0.9
