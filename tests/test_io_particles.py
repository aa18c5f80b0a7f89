"""Tests for cryopipe.io.particles: RELION 3.0 <-> 3.1 conversion checked against relion_convert_star's output."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from cryopipe.errors import InputFileError
from cryopipe.io.particles import (
    ParticleData,
    ctf_parameters,
    euler_angles,
    origins_px,
    pixel_sizes,
    read_particles,
    write_particles,
)
from cryopipe.io.star import read_star, star_version, write_star

# RELION prints origins with ~6 significant digits (e.g. -0.04903 for -0.049029): Å tolerance for comparisons.
ATOL_A = 2e-5


def assert_tables_match(ours: pd.DataFrame, ref: pd.DataFrame, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Same column set and row count; strings/ints equal, floats within tolerance (column order free)."""
    assert sorted(ours.columns) == sorted(ref.columns)
    assert len(ours) == len(ref)
    for c in ref.columns:
        a, b = ours[c], ref[c]
        if pd.api.types.is_float_dtype(b.dtype) or pd.api.types.is_float_dtype(a.dtype):
            np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), atol=atol, rtol=rtol, err_msg=c)
        else:
            assert a.tolist() == b.tolist(), c


def test_30_to_31_matches_relion_convert_star(relion_dir, tmp_path):
    d30 = read_particles(relion_dir / "particles_30.star")
    assert d30.source_version == "3.0" and d30.block_name == "particles" and d30.file_version is None
    ref = read_star(relion_dir / "particles_31.star")
    # optics table: same columns, in RELION's order, same values (incl. rlnImageSize 48 from the stack header)
    assert list(d30.optics.columns) == list(ref["optics"].columns)
    assert_tables_match(d30.optics, ref["optics"])
    assert d30.optics["rlnImageSize"].dtype == np.int64
    # particles: per-row optics columns removed, rlnOpticsGroup + origins in Å appended as RELION does
    assert list(d30.particles.columns) == list(ref["particles"].columns)
    assert_tables_match(d30.particles, ref["particles"], atol=ATOL_A)
    # and written out by our 3.1 writer it reads back to the same tables
    out = tmp_path / "ours_31.star"
    write_particles(out, d30, version="3.1")
    assert star_version(out) == 30001
    ours = read_star(out)
    assert list(ours) == ["optics", "particles"]
    assert_tables_match(ours["optics"], ref["optics"])
    assert_tables_match(ours["particles"], ref["particles"], atol=ATOL_A)


def test_both_files_same_particle_data(relion_dir):
    d30 = read_particles(relion_dir / "particles_30.star")
    d31 = read_particles(relion_dir / "particles_31.star")
    assert d31.source_version == "3.1" and d31.file_version == 50001
    np.testing.assert_array_equal(pixel_sizes(d30), np.full(40, 3.0))
    np.testing.assert_array_equal(pixel_sizes(d31), np.full(40, 3.0))
    np.testing.assert_allclose(origins_px(d30), origins_px(d31), atol=ATOL_A / 3)
    np.testing.assert_array_equal(euler_angles(d30), euler_angles(d31))
    c30, c31 = ctf_parameters(d30), ctf_parameters(d31)
    assert set(c30) == {"defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast",
                        "phase_shift", "bfactor", "scale"}
    for k in c30:
        np.testing.assert_array_equal(c30[k], c31[k], err_msg=k)
    # origins in px are the 3.0 file's rlnOriginX/Y
    raw30 = read_star(relion_dir / "particles_30.star")[""]
    np.testing.assert_allclose(origins_px(d30), raw30[["rlnOriginX", "rlnOriginY"]].to_numpy(), atol=1e-12)
    np.testing.assert_array_equal(c30["voltage"], raw30["rlnVoltage"].to_numpy())
    np.testing.assert_array_equal(c30["defocus_u"], raw30["rlnDefocusU"].to_numpy())
    np.testing.assert_array_equal(c30["bfactor"], raw30["rlnCtfBfactor"].to_numpy())


def test_31_to_30_to_31_lossless(relion_dir, tmp_path):
    d31 = read_particles(relion_dir / "particles_31.star")
    p30 = tmp_path / "p30.star"
    shutil.copy(relion_dir / "proj_ctf.mrcs", tmp_path / "proj_ctf.mrcs")  # for the image size
    write_particles(p30, d31, version="3.0")
    text = p30.read_text()
    assert "# version" not in text and "data_optics" not in text and star_version(p30) is None
    raw = read_star(p30)
    assert list(raw) == [""]
    # the 3.0 table has the columns of RELION-3.0 style particles_30.star
    orig30 = read_star(relion_dir / "particles_30.star")[""]
    assert_tables_match(raw[""], orig30, atol=ATOL_A / 3)
    back = read_particles(p30)
    assert back.source_version == "3.0"
    assert_tables_match(back.optics, d31.optics)
    assert list(back.optics.columns) == list(d31.optics.columns)
    assert list(back.particles.columns) == list(d31.particles.columns)
    assert_tables_match(back.particles, d31.particles, rtol=1e-11)


def _two_group_30_table(n: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    g = np.array([0, 1, 1, 0, 2, 0, 1, 2, 2, 0, 1, 0])[:n]  # first appearance: 0, 1, 2
    volt = np.array([300.0, 200.0, 300.0])[g]
    dstep = np.array([5.0, 5.0, 14.0])[g]
    mag = np.array([50000.0, 50000.0, 10000.0])[g]
    return pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
        "rlnOriginX": rng.uniform(-3, 3, n), "rlnOriginY": rng.uniform(-3, 3, n),
        "rlnDefocusU": rng.uniform(1e4, 2e4, n), "rlnVoltage": volt, "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1, "rlnMagnification": mag, "rlnDetectorPixelSize": dstep,
        "rlnAngleRot": rng.uniform(0, 360, n),
    })


def test_multi_group_30(tmp_path):
    df = _two_group_30_table()
    path = tmp_path / "multi.star"
    write_star(path, {"": df}, version=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = read_particles(path)  # stack.mrcs does not exist: image size left out, with a warning
    assert any("rlnImageSize" in str(w.message) for w in caught)
    assert "rlnImageSize" not in data.optics.columns
    opt = data.optics
    assert opt["rlnOpticsGroup"].tolist() == [1, 2, 3]
    assert opt["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2", "opticsGroup3"]
    assert opt["rlnVoltage"].tolist() == [300.0, 200.0, 300.0]
    np.testing.assert_allclose(opt["rlnImagePixelSize"], [1.0, 1.0, 14.0])
    assert data.particles["rlnOpticsGroup"].tolist() == [1, 2, 2, 1, 3, 1, 2, 3, 3, 1, 2, 1]
    apix = df["rlnDetectorPixelSize"] * 1e4 / df["rlnMagnification"]
    np.testing.assert_allclose(pixel_sizes(data), apix)
    np.testing.assert_allclose(data.particles["rlnOriginXAngst"], df["rlnOriginX"] * apix, rtol=1e-11)
    np.testing.assert_allclose(origins_px(data), df[["rlnOriginX", "rlnOriginY"]].to_numpy(), rtol=1e-11)
    np.testing.assert_array_equal(ctf_parameters(data)["voltage"], df["rlnVoltage"].to_numpy())
    np.testing.assert_allclose(euler_angles(data)[:, 0], df["rlnAngleRot"].to_numpy(), rtol=5e-12)
    np.testing.assert_array_equal(euler_angles(data)[:, 1:], 0.0)
    # back to 3.0: per-row values as in the input (pixel size now as mag 10000)
    out = tmp_path / "multi_30.star"
    write_particles(out, data, version="3.0")
    raw = read_star(out)[""]
    for c in ["rlnVoltage", "rlnOriginX", "rlnOriginY", "rlnDefocusU"]:
        np.testing.assert_allclose(raw[c], df[c], rtol=1e-11, err_msg=c)
    np.testing.assert_allclose(raw["rlnDetectorPixelSize"] * 1e4 / raw["rlnMagnification"], apix, rtol=1e-11)
    assert "rlnOpticsGroup" not in raw.columns and "rlnOriginXAngst" not in raw.columns


def test_micrographs(relion_dir, tmp_path):
    mics = read_particles(relion_dir / "mic/micrographs_ctf.star")
    assert mics.block_name == "micrographs" and mics.source_version == "3.1"
    np.testing.assert_array_equal(pixel_sizes(mics), [3.0])
    ctf = ctf_parameters(mics)
    assert ctf["defocus_u"].tolist() == [15000.0] and ctf["defocus_v"].tolist() == [14000.0]
    assert ctf["defocus_angle"].tolist() == [30.0] and ctf["amplitude_contrast"].tolist() == [0.1]
    assert ctf["phase_shift"].tolist() == [0.0] and ctf["scale"].tolist() == [1.0]
    # 3.0 micrographs file -> 3.1: rlnMicrographPixelSize and rlnMicrographOriginalPixelSize in the optics
    df30 = pd.DataFrame({"rlnMicrographName": ["a.mrc", "b.mrc"], "rlnDefocusU": [1e4, 2e4],
                         "rlnVoltage": [300.0, 300.0], "rlnSphericalAberration": [2.7, 2.7],
                         "rlnAmplitudeContrast": [0.07, 0.07], "rlnMagnification": [10000.0, 10000.0],
                         "rlnDetectorPixelSize": [1.06, 1.06]})
    path = tmp_path / "mics30.star"
    write_star(path, {"": df30}, version=None)
    m = read_particles(path)
    assert m.block_name == "micrographs"
    assert list(m.optics.columns) == ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnAmplitudeContrast",
                                      "rlnSphericalAberration", "rlnVoltage", "rlnMicrographPixelSize",
                                      "rlnMicrographOriginalPixelSize"]
    assert m.optics["rlnMicrographPixelSize"].tolist() == [1.06]
    write_particles(tmp_path / "mics31.star", m)
    assert list(read_star(tmp_path / "mics31.star")) == ["optics", "micrographs"]


def test_relion_refine_output(relion_dir):
    d = read_particles(relion_dir / "class2d/run_it005_data.star")
    assert len(d) == 600 and d.source_version == "3.1"
    raw = read_star(relion_dir / "class2d/run_it005_data.star")["particles"]
    np.testing.assert_allclose(origins_px(d), raw[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 3.0)
    np.testing.assert_array_equal(euler_angles(d), raw[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())


def _write31(path, optics: pd.DataFrame, parts: pd.DataFrame) -> None:
    write_star(path, {"optics": optics, "particles": parts})


def test_errors(relion_dir, tmp_path):
    base = read_star(relion_dir / "particles_31.star")
    optics, parts = base["optics"], base["particles"]
    p = tmp_path / "bad.star"
    bad_parts = parts.copy()
    bad_parts.loc[3, "rlnOpticsGroup"] = 2
    _write31(p, optics, bad_parts)
    with pytest.raises(InputFileError, match=r"bad.star: rlnOpticsGroup 2 is used in data_particles but not defined "
                                             r"in data_optics \(add optics group 2"):
        read_particles(p)
    _write31(p, optics.drop(columns=["rlnVoltage"]), parts)
    with pytest.raises(InputFileError, match=r"bad.star: no rlnVoltage column \(voltage \(kV\)\) in the optics table"):
        read_particles(p)
    _write31(p, optics.drop(columns=["rlnImagePixelSize"]), parts)
    with pytest.raises(InputFileError, match=r"no rlnImagePixelSize column \(pixel size"):
        read_particles(p)
    o2 = optics.copy()
    o2["rlnImagePixelSize"] = 0.0
    _write31(p, o2, parts)
    with pytest.raises(InputFileError, match=r"invalid rlnImagePixelSize value 0.0 for optics group 1"):
        read_particles(p)
    raw30 = read_star(relion_dir / "particles_30.star")[""]
    write_star(p, {"": raw30.drop(columns=["rlnVoltage"])}, version=None)
    with pytest.raises(InputFileError, match=r"no data_optics table and no per-row rlnVoltage column"):
        read_particles(p)
    write_star(p, {"": raw30.drop(columns=["rlnMagnification"])}, version=None)
    with pytest.raises(InputFileError, match=r"no pixel size"):
        read_particles(p)
    shutil.copy(relion_dir / "proj_ctf.mrcs", tmp_path / "proj_ctf.mrcs")
    d = read_particles(p, pixel_size=3.0)  # explicit pixel size for a 3.0 file without magnification
    np.testing.assert_array_equal(pixel_sizes(d), 3.0)
    _write31(p, optics, parts.drop(columns=["rlnDefocusU"]))
    with pytest.raises(InputFileError, match=r"no rlnDefocusU column in data_particles"):
        ctf_parameters(read_particles(p))
    with pytest.raises(InputFileError, match="file not found"):
        read_particles(tmp_path / "nope.star")
    write_star(p, {"optics": optics})
    with pytest.raises(InputFileError, match="no data_particles"):
        read_particles(p)


def test_single_group_without_column_and_px_origins(relion_dir, tmp_path):
    """3.1 layout written by other tools: no rlnOpticsGroup with one group; origins still in pixels."""
    base = read_star(relion_dir / "particles_31.star")
    parts = base["particles"].drop(columns=["rlnOpticsGroup"])
    parts["rlnOriginX"] = parts.pop("rlnOriginXAngst") / 3.0
    parts["rlnOriginY"] = parts.pop("rlnOriginYAngst") / 3.0
    p = tmp_path / "x.star"
    write_star(p, {"optics": base["optics"], "particles": parts}, version=None)
    d = read_particles(p)
    assert d.particles["rlnOpticsGroup"].tolist() == [1] * 40
    np.testing.assert_allclose(d.particles["rlnOriginXAngst"], base["particles"]["rlnOriginXAngst"], rtol=1e-11)
    assert isinstance(d, ParticleData) and len(d) == 40
