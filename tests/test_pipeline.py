"""Project / job-folder machinery: default_pipeline.star (RELION 5.0 layout), job.star, markers, aliases, locking."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import starfile

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.star import read_star
from cryopipe.pipeline.log import ABORT_REQUEST_FILE, JobAborted, log, progress
from cryopipe.pipeline.project import (
    EXIT_ABORTED, EXIT_FAILURE, EXIT_SUCCESS, NodeType, ProcessLabel, Project, Status, open_job_dir, output_root,
)

# Table and column names written by RELION 5.0's PipeLine::write (src/pipeliner.cpp) and RelionJob::write.
RELION5_PIPELINE_COLUMNS = {
    "pipeline_processes": ["rlnPipeLineProcessName", "rlnPipeLineProcessAlias", "rlnPipeLineProcessTypeLabel",
                           "rlnPipeLineProcessStatusLabel"],
    "pipeline_nodes": ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel", "rlnPipeLineNodeTypeLabelDepth"],
    "pipeline_input_edges": ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"],
    "pipeline_output_edges": ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"],
}


@pytest.fixture
def proj(tmp_path, monkeypatch) -> Project:
    monkeypatch.chdir(tmp_path)
    return Project(tmp_path)


def _touch_star(path: Path) -> None:
    path.write_text("data_\nloop_\n_rlnCoordinateX #1\n1.0\n")


def _two_jobs(proj: Project) -> None:
    _touch_star(proj.root / "input_particles.star")
    with proj.new_job("Import", ProcessLabel.IMPORT_OTHER, params={"fn_in_other": "input_particles.star",
                                                                   "do_other": True, "fn_mtf": None},
                      command="cryopipe import --i input_particles.star") as j1:
        _touch_star(j1.path("particles.star"))
        j1.add_output("particles.star", NodeType.PARTICLES)
    with proj.new_job("Class2D", ProcessLabel.CLASS2D, inputs=[("Import/job001/particles.star", NodeType.PARTICLES)],
                      params={"fn_img": "Import/job001/particles.star", "nr_classes": 4, "tau_fudge": 2.0},
                      command="cryopipe class2d --i Import/job001/particles.star --K 4") as j2:
        _touch_star(j2.path("run_it005_data.star"))
        _touch_star(j2.path("run_it005_optimiser.star"))
        j2.add_output(j2.path("run_it005_data.star"), NodeType.CLASS2D_PARTICLES)
        j2.add_output("Class2D/job002/run_it005_optimiser.star", NodeType.CLASS2D_OPTIMISER)


def test_two_jobs_pipeline_graph(proj):
    _two_jobs(proj)
    path = proj.root / "default_pipeline.star"
    text = path.read_text()
    blocks = read_star(path)
    assert list(blocks) == ["pipeline_general", *RELION5_PIPELINE_COLUMNS]
    assert text.count("# version 50001") == 5
    assert blocks["pipeline_general"] == {"rlnPipeLineJobCounter": 3}
    for name, cols in RELION5_PIPELINE_COLUMNS.items():
        assert list(blocks[name].columns) == cols, name
    procs = blocks["pipeline_processes"]
    assert procs.values.tolist() == [
        ["Import/job001/", "None", "relion.import.other", "Succeeded"],
        ["Class2D/job002/", "None", "relion.class2d", "Succeeded"],
    ]
    nodes = dict(zip(blocks["pipeline_nodes"]["rlnPipeLineNodeName"], blocks["pipeline_nodes"]["rlnPipeLineNodeTypeLabel"]))
    assert nodes == {
        "Import/job001/particles.star": "ParticleGroupMetadata.star.relion",
        "Class2D/job002/run_it005_data.star": "ParticleGroupMetadata.star.relion.class2d",
        "Class2D/job002/run_it005_optimiser.star": "OptimiserData.star.relion.class2d",
    }
    assert blocks["pipeline_nodes"]["rlnPipeLineNodeTypeLabelDepth"].tolist() == [1, 1, 1]
    assert blocks["pipeline_input_edges"].values.tolist() == [["Import/job001/particles.star", "Class2D/job002/"]]
    assert blocks["pipeline_output_edges"].values.tolist() == [
        ["Import/job001/", "Import/job001/particles.star"],
        ["Class2D/job002/", "Class2D/job002/run_it005_data.star"],
        ["Class2D/job002/", "Class2D/job002/run_it005_optimiser.star"],
    ]
    # an independent STAR parser reads the same graph
    sf = starfile.read(path, always_dict=True)
    assert sf["pipeline_processes"]["rlnPipeLineProcessName"].tolist() == ["Import/job001/", "Class2D/job002/"]
    assert len(sf["pipeline_output_edges"]) == 3

    # job folder contents
    d2 = proj.root / "Class2D" / "job002"
    for f in ("job.star", "note.txt", "run.out", "run.err", "job_pipeline.star", EXIT_SUCCESS):
        assert (d2 / f).is_file(), f
    assert not (d2 / EXIT_FAILURE).exists()
    job = read_star(d2 / "job.star")
    assert job["job"] == {"rlnJobTypeLabel": "relion.class2d", "rlnJobIsContinue": 0, "rlnJobIsTomo": 0}
    assert job["joboptions_values"].values.tolist() == [
        ["fn_img", "Import/job001/particles.star"], ["nr_classes", "4"], ["tau_fudge", "2.0"]]
    job1 = read_star(proj.root / "Import/job001/job.star")
    opts = dict(job1["joboptions_values"].values.tolist())
    assert opts == {"do_other": "Yes", "fn_in_other": "input_particles.star", "fn_mtf": ""}
    assert "cryopipe class2d --i Import/job001/particles.star --K 4" in (d2 / "note.txt").read_text()
    mini = read_star(d2 / "job_pipeline.star")
    assert mini["pipeline_general"] == {"rlnPipeLineJobCounter": 2}
    assert mini["pipeline_processes"].values.tolist() == [["Class2D/job002/", "None", "relion.class2d", "Succeeded"]]
    assert mini["pipeline_input_edges"].values.tolist() == [["Import/job001/particles.star", "Class2D/job002/"]]
    assert len(mini["pipeline_output_edges"]) == 2
    # RELION's GUI file-browser markers
    assert (proj.root / ".Nodes/ParticleGroupMetadata/Import/job001/particles.star").is_file()
    assert (proj.root / ".Nodes/OptimiserData/Class2D/job002/run_it005_optimiser.star").is_file()
    assert not (proj.root / ".relion_lock").exists()


def test_reread_and_counter_increments(proj):
    _two_jobs(proj)
    again = Project(proj.root)  # reopening reads, does not reset
    assert again.read().job_counter == 3
    (proj.root / "MaskCreate" / "job003").mkdir(parents=True)  # a stray folder: its number is skipped
    with again.new_job("MaskCreate", ProcessLabel.MASKCREATE) as j:
        pass
    assert j.name == "MaskCreate/job004/"
    assert again.read().job_counter == 5
    assert again.status("MaskCreate/job004/") == Status.SUCCEEDED


def test_failure_marks_failed_and_registers_no_output(proj):
    with pytest.raises(RuntimeError, match="boom"):
        with proj.new_job("Refine3D", ProcessLabel.REFINE3D) as job:
            _touch_star(job.path("run_data.star"))
            job.add_output("run_data.star", NodeType.REFINE3D_PARTICLES)
            print("half-way there")
            raise RuntimeError("boom")
    d = proj.root / "Refine3D/job001"
    assert (d / EXIT_FAILURE).is_file() and not (d / EXIT_SUCCESS).exists()
    p = proj.read()
    assert p.process("Refine3D/job001/").status == Status.FAILED
    assert p.nodes == {} and p.output_edges == []
    assert "half-way there" in (d / "run.out").read_text()
    err = (d / "run.err").read_text()
    assert "RuntimeError: boom" in err and "Traceback" in err
    assert read_star(d / "job_pipeline.star")["pipeline_processes"]["rlnPipeLineProcessStatusLabel"].tolist() == \
        ["Failed"]


def test_declared_output_missing_is_a_failure(proj):
    with pytest.raises(CryopipeError, match="not written"):
        with proj.new_job("PostProcess", ProcessLabel.POSTPROCESS) as job:
            job.add_output("postprocess.mrc", NodeType.POSTPROCESS_MAP)
    assert (proj.root / "PostProcess/job001" / EXIT_FAILURE).is_file()
    assert proj.status("PostProcess/job001/") == Status.FAILED
    assert proj.read().nodes == {}


def test_output_outside_job_folder_refused(proj):
    with pytest.raises(CryopipeError, match="inside the job folder"):
        with proj.new_job("Extract", ProcessLabel.EXTRACT) as job:
            job.add_output(proj.root / "elsewhere.star", NodeType.PARTICLES)
    # a CryopipeError in a new job takes its folder and pipeline entry away (the error says why)
    assert proj.status("Extract/job001/") is None and not (proj.root / "Extract/job001").exists()


def test_interrupt_and_relion_abort_request(proj):
    with pytest.raises(KeyboardInterrupt):
        with proj.new_job("Class3D", ProcessLabel.CLASS3D):
            raise KeyboardInterrupt
    assert (proj.root / "Class3D/job001" / EXIT_ABORTED).is_file()
    assert proj.status("Class3D/job001/") == Status.ABORTED

    with pytest.raises(JobAborted):
        with proj.new_job("Class3D", ProcessLabel.CLASS3D) as job:
            (job.dir / ABORT_REQUEST_FILE).touch()  # what RELION's GUI "Abort" button does
            for _ in progress(range(10), desc="iterations", bar=False):
                pass
    d = proj.root / "Class3D/job002"
    assert (d / EXIT_ABORTED).is_file() and not (d / EXIT_FAILURE).exists()
    assert proj.status("Class3D/job002/") == Status.ABORTED


def test_alias_symlink_and_alias_inputs(proj):
    with proj.new_job("InitialModel", ProcessLabel.INITIAL_MODEL, alias="first_try") as j1:
        (j1.path("initial_model.mrc")).write_bytes(b"\0" * 16)
        j1.add_output("initial_model.mrc", NodeType.INITIAL_MODEL)
    link = proj.root / "InitialModel" / "first_try"
    assert link.is_symlink() and link.resolve() == (proj.root / "InitialModel/job001").resolve()
    assert os.readlink(link) == "../InitialModel/job001/"
    assert (link / "initial_model.mrc").is_file()
    p = proj.read()
    assert p.process("InitialModel/job001/").alias == "InitialModel/first_try/"
    assert (proj.root / ".Nodes/DensityMap/InitialModel/first_try/initial_model.mrc").is_file()
    # an input named through the alias is stored under the job's real name
    with proj.new_job("Refine3D", ProcessLabel.REFINE3D,
                      inputs=[("InitialModel/first_try/initial_model.mrc", NodeType.DENSITY_MAP)]):
        pass
    assert proj.read().input_edges == [("InitialModel/job001/initial_model.mrc", "Refine3D/job002/")]
    with pytest.raises(CryopipeError, match="already used"):
        with proj.new_job("InitialModel", ProcessLabel.INITIAL_MODEL, alias="first_try"):
            pass
    with pytest.raises(CryopipeError, match="not allowed"):
        with proj.new_job("InitialModel", ProcessLabel.INITIAL_MODEL, alias="job2"):
            pass
    assert proj.read().job_counter == 3  # refused jobs take no number


def test_continue_keeps_outputs(proj):
    with proj.new_job("Class2D", ProcessLabel.CLASS2D, params={"nr_iter": 5}, command="first") as job:
        _touch_star(job.path("run_it005_data.star"))
        job.add_output("run_it005_data.star", NodeType.CLASS2D_PARTICLES)
        log("first run")
    with proj.continue_job("Class2D/job001/", command="second") as job:
        assert job.is_continue
        assert (job.dir / "run_it005_data.star").is_file()
        _touch_star(job.path("run_it010_data.star"))
        job.add_output("run_it010_data.star", NodeType.CLASS2D_PARTICLES)
        log("second run")
    d = proj.root / "Class2D/job001"
    head = read_star(d / "job.star")
    assert head["job"]["rlnJobIsContinue"] == 1
    assert dict(head["joboptions_values"].values.tolist()) == {"nr_iter": "5"}
    note = (d / "note.txt").read_text()
    assert "Executing new job" in note and "Continuing job" in note and "second" in note
    out = (d / "run.out").read_text()
    assert out.index("first run") < out.index("second run")
    p = proj.read()
    assert p.job_counter == 2 and len(p.processes) == 1
    assert p.outputs_of("Class2D/job001/") == ["Class2D/job001/run_it005_data.star",
                                               "Class2D/job001/run_it010_data.star"]
    assert (d / EXIT_SUCCESS).is_file()


def test_open_job_dir_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 1. no --o: new job in the project in the current directory (created)
    with open_job_dir(None, "Reconstruct", ProcessLabel.RECONSTRUCT, params={"o": None}) as job:
        assert job.name == "Reconstruct/job001/"
    assert (tmp_path / "default_pipeline.star").is_file()
    # 2. --o Type/jobNNN/ in the project: that job, counter moves past it
    with open_job_dir("Reconstruct/job010/", "Reconstruct", ProcessLabel.RECONSTRUCT) as job:
        (job.path("merged.mrc")).write_bytes(b"\0")
        job.add_output("merged.mrc", NodeType.DENSITY_MAP)
    p = Project(tmp_path).read()
    assert [q.name for q in p.processes] == ["Reconstruct/job001/", "Reconstruct/job010/"]
    assert p.job_counter == 11
    with pytest.raises(CryopipeError, match="already exists"):
        open_job_dir("Reconstruct/job010", "Reconstruct", ProcessLabel.RECONSTRUCT).__enter__()
    with open_job_dir("Reconstruct/job010", "Reconstruct", ProcessLabel.RECONSTRUCT, continue_job=True) as job:
        assert job.is_continue
    with pytest.raises(CryopipeError, match="cannot continue"):
        open_job_dir("Reconstruct/job012/", "Reconstruct", ProcessLabel.RECONSTRUCT, continue_job=True)
    # ... also in another project directory named in --o
    other = tmp_path / "other"
    Project(other)
    with open_job_dir("other/Refine3D/job004/", "Refine3D", ProcessLabel.REFINE3D) as job:
        assert job.dir == other / "Refine3D/job004"
    assert Project(other).read().process("Refine3D/job004/").status == Status.SUCCEEDED
    # 3. any other --o: a plain output directory, no pipeline anywhere
    with open_job_dir("results/run1/", "Reconstruct", ProcessLabel.RECONSTRUCT, params={"angpix": 3.0}) as job:
        log("standalone")
        assert job.project is None
    out = tmp_path / "results/run1"
    assert not (out / "default_pipeline.star").exists() and not (tmp_path / "results/default_pipeline.star").exists()
    for f in ("job.star", "note.txt", "run.out", "run.err", EXIT_SUCCESS):
        assert (out / f).is_file(), f
    assert "standalone" in (out / "run.out").read_text()
    # a job-looking --o outside any project (no default_pipeline.star two levels up, not the cwd) is standalone too
    with open_job_dir("elsewhere/Class2D/job001/", "Class2D", ProcessLabel.CLASS2D) as job:
        assert job.project is None
    assert not (tmp_path / "elsewhere/default_pipeline.star").exists()
    assert len(Project(tmp_path).read().processes) == 2
    # the directory STAR-file names are relative to, by the same rule
    assert output_root(None) == tmp_path
    assert output_root("other/Refine3D/job005/") == other
    assert output_root("Class2D/job003") == tmp_path
    assert output_root("results/run2/") == tmp_path
    assert output_root("elsewhere/Class2D/job001/") == tmp_path


def test_log_tee_and_progress_lines(proj, capsys):
    with proj.new_job("Extract", ProcessLabel.EXTRACT) as job:
        print("plain print")
        print("to stderr", file=sys.stderr)
        for _ in progress(range(1000), desc="extracting", bar=True):
            pass
        for _ in progress(range(3), desc="iteration", bar=False):
            pass
    out = (job.dir / "run.out").read_text()
    err = (job.dir / "run.err").read_text()
    assert "plain print" in out and "to stderr" in err and "to stderr" not in out
    lines = out.splitlines()
    ext = [ln for ln in lines if "extracting:" in ln]
    assert len(ext) == 10 and ext[-1].endswith("ETA 0:00") and "1000/1000 (100%)" in ext[-1]
    assert sum("iteration:" in ln for ln in lines) == 3  # short loops: one line per iteration
    assert lines[0].startswith("[") and "Extract/job001/ started" in lines[0]
    captured = capsys.readouterr()
    assert "plain print" in captured.out
    assert "extracting: 100/1000" not in captured.out  # with a bar, the progress lines stay out of the terminal
    assert "iteration: 3/3" in captured.out


def test_concurrent_new_job_distinct_numbers(tmp_path):
    Project(tmp_path)
    script = textwrap.dedent(f"""
        import sys, time
        from cryopipe.pipeline.project import Project, ProcessLabel
        proj = Project({str(tmp_path)!r})
        time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
        for i in range(4):
            with proj.new_job("Class2D", ProcessLabel.CLASS2D) as job:
                print("JOB", job.name)
    """)
    import time
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", script, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    names = []
    for pr in procs:
        out, err = pr.communicate(timeout=60)
        assert pr.returncode == 0, err
        names += [ln.split()[1] for ln in out.splitlines() if ln.startswith("JOB")]
    assert sorted(names) == [f"Class2D/job{n:03d}/" for n in range(1, 9)]
    p = Project(tmp_path).read()
    assert p.job_counter == 9
    assert sorted(q.name for q in p.processes) == sorted(names)
    assert all(q.status == Status.SUCCEEDED for q in p.processes)


def test_relion3_pipeline_is_refused(tmp_path):
    (tmp_path / "default_pipeline.star").write_text(
        "data_pipeline_general\n_rlnPipeLineJobCounter 2\n\ndata_pipeline_processes\nloop_\n"
        "_rlnPipeLineProcessName #1\n_rlnPipeLineProcessAlias #2\n_rlnPipeLineProcessType #3\n"
        "_rlnPipeLineProcessStatus #4\nImport/job001/ None 0 2\n")
    with pytest.raises(InputFileError, match="RELION 3 pipeline"):
        Project(tmp_path).read()


def test_relion4_project_is_extended(tmp_path):
    """A pipeline as RELION 5 writes it (with an alias and a RELION-only job) is read and kept intact."""
    (tmp_path / "default_pipeline.star").write_text(textwrap.dedent("""
        # version 50001

        data_pipeline_general

        _rlnPipeLineJobCounter                       3

        # version 50001

        data_pipeline_processes

        loop_
        _rlnPipeLineProcessName #1
        _rlnPipeLineProcessAlias #2
        _rlnPipeLineProcessTypeLabel #3
        _rlnPipeLineProcessStatusLabel #4
        Import/job001/ Import/movies/ relion.import.movies  Succeeded
        MotionCorr/job002/       None relion.motioncorr.own  Succeeded

        # version 50001

        data_pipeline_nodes

        loop_
        _rlnPipeLineNodeName #1
        _rlnPipeLineNodeTypeLabel #2
        _rlnPipeLineNodeTypeLabelDepth #3
        Import/job001/movies.star MicrographMovieGroupMetadata.star.relion            1
        MotionCorr/job002/corrected_micrographs.star MicrographGroupMetadata.star.relion.motioncorr            1

        # version 50001

        data_pipeline_input_edges

        loop_
        _rlnPipeLineEdgeFromNode #1
        _rlnPipeLineEdgeProcess #2
        Import/job001/movies.star MotionCorr/job002/

        # version 50001

        data_pipeline_output_edges

        loop_
        _rlnPipeLineEdgeProcess #1
        _rlnPipeLineEdgeToNode #2
        Import/job001/ Import/job001/movies.star
        MotionCorr/job002/ MotionCorr/job002/corrected_micrographs.star
        """))
    proj = Project(tmp_path)
    before = proj.read()
    (tmp_path / "MotionCorr" / "job002").mkdir(parents=True)
    _touch_star(tmp_path / "MotionCorr" / "job002" / "corrected_micrographs.star")
    with proj.new_job("CtfFind", ProcessLabel.CTFFIND,
                      inputs=[("MotionCorr/job002/corrected_micrographs.star", NodeType.MICROGRAPHS)]) as job:
        pass
    after = proj.read()
    assert job.name == "CtfFind/job003/"
    assert after.processes[:2] == before.processes
    assert after.process("Import/job001/").alias == "Import/movies/"
    assert dict(list(after.nodes.items())[:2]) == before.nodes  # existing node types kept
    assert after.input_edges == before.input_edges + [("MotionCorr/job002/corrected_micrographs.star",
                                                        "CtfFind/job003/")]
    assert after.output_edges == before.output_edges
    assert after.job_counter == 4


def test_failure_while_setting_up_is_not_left_running(proj, monkeypatch):
    import cryopipe.pipeline.project as project_mod

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(project_mod, "write_job_star", broken)
    with pytest.raises(OSError, match="disk full"):
        with proj.new_job("Select", ProcessLabel.SELECT_CLASS2D_AUTO):
            pass
    assert proj.status("Select/job001/") == Status.FAILED
    assert (proj.root / "Select/job001" / EXIT_FAILURE).is_file()


def test_missing_input_makes_no_folder_and_no_pipeline_entry(proj):
    with pytest.raises(CryopipeError, match=r"Import/job001/particles.star: input file not found"):
        with proj.new_job("Class2D", ProcessLabel.CLASS2D, inputs=[("Import/job001/particles.star",
                                                                    NodeType.PARTICLES)]):
            pass
    assert not (proj.root / "Class2D").exists()
    assert not (proj.root / "default_pipeline.star").exists() or not proj.read().processes


def test_job_folder_lock(tmp_path, monkeypatch):
    """A second run into a folder where a live process runs a job is refused without touching it; a lock left by a
    process that is gone is taken over; the lock is gone after the job."""
    import socket

    from cryopipe.pipeline.project import JOB_LOCK

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run1"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / JOB_LOCK).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(CryopipeError, match=rf"another cryopipe job \(process {sleeper.pid}"):
            with open_job_dir("run1", "Class2D", ProcessLabel.CLASS2D):
                pass
        assert sorted(p.name for p in out.iterdir()) == [JOB_LOCK]  # no marker, no note, nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    with open_job_dir("run1", "Class2D", ProcessLabel.CLASS2D) as job:  # the holder is gone: taken over
        assert (job.dir / JOB_LOCK).read_text().split()[0] == str(os.getpid())
    assert not (out / JOB_LOCK).exists() and (out / EXIT_SUCCESS).exists()
