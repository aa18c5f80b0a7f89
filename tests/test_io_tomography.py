"""RELION 4/5 tomography files (cryopipe.io.tomography) against RELION 5.0.1's own files (shared/fixtures/relion_tomo)
and small hand-made tilt series."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cryopipe.cli import main as cli
from cryopipe.core.tilt_geometry import projection_matrices
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.star import read_star, star_version, write_star
from cryopipe.io.tomography import (
    TiltSeries,
    TomogramSet,
    check_inside,
    project_root,
    read_optimisation_set,
    read_tomo_particles,
    read_tomograms,
    resolve_path,
    to_centered_coordinates,
    write_optimisation_set,
    write_tomo_particles,
    write_tomograms,
)

PARTICLE_FILES = ["particles.star", "particles_relion4_coords.star", "Subtomo_bin2/particles.star", "center_in.star",
                  "center_out.star"]


def _truth(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "truth" / "truth_geometry.json").read_text())


def _assert_blocks_equal(got: dict, ref: dict) -> None:
    assert list(got) == list(ref)
    for name, block in ref.items():
        if isinstance(block, pd.DataFrame):
            pd.testing.assert_frame_equal(got[name], block, check_exact=True)
        else:
            assert got[name] == block


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# ================================================================================================ round trips


def test_tomograms_round_trip(relion_tomo_dir, tmp_path, monkeypatch):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    monkeypatch.chdir(tmp_path)  # project directory of the copy: stored paths come out as in the fixture
    write_tomograms("tomograms.star", tomograms)
    assert star_version(tmp_path / "tomograms.star") == 50001
    _assert_blocks_equal(read_star(tmp_path / "tomograms.star"), read_star(relion_tomo_dir / "tomograms.star"))
    for name in ("TS_01", "TS_02"):
        out = tmp_path / "tilt_series" / f"{name}.star"
        assert star_version(out) == 50001
        _assert_blocks_equal(read_star(out), read_star(relion_tomo_dir / "tilt_series" / f"{name}.star"))


@pytest.mark.parametrize("name", PARTICLE_FILES)
def test_particle_files_round_trip(relion_tomo_dir, tmp_path, name):
    particles = read_tomo_particles(relion_tomo_dir / name)
    write_tomo_particles(tmp_path / "out.star", particles)
    assert star_version(tmp_path / "out.star") == 50001
    _assert_blocks_equal(read_star(tmp_path / "out.star"), read_star(relion_tomo_dir / name))


@pytest.mark.parametrize("name", ["optimisation_set.star", "Subtomo_bin2/optimisation_set.star"])
def test_optimisation_sets_round_trip(relion_tomo_dir, tmp_path, name):
    entries = read_optimisation_set(relion_tomo_dir / name)  # Subtomo_bin2's paths: found in the parent directory
    assert set(entries) == {"rlnTomoParticlesFile", "rlnTomoTomogramsFile"}
    assert entries["rlnTomoTomogramsFile"] == relion_tomo_dir / "tomograms.star"
    assert all(p.exists() for p in entries.values())
    write_optimisation_set(tmp_path / "opt.star", entries)
    assert star_version(tmp_path / "opt.star") == 50001
    assert read_optimisation_set(tmp_path / "opt.star") == entries


def test_optimisation_set_paths_relative_to_the_project_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entries = {"rlnTomoReferenceMap1File": tmp_path / "Refine" / "half1.mrc", "rlnTomoParticlesFile": "parts.star",
               "rlnTomoTomogramsFile": tmp_path / "tomograms.star"}
    write_optimisation_set(tmp_path / "Job" / "optimisation_set.star", entries)
    block = read_star(tmp_path / "Job" / "optimisation_set.star")[""]
    assert list(block) == ["rlnTomoParticlesFile", "rlnTomoTomogramsFile", "rlnTomoReferenceMap1File"]  # RELION order
    assert block["rlnTomoReferenceMap1File"] == "Refine/half1.mrc" and block["rlnTomoTomogramsFile"] == "tomograms.star"
    back = read_optimisation_set(tmp_path / "Job" / "optimisation_set.star")  # none exists: cwd paths
    assert back["rlnTomoReferenceMap1File"] == tmp_path / "Refine" / "half1.mrc"
    with pytest.raises(CryopipeError):
        write_optimisation_set(tmp_path / "bad.star", {"particles": "p.star"})


# ================================================================================================ tilt series


def test_tilt_series_values_and_geometry(relion_tomo_dir):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    assert tomograms.names == ["TS_01", "TS_02"] and len(tomograms) == 2
    ts = tomograms["TS_01"]
    table = read_star(relion_tomo_dir / "tilt_series" / "TS_01.star")["TS_01"]
    assert ts.root == relion_tomo_dir and ts.n_tilts == 41
    assert (ts.pixel_size, ts.hand, ts.tomogram_size, ts.image_size) == (4.0, -1.0, (304, 336, 96), (320, 288))
    assert (ts.defocus_slope, ts.bfactor_per_dose, ts.voltage, ts.cs, ts.amplitude_contrast) == (1, 0, 300, 2.7, 0.07)
    assert tomograms["TS_02"].hand == 1.0
    np.testing.assert_array_equal(ts.tilt_angles(), table[["rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot"]].to_numpy())
    np.testing.assert_array_equal(ts.shifts_angst(), table[["rlnTomoXShiftAngst", "rlnTomoYShiftAngst"]].to_numpy())
    np.testing.assert_array_equal(ts.pre_exposure(), table["rlnMicrographPreExposure"].to_numpy())
    np.testing.assert_array_equal(ts.defocus(), table[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy())
    np.testing.assert_array_equal(ts.ctf_scale(), np.ones(41))
    truth = _truth(relion_tomo_dir)["tomograms"]
    for t in tomograms:
        P = t.projection_matrices()
        assert P.dtype == torch.float64 and P.shape == (41, 4, 4)
        assert (P - torch.tensor(truth[t.name]["projection_matrices"], dtype=torch.float64)).abs().max() < 1e-9
    stack, _ = read_mrc(relion_tomo_dir / "tilt_series" / "TS_01.mrcs")
    images = ts.read_images([5, 0, 40])
    assert images.dtype == np.float32 and images.shape == (3, 288, 320)
    np.testing.assert_array_equal(images, stack[[5, 0, 40]])
    assert ts.read_images().shape == (41, 288, 320)
    with pytest.raises(InputFileError, match=r"unknown tomogram 'TS_09'.*TS_01, TS_02") as e:
        tomograms["TS_09"]
    _one_line(e)


def _small_set(root: Path, n_tilts: int = 3, per_tilt_files: bool = False, header_px: float = 4.0,
               stack_images: int | None = None, pre_exposure: bool = True) -> Path:
    """A hand-made RELION 5 tomogram set under ``root`` (16×12 px tilts at 4 Å): returns tomograms.star."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n_tilts, 12, 16)).astype(np.float32)
    (root / "ts").mkdir(parents=True, exist_ok=True)
    if per_tilt_files:
        names = []
        for f in range(n_tilts):
            write_mrc(root / "ts" / f"tilt{f}.mrc", images[f], header_px)
            names.append(f"ts/tilt{f}.mrc")
    else:
        n = n_tilts if stack_images is None else stack_images
        write_mrc(root / "ts" / "A.mrcs", np.resize(images, (n, 12, 16)), header_px)
        names = [f"{f + 1:06d}@ts/A.mrcs" for f in range(n_tilts)]
    tilts = pd.DataFrame({"rlnMicrographName": names, "rlnTomoXTilt": 0.0,
                          "rlnTomoYTilt": np.linspace(-30, 30, n_tilts), "rlnTomoZRot": 85.0,
                          "rlnTomoXShiftAngst": 0.0, "rlnTomoYShiftAngst": 0.0, "rlnDefocusU": 20000.0})
    if pre_exposure:
        tilts["rlnMicrographPreExposure"] = 3.0 * np.arange(n_tilts)
    write_star(root / "ts" / "A.star", {"A": tilts}, version=50001)
    glob = pd.DataFrame({"rlnTomoName": ["A"], "rlnTomoTiltSeriesStarFile": ["ts/A.star"], "rlnVoltage": [300.0],
                         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                         "rlnTomoTiltSeriesPixelSize": [4.0], "rlnTomoSizeX": [16], "rlnTomoSizeY": [12],
                         "rlnTomoSizeZ": [8]})
    write_star(root / "tomograms.star", {"global": glob}, version=50001)
    np.save(root / "images.npy", images)
    return root / "tomograms.star"


def test_one_mrc_per_tilt_and_project_directory_search(tmp_path):
    path = _small_set(tmp_path / "project", per_tilt_files=True)
    ts = read_tomograms(path)["A"]  # not in the cwd: the STAR file's directory is the project directory
    assert ts.root == tmp_path / "project" and ts.image_size == (16, 12)
    np.testing.assert_array_equal(ts.read_images(), np.load(tmp_path / "project" / "images.npy"))
    np.testing.assert_array_equal(ts.read_images([2]), np.load(tmp_path / "project" / "images.npy")[[2]])
    assert ts.defocus()[:, 1].tolist() == [20000.0] * 3 and ts.defocus()[:, 2].tolist() == [0.0] * 3
    assert ts.hand == 1.0 and ts.defocus_slope == 1.0


def test_path_resolution_rule(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "f.star").write_text("x")
    star = tmp_path / "a" / "b" / "x.star"
    monkeypatch.chdir(tmp_path / "a")
    assert project_root("c/f.star", star) == tmp_path  # not in cwd, not next to the STAR file: its parents
    assert resolve_path("c/f.star", star) == tmp_path / "c" / "f.star"
    assert project_root("c/f.star", star, root=tmp_path / "a") == tmp_path / "a"  # an explicit root wins
    (tmp_path / "a" / "c").mkdir()
    (tmp_path / "a" / "c" / "f.star").write_text("x")
    assert project_root("c/f.star", star) == tmp_path / "a"  # the working directory comes first
    assert project_root("missing.star", star) == tmp_path / "a"  # found nowhere: the working directory


def test_write_tomograms_elsewhere_stores_paths_that_read_back(relion_tomo_dir, tmp_path):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    write_tomograms(tmp_path / "out" / "tomograms.star", tomograms, tilt_series_dir=tmp_path / "tsdir")
    glob = read_star(tmp_path / "out" / "tomograms.star")["global"]
    assert glob["rlnTomoTiltSeriesStarFile"].tolist() == [str(tmp_path / "tsdir" / f"TS_0{i}.star") for i in (1, 2)]
    back = read_tomograms(tmp_path / "out" / "tomograms.star", root=relion_tomo_dir)  # images in the fixture
    for a, b in zip(back, tomograms):
        pd.testing.assert_frame_equal(a.tilts, b.tilts)
        assert a.globals["rlnTomoHand"] == b.globals["rlnTomoHand"]
        assert (a.projection_matrices() - b.projection_matrices()).abs().max() == 0


# ================================================================================================ RELION 4


def _vector(values, bracketed: bool) -> str:
    """A RELION 4 vector value: ``[a,b,c,d]`` as RELION writes it, or the plain ``a,b,c,d``."""
    text = ",".join(f"{x:.17g}" for x in values)
    return f"[{text}]" if bracketed else text


def _relion4_file(fixture_dir: Path, project: Path, bracketed: bool = True, suffix: str = "") -> Path:
    """The fixture as RELION 4 wrote tomogram sets: one tomograms.star with data_global (one stack per tilt series)
    and a per-tilt table of projection matrices rlnTomoProjX/Y/Z/W per tilt series."""
    truth = _truth(fixture_dir)["tomograms"]
    fixture = read_tomograms(fixture_dir / "tomograms.star")
    (project / "tilt_series").mkdir(parents=True, exist_ok=True)
    (project / "r4").mkdir(exist_ok=True)
    rows, blocks = [], {}
    for ts in fixture:
        stack = f"tilt_series/{ts.name}{'.st' if suffix else '.mrcs'}"
        os.symlink(fixture_dir / "tilt_series" / f"{ts.name}.mrcs", project / stack)
        a = ts.tilt_angles()
        P = projection_matrices(a[:, 0], a[:, 1], a[:, 2], ts.shifts_angst(), 4.0, ts.tomogram_size, (320, 288))
        assert (P - torch.tensor(truth[ts.name]["projection_matrices"], dtype=torch.float64)).abs().max() < 1e-9
        labels = ("rlnTomoProjX", "rlnTomoProjY", "rlnTomoProjZ", "rlnTomoProjW")
        table = pd.DataFrame({lab: [_vector(P[f, i].tolist(), bracketed) for f in range(ts.n_tilts)]
                              for i, lab in enumerate(labels)})
        keep = [c for c in ts.tilts.columns if c not in ("rlnMicrographName", "rlnTomoXTilt", "rlnTomoYTilt",
                                                         "rlnTomoZRot", "rlnTomoXShiftAngst", "rlnTomoYShiftAngst")]
        blocks[ts.name] = pd.concat([table, ts.tilts[keep].reset_index(drop=True)], axis=1)
        g = {k: v for k, v in ts.globals.items() if k != "rlnTomoTiltSeriesStarFile"}
        rows.append({**g, "rlnTomoTiltSeriesName": stack + suffix, "rlnTomoFrameCount": ts.n_tilts})
    path = project / "r4" / "tomograms.star"
    write_star(path, {"global": pd.DataFrame(rows), **blocks}, version=30001)
    return path


@pytest.mark.parametrize("bracketed,suffix", [(True, ""), (False, ":mrc")])
def test_relion4_tomograms_convert_to_relion5(relion_tomo_dir, tmp_path, monkeypatch, bracketed, suffix):
    monkeypatch.chdir(tmp_path)
    r4 = read_tomograms(_relion4_file(relion_tomo_dir, tmp_path, bracketed, suffix))
    fixture = read_tomograms(relion_tomo_dir / "tomograms.star")
    value_columns = ["rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst", "rlnTomoYShiftAngst"]
    for a, b in zip(r4, fixture):
        assert a.name == b.name and a.root == tmp_path
        assert (a.projection_matrices() - b.projection_matrices()).abs().max() < 1e-9
        np.testing.assert_allclose(a.tilt_angles(), b.tilt_angles(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(a.shifts_angst(), b.shifts_angst(), rtol=0, atol=1e-9)
        for get in ("pre_exposure", "defocus", "ctf_scale"):
            np.testing.assert_array_equal(getattr(a, get)(), getattr(b, get)())
        assert (a.pixel_size, a.hand, a.tomogram_size, a.image_size) == (b.pixel_size, b.hand, b.tomogram_size,
                                                                          b.image_size)
        assert a.tilts["rlnMicrographName"].tolist() == [n.replace(".mrcs", ".st:mrc") if suffix else n
                                                         for n in b.tilts["rlnMicrographName"]]
        np.testing.assert_array_equal(a.read_images([3]), b.read_images([3]))
    # written as RELION 5: the same files as RELION's (up to column order and the last digits of the angles)
    write_tomograms(tmp_path / "r5" / "tomograms.star", r4)
    glob = read_star(tmp_path / "r5" / "tomograms.star")["global"]
    ref = read_star(relion_tomo_dir / "tomograms.star")["global"]
    assert glob["rlnTomoTiltSeriesStarFile"].tolist() == ["r5/tilt_series/TS_01.star", "r5/tilt_series/TS_02.star"]
    pd.testing.assert_frame_equal(glob.drop(columns="rlnTomoTiltSeriesStarFile"),
                                  ref.drop(columns="rlnTomoTiltSeriesStarFile"), check_like=True)
    for name in ("TS_01", "TS_02"):
        got = read_star(tmp_path / "r5" / "tilt_series" / f"{name}.star")[name]
        want = read_star(relion_tomo_dir / "tilt_series" / f"{name}.star")[name]
        assert sorted(got.columns) == sorted(want.columns)
        if not suffix:
            pd.testing.assert_frame_equal(got.drop(columns=value_columns), want.drop(columns=value_columns),
                                          check_like=True)
        np.testing.assert_allclose(got[value_columns].to_numpy(), want[value_columns].to_numpy(), atol=1e-9)


def test_relion4_errors(relion_tomo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _relion4_file(relion_tomo_dir, tmp_path)
    blocks = read_star(path)
    # a matrix that is not a rotation + shift (scaled by 1.1) has no RELION 5 equivalent
    bad = {k: v.copy() for k, v in blocks.items()}
    bad["TS_02"].loc[4, "rlnTomoProjX"] = "[1.1,0,0,10]"
    write_star(path, bad)
    with pytest.raises(InputFileError, match=r"TS_02.*tilt 5 is not a rotation") as e:
        read_tomograms(path)
    _one_line(e)
    # tilt count of the table, rlnTomoFrameCount and the stack disagree
    bad = {k: v.copy() for k, v in blocks.items()}
    bad["TS_01"] = bad["TS_01"].iloc[:40]
    write_star(path, bad)
    with pytest.raises(InputFileError, match=r"TS_01: the stack has 41 images but data_TS_01 lists 40 tilts") as e:
        read_tomograms(path)
    _one_line(e)
    bad = {k: v.copy() for k, v in blocks.items()}
    bad["TS_01"].loc[0, "rlnTomoProjY"] = "[1,2,3]"
    write_star(path, bad)
    with pytest.raises(InputFileError, match=r"rlnTomoProjY, tilt 1: expected a vector of 4 numbers"):
        read_tomograms(path)
    bad = {k: v for k, v in blocks.items() if k != "TS_02"}
    write_star(path, bad)
    with pytest.raises(InputFileError, match=r"no table data_TS_02"):
        read_tomograms(path)


# ================================================================================================ errors


def test_missing_files(tmp_path):
    with pytest.raises(InputFileError, match="file not found") as e:
        read_tomograms(tmp_path / "nothing.star")
    _one_line(e)
    path = _small_set(tmp_path)
    (tmp_path / "ts" / "A.star").unlink()
    with pytest.raises(InputFileError, match=r"per-tilt STAR file of tomogram A not found") as e:
        read_tomograms(path)
    _one_line(e)


def test_missing_tilt_image(tmp_path):
    path = _small_set(tmp_path, per_tilt_files=True)
    (tmp_path / "ts" / "tilt1.mrc").unlink()
    ts = read_tomograms(path)["A"]  # images are checked on first use
    with pytest.raises(InputFileError, match=r"tilt1.mrc: tilt image 2 of tomogram A not found") as e:
        ts.read_images()
    _one_line(e)


def test_tilt_count_mismatch_between_star_and_stack(tmp_path):
    ts = read_tomograms(_small_set(tmp_path, n_tilts=4, stack_images=3))["A"]
    with pytest.raises(InputFileError, match=r"refers to image 4 but the stack has 3 images") as e:
        ts.image_size
    _one_line(e)


def test_missing_pre_exposure(tmp_path):
    with pytest.raises(InputFileError, match=r"data_A has no rlnMicrographPreExposure column") as e:
        read_tomograms(_small_set(tmp_path, pre_exposure=False))
    _one_line(e)


@pytest.mark.parametrize("header_px,ok", [(4.0, True), (0.0, True), (1.0, True), (4.002, True), (5.0, False)])
def test_pixel_size_header_check(tmp_path, header_px, ok):
    ts = read_tomograms(_small_set(tmp_path, header_px=header_px))["A"]
    if ok:
        assert ts.image_size == (16, 12)
        return
    with pytest.raises(InputFileError, match=r"header pixel size 5 Å differs from rlnTomoTiltSeriesPixelSize 4") as e:
        ts.read_images()
    _one_line(e)


# ================================================================================================ particles


@pytest.mark.parametrize("name", ["particles.star", "particles_relion4_coords.star"])
def test_particle_positions_and_orientations_equal_the_truth(relion_tomo_dir, name):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    truth = _truth(relion_tomo_dir)["particles"]
    particles = read_tomo_particles(relion_tomo_dir / name, tomograms)
    assert particles.has_centered_coordinates == (name == "particles.star")
    pos = particles.positions_px(tomograms)
    assert pos.shape == (24, 3)
    np.testing.assert_allclose(pos, [p["position_px_decentred"] for p in truth], rtol=0, atol=1e-9)
    np.testing.assert_allclose(particles.orientations(), [p["A_total"] for p in truth], rtol=0, atol=1e-9)
    sub = particles.subtomogram_matrices()
    np.testing.assert_allclose(sub[0], np.eye(3), atol=1e-15)  # particle 1: no subtomogram angles
    assert not np.allclose(sub[1], np.eye(3))
    check_inside(particles, tomograms)


def test_optics_built_from_tomograms_as_relion(relion_tomo_dir, tmp_path):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    plain = read_tomo_particles(relion_tomo_dir / "particles.star")
    assert plain.optics is None and plain.general == {}  # read as it is
    particles = read_tomo_particles(relion_tomo_dir / "particles.star", tomograms)
    # what relion_tomo_subtomo wrote for these particles, before its own extraction columns
    relion = read_tomo_particles(relion_tomo_dir / "Subtomo_bin2" / "particles.star")
    pd.testing.assert_frame_equal(particles.optics, relion.optics.iloc[:, :6])
    assert particles.general == relion.general == {"rlnTomoSubTomosAre2DStacks": 0}
    assert particles.particles["rlnOpticsGroup"].tolist() == [1] * 24
    # tomograms without rlnOpticsGroupName: one group per tomogram, numbered in order of appearance; names added
    for ts in tomograms:
        del ts.globals["rlnOpticsGroupName"]
    table = plain.particles.iloc[::-1].drop(columns="rlnTomoParticleName").reset_index(drop=True)
    write_tomo_particles(tmp_path / "p.star", type(plain)({}, None, table))
    particles = read_tomo_particles(tmp_path / "p.star", tomograms)
    assert particles.optics["rlnOpticsGroupName"].tolist() == ["TS_02", "TS_01"]
    assert particles.optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert particles.particles["rlnOpticsGroup"].tolist() == [1] * 12 + [2] * 12
    assert particles.particles["rlnTomoParticleName"].tolist()[:2] == ["TS_02/1", "TS_02/2"]
    assert particles.particles["rlnTomoParticleName"].tolist()[12] == "TS_01/1"


def test_relion4_coordinates_to_centered(relion_tomo_dir, tmp_path):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    r4 = read_tomo_particles(relion_tomo_dir / "particles_relion4_coords.star", tomograms)
    r5 = to_centered_coordinates(r4, tomograms)
    ref = read_tomo_particles(relion_tomo_dir / "particles.star", tomograms)
    assert list(r5.particles.columns) == list(ref.particles.columns)
    cols = ["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst"]
    np.testing.assert_allclose(r5.particles[cols].to_numpy(), ref.particles[cols].to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(r5.positions_px(tomograms), r4.positions_px(tomograms), rtol=0, atol=1e-10)
    assert "rlnCoordinateX" in r4.particles.columns  # the input is not modified


def test_unknown_tomogram_name(relion_tomo_dir, tmp_path):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    particles = read_tomo_particles(relion_tomo_dir / "particles.star")
    particles.particles.loc[5, "rlnTomoName"] = "TS_07"
    write_tomo_particles(tmp_path / "p.star", particles)
    with pytest.raises(InputFileError, match=r"particle 6 names tomogram 'TS_07'.*known: TS_01, TS_02") as e:
        read_tomo_particles(tmp_path / "p.star", tomograms)
    _one_line(e)
    with pytest.raises(InputFileError, match=r"unknown tomogram 'TS_07'"):
        particles.positions_px(tomograms)


def test_particle_outside_its_tomogram(relion_tomo_dir):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    particles = read_tomo_particles(relion_tomo_dir / "particles.star", tomograms)
    particles.particles.loc[2, "rlnCenteredCoordinateZAngst"] = 48 * 4.0 + 10.0  # TS_01 is 96 px thick
    with pytest.raises(InputFileError, match=r"particle TS_01/3 lies outside tomogram TS_01: position "
                                             r"\(.*\) px, tomogram 304x336x96 px") as e:
        check_inside(particles, tomograms)
    _one_line(e)


def test_particles_without_coordinates_or_tomogram_names(tmp_path):
    write_star(tmp_path / "a.star", {"particles": pd.DataFrame({"rlnTomoName": ["A"], "rlnAngleRot": [1.0]})})
    with pytest.raises(InputFileError, match="no particle coordinates"):
        read_tomo_particles(tmp_path / "a.star")
    write_star(tmp_path / "b.star", {"particles": pd.DataFrame({"rlnCoordinateX": [1.0]})})
    with pytest.raises(InputFileError, match="no rlnTomoName column"):
        read_tomo_particles(tmp_path / "b.star")


def test_dataclasses_build_by_hand(tmp_path):
    """TiltSeries / TomogramSet made in code (as a simulator would) work like read ones."""
    path = _small_set(tmp_path)
    read = read_tomograms(path)["A"]
    made = TiltSeries("A", dict(read.globals), read.tilts.copy(), tmp_path)
    assert made.image_size == (16, 12)
    assert (made.projection_matrices() - read.projection_matrices()).abs().max() == 0
    write_tomograms(tmp_path / "copy" / "tomograms.star", TomogramSet({"A": made}))
    assert read_tomograms(tmp_path / "copy" / "tomograms.star", root=tmp_path)["A"].n_tilts == 3


# ================================================================================================ star --center


def test_star_center_reproduces_relion_on_tomography_particles(relion_tomo_dir, tmp_path):
    out = tmp_path / "center_out.star"
    assert cli(["star", "--i", str(relion_tomo_dir / "center_in.star"), "--o", str(out), "--center",
                "--center_Z", "2.75"]) == 0
    got, ref = read_star(out), read_star(relion_tomo_dir / "center_out.star")
    assert list(got) == ["general", "optics", "particles"] and got["general"] == ref["general"]
    pd.testing.assert_frame_equal(got["optics"], ref["optics"])
    origins = ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]
    assert np.abs(got["particles"][origins].to_numpy() - ref["particles"][origins].to_numpy()).max() < 1e-4
    pd.testing.assert_frame_equal(got["particles"].drop(columns=origins), ref["particles"].drop(columns=origins))
    assert star_version(out) == 50001


def test_star_center_tomography_pixel_size_fallbacks(relion_tomo_dir, tmp_path):
    blocks = read_star(relion_tomo_dir / "center_in.star")
    ref = read_star(relion_tomo_dir / "center_out.star")["particles"]
    origins = ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]
    # optics without rlnImagePixelSize: tilt-series pixel (4 Å) × rlnTomoSubtomogramBinning (2) = 8 Å
    blocks["optics"] = blocks["optics"].drop(columns="rlnImagePixelSize")
    write_star(tmp_path / "in.star", blocks, version=50001)
    assert cli(["star", "--i", str(tmp_path / "in.star"), "--o", str(tmp_path / "out.star"), "--center",
                "--center_Z", "2.75"]) == 0
    got = read_star(tmp_path / "out.star")["particles"]
    assert np.abs(got[origins].to_numpy() - ref[origins].to_numpy()).max() < 1e-4
    # particles straight from picking (no data_optics): the pixel size is unknown
    write_star(tmp_path / "picked.star", {"particles": blocks["particles"]}, version=50001)
    with pytest.raises(InputFileError, match=r"tomography particles without data_optics") as e:
        from cryopipe.starops import center_star
        center_star(tmp_path / "picked.star", tmp_path / "x.star", (0, 0, 2.75))
    _one_line(e)
