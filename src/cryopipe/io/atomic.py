"""Atomic file output: write to a temporary file next to the target, rename onto it on success.

Usage::

    with atomic_path("out/map.mrc") as tmp:
        write_something(tmp)          # tmp is a Path in the same directory as the target
    # out/map.mrc now exists (os.replace, atomic on POSIX); on an exception the temp file is removed
    # and any previous out/map.mrc is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms / file systems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the same directory as ``path``; rename it onto ``path`` on success.

    The temporary name keeps the suffix of ``path`` (e.g. ``.mrcs``), so libraries that decide the format
    from the extension behave the same. The parent directory must exist. If the block raises, the temp file
    is deleted and ``path`` is left as it was. The yielded path does not exist yet (create it); if the block
    creates nothing, nothing is renamed.

    Args:
        path: final destination.
        fsync: flush the data (and the directory entry) to disk before/after the rename.
    """
    target = Path(path)
    directory = target.parent
    # A unique name that does not exist yet (libraries such as mrcfile.new refuse to overwrite a file).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if tmp.exists():
            if fsync:
                _fsync_file(tmp)
            os.replace(tmp, target)
            if fsync:
                _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
