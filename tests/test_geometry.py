"""RELION Euler conventions, matrix -> angles branches, angular distances and --center re-centring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryopipe.core.geometry import (
    angular_distance,
    axis_angle_matrix,
    direction_to_angles,
    euler_to_matrix,
    matrix_to_euler,
    recenter_origins,
    rotation_2d,
    viewing_direction,
)


def _read_particles_table(path):
    """The ``particles`` loop of a RELION 3.1 STAR file as a DataFrame (cryopipe.io.star when available)."""
    try:
        from cryopipe.io.star import read_star  # type: ignore[attr-defined]
    except ImportError:
        import starfile

        return starfile.read(path, always_dict=True)["particles"]
    return read_star(path)["particles"]


def _random_angles(n, seed=0):
    rng = np.random.default_rng(seed)
    rot = rng.uniform(-180, 360, n)
    tilt = rng.uniform(0, 180, n)
    psi = rng.uniform(-180, 360, n)
    return rot, tilt, psi


def test_euler_matches_scipy_transpose_batched():
    rot, tilt, psi = _random_angles(60)
    A = euler_to_matrix(*(torch.as_tensor(x).reshape(3, 4, 5) for x in (rot, tilt, psi)))
    assert A.shape == (3, 4, 5, 3, 3) and A.dtype == torch.float64
    ref = Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], 1), degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(A.reshape(-1, 3, 3).numpy(), ref, atol=1e-12)
    # Python floats next to float64 tensors are taken in float64 (0.1 is not rounded to float32 on the way)
    A01 = euler_to_matrix(torch.tensor([10.0], dtype=torch.float64), 0.1, 33.3)
    ref01 = Rotation.from_euler("ZYZ", [10.0, 0.1, 33.3], degrees=True).as_matrix().T
    np.testing.assert_allclose(A01[0].numpy(), ref01, atol=1e-15)
    # float32 inputs stay float32, broadcasting of a scalar works
    A32 = euler_to_matrix(torch.tensor(rot[:7], dtype=torch.float32), 30.0, 0.0)
    assert A32.dtype == torch.float32 and A32.shape == (7, 3, 3)
    ref32 = Rotation.from_euler("ZYZ", np.stack([rot[:7], np.full(7, 30.0), np.zeros(7)], 1), degrees=True)
    np.testing.assert_allclose(A32.numpy(), ref32.as_matrix().transpose(0, 2, 1), atol=2e-6)


def test_viewing_direction_is_row3_and_maps_to_z():
    rot, tilt, psi = _random_angles(50, seed=1)
    A = euler_to_matrix(torch.as_tensor(rot), torch.as_tensor(tilt), torch.as_tensor(psi))
    v = viewing_direction(A)
    r, t = np.deg2rad(rot), np.deg2rad(tilt)
    expect = np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], 1)
    np.testing.assert_allclose(v.numpy(), expect, atol=1e-12)
    # the viewing direction (in reference coordinates) is mapped onto the observation's z axis
    np.testing.assert_allclose((A @ v[..., None])[..., 0].numpy(), np.tile([0, 0, 1.0], (50, 1)), atol=1e-12)
    # and back to (rot, tilt)
    r2, t2 = direction_to_angles(v)
    np.testing.assert_allclose(t2.numpy(), tilt, atol=1e-9)
    np.testing.assert_allclose(((r2.numpy() - rot + 180) % 360) - 180, 0, atol=1e-9)


def test_matrix_to_euler_regular_branch():
    rot, tilt, psi = _random_angles(500, seed=2)
    tilt = np.clip(tilt, 0.5, 179.5)
    ang = matrix_to_euler(euler_to_matrix(torch.as_tensor(rot), torch.as_tensor(tilt), torch.as_tensor(psi))).numpy()
    wrap = lambda x: ((x + 180) % 360) - 180  # noqa: E731
    np.testing.assert_allclose(wrap(ang[:, 0] - rot), 0, atol=1e-9)
    np.testing.assert_allclose(ang[:, 1], tilt, atol=1e-9)
    np.testing.assert_allclose(wrap(ang[:, 2] - psi), 0, atol=1e-9)
    assert (ang[:, 0] > -180).all() and (ang[:, 0] <= 180).all() and (ang[:, 2] > -180).all()
    # negative tilt is returned as the equivalent positive-tilt triple (RELION: tilt in [0, 180])
    A = euler_to_matrix(torch.tensor(40.0, dtype=torch.float64), -30.0, 10.0)
    r, t, p = matrix_to_euler(A).tolist()
    assert t == pytest.approx(30.0) and r == pytest.approx(-140.0) and p == pytest.approx(-170.0)
    assert torch.allclose(euler_to_matrix(torch.tensor(r, dtype=torch.float64), t, p), A, atol=1e-12)


def test_matrix_to_euler_gimbal_lock_branches():
    rot = torch.tensor([30.0, -100.0, 170.0], dtype=torch.float64)
    psi = torch.tensor([20.0, 50.0, 40.0], dtype=torch.float64)
    A0 = euler_to_matrix(rot, 0.0, psi)
    ang0 = matrix_to_euler(A0)
    # tilt 0: only rot+psi is defined; RELION puts it all in psi
    np.testing.assert_allclose(ang0[:, 0].numpy(), 0.0)
    np.testing.assert_allclose(ang0[:, 1].numpy(), 0.0)
    np.testing.assert_allclose(ang0[:, 2].numpy(), [50.0, -50.0, -150.0], atol=1e-9)
    A180 = euler_to_matrix(rot, 180.0, psi)
    ang180 = matrix_to_euler(A180)
    np.testing.assert_allclose(ang180[:, 0].numpy(), 0.0)
    np.testing.assert_allclose(ang180[:, 1].numpy(), 180.0)
    # with tilt = 180, A = Rz(psi - rot) Ry(180): psi' = psi - rot
    np.testing.assert_allclose(ang180[:, 2].numpy(), [-10.0, 150.0, -130.0], atol=1e-9)
    for A, ang in ((A0, ang0), (A180, ang180)):
        np.testing.assert_allclose(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]).numpy(), A.numpy(), atol=1e-12)
    # a tilt of 1e-7 degrees is below RELION's 16*FLT_EPSILON threshold -> gimbal branch; 1e-3 degrees is not
    tiny = matrix_to_euler(euler_to_matrix(torch.tensor([30.0, 30.0], dtype=torch.float64),
                                           torch.tensor([1e-7, 1e-3], dtype=torch.float64), 20.0))
    assert tiny[0, 0] == 0.0 and tiny[0, 1] == 0.0 and tiny[0, 2] == pytest.approx(50.0)
    assert tiny[1, 0] == pytest.approx(30.0, abs=1e-6) and tiny[1, 1] == pytest.approx(1e-3, rel=1e-6)


def test_rotation_2d_is_euler_block():
    psi = torch.linspace(-180, 360, 37, dtype=torch.float64)
    R = rotation_2d(psi)
    A = euler_to_matrix(torch.zeros_like(psi), 0.0, psi)
    torch.testing.assert_close(R, A[..., :2, :2])
    # the psi=90 rotation maps x to -y (coordinate-frame rotation, as RELION's Euler matrix)
    torch.testing.assert_close(rotation_2d(torch.tensor(90.0, dtype=torch.float64)) @ torch.tensor([1.0, 0.0],
                               dtype=torch.float64), torch.tensor([0.0, -1.0], dtype=torch.float64))


def test_angular_distance():
    rng = np.random.default_rng(3)
    axes = torch.as_tensor(rng.normal(size=(40, 3)))
    angles = torch.as_tensor(np.concatenate([rng.uniform(0, 180, 36), [0.0, 1e-4, 179.9, 180.0]]))
    R = axis_angle_matrix(axes, angles)
    rot, tilt, psi = _random_angles(40, seed=4)
    B = euler_to_matrix(torch.as_tensor(rot), torch.as_tensor(tilt), torch.as_tensor(psi))
    d = angular_distance(R @ B, B)
    np.testing.assert_allclose(d.numpy(), angles.numpy(), atol=1e-6)
    # symmetric and broadcasting ([40] vs [1])
    np.testing.assert_allclose(angular_distance(B, R @ B).numpy(), angles.numpy(), atol=1e-6)
    assert angular_distance(B, B[:1]).shape == (40,)
    # tilt difference of 7 degrees about the same rot/psi is 7 degrees
    d7 = angular_distance(euler_to_matrix(10.0, 50.0, 20.0), euler_to_matrix(10.0, 57.0, 20.0))
    assert float(d7) == pytest.approx(7.0, abs=1e-4)


def test_axis_angle_matrix_is_active_right_handed():
    Rz = axis_angle_matrix(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), 90.0)
    torch.testing.assert_close(Rz @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                               torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_recenter_origins_matches_relion_star_handler(relion_dir):
    """relion_star_handler --center --center_X 2 --center_Y -1 --center_Z 3 (center_in.star -> center_out.star)."""
    src = _read_particles_table(relion_dir / "center_in.star")
    out = _read_particles_table(relion_dir / "center_out.star")
    angles = torch.as_tensor(src[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64))
    origins = torch.as_tensor(src[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64))
    new = recenter_origins(angles, origins, (2, -1, 3), 3.0)
    expect = out[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64)
    assert len(expect) == 40
    np.testing.assert_allclose(new.numpy(), expect, atol=1e-4, rtol=0)
    # the shifts are substantial (not a no-op), and float32 inputs also meet the tolerance
    assert np.abs(expect - origins.numpy()).max() > 5.0
    new32 = recenter_origins(angles.float(), origins.float(), (2, -1, 3), 3.0)
    np.testing.assert_allclose(new32.numpy(), expect, atol=1e-4, rtol=0)


def test_recenter_origins_3d_and_per_particle_pixel_size():
    angles = torch.tensor([[0.0, 0.0, 0.0], [0.0, 90.0, 0.0]], dtype=torch.float64)
    origins = torch.zeros(2, 3, dtype=torch.float64)
    new = recenter_origins(angles, origins, (1.0, 2.0, 3.0), torch.tensor([1.0, 2.0], dtype=torch.float64))
    # identity: origin -= c; tilt 90 about y: A (1,2,3) = (-3, 2, 1)
    np.testing.assert_allclose(new.numpy(), [[-1.0, -2.0, -3.0], [6.0, -4.0, -2.0]], atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_geometry_on_cuda():
    rot, tilt, psi = (torch.as_tensor(x, device="cuda") for x in _random_angles(100, seed=5))
    A = euler_to_matrix(rot, tilt, psi)
    assert A.device.type == "cuda"
    ang = matrix_to_euler(A)
    torch.testing.assert_close(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]), A)
    assert float(angular_distance(A, A).max()) < 1e-5
