"""Terminal + ``run.out`` logging and progress bars shared by every job.

While a :class:`cryopipe.pipeline.project.Job` is open, ``sys.stdout`` and ``sys.stderr`` are *teed*: whatever the
job prints goes to the terminal **and** is appended to the job's ``run.out`` / ``run.err`` (as RELION does with
``>> run.out 2>> run.err``). Outside a job the helpers simply print to the terminal.

* :func:`log` – one timestamped line, e.g. ``[2025-01-31 14:02:07] Class2D: iteration 3/25``, on stdout
  (so terminal + ``run.out``).
* :func:`warn` – the same on stderr (terminal + ``run.err``).

Both go through the standard logger ``logging.getLogger("cryopipe")`` (:data:`LOGGER`; INFO for :func:`log`,
WARNING for :func:`warn`). Its handler (:class:`StdStreamHandler`, installed once, ``propagate`` off so that a
root handler does not print every line twice) writes each record to the *current* ``sys.stdout`` /
``sys.stderr``, so inside a job the lines reach ``run.out`` / ``run.err`` as before. A notebook or script can
quieten cryopipe (``LOGGER.setLevel(logging.WARNING)``), or send its messages elsewhere (remove the handler,
add its own, or set ``LOGGER.propagate = True``).
* :func:`progress` – wraps an iterable: a tqdm bar on the **real terminal only** (never into ``run.out``: no
  carriage-return spam), plus a bounded number of plain progress lines written to ``run.out``: one per item
  for short loops (≤ 50 items, e.g. EM iterations), otherwise one per ~10 %. When stderr is not a terminal (a
  batch job), there is no bar and the progress lines also go to the terminal stream.
  It also honours RELION's abort request: if the open job's directory contains ``RELION_JOB_ABORT_NOW`` (what
  the RELION GUI's *Abort* button creates), :class:`JobAborted` is raised (checked at most once per second).

The only state kept here is the tee installed by :func:`tee_output` (a context manager that restores the
original streams on exit) and the list of bars currently drawn (so that :func:`log` lines do not break them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TypeVar

__all__ = ["log", "log_file_only", "warn", "progress", "tee_output", "terminal_stream", "JobAborted", "ABORT_REQUEST_FILE",
           "LOGGER", "StdStreamHandler"]

T = TypeVar("T")

#: File that RELION's GUI creates in a job directory to ask the running program to stop.
ABORT_REQUEST_FILE = "RELION_JOB_ABORT_NOW"


class JobAborted(KeyboardInterrupt):
    """Raised inside a job when RELION's abort request file appears (treated like Ctrl-C: status *Aborted*)."""


#: progress bars currently drawn by :func:`progress` (cleared/redrawn around :func:`log` lines).
_BARS: list = []


def _timestamp(when: float | None = None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


#: the package's logger: every :func:`log` / :func:`warn` line is a record of it
LOGGER = logging.getLogger("cryopipe")


class StdStreamHandler(logging.Handler):
    """Writes ``cryopipe`` records as the jobs always printed them: ``[YYYY-mm-dd HH:MM:SS] line`` per line on the
    current ``sys.stdout`` (below WARNING), ``[…] WARNING: message`` on the current ``sys.stderr`` (WARNING and
    above, with the level's name); the streams are looked up per record, so a job's tee gets them, and drawn
    progress bars are cleared and redrawn around each line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            stamp = _timestamp(record.created)
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"[{stamp}] {record.levelname}: {msg}\n"
            else:
                stream = sys.stdout
                text = "".join(f"[{stamp}] {line}\n" for line in msg.splitlines() or [""])
            for b in _BARS:  # keep progress bars intact: clear, print the line, redraw
                b.clear()
            stream.write(text)
            with contextlib.suppress(Exception):
                stream.flush()
            for b in _BARS:
                b.refresh()
        except Exception:  # a logging call must never kill a job
            self.handleError(record)


def _install_handler() -> None:
    """Give :data:`LOGGER` its stream handler once (INFO level unless the user set one)."""
    if not any(isinstance(h, StdStreamHandler) for h in LOGGER.handlers):
        LOGGER.addHandler(StdStreamHandler())
        LOGGER.propagate = False
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)


_install_handler()


class _Tee:
    """A text stream that writes to a terminal stream and appends to a log file.

    Writes to the terminal never raise (a closed pipe must not kill a job); the file is flushed after every
    write so that ``tail -f run.out`` follows the job.
    """

    def __init__(self, terminal: IO[str], log_file: IO[str], job_dir: Path | None):
        self.terminal = terminal
        self.log_file = log_file
        self.job_dir = job_dir
        self._lock = threading.Lock()

    # -- the io.TextIOBase subset that print(), warnings and traceback use --
    def write(self, text: str) -> int:
        with self._lock:
            with contextlib.suppress(Exception):
                self.terminal.write(text)
            if not self.log_file.closed:
                self.log_file.write(text)
                self.log_file.flush()
        return len(text)

    def write_file_only(self, text: str) -> None:
        with self._lock:
            if not self.log_file.closed:
                self.log_file.write(text)
                self.log_file.flush()

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self.terminal.flush()
        if not self.log_file.closed:
            self.log_file.flush()

    def isatty(self) -> bool:
        return False  # output also goes to a file: libraries should not draw interactive bars on it

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.terminal, "encoding", "utf-8") or "utf-8"

    @property
    def errors(self) -> str | None:
        return getattr(self.terminal, "errors", None)

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False


def terminal_stream(stream: IO[str] | None = None) -> IO[str]:
    """The real terminal stream under any tees (``sys.stderr`` by default)."""
    s = sys.stderr if stream is None else stream
    while isinstance(s, _Tee):
        s = s.terminal
    return s


def _active_tee(stream: IO[str]) -> _Tee | None:
    return stream if isinstance(stream, _Tee) else None


@contextlib.contextmanager
def tee_output(out_path: str | os.PathLike, err_path: str | os.PathLike,
               job_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Within the block, ``sys.stdout``/``sys.stderr`` also append to ``out_path``/``err_path``.

    Args:
        out_path, err_path: log files (appended, as RELION does; created if missing).
        job_dir: the job directory, used by :func:`progress` to look for RELION's abort request.
    """
    jd = Path(job_dir) if job_dir is not None else None
    old_out, old_err = sys.stdout, sys.stderr
    with open(out_path, "a", encoding="utf-8") as fo, open(err_path, "a", encoding="utf-8") as fe:
        sys.stdout = _Tee(old_out, fo, jd)
        sys.stderr = _Tee(old_err, fe, jd)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            sys.stdout, sys.stderr = old_out, old_err


def log(msg: str, *, file_only: bool = False) -> None:
    """Print ``[YYYY-mm-dd HH:MM:SS] msg`` on stdout (terminal and, inside a job, ``run.out``): an INFO record of
    :data:`LOGGER`.

    Args:
        msg: the message (may contain newlines; each line gets the timestamp).
        file_only: inside a job, write only to ``run.out`` (used for progress lines while a bar is drawn).
            Outside a job this prints nothing.
    """
    if file_only:
        tee = _active_tee(sys.stdout)
        if tee is not None:
            stamp = _timestamp()
            tee.write_file_only("".join(f"[{stamp}] {line}\n" for line in str(msg).splitlines() or [""]))
        return
    LOGGER.info("%s", msg)


def log_file_only(text: str, *, stderr: bool = False) -> None:
    """Append raw ``text`` to the open job's ``run.out`` (``run.err`` with ``stderr=True``) only.

    Outside a job nothing is written.
    """
    tee = _active_tee(sys.stderr if stderr else sys.stdout)
    if tee is not None:
        tee.write_file_only(text)


def warn(msg: str) -> None:
    """Print ``[timestamp] WARNING: msg`` on stderr (terminal and, inside a job, ``run.err``): a WARNING record
    of :data:`LOGGER`."""
    LOGGER.warning("%s", msg)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _check_abort(job_dir: Path | None) -> None:
    if job_dir is not None and (job_dir / ABORT_REQUEST_FILE).exists():
        raise JobAborted(f"abort requested ({job_dir / ABORT_REQUEST_FILE} exists)")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", every: int | None = None,
             bar: bool | None = None) -> Iterator[T]:
    """Iterate with a terminal progress bar and a few progress lines in ``run.out``.

    Args:
        iterable: what to iterate over.
        total: number of items (default ``len(iterable)`` when defined).
        desc: short label, e.g. ``"extracting"``.
        every: write a progress line every ``every`` items (default: every item if ``total <= 50``, else
            about every 10 %; with unknown total every 100 items).
        bar: force the tqdm bar on/off (default: on when the real stderr is a terminal).

    Yields:
        the items of ``iterable``.

    Raises:
        JobAborted: when the open job's directory holds ``RELION_JOB_ABORT_NOW``.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if every is None:
        if total is None:
            every = 100
        else:
            every = 1 if total <= 50 else max(1, math.ceil(total / 10))
    term = terminal_stream()
    if bar is None:
        bar = bool(getattr(term, "isatty", lambda: False)())
    tee_out = _active_tee(sys.stdout)
    job_dir = tee_out.job_dir if tee_out is not None else None
    label = f"{desc}: " if desc else ""

    pbar = None
    if bar:
        from tqdm import tqdm  # imported lazily: only needed with a terminal

        pbar = tqdm(total=total, desc=desc or None, file=term, leave=not _BARS, dynamic_ncols=True, mininterval=0.5)
        _BARS.append(pbar)

    def line(done: int, elapsed: float) -> None:
        if total:
            eta = elapsed / done * (total - done) if done else float("nan")
            eta_s = _fmt_seconds(eta) if math.isfinite(eta) else "?"
            text = f"{label}{done}/{total} ({100.0 * done / total:.0f}%) elapsed {_fmt_seconds(elapsed)}, " \
                   f"ETA {eta_s}"
        else:
            text = f"{label}{done} done, elapsed {_fmt_seconds(elapsed)}"
        # With a bar on the terminal, the lines go to run.out only; without one (batch), to both.
        log(text, file_only=pbar is not None)

    t0 = time.monotonic()
    last_abort_check = t0
    done = 0
    logged = 0
    try:
        _check_abort(job_dir)
        for item in iterable:
            yield item
            done += 1
            if pbar is not None:
                pbar.update(1)
            now = time.monotonic()
            if done % every == 0 or (total is not None and done == total):
                line(done, now - t0)
                logged = done
            if job_dir is not None and now - last_abort_check >= 1.0:
                last_abort_check = now
                _check_abort(job_dir)
        if done != logged:
            line(done, time.monotonic() - t0)
    finally:
        if pbar is not None:
            with contextlib.suppress(ValueError):
                _BARS.remove(pbar)
            pbar.close()
