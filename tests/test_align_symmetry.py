"""``cryopipe align-symmetry``: recover known symmetry axes of rotated assemblies built in RELION's conventions.

Ground truth: an assembly built by ``sim.atomic.symmetric_assembly`` has the group's axes on RELION's standard axes.
Its atoms are rotated by a known ``Q`` (so the input map's axes are ``Q·a``) and the potential map computed from
the rotated atoms. ``align_symmetry`` returns ``R`` with ``aligned(x) = V(Rᵀ·x)`` symmetric about the standard axes,
i.e. the input's axes are ``Rᵀ·a``; the truth is ``R = Qᵀ`` up to the normaliser of the group, so axes are compared
(:func:`symmetry_axis_error`), not Euler angles.
"""

from __future__ import annotations

import json

import gemmi
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryopipe.cli import main as cli
from cryopipe.core.geometry import euler_to_matrix, random_orientations
from cryopipe.core.symmetry import symmetrise_volume
from cryopipe.core.symmetry_search import (
    SymmetryScorer,
    rotation_axes,
    symmetry_axis_error,
)
from cryopipe.core.volume_rotation import rotate_volume
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.star import read_star, write_star
from cryopipe.core.symmetry_align import align_symmetry, align_symmetry_full
from cryopipe.jobs.align_symmetry import class_maps_from_model
from cryopipe.sim.atomic import load_model, model_radius, potential_map, symmetric_assembly

BOX = 32
FAST = dict(box_size=BOX, nr_uniform=100, n_candidates=3, seed=0, device="cpu")


@pytest.fixture(scope="module")
def monomer():
    return load_model("3enl")


@pytest.fixture(scope="module")
def small_monomer():
    m = load_model("3enl")
    del m[0][0][80:]  # first 80 residues: a small, asymmetric piece (keeps the T assembly small)
    return m


def _rotated_map(model, group: str, seed: int, fill: float = 2.4):
    """(map of the assembly rotated by Q, Q, pixel size, map of the unrotated assembly)."""
    asm = symmetric_assembly(model, group)
    rad = model_radius(asm)
    apix = fill * rad / BOX
    v0 = potential_map(asm, BOX, apix, blur_B=50, oversample=2)
    Q = Rotation.random(random_state=seed).as_matrix()
    asm[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(Q.tolist()), gemmi.Vec3(0.0, 0.0, 0.0)))
    return potential_map(asm, BOX, apix, blur_B=50, oversample=2), Q, apix, v0


@pytest.fixture(scope="module")
def c4_maps(monomer):
    return _rotated_map(monomer, "C4", 11)


@pytest.mark.parametrize("group, seed, model", [("C4", 11, "monomer"), ("D2", 12, "monomer"),
                                                ("T", 13, "small_monomer")])
def test_recovers_symmetry_axes(request, group, seed, model):
    if group == "C4":
        vol, Q, apix, _ = request.getfixturevalue("c4_maps")
    else:
        vol, Q, apix, _ = _rotated_map(request.getfixturevalue(model), group, seed)
    res = align_symmetry_full(vol, group, pixel_size=apix, **FAST)
    err = symmetry_axis_error(res.rotation, torch.tensor(Q).T, group)
    assert err < 2.0, f"{group}: axes off by {err:.2f} degrees"
    # a wrong answer is far off (the metric can fail): the input orientation itself
    assert symmetry_axis_error(torch.eye(3, dtype=torch.float64), torch.tensor(Q).T, group) > 10.0
    assert res.residual < 0.05
    # the angles describe the matrix (RELION Euler convention)
    np.testing.assert_allclose(euler_to_matrix(*res.angles).numpy(), res.rotation.numpy(), atol=1e-9)
    # the aligned full map is (nearly) symmetric about the standard axes
    al = res.aligned
    sym = symmetrise_volume(al, group)
    assert float(torch.corrcoef(torch.stack([al.flatten(), sym.flatten()]))[0, 1]) > 0.98


def test_asymmetric_monomer_has_high_residual(monomer, c4_maps):
    rad = model_radius(monomer)
    vol = potential_map(monomer, BOX, 2.4 * rad / BOX, blur_B=50, oversample=2)
    res = align_symmetry_full(vol, "C4", **FAST)
    assert res.residual > 0.2  # no false C4 (symmetric assemblies score ~0.01)
    # and a perfectly symmetric map in the standard orientation scores ~0
    s = SymmetryScorer(torch.from_numpy(c4_maps[3]), "C4")
    assert abs(float(s.residual(torch.eye(3, dtype=torch.float64))[0])) < 1e-4
    r90 = torch.tensor(Rotation.from_rotvec([np.pi / 2, 0, 0]).as_matrix())  # axis moved to y: not symmetric
    assert float(s.residual(r90)[0]) > 0.3


def _grid_sample_reference(scorer: SymmetryScorer, pts: torch.Tensor) -> torch.Tensor:
    """Independent sampler (the scorer's former own): the half grid completed to both kx signs with the
    Hermitian mate, then torch's fused trilinear / nearest ``grid_sample`` (align_corners coordinates)."""
    data = scorer.projector.data
    mate = torch.flip(data, dims=(0, 1)).conj()[..., 1:].flip(-1)
    grid = torch.view_as_real(torch.cat([mate, data], dim=-1)).permute(3, 0, 1, 2)[None].contiguous()
    g = (pts.reshape(1, 1, 1, -1, 3) * (scorer.projector.pad / float(scorer.projector.centre))).to(grid.dtype)
    mode = "bilinear" if scorer.interpolation == "trilinear" else "nearest"
    out = torch.nn.functional.grid_sample(grid, g, mode=mode, padding_mode="zeros", align_corners=True).reshape(2, -1)
    return torch.complex(out[0], out[1]).reshape(pts.shape[:-1])


@pytest.mark.parametrize("interpolation", ["trilinear", "nearest"])
def test_scorer_uses_the_projector_sampler(interpolation):
    """The symmetry residual sampled with core.projector's interpolate_half_grid equals the one from an
    independent grid_sample implementation (same padded grid): one Fourier-slice sampler, same numbers."""
    gen = torch.Generator().manual_seed(0)
    vol = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 40, 40, 40, generator=gen), 5, 1, 2)[0, 0]
    scorer = SymmetryScorer(vol, "D3", interpolation=interpolation)
    ang = random_orientations(12, torch.Generator().manual_seed(1))
    rots = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    new = scorer.residual(rots, 14.0)
    scorer._sample = lambda pts: _grid_sample_reference(scorer, pts)   # instance attribute shadows the method
    ref = scorer.residual(rots, 14.0)
    assert float(new.std()) > 1e-3                                      # the rotations score differently
    # nearest: grid_sample rounds halves to even, the projector away from zero (RELION): rare ties differ
    np.testing.assert_allclose(new.numpy(), ref.numpy(), atol=1e-3 if interpolation == "nearest" else 1e-6)


def test_rotate_volume_convention(c4_maps):
    """aligned(x) = V(Rᵀ·x): rotating the map by Q equals the map of the atoms rotated by Q."""
    vol, Q, apix, v0 = c4_maps
    for method in ("fourier", "linear"):
        good = rotate_volume(torch.from_numpy(v0), torch.tensor(Q), method=method).numpy()
        bad = rotate_volume(torch.from_numpy(v0), torch.tensor(Q).T, method=method).numpy()
        c_good = np.corrcoef(good.ravel(), vol.ravel())[0, 1]
        c_bad = np.corrcoef(bad.ravel(), vol.ravel())[0, 1]
        assert c_good > 0.95 and c_bad < 0.6, (method, c_good, c_bad)


def test_axis_helpers():
    folds, axes = rotation_axes(__import__("cryopipe.core.symmetry", fromlist=["x"]).symmetry_operators("D3"))
    assert sorted(folds.tolist()) == [2, 2, 2, 3]
    z = axes[folds == 3][0]
    assert abs(abs(float(z[2])) - 1.0) < 1e-12
    # a rotation about the 3-fold axis (normaliser-like for the axis) keeps the 3-fold but moves the 2-folds by 30°
    rz = torch.tensor(Rotation.from_rotvec([0, 0, np.pi / 6]).as_matrix())
    assert symmetry_axis_error(rz, torch.eye(3, dtype=torch.float64), "D3") == pytest.approx(30.0, abs=1e-6)
    assert symmetry_axis_error(rz, torch.eye(3, dtype=torch.float64), "C3") == pytest.approx(0.0, abs=1e-6)


def test_cli_outputs_and_python_api(monomer, tmp_path, capsys):
    # D2 assembly turned about z only: --only_rot can find it (cheap), the 2-fold axes in the xy plane are the test
    asm = symmetric_assembly(monomer, "D2")
    apix = 2.4 * model_radius(asm) / BOX
    Q = Rotation.from_rotvec([0.0, 0.0, np.radians(27.0)]).as_matrix()
    asm[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(Q.tolist()), gemmi.Vec3(0.0, 0.0, 0.0)))
    vol = potential_map(asm, BOX, apix, blur_B=50, oversample=2)
    write_mrc(tmp_path / "in.mrc", vol, apix)
    out = tmp_path / "aligned.mrc"
    assert cli(["align-symmetry", "--i", str(tmp_path / "in.mrc"), "--o", str(out), "--sym", "d2", "--box_size",
                str(BOX), "--only_rot", "--nr_uniform", "50", "--random_seed", "1", "--apply_sym",
                "--device", "cpu"]) == 0
    data, px = read_mrc(out)
    assert data.shape == (BOX,) * 3 and px == pytest.approx(apix, rel=1e-5)
    info = json.loads((tmp_path / "aligned_symmetry.json").read_text())
    R = torch.tensor(info["rotation_matrix"], dtype=torch.float64)
    assert symmetry_axis_error(R, torch.tensor(Q).T, "D2") < 2.0
    assert abs(info["tilt"]) < 1e-6 and info["symmetry_residual"] < 0.05
    kv = read_star(tmp_path / "aligned_symmetry.star")["align_symmetry"]
    assert kv["rlnSymmetryGroup"] == "D2"
    np.testing.assert_allclose(euler_to_matrix(kv["rlnAngleRot"], kv["rlnAngleTilt"], kv["rlnAnglePsi"]).numpy(),
                               R.numpy(), atol=1e-6)
    # --apply_sym: symmetric output (2-folds about x, y, z map the grid onto itself away from the box edge)
    t = torch.from_numpy(data)
    inner = (symmetrise_volume(t, "D2") - t)[2:-2, 2:-2, 2:-2]
    assert float(inner.abs().max()) < 1e-4 * float(t.abs().max())
    assert "ROT =" in capsys.readouterr().out
    # C1: nothing to search, the map is returned (re-centred only with keep_centre=False)
    al, R1, ang = align_symmetry(vol, "C1", keep_centre=True, device="cpu")
    assert torch.equal(R1, torch.eye(3, dtype=torch.float64)) and np.allclose(al.numpy(), vol)


def test_model_star_class_selection(tmp_path):
    for i in (1, 2, 3):
        write_mrc(tmp_path / f"run_it025_class00{i}.mrc", np.zeros((8, 8, 8), np.float32), 2.0)
    classes = pd.DataFrame({"rlnReferenceImage": [f"Class3D/job010/run_it025_class00{i}.mrc" for i in (1, 2, 3)],
                            "rlnClassDistribution": [0.2, 0.5, 0.3], "rlnEstimatedResolution": [8.0, 12.0, 6.5]})
    model = tmp_path / "run_it025_model.star"
    write_star(model, {"model_general": {"rlnNrClasses": 3}, "model_classes": classes})
    assert [p.name for p in class_maps_from_model(model, "largest")] == ["run_it025_class002.mrc"]
    assert [p.name for p in class_maps_from_model(model, "resol")] == ["run_it025_class003.mrc"]
    assert len(class_maps_from_model(model, "all")) == 3


@pytest.mark.parametrize("argv, needle", [
    (["--sym", "C4H"], "mirrors"),
    (["--sym", "X9"], "unknown symmetry"),
    (["--sym", "C4", "--select_largest_class"], "model.star"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, needle):
    write_mrc(tmp_path / "m.mrc", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), 2.0)
    rc = cli(["align-symmetry", "--i", str(tmp_path / "m.mrc"), "--o", str(tmp_path / "o.mrc"), "--box_size", "16",
              "--nr_uniform", "5", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and needle in err and "\n" not in err
