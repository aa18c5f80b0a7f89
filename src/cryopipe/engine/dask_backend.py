"""Dask distributed backend (issue 15 item 2): the chunks of an iteration as Dask tasks.

Imported only when ``--dask`` is given (needs ``pip install cryopipe[dask]``). The static inputs (particle set:
image *paths*, CTF parameters, groups) are scattered to every worker once per run, the model snapshot once per
iteration; each task gets a few hundred bytes of particle indices and per-particle state and reads its images
itself from shared storage. Results come back in submission order and the caller adds them in that order, so a
run gives the same sums (up to float summation order) whatever the number of workers and chunks. A worker that
dies has its tasks re-run elsewhere by the scheduler (Dask's own fault tolerance); a task that raises is retried
``retries`` times.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from cryopipe.errors import CryopipeError

__all__ = ["DaskBackend", "worker_device_name", "local_gpu_count"]


#: environment of local worker processes: one BLAS/OpenMP thread each (Dask's default), glibc malloc untouched
_WORKER_ENVIRON = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


def worker_device_name(index: int, n_gpus: int) -> str:
    """The device of local worker ``index`` (0-based) on a machine with ``n_gpus`` GPUs: ``cuda:(index mod
    n_gpus)`` (workers beyond the GPU count share GPUs round-robin), ``cpu`` without GPUs."""
    return f"cuda:{int(index) % int(n_gpus)}" if int(n_gpus) > 0 else "cpu"


def local_gpu_count() -> int:
    """GPUs this process sees (``CUDA_VISIBLE_DEVICES`` applies); 0 without CUDA."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


class _PinDevice:
    """Worker plugin of a ``local:N`` cluster: worker ``i`` (LocalCluster names its workers 0..N-1) computes on
    :func:`worker_device_name` ``(i, n_gpus)``, kept on the worker as ``_cryopipe_device``."""

    name = "cryopipe-pin-device"

    def __init__(self, n_gpus: int):
        self.n_gpus = int(n_gpus)

    def setup(self, worker) -> None:
        try:
            index = int(worker.name)
        except (TypeError, ValueError):
            return  # not a LocalCluster worker: no pinning
        worker._cryopipe_device = worker_device_name(index, self.n_gpus)


def _worker_device():
    """The device a worker computes on: ``$CRYOPIPE_WORKER_DEVICE``, else the device its ``local:N`` cluster
    pinned it to (:func:`worker_device_name`), else CUDA when the worker sees a GPU (pin one GPU per worker job with
    ``CUDA_VISIBLE_DEVICES``, e.g. dask-jobqueue's ``--gres=gpu:1`` or dask-cuda's ``LocalCUDACluster``), else
    CPU."""
    import torch

    name = os.environ.get("CRYOPIPE_WORKER_DEVICE")
    if name:
        return torch.device(name)
    try:
        from distributed import get_worker

        pinned = getattr(get_worker(), "_cryopipe_device", None)
    except (ImportError, ValueError):
        pinned = None
    if pinned:
        return torch.device(pinned)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _run_task(fn: Callable, static, snapshot, item, threads: int | None, kwargs: dict):
    """One chunk on a worker: set the worker's torch threads once, run ``fn`` on the worker's device and return
    its result with every tensor on the CPU."""
    import torch

    from cryopipe.engine.class2d_step import to_device

    if threads:
        try:
            from distributed import get_worker

            w = get_worker()
            if not getattr(w, "_cryopipe_threads", None):
                torch.set_num_threads(int(threads))
                w._cryopipe_threads = int(threads)
        except (ImportError, ValueError):
            pass
    out = fn(static, snapshot, item, device=_worker_device(), **kwargs)
    return to_device(out, torch.device("cpu"))


class DaskBackend:
    """Runs the chunks of each iteration on a Dask cluster.

    Args:
        spec: ``local:N`` (a loopback ``LocalCluster`` of N worker processes with one thread each),
            ``local:N:threads`` (N worker threads in this process: no pickling, for tests), or a scheduler
            address (``tcp://host:8786``) / ``scheduler.json`` file of a running cluster (e.g. dask-jobqueue).
        batches_per_worker: chunks per worker and iteration (more: better balance, more scheduler round trips).
        retries: re-runs of a task that raised.
        timeout: how long to try reaching (or re-reaching, after a lost connection) an existing scheduler;
            default: Dask's ``distributed.comm.timeouts.connect`` (30 s; ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT``).
        gpus: ``local:N`` only: GPUs to pin the workers to, worker ``i`` on ``cuda:(i mod gpus)``
            (:func:`worker_device_name`); default: the GPUs this process sees (:func:`local_gpu_count`); 0: CPU.
    """

    distributed = True

    def __init__(self, spec: str, batches_per_worker: int = 1, retries: int = 2, timeout: str | None = None,
                 gpus: int | None = None):
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise CryopipeError("--dask needs Dask distributed: pip install 'cryopipe[dask]' "
                                "(or bash run.sh setup)") from e
        if timeout is None:
            timeout = dask.config.get("distributed.comm.timeouts.connect", "30s")
        self.spec = spec
        self.batches_per_worker = max(1, int(batches_per_worker))
        self.retries = int(retries)
        self._cluster = None
        self.threads: int | None = None
        self.gpus = 0  # GPUs the workers of a local:N cluster are pinned to
        if spec.startswith("local:"):
            parts = spec.split(":")
            try:
                n = int(parts[1])
            except ValueError:
                raise CryopipeError(f"--dask {spec}: expected local:N with N workers, e.g. local:2") from None
            processes = not (len(parts) > 2 and parts[2] == "threads")
            where = {"host": "127.0.0.1"} if processes else {}  # threads: in-process transport, no sockets
            # Dask's default MALLOC_TRIM_THRESHOLD_ for worker processes turns off glibc's adaptive mmap threshold:
            # every large temporary of the E-step is then a fresh mmap (page faults), ~1.6x slower here
            with dask.config.set({"distributed.nanny.pre-spawn-environ": _WORKER_ENVIRON}):
                self._cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=processes,
                                             dashboard_address=":0", silence_logs=logging.ERROR, **where)
            self.client = Client(self._cluster)
            if processes:
                self.threads = 1
            self.gpus = local_gpu_count() if gpus is None else int(gpus)
            if self.gpus > 0:
                self.client.register_plugin(_as_worker_plugin(_PinDevice(self.gpus)))
        else:
            try:
                if spec.endswith(".json"):
                    self.client = Client(scheduler_file=spec, timeout=timeout)
                else:
                    self.client = Client(spec, timeout=timeout)
            except (OSError, TimeoutError) as e:
                raise CryopipeError(f"--dask {spec}: cannot reach the Dask scheduler ({e})") from None
        self._static = None
        self._static_future = None

    @property
    def n_workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def n_chunks(self, batches_hint: int) -> int:
        return self.n_workers * self.batches_per_worker

    def map(self, fn: Callable, static, snapshot, items: Sequence, **kwargs) -> list:
        """``[fn(static, snapshot, item) for item in items]`` on the workers, in the items' order."""
        c = self.client
        try:
            if self._static is not static:
                self._static_future = c.scatter(static, broadcast=True, hash=False)
                self._static = static
            snap = c.scatter(snapshot, broadcast=True, hash=False)
            futs = [c.submit(_run_task, fn, self._static_future, snap, item, self.threads, kwargs, pure=False,
                             retries=self.retries) for item in items]
            out = c.gather(futs)
        except CryopipeError:
            raise  # a user error raised by a task: as it is
        except Exception as e:
            if not self._scheduler_lost(e):
                raise
            raise CryopipeError(f"--dask {self.spec}: lost the Dask scheduler ({type(e).__name__}: {e}); the files "
                                "written so far are intact: rerun with --continue (class2d, refine3d: --continue "
                                "from the last iteration's _optimiser.star)") from None
        del futs, snap
        return out

    def _scheduler_lost(self, e: Exception) -> bool:
        """Whether ``e`` (raised while scattering or gathering) means the scheduler is gone: a closed connection,
        a connection timeout, a closed connection pool, futures cancelled because the connection was lost, the
        scheduler's own complaint that its workers went away in the middle of a broadcast scatter
        (:data:`_WORKERS_GONE_MESSAGES`), or a client that is no longer running (Dask gave up reconnecting). A
        task's own error (e.g. a missing file: an OSError raised on a worker) is not."""
        from distributed.comm.core import CommClosedError
        from distributed.utils import CancelledError

        if isinstance(e, (CommClosedError, ConnectionError, TimeoutError, CancelledError)):
            return True
        if "ConnectionPool" in str(e) or "trying to connect" in str(e):
            return True
        if any(text in str(e) for text in _WORKERS_GONE_MESSAGES):
            return True
        return getattr(self.client, "status", "running") != "running"

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def describe(self) -> str:
        pinned = f", pinned round-robin to {self.gpus} GPU(s)" if self.gpus else ""
        return f"Dask {self.spec} ({self.n_workers} workers, {self.batches_per_worker} chunk(s) per worker{pinned})"


#: what the scheduler answers a broadcast scatter whose workers are retired while it runs (its scheduler is being
#: shut down): ``replicate`` sees fewer workers than copies (a ValueError), or none at all
_WORKERS_GONE_MESSAGES = ("Can not use replicate to delete data", "No valid workers found")


def _as_worker_plugin(plugin):
    """``plugin`` as a ``distributed.WorkerPlugin`` (what ``Client.register_plugin`` dispatches on)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class Plugin(WorkerPlugin):
        name = plugin.name

        def setup(self, worker):
            plugin.setup(worker)

    return Plugin()
