"""``cryopipe simulate``: job folders, STAR names relative to the project, and a reconstruction round trip."""

from __future__ import annotations

import numpy as np
import pytest

from cryopipe.cli import main as cli
from cryopipe.io.mrc import ImageReader, read_mrc
from cryopipe.io.star import read_star
from cryopipe.jobs.simulate import build_volume, default_box


def test_default_box_and_volume():
    assert default_box(74.6, 3.0) == 48  # 3ENL at 3 Å, as the RELION fixtures
    vol, apix = build_volume("3enl", None, 3.0)
    assert vol.shape == (48, 48, 48) and apix == 3.0


def test_particles_into_plain_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli(["simulate", "--what", "particles", "--n", "40", "--box", "48", "--angpix", "3", "--snr", "0.5",
              "--batch_size", "16", "--images_per_stack", "25", "--frac_empty", "0.1", "--float16",
              "--o", "out/p1", "--device", "cpu"])
    assert rc == 0
    d = tmp_path / "out" / "p1"
    assert (d / "RELION_JOB_EXIT_SUCCESS").exists() and (d / "truth_map.mrc").exists()
    star = read_star(d / "particles.star")
    names = star["particles"]["rlnImageName"]
    assert names.iloc[0] == "00000001@out/p1/Particles/particles_00001.mrcs"  # relative to the current directory
    assert names.iloc[-1] == "00000015@out/p1/Particles/particles_00002.mrcs"
    imgs = ImageReader(names, root_dir=tmp_path).read(np.arange(40))
    assert imgs.shape == (40, 48, 48) and np.isfinite(imgs).all()
    truth = read_star(d / "particles_truth.star")["particles"]
    assert (truth["cryopipeJunkType"] == 1).sum() == 4


def test_micrographs_in_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli(["simulate", "--what", "micrographs", "--n", "2", "--mic_size", "256", "--n_per_mic", "4",
              "--snr", "1", "--n_blobs", "1", "--device", "cpu"])
    assert rc == 0
    job = tmp_path / "Simulate" / "job001"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    mics = read_star(job / "micrographs.star")["micrographs"]
    assert list(mics["rlnMicrographName"]) == ["Simulate/job001/Micrographs/mic001.mrc",
                                               "Simulate/job001/Micrographs/mic002.mrc"]
    assert read_mrc(tmp_path / mics["rlnMicrographName"].iloc[0])[0].shape == (256, 256)
    coords = read_star(job / "coords_truth_list.star")["coordinate_files"]
    assert (tmp_path / coords["rlnMicrographCoordinates"].iloc[1]).exists()
    pipe = read_star(tmp_path / "default_pipeline.star")
    procs = pipe["pipeline_processes"]
    assert procs["rlnPipeLineProcessTypeLabel"].iloc[0] == "cryopipe.simulate"
    assert procs["rlnPipeLineProcessStatusLabel"].iloc[0] == "Succeeded"
    nodes = set(pipe["pipeline_nodes"]["rlnPipeLineNodeName"])
    assert {"Simulate/job001/micrographs.star", "Simulate/job001/coords_truth_list.star",
            "Simulate/job001/truth_map.mrc"} <= nodes


def test_bad_options_give_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["simulate", "--n", "5", "--snr", "0", "--o", "x", "--box", "48"]) == 1
    assert "SNR must be > 0" in capsys.readouterr().err
    assert cli(["simulate", "--n", "5", "--box", "16", "--o", "y"]) == 1
    assert "smaller than the particle diameter" in capsys.readouterr().err
    assert cli(["simulate", "--model", "nope.pdb", "--o", "z"]) == 1
    assert "not found" in capsys.readouterr().err


def test_reconstruction_round_trip(tmp_path, monkeypatch):
    """Noise-free simulated particles with their true angles reconstruct the truth map (cryopipe reconstruct)."""
    pytest.importorskip("cryopipe.jobs.reconstruct")
    monkeypatch.chdir(tmp_path)
    assert cli(["simulate", "--n", "600", "--box", "48", "--snr", "inf", "--truth_in_main", "--seed", "2",
                "--device", "cpu"]) == 0
    assert cli(["reconstruct", "--i", "Simulate/job001/particles.star", "--ctf", "--o", "rec.mrc",
                "--device", "cpu"]) == 0
    rec = read_mrc(tmp_path / "rec.mrc")[0]
    truth = read_mrc(tmp_path / "Simulate" / "job001" / "truth_map.mrc")[0]
    # RELION fixtures README §4: relion_reconstruct of 2000 noise-free CTF projections correlates 0.949 with ref_map
    assert np.corrcoef(rec.ravel(), truth.ravel())[0, 1] > 0.93
