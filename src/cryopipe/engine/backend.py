"""Where the chunks of an iteration run (issue 15 item 2): in this process (default) or on Dask workers.

A backend maps a pure step ``fn(static, snapshot, item) -> partial`` over a list of items and returns the partials
**in the items' order**, so the caller reduces them in a fixed order (deterministic sums). ``static`` is what does
not change during a run (the particle set: file paths, CTF parameters, groups; sent to each worker once),
``snapshot`` what changes once per iteration (the model; sent once per iteration), the items are small
per-chunk inputs (particle indices and their current per-particle state).

:func:`make_backend` reads the ``--dask`` option; ``None`` / ``""`` gives :class:`InProcess` and imports nothing
(Dask is only imported when asked for: ``pip install cryopipe[dask]``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

__all__ = ["CachedSnapshot", "InProcess", "add_dask_arguments", "job_backend", "make_backend", "split_chunks"]


class CachedSnapshot:
    """Mixin of the per-iteration snapshots sent to workers: objects built from the snapshot on a worker (e.g. its
    references on a device) are kept in ``self._cache`` under a lock; neither travels when the snapshot is
    pickled. The dataclass using it declares ``_cache: dict`` and ``_lock: threading.Lock`` fields."""

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"] = {}
        d.pop("_lock", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def cached(self, key, build: Callable):
        """``build()`` once per ``key`` for this snapshot (thread-safe)."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]


def split_chunks(idx: np.ndarray, n_chunks: int, batch_size: int) -> list[np.ndarray]:
    """Split ``idx [N]`` (kept in order) into at most ``n_chunks`` contiguous pieces of whole batches of
    ``batch_size`` (the last piece may end with a partial batch); no empty pieces."""
    idx = np.asarray(idx)
    bs = max(1, int(batch_size))
    n_batches = -(-idx.size // bs)
    n_chunks = max(1, min(int(n_chunks), n_batches))
    per = -(-n_batches // n_chunks)
    return [idx[i * per * bs:(i + 1) * per * bs] for i in range(n_chunks) if idx[i * per * bs:(i + 1) * per * bs].size]


class InProcess:
    """Runs the items one after another in this process (no copies: the objects are passed as they are)."""

    n_workers = 1
    distributed = False

    def n_chunks(self, batches_hint: int) -> int:
        """Chunks per iteration: in-process, one per batch (so progress and memory stay per batch)."""
        return max(1, int(batches_hint))

    def map(self, fn: Callable, static, snapshot, items: Sequence, **kwargs) -> list:
        return [fn(static, snapshot, item, **kwargs) for item in items]

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "in-process"


def make_backend(spec: str | None, batches_per_worker: int = 1, gpus: int | None = None):
    """The backend for a ``--dask`` value: None/""/"none" → :class:`InProcess`; ``local:N`` → a loopback
    ``LocalCluster`` with N single-threaded worker processes (``local:N:threads`` for threads in this process),
    worker ``i`` pinned to ``cuda:(i mod G)`` on a machine with G GPUs (``gpus``: G instead of the GPUs this process
    sees; 0: CPU workers); ``tcp://host:port`` (or any scheduler address, or ``scheduler.json`` path) → that
    scheduler."""
    if spec is None or str(spec).strip().lower() in ("", "none", "0", "off"):
        return InProcess()
    from cryopipe.engine.dask_backend import DaskBackend

    return DaskBackend(str(spec), batches_per_worker=batches_per_worker, gpus=gpus)


def add_dask_arguments(parser) -> None:
    """The ``--dask`` options of a job's command line (argparse)."""
    parser.add_argument("--dask", default=None, metavar="SPEC",
                        help="run the batches on Dask workers: local:N (N worker processes on this machine), "
                             "tcp://host:port or scheduler.json (a running cluster, e.g. dask-jobqueue); "
                             "default: in-process (needs the optional extra cryopipe[dask])")
    parser.add_argument("--dask_batches_per_worker", type=int, default=1,
                        help="chunks per worker and iteration with --dask (results do not depend on it)")


@contextmanager
def job_backend(args, log=print, what: str = "E-step") -> Iterator:
    """The backend of a job's ``--dask`` / ``--dask_batches_per_worker`` options for the duration of a ``with``
    block (announced in the log as "<what> on <backend>" when distributed; closed at the end)."""
    backend = make_backend(getattr(args, "dask", None), getattr(args, "dask_batches_per_worker", 1))
    try:
        if backend.distributed:
            log(f"{what} on {backend.describe()}")
        yield backend
    finally:
        backend.close()
