"""The README's main command runs end to end (small sizes) and reports scores against the truth."""

import json

from cryopipe.cli import main as cli_main
from cryopipe.io.star import read_star


def test_demo_small(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["demo", "--o", "proj", "--n_particles", "600", "--n_micrographs", "2", "--class2d_K", "3",
                     "--class2d_iter", "4", "--initial_iter", "4", "--refine_iter", "3", "--particles_per_tomogram", "20"]) == 0
    out = capsys.readouterr().out
    assert "FSC vs truth" in out and "precision" in out
    s = json.loads((tmp_path / "proj" / "demo_summary.json").read_text())
    # 600 particles at SNR 0.1 with known angles still give a sensible map (well beyond 10 Å)
    assert s["reconstruct"]["fsc_truth_0.5_A"] < 10.0
    assert s["extract"]["n_particles"] > 0
    pipe = read_star(tmp_path / "proj" / "default_pipeline.star")
    procs = pipe["pipeline_processes"]
    assert list(procs["rlnPipeLineProcessName"]) == ["Simulate/job001/", "Reconstruct/job002/", "Simulate/job003/",
                                                     "AutoPick/job004/", "Extract/job005/", "Class2D/job006/",
                                                     "Select/job007/", "AutoPick/job008/", "Extract/job009/",
                                                     "InitialModel/job010/", "Refine3D/job011/", "MaskCreate/job012/",
                                                     "PostProcess/job013/", "Simulate/job014/", "Tomograms/job015/",
                                                     "PseudoSubtomo/job016/", "ReconstructParticleTomo/job017/"]
    assert s["autopick_template"]["n_picks"] > 0 and s["extract_template"]["n_particles"] > 0
    assert set(procs["rlnPipeLineProcessStatusLabel"]) == {"Succeeded"}
    # the 3D path ran end to end and was scored against the truth (a few iterations only: no quality claim here)
    for key in ("initialmodel", "refine3d", "postprocess"):
        assert s[key]["fsc_truth_0.5_A"] > 0
    assert s["postprocess"]["resolution_0.143_A"] > 0
    assert "refine3d" in out
    # the tilt-series path: tomogram density where the particles are, all subtomograms written, a map at the
    # true poses that agrees with the truth far beyond the particle's size (Nyquist 12 Å at 6 Å/px)
    assert s["reconstruct_tomogram"]["position_error_median_voxels"] < 0.5
    assert s["subtomo"]["n_written"] == s["subtomo"]["n_particles"] == 40
    assert s["reconstruct_particle"]["fsc_truth_0.5_A"] < 20.0
    assert "reconstruct-particle (true poses)" in out
    note = (tmp_path / "proj" / "Tomograms" / "job015" / "note.txt").read_text()
    assert "cryopipe reconstruct-tomogram --t Simulate/job014/tomograms.star" in note


def test_demo_never_replaces_a_folder_it_did_not_make(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "precious.mrc").write_text("x")
    assert cli_main(["demo", "--o", "mydata", "--n_particles", "10"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not made by cryopipe demo" in err[0]
    assert (tmp_path / "mydata" / "precious.mrc").exists()
