"""RELION project directories: ``default_pipeline.star``, job folders, exit markers, aliases.

A *project* is a directory holding ``default_pipeline.star`` (RELION 5.0 layout, ``# version 50001``). Every job
runs in its own folder ``<Type>/jobNNN/`` (three digits, e.g. ``Class2D/job007/``; ``job1000/`` beyond 999),
numbered by the project-wide counter ``rlnPipeLineJobCounter``. A job folder holds

* ``job.star``          – ``data_job`` (rlnJobTypeLabel, rlnJobIsContinue, rlnJobIsTomo) and the
  ``data_joboptions_values`` loop (rlnJobOptionVariable / rlnJobOptionValue) with the job's parameters;
* ``note.txt``          – the command line(s), one entry per run (continuations append);
* ``run.out``/``run.err`` – everything the job printed (appended, as RELION does);
* ``job_pipeline.star`` – the job's own mini-pipeline (its process, input and output nodes);
* ``RELION_JOB_EXIT_SUCCESS`` | ``RELION_JOB_EXIT_FAILURE`` | ``RELION_JOB_EXIT_ABORTED`` – written last.

``default_pipeline.star`` lists the processes (name, alias or ``None``, type label e.g. ``relion.class2d``,
status ``Running``/``Scheduled``/``Succeeded``/``Failed``/``Aborted``), the nodes (file name, type label e.g.
``ParticleGroupMetadata.star.relion``, depth 1) and the input / output edges. Empty tables are left out, as
RELION's ``MetaDataTable::write`` does. Every change is a read-modify-write under RELION's own lock (directory
``.relion_lock/`` holding ``lock_default_pipeline.star``, created with an atomic ``mkdir``), so cryopipe jobs
started at the same time, and a RELION GUI open on the same project, never clobber the job counter; the file
itself is replaced atomically. After each write ``.pipeline_has_changed`` is touched (the RELION GUI then
re-reads the pipeline) and, for finished outputs, the ``.Nodes/<NodeType>/...`` entries that RELION's file
browsers use are created.

Type labels: use RELION's process label when RELION has the same job (``ProcessLabel`` below: e.g.
``relion.autopick.log``, ``relion.extract``, ``relion.class2d``, ``relion.select.class2dauto``,
``relion.initialmodel``, ``relion.refine3d``, ``relion.maskcreate``, ``relion.postprocess``) and
``cryopipe.<name>`` for jobs RELION lacks (e.g. ``cryopipe.reconstruct``: RELION has no single-particle
*Reconstruct* job). RELION 5 reads such a pipeline but prints "unrecognised process label" for the
``cryopipe.*`` processes and cannot open them in its job windows. Node type labels are RELION 5's
(``NodeType`` below); RELION 4.0's older names (``ParticlesData.star.relion`` …) are read and kept as they are.

Failure handling: a job's output nodes are registered only when the job finishes without an exception; a job
that raises gets ``Failed`` (``RELION_JOB_EXIT_FAILURE``, error text appended to ``run.err``), Ctrl-C or a RELION
abort request gives ``Aborted``. Output *files* are written atomically by the job code
(:func:`cryopipe.io.atomic.atomic_path`), so a failed job never leaves a complete-looking file, and the marker
says how the job ended. A *new* job (this run made its folder, no ``--continue``) that fails with a user error
(:class:`cryopipe.errors.CryopipeError`: bad input, impossible options, found while checking the inputs or later
during the work) is taken away again — folder, pipeline entry and alias — since the one-line error says what to
fix, unless it has already written work that ``--continue`` can resume (:meth:`Job.mark_continuable`, or an
optimiser's ``*_itNNN_optimiser.star`` with NNN >= 1); other failures (a bug, a full disk, Ctrl-C) and continued jobs
keep their folder and exit marker.

Where a job writes (:func:`open_job_dir`, called by every job's ``main``) — the ``--o`` rule:

1. ``--o`` left out: a new job ``<Type>/jobNNN/`` in the project in the current directory (a new
   ``default_pipeline.star`` is created there if there is none).
2. ``--o <dir>/<Type>/jobNNN/`` (last component ``job`` + ≥ 3 digits) where ``<dir>`` contains
   ``default_pipeline.star`` or is the current directory: that job of that project. If it is already in the
   pipeline it is continued with ``--continue`` (RELION's "continue": outputs kept, ``rlnJobIsContinue 1``) and
   refused otherwise; if it is not, it is created with that number (the counter moves past it).
3. any other ``--o`` (e.g. ``results/run1/``): a plain output directory outside any pipeline. The job still
   writes ``job.star``, ``note.txt``, ``run.out``/``run.err`` and the exit marker there, but no pipeline file is
   read or written. A directory that holds a finished job (``RELION_JOB_EXIT_SUCCESS``) is refused unless
   ``--continue`` is given: its results are not silently overwritten.

:func:`output_root` gives, by the same rule, the directory that relative file names in the job's STAR files
refer to (so that a job can check its inputs before any folder is made).

Typical use in a job's ``main``::

    root = output_root(args.o)                                 # check inputs relative to this first
    with open_job_dir(args.o, "Class2D", ProcessLabel.CLASS2D, inputs=[(args.i, NodeType.PARTICLES)],
                      params=vars(args), continue_job=args.continue_) as job:
        log("starting")                                        # terminal + run.out
        write_particles(job.path("run_it025_data.star"), ...)  # atomic writes inside the job folder
        job.add_output(job.path("run_it025_data.star"), NodeType.CLASS2D_PARTICLES)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import random
import re
import shlex
import shutil
import socket
import sys
import time
import traceback

import pandas as pd
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.io.star import read_star, write_star
from cryopipe.pipeline.log import ABORT_REQUEST_FILE, log, log_file_only, tee_output

__all__ = [
    "PIPELINE_FILE", "STAR_VERSION", "Status", "NodeType", "ProcessLabel", "Process", "Pipeline", "Project",
    "Job", "open_job_dir", "output_root", "find_project_root", "read_pipeline", "write_pipeline", "write_job_star",
    "EXIT_SUCCESS", "EXIT_FAILURE", "EXIT_ABORTED",
]

PIPELINE_FILE = "default_pipeline.star"
#: ``# version`` written before every block (what RELION 5.0 writes).
STAR_VERSION = 50001
LOCK_DIR = ".relion_lock"
PIPELINE_HAS_CHANGED = ".pipeline_has_changed"
NODES_DIR = ".Nodes"
EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
_JOB_RE = re.compile(r"job(\d{3,})")
_ALIAS_FORBIDDEN = set(" \t\n*?()/\\|#<>&%{}$\"'")


class Status:
    """``rlnPipeLineProcessStatusLabel`` values (RELION 4/5)."""

    RUNNING = "Running"
    SCHEDULED = "Scheduled"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ABORTED = "Aborted"


class NodeType:
    """RELION 5 node type labels (``rlnPipeLineNodeTypeLabel``, from RELION's ``pipeline_jobs.h``)."""

    MOVIES = "MicrographMovieGroupMetadata.star.relion"
    MICROGRAPHS = "MicrographGroupMetadata.star.relion"
    MICROGRAPHS_CTF = "MicrographGroupMetadata.star.relion.ctf"
    COORDS = "MicrographCoordsGroup.star.relion"
    AUTOPICK_COORDS = "MicrographCoordsGroup.star.relion.autopick"
    PARTICLES = "ParticleGroupMetadata.star.relion"
    EXTRACT_PARTICLES = "ParticleGroupMetadata.star.relion"
    CLASS2D_PARTICLES = "ParticleGroupMetadata.star.relion.class2d"
    CLASS2D_OPTIMISER = "OptimiserData.star.relion.class2d"
    CLASS3D_PARTICLES = "ParticleGroupMetadata.star.relion.class3d"
    CLASS3D_OPTIMISER = "OptimiserData.star.relion.class3d"
    CLASS3D_MAP = "DensityMap.mrc.relion.class3d"
    SELECT_PARTICLES = "ParticleGroupMetadata.star.relion"
    SELECT_CLASS_AVERAGES = "Image2DGroupMetadata.star.relion.classaverages"
    IMAGES2D = "Image2DGroupMetadata.star.relion"
    OPTIMISER = "OptimiserData.star.relion"
    INITIAL_MODEL = "DensityMap.mrc.relion.initialmodel"
    INITIAL_MODEL_PARTICLES = "ParticleGroupMetadata.star.relion.initialmodel"
    INITIAL_MODEL_OPTIMISER = "OptimiserData.star.relion.initialmodel"
    REFINE3D_PARTICLES = "ParticleGroupMetadata.star.relion.refine3d"
    REFINE3D_OPTIMISER = "OptimiserData.star.relion.refine3d"
    REFINE3D_MAP = "DensityMap.mrc.relion.refine3d"
    REFINE3D_HALFMAP = "DensityMap.mrc.relion.halfmap.refine3d"
    DENSITY_MAP = "DensityMap.mrc"
    HALFMAP = "DensityMap.mrc.halfmap"
    MASK3D = "Mask3D.mrc"
    MASKCREATE_MASK = "Mask3D.mrc.relion"
    POSTPROCESS = "ProcessData.star.relion.postprocess"
    POSTPROCESS_MAP = "DensityMap.mrc.relion.postprocess"
    POSTPROCESS_MASKED_MAP = "DensityMap.mrc.relion.postprocess.masked"
    LOCALRES_MAP = "Image3D.mrc.relion.localresmap"
    LOGFILE = "LogFile.pdf.relion"
    TOMOGRAMS = "TomogramGroupMetadata.star.relion"
    TOMO_OPTIMISATION_SET = "TomoOptimisationSet.star.relion"


class ProcessLabel:
    """``rlnPipeLineProcessTypeLabel`` values: RELION's where RELION has the job, ``cryopipe.*`` otherwise."""

    IMPORT_MOVIES = "relion.import.movies"
    IMPORT_OTHER = "relion.import.other"
    MOTIONCORR = "relion.motioncorr.own"
    CTFFIND = "relion.ctffind.ctffind4"
    MANUALPICK = "relion.manualpick"
    AUTOPICK_LOG = "relion.autopick.log"
    AUTOPICK_REF2D = "relion.autopick.ref2d"
    AUTOPICK_REF3D = "relion.autopick.ref3d"
    EXTRACT = "relion.extract"
    REEXTRACT = "relion.extract.reextract"
    CLASS2D = "relion.class2d"
    SELECT_CLASS2D_AUTO = "relion.select.class2dauto"
    SELECT_INTERACTIVE = "relion.select.interactive"
    SELECT_ON_VALUE = "relion.select.onvalue"
    SELECT_REMOVE_DUPLICATES = "relion.select.removeduplicates"
    INITIAL_MODEL = "relion.initialmodel"
    CLASS3D = "relion.class3d"
    REFINE3D = "relion.refine3d"
    MASKCREATE = "relion.maskcreate"
    JOINSTAR_PARTICLES = "relion.joinstar.particles"
    SUBTRACT = "relion.subtract"
    POSTPROCESS = "relion.postprocess"
    LOCALRES = "relion.localres.own"
    CTFREFINE = "relion.ctfrefine"
    POLISH = "relion.polish"
    EXTERNAL = "relion.external"
    PSEUDOSUBTOMO = "relion.pseudosubtomo"
    RECONSTRUCT_PARTICLE_TOMO = "relion.reconstructparticletomo"
    RECONSTRUCT_TOMOGRAMS = "relion.reconstructtomograms"
    # cryopipe-only jobs
    RECONSTRUCT = "cryopipe.reconstruct"
    SIMULATE = "cryopipe.simulate"
    MPR = "cryopipe.mpr"  # multi-particle refinement (as Warp's M)


# ----------------------------------------------------------------------------------------------------------
# the pipeline graph
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Process:
    """One row of ``data_pipeline_processes``."""

    name: str                 # "Class2D/job007/"
    type_label: str           # "relion.class2d"
    status: str = Status.RUNNING
    alias: str = "None"       # "Class2D/myrun/" or "None"


@dataclass
class Pipeline:
    """In-memory ``default_pipeline.star``: processes, nodes (name -> type label) and edges, in file order."""

    job_counter: int = 1
    processes: list[Process] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)
    input_edges: list[tuple[str, str]] = field(default_factory=list)    # (node, process)
    output_edges: list[tuple[str, str]] = field(default_factory=list)   # (process, node)

    def process(self, name: str) -> Process | None:
        """The process called ``name`` (trailing slash optional), or None."""
        name = _dir_name(name)
        return next((p for p in self.processes if p.name == name), None)

    def process_by_alias(self, alias: str) -> Process | None:
        alias = _dir_name(alias)
        return next((p for p in self.processes if p.alias != "None" and p.alias == alias), None)

    def unalias(self, node_name: str) -> str:
        """Replace a leading process alias (``Class2D/myrun/x``) by the process name (``Class2D/job007/x``)."""
        for p in self.processes:
            if p.alias != "None" and node_name.startswith(p.alias):
                return p.name + node_name[len(p.alias):]
        return node_name

    def producer(self, node_name: str) -> str | None:
        """Name of the process with an output edge to ``node_name``."""
        return next((proc for proc, node in self.output_edges if node == node_name), None)

    def inputs_of(self, process_name: str) -> list[str]:
        return [node for node, proc in self.input_edges if proc == process_name]

    def outputs_of(self, process_name: str) -> list[str]:
        return [node for proc, node in self.output_edges if proc == process_name]

    def add_process(self, process: Process) -> None:
        if self.process(process.name) is not None:
            raise CryopipeError(f"{process.name}: this job is already in the pipeline")
        self.processes.append(process)
        m = _JOB_RE.fullmatch(Path(process.name).name)
        if m:
            self.job_counter = max(self.job_counter, int(m.group(1)) + 1)

    def add_input_edge(self, node_name: str, type_label: str, process_name: str) -> None:
        """Node -> process edge; a node seen for the first time inside another job's folder becomes that
        job's output (as RELION's ``PipeLine::addNewInputEdge`` does)."""
        node_name = self.unalias(node_name)
        if node_name not in self.nodes:
            self.nodes[node_name] = type_label
            if self.producer(node_name) is None:
                for p in self.processes:
                    if p.name != process_name and node_name.startswith(p.name):
                        self.output_edges.append((p.name, node_name))
                        break
        if (node_name, process_name) not in self.input_edges:
            self.input_edges.append((node_name, process_name))

    def add_output_edge(self, process_name: str, node_name: str, type_label: str) -> None:
        node_name = self.unalias(node_name)
        self.nodes.setdefault(node_name, type_label)
        if (process_name, node_name) not in self.output_edges:
            self.output_edges.append((process_name, node_name))

    def remove_process(self, name: str) -> None:
        """Take a process out with its edges, and the nodes that no edge refers to any more (a job that never
        ran: :class:`Job` removes a job that failed on its input before it made anything of use)."""
        name = _dir_name(name)
        self.processes = [p for p in self.processes if p.name != name]
        self.input_edges = [(n, p) for n, p in self.input_edges if p != name]
        self.output_edges = [(p, n) for p, n in self.output_edges if p != name]
        used = {n for n, _ in self.input_edges} | {n for _, n in self.output_edges}
        self.nodes = {n: t for n, t in self.nodes.items() if n in used}


def _dir_name(name: str | os.PathLike) -> str:
    s = str(name).replace(os.sep, "/")
    return s if s.endswith("/") else s + "/"


# ----------------------------------------------------------------------------------------------------------
# pipeline files (RELION 5.0 layout)
# ----------------------------------------------------------------------------------------------------------

def _loop(rows: Sequence[Sequence], labels: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame([tuple(r) for r in rows], columns=list(labels))


def write_pipeline(path: str | os.PathLike, p: Pipeline) -> None:
    """Write a pipeline STAR file atomically (``default_pipeline.star`` or a ``job_pipeline.star``).

    Table and column names as RELION 5.0's ``PipeLine::write``; empty tables are left out, as RELION does.
    """
    blocks: dict[str, object] = {"pipeline_general": {"rlnPipeLineJobCounter": int(p.job_counter)}}
    tables = {
        "pipeline_processes": _loop([(q.name, q.alias, q.type_label, q.status) for q in p.processes],
                                    ["rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
                                     "rlnPipeLineProcessTypeLabel", "rlnPipeLineProcessStatusLabel"]),
        "pipeline_nodes": _loop([(n, t, 1) for n, t in p.nodes.items()],
                                ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel", "rlnPipeLineNodeTypeLabelDepth"]),
        "pipeline_input_edges": _loop(p.input_edges, ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"]),
        "pipeline_output_edges": _loop(p.output_edges, ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"]),
    }
    blocks.update({k: v for k, v in tables.items() if len(v)})
    write_star(path, blocks, version=STAR_VERSION)


def _rows(table, labels: Sequence[str], path: Path) -> list[tuple[str, ...]]:
    """Rows of a loop block (DataFrame) as tuples of strings; a missing block gives no rows."""
    if table is None:
        return []
    if isinstance(table, Mapping):  # a one-row table written as a key-value block
        table = {k: [v] for k, v in table.items()}
        cols = table
        n = 1
    else:
        cols = {c: list(table[c]) for c in table.columns}
        n = len(table)
    missing = [lab for lab in labels if lab not in cols]
    if missing and n:
        raise InputFileError(path, f"pipeline table lacks column {missing[0]}",
                             "the file is not a RELION 4/5 pipeline; open it once in RELION 5 or start a new project")
    return [tuple(str(cols[lab][i]) for lab in labels) for i in range(n)]


def read_pipeline(path: str | os.PathLike) -> Pipeline:
    """Read ``default_pipeline.star`` / ``job_pipeline.star`` written by RELION 4.0/5.0 or cryopipe."""
    path = Path(path)
    try:
        blocks = read_star(path)
    except CryopipeError:
        raise
    except Exception as exc:  # a truncated or garbled file
        raise InputFileError(path, f"cannot be parsed as a STAR file ({exc})",
                             "restore it from the job folders' job_pipeline.star files or start a new project") from exc
    gen = blocks.get("pipeline_general")
    counter = 1
    if isinstance(gen, Mapping) and "rlnPipeLineJobCounter" in gen:
        counter = int(gen["rlnPipeLineJobCounter"])
    procs = blocks.get("pipeline_processes")
    if procs is not None and not isinstance(procs, Mapping) and "rlnPipeLineProcessTypeLabel" not in procs.columns \
            and "rlnPipeLineProcessType" in procs.columns:
        raise InputFileError(path, "is a RELION 3 pipeline (integer process types)",
                             "open the project once in RELION 4 or 5 to convert it, or start a new project directory")
    p = Pipeline(job_counter=counter)
    for name, alias, label, status in _rows(procs, ["rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
                                                    "rlnPipeLineProcessTypeLabel",
                                                    "rlnPipeLineProcessStatusLabel"], path):
        p.processes.append(Process(name=name, type_label=label, status=status, alias=alias))
    for name, label in _rows(blocks.get("pipeline_nodes"), ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel"],
                             path):
        p.nodes[name] = label
    p.input_edges = [(a, b) for a, b in _rows(blocks.get("pipeline_input_edges"),
                                              ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"], path)]
    p.output_edges = [(a, b) for a, b in _rows(blocks.get("pipeline_output_edges"),
                                               ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"], path)]
    return p


def _joboption_value(v: object) -> str:
    """RELION job option text: booleans Yes/No, sequences space-separated, None empty.

    Double quotes are replaced by single quotes (a STAR value cannot hold a double quote).
    """
    if v is None:
        s = ""
    elif isinstance(v, bool):
        s = "Yes" if v else "No"
    elif isinstance(v, (list, tuple)):
        s = " ".join(_joboption_value(x) for x in v)
    elif isinstance(v, os.PathLike):
        s = os.fspath(v)
    else:
        s = str(v)
    return s.replace('"', "'").replace("\n", " ")


def write_job_star(path: str | os.PathLike, type_label: str, params: Mapping[str, object] | None,
                   is_continue: bool = False, is_tomo: bool = False) -> None:
    """``job.star`` as RELION's ``RelionJob::write``: ``data_job`` + ``data_joboptions_values`` (sorted by name).

    Parameters whose name starts with ``_`` and callables (argparse's dispatch entries) are left out.
    """
    params = params or {}
    rows = [(str(k), _joboption_value(v)) for k, v in sorted(params.items(), key=lambda kv: str(kv[0]))
            if not str(k).startswith("_") and not callable(v)]
    blocks: dict[str, object] = {
        "job": {"rlnJobTypeLabel": type_label, "rlnJobIsContinue": int(is_continue), "rlnJobIsTomo": int(is_tomo)}}
    if rows:
        blocks["joboptions_values"] = _loop(rows, ["rlnJobOptionVariable", "rlnJobOptionValue"])
    write_star(path, blocks, version=STAR_VERSION)


# ----------------------------------------------------------------------------------------------------------
# project
# ----------------------------------------------------------------------------------------------------------

def find_project_root(start: str | os.PathLike = ".") -> Path | None:
    """The nearest directory at or above ``start`` that holds ``default_pipeline.star`` (None if none)."""
    d = Path(os.path.abspath(start))
    for cand in (d, *d.parents):
        if (cand / PIPELINE_FILE).is_file():
            return cand
    return None


class Project:
    """A RELION project directory (``root/default_pipeline.star``).

    Args:
        root: project directory (created if missing).
        create: create an empty ``default_pipeline.star`` (job counter 1) when there is none.
        lock_timeout: seconds to wait for another process's pipeline lock before giving up.
    """

    def __init__(self, root: str | os.PathLike = ".", create: bool = True, lock_timeout: float = 120.0):
        self.root = Path(os.path.abspath(root))
        self.pipeline_path = self.root / PIPELINE_FILE
        self.lock_timeout = float(lock_timeout)
        if not self.pipeline_path.is_file():
            if not create:
                raise InputFileError(self.pipeline_path, "no pipeline file here",
                                     "run a job in this directory to start a project, or cd to the project")
            self.root.mkdir(parents=True, exist_ok=True)
            with self.locked("cryopipe: create project"):
                if not self.pipeline_path.is_file():
                    self._write(Pipeline())

    def __repr__(self) -> str:
        return f"Project({str(self.root)!r})"

    # -- locking and read/write --
    @contextlib.contextmanager
    def locked(self, message: str = "cryopipe") -> Iterator[None]:
        """Hold RELION's pipeline lock (``.relion_lock/lock_default_pipeline.star``) for the block."""
        lock_dir = self.root / LOCK_DIR
        lock_file = lock_dir / f"lock_{PIPELINE_FILE}"
        t0 = time.monotonic()
        while True:
            try:
                os.mkdir(lock_dir, 0o700)
                break
            except FileExistsError:
                if time.monotonic() - t0 > self.lock_timeout:
                    raise CryopipeError(
                        f"{lock_dir}: the pipeline has been locked by another process for more than "
                        f"{self.lock_timeout:.0f} s (if no RELION GUI or cryopipe job is writing to this project, "
                        f"delete {lock_dir})") from None
                time.sleep(0.01 + 0.04 * random.random())
            except PermissionError:
                raise CryopipeError(f"{lock_dir}: cannot create the pipeline lock (no write permission in "
                                    f"{self.root}; run jobs in a project you own)") from None
        try:
            lock_file.write_text(f"{message} (pid {os.getpid()})\n")
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock_file)
            with contextlib.suppress(OSError):
                os.rmdir(lock_dir)

    def read(self) -> Pipeline:
        """Current content of ``default_pipeline.star`` (no lock: a snapshot)."""
        return read_pipeline(self.pipeline_path)

    def _write(self, p: Pipeline) -> None:
        write_pipeline(self.pipeline_path, p)
        (self.root / PIPELINE_HAS_CHANGED).touch()

    @contextlib.contextmanager
    def edit(self, message: str = "cryopipe") -> Iterator[Pipeline]:
        """Locked read-modify-write: the yielded pipeline is written back when the block succeeds."""
        with self.locked(message):
            p = self.read()
            yield p
            self._write(p)

    # -- queries --
    def status(self, name: str) -> str | None:
        proc = self.read().process(name)
        return proc.status if proc else None

    def node_name(self, path: str | os.PathLike) -> str:
        """File name as the pipeline stores it: relative to the project root (posix) when inside it.

        A relative ``path`` is taken relative to the current directory when that names a file or a place inside
        the project, otherwise relative to the project root (RELION's convention: the project root is the
        working directory).
        """
        p = Path(path)
        if not p.is_absolute():
            here = Path(os.path.abspath(p))
            under_root = self.root / p
            if here.exists() or (not under_root.exists() and _is_inside(here, self.root)):
                p = here
            else:
                p = under_root
        return _relative_to_root(p, self.root)

    # -- jobs --
    def new_job(self, type_dir: str, process_label: str, alias: str | None = None,
                inputs: Iterable[tuple[str | os.PathLike | None, str]] = (),
                params: Mapping[str, object] | None = None, command: str | None = None,
                is_tomo: bool = False) -> Job:
        """A new job ``<type_dir>/jobNNN/`` (number from the project counter), to be used as a context manager.

        The folder is made and the process registered (status ``Running``) when the ``with`` block is entered.

        Args:
            type_dir: job-type directory, e.g. ``"Class2D"``.
            process_label: ``rlnPipeLineProcessTypeLabel`` (see :class:`ProcessLabel`).
            alias: optional alias; ``<type_dir>/<alias>`` becomes a symbolic link to the job folder.
            inputs: ``(file, node type label)`` pairs the job reads (None / empty files are skipped).
            params: job options for ``job.star`` (e.g. ``vars(args)``).
            command: the command line for ``note.txt`` (default: this process's ``sys.argv``).
            is_tomo: ``rlnJobIsTomo``.
        """
        _check_type_dir(type_dir)
        return Job(project=self, type_dir=type_dir, process_label=process_label, alias=alias, inputs=inputs,
                   params=params, command=command, is_tomo=is_tomo)

    def continue_job(self, name: str, params: Mapping[str, object] | None = None,
                     command: str | None = None) -> Job:
        """Re-open an existing job (``rlnJobIsContinue 1``): outputs and registered output nodes are kept.

        Args:
            name: process name, e.g. ``"Class2D/job007/"`` (or its alias).
            params: job options to write to ``job.star``; None keeps the stored options (only the
                continue flag is set).
            command: the command line appended to ``note.txt``.
        """
        p = self.read()
        proc = p.process(name) or p.process_by_alias(name)
        if proc is None:
            raise CryopipeError(f"{name}: no such job in {self.pipeline_path} (give an existing Type/jobNNN/)")
        type_dir = proc.name.rstrip("/").split("/")[0]
        return Job(project=self, type_dir=type_dir, process_label=proc.type_label, params=params, command=command,
                   name=proc.name, continuing=True)


def _check_type_dir(type_dir: str) -> None:
    if not type_dir or "/" in type_dir or type_dir in (".", "..") or any(c.isspace() for c in type_dir):
        raise CryopipeError(f"job type directory {type_dir!r} is not a plain directory name (e.g. Class2D)")


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _relative_to_root(path: str | os.PathLike, root: Path) -> str:
    p = Path(os.path.abspath(path))
    for a, b in ((p, root), (p.resolve(), root.resolve())):
        with contextlib.suppress(ValueError):
            return a.relative_to(b).as_posix()
    return p.as_posix()


def _default_command() -> str:
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name or argv[0]
    return shlex.join(argv)


def _validate_alias(alias: str, type_dir: str) -> str:
    a = alias.strip().rstrip("/")
    if a.startswith(type_dir + "/"):
        a = a[len(type_dir) + 1:]
    if not a or any(c in _ALIAS_FORBIDDEN for c in a) or a.startswith("job") or len(a) > 200:
        raise CryopipeError(f"alias {alias!r} is not allowed (use letters, digits, '-', '_' or '.', not "
                            "starting with 'job')")
    return f"{type_dir}/{a}/"


# ----------------------------------------------------------------------------------------------------------
# a job
# ----------------------------------------------------------------------------------------------------------

_RESUMABLE_RE = re.compile(r"_it(\d{3})_optimiser\.star$")


class Job:
    """One job folder: a context manager that runs the job's bookkeeping around its work.

    Entering: allocates/creates the folder, registers the process as ``Running`` with its input edges, writes
    ``job.star``, ``note.txt``, ``job_pipeline.star``, the alias link, removes stale exit markers, and tees
    stdout/stderr into ``run.out``/``run.err``. Leaving without an exception: checks that every declared
    output exists, registers them as output nodes, status ``Succeeded``, writes ``RELION_JOB_EXIT_SUCCESS``.
    Leaving with an exception: ``Failed`` + ``RELION_JOB_EXIT_FAILURE`` (``KeyboardInterrupt`` / RELION abort:
    ``Aborted`` + ``RELION_JOB_EXIT_ABORTED``); declared outputs are not registered; the exception propagates.

    Attributes (valid inside the ``with`` block):
        name: process name, e.g. ``"Class2D/job007/"`` (standalone: the output directory as given, with ``/``).
        dir: absolute path of the job folder.
        root: project root (standalone: the current directory at start), the base of :meth:`relpath`.
        project: the :class:`Project`, or None for a standalone output directory.
    """

    def __init__(self, *, project: Project | None, type_dir: str, process_label: str, alias: str | None = None,
                 inputs: Iterable[tuple[str | os.PathLike | None, str]] = (),
                 params: Mapping[str, object] | None = None, command: str | None = None,
                 is_tomo: bool = False, name: str | None = None, continuing: bool = False,
                 output_dir: str | os.PathLike | None = None):
        self.project = project
        self.type_dir = type_dir
        self.process_label = process_label
        self.alias_request = alias
        self.inputs = [(x, t) for x, t in inputs if x is not None and str(x) != ""]
        self.params = dict(params) if params is not None else None
        self.command = command if command is not None else _default_command()
        self.is_tomo = bool(is_tomo)
        self.is_continue = bool(continuing)
        self._requested_name = _dir_name(name) if name else None
        self._output_dir = output_dir
        self.alias: str | None = None
        self.name: str = ""
        self._dir: Path | None = None
        self.root: Path = project.root if project is not None else Path(os.path.abspath("."))
        self._outputs: list[tuple[str, str]] = []
        self._stack: contextlib.ExitStack | None = None
        self._lock: Path | None = None
        self._t0 = 0.0
        self._made_dir = False  # this run made the job folder (a new job): it may take it away again
        self._continuable = False  # the job wrote work that --continue can resume (see mark_continuable)
        self._made_alias: Path | None = None

    # -- paths --
    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("the job folder exists only inside `with job:`")
        return self._dir

    def path(self, *parts: str | os.PathLike) -> Path:
        """``dir / parts`` (absolute)."""
        return self.dir.joinpath(*parts)

    def relpath(self, path: str | os.PathLike) -> str:
        """``path`` relative to the project root (what RELION writes into STAR files, e.g. rlnImageName)."""
        return _relative_to_root(path, self.root)

    def _has_resumable_iteration(self) -> bool:
        """An optimiser job wrote an iteration after the initial one (``*_itNNN_optimiser.star``, NNN >= 1): work
        that ``--continue`` resumes, kept even by jobs that do not call :meth:`mark_continuable`."""
        return any(int(m.group(1)) >= 1 for f in self.dir.glob("*_it[0-9][0-9][0-9]_optimiser.star")
                   if (m := _RESUMABLE_RE.search(f.name)) is not None)

    def mark_continuable(self) -> None:
        """Say that the folder now holds work that ``--continue`` can resume (e.g. an iteration's files): a user
        error raised later no longer takes the new job away (it is marked failed and can be continued)."""
        self._continuable = True

    def add_output(self, path: str | os.PathLike, node_type: str) -> str:
        """Declare an output file of this job (registered as an output node only if the job succeeds).

        Args:
            path: a file inside the job folder: absolute, relative to the current directory, or relative to the
                job folder (``"particles.star"``).
            node_type: node type label (see :class:`NodeType`).

        Returns:
            the node name (project-relative, e.g. ``"Extract/job002/particles.star"``).
        """
        p = Path(path)
        cand = p if p.is_absolute() else Path(os.path.abspath(p))
        jd = self.dir.resolve()
        try:
            rel = cand.resolve().relative_to(jd)
        except ValueError:
            try:
                rel = (self.dir / p).resolve().relative_to(jd)
            except ValueError:
                raise CryopipeError(f"{path}: an output node must be a file inside the job folder {self.dir}") \
                    from None
        node = self.name + rel.as_posix()
        if not any(n == node for n, _ in self._outputs):
            self._outputs.append((node, node_type))
        return node

    @property
    def outputs(self) -> list[tuple[str, str]]:
        """Declared outputs ``(node name, type label)``."""
        return list(self._outputs)

    def check_abort(self) -> None:
        """Raise :class:`cryopipe.pipeline.log.JobAborted` if RELION's abort request file is present."""
        from cryopipe.pipeline.log import JobAborted

        if (self.dir / ABORT_REQUEST_FILE).exists():
            raise JobAborted(f"abort requested ({self.dir / ABORT_REQUEST_FILE} exists)")

    # -- set-up --
    def _node_file(self, node: str) -> Path:
        return Path(node) if os.path.isabs(node) else self.root / node

    def _start_in_project(self) -> None:
        assert self.project is not None
        proj = self.project
        with proj.edit(f"cryopipe: start job {self._requested_name or self.type_dir}") as pipe:
            if self.is_continue:
                proc = pipe.process(self._requested_name or "")
                if proc is None:
                    raise CryopipeError(f"{self._requested_name}: no such job in {proj.pipeline_path}")
                proc.status = Status.RUNNING
                self.name = proc.name
                self.alias = None if proc.alias == "None" else proc.alias
                self.process_label = proc.type_label
                self._dir = proj.root / self.name
                self._dir.mkdir(parents=True, exist_ok=True)
            else:
                alias = None
                if self.alias_request:  # check before making anything
                    alias = _validate_alias(self.alias_request, self.type_dir)
                    other = pipe.process_by_alias(alias)
                    if other is not None:
                        raise CryopipeError(f"alias {alias} is already used by {other.name} (choose another alias)")
                    link = proj.root / alias.rstrip("/")
                    if link.exists() or link.is_symlink():
                        raise CryopipeError(f"{link}: exists already, cannot use it as an alias (choose another)")
                if self._requested_name is not None:
                    if pipe.process(self._requested_name) is not None:
                        raise CryopipeError(
                            f"{self._requested_name}: this job already exists in {proj.pipeline_path} (add "
                            "--continue to continue it, or leave out --o to start a new job)")
                    self.name = self._requested_name
                    self._dir = proj.root / self.name
                    self._made_dir = not self._dir.exists()
                    self._dir.mkdir(parents=True, exist_ok=True)
                else:
                    n = pipe.job_counter
                    (proj.root / self.type_dir).mkdir(parents=True, exist_ok=True)
                    while True:
                        name = f"{self.type_dir}/job{n:03d}/"
                        try:
                            os.mkdir(proj.root / name)
                            break
                        except FileExistsError:  # a folder left by a crash or made by hand: skip the number
                            n += 1
                    self.name = name
                    self._dir = proj.root / name
                    self._made_dir = True
                self.alias = alias
                pipe.add_process(Process(name=self.name, type_label=self.process_label, status=Status.RUNNING,
                                         alias=alias or "None"))
                for path, node_type in self.inputs:
                    pipe.add_input_edge(proj.node_name(path), node_type, self.name)
                if alias:
                    # RELION's link: <Type>/<alias> -> ../<Type>/jobNNN/
                    os.symlink(f"../{self.name}", proj.root / alias.rstrip("/"))
                    self._made_alias = proj.root / alias.rstrip("/")
            self._write_job_pipeline(pipe)
        for node in pipe.inputs_of(self.name):
            self._touch_node_file(pipe, node)

    def _write_job_pipeline(self, pipe: Pipeline, final_status: str | None = None) -> None:
        """The job's mini-pipeline (RELION writes it with counter 2: one process added to an empty pipeline)."""
        proc = pipe.process(self.name)
        assert proc is not None
        mini = Pipeline(job_counter=2)
        mini.processes.append(Process(name=proc.name, type_label=proc.type_label,
                                      status=final_status or proc.status, alias=proc.alias))
        for node in pipe.inputs_of(self.name):
            mini.nodes[node] = pipe.nodes.get(node, "")
            mini.input_edges.append((node, self.name))
        for node in pipe.outputs_of(self.name):
            mini.nodes.setdefault(node, pipe.nodes.get(node, ""))
            mini.output_edges.append((self.name, node))
        write_pipeline(self.dir / "job_pipeline.star", mini)

    def _touch_node_file(self, pipe: Pipeline, node: str) -> None:
        """RELION's ``.Nodes/<top type>/<node>`` marker (used by its file browsers) for an existing file."""
        if os.path.isabs(node) or not (self.root / node).exists():
            return
        label = pipe.nodes.get(node, "")
        top = label.split(".")[0] if label else "Unknown"
        producer = pipe.process(pipe.producer(node) or "")
        shown = node
        if producer is not None and producer.alias != "None" and node.startswith(producer.name):
            shown = producer.alias + node[len(producer.name):]
        target = self.root / NODES_DIR / top / shown
        with contextlib.suppress(OSError):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()

    def _check_inputs(self) -> None:
        """Every input file exists (relative names: from the current directory or the project's), checked before
        a folder or a pipeline entry is made."""
        bases = [Path.cwd()] + ([self.project.root] if self.project is not None else [])
        for path, _ in self.inputs:
            p = Path(path)
            if not any((p if p.is_absolute() else base / p).exists() for base in bases):
                raise CryopipeError(f"{path}: input file not found (check the path; relative paths are relative "
                                    "to the project directory)")

    def __enter__(self) -> Job:
        self._check_inputs()
        self._t0 = time.monotonic()
        if self.project is not None:
            self._start_in_project()
        else:
            out = Path(os.path.abspath(self._output_dir if self._output_dir is not None else "."))
            self._made_dir = not out.exists() and not self.is_continue
            out.mkdir(parents=True, exist_ok=True)
            self._dir = out
            self.name = _dir_name(_relative_to_root(out, self.root))
        self._lock = acquire_job_lock(self.dir)  # refuses a second concurrent run in this folder (nothing touched)
        try:
            self._prepare_folder()
        except BaseException as exc:  # the process is registered: do not leave it "Running"
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _prepare_folder(self) -> None:
        d = self.dir
        for marker in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED, ABORT_REQUEST_FILE):
            with contextlib.suppress(FileNotFoundError):
                (d / marker).unlink()
        if self.params is not None or not (d / "job.star").exists():
            write_job_star(d / "job.star", self.process_label, self.params, self.is_continue, self.is_tomo)
        elif self.is_continue:  # keep the stored options, set the continue flag
            self._rewrite_continue_flag(d / "job.star")
        stamp = _dt.datetime.now().strftime("%a %b %d %H:%M:%S %Y")
        with open(d / "note.txt", "a", encoding="utf-8") as fh:
            verb = "Continuing job" if self.is_continue else "Executing new job"
            fh.write(f" ++++ {verb} on {stamp}\n ++++ with the following command(s): \n{self.command}\n ++++ \n")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(tee_output(d / "run.out", d / "run.err", job_dir=d))
        what = "continuing" if self.is_continue else "started"
        where = f" (alias {self.alias.rstrip('/')})" if self.alias else ""
        log(f"{self.name}{where} {what}: {self.command}")

    def _rewrite_continue_flag(self, path: Path) -> None:
        try:
            blocks = read_star(path)
        except Exception:
            write_job_star(path, self.process_label, {}, True, self.is_tomo)
            return
        vals = blocks.get("joboptions_values")
        params: dict[str, object] = {}
        if vals is not None and not isinstance(vals, Mapping) and len(vals):
            params = {str(k): ("" if v is None else str(v))
                      for k, v in zip(vals["rlnJobOptionVariable"], vals["rlnJobOptionValue"])}
        head = blocks.get("job") if isinstance(blocks.get("job"), Mapping) else {}
        is_tomo = bool(int(head.get("rlnJobIsTomo", int(self.is_tomo)))) if head else self.is_tomo
        write_job_star(path, self.process_label, params, True, is_tomo)

    # -- tear-down --
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        elapsed = time.monotonic() - self._t0
        status = Status.SUCCEEDED
        error: BaseException | None = exc
        if exc is None:
            missing = [n for n, _ in self._outputs if not self._node_file(n).exists()]
            if missing:
                error = CryopipeError(f"{missing[0]}: declared as an output of {self.name} but not written "
                                      "(job code error; the job is marked failed)")
                status = Status.FAILED
        elif isinstance(exc, KeyboardInterrupt):
            status = Status.ABORTED
        else:
            status = Status.FAILED
        try:
            if status == Status.SUCCEEDED:
                log(f"{self.name} finished successfully in {elapsed:.1f} s")
            else:
                self._log_error(status, error)
        finally:
            if self._stack is not None:
                self._stack.close()
                self._stack = None
        if (status == Status.FAILED and isinstance(exc, CryopipeError) and self._made_dir and not self.is_continue
                and not self._continuable and not self._has_resumable_iteration()):
            self._discard()  # user error in a new job: nothing is left behind, the one-line error says why
            return False
        marker = {Status.SUCCEEDED: EXIT_SUCCESS, Status.FAILED: EXIT_FAILURE, Status.ABORTED: EXIT_ABORTED}[status]
        try:
            if self.project is not None:
                self._finish_in_project(status)
        except BaseException:
            (self.dir / EXIT_FAILURE).touch()
            release_job_lock(self._lock)
            raise
        (self.dir / marker).touch()
        release_job_lock(self._lock)
        self._lock = None
        if exc is None and error is not None:
            raise error
        return False

    def _discard(self) -> None:
        """Take away a new job that failed with a user error (:class:`cryopipe.errors.CryopipeError`): its pipeline
        entry, its alias link and the folder this run made (nothing else: a folder that existed before is never
        removed). The error itself is what the user gets to see."""
        try:
            if self.project is not None:
                with self.project.edit(f"cryopipe: job {self.name} failed with a user error, removed") as pipe:
                    pipe.remove_process(self.name)
                if self._made_alias is not None and self._made_alias.is_symlink():
                    self._made_alias.unlink()
        finally:
            release_job_lock(self._lock)
            self._lock = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def _log_error(self, status: str, error: BaseException | None) -> None:
        """Say why on the terminal (one line) and put the details into run.err only."""
        if status == Status.ABORTED:
            text = f"{self.name} aborted" + (f": {error}" if error and str(error) else "")
        else:
            text = f"{self.name} FAILED: {error}"
        log(text)
        if error is not None:
            if isinstance(error, CryopipeError):
                detail = f"ERROR: {error}\n"
            else:
                detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            log_file_only(detail, stderr=True)

    def _finish_in_project(self, status: str) -> None:
        assert self.project is not None
        with self.project.edit(f"cryopipe: job {self.name} {status}") as pipe:
            proc = pipe.process(self.name)
            if proc is None:  # removed from the pipeline meanwhile (e.g. deleted in the GUI): add it back
                proc = Process(name=self.name, type_label=self.process_label, status=status,
                               alias=self.alias or "None")
                pipe.processes.append(proc)
            proc.status = status
            if status == Status.SUCCEEDED:
                for node, node_type in self._outputs:
                    pipe.add_output_edge(self.name, node, node_type)
            self._write_job_pipeline(pipe)
        if status == Status.SUCCEEDED:
            for node in pipe.outputs_of(self.name):
                self._touch_node_file(pipe, node)


# ----------------------------------------------------------------------------------------------------------
# the --o rule
# ----------------------------------------------------------------------------------------------------------

def _project_job_target(output_arg: str | os.PathLike, here: Path) -> tuple[Path, str] | None:
    """(project root, process name) when ``output_arg`` is a ``Type/jobNNN/`` of a project (rule 2)."""
    o = Path(output_arg)
    full = Path(os.path.abspath(o if o.is_absolute() else here / o))
    if _JOB_RE.fullmatch(full.name) and full.parent != full.parent.parent:
        root = full.parent.parent
        if (root / PIPELINE_FILE).is_file() or root == here:
            return root, _dir_name(full.relative_to(root).as_posix())
    return None


def output_root(output_arg: str | os.PathLike | None, cwd: str | os.PathLike | None = None) -> Path:
    """The directory that relative file names in a job's STAR files refer to, by the ``--o`` rule.

    The project root for rules 1 and 2 (no ``--o``, or ``--o <root>/<Type>/jobNNN/``), the current directory
    for a plain output directory (rule 3). Jobs call it before :func:`open_job_dir` to check their inputs
    before any folder is made.
    """
    here = Path(os.path.abspath(cwd if cwd is not None else "."))
    if output_arg is None or str(output_arg).strip() == "":
        return here
    target = _project_job_target(output_arg, here)
    return target[0] if target is not None else here


#: file that marks a job folder in use by a running job (process id and host inside)
JOB_LOCK = ".cryopipe_running"


def _process_alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_job_lock(folder: Path) -> Path:
    """Create ``folder/JOB_LOCK`` for this process; a one-line error if a live process holds it (a lock left by a
    process that is gone, or by this process, is taken over). Returns the lock's path."""
    lock = Path(folder) / JOB_LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid_text, host = lock.read_text().split()[:2]
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host = -1, ""
            if pid > 0 and pid != os.getpid() and _process_alive(pid, host):
                raise CryopipeError(f"{folder}: another cryopipe job (process {pid} on {host}) is running in this "
                                    f"folder; wait for it to finish or choose another --o (if it is gone, delete "
                                    f"{lock})") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        return lock
    raise CryopipeError(f"{folder}: could not take the job lock {lock}")


def release_job_lock(lock: Path | None) -> None:
    """Remove a lock made by :func:`acquire_job_lock` (if it is still ours)."""
    if lock is None:
        return
    with contextlib.suppress(OSError, ValueError, IndexError):
        if int(lock.read_text().split()[0]) == os.getpid():
            lock.unlink()


def open_job_dir(output_arg: str | os.PathLike | None, type_dir: str, process_label: str, *,
                 alias: str | None = None, inputs: Iterable[tuple[str | os.PathLike | None, str]] = (),
                 params: Mapping[str, object] | None = None, command: str | None = None,
                 continue_job: bool = False, is_tomo: bool = False,
                 cwd: str | os.PathLike | None = None) -> Job:
    """The job folder for a job's ``main`` according to the ``--o`` rule of this module's docstring.

    Args:
        output_arg: the ``--o`` value (None or ``""``: new job in the project in ``cwd``).
        type_dir, process_label, alias, inputs, params, command, is_tomo: as :meth:`Project.new_job`.
        continue_job: continue the job named by ``--o`` (``--continue``).
        cwd: directory that counts as "current" (default ``os.getcwd()``).

    Returns:
        a :class:`Job` to be used as ``with open_job_dir(...) as job:``.
    """
    here = Path(os.path.abspath(cwd if cwd is not None else "."))
    if output_arg is None or str(output_arg).strip() == "":
        if continue_job:
            raise CryopipeError("--continue needs --o Type/jobNNN/ (the job to continue)")
        return Project(here).new_job(type_dir, process_label, alias=alias, inputs=inputs, params=params,
                                     command=command, is_tomo=is_tomo)
    target = _project_job_target(output_arg, here)
    if target is not None:
        root, name = target
        proj = Project(root)
        job_type_dir = name.rstrip("/").split("/")[-2]
        exists = proj.read().process(name) is not None
        if continue_job:
            if not exists:
                raise CryopipeError(f"{name}: cannot continue, it is not in {proj.pipeline_path} "
                                    "(leave out --continue to start it)")
            return Job(project=proj, type_dir=job_type_dir, process_label=process_label, params=params,
                       command=command, is_tomo=is_tomo, name=name, continuing=True)
        if exists:
            raise CryopipeError(f"{name}: this job already exists in {proj.pipeline_path} (add --continue "
                                "to continue it, or leave out --o to start a new job)")
        _check_type_dir(job_type_dir)
        return Job(project=proj, type_dir=job_type_dir, process_label=process_label, alias=alias,
                   inputs=inputs, params=params, command=command, is_tomo=is_tomo, name=name)
    full = Path(os.path.abspath(Path(output_arg) if Path(output_arg).is_absolute() else here / output_arg))
    if not continue_job and (full / EXIT_SUCCESS).is_file():
        raise CryopipeError(f"{output_arg}: a finished job is already there ({EXIT_SUCCESS}); add --continue to "
                            "continue it, or give another --o (nothing was overwritten)")
    if alias:
        raise CryopipeError(f"--alias needs a project job (--o Type/jobNNN/ or no --o); {output_arg} is a plain "
                            "output directory")
    job = Job(project=None, type_dir=type_dir, process_label=process_label, inputs=inputs, params=params,
              command=command, is_tomo=is_tomo, continuing=continue_job, output_dir=full)
    job.root = here
    return job
