"""``cryopipe select`` for micrographs: --first / --list, optics and STAR version kept, pipeline registration."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryopipe.errors import CryopipeError
from cryopipe.io.star import read_star, read_star_with_version, write_star
from cryopipe.jobs.select import match_names, parse_name_list, select_micrographs, select_rows


def _micrographs(n: int = 6) -> dict:
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"], "rlnOpticsGroup": [1, 2],
                           "rlnMicrographPixelSize": [1.1, 1.1], "rlnVoltage": [300.0, 300.0]})
    mics = pd.DataFrame({
        "rlnMicrographName": [f"MotionCorr/job002/Movies/mic{i:03d}.mrc" for i in range(1, n + 1)],
        "rlnOpticsGroup": [1 + (i % 2) for i in range(n)],
        "rlnDefocusU": np.linspace(10000, 20000, n),
    })
    return {"optics": optics, "micrographs": mics}


def _run(argv: list[str]) -> int:
    from cryopipe.jobs import select

    p = argparse.ArgumentParser()
    select.add_arguments(p)
    return select.main(p.parse_args(argv))


def test_first_n_keeps_optics_and_version(tmp_path):
    src = tmp_path / "mics.star"
    blocks = _micrographs()
    write_star(src, blocks, version=50001)
    res = select_micrographs(src, tmp_path / "sel.star", first=4)
    assert (res.n_input, res.n_selected) == (6, 4)
    out, version = read_star_with_version(tmp_path / "sel.star")
    assert version == 50001
    assert list(out) == ["optics", "micrographs"]
    pd.testing.assert_frame_equal(out["optics"], blocks["optics"])
    pd.testing.assert_frame_equal(out["micrographs"], blocks["micrographs"].iloc[:4].reset_index(drop=True))
    # more than available: all of them
    res = select_micrographs(src, tmp_path / "all.star", first=100)
    assert res.n_selected == 6


def test_list_by_names_file_and_commas(tmp_path):
    src = tmp_path / "mics.star"
    write_star(src, _micrographs())
    names = tmp_path / "names.txt"
    names.write_text("# wanted\nmic005.mrc\nMotionCorr/job002/Movies/mic002.mrc  # full name\nmic004\n")
    res = select_micrographs(src, tmp_path / "sel.star", names=parse_name_list(str(names)))
    assert res.n_selected == 3
    got = read_star(tmp_path / "sel.star")["micrographs"]["rlnMicrographName"].tolist()
    assert got == [f"MotionCorr/job002/Movies/mic{i:03d}.mrc" for i in (2, 4, 5)]  # input order kept
    assert parse_name_list("a.mrc,b.mrc, c") == ["a.mrc", "b.mrc", "c"]


def test_name_errors():
    avail = ["A/x/mic1.mrc", "B/y/mic1.mrc", "A/x/mic2.mrc"]
    assert match_names(avail, ["mic2"]).tolist() == [2]
    with pytest.raises(CryopipeError, match="ambiguous"):
        match_names(avail, ["mic1.mrc"])
    with pytest.raises(CryopipeError, match="no micrograph named"):
        match_names(avail, ["mic9"])
    table = pd.DataFrame({"rlnMicrographName": avail})
    with pytest.raises(CryopipeError):
        select_rows(table, first=2, names=["mic2"])
    with pytest.raises(CryopipeError):
        select_rows(table, first=0)


def test_relion30_file(tmp_path):
    src = tmp_path / "mics30.star"
    table = pd.DataFrame({"rlnMicrographName": [f"Micrographs/m{i}.mrc" for i in range(5)],
                          "rlnDetectorPixelSize": [14.0] * 5, "rlnMagnification": [10000.0] * 5})
    write_star(src, {"": table}, version=None)
    select_micrographs(src, tmp_path / "out.star", first=2)
    blocks, version = read_star_with_version(tmp_path / "out.star")
    assert version is None and list(blocks) == [""]
    assert blocks[""]["rlnMicrographName"].tolist() == ["Micrographs/m0.mrc", "Micrographs/m1.mrc"]


def test_select_job_in_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_star(Path("mics.star"), _micrographs())
    assert _run(["--i", "mics.star", "--o", "Select/job005/", "--first", "2"]) == 0
    out = read_star(Path("Select/job005/micrographs_selected.star"))
    assert len(out["micrographs"]) == 2 and len(out["optics"]) == 2
    assert Path("Select/job005/RELION_JOB_EXIT_SUCCESS").exists()
    pipe = read_star(Path("default_pipeline.star"))
    nodes = dict(zip(pipe["pipeline_nodes"]["rlnPipeLineNodeName"], pipe["pipeline_nodes"]["rlnPipeLineNodeTypeLabel"]))
    assert nodes["Select/job005/micrographs_selected.star"] == "MicrographGroupMetadata.star.relion"
    assert pipe["pipeline_processes"]["rlnPipeLineProcessTypeLabel"].tolist() == ["relion.select.interactive"]
    # a list that names an unknown micrograph fails the job, with a one-line error, and (a user error in a new
    # job) takes the half-made job folder and its pipeline entry away again
    with pytest.raises(CryopipeError, match="mic099"):
        _run(["--i", "mics.star", "--o", "Select/job006/", "--list", "mic001,mic099"])
    assert not Path("Select/job006").exists()
    pipe = read_star(Path("default_pipeline.star"))
    assert pipe["pipeline_processes"]["rlnPipeLineProcessName"].tolist() == ["Select/job005/"]
