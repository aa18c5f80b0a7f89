"""``cryopipe view``: the read-only project viewer.

(a) every page and JSON / image endpoint of a small project made by real cryopipe jobs answers, and the viewer
    never writes into the project;
(b) a project made by RELION (the shared RELION fixtures arranged as job folders under a ``default_pipeline.star``
    written here) loads, with RELION's own numbers;
(c) in a real headless Chromium (skipped, with the reason, when Chromium / ChromeDriver / Selenium are missing):
    every page loads without a JavaScript error, the figure-of-merit slider changes the number of picks shown,
    the isosurface viewer draws (its screenshot is not blank), and a running job's log updates without reload.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cryopipe.cli import main as cli_main
from cryopipe.io.star import read_star
from cryopipe.viewer.browser import find_chromium
from cryopipe.viewer.files import read_star_blocks
from cryopipe.viewer.project import layout_graph, read_log_tail
from cryopipe.viewer.server import serve_in_thread

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- helpers

def _get(base: str, path: str, host: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(base.rstrip("/") + path)
    if host is not None:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _json(base: str, path: str) -> dict:
    status, ctype, body = _get(base, path)
    assert status == 200, (path, status, body[:300])
    assert ctype.startswith("application/json"), (path, ctype)
    return json.loads(body)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root (symbolic links not followed): relative path -> (mtime_ns, size)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_size if not os.path.isdir(p) else 0)
    return out


def _q(job: str) -> str:
    return f"job={urllib.request.quote(job)}"


def _exercise_job(base: str, job: str) -> dict:
    """Request the job page, its JSON and every panel endpoint with one sample image each; returns the job JSON."""
    status, ctype, body = _get(base, f"/job/{job}")
    assert status == 200 and ctype.startswith("text/html") and b"CRYOPIPE_JOB" in body, job
    info = _json(base, f"/api/job?{_q(job)}")
    for f in ("run.out", "run.err"):
        _json(base, f"/api/log?{_q(job)}&file={f}")
    for panel in info["panels"]:
        if panel == "picks":
            page = _json(base, f"/api/picks?{_q(job)}&offset=0&limit=10")
            assert page["total"] >= 1 and page["items"], job
            mic = _json(base, f"/api/picks/mic?{_q(job)}&i=0")
            if mic["found"]:
                s, ct, b = _get(base, f"/img/mic.png?{_q(job)}&i=0&lp=20")
                assert s == 200 and b.startswith(PNG), (job, s, b[:200])
        elif panel == "classes":
            cl = _json(base, f"/api/classes?{_q(job)}")
            assert cl["classes"], job
            s, ct, b = _get(base, f"/img/class.png?{_q(job)}&it={cl['iteration']}&k={cl['classes'][0]['k']}")
            assert s == 200 and b.startswith(PNG), (job, s, b[:200])
        elif panel == "maps":
            for m in _json(base, f"/api/maps?{_q(job)}")["maps"][:3]:
                f = urllib.request.quote(m["file"])
                if m["kind"] in ("map", "tomogram"):
                    for view in ("slice", "proj") if m["kind"] == "map" else ("slice",):
                        for axis in "zyx":
                            s, ct, b = _get(base, f"/img/vol.png?{_q(job)}&file={f}&view={view}&axis={axis}")
                            assert s == 200 and b.startswith(PNG), (job, m, view, axis, b[:200])
                    if m["kind"] == "map":
                        s, ct, b = _get(base, f"/map.mrc?{_q(job)}&file={f}")
                        assert s == 200 and len(b) > 1024, (job, m)
                elif m["kind"] in ("stack", "image"):
                    s, ct, b = _get(base, f"/img/stack.png?{_q(job)}&file={f}&index=0")
                    assert s == 200 and b.startswith(PNG), (job, m, b[:200])
        else:
            _json(base, f"/api/{panel}?{_q(job)}")
    return info


# ---------------------------------------------------------------------------------------------- projects

@pytest.fixture(scope="module")
def small_project(tmp_path_factory, relion_dir) -> Path:
    """A project made by cheap cryopipe jobs: simulate micrographs, LoG picking, extraction, 2D classification,
    class selection, post-processing of the RELION fixtures' half maps and a two-class 3D initial model (about
    25 s on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("viewproj") / "proj"
    root.mkdir()
    pp = relion_dir / "postprocess"
    steps = [
        ["simulate", "--what", "micrographs", "--n", "2", "--mic_size", "512", "--n_per_mic", "12", "--seed", "1"],
        ["autopick", "--i", "Simulate/job001/micrographs.star", "--LoG", "--LoG_diam_min", "50", "--LoG_diam_max",
         "80", "--write_fom_maps"],
        ["extract", "--i", "Simulate/job001/micrographs.star", "--coord_list", "AutoPick/job002/autopick.star",
         "--extract_size", "48", "--scale", "32", "--norm", "--invert_contrast", "--minimum_pick_fom", "0.4"],
        ["class2d", "--i", "Extract/job003/particles.star", "--K", "3", "--iter", "2", "--particle_diameter", "100",
         "--j", "1"],
        None,  # select: the classes that got particles (filled in below)
        ["postprocess", "--i", str(pp / "half1.mrc"), "--i2", str(pp / "half2.mrc"), "--mask",
         str(relion_dir / "mask.mrc"), "--auto_bfac", "--autob_lowres", "10"],
        # two 3D classes (a 3D class gallery): a short de novo run
        ["initialmodel", "--i", "Extract/job003/particles.star", "--K", "2", "--iter", "2", "--grad_write_iter", "1",
         "--particle_diameter", "100", "--healpix_order", "1", "--offset_range", "2", "--j", "1"],
        # template picking with the selected averages, FOM maps kept (the threshold slider re-picks them)
        ["autopick", "--i", "Simulate/job001/micrographs.star", "--ref", "Select/job005/class_averages.star",
         "--invert", "--lowpass", "20", "--threshold", "0.2", "--write_fom_maps"],
    ]
    old = os.getcwd()
    os.chdir(root)
    try:
        for argv in steps:
            if argv is None:
                counts = read_star("Class2D/job004/run_it002_data.star")["particles"]["rlnClassNumber"].value_counts()
                keep = sorted(int(k) for k in counts.index[:2])  # the (up to) two largest classes
                (root / "selected_classes.txt").write_text(",".join(map(str, keep)))
                argv = ["select", "--classes", "--i", "Class2D/job004/run_it002_optimiser.star", "--select_classes",
                        ",".join(map(str, keep))]
            assert cli_main(argv) == 0, argv
    finally:
        os.chdir(old)
    return root


_RELION_PIPELINE = """
# version 50001

data_pipeline_general

_rlnPipeLineJobCounter                      13


# version 50001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessTypeLabel #3
_rlnPipeLineProcessStatusLabel #4
Import/job001/       None relion.import.other Succeeded
AutoPick/job002/     None relion.autopick.log Succeeded
AutoPick/job003/     AutoPick/thr3/ relion.autopick.log Succeeded
Extract/job004/      None relion.extract Succeeded
Class2D/job005/      None relion.class2d Succeeded
Class2D/job006/      None relion.class2d Failed
MaskCreate/job007/   None relion.maskcreate Succeeded
PostProcess/job008/  None relion.postprocess Succeeded
Tomograms/job010/    None relion.reconstructtomograms Succeeded
PseudoSubtomo/job011/ None relion.pseudosubtomo Succeeded
ReconstructParticleTomo/job012/ None relion.reconstructparticletomo Running


# version 50001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeTypeLabel #2
Import/job001/micrographs_ctf.star MicrographGroupMetadata.star.relion.ctf
AutoPick/job002/autopick.star MicrographCoordsGroup.star.relion.autopick
AutoPick/job003/autopick.star MicrographCoordsGroup.star.relion.autopick
Extract/job004/particles.star ParticleGroupMetadata.star.relion
Class2D/job005/run_it005_optimiser.star OptimiserData.star.relion.class2d
MaskCreate/job007/mask.mrc Mask3D.mrc.relion
PostProcess/job008/postprocess.star ProcessData.star.relion.postprocess
Tomograms/job010/tomograms.star TomogramGroupMetadata.star.relion
PseudoSubtomo/job011/optimisation_set.star TomoOptimisationSet.star.relion


# version 50001

data_pipeline_input_edges

loop_
_rlnPipeLineEdgeFromNode #1
_rlnPipeLineEdgeProcess #2
Import/job001/micrographs_ctf.star AutoPick/job002/
Import/job001/micrographs_ctf.star AutoPick/job003/
Import/job001/micrographs_ctf.star Extract/job004/
AutoPick/job003/autopick.star Extract/job004/
Extract/job004/particles.star Class2D/job005/
Extract/job004/particles.star Class2D/job006/
MaskCreate/job007/mask.mrc PostProcess/job008/
Tomograms/job010/tomograms.star PseudoSubtomo/job011/
PseudoSubtomo/job011/optimisation_set.star ReconstructParticleTomo/job012/


# version 50001

data_pipeline_output_edges

loop_
_rlnPipeLineEdgeProcess #1
_rlnPipeLineEdgeToNode #2
Import/job001/ Import/job001/micrographs_ctf.star
AutoPick/job002/ AutoPick/job002/autopick.star
AutoPick/job003/ AutoPick/job003/autopick.star
Extract/job004/ Extract/job004/particles.star
Class2D/job005/ Class2D/job005/run_it005_optimiser.star
MaskCreate/job007/ MaskCreate/job007/mask.mrc
PostProcess/job008/ PostProcess/job008/postprocess.star
Tomograms/job010/ Tomograms/job010/tomograms.star
PseudoSubtomo/job011/ PseudoSubtomo/job011/optimisation_set.star
"""


def _link_tree(src: Path, dst: Path) -> None:
    """dst mirrors src with a symbolic link per file (the fixtures stay read-only and are not copied)."""
    shutil.copytree(src, dst, copy_function=os.symlink, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def relion_project(tmp_path_factory, relion_dir, relion_tomo_dir) -> Path:
    """The RELION 5.0.1 fixtures (files written by RELION) arranged as the job folders of one project.

    Names inside the files are kept as RELION wrote them (e.g. ``AutoPick/Micrographs/mic001_autopick.star``
    from a run in its own folder); only ``default_pipeline.star`` is written here. Class2D/job006 (the larger 2D
    run, every iteration's model.star) is marked Failed and ReconstructParticleTomo/job012 Running, to show the
    states.
    """
    root = tmp_path_factory.mktemp("relionproj") / "proj"
    root.mkdir()
    mic = relion_dir / "mic"
    (root / "Micrographs").mkdir()
    os.symlink(mic / "Micrographs" / "mic001.mrc", root / "Micrographs" / "mic001.mrc")
    (root / "Import" / "job001").mkdir(parents=True)
    os.symlink(mic / "micrographs_ctf.star", root / "Import" / "job001" / "micrographs_ctf.star")
    _link_tree(mic / "AutoPick", root / "AutoPick" / "job002")
    _link_tree(mic / "AutoPick_thr3", root / "AutoPick" / "job003")
    os.symlink("job003", root / "AutoPick" / "thr3")  # RELION's alias link
    _link_tree(mic / "Extract_autopick_thr3", root / "Extract" / "job004")
    os.symlink(mic / "particles_autopick_thr3.star", root / "Extract" / "job004" / "particles.star")
    _link_tree(relion_dir / "class2d", root / "Class2D" / "job005")
    _link_tree(relion_dir / "class2d_hard", root / "Class2D" / "job006")
    (root / "MaskCreate" / "job007").mkdir(parents=True)
    os.symlink(relion_dir / "mask.mrc", root / "MaskCreate" / "job007" / "mask.mrc")
    _link_tree(relion_dir / "postprocess", root / "PostProcess" / "job008")
    _link_tree(relion_tomo_dir / "Tomograms", root / "Tomograms" / "job010")
    os.symlink(relion_tomo_dir / "tomograms.star", root / "Tomograms" / "job010" / "tomograms.star")
    _link_tree(relion_tomo_dir / "Subtomo_bin2", root / "PseudoSubtomo" / "job011")
    _link_tree(relion_tomo_dir / "ReconstructParticle_bin2", root / "ReconstructParticleTomo" / "job012")
    (root / "default_pipeline.star").write_text(_RELION_PIPELINE.lstrip())
    return root


@pytest.fixture(scope="module")
def small_server(small_project, tmp_path_factory):
    srv, _ = serve_in_thread(small_project, cache_dir=tmp_path_factory.mktemp("viewcache"))
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def relion_server(relion_project, tmp_path_factory):
    srv, _ = serve_in_thread(relion_project, cache_dir=tmp_path_factory.mktemp("viewcache_relion"))
    yield srv
    srv.shutdown()
    srv.server_close()


# ---------------------------------------------------------------------------------------------- units

def test_read_star_blocks_agrees_with_read_star(relion_dir):
    path = relion_dir / "class2d_hard" / "run_it008_model.star"
    fast = read_star_blocks(path, ["model_general", "model_classes"])
    full = read_star(path)
    assert set(fast) == {"model_general", "model_classes"}
    for k, v in full["model_general"].items():
        assert fast["model_general"][k] == pytest.approx(v) if isinstance(v, float) else fast["model_general"][k] == v
    assert fast["model_classes"]["columns"] == list(full["model_classes"].columns)
    assert [r[0] for r in fast["model_classes"]["rows"]] == list(full["model_classes"]["rlnReferenceImage"])
    dist = [r[1] for r in fast["model_classes"]["rows"]]
    assert dist == pytest.approx(list(full["model_classes"]["rlnClassDistribution"]))


def test_log_tail_follows_a_growing_file(tmp_path):
    log = tmp_path / "run.out"
    log.write_text("".join(f"line {i}\n" for i in range(5000)))
    first = read_log_tail(log, None, max_bytes=1000)
    assert first["reset"] and first["truncated"] and first["text"].startswith("line ")
    assert first["text"].endswith("line 4999\n") and len(first["text"]) <= 1000
    with open(log, "a") as fh:
        fh.write("new line\n")
    nxt = read_log_tail(log, first["offset"])
    assert nxt["text"] == "new line\n" and not nxt["reset"]
    assert read_log_tail(log, nxt["offset"])["text"] == ""
    log.write_text("rotated\n")  # shorter than the offset: start again
    again = read_log_tail(log, nxt["offset"])
    assert again["reset"] and again["text"] == "rotated\n"


def test_layout_graph_columns_follow_dependencies():
    names = ["A/job001/", "B/job002/", "C/job003/", "D/job004/"]
    pos = layout_graph(names, {"B/job002/": ["A/job001/"], "C/job003/": ["A/job001/"],
                               "D/job004/": ["B/job002/", "C/job003/"]})
    assert pos["A/job001/"] == (0, 0)
    assert pos["B/job002/"][0] == pos["C/job003/"][0] == 1 and pos["B/job002/"][1] != pos["C/job003/"][1]
    assert pos["D/job004/"] == (2, 0)


# ---------------------------------------------------------------------------------------------- (a) small project

def test_every_endpoint_of_a_small_project_answers_and_nothing_is_written(small_project, small_server):
    before = _snapshot(small_project)
    base = small_server.url
    status, ctype, body = _get(base, "/")
    assert status == 200 and b"/static/project.js" in body
    proj = _json(base, "/api/project")
    names = [j["name"] for j in proj["jobs"]]
    assert names == ["Simulate/job001/", "AutoPick/job002/", "Extract/job003/", "Class2D/job004/",
                     "Select/job005/", "PostProcess/job006/", "InitialModel/job007/", "AutoPick/job008/"]
    assert proj["counts"] == {"succeeded": 8}
    assert ["AutoPick/job002/", "Extract/job003/"] in proj["edges"]
    assert ["Class2D/job004/", "Select/job005/"] in proj["edges"]
    assert all(j["seconds"] is not None and j["seconds"] >= 0 for j in proj["jobs"])
    panels = {}
    for n in names:
        panels[n] = _exercise_job(base, n)["panels"]
    assert "picks" in panels["AutoPick/job002/"] and "picks" in panels["Simulate/job001/"]
    assert {"iterations", "classes"} <= set(panels["Class2D/job004/"])
    assert "classes" in panels["Select/job005/"] and "postprocess" in panels["PostProcess/job006/"]
    assert "maps" in panels["PostProcess/job006/"]
    # panel content
    it = _json(base, "/api/iterations?" + _q("Class2D/job004/"))
    assert it["iterations"] == [0, 1, 2] and len(it["series"]["rlnCurrentResolution"]) == 3
    assert it["series"]["rlnAveragePmax"][-1] > 0
    cl = _json(base, "/api/classes?" + _q("Class2D/job004/"))
    assert len(cl["classes"]) == 3 and cl["selected_by"] == "Select/job005/"
    keep = {int(k) for k in (small_project / "selected_classes.txt").read_text().split(",")}
    assert [c["selected"] for c in cl["classes"]] == [c["k"] in keep for c in cl["classes"]]
    n_particles = len(read_star(small_project / "Extract/job003/particles.star")["particles"])
    assert sum(c["count"] for c in cl["classes"]) == n_particles
    # 3D classes: the gallery lists both classes of the last iteration, each drawn as a projection of its map
    assert {"iterations", "classes", "maps"} <= set(panels["InitialModel/job007/"])
    cl3 = _json(base, "/api/classes?" + _q("InitialModel/job007/"))
    assert cl3["dimensionality"] == 3 and [c["k"] for c in cl3["classes"]] == [1, 2]
    assert sum(c["count"] for c in cl3["classes"]) == n_particles
    pngs = []
    for k in (1, 2):
        s, ct, b = _get(base, f"/img/class.png?{_q('InitialModel/job007/')}&it={cl3['iteration']}&k={k}")
        assert s == 200 and b.startswith(PNG)
        pngs.append(b)
    assert pngs[0] != pngs[1]
    mic = _json(base, "/api/picks/mic?" + _q("AutoPick/job002/") + "&i=0")
    assert mic["has_fom"] and len(mic["picks"]) > 10 and mic["width"] == 512 and mic["diameter_px"] > 0
    pp = _json(base, "/api/postprocess?" + _q("PostProcess/job006/"))
    assert pp["general"]["rlnFinalResolution"] == pytest.approx(8.47, abs=0.05)
    assert len(pp["fsc"]["rlnFourierShellCorrelationCorrected"]) == len(pp["fsc"]["rlnResolution"]) > 10
    assert pp["guinier"]["rlnResolutionSquared"]
    log = _json(base, "/api/log?" + _q("Class2D/job004/") + "&file=run.out")
    assert "Class2D/job004/" in log["text"] and log["status"] == "succeeded"
    # the viewer wrote nothing into the project
    assert _snapshot(small_project) == before


def test_requests_outside_what_a_job_lists_are_refused(small_server):
    base = small_server.url
    assert _get(base, "/api/project", host="evil.example:80")[0] == 403       # DNS rebinding
    assert _get(base, "/api/job?job=Nope/job999/")[0] == 404
    assert _get(base, "/job/Nope/job999/")[0] == 404
    assert _get(base, "/static/../server.py")[0] == 404
    assert _get(base, "/static/%2e%2e/server.py")[0] == 404
    assert _get(base, "/map.mrc?" + _q("PostProcess/job006/") + "&file=../../default_pipeline.star")[0] == 404
    assert _get(base, "/img/vol.png?" + _q("PostProcess/job006/") + "&file=/etc/passwd")[0] == 404
    assert _get(base, "/api/log?" + _q("PostProcess/job006/") + "&file=../note.txt")[0] == 400
    assert _get(base, "/api/picks/mic?" + _q("AutoPick/job002/") + "&i=99")[0] == 404


def test_cli_view_prints_its_address_and_serves(small_project, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cryopipe", "view", str(small_project / "Class2D"),
                             "--cache", str(tmp_path / "c")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        url = None
        t0 = time.monotonic()
        while url is None and time.monotonic() - t0 < 30:
            line = proc.stdout.readline()
            if not line:
                break
            if "open http://127.0.0.1:" in line:
                url = line.split("open ", 1)[1].split()[0]
        assert url is not None, "no address printed"
        health = _json(url, "/api/health")
        assert health["ok"] and health["root"] == str(small_project)  # found from a folder inside the project
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert cli_main(["view", str(tmp_path)]) == 1  # not a project: one-line error
    assert cli_main(["view", str(small_project), "--cache", str(small_project / "cache")]) == 1


# ---------------------------------------------------------------------------------------------- (b) RELION project

def test_a_project_made_by_relion_loads(relion_project, relion_server):
    before = _snapshot(relion_project)
    base = relion_server.url
    proj = _json(base, "/api/project")
    status = {j["name"]: j["status"] for j in proj["jobs"]}
    assert len(status) == 11
    assert status["Class2D/job006/"] == "failed" and status["ReconstructParticleTomo/job012/"] == "running"
    assert next(j for j in proj["jobs"] if j["name"] == "AutoPick/job003/")["alias"] == "AutoPick/thr3/"
    assert ["AutoPick/job003/", "Extract/job004/"] in proj["edges"]
    panels = {n: _exercise_job(base, n)["panels"] for n in status}
    assert _json(base, "/api/job?job=AutoPick/thr3/")["name"] == "AutoPick/job003/"  # by alias
    # RELION's LoG picks (names relative to the folder RELION ran in are still found)
    picks = _json(base, "/api/picks/mic?" + _q("AutoPick/job002/") + "&i=0")
    assert picks["found"] and len(picks["picks"]) == 1770 and picks["has_fom"]
    assert len(_json(base, "/api/picks/mic?" + _q("AutoPick/job003/") + "&i=0")["picks"]) == 45
    # 2D classification: RELION's iterations and classes
    it = _json(base, "/api/iterations?" + _q("Class2D/job006/"))
    assert it["iterations"] == list(range(9))
    res = it["series"]["rlnCurrentResolution"]
    assert res[0] is None and res[1:] == pytest.approx([36.0, 32.0, 26.18, 24.0, 20.57, 16.94, 16.94, 16.0], abs=0.01)
    assert it["series"]["rlnAveragePmax"][8] == pytest.approx(0.764, abs=0.001)
    assert it["series"]["rlnChangesOptimalClasses"][8] == pytest.approx(0.0635, abs=1e-4)
    cl = _json(base, "/api/classes?" + _q("Class2D/job006/"))
    assert sorted(c["count"] for c in cl["classes"]) == sorted([96, 305, 167, 452, 86, 110, 382, 96, 151, 155])
    assert [c["resolution"] for c in cl["classes"]] == pytest.approx(
        [22.2, 16.0, 18.0, 18.0, 22.2, 20.6, 16.0, 22.2, 20.6, 22.2], abs=0.05)
    small = _json(base, "/api/classes?" + _q("Class2D/job005/"))
    assert sorted(c["count"] for c in small["classes"]) == [21, 52, 97, 430]
    # post-processing
    pp = _json(base, "/api/postprocess?" + _q("PostProcess/job008/"))
    assert pp["general"]["rlnFinalResolution"] == pytest.approx(8.47, abs=0.01)
    assert pp["general"]["rlnBfactorUsedForSharpening"] == pytest.approx(-172.83, abs=0.01)
    # tomography: tomogram slices, subtomogram angles, reconstructed maps
    maps = _json(base, "/api/maps?" + _q("Tomograms/job010/"))["maps"]
    assert [m["kind"] for m in maps] == ["tomogram"]
    assert "angles" in panels["PseudoSubtomo/job011/"]
    ang = _json(base, "/api/angles?" + _q("PseudoSubtomo/job011/"))
    assert ang["available"] and ang["n"] == 24 and sum(map(sum, ang["counts"])) == 24
    assert "maps" in panels["ReconstructParticleTomo/job012/"] and "maps" in panels["PostProcess/job008/"]
    assert _snapshot(relion_project) == before


# ---------------------------------------------------------------------------------------------- (c) browser

@pytest.fixture(scope="module")
def browser():
    _, _, why = find_chromium()
    if why:
        pytest.skip(why)
    from cryopipe.viewer.browser import start_browser

    drv = start_browser(1280, 900)
    yield drv
    drv.quit()


def _load(drv, url: str, timeout: float = 30.0) -> None:
    from cryopipe.viewer.browser import wait_ready

    drv.get(url)
    wait_ready(drv, timeout, images=False)


def test_browser_every_page_loads_without_javascript_errors(browser, small_server, relion_server):
    from cryopipe.viewer.browser import page_errors, wait_ready

    for srv in (small_server, relion_server):
        base = srv.url.rstrip("/")
        pages = ["/"] + ["/job/" + j["name"] for j in srv.app.index.project_json()["jobs"]]
        for page in pages:
            _load(browser, base + page)
            wait_ready(browser, 30, images=True)
            t0 = time.monotonic()  # a page with a map: let the isosurface viewer finish too
            while time.monotonic() - t0 < 30 and browser.execute_script(
                    "const e = document.getElementById('ngl-viewport'); return !!e && !e.dataset.ready;"):
                time.sleep(0.1)
            errors = page_errors(browser)
            assert not errors, (page, errors)
            if page == "/":
                n = browser.execute_script("return document.querySelectorAll('#graph .node').length")
                assert n == len(pages) - 1
            else:
                panels = srv.app.data.panels(page[len("/job/"):])
                shown = browser.execute_script(
                    "return Array.from(document.querySelectorAll('section[data-panel]')).map(s => s.dataset.panel)")
                assert shown == panels, page
                broken = browser.execute_script(
                    "return Array.from(document.images).filter(i => i.complete && i.src && !i.naturalWidth)"
                    ".map(i => i.src)")
                assert not broken, (page, broken)


def test_fom_map_candidates_cut_at_the_job_threshold_are_the_stored_picks(small_server):
    """The slider's points come from the stored LoG FOM maps (every maximum, in picking order); cut at the job's
    own threshold (the lowest stored pick) they are exactly the stored picks, and below it there are more."""
    m = _json(small_server.url, "/api/picks/mic?" + _q("AutoPick/job002/") + "&i=0")
    picks, cands = m["picks"], m["candidates"]
    assert len(cands) > len(picks) > 5
    cut = min(p[2] for p in picks)
    kept = [c for c in cands if c[2] >= cut - 1e-6]
    assert len(kept) == len(picks)
    for (x, y, f), (px, py, pf) in zip(kept, picks):
        assert abs(x - px) < 0.02 and abs(y - py) < 0.02 and abs(f - pf) < 1e-4 * max(1.0, abs(pf))
    foms = [c[2] for c in cands]
    assert foms == sorted(foms, reverse=True)


def test_template_fom_maps_are_re_picked_at_the_asked_threshold(small_project, small_server):
    """Template picking's FOM maps are re-picked at the slider's threshold (RELION's peak search and cluster
    pruning depend on it): at the job's own threshold the stored picks come back, higher thresholds give fewer."""
    from cryopipe.picking.template import read_template_maps, template_pick_from_maps

    url = "/api/picks/mic?" + _q("AutoPick/job008/") + "&i=0"
    m = _json(small_server.url, url)
    assert m["repick"]["threshold"] == pytest.approx(0.2) and "candidates" not in m
    same = _json(small_server.url, url + "&threshold=0.2")["candidates"]
    assert len(same) == len(m["picks"]) > 3
    assert all(abs(a[0] - b[0]) < 0.02 and abs(a[1] - b[1]) < 0.02 for a, b in zip(same, m["picks"]))
    low = _json(small_server.url, url + "&threshold=0")["candidates"]
    high = _json(small_server.url, url + "&threshold=1.2")["candidates"]
    assert len(low) >= len(same) > len(high) > 0 and min(c[2] for c in high) >= 1.2
    # the same as picking the stored maps directly
    base = small_project / m["coordinates"][: -len(".star")]
    direct = template_pick_from_maps(read_template_maps(base)[0], threshold=1.2)
    assert len(direct.x) == len(high)
    assert _get(small_server.url, url + "&threshold=abc")[0] == 400


def test_browser_threshold_slider_changes_the_picks_shown(browser, small_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _load(browser, small_server.url.rstrip("/") + "/job/AutoPick/job002/")

    def shown() -> int:
        return int(browser.find_element(By.ID, "pick-count").get_attribute("data-n"))
    t0 = time.monotonic()
    while shown() == 0 and time.monotonic() - t0 < 20:
        time.sleep(0.1)
    m = _json(small_server.url, "/api/picks/mic?" + _q("AutoPick/job002/") + "&i=0")
    stored, cands = m["picks"], sorted(c[2] for c in m["candidates"])
    slider = browser.find_element(By.ID, "fom-threshold")
    # the slider starts at the job's threshold (the lowest stored pick, up to the slider's step)
    start = shown()
    assert start == sum(f >= float(slider.get_attribute("value")) for f in cands)
    step = float(slider.get_attribute("step"))
    assert abs(float(slider.get_attribute("value")) - min(p[2] for p in stored)) <= step * 1.001
    slider.send_keys(Keys.END)  # the highest figure of merit: only the best pick is left
    assert shown() == 1
    for _ in range(60):
        slider.send_keys(Keys.LEFT)
    middle = shown()
    thr = float(slider.get_attribute("value"))
    assert 1 < middle < len(cands) and middle == sum(f >= thr for f in cands)
    slider.send_keys(Keys.HOME)  # below the job's threshold: maxima of the FOM maps that the job did not pick
    assert shown() == len(cands) > len(stored)

    # template picking: moving the slider re-picks the stored FOM maps on the server
    _load(browser, small_server.url.rstrip("/") + "/job/AutoPick/job008/")
    t0 = time.monotonic()
    while shown() == 0 and time.monotonic() - t0 < 20:
        time.sleep(0.1)
    stored = len(_json(small_server.url, "/api/picks/mic?" + _q("AutoPick/job008/") + "&i=0")["picks"])
    assert shown() == stored
    slider = browser.find_element(By.ID, "fom-threshold")
    count = browser.find_element(By.ID, "pick-count")

    def settle(source: str) -> int:
        t0 = time.monotonic()
        last, stable = -1, 0
        while time.monotonic() - t0 < 20 and stable < 5:
            n = shown() if count.get_attribute("data-source") == source else -1
            stable = stable + 1 if n == last and n >= 0 else 0
            last = n
            time.sleep(0.1)
        return last
    slider.send_keys(Keys.HOME)
    lowest = settle("maps")
    slider.send_keys(Keys.END)
    highest = settle("maps")
    assert lowest >= stored > highest >= 0


def test_browser_map_viewer_draws(browser, small_server):
    from PIL import Image
    from selenium.webdriver.common.by import By

    _load(browser, small_server.url.rstrip("/") + "/job/PostProcess/job006/")
    t0 = time.monotonic()
    state = None
    while time.monotonic() - t0 < 40:
        state = browser.execute_script(
            "const e = document.getElementById('ngl-viewport'); return e && e.dataset.ready;")
        if state:
            break
        time.sleep(0.2)
    assert state == "1", f"isosurface viewer not ready: {state}"
    box = browser.find_element(By.ID, "ngl-viewport")
    browser.execute_script("arguments[0].scrollIntoView()", box)
    time.sleep(0.5)
    img = Image.open(io.BytesIO(box.screenshot_as_png)).convert("RGB")
    import numpy as np

    a = np.asarray(img, dtype=np.float32)
    coloured = (np.abs(a - 255).sum(axis=2) > 60).mean()  # pixels that are not the white background
    assert a.std() > 10 and 0.02 < coloured < 0.95, (a.std(), coloured)
    # the threshold control changes the surface
    browser.execute_script("const s = document.getElementById('iso-threshold'); s.value = 5; "
                           "s.dispatchEvent(new Event('input'));")
    time.sleep(1.0)
    b = np.asarray(Image.open(io.BytesIO(box.screenshot_as_png)).convert("RGB"), dtype=np.float32)
    assert (np.abs(b - 255).sum(axis=2) > 60).mean() < coloured


def test_browser_log_of_a_running_job_updates_without_reload(browser, tmp_path):
    from selenium.webdriver.common.by import By

    root = tmp_path / "live"
    job = root / "Class2D" / "job001"
    job.mkdir(parents=True)
    (root / "default_pipeline.star").write_text(
        "# version 50001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 2\n\n# version 50001\n\n"
        "data_pipeline_processes\n\nloop_\n_rlnPipeLineProcessName #1\n_rlnPipeLineProcessAlias #2\n"
        "_rlnPipeLineProcessTypeLabel #3\n_rlnPipeLineProcessStatusLabel #4\n"
        "Class2D/job001/ None relion.class2d Running\n\n")
    (job / "run.out").write_text("iteration 1\n")
    srv, _ = serve_in_thread(root, cache_dir=tmp_path / "cache")
    try:
        _load(browser, srv.url.rstrip("/") + "/job/Class2D/job001/")
        log = browser.find_element(By.ID, "log")
        assert "iteration 1" in log.text
        with open(job / "run.out", "a") as fh:
            fh.write("iteration 2: resolution 12.5 Å\n")
        t0 = time.monotonic()
        while "iteration 2" not in log.text and time.monotonic() - t0 < 10:
            time.sleep(0.2)
        assert "iteration 2: resolution 12.5 Å" in log.text
        (job / "RELION_JOB_EXIT_SUCCESS").touch()  # the job ends: the badge follows
        t0 = time.monotonic()
        badge = lambda: browser.execute_script("return document.querySelector('#jobhead .badge').textContent")  # noqa: E731
        while badge() != "succeeded" and time.monotonic() - t0 < 10:
            time.sleep(0.2)
        assert badge() == "succeeded"
    finally:
        srv.shutdown()
        srv.server_close()
