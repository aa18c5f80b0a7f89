"""Fuzzing the jobs' readers (issue 14): bad STAR and MRC inputs given to each job's command line end in ONE
line on stderr that names the file (and, where there is one, the column or value), exit status 1, no traceback,
and nothing left behind (no job folder, no pipeline entry, no output file). A finished job in a plain output
folder is not silently overwritten by a second run without ``--continue``.

The inputs are generated here: a tiny RELION 3.1 particle set (8 particles, 16 px, 4 Å/px, with its stack), two
64 px micrographs with a micrographs STAR and coordinate files, and two half maps; for the tomography jobs a RELION 5
tilt series (5 tilts of 64 px) with its tomograms.star, 2 particles and an optimisation set; for ``select
--classes`` a copy of RELION's class2d fixture. Each case mutates one file. A user error found *during* a job
(not only while checking its inputs) takes the half-made job folder and pipeline entry away as well, except when
continuing a job (its finished work stays).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryopipe.cli import main as cli_main
from cryopipe.io.mrc import write_mrc
from cryopipe.io.star import read_star, write_star

BOX = 16
APIX = 4.0
N = 8
MIC = 64


def _optics(image: bool = True) -> pd.DataFrame:
    cols = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]}
    if image:
        cols.update({"rlnImagePixelSize": [APIX], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    else:
        cols.update({"rlnMicrographPixelSize": [APIX]})
    return pd.DataFrame(cols)


def _dataset(d: Path) -> None:
    """Valid inputs in ``d`` (names relative to ``d``, the project directory of the runs)."""
    rng = np.random.default_rng(0)
    c = np.arange(BOX) - BOX // 2
    blob = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / 8.0).astype(np.float32)
    stack = blob[None] + 0.1 * rng.standard_normal((N, BOX, BOX)).astype(np.float32)
    write_mrc(d / "parts.mrcs", stack, APIX)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@parts.mrcs" for i in range(N)],
        "rlnMicrographName": ["mic1.mrc"] * N,
        "rlnCoordinateX": np.linspace(10, 50, N), "rlnCoordinateY": np.linspace(12, 52, N),
        "rlnAngleRot": np.linspace(0, 300, N), "rlnAngleTilt": np.linspace(10, 170, N),
        "rlnAnglePsi": np.linspace(0, 180, N), "rlnOriginXAngst": np.zeros(N), "rlnOriginYAngst": np.zeros(N),
        "rlnDefocusU": np.full(N, 15000.0), "rlnDefocusV": np.full(N, 14000.0), "rlnDefocusAngle": np.zeros(N),
        "rlnOpticsGroup": np.ones(N, dtype=int), "rlnClassNumber": np.ones(N, dtype=int),
        "rlnRandomSubset": np.arange(N) % 2 + 1,
    })
    write_star(d / "parts.star", {"optics": _optics(), "particles": parts}, version=30001)
    mics = []
    for m in (1, 2):
        write_mrc(d / f"mic{m}.mrc", rng.standard_normal((MIC, MIC)).astype(np.float32), APIX)
        coords = pd.DataFrame({"rlnCoordinateX": [20.0, 40.0], "rlnCoordinateY": [22.0, 42.0]})
        write_star(d / f"mic{m}_pick.star", {"": coords}, version=30001)
        mics.append(f"mic{m}.mrc")
    micro = pd.DataFrame({"rlnMicrographName": mics, "rlnOpticsGroup": [1, 1], "rlnDefocusU": [15000.0, 16000.0],
                          "rlnDefocusV": [14000.0, 15000.0], "rlnDefocusAngle": [0.0, 0.0],
                          "rlnCtfMaxResolution": [5.0, 5.0]})
    write_star(d / "mics.star", {"optics": _optics(image=False), "micrographs": micro}, version=30001)
    clist = pd.DataFrame({"rlnMicrographName": mics, "rlnMicrographCoordinates": [f"mic{m}_pick.star" for m in (1, 2)]})
    write_star(d / "coords.star", {"coordinate_files": clist}, version=30001)
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.exp(-((x - 2) ** 2 + y ** 2 + (z + 1) ** 2) / 6.0).astype(np.float32)
    write_mrc(d / "h1.mrc", vol + 0.05 * rng.standard_normal(vol.shape).astype(np.float32), APIX)
    write_mrc(d / "h2.mrc", vol + 0.05 * rng.standard_normal(vol.shape).astype(np.float32), APIX)
    write_mrc(d / "ref.mrc", vol, APIX)


# ------------------------------------------------------------------------------------------------ mutations

def _star_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _truncate_star(path: Path) -> None:
    """Cut the file in the middle of its last table's header (labels listed, no rows)."""
    lines = _star_lines(path)
    last_loop = max(i for i, line in enumerate(lines) if line.strip() == "loop_")
    path.write_text("".join(lines[: last_loop + 3]))


def _cut_bytes(path: Path) -> None:
    """Cut the file in the middle of a row."""
    text = path.read_text()
    path.write_text(text[: int(len(text) * 0.8)])


def _edit_column(path: Path, block: str, label: str, value) -> None:
    """Text-level edit of one loop: drop column ``label`` (``value is _DROP``) or set it to the token ``value`` in
    the middle row (so that wrong types and non-finite numbers reach the job's reader as written)."""
    lines = _star_lines(path)
    start = next(i for i, line in enumerate(lines) if line.strip() == f"data_{block}")
    i = next(k for k in range(start + 1, len(lines)) if lines[k].strip() == "loop_") + 1
    labels = []
    while lines[i].strip().startswith("_"):
        labels.append(lines[i].split()[0][1:])
        i += 1
    col = labels.index(label)
    rows = []
    while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("data_"):
        rows.append(i)
        i += 1
    if value is _DROP:
        header = next(k for k in range(start, len(lines)) if lines[k].split()[:1] == ["_" + label])
        for r in rows:
            tok = lines[r].split()
            del tok[col]
            lines[r] = " ".join(tok) + "\n"
        del lines[header]
    else:
        r = rows[len(rows) // 2]
        tok = lines[r].split()
        tok[col] = str(value)
        lines[r] = " ".join(tok) + "\n"
    path.write_text("".join(lines))


def _duplicate_column(path: Path, label: str) -> None:
    """The same label twice in a loop header (the row gets one more value)."""
    lines = _star_lines(path)
    out, in_loop, dup = [], False, False
    for line in lines:
        s = line.strip()
        if s.startswith("_" + label + " ") or s == "_" + label:
            out.append(line)
            out.append(line)
            dup = True
            in_loop = True
            continue
        if dup and in_loop and s and not s.startswith("_") and not s.startswith("#"):
            out.append(line.rstrip("\n") + " 1\n")
            continue
        if dup and s.startswith("data_"):
            in_loop = False
        out.append(line)
    path.write_text("".join(out))


_DROP = object()


def _mrc_set_header(path: Path, word: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[4 * word: 4 * word + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


def _mrc_truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: 1024 + (len(raw) - 1024) // 2])


def _mrc_nan(path: Path) -> None:
    from cryopipe.io.mrc import read_mrc

    data, apix = read_mrc(path)
    data = np.array(data, dtype=np.float32)
    data.reshape(-1)[data.size // 3] = np.nan
    write_mrc(path, data, apix)


def _not_mrc(path: Path) -> None:
    path.write_text("this is not an MRC file\n" * 3)


# (file, mutation, words the one line must contain (any of each tuple))
STAR_CASES = {
    "truncated": ("parts.star", _truncate_star, (("parts.star",),)),
    "cut_row": ("parts.star", _cut_bytes, (("parts.star",),)),
    "empty": ("parts.star", lambda p: p.write_text(""), (("parts.star",),)),
    "no_image_column": ("parts.star", lambda p: _edit_column(p, "particles", "rlnImageName", _DROP),
                        (("parts.star",), ("rlnImageName",))),
    "duplicate_column": ("parts.star", lambda p: _duplicate_column(p, "rlnDefocusU"),
                         (("parts.star",), ("rlnDefocusU",))),
    "nan_defocus": ("parts.star", lambda p: _edit_column(p, "particles", "rlnDefocusU", "nan"),
                    (("parts.star",), ("rlnDefocusU",))),
    "inf_angle": ("parts.star", lambda p: _edit_column(p, "particles", "rlnAngleTilt", "inf"),
                  (("parts.star",), ("rlnAngleTilt",))),
    "text_defocus": ("parts.star", lambda p: _edit_column(p, "particles", "rlnDefocusU", "abc"),
                     (("parts.star",), ("rlnDefocusU", "abc"))),
    "missing_stack": ("parts.mrcs", lambda p: p.unlink(), (("parts.mrcs",),)),
    "index_past_stack": ("parts.star", lambda p: _edit_column(p, "particles", "rlnImageName", "000099@parts.mrcs"),
                         (("parts.mrcs", "parts.star"), ("99",))),
    "stack_truncated": ("parts.mrcs", _mrc_truncate, (("parts.mrcs",),)),
    "stack_mode_wrong": ("parts.mrcs", lambda p: _mrc_set_header(p, 3, 1), (("parts.mrcs",), ("mode",))),
    "stack_huge_size": ("parts.mrcs", lambda p: _mrc_set_header(p, 0, 1 << 20), (("parts.mrcs",),)),
    "stack_nan": ("parts.mrcs", _mrc_nan, (("parts.mrcs", "parts.star"),)),
    "stack_not_mrc": ("parts.mrcs", _not_mrc, (("parts.mrcs",),)),
}

PARTICLE_JOBS = {
    "reconstruct": ["reconstruct", "--i", "parts.star", "--o", "out/map.mrc", "--ctf"],
    "class2d": ["class2d", "--i", "parts.star", "--o", "out/", "--K", "2", "--iter", "1",
                "--particle_diameter", "50", "--ctf"],
    "refine3d": ["refine3d", "--i", "parts.star", "--o", "out/", "--ref", "ref.mrc", "--iter", "1",
                 "--particle_diameter", "50", "--ctf", "--ini_high", "30"],
    "initialmodel": ["initialmodel", "--i", "parts.star", "--o", "out/", "--iter", "1",
                     "--particle_diameter", "50", "--ctf"],
}

MAP_CASES = {
    "map_truncated": ("h2.mrc", _mrc_truncate, (("h2.mrc",),)),
    "map_mode_wrong": ("h2.mrc", lambda p: _mrc_set_header(p, 3, 1), (("h2.mrc",), ("mode",))),
    "map_huge_size": ("h2.mrc", lambda p: _mrc_set_header(p, 0, 1 << 20), (("h2.mrc",),)),
    "map_nan": ("h2.mrc", _mrc_nan, (("h2.mrc",),)),
    "map_not_mrc": ("h2.mrc", _not_mrc, (("h2.mrc",),)),
    "map_missing": ("h2.mrc", lambda p: p.unlink(), (("h2.mrc",),)),
}

MAP_JOBS = {
    "postprocess": ["postprocess", "--i", "h1.mrc", "--i2", "h2.mrc", "--o", "out/postprocess"],
    "mask-create": ["mask-create", "--i", "h2.mrc", "--o", "out/mask.mrc", "--ini_threshold", "0.1"],
    "align-symmetry": ["align-symmetry", "--i", "h2.mrc", "--o", "out/aligned.mrc", "--sym", "C2"],
}

MIC_CASES = {
    "mics_truncated": ("mics.star", _truncate_star, (("mics.star",),)),
    "mics_no_name": ("mics.star", lambda p: _edit_column(p, "micrographs", "rlnMicrographName", _DROP),
                     (("mics.star",), ("rlnMicrographName",))),
    "mics_nan_defocus": ("mics.star", lambda p: _edit_column(p, "micrographs", "rlnDefocusU", "nan"),
                         (("mics.star",), ("rlnDefocusU",))),
    "mics_text_defocus": ("mics.star", lambda p: _edit_column(p, "micrographs", "rlnDefocusU", "abc"),
                          (("mics.star",), ("rlnDefocusU", "abc"))),
    "mic_missing": ("mic2.mrc", lambda p: p.unlink(), (("mic2.mrc",),)),
    "mic_truncated": ("mic2.mrc", _mrc_truncate, (("mic2.mrc",),)),
    "mic_mode_wrong": ("mic2.mrc", lambda p: _mrc_set_header(p, 3, 1), (("mic2.mrc",), ("mode",))),
    "mic_nan": ("mic2.mrc", _mrc_nan, (("mic2.mrc",),)),
    "coords_text": ("mic1_pick.star", lambda p: _edit_column(p, "", "rlnCoordinateX", "abc"),
                    (("mic1_pick.star",), ("rlnCoordinateX", "abc"))),
}

MIC_JOBS = {
    "extract": ["extract", "--i", "mics.star", "--coord_list", "coords.star", "--extract_size", "16",
                "--o", "out/"],
    "autopick": ["autopick", "--i", "mics.star", "--LoG", "--LoG_diam_min", "20", "--LoG_diam_max", "30",
                 "--odir", "out/"],
}


TOMO_PX = 4.0
TOMO_W = 64
TOMO_NT = 5


def _tomo_dataset(d: Path) -> None:
    """A RELION 5 tomography set in ``d``: ``tilt_series/TS_01.{mrcs,star}`` (5 tilts −30…30°, 64², 4 Å/px),
    ``tomograms.star`` (one 64×64×32 px tomogram), ``particles.star`` (2 particles) and
    ``optimisation_set.star``."""
    rng = np.random.default_rng(1)
    (d / "tilt_series").mkdir()
    write_mrc(d / "tilt_series" / "TS_01.mrcs",
              rng.standard_normal((TOMO_NT, TOMO_W, TOMO_W)).astype(np.float32), TOMO_PX)
    tilts = np.linspace(-30.0, 30.0, TOMO_NT)
    ts = pd.DataFrame({
        "rlnMicrographName": [f"{i + 1:06d}@tilt_series/TS_01.mrcs" for i in range(TOMO_NT)],
        "rlnTomoNominalStageTiltAngle": tilts, "rlnTomoNominalTiltAxisAngle": np.full(TOMO_NT, 85.0),
        "rlnMicrographPreExposure": 3.0 * np.abs(np.arange(TOMO_NT) - TOMO_NT // 2),
        "rlnDefocusU": np.full(TOMO_NT, 30000.0), "rlnDefocusV": np.full(TOMO_NT, 29500.0),
        "rlnDefocusAngle": np.zeros(TOMO_NT), "rlnTomoXTilt": np.zeros(TOMO_NT), "rlnTomoYTilt": tilts,
        "rlnTomoZRot": np.full(TOMO_NT, 85.0), "rlnTomoXShiftAngst": np.zeros(TOMO_NT),
        "rlnTomoYShiftAngst": np.zeros(TOMO_NT)})
    write_star(d / "tilt_series" / "TS_01.star", {"TS_01": ts}, version=50001)
    tomos = pd.DataFrame({
        "rlnTomoName": ["TS_01"], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.07], "rlnMicrographOriginalPixelSize": [TOMO_PX / 2], "rlnTomoHand": [-1],
        "rlnTomoTiltSeriesPixelSize": [TOMO_PX], "rlnTomoTiltSeriesStarFile": ["tilt_series/TS_01.star"],
        "rlnTomoSizeX": [TOMO_W], "rlnTomoSizeY": [TOMO_W], "rlnTomoSizeZ": [32], "rlnOpticsGroupName": ["optics1"]})
    write_star(d / "tomograms.star", {"global": tomos}, version=50001)
    parts = pd.DataFrame({
        "rlnTomoName": ["TS_01", "TS_01"], "rlnTomoParticleName": ["TS_01/1", "TS_01/2"],
        "rlnCenteredCoordinateXAngst": [-20.0, 24.0], "rlnCenteredCoordinateYAngst": [16.0, -12.0],
        "rlnCenteredCoordinateZAngst": [4.0, -8.0], "rlnAngleRot": [0.0, 30.0], "rlnAngleTilt": [0.0, 60.0],
        "rlnAnglePsi": [0.0, 90.0], "rlnRandomSubset": [1, 2]})
    write_star(d / "particles.star", {"particles": parts}, version=50001)
    write_star(d / "optimisation_set.star", {"optimisation_set": pd.DataFrame(
        {"rlnTomoParticlesFile": ["particles.star"], "rlnTomoTomogramsFile": ["tomograms.star"]})}, version=50001)


def _tilt_stack_minus_one(path: Path) -> None:
    from cryopipe.io.mrc import read_mrc

    data, apix = read_mrc(path)
    write_mrc(path, np.array(data[:-1], dtype=np.float32), apix)


def _tilt_stack_pixel(path: Path) -> None:
    from cryopipe.io.mrc import read_mrc

    data, _ = read_mrc(path)
    write_mrc(path, np.array(data, dtype=np.float32), 3.0)


TOMO_CASES = {
    "tilt_image_missing": ("tilt_series/TS_01.mrcs", lambda p: p.unlink(), (("TS_01.mrcs",), ("not found",))),
    "tilt_count_mismatch": ("tilt_series/TS_01.mrcs", _tilt_stack_minus_one, (("TS_01.mrcs",), ("5",), ("4",))),
    "no_pre_exposure": ("tilt_series/TS_01.star",
                        lambda p: _edit_column(p, "TS_01", "rlnMicrographPreExposure", _DROP),
                        (("TS_01.star",), ("rlnMicrographPreExposure",))),
    "pixel_size_mismatch": ("tilt_series/TS_01.mrcs", _tilt_stack_pixel,
                            (("TS_01.mrcs",), ("rlnTomoTiltSeriesPixelSize",))),
    "particle_outside_tomogram": ("particles.star",
                                  lambda p: _edit_column(p, "particles", "rlnCenteredCoordinateXAngst", "900"),
                                  (("particles.star",), ("TS_01/2",), ("outside",))),
    "unknown_tomo_name": ("particles.star", lambda p: _edit_column(p, "particles", "rlnTomoName", "TS_09"),
                          (("particles.star",), ("TS_09",))),
}

TOMO_JOBS = {
    "subtomo": ["subtomo", "--i", "optimisation_set.star", "--b", "16", "--o", "out/"],
    "reconstruct-particle": ["reconstruct-particle", "--i", "optimisation_set.star", "--b", "16", "--o", "out/"],
    "reconstruct-tomogram": ["reconstruct-tomogram", "--t", "tomograms.star", "--bin", "4", "--o", "out/"],
}


def _write_cube(shape, value: float):
    def mutate(path: Path) -> None:
        write_mrc(path, np.full(shape, value, dtype=np.float32), APIX)
    return mutate


SIM_CASES = {
    **MAP_CASES,
    "map_nan": ("h2.mrc", _mrc_nan, (("h2.mrc",), ("NaN",))),
    "map_not_cubic": ("h2.mrc", _write_cube((BOX, BOX, BOX - 4), 1.0), (("h2.mrc",), ("cube",))),
    "map_constant": ("h2.mrc", _write_cube((BOX, BOX, BOX), 0.0), (("h2.mrc",), ("constant",))),
}

SIM_JOBS = {"simulate": ["simulate", "--map", "h2.mrc", "--n", "4", "--o", "out/"]}


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _run_case(tmp_path: Path, monkeypatch, capsys, argv: list[str], target: str, mutate, words,
              dataset=_dataset) -> None:
    monkeypatch.chdir(tmp_path)
    dataset(tmp_path)
    mutate(tmp_path / target)
    before = _tree(tmp_path)
    rc = cli_main(argv)
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in captured.err, captured.err
    assert rc == 1, (rc, captured.err[-2000:])
    assert len(err) == 1, err
    for alternatives in words:
        assert any(w in err[0] for w in alternatives), (alternatives, err[0])
    assert _tree(tmp_path) == before, sorted(_tree(tmp_path) - before)


def _cases(cases: dict, jobs: dict, skip: dict[str, set[str]] | None = None):
    out = []
    for job, argv in jobs.items():
        for case, (target, mutate, words) in cases.items():
            marks = ()
            if skip and case in skip.get(job, set()):
                marks = (pytest.mark.skip(reason="not a required input of this job"),)
            out.append(pytest.param(argv, target, mutate, words, id=f"{job}-{case}", marks=marks))
    return out


@pytest.mark.parametrize("argv,target,mutate,words", _cases(STAR_CASES, PARTICLE_JOBS))
def test_bad_particles_input(argv, target, mutate, words, tmp_path, monkeypatch, capsys):
    _run_case(tmp_path, monkeypatch, capsys, argv, target, mutate, words)


@pytest.mark.parametrize("argv,target,mutate,words", _cases(MAP_CASES, MAP_JOBS))
def test_bad_map_input(argv, target, mutate, words, tmp_path, monkeypatch, capsys):
    _run_case(tmp_path, monkeypatch, capsys, argv, target, mutate, words)


@pytest.mark.parametrize("argv,target,mutate,words", _cases(
    MIC_CASES, MIC_JOBS, skip={"autopick": {"coords_text", "mics_nan_defocus", "mics_text_defocus"}}))
def test_bad_micrograph_input(argv, target, mutate, words, tmp_path, monkeypatch, capsys):
    _run_case(tmp_path, monkeypatch, capsys, argv, target, mutate, words)


STAR_TOOL_CASES = [
    (["--select", "rlnDefocusU", "--minval", "0"], "truncated"),
    (["--select", "rlnDefocusU", "--minval", "0"], "cut_row"),
    (["--select", "rlnDefocusU", "--minval", "0"], "text_defocus"),
    (["--select", "rlnDefocusU", "--minval", "0"], "nan_defocus"),
    (["--select", "rlnDefocusU", "--minval", "0"], "duplicate_column"),
    (["--split", "--nr_split", "2"], "truncated"),
    (["--split", "--nr_split", "2"], "empty"),
    (["--center", "--center_X", "1"], "inf_angle"),
    (["--center", "--center_X", "1"], "truncated"),
    (["--remove_duplicates", "10"], "cut_row"),
]


@pytest.mark.parametrize("op,case", STAR_TOOL_CASES, ids=[f"{o[0][2:]}-{c}" for o, c in STAR_TOOL_CASES])
def test_star_tool_bad_input(op, case, tmp_path, monkeypatch, capsys):
    target, mutate, words = STAR_CASES[case]
    _run_case(tmp_path, monkeypatch, capsys, ["star", "--i", "parts.star", "--o", "sel.star", *op], target,
              mutate, words)


def test_finished_plain_job_is_not_overwritten(tmp_path, monkeypatch, capsys):
    """A second run into a plain output folder that holds a finished job is refused (one line, nothing
    touched) unless --continue is given."""
    monkeypatch.chdir(tmp_path)
    _dataset(tmp_path)
    argv = ["extract", "--i", "mics.star", "--coord_list", "coords.star", "--extract_size", "16", "--o", "done/"]
    assert cli_main(argv) == 0
    assert (tmp_path / "done" / "RELION_JOB_EXIT_SUCCESS").is_file()
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "done").iterdir()}
    capsys.readouterr()
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "done" in err[0] and "--continue" in err[0], err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "done").iterdir()} == stamp
    assert cli_main([*argv, "--continue"]) == 0  # asked for: continued


def test_project_job_with_bad_input_leaves_no_entry(tmp_path, monkeypatch, capsys):
    """In a project, a new job that fails on its input takes its folder and pipeline entry away again; the next
    job gets the next number (RELION also skips numbers)."""
    from cryopipe.pipeline.project import Project

    monkeypatch.chdir(tmp_path)
    _dataset(tmp_path)
    _mrc_nan(tmp_path / "mic2.mrc")
    rc = cli_main(["extract", "--i", "mics.star", "--coord_list", "coords.star", "--extract_size", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "mic2.mrc" in err[0], err
    assert not (tmp_path / "Extract" / "job001").exists()
    pipe = Project(tmp_path).read()
    assert pipe.processes == [] and pipe.input_edges == [] and pipe.nodes == {}


@pytest.mark.parametrize("argv,target,mutate,words", _cases(
    TOMO_CASES, TOMO_JOBS,
    skip={"reconstruct-tomogram": {"particle_outside_tomogram", "unknown_tomo_name"}}))
def test_bad_tomography_input(argv, target, mutate, words, tmp_path, monkeypatch, capsys):
    _run_case(tmp_path, monkeypatch, capsys, argv, target, mutate, words, dataset=_tomo_dataset)


def test_tomography_dataset_is_valid(tmp_path, monkeypatch, capsys):
    """The unmutated tomography set runs through every tomography job (so each case fails for its mutation)."""
    monkeypatch.chdir(tmp_path)
    _tomo_dataset(tmp_path)
    for job, argv in TOMO_JOBS.items():
        assert cli_main([a if a != "out/" else f"ok_{job}/" for a in argv]) == 0, job
        assert (tmp_path / f"ok_{job}" / "RELION_JOB_EXIT_SUCCESS").is_file()


@pytest.mark.parametrize("argv,target,mutate,words", _cases(SIM_CASES, SIM_JOBS))
def test_bad_simulate_input(argv, target, mutate, words, tmp_path, monkeypatch, capsys):
    _run_case(tmp_path, monkeypatch, capsys, argv, target, mutate, words)


def test_simulate_bad_atomic_model(tmp_path, monkeypatch, capsys):
    _run_case(tmp_path, monkeypatch, capsys, ["simulate", "--model", "bad.pdb", "--n", "4", "--o", "out/"],
              "bad.pdb", lambda p: p.write_text("ATOM garbage\nnot a PDB file\n"), (("bad.pdb",),))


def test_simulate_map_takes_its_header_pixel_size(tmp_path, monkeypatch, capsys):
    """``--map`` without ``--angpix``: the map's own pixel size (was: the particle default 3 Å, refused)."""
    monkeypatch.chdir(tmp_path)
    _dataset(tmp_path)
    assert cli_main(["simulate", "--map", "ref.mrc", "--n", "4", "--o", "sim/"]) == 0
    assert read_star(tmp_path / "sim" / "particles.star")["optics"]["rlnImagePixelSize"].tolist() == [APIX]


SELECT_MIC_CASES = {k: MIC_CASES[k] for k in ("mics_truncated", "mics_no_name")}
SELECT_MIC_CASES["mics_empty"] = ("mics.star", lambda p: p.write_text(""), (("mics.star",),))

SELECT_MIC_JOBS = {"select": ["select", "--i", "mics.star", "--list", "mic1", "--o", "out/"]}


@pytest.mark.parametrize("argv,target,mutate,words", _cases(SELECT_MIC_CASES, SELECT_MIC_JOBS))
def test_bad_select_micrographs_input(argv, target, mutate, words, tmp_path, monkeypatch, capsys):
    _run_case(tmp_path, monkeypatch, capsys, argv, target, mutate, words)


def test_select_unknown_micrograph_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A user error found during the job (the names are matched inside the job): no folder left."""
    _run_case(tmp_path, monkeypatch, capsys, ["select", "--i", "mics.star", "--list", "mic1,mic7", "--o", "out/"],
              "mics.star", lambda p: None, (("mic7",),))


_RUN = "run_it005_optimiser.star"
SELECT_CLASS_CASES = {
    "classes_missing": ("run_it005_classes.mrcs", lambda p: p.unlink(), (("run_it005_classes.mrcs",),)),
    "classes_truncated": ("run_it005_classes.mrcs", _mrc_truncate, (("run_it005_classes.mrcs",),)),
    "classes_nan": ("run_it005_classes.mrcs", _mrc_nan, (("run_it005_classes.mrcs",), ("NaN",))),
    "model_missing": ("run_it005_model.star", lambda p: p.unlink(), (("run_it005_model.star",),)),
    "data_no_class": ("run_it005_data.star", lambda p: _edit_column(p, "particles", "rlnClassNumber", _DROP),
                      (("run_it005_data.star",), ("rlnClassNumber",))),
    "data_text_class": ("run_it005_data.star", lambda p: _edit_column(p, "particles", "rlnClassNumber", "abc"),
                        (("run_it005_data.star",), ("rlnClassNumber",), ("abc",))),
    "data_cut_row": ("run_it005_data.star", _cut_bytes, (("run_it005_data.star",),)),
}


@pytest.mark.parametrize("case", sorted(SELECT_CLASS_CASES))
def test_bad_select_classes_input(case, relion_dir, tmp_path, monkeypatch, capsys):
    def dataset(d: Path) -> None:
        import shutil

        for name in ("run_it005_classes.mrcs", "run_it005_data.star", "run_it005_model.star", _RUN):
            shutil.copyfile(relion_dir / "class2d" / name, d / name)

    target, mutate, words = SELECT_CLASS_CASES[case]
    _run_case(tmp_path, monkeypatch, capsys, ["select", "--classes", "--i", _RUN, "--auto", "--recenter",
                                              "--o", "out/"], target, mutate, words, dataset=dataset)


def test_select_class_out_of_range_leaves_nothing(relion_dir, tmp_path, monkeypatch, capsys):
    """A user error found during the job (the class list is checked against the run, inside the job)."""
    import shutil

    for name in ("run_it005_classes.mrcs", "run_it005_data.star", "run_it005_model.star", _RUN):
        shutil.copyfile(relion_dir / "class2d" / name, tmp_path / name)
    _run_case(tmp_path, monkeypatch, capsys, ["select", "--classes", "--i", _RUN, "--select_classes", "2,9",
                                              "--o", "out/"], _RUN, lambda p: None, (("9",),), dataset=lambda d: None)


def test_error_during_job_removes_new_project_job_but_not_continued_work(tmp_path, monkeypatch, capsys):
    """A CryopipeError raised inside a running job (after its folder and pipeline entry were made): a new job is
    taken away again (folder, pipeline entry); a continued job keeps its folder and finished outputs."""
    from cryopipe.pipeline.project import Project

    monkeypatch.chdir(tmp_path)
    _dataset(tmp_path)
    assert cli_main(["select", "--i", "mics.star", "--first", "1", "--o", "Select/job001/"]) == 0
    capsys.readouterr()
    # new job: the unknown name is found while selecting, inside the job
    assert cli_main(["select", "--i", "mics.star", "--list", "mic1,mic7"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "mic7" in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "Select" / "job002").exists()
    assert [p.name for p in Project(tmp_path).read().processes] == ["Select/job001/"]
    # continued job: the error leaves its folder, its earlier output and its pipeline entry
    assert cli_main(["select", "--i", "mics.star", "--list", "mic7", "--o", "Select/job001/", "--continue"]) == 1
    assert (tmp_path / "Select" / "job001" / "micrographs_selected.star").is_file()
    assert (tmp_path / "Select" / "job001" / "RELION_JOB_EXIT_FAILURE").is_file()
    assert [p.name for p in Project(tmp_path).read().processes] == ["Select/job001/"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_error_after_continuable_work_keeps_the_job(fail_at, tmp_path, monkeypatch, capsys):
    """class2d marks its job continuable once an iteration's files are written: a user error in iteration 1
    takes the new job away, one in iteration 2 leaves it (failed) with iteration 1 to continue from."""
    from cryopipe.engine.classify2d import Optimiser2D
    from cryopipe.errors import CryopipeError

    monkeypatch.chdir(tmp_path)
    _dataset(tmp_path)
    real = Optimiser2D.iterate
    calls = []

    def iterate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise CryopipeError("parts.mrcs: simulated user error during iteration")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Optimiser2D, "iterate", iterate)
    argv = ["class2d", "--i", "parts.star", "--o", "c2d/", "--K", "2", "--iter", "2", "--particle_diameter", "50"]
    assert cli_main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(err) == 1 and "simulated user error" in err[0], err
    if fail_at == 1:
        assert not (tmp_path / "c2d").exists()
    else:
        assert (tmp_path / "c2d" / "run_it001_optimiser.star").is_file()
        assert (tmp_path / "c2d" / "RELION_JOB_EXIT_FAILURE").is_file()
        monkeypatch.setattr(Optimiser2D, "iterate", real)
        assert cli_main(["class2d", "--continue", "c2d/run_it001_optimiser.star", "--o", "c2d/", "--iter", "2"]) == 0
        assert (tmp_path / "c2d" / "run_it002_optimiser.star").is_file()


def test_error_after_an_optimiser_iteration_keeps_the_job(tmp_path, monkeypatch):
    """Jobs that do not mark themselves continuable (refine3d, initialmodel) keep a new folder holding an
    iteration >= 1 (``run_it001_optimiser.star``) on a user error; with only iteration 0 it is taken away."""
    from cryopipe.errors import CryopipeError
    from cryopipe.pipeline.project import ProcessLabel, Project

    monkeypatch.chdir(tmp_path)
    proj = Project(tmp_path)
    for it, kept in ((0, False), (1, True)):
        with pytest.raises(CryopipeError):
            with proj.new_job("Refine3D", ProcessLabel.REFINE3D) as job:
                (job.dir / f"run_it{it:03d}_optimiser.star").write_text("data_optimiser_general\n")
                name = job.name
                raise CryopipeError("ref.mrc: simulated user error")
        assert (tmp_path / name).exists() == kept, (it, name)
        assert (proj.read().process(name) is not None) == kept
