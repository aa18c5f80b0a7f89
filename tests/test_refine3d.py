"""``cryopipe refine3d``: RELION-named files with RELION's tables and labels, pipeline nodes, refinement from a
low-passed truth improving the FSC against the truth, ``--continue`` reproducing the uninterrupted run, the
optimisation-set round trip, half-sets / start angles from the input, and one-line errors for bad input.

Data: 200 simulated particles (3enl, box 24, 4 Å/px, SNR 1), a few cheap iterations (HEALPix order 1, no
oversampling); ground-truth quality is the benchmarks' business."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.cli import main as cli
from cryopipe.core.fsc import fsc
from cryopipe.engine.optimiser3d import Refine3DSettings
from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.mrc import read_mrc, write_mrc
from cryopipe.io.particles import read_particles, write_particles
from cryopipe.io.star import read_star
from cryopipe.io.tomo_particles import optimisation_set_entries, write_optimisation_set
from cryopipe.jobs.refine3d import refine_3d
from cryopipe.pipeline.project import NodeType, read_pipeline

torch.set_num_threads(2)

FAST = ["--healpix_order", "1", "--oversampling", "0", "--offset_range", "2", "--offset_step", "1",
        "--particle_diameter", "70", "--batch_size", "100", "--j", "2"]


def _settings(**kw) -> Refine3DSettings:
    base = dict(n_iter=2, healpix_order=1, oversampling=0, offset_range=2.0, offset_step=1.0,
                particle_diameter=70.0, batch_size=100, ini_high=25.0, sigma_noise_particles=200,
                n_accuracy_particles=20)
    base.update(kw)
    return Refine3DSettings(**base)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with simulated particles (Simulate/job001/) and a first refinement (Refine3D/job002/)."""
    import os

    root = tmp_path_factory.mktemp("refine3d")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli(["simulate", "--what", "particles", "--n", "200", "--box", "24", "--angpix", "4", "--snr", "1",
                    "--seed", "3"]) == 0
        assert cli(["refine3d", "--i", "Simulate/job001/particles.star", "--ref", "Simulate/job001/truth_map.mrc",
                    "--ini_high", "25", "--firstiter_cc", "--ctf", "--iter", "3", "--zero_mask",
                    "--flatten_solvent", "--norm", "--scale", "--random_seed", "5", *FAST]) == 0
    finally:
        os.chdir(cwd)
    return root


def test_files_tables_and_pipeline_nodes(project, monkeypatch):
    monkeypatch.chdir(project)
    d = project / "Refine3D" / "job002"
    for it in range(3):  # iterations 0..2, the 3rd is the final (joined) one
        for name in ("data.star", "optimiser.star", "sampling.star", "half1_model.star", "half2_model.star",
                     "half1_class001.mrc", "half2_class001.mrc"):
            assert (d / f"run_it{it:03d}_{name}").is_file(), (it, name)
    for name in ("run_model.star", "run_half1_model.star", "run_half2_model.star", "run_data.star",
                 "run_optimiser.star", "run_sampling.star", "run_class001.mrc", "run_half1_class001_unfil.mrc",
                 "run_half2_class001_unfil.mrc", "run_resolution.png", "run_fsc.png", "run_angdist.png",
                 "run_plots.pdf"):
        assert (d / name).is_file(), name
    m = read_star(d / "run_it002_half1_model.star")
    g = m["model_general"]
    assert g["rlnReferenceDimensionality"] == 3 and g["rlnDataDimensionality"] == 2 and g["rlnNrClasses"] == 1
    assert g["rlnOriginalImageSize"] == 24 and g["rlnPixelSize"] == pytest.approx(4.0)
    assert list(m["model_classes"].columns) == ["rlnReferenceImage", "rlnClassDistribution", "rlnAccuracyRotations",
                                                "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution",
                                                "rlnOverallFourierCompleteness"]
    assert m["model_classes"]["rlnReferenceImage"][0] == "Refine3D/job002/run_it002_half1_class001.mrc"
    c1 = m["model_class_1"]
    for lab in ("rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnSsnrMap", "rlnGoldStandardFsc",
                "rlnFourierCompleteness", "rlnReferenceSigma2", "rlnReferenceTau2"):
        assert lab in c1.columns, lab
    assert len(c1) == 13 and c1["rlnGoldStandardFsc"][1] > 0.5
    assert "model_groups" in m and "rlnSigma2Noise" in m["model_optics_group_1"].columns
    joined = read_star(d / "run_model.star")["model_classes"]
    assert joined["rlnReferenceImage"][0] == "Refine3D/job002/run_class001.mrc"
    data = read_star(d / "run_data.star")
    cols = data["particles"].columns
    for lab in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
                "rlnRandomSubset", "rlnNormCorrection", "rlnLogLikeliContribution", "rlnMaxValueProbDistribution",
                "rlnNrOfSignificantSamples", "rlnGroupNumber", "rlnImageName", "rlnDefocusU"):
        assert lab in cols, lab
    assert sorted(set(data["particles"]["rlnRandomSubset"])) == [1, 2] and "optics" in data
    o = read_star(d / "run_it001_optimiser.star")["optimiser_general"]
    assert o["rlnDoAutoRefine"] == 1 and o["rlnDoSplitRandomHalves"] == 1 and o["rlnCurrentIteration"] == 1
    assert o["rlnModelStarFile"] == "Refine3D/job002/run_it001_half1_model.star"
    assert o["rlnModelStarFile2"] == "Refine3D/job002/run_it001_half2_model.star"
    assert o["rlnJoinHalvesUntilThisResolution"] == pytest.approx(40.0)
    for lab in ("rlnNumberOfIterWithoutResolutionGain", "rlnBestResolutionThusFar", "rlnHasConverged",
                "rlnHasHighFscAtResolLimit", "rlnSmallestChangesOrientations", "rlnOverallAccuracyRotations",
                "rlnAutoLocalSearchesHealpixOrder", "rlnDoCorrectNorm", "rlnDoCorrectScale"):
        assert lab in o, lab
    assert read_star(d / "run_optimiser.star")["optimiser_general"]["cryopipeFinalIterationDone"] == 1
    smp = read_star(d / "run_it001_sampling.star")["sampling_general"]
    assert smp["rlnIs3DSampling"] == 1 and smp["rlnHealpixOrder"] == 1 and smp["rlnPsiStep"] == pytest.approx(30)
    assert smp["rlnOffsetRange"] == pytest.approx(8.0) and smp["rlnSymmetryGroup"] == "C1"
    # the sampled directions and, per class, the particles' distribution over them (RELION's pdf_orient)
    sdir = read_star(d / "run_it001_sampling.star")["sampling_directions"]
    assert list(sdir.columns) == ["rlnAngleRot", "rlnAngleTilt"] and len(sdir) == 48  # HEALPix order 1, C1
    for model, sampling in (("run_it001_half1_model.star", "run_it001_sampling.star"),
                            ("run_model.star", "run_sampling.star")):
        po = read_star(d / model)["model_pdf_orient_class_1"]["rlnOrientationDistribution"].to_numpy(float)
        order = int(read_star(d / sampling)["sampling_general"]["rlnHealpixOrder"])
        assert po.size == 12 * 4 ** order == len(read_star(d / sampling)["sampling_directions"])
        assert po.min() >= 0 and po.sum() == pytest.approx(1.0) and (po > 0).sum() > 10  # spread over views
    # pipeline: RELION 5 Refine3D output nodes
    pipe = read_pipeline(project / "default_pipeline.star")
    nodes = {k: v for k, v in pipe.nodes.items() if k.startswith("Refine3D/job002/")}
    assert nodes == {"Refine3D/job002/run_data.star": NodeType.REFINE3D_PARTICLES,
                     "Refine3D/job002/run_optimiser.star": NodeType.REFINE3D_OPTIMISER,
                     "Refine3D/job002/run_half1_class001_unfil.mrc": NodeType.REFINE3D_HALFMAP,
                     "Refine3D/job002/run_class001.mrc": NodeType.REFINE3D_MAP}
    assert pipe.process("Refine3D/job002/").type_label == "relion.refine3d"
    assert ("Simulate/job001/particles.star", "Refine3D/job002/") in pipe.input_edges


def test_refinement_improves_fsc_to_truth(project):
    d = project / "Refine3D" / "job002"
    truth = torch.from_numpy(read_mrc(project / "Simulate/job001/truth_map.mrc")[0].copy())
    start = torch.from_numpy(read_mrc(d / "run_it000_half1_class001.mrc")[0].copy())  # truth low-passed to 25 Å
    final = torch.from_numpy(read_mrc(d / "run_class001.mrc")[0].copy())
    f0, f1 = fsc(start, truth), fsc(final, truth)
    beyond = slice(5, 10)  # 19–10 Å, beyond the 25 Å low-pass (shell 3.8)
    assert float(f0[beyond].mean()) < 0.3
    assert float(f1[beyond].mean()) > float(f0[beyond].mean()) + 0.2
    assert float(f1[1:4].min()) > 0.9


def test_continue_equals_uninterrupted_run(project, monkeypatch):
    monkeypatch.chdir(project)
    d = project / "Refine3D" / "job002"
    assert cli(["refine3d", "--continue", "Refine3D/job002/run_it001_optimiser.star", "--o", "Cont/", "--j", "2",
                "--batch_size", "100"]) == 0
    c = project / "Cont"
    assert not (c / "run_it001_data.star").exists()
    for name in ("run_it002_half1_class001.mrc", "run_it002_half2_class001.mrc", "run_class001.mrc",
                 "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc"):
        a, b = read_mrc(d / name)[0], read_mrc(c / name)[0]
        assert np.allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max()), name
    a, b = read_star(d / "run_data.star")["particles"], read_star(c / "run_data.star")["particles"]
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.allclose(a[col], b[col], atol=1e-6), col
    oa = read_star(d / "run_it002_optimiser.star")["optimiser_general"]
    ob = read_star(c / "run_it002_optimiser.star")["optimiser_general"]
    for k, v in oa.items():
        if not isinstance(v, str):
            assert ob[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # a finished run cannot be continued
    with pytest.raises(CryopipeError, match="already finished"):
        refine_3d(None, project / "Cont2", continue_from=d / "run_optimiser.star")


def test_optimisation_set_round_trip(project, monkeypatch):
    monkeypatch.chdir(project)
    sim = "Simulate/job001/"
    write_optimisation_set("in_optimisation_set.star", {
        "rlnTomoParticlesFile": sim + "particles.star", "rlnTomoTomogramsFile": "Tomograms/job001/tomograms.star",
        "rlnTomoReferenceMap1File": sim + "truth_map.mrc", "rlnTomoReferenceMap2File": sim + "truth_map.mrc"})
    res = refine_3d("in_optimisation_set.star", project / "OS" / "run", _settings(n_iter=1))
    assert res.converged and res.optimisation_set == project / "OS" / "run_optimisation_set.star"
    out = optimisation_set_entries(res.optimisation_set)
    assert out["rlnTomoParticlesFile"] == "OS/run_data.star"
    assert out["rlnTomoReferenceMap1File"] == "OS/run_half1_class001_unfil.mrc"
    assert out["rlnTomoReferenceMap2File"] == "OS/run_half2_class001_unfil.mrc"
    assert out["rlnTomoTomogramsFile"] == "Tomograms/job001/tomograms.star"
    b = read_star(res.optimisation_set)
    assert list(b) == [""]  # one unnamed key-value block, as RELION writes
    assert len(read_particles(out["rlnTomoParticlesFile"]).particles) == 200


def test_half_sets_angles_and_origins_from_input(project, monkeypatch):
    monkeypatch.chdir(project)
    data = read_particles("Simulate/job001/particles.star")
    t = data.particles
    n = len(t)
    g = np.random.default_rng(0)
    t["rlnRandomSubset"] = np.where(np.arange(n) < 60, 1, 2)
    t["rlnAngleRot"] = g.uniform(-180, 180, n)
    t["rlnAngleTilt"] = g.uniform(0, 180, n)
    t["rlnAnglePsi"] = g.uniform(-180, 180, n)
    t["rlnOriginXAngst"] = g.uniform(-4, 4, n)
    t["rlnOriginYAngst"] = g.uniform(-4, 4, n)
    write_particles("given.star", data)
    res = refine_3d("given.star", project / "Given" / "run", _settings(n_iter=1),
                    reference="Simulate/job001/truth_map.mrc")
    it0 = read_star(project / "Given" / "run_it000_data.star")["particles"]
    assert np.array_equal(it0["rlnRandomSubset"].to_numpy(), t["rlnRandomSubset"].to_numpy())
    for col in ("rlnAngleTilt", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.allclose(it0[col], t[col], atol=1e-6), col
    assert np.array_equal(res.optimiser.state.subset, t["rlnRandomSubset"].to_numpy())


def test_bad_input_one_line_errors(project, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(project)
    sim = "Simulate/job001/"
    # missing --ref: one line naming the option
    assert cli(["refine3d", "--i", sim + "particles.star", "--o", str(tmp_path / "a/")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ref" in err[0]
    # reference box differs from the particle box: names the file
    write_mrc(tmp_path / "small.mrc", np.zeros((16, 16, 16), np.float32), 4.0)
    with pytest.raises(InputFileError, match="small.mrc.*box 16 differs from the particle box 24"):
        refine_3d(sim + "particles.star", tmp_path / "b", _settings(), reference=tmp_path / "small.mrc")
    # solvent mask outside [0, 1]
    write_mrc(tmp_path / "mask.mrc", np.full((24, 24, 24), 3.0, np.float32), 4.0)
    with pytest.raises(InputFileError, match="mask.mrc.*not \\[0, 1\\]"):
        refine_3d(sim + "particles.star", tmp_path / "c", _settings(), reference=sim + "truth_map.mrc",
                  solvent_mask=tmp_path / "mask.mrc")
    # --continue from a 2D-classification-style optimiser (no auto-refine)
    (tmp_path / "x_optimiser.star").write_text(
        "data_optimiser_general\n_rlnExperimentalDataStarFile " + sim + "particles.star\n_rlnModelStarFile m.star\n"
        "_rlnOrientSamplingStarFile s.star\n")
    with pytest.raises(InputFileError, match="m.star.*not found"):
        refine_3d(None, tmp_path / "d", continue_from=tmp_path / "x_optimiser.star")


def test_solvent_corrected_fsc(project, monkeypatch, capsys):
    """``--solvent_correct_fsc`` with a solvent mask around the particle: the half-map FSC that sets resolution
    and regularisation is the masked, phase-randomisation-corrected one, which sees less noise than the unmasked
    FSC of the same run (higher over the mid shells); without a mask the option is a one-line error."""
    monkeypatch.chdir(project)
    assert cli(["mask-create", "--i", "Simulate/job001/truth_map.mrc", "--o", "MaskSC/", "--lowpass", "15",
                "--ini_threshold", "0.02", "--extend_inimask", "2", "--width_soft_edge", "3"]) == 0
    common = ["--i", "Simulate/job001/particles.star", "--ref", "Simulate/job001/truth_map.mrc", "--ini_high", "25",
              "--ctf", "--iter", "2", "--zero_mask", "--flatten_solvent", "--random_seed", "5", *FAST]
    assert cli(["refine3d", *common, "--o", "RefSC0/"]) == 0
    assert cli(["refine3d", *common, "--o", "RefSC1/", "--solvent_mask", "MaskSC/mask.mrc",
                "--solvent_correct_fsc"]) == 0
    f0 = read_star(project / "RefSC0/run_it001_half1_model.star")["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    f1 = read_star(project / "RefSC1/run_it001_half1_model.star")["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    assert f1[4:10].mean() > f0[4:10].mean() + 0.02
    assert read_star(project / "RefSC1/run_it001_optimiser.star")["optimiser_general"]["rlnDoSolventFscCorrection"] == 1
    capsys.readouterr()
    assert cli(["refine3d", *common, "--o", "RefSC2/", "--solvent_correct_fsc"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--solvent_mask" in err[0]
