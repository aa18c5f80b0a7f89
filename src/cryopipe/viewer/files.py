"""Reading a project's files for the viewer: fast partial STAR reads, a stat-keyed cache, name resolution.

Everything here only *reads*. The viewer answers many small requests (a page polls every few seconds), so:

* :func:`read_star_blocks` reads only the named blocks of a STAR file and stops at the first block it does not
  need after having them all (a ``run_it025_model.star`` of a 3D refinement holds megabytes of per-class
  spectra and orientation pdfs after the few lines of ``data_model_general`` the iteration curves need).
* :class:`StatCache` keeps parsed results keyed by ``(path, mtime_ns, size)``: a file that changed (a running
  job writing its next iteration) is read again, an unchanged one never.
* :func:`resolve_name` finds a file named inside a STAR file: relative to the project root (RELION's rule), else
  relative to the folder of the STAR file (a run made in its own folder, like the RELION fixtures), else with
  leading folders dropped (``AutoPick/Micrographs/x.star`` listed by a job that was moved into
  ``AutoPick/job004/``).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from cryopipe.io.star import is_string_label

__all__ = ["read_star_blocks", "StatCache", "resolve_name", "file_key", "is_inside", "star_has_block",
           "to_number", "loop_column"]

T = TypeVar("T")

_TOKEN_RE = re.compile(r'"([^"]*)"|\'([^\']*)\'|(\S+)')
_INT_RE = re.compile(r"[+-]?\d+\Z")


def to_number(token: str) -> Any:
    """``"12"`` -> 12, ``"1.5e3"`` -> 1500.0, ``"inf"`` -> inf, anything else unchanged (a string)."""
    if _INT_RE.match(token) and not (len(token.lstrip("+-")) > 1 and token.lstrip("+-")[0] == "0"):
        return int(token)
    try:
        return float(token)
    except ValueError:
        return token


def _tokens(line: str) -> list[str]:
    if '"' not in line and "'" not in line:
        return line.split()
    return [next(g for g in m.groups() if g is not None) for m in _TOKEN_RE.finditer(line)]


def _value(label: str, token: str) -> Any:
    return token if is_string_label(label) else to_number(token)


def read_star_blocks(path: str | os.PathLike, wanted: Iterable[str] | None = None,
                     max_rows: int | None = None) -> dict[str, Any]:
    """Read some data blocks of a STAR file (plain Python values, no pandas).

    Args:
        path: the STAR file.
        wanted: block names without ``data_`` (``""`` is the unnamed block); None reads every block.
        max_rows: keep at most this many rows of a loop (None: all).

    Returns:
        ``{name: block}`` where a key-value block is ``dict[label, value]`` and a loop is
        ``{"columns": [labels], "rows": [[values], ...]}``; labels without the leading ``_``, numbers converted
        (:func:`to_number`) except in name / file columns. Blocks not found (or empty) are absent. Reading stops
        at the first ``data_`` line after every wanted block has been read. Rows with the wrong number of
        fields are skipped.
    """
    want = None if wanted is None else set(wanted)
    out: dict[str, Any] = {}
    current: str | None = None
    mode: str | None = None  # None | "kv" | "head" | "loop"
    columns: list[str] = []
    rows: list[list[Any]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for raw in fh:
            s = raw.strip()
            if not s or s[0] == "#":
                continue
            if s.startswith("data_"):
                if want is not None and want.issubset(out):
                    break
                name = s[5:].split()[0] if len(s) > 5 else ""
                current = name if want is None or name in want else None
                mode = None
                continue
            if current is None:
                continue
            if s.startswith("loop_"):
                columns, rows = [], []
                out[current] = {"columns": columns, "rows": rows}
                mode = "head"
                continue
            if s[0] == "_" and mode in (None, "kv", "head"):
                if mode == "head":
                    columns.append(s.split()[0][1:])
                    continue
                mode = "kv"
                parts = _tokens(s)
                if len(parts) >= 2:
                    label = parts[0][1:]
                    out.setdefault(current, {})[label] = _value(label, parts[1])
                continue
            if mode in ("head", "loop"):
                mode = "loop"
                if max_rows is not None and len(rows) >= max_rows:
                    continue
                vals = _tokens(s)
                if len(vals) == len(columns):
                    rows.append([_value(c, v) for c, v in zip(columns, vals)])
    return out


def loop_column(block: Any, label: str) -> list[Any] | None:
    """One column of a loop returned by :func:`read_star_blocks` (None if the block or column is missing)."""
    if not isinstance(block, dict) or "columns" not in block or label not in block["columns"]:
        return None
    i = block["columns"].index(label)
    return [r[i] for r in block["rows"]]


def star_has_block(path: str | os.PathLike, name: str, head_bytes: int = 4096) -> bool:
    """Whether ``data_<name>`` appears among the first ``head_bytes`` of a file (cheap file-type sniffing)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(head_bytes)
    except OSError:
        return False
    return re.search(rb"(?m)^\s*data_" + re.escape(name.encode()) + rb"\s*$", head) is not None


def file_key(path: str | os.PathLike) -> tuple[str, int, int] | None:
    """``(path, mtime_ns, size)``, or None for a file that does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.fspath(path), st.st_mtime_ns, st.st_size)


class StatCache:
    """A thread-safe LRU of results computed from files, invalidated when a file's mtime or size changes.

    Args:
        max_entries: entries kept (least recently used dropped first).
    """

    def __init__(self, max_entries: int = 4096):
        self.max_entries = int(max_entries)
        self._data: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: str, paths: str | os.PathLike | Iterable[str | os.PathLike], compute: Callable[[], T],
            extra: tuple = ()) -> T:
        """The cached ``compute()`` for ``kind`` of ``paths`` (one path or several), recomputed when any of the
        files changed (or appeared / disappeared)."""
        plist = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        key = (kind, tuple(os.fspath(p) for p in plist), extra)
        stamp = tuple(file_key(p) for p in plist)
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and hit[0] == stamp:
                self._data.move_to_end(key)
                return hit[1]
        value = compute()
        with self._lock:
            self._data[key] = (stamp, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return value


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` lies lexically inside ``root`` (after normalising ``..``; symbolic links not followed, so a
    project's linked micrograph folders still count as inside)."""
    p = os.path.normpath(os.path.abspath(path))
    r = os.path.normpath(os.path.abspath(root))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def resolve_name(name: str, root: Path, star_dir: Path | None = None) -> Path | None:
    """The file a name inside a STAR file refers to, or None.

    Tried in turn: ``root/name`` (RELION: names are relative to the project directory), ``star_dir/name``, then
    ``star_dir`` + ``name`` without its first 1, 2 … folders. Absolute names are taken as they are.
    """
    name = name.strip()
    if not name:
        return None
    p = Path(name)
    if p.is_absolute():
        return p if p.exists() else None
    cands = [root / p]
    if star_dir is not None:
        cands.append(star_dir / p)
        parts = p.parts
        cands.extend(star_dir.joinpath(*parts[i:]) for i in range(1, len(parts)))
    for c in cands:
        if c.exists():
            return c
    return None
