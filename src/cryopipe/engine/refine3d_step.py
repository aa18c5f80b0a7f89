"""The unit of work of a 3D iteration (refine3d, initialmodel) as a pure function (issue 15).

``refine3d_chunk(optimiser, snapshot, item)`` runs the E-step of the particles ``item.index`` (one half-set or
pseudo-half, ``item.group``) in batches against the frozen model of a :class:`Refine3DSnapshot`, and returns a
:class:`Refine3DPartial`: the chunk's back-projector grids (additive), its :class:`~cryopipe.engine.stream.
ParticleSums` (additive) and the chunk's new per-particle poses. It reads the images itself through the particle
set's ``load`` (file paths), changes nothing it is given (it works on a shallow copy of the optimiser with the
snapshot's model and sampling, and on a :class:`ChunkState` made from the item's own rows: O(chunk), not O(N), so
a re-run task starts again from the same poses), and its random numbers come from per-particle seeds, so the sums
over a union of chunks equal the sum of the chunks' sums whatever the chunking (up to float summation order).
The main process writes each chunk's returned poses into its state (:meth:`PoseRecords.apply`).

The optimiser may be a single-particle :class:`~cryopipe.engine.optimiser3d.Optimiser3D` or a tomographic one
(:class:`~cryopipe.engine.tomo_optimiser.SubtomoOptimiser3D`, ``StackOptimiser3D``): a chunk only calls the
optimiser's own E-step methods, so what a subclass overrides (its data, coefficient sets, batches) runs on the
worker as it does in-process.
:meth:`cryopipe.engine.optimiser3d.Optimiser3D.iterate` sends these chunks to a Dask backend and reduces them in
chunk order; in-process it runs the same batch loop (:meth:`~cryopipe.engine.optimiser3d.Optimiser3D.
_estep_batches`) directly.

The optimiser is sent to each worker once per run (its pickled form leaves out the model, state and backend:
``Optimiser3D.__getstate__``); the snapshot once per iteration; the items are index arrays with their rows' poses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from cryopipe.engine.backend import CachedSnapshot

__all__ = ["Refine3DSnapshot", "Refine3DItem", "PoseRecords", "ChunkState", "Refine3DPartial", "refine3d_chunk"]

_POSE_FIELDS = ("angles", "origin", "klass", "pmax", "nsig", "loglik", "norm")


@dataclass
class Refine3DSnapshot(CachedSnapshot):
    """The frozen model of one iteration: ``iteration`` (1-based; enters the per-particle seeds), ``model``
    (:class:`~cryopipe.engine.optimiser3d.Model3D`), the ``sampling`` and whether this is the ``final`` iteration
    (the particles' poses travel with the items)."""

    iteration: int
    model: object
    sampling: object
    final: bool
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def worker(self, optimiser, device: torch.device | None = None) -> tuple[object, object]:
        """``(copy of optimiser bound to this snapshot and moved to device, its iteration set-up)``, built once
        per snapshot, optimiser object and device (a worker builds the references for its first chunk only)."""
        def build():
            w = _shallow_copy(optimiser)
            if device is not None and torch.device(device) != w.dev:
                _move(w, torch.device(device))
            w.model, w.sampling, w.iteration = self.model, self.sampling, self.iteration
            w.progress = None
            return w, w._iteration_setup(self.final)
        return self.cached((id(optimiser), str(device)), build)


def _shallow_copy(obj):
    """A shallow copy that keeps every attribute (``copy.copy`` would go through the optimiser's
    ``__getstate__``, which leaves out the model and state for pickling)."""
    out = object.__new__(type(obj))
    out.__dict__.update(obj.__dict__)
    return out


def _move(optimiser, device: torch.device) -> None:
    """Rebind an optimiser copy's device-bound members to ``device``: its tensors and coefficient sets (masks,
    shell counts, the full set), per-device caches (``_``-dicts, e.g. a stack optimiser's per-tilt-series sets)
    emptied, a batch-memory meter made anew."""
    from cryopipe.engine.class2d_step import to_device
    from cryopipe.engine.coefficients import CoefficientSet

    for name, value in list(vars(optimiser).items()):
        if isinstance(value, (torch.Tensor, CoefficientSet)):
            setattr(optimiser, name, to_device(value, device))
        elif isinstance(value, dict) and name.startswith("_"):
            setattr(optimiser, name, {})
    if getattr(optimiser, "memory", None) is not None:
        optimiser.memory = type(optimiser.memory)(device)
    optimiser.dev = device


@dataclass
class PoseRecords:
    """Per-particle results of a chunk (rows ``index``): the :class:`~cryopipe.engine.optimiser3d.
    ParticleState3D` fields ``angles [B, 3]``, ``origin [B, D]``, ``klass``, ``pmax``, ``nsig``, ``loglik``,
    ``norm`` (``values`` maps each field to its rows)."""

    index: np.ndarray
    values: dict

    @classmethod
    def take(cls, state, index: np.ndarray) -> PoseRecords:
        return cls(index.copy(), {f: np.array(getattr(state, f)[index]) for f in _POSE_FIELDS})

    def apply(self, state) -> None:
        """Write the records into ``state`` (the main process's)."""
        for f, v in self.values.items():
            getattr(state, f)[self.index] = v


class _Rows:
    """One field of a :class:`ChunkState`: ``values`` of the chunk's rows, read and written by global row."""

    def __init__(self, values: np.ndarray, state: ChunkState):
        self.values, self._state = values, state

    def __getitem__(self, idx):
        return self.values[self._state.local(idx)]

    def __setitem__(self, idx, value) -> None:
        self.values[self._state.local(idx)] = value


class ChunkState:
    """The particle state of one chunk's rows only (O(chunk)), indexed like the whole
    :class:`~cryopipe.engine.optimiser3d.ParticleState3D` by 0-based global rows (``state.angles[idx]``, what
    the E-step reads and writes); its fields are copies of ``start``'s, so the chunk changes nothing it is given.
    Indexing a row outside the chunk raises IndexError."""

    def __init__(self, start: PoseRecords):
        self.index = np.asarray(start.index)
        self._order = np.argsort(self.index, kind="stable")
        self._sorted = self.index[self._order]
        for f, v in start.values.items():
            setattr(self, f, _Rows(np.array(v), self))

    def local(self, idx) -> np.ndarray:
        """Positions in the chunk of the global rows ``idx``."""
        idx = np.asarray(idx)
        pos = np.searchsorted(self._sorted, idx)
        inside = pos < self._sorted.size
        if not (inside.all() and np.array_equal(self._sorted[pos], idx)):
            raise IndexError("particle rows outside this chunk")
        return self._order[pos]

    def records(self) -> PoseRecords:
        return PoseRecords(self.index, {f: getattr(self, f).values for f in _POSE_FIELDS})


@dataclass
class Refine3DItem:
    """One chunk: ``group`` (index of the half-set / pseudo-half), ``index [B]`` (0-based particle rows, in
    batch order) and ``start``: those rows' poses at the start of the iteration (:class:`PoseRecords`)."""

    group: int
    index: np.ndarray
    start: PoseRecords


@dataclass
class Refine3DPartial:
    """What a chunk returns: ``group``, the back-projector grids ``data`` / ``weight`` ``[K, ...]``, the particle
    ``sums``, the pose ``records`` and the number of (orientation × class × translation) samples evaluated."""

    group: int
    data: torch.Tensor
    weight: torch.Tensor
    sums: object
    records: PoseRecords
    n_samples: float


def refine3d_chunk(optimiser, snap: Refine3DSnapshot, item: Refine3DItem,
                   device: torch.device | str | None = None) -> Refine3DPartial:
    """E-step of ``item`` against ``snap`` (module docstring) on ``device`` (default: the optimiser's); the
    returned tensors live there."""
    from cryopipe.engine.reference3d import ClassBackProjectors
    from cryopipe.engine.stream import ParticleSums

    base, setup = snap.worker(optimiser, None if device is None else torch.device(device))
    w = _shallow_copy(base)
    w.state = ChunkState(item.start)  # this chunk's poses are written here, then returned
    s, m, p, n = w.s, w.model, w.p, w.n
    K = m.n_classes
    bp_rmax = n // 2 if s.grad else setup.r_cur
    bps = ClassBackProjectors(K, n, s.pad, r_max=bp_rmax, device=w.dev)
    sums = ParticleSums.zeros(K, p.n_optics_groups, m.n_shells, p.n_groups, w.dev)
    index = np.asarray(item.index)
    n_samples = w._estep_batches(setup, w._model_index(item.group), index, bps, sums)
    data, weight = bps.sums()
    return Refine3DPartial(int(item.group), data, weight, sums, w.state.records(), n_samples)
