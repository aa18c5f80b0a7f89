"""Peak memory of the batches of a tomographic refinement, for the run log (issue 12: "state peak memory per
batch in the log").

On CUDA the peak is ``torch.cuda.max_memory_allocated`` since the start of the batch (the counter is reset before
each batch's inputs are read), i.e. what one batch of particles needs on the GPU. On the CPU it is the process'
resident-set peak (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), which the operating system cannot reset: it is
the high-water mark of the run so far, an upper bound of a batch's memory (data set streamed, so it does not grow
with the number of particles).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["reset_batch_peak", "batch_peak_bytes", "BatchMemory"]


def reset_batch_peak(device: torch.device) -> None:
    """Start a new peak measurement on ``device`` (CUDA only; the CPU peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def batch_peak_bytes(device: torch.device) -> int:
    """Peak memory in bytes since :func:`reset_batch_peak` (CUDA: allocated tensors) or of the process (CPU: RSS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports kB, macOS bytes


class BatchMemory:
    """The largest per-batch peak of an iteration: :meth:`start` before a batch, :meth:`stop` after it,
    :meth:`line` for the log, :meth:`new_iteration` to start over."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak = 0
        self.batches = 0

    def new_iteration(self) -> None:
        self.peak, self.batches = 0, 0

    def start(self) -> None:
        reset_batch_peak(self.device)

    def stop(self) -> None:
        self.peak = max(self.peak, batch_peak_bytes(self.device))
        self.batches += 1

    def line(self) -> str:
        what = "CUDA max_memory_allocated" if self.device.type == "cuda" else "process peak RSS (ru_maxrss)"
        return f"peak memory per batch: {self.peak / 2 ** 20:.1f} MiB ({what}; {self.batches} batches)"
