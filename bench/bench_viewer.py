"""Benchmark of ``cryopipe view`` on a large synthetic project: 1,000 jobs, 10,000 micrographs (STAR files only).

The project (written into a temporary folder, removed afterwards):

* ``Import/job001/micrographs.star``, ``CtfFind/job002/micrographs_ctf.star``: 10,000 micrographs;
* ``AutoPick/job003/``: ``autopick.star`` listing 10,000 coordinate files ``Micrographs/micNNNNN_autopick.star``
  (50 picks each, with rlnAutopickFigureOfMerit);
* 997 more jobs in 142 chains Extract → Class2D → Select → InitialModel → Refine3D → MaskCreate → PostProcess
  (inputs and outputs registered in ``default_pipeline.star`` as RELION does), each folder with ``job.star``,
  ``note.txt``, ``run.out``, an exit marker (a few failed, one running) and a small output STAR file; the
  Class2D jobs have 3 iterations of ``run_itNNN_model.star`` / ``_optimiser.star``.

Timed over HTTP on 127.0.0.1 (the server in a thread of this process, as the tests do):

* the **project page**: ``GET /`` (the HTML) plus ``GET /api/project`` (every job, the graph) — "cold" on a freshly
  started server (pipeline parsed, every job folder looked at; median of 3 fresh servers), "warm" (median of 10);
* the AutoPick job's page: ``GET /api/job``, the first page of its micrograph list ``GET /api/picks`` (100
  micrographs, pick counts read for those only) and one micrograph's picks ``GET /api/picks/mic``;
* when Chromium is installed: the time until the project page has drawn its graph and table in headless Chromium.

Target: the project page answers in < 1 s. Output: ``bench/results/viewer.json`` and a summary on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cryopipe.pipeline.project import Pipeline, Process, write_pipeline  # noqa: E402
from cryopipe.viewer.server import serve_in_thread  # noqa: E402

N_JOBS = 1000
N_MICS = 10_000
PICKS_PER_MIC = 50
CHAIN = [("Extract", "relion.extract", "particles.star", "ParticleGroupMetadata.star.relion"),
         ("Class2D", "relion.class2d", "run_it003_optimiser.star", "OptimiserData.star.relion.class2d"),
         ("Select", "relion.select.class2dauto", "particles.star", "ParticleGroupMetadata.star.relion"),
         ("InitialModel", "relion.initialmodel", "initial_model.mrc", "DensityMap.mrc.relion.initialmodel"),
         ("Refine3D", "relion.refine3d", "run_data.star", "ParticleGroupMetadata.star.relion.refine3d"),
         ("MaskCreate", "relion.maskcreate", "mask.mrc", "Mask3D.mrc.relion"),
         ("PostProcess", "relion.postprocess", "postprocess.star", "ProcessData.star.relion.postprocess")]


def _job_files(d: Path, label: str, status: str, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "job.star").write_text(f"# version 50001\n\ndata_job\n\n_rlnJobTypeLabel {label}\n_rlnJobIsContinue 0\n"
                                f"_rlnJobIsTomo 0\n\n# version 50001\n\ndata_joboptions_values\n\nloop_\n"
                                f"_rlnJobOptionVariable #1\n_rlnJobOptionValue #2\nnr_iter 25\nnr_classes 50\n\n")
    (d / "note.txt").write_text(f" ++++ Executing new job on Mon Jan 05 10:{n % 60:02d}:00 2026\n"
                                f" ++++ with the following command(s): \n"
                                f"relion_something --o {d.parent.name}/{d.name}/\n ++++ \n")
    (d / "run.out").write_text("".join(f"line {i} of the log\n" for i in range(200)))
    (d / "run.err").write_text("")
    marker = {"Succeeded": "RELION_JOB_EXIT_SUCCESS", "Failed": "RELION_JOB_EXIT_FAILURE"}.get(status)
    if marker:
        (d / marker).touch()


def _mic_table(names: list[str], block: str = "micrographs", extra: str = "") -> str:
    head = (f"# version 50001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
            f"_rlnMicrographPixelSize #3\nopticsGroup1 1 1.0\n\n# version 50001\n\ndata_{block}\n\nloop_\n"
            f"_rlnMicrographName #1\n_rlnOpticsGroup #2\n{extra}")
    return head + "".join(f"{n} 1\n" for n in names) + "\n"


def make_project(root: Path) -> dict:
    t0 = time.perf_counter()
    pipe = Pipeline(job_counter=N_JOBS + 1)
    mics = [f"MotionCorr/Movies/mic{i:05d}.mrc" for i in range(1, N_MICS + 1)]

    def add(num: int, type_dir: str, label: str, status: str, inputs: list[str], out: str, out_type: str) -> str:
        name = f"{type_dir}/job{num:03d}/"
        pipe.processes.append(Process(name=name, type_label=label, status=status))
        for node in inputs:
            pipe.input_edges.append((node, name))
        node = name + out
        pipe.nodes[node] = out_type
        pipe.output_edges.append((name, node))
        _job_files(root / name, label, status, num)
        return node

    imp = add(1, "Import", "relion.import.other", "Succeeded", [], "micrographs.star",
              "MicrographGroupMetadata.star.relion")
    (root / imp).write_text(_mic_table(mics))
    ctf = add(2, "CtfFind", "relion.ctffind.ctffind4", "Succeeded", [imp], "micrographs_ctf.star",
              "MicrographGroupMetadata.star.relion.ctf")
    (root / ctf).write_text(_mic_table(mics))
    picks = add(3, "AutoPick", "relion.autopick.log", "Succeeded", [ctf], "autopick.star",
                "MicrographCoordsGroup.star.relion.autopick")
    rows = "".join(f"{m} AutoPick/job003/Micrographs/mic{i + 1:05d}_autopick.star\n" for i, m in enumerate(mics))
    (root / picks).write_text("# version 50001\n\ndata_coordinate_files\n\nloop_\n_rlnMicrographName #1\n"
                              "_rlnMicrographCoordinates #2\n" + rows + "\n")
    cdir = root / "AutoPick/job003/Micrographs"
    cdir.mkdir(parents=True)
    body = "# version 50001\n\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n" \
        "_rlnAutopickFigureOfMerit #3\n" + "".join(f"{37 * k % 4000}.5 {53 * k % 4000}.5 {1 - k / PICKS_PER_MIC:.4f}\n"
                                                   for k in range(PICKS_PER_MIC))
    for i in range(1, N_MICS + 1):
        (cdir / f"mic{i:05d}_autopick.star").write_text(body)
    num = 4
    model = ("# version 50001\n\ndata_model_general\n\n_rlnCurrentResolution {res}\n_rlnAveragePmax 0.5\n"
             "_rlnCurrentImageSize 64\n\n# version 50001\n\ndata_model_classes\n\nloop_\n_rlnReferenceImage #1\n"
             "_rlnClassDistribution #2\n_rlnEstimatedResolution #3\n" +
             "".join(f"{k:06d}@run_classes.mrcs 0.02 12.0\n" for k in range(1, 51)) + "\n")
    opt = ("# version 50001\n\ndata_optimiser_general\n\n_rlnChangesOptimalOrientations 5.0\n"
           "_rlnChangesOptimalOffsets 1.0\n_rlnChangesOptimalClasses 0.1\n\n")
    while num <= N_JOBS:
        prev = picks
        for type_dir, label, out, out_type in CHAIN:
            if num > N_JOBS:
                break
            status = "Failed" if num % 97 == 0 else ("Running" if num == N_JOBS else "Succeeded")
            inputs = [prev] + ([ctf] if type_dir == "Extract" else [])
            node = add(num, type_dir, label, status, inputs, out, out_type)
            (root / node).write_text("# version 50001\n\ndata_x\n\n_rlnDummy 1\n\n") if out.endswith(".star") \
                else (root / node).write_bytes(b"")
            if type_dir == "Class2D":
                for it in range(1, 4):
                    (root / f"{type_dir}/job{num:03d}/run_it{it:03d}_model.star").write_text(model.format(res=30 / it))
                    (root / f"{type_dir}/job{num:03d}/run_it{it:03d}_optimiser.star").write_text(opt)
            prev = node
            num += 1
    write_pipeline(root / "default_pipeline.star", pipe)
    return {"jobs": len(pipe.processes), "micrographs": N_MICS, "coordinate_files": N_MICS,
            "nodes": len(pipe.nodes), "edges": len(pipe.input_edges) + len(pipe.output_edges),
            "write_s": round(time.perf_counter() - t0, 2)}


def _get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        n = len(r.read())
        assert r.status == 200, url
    return time.perf_counter() - t0, n


def _page(base: str) -> tuple[float, int]:
    t_html, n_html = _get(base + "/")
    t_json, n_json = _get(base + "/api/project")
    return t_html + t_json, n_json


def _browser_ready(base: str) -> float | None:
    try:
        from cryopipe.viewer.browser import find_chromium, start_browser, wait_ready
    except ImportError:
        return None
    if find_chromium()[2]:
        return None
    drv = start_browser(1280, 900)
    try:
        drv.get(base + "/api/health")  # browser started
        t0 = time.perf_counter()
        drv.get(base + "/")
        wait_ready(drv, 60, images=False)
        dt = time.perf_counter() - t0
        n = drv.execute_script("return document.querySelectorAll('#graph .node').length")
        assert n == N_JOBS, n
        return dt
    finally:
        drv.quit()


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cryopipe-bench-viewer-"))
    try:
        root = tmp / "project"
        root.mkdir()
        info = make_project(root)
        print(f"synthetic project: {info['jobs']} jobs, {info['micrographs']} micrographs, {info['nodes']} nodes, "
              f"written in {info['write_s']} s", flush=True)
        cold, sizes = [], []
        for i in range(3):
            srv, _ = serve_in_thread(root, cache_dir=tmp / f"cache{i}")
            try:
                dt, n = _page(srv.url.rstrip("/"))
                cold.append(dt)
                sizes.append(n)
            finally:
                srv.shutdown()
                srv.server_close()
        srv, _ = serve_in_thread(root, cache_dir=tmp / "cache")
        base = srv.url.rstrip("/")
        try:
            _page(base)
            warm = [_page(base)[0] for _ in range(10)]
            job = "job=AutoPick/job003/"
            ap = {}
            for what, path in (("job", f"/api/job?{job}"), ("picks_page", f"/api/picks?{job}&offset=0&limit=100"),
                               ("picks_page_far", f"/api/picks?{job}&offset=9900&limit=100"),
                               ("micrograph_picks", f"/api/picks/mic?{job}&i=5000")):
                c = _get(base + path)[0]
                w = statistics.median(_get(base + path)[0] for _ in range(5))
                ap[what] = {"cold_s": round(c, 4), "warm_s": round(w, 4)}
            c2d = "job=Class2D/job005/"
            ap["class2d_iterations"] = {"cold_s": round(_get(base + f"/api/iterations?{c2d}")[0], 4)}
            browser_s = _browser_ready(base)
        finally:
            srv.shutdown()
            srv.server_close()
        res = {
            "project": info,
            "project_page": {"cold_s": [round(x, 4) for x in cold], "cold_median_s": round(statistics.median(cold), 4),
                             "warm_median_s": round(statistics.median(warm), 4), "warm_max_s": round(max(warm), 4),
                             "json_bytes": sizes[0], "target_s": 1.0,
                             "meets_target": statistics.median(cold) < 1.0 and max(warm) < 1.0},
            "autopick_job_10k_micrographs": ap,
            "browser_project_page_ready_s": None if browser_s is None else round(browser_s, 3),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                        "platform": platform.platform()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        out = HERE / "results" / "viewer.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        pp = res["project_page"]
        print(f"project page (HTML + /api/project, {pp['json_bytes'] / 1e3:.0f} kB JSON): "
              f"cold {pp['cold_median_s']:.3f} s "
              f"(median of 3 fresh servers), warm {pp['warm_median_s']:.3f} s; target < 1 s: "
              f"{'met' if pp['meets_target'] else 'NOT met'}")
        for k, v in ap.items():
            print(f"  AutoPick/Class2D {k}: " + ", ".join(f"{a} {b:.3f} s" for a, b in v.items()))
        if browser_s is not None:
            print(f"  headless Chromium: project page drawn (1,000-node graph + table) in {browser_s:.2f} s")
        print(f"-> {out}")
        return 0 if pp["meets_target"] else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
