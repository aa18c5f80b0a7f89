"""The project as the viewer sees it: ``default_pipeline.star`` plus each job folder's markers, note and logs.

:class:`ProjectIndex` answers the project page (every job with its type, status and time, and the job graph)
and the per-job basics (command, options, log tail). It reads only what RELION and cryopipe both write
(see :mod:`cryopipe.pipeline.project` for the layout), so projects made by RELION show as well:

* status: the job folder's exit marker (``RELION_JOB_EXIT_SUCCESS`` / ``_FAILURE`` / ``_ABORTED``) when there is
  one, else the pipeline's ``rlnPipeLineProcessStatusLabel`` (``Running``, ``Scheduled`` …). RELION's GUI does
  the same: a job that wrote its marker is finished even before the pipeline file says so.
* time: started = the last ``++++ Executing new job on …`` / ``Continuing job on …`` line of ``note.txt``
  (else the modification time of ``job.star``); ended = the marker's modification time.
* graph: job B depends on job A when B's input node is an output node of A (``pipeline_output_edges``), or,
  for nodes no job lists as output, when the node's file lies in A's folder.

Large projects: the pipeline is parsed once per change of ``default_pipeline.star``; each job folder's state
is cached under the folder's modification time (markers appear and disappear inside it), so a page answer
costs one ``stat`` per job when nothing changed.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryopipe.errors import InputFileError
from cryopipe.pipeline.project import (
    EXIT_ABORTED,
    EXIT_FAILURE,
    EXIT_SUCCESS,
    PIPELINE_FILE,
    Pipeline,
    read_pipeline,
)
from cryopipe.viewer.files import read_star_blocks

__all__ = ["JobInfo", "ProjectIndex", "read_log_tail", "parse_note", "layout_graph"]

_MARKERS = ((EXIT_SUCCESS, "succeeded"), (EXIT_FAILURE, "failed"), (EXIT_ABORTED, "aborted"))
_NOTE_RE = re.compile(r"\+\+\+\+\s+(Executing new job|Continuing job) on (.+?)\s*$")
_JOBNUM_RE = re.compile(r"job(\d+)")


@dataclass
class JobInfo:
    """One job of the project (a row of ``data_pipeline_processes`` plus its folder's state).

    Times are seconds since the epoch (None when unknown).
    """

    name: str                   # "Class2D/job007/"
    number: int                 # 7
    type_dir: str               # "Class2D"
    type_label: str             # "relion.class2d"
    alias: str | None           # "Class2D/good/" or None
    status: str                 # running | scheduled | succeeded | failed | aborted
    pipeline_status: str        # as in the pipeline file
    started: float | None = None
    ended: float | None = None
    inputs: list[str] = field(default_factory=list)        # upstream job names
    input_nodes: list[str] = field(default_factory=list)   # files read
    output_nodes: list[str] = field(default_factory=list)  # files written (as registered)

    def to_json(self) -> dict[str, Any]:
        dur = None
        if self.started is not None:
            end = self.ended if self.ended is not None else (time.time() if self.status == "running" else None)
            dur = None if end is None else max(0.0, end - self.started)
        return {"name": self.name, "number": self.number, "type": self.type_dir, "label": self.type_label,
                "alias": self.alias, "status": self.status, "started": self.started, "ended": self.ended,
                "seconds": dur, "inputs": self.inputs}


def parse_note(text: str) -> list[dict[str, Any]]:
    """The runs recorded in a ``note.txt``: ``[{"verb", "when" (epoch s or None), "commands": [...]}]``.

    RELION and cryopipe write ``++++ Executing new job on <date>`` / ``++++ with the following command(s):`` /
    command lines / ``++++``; other notes (a RELION fixture's ``Command:`` paragraph) come back as one run with
    the non-empty lines as commands.
    """
    runs: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    collecting = False
    for line in text.splitlines():
        m = _NOTE_RE.search(line)
        if m:
            cur = {"verb": m.group(1), "when": _parse_time(m.group(2)), "commands": []}
            runs.append(cur)
            collecting = False
            continue
        if cur is not None and "with the following command" in line:
            collecting = True
            continue
        if line.strip().startswith("++++"):
            collecting = False
            continue
        if collecting and cur is not None and line.strip():
            cur["commands"].append(line.strip())
    if not runs:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "Command:"]
        if lines:
            runs.append({"verb": "Note", "when": None, "commands": lines})
    return runs


def _parse_time(s: str) -> float | None:
    for fmt in ("%a %b %d %H:%M:%S %Y", "%c"):
        try:
            return _dt.datetime.strptime(s.strip(), fmt).timestamp()
        except ValueError:
            continue
    return None


def read_log_tail(path: str | os.PathLike, offset: int | None = None, max_bytes: int = 65536) -> dict[str, Any]:
    """New text of a growing log file.

    Args:
        path: the log (``run.out`` / ``run.err``).
        offset: byte offset already shown (None: start with the last ``max_bytes``).
        max_bytes: most bytes returned at once.

    Returns:
        ``{"text", "offset" (where the next call continues), "size", "reset" (the file shrank or this is a first
        read: replace what is shown), "truncated" (the beginning was left out)}``.
    """
    try:
        size = os.stat(path).st_size
    except OSError:
        return {"text": "", "offset": 0, "size": 0, "reset": offset is None, "truncated": False, "exists": False}
    reset = offset is None or offset > size or offset < 0
    start = max(0, size - max_bytes) if reset else offset
    truncated = reset and start > 0
    if not reset and size - start > max_bytes:  # fell far behind: jump ahead
        start, reset, truncated = size - max_bytes, True, True
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(size - start)
    if truncated:  # start at a line boundary
        nl = data.find(b"\n")
        if 0 <= nl < len(data) - 1:
            data = data[nl + 1:]
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return {"text": text, "offset": size, "size": size, "reset": reset, "truncated": truncated, "exists": True}


def layout_graph(names: list[str], parents: Mapping[str, list[str]]) -> dict[str, tuple[int, int]]:
    """Layered layout of a job graph: column = longest path from a job without inputs, row = order within
    the column (by job order). Cycles (not expected) are broken by job order.

    Returns ``{name: (column, row)}``.
    """
    col: dict[str, int] = {}
    # jobs normally depend on earlier jobs: one pass in file order, then fix the rare forward references
    for _ in range(3):
        changed = False
        for n in names:
            c = 0
            for p in parents.get(n, ()):
                if p != n and p in col:
                    c = max(c, col[p] + 1)
            if col.get(n) != c:
                col[n] = c
                changed = True
        if not changed:
            break
    rows: dict[int, int] = {}
    out: dict[str, tuple[int, int]] = {}
    for n in names:
        c = min(col.get(n, 0), len(names))
        out[n] = (c, rows.get(c, 0))
        rows[c] = rows.get(c, 0) + 1
    return out


class ProjectIndex:
    """Read-only view of a RELION / cryopipe project directory.

    Args:
        root: the directory holding ``default_pipeline.star``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(root))
        self.pipeline_path = self.root / PIPELINE_FILE
        if not self.pipeline_path.is_file():
            raise InputFileError(self.pipeline_path, "no pipeline file here",
                                 "give the project directory (the one holding default_pipeline.star)")
        self._lock = threading.Lock()
        self._pipe_key: tuple[int, int] | None = None
        self._pipe: Pipeline | None = None
        self._graph: dict[str, Any] = {}
        self._folder_cache: dict[str, tuple[int, tuple]] = {}

    # -- pipeline --
    def pipeline(self) -> tuple[Pipeline, dict[str, Any]]:
        """The parsed pipeline and its derived graph (re-read when the file changed)."""
        st = os.stat(self.pipeline_path)
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._pipe is not None and key == self._pipe_key:
                return self._pipe, self._graph
        pipe = read_pipeline(self.pipeline_path)
        graph = self._derive(pipe)
        with self._lock:
            self._pipe, self._graph, self._pipe_key = pipe, graph, key
        return pipe, graph

    @staticmethod
    def _derive(pipe: Pipeline) -> dict[str, Any]:
        names = [p.name for p in pipe.processes]
        name_set = set(names)
        producer: dict[str, str] = {}
        outputs: dict[str, list[str]] = {n: [] for n in names}
        for proc, node in pipe.output_edges:
            producer.setdefault(node, proc)
            if proc in outputs:
                outputs[proc].append(node)
        inputs: dict[str, list[str]] = {n: [] for n in names}
        parents: dict[str, list[str]] = {n: [] for n in names}
        for node, proc in pipe.input_edges:
            if proc not in inputs:
                continue
            inputs[proc].append(node)
            src = producer.get(node)
            if src is None:  # a node no job lists as output: the job whose folder holds the file
                parts = node.split("/")
                if len(parts) >= 3:
                    cand = f"{parts[0]}/{parts[1]}/"
                    src = cand if cand in name_set else None
            if src is not None and src != proc and src not in parents[proc]:
                parents[proc].append(src)
        alias = {p.alias.rstrip("/") + "/": p.name for p in pipe.processes if p.alias and p.alias != "None"}
        return {"names": names, "parents": parents, "inputs": inputs, "outputs": outputs,
                "layout": layout_graph(names, parents), "alias": alias,
                "procs": {p.name: p for p in pipe.processes}}

    # -- job folders --
    def job_dir(self, name: str) -> Path:
        return self.root / name

    def _folder_state(self, name: str) -> tuple[str | None, float | None, float | None]:
        """(marker status or None, started, ended) of a job folder, cached under the folder's mtime."""
        d = os.path.join(self.root, name)
        try:
            mt = os.stat(d).st_mtime_ns
        except OSError:
            return None, None, None
        hit = self._folder_cache.get(name)
        if hit is not None and hit[0] == mt:
            return hit[1]  # type: ignore[return-value]
        marker, ended = None, None
        for fname, status in _MARKERS:
            try:
                ended = os.stat(os.path.join(d, fname)).st_mtime
                marker = status
                break
            except OSError:
                continue
        started = None
        try:
            with open(os.path.join(d, "note.txt"), encoding="utf-8", errors="replace") as fh:
                note = fh.read(1 << 20)
            runs = parse_note(note)
            if runs:
                started = runs[-1]["when"]
        except OSError:
            pass
        if started is None:
            try:
                started = os.stat(os.path.join(d, "job.star")).st_mtime
            except OSError:
                pass
        state = (marker, started, ended)
        self._folder_cache[name] = (mt, state)
        return state

    def _info(self, name: str, graph: dict[str, Any]) -> JobInfo:
        proc = graph["procs"][name]
        marker, started, ended = self._folder_state(name)
        status = marker or (proc.status or "unknown").lower()
        parts = name.rstrip("/").split("/")
        m = _JOBNUM_RE.fullmatch(parts[-1]) if parts else None
        alias = proc.alias if proc.alias and proc.alias != "None" else None
        return JobInfo(name=name, number=int(m.group(1)) if m else 0, type_dir=parts[0] if parts else "",
                       type_label=proc.type_label, alias=alias, status=status, pipeline_status=proc.status,
                       started=started, ended=ended if marker else None, inputs=list(graph["parents"][name]),
                       input_nodes=list(graph["inputs"][name]), output_nodes=list(graph["outputs"][name]))

    def jobs(self) -> list[JobInfo]:
        """Every job in pipeline order."""
        _, graph = self.pipeline()
        return [self._info(n, graph) for n in graph["names"]]

    def job(self, name: str) -> JobInfo | None:
        """A job by process name (``Class2D/job007/``, trailing slash optional) or alias."""
        _, graph = self.pipeline()
        key = name.strip("/") + "/"
        key = graph["alias"].get(key, key)
        if key not in graph["procs"]:
            return None
        return self._info(key, graph)

    def children(self, name: str) -> list[str]:
        """Jobs that take an output of ``name`` as input."""
        _, graph = self.pipeline()
        return [n for n in graph["names"] if name in graph["parents"][n]]

    # -- answers --
    def project_json(self) -> dict[str, Any]:
        """The project page's data: every job (with graph position) and the dependency edges."""
        t0 = time.perf_counter()
        _, graph = self.pipeline()
        jobs = []
        counts: dict[str, int] = {}
        for n in graph["names"]:
            info = self._info(n, graph)
            j = info.to_json()
            j["col"], j["row"] = graph["layout"][n]
            jobs.append(j)
            counts[info.status] = counts.get(info.status, 0) + 1
        edges = [[p, n] for n in graph["names"] for p in graph["parents"][n]]
        return {"root": str(self.root), "name": self.root.name, "jobs": jobs, "edges": edges, "counts": counts,
                "now": time.time(), "ms": round(1000 * (time.perf_counter() - t0), 1)}

    def job_options(self, name: str) -> dict[str, Any]:
        """``job.star``: ``{"label", "is_continue", "is_tomo", "options": [[variable, value], ...]}``."""
        path = self.job_dir(name) / "job.star"
        if not path.is_file():
            return {"options": []}
        blocks = read_star_blocks(path, ["job", "joboptions_values"])
        head = blocks.get("job", {}) if isinstance(blocks.get("job"), dict) else {}
        vals = blocks.get("joboptions_values", {})
        opts = [[str(r[0]), "" if len(r) < 2 else str(r[1])] for r in vals.get("rows", [])] \
            if isinstance(vals, dict) else []
        return {"label": head.get("rlnJobTypeLabel"), "is_continue": head.get("rlnJobIsContinue"),
                "is_tomo": head.get("rlnJobIsTomo"), "options": opts}

    def job_option(self, name: str, *variables: str) -> str | None:
        """The first of ``variables`` set (non-empty) in the job's ``job.star``."""
        opts = dict(self.job_options(name)["options"])
        for v in variables:
            val = opts.get(v)
            if val not in (None, "", '""'):
                return val
        return None

    def note(self, name: str) -> dict[str, Any]:
        """``note.txt``: the raw text (last 64 kB) and its parsed runs."""
        path = self.job_dir(name) / "note.txt"
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()[-65536:]
        except OSError:
            return {"text": "", "runs": []}
        return {"text": text, "runs": parse_note(text)}
