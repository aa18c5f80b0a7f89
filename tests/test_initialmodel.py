"""``cryopipe initialmodel``: de novo gradient run in C1 writing RELION-named files every ``--grad_write_iter``
iterations (with the momenta), ``initial_model.mrc`` aligned to and symmetrised in ``--sym``, pipeline nodes,
``--continue`` reproducing the uninterrupted run (momenta restored), and one-line errors.

Data: 200 simulated particles (box 24, 4 Å/px, SNR 1), a few mini-batch iterations at HEALPix order 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.cli import main as cli
from cryopipe.engine.vdam import GradSchedule, GradUpdate
from cryopipe.errors import CryopipeError
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star
from cryopipe.jobs.initialmodel import initial_model
from cryopipe.pipeline.project import NodeType, read_pipeline

torch.set_num_threads(2)

FAST = ["--healpix_order", "0", "--offset_range", "2", "--offset_step", "1", "--particle_diameter", "70",
        "--batch_size", "100", "--grad_ini_subset", "100", "--grad_fin_subset", "200", "--j", "2"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("initialmodel")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli(["simulate", "--what", "particles", "--n", "200", "--box", "24", "--angpix", "4", "--snr", "1",
                    "--seed", "4"]) == 0
        assert cli(["initialmodel", "--i", "Simulate/job001/particles.star", "--ctf", "--iter", "4",
                    "--grad_write_iter", "2", "--sym", "C2", "--random_seed", "7", *FAST]) == 0
    finally:
        os.chdir(cwd)
    return root


def test_files_tables_symmetry_and_nodes(project):
    d = project / "InitialModel" / "job002"
    for it in (0, 2, 4):
        for name in ("class001.mrc", "model.star", "data.star", "optimiser.star", "sampling.star", "momenta.pt"):
            assert (d / f"run_it{it:03d}_{name}").is_file(), (it, name)
    assert not (d / "run_it001_model.star").exists() and not (d / "run_it003_model.star").exists()
    for name in ("run_resolution.png", "run_angdist.png", "run_plots.pdf"):  # plots.refinement
        assert (d / name).is_file(), name
    m = read_star(d / "run_it004_model.star")
    assert m["model_general"]["rlnReferenceDimensionality"] == 3 and m["model_general"]["rlnNrClasses"] == 1
    assert m["model_classes"]["rlnReferenceImage"][0] == "InitialModel/job002/run_it004_class001.mrc"
    assert m["model_general"]["rlnTau2FudgeFactor"] > 1.0  # T rises from 1 towards --tau2_fudge 4
    o = read_star(d / "run_it004_optimiser.star")["optimiser_general"]
    assert o["rlnDoGradientRefine"] == 1 and o["rlnDoSplitRandomHalves"] == 0 and o["rlnDoAutoRefine"] == 0
    assert o["rlnCurrentIteration"] == 4 and o["rlnNumberOfIterations"] == 4 and o["rlnTau2FudgeArg"] == 4.0
    assert o["rlnSgdInitialSubsetSize"] == 100 and o["rlnSgdFinalSubsetSize"] == 200
    assert o["cryopipeGradMomentaFile"] == "InitialModel/job002/run_it004_momenta.pt"
    data = read_star(d / "run_it004_data.star")["particles"]
    assert "rlnAngleRot" in data.columns and "rlnRandomSubset" not in data.columns
    smp = read_star(d / "run_it004_sampling.star")["sampling_general"]
    assert smp["rlnSymmetryGroup"] == "C1" and smp["rlnHealpixOrder"] == 0
    # initial_model.mrc: the class aligned to C2 (about z) and symmetrised: V(x, y, z) = V(−x, −y, z)
    v, apix = read_mrc(d / "initial_model.mrc")
    assert v.shape == (24, 24, 24) and apix == pytest.approx(4.0)
    c = np.arange(24)
    rot = v[:, ((24 - c) % 24)][:, :, ((24 - c) % 24)]
    assert np.abs(rot - v).max() < 0.05 * np.abs(v).max()
    sym = read_star(d / "initial_model_symmetry.star")["align_symmetry"]
    assert sym["rlnSymmetryGroup"] == "C2"
    pipe = read_pipeline(project / "default_pipeline.star")
    nodes = {k: v for k, v in pipe.nodes.items() if k.startswith("InitialModel/job002/")}
    assert nodes == {"InitialModel/job002/initial_model.mrc": NodeType.INITIAL_MODEL,
                     "InitialModel/job002/run_it004_data.star": NodeType.INITIAL_MODEL_PARTICLES,
                     "InitialModel/job002/run_it004_optimiser.star": NodeType.INITIAL_MODEL_OPTIMISER}
    assert pipe.process("InitialModel/job002/").type_label == "relion.initialmodel"


def test_continue_restores_momenta_and_equals_uninterrupted_run(project, monkeypatch):
    monkeypatch.chdir(project)
    d = project / "InitialModel" / "job002"
    mom = torch.load(d / "run_it002_momenta.pt", weights_only=True)
    assert set(mom) == {"m1", "m2", "fresh"} and mom["m1"].dtype == torch.complex128
    assert cli(["initialmodel", "--continue", "InitialModel/job002/run_it002_optimiser.star", "--o", "Cont/",
                "--j", "2", "--batch_size", "100"]) == 0
    c = project / "Cont"
    for name in ("run_it004_class001.mrc", "initial_model.mrc"):
        a, b = read_mrc(d / name)[0], read_mrc(c / name)[0]
        assert np.allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max()), name
    a, b = read_star(d / "run_it004_data.star")["particles"], read_star(c / "run_it004_data.star")["particles"]
    assert np.allclose(a["rlnAngleTilt"], b["rlnAngleTilt"], atol=1e-6)
    assert read_star(c / "initial_model_symmetry.star")["align_symmetry"]["rlnSymmetryGroup"] == "C2"
    # nothing left to do
    with pytest.raises(CryopipeError, match="nothing to do"):
        initial_model(None, project / "Cont3", continue_from=c / "run_it004_optimiser.star")


def test_grad_update_state_dict_round_trip():
    rule = GradUpdate(GradSchedule(10), kind="initial_model")
    assert rule.state_dict() == {}
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2, 1, 50, dtype=torch.complex64, generator=g)
    w = torch.rand(2, 1, 50, generator=g) + 0.5
    cur = torch.randn(1, 50, dtype=torch.complex64, generator=g)
    sh = torch.arange(50) // 10
    args = (torch.zeros(1, 5), sh, 1.0, 0, 5, torch.ones(1), 1)
    rule(data, w, cur, *args)
    other = GradUpdate(GradSchedule(10), kind="initial_model")
    other.load_state_dict(rule.state_dict())
    a = rule(data, w, cur, *args[:-1], 2)
    b = other(data, w, cur, *args[:-1], 2)
    assert torch.equal(a, b)


def test_bad_input_one_line_errors(project, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(project)
    assert cli(["initialmodel", "--i", "nope.star", "--o", str(tmp_path / "a/")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.star" in err[0]
    assert cli(["initialmodel", "--o", str(tmp_path / "b/")]) == 1
    assert "--i" in capsys.readouterr().err
    # continuing a refinement's optimiser.star with initialmodel is refused
    (tmp_path / "r_optimiser.star").write_text(
        "data_optimiser_general\n_rlnExperimentalDataStarFile Simulate/job001/particles.star\n"
        "_rlnModelStarFile Simulate/job001/particles.star\n"
        "_rlnOrientSamplingStarFile InitialModel/job002/run_it000_sampling.star\n"
        "_rlnDoGradientRefine 0\n")
    with pytest.raises(CryopipeError, match="not from a gradient-driven initial model"):
        initial_model(None, tmp_path / "c", continue_from=tmp_path / "r_optimiser.star")


def test_de_novo_model_matches_the_truth(tmp_path, monkeypatch):
    """Ground truth: from random blobs, with no reference, 25 gradient iterations on 400 simulated particles
    (3ENL, box 24, 4 Å/px, SNR 1, CTF) find the structure. After rigid alignment (either hand) the FSC against
    the truth stays above 0.5 to <= 32 Å and averages >= 0.35 over the 24–16 Å shells, where the random start (a
    smooth ball at this box size: it matches the truth's envelope to 32 Å) has no signal (< 0.2). (The
    5,000-particle SNR 0.05 benchmark is bench/bench_3d.py.)"""
    from cryopipe.core.fsc import fsc, resolution_at
    from cryopipe.core.volume_align import align_volumes

    monkeypatch.chdir(tmp_path)
    assert cli(["simulate", "--what", "particles", "--n", "400", "--box", "24", "--angpix", "4", "--snr", "1",
                "--seed", "4"]) == 0
    assert cli(["initialmodel", "--i", "Simulate/job001/particles.star", "--o", "InitialModel/job002/", "--ctf",
                "--iter", "25", "--healpix_order", "1", "--offset_range", "2", "--offset_step", "1",
                "--particle_diameter", "80", "--grad_ini_subset", "100", "--grad_fin_subset", "200",
                "--batch_size", "100", "--random_seed", "2", "--j", "2"]) == 0
    truth = torch.from_numpy(read_mrc(tmp_path / "Simulate/job001/truth_map.mrc")[0])

    def aligned_fsc(name):
        v = torch.from_numpy(read_mrc(tmp_path / "InitialModel/job002" / name)[0])
        return fsc(align_volumes(v, truth, pixel_size=4.0, resolution_A=20).aligned, truth)

    f0, f = aligned_fsc("run_it000_class001.mrc"), aligned_fsc("initial_model.mrc")
    assert float(f0[4:7].mean()) < 0.2
    assert float(f[4:7].mean()) >= 0.35
    assert float(resolution_at(f, 0.5, 4.0, 24)) <= 32.0


def test_extra_classes_and_largest_class_output(project, monkeypatch):
    """``--K 2`` (an extra class as a sink): two class maps per written iteration, class distributions that sum
    to 1, and, with ``--sym C1``, ``initial_model.mrc`` is the largest class as it is."""
    monkeypatch.chdir(project)
    assert cli(["initialmodel", "--i", "Simulate/job001/particles.star", "--o", "K2/", "--ctf", "--iter", "3",
                "--K", "2", "--grad_write_iter", "3", "--random_seed", "3", *FAST]) == 0
    d = project / "K2"
    m = read_star(d / "run_it003_model.star")["model_classes"]
    assert len(m) == 2 and m["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-6)
    assert len(read_star(d / "run_it003_model.star")["model_pdf_orient_class_2"]) == 12  # HEALPix order 0
    k = int(np.argmax(m["rlnClassDistribution"].to_numpy()))
    big = read_mrc(d / f"run_it003_class{k + 1:03d}.mrc")[0]
    assert np.allclose(read_mrc(d / "initial_model.mrc")[0], big, atol=1e-6 * np.abs(big).max())
