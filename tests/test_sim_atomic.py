"""sim.atomic: PDB -> potential map, checked against the RELION fixtures' ref_map.mrc (same recipe)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from cryopipe.errors import CryopipeError
from cryopipe.sim.atomic import load_model, model_radius, potential_map, symmetric_assembly


@pytest.fixture(scope="module")
def enolase():
    return load_model("3enl")


def test_load_model_removes_hydrogens_and_waters(enolase):
    n_atoms = sum(len(r) for ch in enolase[0] for r in ch)
    assert n_atoms == 3294  # README §1: "3294 non-H atoms"
    assert all(not r.is_water() for ch in enolase[0] for r in ch)
    assert model_radius(enolase) == pytest.approx(37.3, abs=0.05)  # README: max radius 37.3 Å


def test_load_model_missing_file(tmp_path):
    with pytest.raises(CryopipeError, match="not found"):
        load_model(tmp_path / "nope.pdb")


def test_potential_map_matches_ref_map(enolase, relion_dir):
    with mrcfile.open(relion_dir / "ref_map.mrc", permissive=True) as f:
        ref = np.asarray(f.data, dtype=np.float64)
    ours = potential_map(enolase, 48, 3.0, blur_B=20.0)
    assert ours.shape == (48, 48, 48) and ours.dtype == np.float32
    cc = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    assert cc > 0.999, cc
    scale = float((ours * ref).sum() / (ours * ours).sum())
    assert scale == pytest.approx(1.0, abs=0.01)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_potential_map_centre_of_mass(enolase):
    vol = potential_map(enolase, 48, 3.0).astype(np.float64)
    z, y, x = np.indices(vol.shape)
    com = [(vol * c).sum() / vol.sum() for c in (x, y, z)]
    np.testing.assert_allclose(com, [24, 24, 24], atol=0.1)
    # an odd box: centre at N//2 = 22
    vol = potential_map(enolase, 45, 3.2).astype(np.float64)
    z, y, x = np.indices(vol.shape)
    com = [(vol * c).sum() / vol.sum() for c in (x, y, z)]
    np.testing.assert_allclose(com, [22, 22, 22], atol=0.1)


def test_potential_map_no_centering_keeps_coordinates(enolase):
    """center=False: an atom at (x, y, z) Å lies at voxel (x, y, z)/apix."""
    import gemmi

    st = enolase.clone()
    com = st[0].calculate_center_of_mass()
    # move the centre of mass to (30, 60, 90) Å -> voxel (10, 20, 30) at 3 Å
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(30 - com.x, 60 - com.y, 90 - com.z)))
    vol = potential_map(st, 64, 3.0, center=False).astype(np.float64)
    z, y, x = np.indices(vol.shape)
    com_px = [(vol * c).sum() / vol.sum() for c in (x, y, z)]
    np.testing.assert_allclose(com_px, [10, 20, 30], atol=0.1)


def _rotate_int(vol: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``out(p) = vol(R·(p − c) + c)`` for an integer (signed permutation) matrix R acting on (x, y, z), c = N//2."""
    n = vol.shape[0]
    c = n // 2
    z, y, x = np.indices(vol.shape)
    p = np.stack([x, y, z]) - c
    q = np.einsum("ij,j...->i...", r, p) + c
    return vol[q[2] % n, q[1] % n, q[0] % n]


def test_symmetric_assembly_is_symmetric(enolase):
    pytest.importorskip("cryopipe.core.symmetry")
    from cryopipe.core.symmetry import symmetry_operators

    st = symmetric_assembly(enolase, "C4", (50.0, 0.0, 0.0))
    n_mono = sum(len(r) for ch in enolase[0] for r in ch)
    assert sum(len(r) for ch in st[0] for r in ch) == 4 * n_mono
    vol = potential_map(st, 64, 6.0, oversample=2)
    # C4 about z: rotating the map by 90° about the z axis through voxel N//2 gives the same map
    rot = _rotate_int(vol, np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]))
    cc = np.corrcoef(vol.ravel(), rot.ravel())[0, 1]
    assert cc > 0.999, cc
    # D2: also symmetric about x; the operators themselves come from core.symmetry
    st = symmetric_assembly(enolase, "D2", 80.0)
    assert len(st[0]) == len(symmetry_operators("D2")) * len(enolase[0])
    vol = potential_map(st, 72, 6.0, oversample=2).astype(np.float64)
    z, y, x = np.indices(vol.shape)
    com = [(vol * c).sum() / vol.sum() for c in (x, y, z)]
    np.testing.assert_allclose(com, [36, 36, 36], atol=0.1)
    for r in (np.diag([1, -1, -1]), np.diag([-1, 1, -1]), np.diag([-1, -1, 1])):  # 180° about x, y, z
        assert np.corrcoef(vol.ravel(), _rotate_int(vol, r).ravel())[0, 1] > 0.999
    # and not symmetric under an operator outside the group (90° about z)
    assert np.corrcoef(vol.ravel(), _rotate_int(vol, np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])).ravel())[0, 1] < 0.9


def test_symmetric_assembly_automatic_offset_is_invariant(enolase):
    """Default offset (T, 12 copies): no clashes, and the atom set is invariant under every operator."""
    pytest.importorskip("cryopipe.core.symmetry")
    from scipy.spatial import cKDTree

    from cryopipe.core.symmetry import symmetry_operators

    st = symmetric_assembly(enolase, "T")
    xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for ch in st[0] for r in ch for a in r])
    n_mono = sum(len(r) for ch in enolase[0] for r in ch)
    assert len(xyz) == 12 * n_mono
    tree = cKDTree(xyz)
    for r in symmetry_operators("T").cpu().numpy():
        d, _ = tree.query(xyz @ r.T)
        assert d.max() < 1e-3
    # copies do not overlap: every atom's nearest atom of another copy is >= 2 Å away
    label = np.repeat(np.arange(12), n_mono)
    pairs = tree.query_pairs(2.0, output_type="ndarray")
    assert not np.any(label[pairs[:, 0]] != label[pairs[:, 1]])
    np.testing.assert_allclose(xyz.mean(axis=0), 0, atol=1e-3)  # symmetry centre at the origin


def test_symmetric_assembly_detects_clash(enolase):
    pytest.importorskip("cryopipe.core.symmetry")
    with pytest.raises(CryopipeError, match="overlap"):
        symmetric_assembly(enolase, "C2", (5.0, 0.0, 0.0))
