"""Tests for cryopipe.io.star: every RELION fixture reads, round-trips, and agrees with the starfile package."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryopipe.errors import InputFileError
from cryopipe.io.star import read_star, read_star_with_version, star_version, write_star

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "relion"
STAR_FILES = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*.star")) if FIXTURES.exists() else []


def assert_blocks_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        assert type(x) is type(y), name
        if isinstance(x, pd.DataFrame):
            assert list(x.columns) == list(y.columns), name
            assert len(x) == len(y), name
            for c in x.columns:
                assert x[c].dtype == y[c].dtype, (name, c)
                if pd.api.types.is_float_dtype(x[c].dtype):
                    np.testing.assert_array_equal(x[c].to_numpy(), y[c].to_numpy(), err_msg=f"{name}.{c}")
                else:
                    assert x[c].tolist() == y[c].tolist(), (name, c)
        else:
            assert x == y, name
            assert [type(v) for v in x.values()] == [type(v) for v in y.values()], name


@pytest.mark.parametrize("rel", STAR_FILES)
def test_fixture_roundtrip(relion_dir, rel, tmp_path):
    """Every RELION-written STAR file reads, writes back and reads again to identical blocks and types."""
    path = relion_dir / rel
    blocks, version = read_star_with_version(path)
    assert blocks, rel
    out = tmp_path / "out.star"
    write_star(out, blocks, version=version)
    again, v2 = read_star_with_version(out)
    assert v2 == version
    assert_blocks_equal(blocks, again)
    # and the same values as the independent starfile reader
    import starfile

    ref = starfile.read(path, always_dict=True)
    assert list(ref) == list(blocks)
    for name, blk in blocks.items():
        r = ref[name]
        if isinstance(blk, pd.DataFrame):
            assert list(r.columns) == list(blk.columns)
            for c in blk.columns:
                if pd.api.types.is_numeric_dtype(blk[c].dtype):
                    np.testing.assert_allclose(blk[c].to_numpy(float), r[c].to_numpy(float), rtol=0, atol=0)
                else:
                    assert blk[c].tolist() == [str(v) for v in r[c].fillna("").tolist()]
        else:
            for k, v in blk.items():
                assert v == r[k] or str(v) == str(r[k]), (k, v, r[k])


def test_fixture_contents(relion_dir):
    assert star_version(relion_dir / "particles_30.star") is None
    assert star_version(relion_dir / "particles_31.star") == 50001
    assert star_version(relion_dir / "mic/micrographs_ctf.star") == 30001
    p30 = read_star(relion_dir / "particles_30.star")
    assert list(p30) == [""]
    df = p30[""]
    assert df.shape == (40, 22)
    assert df["rlnImageName"].iloc[0] == "00000001@proj_ctf.mrcs"
    assert df["rlnClassNumber"].dtype == np.int64
    assert df["rlnDefocusU"].iloc[0] == pytest.approx(12648.459659, abs=0)
    p31 = read_star(relion_dir / "particles_31.star")
    assert list(p31) == ["optics", "particles"]
    assert p31["optics"]["rlnOpticsGroupName"].tolist() == ["opticsGroup1"]
    assert p31["optics"]["rlnImageSize"].tolist() == [48]
    model = read_star(relion_dir / "class2d/run_it005_model.star")
    assert list(model) == ["model_general", "model_classes", "model_class_1", "model_class_2", "model_class_3",
                           "model_class_4", "model_groups", "model_optics_group_1"]
    gen = model["model_general"]
    assert gen["rlnNrClasses"] == 4 and isinstance(gen["rlnNrClasses"], int)
    assert gen["rlnLogLikelihood"] == pytest.approx(1.296829e06)
    assert gen["rlnAveragePmax"] == pytest.approx(0.159692)
    np.testing.assert_allclose(model["model_classes"]["rlnClassDistribution"], [0.116888, 0.671024, 0.034588, 0.1775])
    assert model["model_classes"]["rlnReferenceImage"].iloc[1] == "00000002@./run_it005_classes.mrcs"
    assert model["model_groups"]["rlnGroupName"].tolist() == [""]  # written as "" by RELION
    assert model["model_class_1"].shape == (25, 9)
    opt = read_star(relion_dir / "class2d/run_it005_optimiser.star")["optimiser_general"]
    assert opt["rlnTomoTomogramsFile"] == "" and opt["rlnSolventMaskName"] == "None"
    assert opt["rlnRandomSeed"] == 1234
    pp = read_star(relion_dir / "postprocess/postprocess.star")
    assert pp["general"]["rlnFinalResolution"] == pytest.approx(8.470588)
    mics = read_star(relion_dir / "mic/micrographs_ctf.star")
    assert mics["micrographs"]["rlnMicrographName"].tolist() == ["Micrographs/mic001.mrc"]


def test_types_quotes_comments_and_empty(tmp_path):
    text = """# a comment before anything
data_general
_rlnFinalResolution   8.5
_rlnTomoName   0001
_rlnSomeCount  0012
_rlnMaskName   ""
_rlnOther      "two words"

data_empty

data_emptyloop

loop_
_rlnA #1
_rlnB #2

data_tab
loop_
_rlnGroupName #1
_rlnTomoName #2
_rlnX #3
_rlnN #4
_rlnFlag #5
_rlnY #6
# a comment line inside the loop
1  01  1.5  7  0 nan   # trailing row comment
"a b"  02  -2e-3  8 1 2.5
""  003  inf  9  0 3
"""
    path = tmp_path / "t.star"
    path.write_text(text)
    b = read_star(path)
    assert list(b) == ["general", "empty", "emptyloop", "tab"]
    g = b["general"]
    assert g == {"rlnFinalResolution": 8.5, "rlnTomoName": "0001", "rlnSomeCount": "0012", "rlnMaskName": "",
                 "rlnOther": "two words"}
    assert b["empty"] == {}
    assert list(b["emptyloop"].columns) == ["rlnA", "rlnB"] and len(b["emptyloop"]) == 0
    t = b["tab"]
    assert t["rlnGroupName"].tolist() == ["1", "a b", ""]  # name label: kept as string
    assert t["rlnTomoName"].tolist() == ["01", "02", "003"]
    assert t["rlnX"].dtype == np.float64 and t["rlnX"].tolist()[:2] == [1.5, -2e-3] and np.isinf(t["rlnX"][2])
    assert t["rlnN"].dtype == np.int64
    assert t["rlnFlag"].dtype == np.int64
    assert t["rlnY"].dtype == np.float64 and np.isnan(t["rlnY"][0])
    out = tmp_path / "o.star"
    write_star(out, b, version=None)
    assert "# version" not in out.read_text()
    assert star_version(out) is None
    assert_blocks_equal(b, read_star(out))


def test_leading_zero_int_column_stays_string(tmp_path):
    path = tmp_path / "z.star"
    path.write_text("data_\nloop_\n_rlnSomething #1\n_rlnK #2\n0001 5\n0002 6\n")
    df = read_star(path)[""]
    assert df["rlnSomething"].tolist() == ["0001", "0002"]
    assert df["rlnK"].tolist() == [5, 6] and df["rlnK"].dtype == np.int64


def test_write_float_formats(tmp_path):
    df = pd.DataFrame({"rlnA": np.array([0.1, 1 / 3, 1e-12, 12345.678901234]),
                       "rlnB": np.array([0.1, 1 / 3, 1e-12, 12345.678], dtype=np.float32),
                       "rlnC": np.array([1, 2, -3, 40000000000])})
    path = tmp_path / "f.star"
    write_star(path, {"t": df})
    back = read_star(path)["t"]
    np.testing.assert_allclose(back["rlnA"].to_numpy(), df["rlnA"].to_numpy(), rtol=5e-12, atol=0)  # float64
    np.testing.assert_array_equal(back["rlnB"].to_numpy().astype(np.float32), df["rlnB"].to_numpy())  # float32 exact
    assert back["rlnC"].dtype == np.int64 and back["rlnC"].tolist() == [1, 2, -3, 40000000000]
    text = path.read_text()
    assert "0.333333333333 0.333333343 " in text and "40000000000\n" in text
    # values with <= 12 significant digits (all RELION output) are written exactly
    exact = pd.DataFrame({"rlnX": [12648.459659, -0.04903, 1.296829e06, 3.386869e-06, 123456.123456]})
    write_star(path, {"t": exact})
    np.testing.assert_array_equal(read_star(path)["t"]["rlnX"].to_numpy(), exact["rlnX"].to_numpy())
    write_star(path, {"t": df}, float_format="%.8g")
    back = read_star(path)["t"]
    np.testing.assert_allclose(back["rlnA"], df["rlnA"], rtol=1e-8)
    assert "# version 30001" in path.read_text()


def test_write_is_atomic_on_error(tmp_path):
    path = tmp_path / "x.star"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_star(path, {"a": [1, 2]})  # type: ignore[dict-item]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.star"]


def test_errors(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        read_star(tmp_path / "missing.star")
    bad = tmp_path / "bad.star"
    bad.write_text("\ndata_x\n\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3 4\n5\n6 7\n")
    with pytest.raises(InputFileError, match=r"bad.star: line 9: loop row has 1 fields but the loop declares 2"):
        read_star(bad)
    bad.write_text("data_x\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3 4 5\n")
    with pytest.raises(InputFileError, match=r"line 6: loop row has 3 fields"):
        read_star(bad)
    bad.write_text("data_x\nloop_\n_rlnA #1\n_rlnName #2\n1 a\n3\n")
    with pytest.raises(InputFileError, match=r"line 6: loop row has 1 fields"):
        read_star(bad)
    bad.write_text("data_x\n_rlnA 1 2\n")
    with pytest.raises(InputFileError, match=r"line 2: expected '_label value'"):
        read_star(bad)
    bad.write_text("1 2 3\n")
    with pytest.raises(InputFileError, match=r"line 1: content before the first data_ block"):
        read_star(bad)
    bad.write_text("data_a\n_rlnA 1\ndata_a\n_rlnA 2\n")
    with pytest.raises(InputFileError, match="appears twice"):
        read_star(bad)
    bad.write_bytes(b"data_x\n\0\1\2binary")
    with pytest.raises(InputFileError, match="not a text file"):
        read_star(bad)
    bad.write_text("data_a\n_rlnA 1\ndata_a\n_rlnA 2\n")
    with pytest.raises(InputFileError) as info:
        read_star(bad)
    assert "\n" not in str(info.value)


def test_speed_1e5_rows(tmp_path):
    """10^5 rows x 20 columns: print write/read times (not asserted)."""
    rng = np.random.default_rng(0)
    n = 100_000
    cols: dict[str, object] = {"rlnImageName": [f"{i % 1000 + 1:06d}@Particles/stack_{i // 1000:04d}.mrcs"
                                                for i in range(n)],
                               "rlnMicrographName": [f"MotionCorr/mic_{i // 1000:04d}.mrc" for i in range(n)]}
    for j in range(15):
        cols[f"rlnValue{j}"] = rng.standard_normal(n) * 10 ** (j % 5)
    for j in range(3):
        cols[f"rlnInt{j}"] = rng.integers(1, 100, n)
    df = pd.DataFrame(cols)
    path = tmp_path / "big.star"
    t0 = time.perf_counter()
    write_star(path, {"particles": df})
    t1 = time.perf_counter()
    back = read_star(path)["particles"]
    t2 = time.perf_counter()
    print(f"\nSTAR 1e5 x 20: write {t1 - t0:.2f} s, read {t2 - t1:.2f} s, {path.stat().st_size / 1e6:.1f} MB")
    assert back.shape == df.shape
    np.testing.assert_allclose(back["rlnValue3"].to_numpy(), df["rlnValue3"].to_numpy(), rtol=5e-12)
    assert back["rlnImageName"].iloc[12345] == df["rlnImageName"].iloc[12345]
