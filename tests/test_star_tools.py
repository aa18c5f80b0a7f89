"""``cryopipe star`` (relion_star_handler-like utilities) against RELION fixtures and hand-made ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from cryopipe.cli import main as cli
from cryopipe.io.mrc import write_mrc
from cryopipe.io.star import read_star, read_star_with_version, write_star
from cryopipe import starops as st
from cryopipe.errors import CryopipeError


def _run(*argv) -> int:
    return cli(["star", *map(str, argv)])


def _A(rot, tilt, psi) -> np.ndarray:
    """RELION Euler matrix, independently of cryopipe (conventions.md)."""
    return Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T


def _optics(groups=((1, "opticsGroup1", 3.0),), dim=2, size=48) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnOpticsGroup": [g[0] for g in groups], "rlnOpticsGroupName": [g[1] for g in groups],
        "rlnAmplitudeContrast": 0.1, "rlnSphericalAberration": 2.7, "rlnVoltage": 300.0,
        "rlnImagePixelSize": [g[2] for g in groups], "rlnImageSize": size, "rlnImageDimensionality": dim})


# ------------------------------------------------------------------------------------------------ center


def test_center_reproduces_relion_star_handler(relion_dir, tmp_path):
    out = tmp_path / "center.star"
    assert _run("--i", relion_dir / "center_in.star", "--o", out, "--center", "--center_X", 2, "--center_Y", -1,
                "--center_Z", 3) == 0
    got = read_star(out)["particles"]
    ref = read_star(relion_dir / "center_out.star")["particles"]
    inp = read_star(relion_dir / "center_in.star")["particles"]
    assert len(got) == len(ref) == 40
    for c in ("rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.abs(got[c].to_numpy() - ref[c].to_numpy()).max() < 1e-4
        assert np.abs(got[c].to_numpy() - inp[c].to_numpy()).max() > 1.0  # the shift is not trivial
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnImageName"):
        assert (got[c] == inp[c]).all()
    assert "optics" in read_star(out)


def test_center_3d_angstrom_and_30_pixels(tmp_path):
    rng = np.random.default_rng(3)
    n = 12
    ang = np.stack([rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n)], 1)
    ori = rng.uniform(-8, 8, (n, 3))
    grp = rng.integers(1, 3, n)
    apix = np.where(grp == 1, 2.0, 4.0)
    parts = pd.DataFrame({"rlnCoordinateX": 100.0, "rlnCoordinateY": 200.0, "rlnCoordinateZ": 50.0,
                          "rlnAngleRot": ang[:, 0], "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
                          "rlnOriginXAngst": ori[:, 0], "rlnOriginYAngst": ori[:, 1], "rlnOriginZAngst": ori[:, 2],
                          "rlnOpticsGroup": grp, "rlnMicrographName": "TS_01.tomostar"})
    src = tmp_path / "p3d.star"
    write_star(src, {"optics": _optics(((1, "g1", 2.0), (2, "g2", 4.0)), dim=3, size=32), "particles": parts})
    c = np.array([1.5, -2.0, 2.75])
    st.center_star(src, tmp_path / "c3d.star", c)
    got = read_star(tmp_path / "c3d.star")["particles"]
    expect = ori - apix[:, None] * np.stack([_A(*a) @ c for a in ang])
    np.testing.assert_allclose(got[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(), expect,
                               atol=1e-9)
    # RELION 3.0 file: origins in pixels, shifted in pixels, layout kept (no version line, unnamed block)
    p30 = pd.DataFrame({"rlnAngleRot": ang[:, 0], "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
                        "rlnOriginX": ori[:, 0], "rlnOriginY": ori[:, 1], "rlnImageName": "1@a.mrcs"})
    write_star(tmp_path / "p30.star", {"": p30}, version=None)
    st.center_star(tmp_path / "p30.star", tmp_path / "c30.star", c)
    blocks, version = read_star_with_version(tmp_path / "c30.star")
    assert version is None and list(blocks) == [""]
    expect2 = ori[:, :2] - np.stack([_A(*a) @ c for a in ang])[:, :2]
    np.testing.assert_allclose(blocks[""][["rlnOriginX", "rlnOriginY"]].to_numpy(), expect2, atol=1e-9)


# ------------------------------------------------------------------------------------------------ 3.0 <-> 3.1


def test_convert_round_trip_matches_relion(relion_dir, tmp_path):
    p31, p30 = tmp_path / "p31.star", tmp_path / "p30.star"
    # the 3.0 file names images relative to its own folder: run from there (RELION project convention)
    assert _run("--i", relion_dir / "particles_30.star", "--o", p31, "--convert") == 0
    got, ref = read_star(p31), read_star(relion_dir / "particles_31.star")
    assert set(got["optics"].columns) == set(ref["optics"].columns)
    for c in ref["optics"].columns:
        assert got["optics"][c].tolist() == ref["optics"][c].tolist(), c
    g, r = got["particles"], ref["particles"]
    assert set(g.columns) == set(r.columns)
    for c in r.columns:
        if r[c].dtype.kind in "fi":
            np.testing.assert_allclose(g[c].to_numpy(float), r[c].to_numpy(float), atol=1e-6, err_msg=c)
        else:
            assert g[c].tolist() == r[c].tolist(), c
    # and back to 3.0 (explicit and default target)
    assert _run("--i", p31, "--o", p30, "--convert", "--output_version", "3.0") == 0
    blocks, version = read_star_with_version(p30)
    assert version is None and list(blocks) == [""]
    back, orig = blocks[""], read_star(relion_dir / "particles_30.star")[""]
    assert set(back.columns) == set(orig.columns)
    for c in orig.columns:
        if orig[c].dtype.kind in "fi":
            np.testing.assert_allclose(back[c].to_numpy(float), orig[c].to_numpy(float), atol=1e-6, err_msg=c)
        else:
            assert back[c].tolist() == orig[c].tolist(), c


# ------------------------------------------------------------------------------------------------ downgrade


def test_downgrade_for_warp_m(tmp_path):
    parts = pd.DataFrame({
        "rlnCoordinateX": [314.929, 308.439, 10.0], "rlnCoordinateY": [918.864, 928.751, 20.0],
        "rlnCoordinateZ": [349.444, 350.59, 30.0],
        "rlnAngleRot": [-16.9, -16.6, 5.0], "rlnAngleTilt": [175.8, 175.0, 90.0], "rlnAnglePsi": [47.8, 36.5, -3.0],
        "rlnMicrographName": ["TS_01.tomostar", "TS_01.tomostar", "TS_02.tomostar"],
        "rlnImageName": ["a.mrc", "b.mrc", "c.mrc"], "rlnOpticsGroup": [1, 1, 2], "rlnClassNumber": 1,
        "rlnOriginXAngst": [3.947427, 0.447427, 10.0], "rlnOriginYAngst": [0.072427, 5.447427, -10.0],
        "rlnOriginZAngst": [0.072427, 1.947427, 2.5]})
    src = tmp_path / "run_data.star"
    write_star(src, {"optics": _optics(((1, "g1", 5.0), (2, "g2", 2.5)), dim=3, size=64), "particles": parts})
    assert _run("--i", src, "--downgrade") == 0
    out = tmp_path / "run_data_rln3.0.star"  # dynamo2m's default name
    blocks, version = read_star_with_version(out)
    assert version is None and list(blocks) == [""]
    t = blocks[""]
    assert list(t.columns) == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ",
                               "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    apix = np.array([5.0, 5.0, 2.5])
    for a in "XYZ":
        expect = parts[f"rlnCoordinate{a}"].to_numpy() - parts[f"rlnOrigin{a}Angst"].to_numpy() / apix
        np.testing.assert_allclose(t[f"rlnCoordinate{a}"].to_numpy(), expect, atol=1e-9)
    np.testing.assert_allclose(t["rlnCoordinateX"].iloc[0], 314.929 - 3.947427 / 5.0, atol=1e-9)
    assert t["rlnMicrographName"].tolist() == parts["rlnMicrographName"].tolist()
    np.testing.assert_array_equal(t["rlnAnglePsi"].to_numpy(), parts["rlnAnglePsi"].to_numpy())
    # --coord_angpix overrides the divisor; --o names the output
    st.downgrade_star(src, tmp_path / "o.star", coord_angpix=1.0)
    t2 = read_star(tmp_path / "o.star")[""]
    np.testing.assert_allclose(t2["rlnCoordinateZ"].to_numpy(), parts["rlnCoordinateZ"] - parts["rlnOriginZAngst"])


# ------------------------------------------------------------------------------------ split / combine / select


def test_split_counts_and_optics(relion_dir, tmp_path):
    src = relion_dir / "particles_31.star"
    assert _run("--i", src, "--o", tmp_path / "s.star", "--split", "--nr_split", 3) == 0
    outs = [tmp_path / f"s_split{i}.star" for i in (1, 2, 3)]
    tables = [read_star(p) for p in outs]
    assert [len(t["particles"]) for t in tables] == [14, 14, 12]
    ref = read_star(src)
    for t in tables:
        pd.testing.assert_frame_equal(t["optics"], ref["optics"])
    joined = pd.concat([t["particles"] for t in tables])["rlnImageName"].tolist()
    assert joined == ref["particles"]["rlnImageName"].tolist()
    assert [len(i) for i in st.split_indices(40, size_split=15)] == [15, 15, 10]
    assert [len(i) for i in st.split_indices(40, nr_split=2, size_split=15)] == [15, 15]
    a = st.split_indices(40, nr_split=4, random_order=True, random_seed=7)
    b = st.split_indices(40, nr_split=4, random_order=True, random_seed=7)
    assert all((x == y).all() for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(40)) and not (np.concatenate(a) == np.arange(40)).all()


def test_combine_recombines_splits_and_renumbers_optics(relion_dir, tmp_path):
    src = relion_dir / "particles_31.star"
    st.split_star(src, tmp_path / "s.star", nr_split=2)
    out = tmp_path / "joined.star"
    assert _run("--combine", "--i", f"{tmp_path / 's_split1.star'} {tmp_path / 's_split2.star'}", "--o", out,
                "--check_duplicates", "rlnImageName") == 0
    got, ref = read_star(out), read_star(src)
    pd.testing.assert_frame_equal(got["particles"], ref["particles"])
    assert len(got["optics"]) == 1
    # a second data set with another optics group name and pixel size: appended as group 2, rows renumbered
    d2 = ref["particles"].iloc[:5].copy()
    d2["rlnGroupName"] = "g"
    d1 = ref["particles"].copy()
    d1["rlnGroupName"] = "g"
    d1["rlnExtra"] = 1.0  # not in the second file: dropped
    o2 = ref["optics"].copy()
    o2["rlnOpticsGroupName"] = "otherScope"
    o2["rlnImagePixelSize"] = 1.5
    o2["rlnBeamTiltX"] = 0.3
    write_star(tmp_path / "a.star", {"optics": ref["optics"], "particles": d1})
    write_star(tmp_path / "b.star", {"optics": o2, "particles": d2})
    res = st.combine_stars([tmp_path / "a.star", tmp_path / "b.star"], tmp_path / "ab.star")
    assert res.n_total == 45 and res.n_optics_groups == 2
    ab = read_star(tmp_path / "ab.star")
    assert ab["optics"]["rlnOpticsGroup"].tolist() == [1, 2]
    assert ab["optics"]["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "otherScope"]
    assert ab["optics"]["rlnImagePixelSize"].tolist() == [3.0, 1.5]
    assert ab["optics"]["rlnBeamTiltX"].tolist() == [0.0, 0.3]  # filled for the group that lacked it
    assert ab["particles"]["rlnOpticsGroup"].tolist() == [1] * 40 + [2] * 5
    assert ab["particles"]["rlnGroupName"].tolist() == ["g"] * 40 + ["optics2_g"] * 5
    assert "rlnExtra" not in ab["particles"].columns
    # same group name but a different pixel size cannot be joined
    o3 = o2.copy()
    o3["rlnOpticsGroupName"] = "opticsGroup1"
    write_star(tmp_path / "c.star", {"optics": o3, "particles": d2})
    with pytest.raises(CryopipeError, match="rlnImagePixelSize"):
        st.combine_stars([tmp_path / "a.star", tmp_path / "c.star"], tmp_path / "ac.star")
    # a RELION 3.0 input is converted before merging
    res = st.combine_stars([src, relion_dir / "particles_30.star"], tmp_path / "mixed.star")
    mixed = read_star(tmp_path / "mixed.star")
    assert res.n_total == 80 and len(mixed["optics"]) == 1
    np.testing.assert_allclose(mixed["particles"]["rlnOriginXAngst"].iloc[40:].to_numpy(),
                               ref["particles"]["rlnOriginXAngst"].to_numpy(), atol=1e-6)


def test_select_by_value_and_string(relion_dir, tmp_path):
    src = relion_dir / "particles_31.star"
    ref = read_star(src)
    du = ref["particles"]["rlnDefocusU"].to_numpy()
    lo, hi = float(np.sort(du)[10]), float(np.sort(du)[29])  # boundaries are values in the file: inclusive
    assert _run("--i", src, "--o", tmp_path / "sel.star", "--select", "rlnDefocusU", "--minval", lo,
                "--maxval", hi) == 0
    got = read_star(tmp_path / "sel.star")
    assert len(got["particles"]) == 20 == int(((du >= lo) & (du <= hi)).sum())
    pd.testing.assert_frame_equal(got["optics"], ref["optics"])
    assert read_star_with_version(tmp_path / "sel.star")[1] == read_star_with_version(src)[1]
    names = ref["particles"]["rlnMicrographName"]
    res = st.select_star(src, tmp_path / "s2.star", str_label="rlnMicrographName", exclude="mic001")
    assert res.n_selected == int((~names.str.contains("mic001")).sum()) > 0


def test_remove_duplicates(tmp_path):
    parts = pd.DataFrame({
        "rlnCoordinateX": [100.0, 104.0, 300.0, 100.0, 500.0, 600.0],
        "rlnCoordinateY": [100.0, 100.0, 300.0, 100.0, 500.0, 500.0],
        "rlnOriginXAngst": [0.0, 0.0, 0.0, 0.0, 0.0, 200.0],  # the last one is moved onto the one before
        "rlnOriginYAngst": 0.0,
        "rlnMicrographName": ["m1", "m1", "m1", "m2", "m1", "m1"],
        "rlnOpticsGroup": 1, "rlnImageName": [f"{i}@p.mrcs" for i in range(1, 7)]})
    src = tmp_path / "d.star"
    write_star(src, {"optics": _optics(((1, "g", 2.0),)), "particles": parts})
    # 10 Å = 5 px at 2 Å/px: (100,100)-(104,100) are duplicates (the earlier one goes); m2's twin is elsewhere;
    # the last particle's centre is 600 - 200/2 = 500 -> duplicate of particle 5
    assert _run("--i", src, "--o", tmp_path / "u.star", "--remove_duplicates", 10) == 0
    kept = read_star(tmp_path / "u.star")["particles"]["rlnImageName"].tolist()
    assert kept == ["2@p.mrcs", "3@p.mrcs", "4@p.mrcs", "6@p.mrcs"]
    assert read_star(tmp_path / "u_removed.star")["particles"]["rlnImageName"].tolist() == ["1@p.mrcs", "5@p.mrcs"]
    # with --image_angpix 1 the threshold is 10 px but origins count 200 px: particle 6 is no longer a duplicate
    res = st.remove_duplicates_star(src, tmp_path / "u2.star", 10.0, image_angpix=1.0)
    assert res.n_removed == 1


def test_discard_on_stats(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.normal(0.0, 1.0, (40, 16, 16)).astype(np.float32)
    imgs[7] += 5.0   # outlying mean
    imgs[21] *= 6.0  # outlying stddev
    write_mrc(tmp_path / "stack.mrcs", imgs, 1.0)
    parts = pd.DataFrame({"rlnImageName": [f"{i:06d}@stack.mrcs" for i in range(1, 41)], "rlnOpticsGroup": 1})
    src = tmp_path / "p.star"
    write_star(src, {"optics": _optics(((1, "g", 1.0),), size=16), "particles": parts})
    res = st.discard_on_stats_star(src, tmp_path / "k.star", sigma=4.0)
    kept = read_star(tmp_path / "k.star")["particles"]["rlnImageName"].tolist()
    assert res.n_selected == 38 and "000008@stack.mrcs" not in kept and "000022@stack.mrcs" not in kept
    m, s = st.image_stats(parts["rlnImageName"].tolist(), tmp_path)
    np.testing.assert_allclose(m.numpy(), imgs.reshape(40, -1).mean(1), atol=1e-5)
    np.testing.assert_allclose(s.numpy(), imgs.reshape(40, -1).std(1), atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("argv, needle", [
    (["--i", "x.star", "--o", "y.star"], "exactly one of"),
    (["--i", "x.star", "--o", "y.star", "--split", "--center"], "exactly one of"),
    (["--i", "MISSING.star", "--o", "y.star", "--center"], "file not found"),
    (["--i", "IN", "--o", "y.star", "--select", "rlnNoSuchLabel"], "no rlnNoSuchLabel column"),
    (["--i", "IN", "--o", "y.star", "--select", "rlnImageName"], "not numeric"),
    (["--i", "IN", "--o", "y.star", "--split"], "--nr_split"),
    (["--i", "IN", "--o", "y.star", "--combine"], "at least two"),
    (["--i", "IN", "--center"], "--o"),
])
def test_errors_are_one_line(relion_dir, tmp_path, capsys, argv, needle):
    argv = [str(relion_dir / "particles_31.star") if a == "IN" else a for a in argv]
    argv = [str(tmp_path / a) if a.endswith(".star") and "/" not in a else a for a in argv]
    assert _run(*argv) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_combine_needs_matching_tables(relion_dir, tmp_path):
    mics = pd.DataFrame({"rlnMicrographName": ["a.mrc"], "rlnOpticsGroup": [1]})
    opt = _optics().rename(columns={"rlnImagePixelSize": "rlnMicrographPixelSize"})
    write_star(tmp_path / "m.star", {"optics": opt, "micrographs": mics})
    with pytest.raises(CryopipeError, match="different kinds"):
        st.combine_stars([relion_dir / "particles_31.star", tmp_path / "m.star"], tmp_path / "x.star")
