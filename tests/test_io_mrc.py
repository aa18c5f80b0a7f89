"""Tests for cryopipe.io.mrc against the RELION fixtures and mrcfile's own validator."""

from __future__ import annotations

import pickle
import shutil

import mrcfile
import numpy as np
import pytest
import torch

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.mrc import (
    ImageReader,
    MrcStack,
    MrcStackWriter,
    format_image_name,
    mrc_info,
    parse_image_name,
    parse_image_names,
    read_mrc,
    write_mrc,
)
from cryopipe.io.star import read_star


def test_read_ref_map(relion_dir):
    data, apix = read_mrc(relion_dir / "ref_map.mrc")
    assert data.shape == (48, 48, 48) and data.dtype == np.float32
    assert apix == 3.0
    # README: mean 0.0026, sd 0.0203, min -0.087, max 0.316
    assert data.mean() == pytest.approx(0.0026, abs=5e-5)
    assert data.std() == pytest.approx(0.0203, abs=5e-5)
    assert data.min() == pytest.approx(-0.087, abs=5e-4) and data.max() == pytest.approx(0.316, abs=5e-4)
    info = mrc_info(relion_dir / "ref_map.mrc")
    assert info.mode == 2 and info.shape == (48, 48, 48) and not info.is_stack and info.pixel_size == 3.0
    assert info.dmean == pytest.approx(float(data.mean()), rel=1e-4)


def test_read_float16_stack(relion_dir):
    path = relion_dir / "class2d/particles.mrcs"
    info = mrc_info(path)
    assert info.mode == 12 and info.is_stack and info.shape == (600, 48, 48) and info.pixel_size == 3.0
    data, apix = read_mrc(path)
    assert data.shape == (600, 48, 48) and data.dtype == np.float32 and apix == 3.0
    # Not normalised: mean ~ 0; noise sigma 1.017 plus a signal of variance <= 0.1035 (README), so
    # 1.017 < sd < sqrt(1.017^2 + 0.1035) = 1.067 (the README's "sd ~ 1.07" is this upper bound).
    assert abs(data.mean()) < 0.05 and 1.017 < data.std() < 1.067
    assert data.std() == pytest.approx(info.rms, rel=1e-4) and data.mean() == pytest.approx(info.dmean, rel=1e-3)
    with mrcfile.open(path) as m:  # exact float16 values
        ref16 = m.data.astype(np.float32)
        ref16[np.abs(ref16) < 2.0 ** -14] = 0.0  # RELION reads float16 subnormals as 0
        np.testing.assert_array_equal(data, ref16)


def test_relion_written_stack(relion_dir):
    """proj_ctf.mrcs was written by relion_project: a 40-image float32 stack with RELION's header."""
    stack = MrcStack(relion_dir / "proj_ctf.mrcs")
    assert stack.shape == (40, 48, 48) and len(stack) == 40 and stack.pixel_size == 3.0 and stack.mode == 2
    full, _ = read_mrc(relion_dir / "proj_ctf.mrcs")
    np.testing.assert_array_equal(stack[7], full[7])
    np.testing.assert_array_equal(stack[[9, 2, 9, 0]], full[[9, 2, 9, 0]])
    np.testing.assert_array_equal(stack[3:6], full[3:6])
    np.testing.assert_array_equal(stack[np.array([1, 5, 30])], full[[1, 5, 30]])
    with pytest.raises(InputFileError, match=r"proj_ctf.mrcs: image index 41 \(1-based\) out of range: the stack "
                                             r"has 40 images"):
        stack[40]
    with pytest.raises(InputFileError, match="out of range"):
        stack[[-1]]
    again = pickle.loads(pickle.dumps(stack))
    np.testing.assert_array_equal(again[39], full[39])
    stack.close()
    again.close()


@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6),
                                        (np.float16, 12)])
@pytest.mark.parametrize("suffix", [".mrc", ".mrcs"])
def test_roundtrip_modes(tmp_path, dtype, mode, suffix):
    rng = np.random.default_rng(mode)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -1000), min(info.max, 1000), size=(5, 12, 10)).astype(dtype)
    else:
        data = rng.standard_normal((5, 12, 10)).astype(dtype)
    path = tmp_path / f"x{suffix}"
    write_mrc(path, data, pixel_size=1.37, dtype=dtype)
    assert mrcfile.validate(str(path), print_file=open("/dev/null", "w"))
    back, apix = read_mrc(path)
    np.testing.assert_array_equal(back, data.astype(np.float32))
    assert apix == pytest.approx(1.37, rel=1e-6)
    info = mrc_info(path)
    assert info.mode == mode and info.shape == (5, 12, 10)
    assert info.is_stack == (suffix == ".mrcs")
    with mrcfile.open(path) as m:
        assert int(m.header.ispg) == (0 if suffix == ".mrcs" else 1)
        assert float(m.header.cella.x) / int(m.header.mx) == pytest.approx(1.37, rel=1e-6)
    d64 = data.astype(np.float64)
    assert info.dmin == pytest.approx(d64.min(), rel=1e-3) and info.dmax == pytest.approx(d64.max(), rel=1e-3)
    assert info.dmean == pytest.approx(d64.mean(), rel=1e-3, abs=1e-3)
    assert info.rms == pytest.approx(d64.std(), rel=1e-3)


def test_write_2d_and_torch(tmp_path):
    img = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    write_mrc(tmp_path / "one.mrc", img, 2.0)
    back, apix = read_mrc(tmp_path / "one.mrc")
    assert back.shape == (3, 4) and apix == 2.0
    np.testing.assert_array_equal(back, img.numpy())
    write_mrc(tmp_path / "one.mrcs", img, 2.0)
    assert read_mrc(tmp_path / "one.mrcs")[0].shape == (1, 3, 4)


def test_write_errors_are_atomic(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        write_mrc(tmp_path / "bad.mrc", np.full((4, 4), 300.0), 1.0, dtype=np.int8)
    with pytest.raises(ValueError, match="unsupported MRC dtype"):
        write_mrc(tmp_path / "bad.mrc", np.zeros((4, 4)), 1.0, dtype=np.float64)
    assert list(tmp_path.iterdir()) == []


def test_stack_writer(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((23, 16, 16)).astype(np.float32)
    path = tmp_path / "big.mrcs"
    with MrcStackWriter(path, 23, (16, 16), 1.5) as w:
        for i in range(0, 23, 5):
            w[i:i + 5] = data[i:i + 5]
        assert not path.exists()  # renamed only on close
    back, apix = read_mrc(path)
    np.testing.assert_array_equal(back, data)
    assert apix == 1.5
    info = mrc_info(path)
    assert info.is_stack and info.mode == 2
    assert info.dmean == pytest.approx(data.mean(), abs=1e-6) and info.rms == pytest.approx(data.std(), rel=1e-5)
    assert info.dmin == data.min() and info.dmax == data.max()
    with pytest.raises(RuntimeError):
        with MrcStackWriter(tmp_path / "fail.mrcs", 3, (4, 4), 1.0) as w:
            w[0] = np.zeros((4, 4))
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.mrcs"]


def test_bad_files(relion_dir, tmp_path):
    raw = (relion_dir / "proj_ctf.mrcs").read_bytes()
    trunc = tmp_path / "trunc.mrcs"
    trunc.write_bytes(raw[:-4000])
    with pytest.raises(InputFileError, match=r"trunc.mrcs: truncated: \d+ bytes but the header \(48x48x40, mode 2\) "
                                             r"needs \d+") as info:
        read_mrc(trunc)
    assert "\n" not in str(info.value)
    with pytest.raises(InputFileError, match="truncated"):
        MrcStack(trunc)
    badmode = bytearray(raw)
    badmode[12:16] = np.int32(5).tobytes()
    (tmp_path / "mode5.mrcs").write_bytes(bytes(badmode))
    with pytest.raises(InputFileError, match=r"mode5.mrcs: unsupported MRC mode 5"):
        read_mrc(tmp_path / "mode5.mrcs")
    mode1 = bytearray(raw)  # float32 data under a header that says int16
    mode1[12:16] = np.int32(1).tobytes()
    (tmp_path / "mode1.mrcs").write_bytes(bytes(mode1))
    with pytest.raises(InputFileError, match=r"mode1.mrcs: header mode 1 \(int16\) does not match the data: .* 4 bytes "
                                             r"each \(mode 2\?\)") as info:
        read_mrc(tmp_path / "mode1.mrcs")
    assert "\n" not in str(info.value)
    (tmp_path / "text.mrc").write_text("hello" * 400)
    with pytest.raises(InputFileError, match=r"text.mrc: not an MRC file"):
        read_mrc(tmp_path / "text.mrc")
    (tmp_path / "tiny.mrc").write_bytes(b"\0" * 100)
    with pytest.raises(InputFileError, match=r"tiny.mrc: not an MRC file \(only 100 bytes"):
        mrc_info(tmp_path / "tiny.mrc")
    with pytest.raises(InputFileError, match=r"missing.mrc: file not found"):
        read_mrc(tmp_path / "missing.mrc")


def test_parse_image_name():
    assert parse_image_name("000123@Particles/a.mrcs") == (122, "Particles/a.mrcs")
    assert parse_image_name("1@x.mrcs") == (0, "x.mrcs")
    assert parse_image_name("Micrographs/mic001.mrc") == (0, "Micrographs/mic001.mrc")
    for bad in ["0@x.mrcs", "abc@x.mrcs", "-3@x.mrcs", "5@"]:
        with pytest.raises(CryopipeError, match="invalid image name"):
            parse_image_name(bad)
    idx, files = parse_image_names(["000002@a.mrcs", "10@b/c.mrcs", "m.mrc"])
    assert idx.tolist() == [1, 9, 0] and files.tolist() == ["a.mrcs", "b/c.mrcs", "m.mrc"]
    with pytest.raises(CryopipeError, match=r"row 2"):
        parse_image_names(["1@a.mrcs", "000000@a.mrcs"])
    assert format_image_name(122, "Particles/a.mrcs") == "00000123@Particles/a.mrcs"
    assert format_image_name(np.array([0, 1]), "s.mrcs") == ["00000001@s.mrcs", "00000002@s.mrcs"]


def test_image_reader_relion_star(relion_dir):
    """rlnImageName of RELION's proj_ctf.star (00000001@proj_ctf.mrcs...) is 1-based into the stack."""
    names = read_star(relion_dir / "proj_ctf.star")["particles"]["rlnImageName"]
    full, _ = read_mrc(relion_dir / "proj_ctf.mrcs")
    reader = ImageReader(names, relion_dir)
    assert len(reader) == 40 and reader.image_shape == (48, 48) and reader.pixel_size == 3.0
    rows = np.array([5, 0, 39, 5, 17])
    got = reader.read(rows)
    expected_idx = [int(names[r].split("@")[0]) - 1 for r in rows]
    np.testing.assert_array_equal(got, full[expected_idx])
    np.testing.assert_array_equal(reader.read(slice(0, 40)), full)
    assert reader.read([]).shape == (0, 48, 48)


def test_image_reader_many_files(relion_dir, tmp_path):
    """Images interleaved from several stacks, with a cache smaller than the number of files."""
    full, _ = read_mrc(relion_dir / "proj_ctf.mrcs")
    (tmp_path / "sub").mkdir()
    write_mrc(tmp_path / "a.mrcs", full[:10], 3.0)
    write_mrc(tmp_path / "sub/b.mrcs", full[10:25], 3.0, dtype=np.float16)
    shutil.copy(relion_dir / "proj_ctf.mrcs", tmp_path / "c.mrcs")
    names, truth = [], []
    rng = np.random.default_rng(3)
    for _ in range(60):
        f = rng.integers(3)
        if f == 0:
            k = rng.integers(10)
            names.append(format_image_name(k, "a.mrcs"))
            truth.append(full[k])
        elif f == 1:
            k = rng.integers(15)
            names.append(format_image_name(k, "sub/b.mrcs"))
            t16 = full[10 + k].astype(np.float16).astype(np.float32)
            t16[np.abs(t16) < 2.0 ** -14] = 0.0
            truth.append(t16)
        else:
            k = rng.integers(40)
            names.append(f"{k + 1}@{tmp_path / 'c.mrcs'}")  # absolute path
            truth.append(full[k])
    truth = np.stack(truth)
    with ImageReader(names, tmp_path, max_open=1) as reader:
        for start in range(0, 60, 16):
            np.testing.assert_array_equal(reader.read(np.arange(start, min(start + 16, 60))), truth[start:start + 16])
        assert len(reader._cache) == 1
        np.testing.assert_array_equal(reader.read(np.arange(60)[::-1]), truth[::-1])
    bad = ImageReader(["000001@a.mrcs", "000011@a.mrcs"], tmp_path)
    with pytest.raises(InputFileError, match=r"a.mrcs: image '000011@a.mrcs' out of range: the stack has 10 images"):
        bad.read([0, 1])
    with pytest.raises(InputFileError, match=r"nope.mrcs: file not found"):
        ImageReader(["000001@nope.mrcs"], tmp_path).read([0])
    write_mrc(tmp_path / "small.mrcs", np.zeros((2, 8, 8)), 3.0)
    mixed = ImageReader(["000001@a.mrcs", "000001@small.mrcs"], tmp_path)
    with pytest.raises(InputFileError, match="same box size"):
        mixed.read([0, 1])


def test_float16_subnormals_read_as_zero(tmp_path):
    """RELION's half-float reader flushes subnormals (|x| < 2^-14) to 0; so do we (read_mrc and stacks)."""
    from cryopipe.io.mrc import MrcStack, read_mrc, write_mrc

    a = np.array([[[1e-6, -3e-5, 0.5, 7e-5]]], dtype=np.float32)
    write_mrc(tmp_path / "h.mrcs", a, 1.0, dtype=np.float16)
    got, _ = read_mrc(tmp_path / "h.mrcs")
    assert got[0, 0, 0] == 0 and got[0, 0, 1] == 0
    assert got[0, 0, 2] == 0.5 and abs(got[0, 0, 3] - 7e-5) < 1e-7
    with MrcStack(tmp_path / "h.mrcs") as st:
        assert st[0][0, 0] == 0 and st[[0]][0, 0, 1] == 0


def test_image_names_8_digits():
    from cryopipe.io.mrc import format_image_name, parse_image_name

    assert format_image_name(0, "a.mrcs") == "00000001@a.mrcs"  # as RELION 5 writes
    assert parse_image_name("000123@a.mrcs") == (122, "a.mrcs")
