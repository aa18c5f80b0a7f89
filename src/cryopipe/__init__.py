"""cryopipe: cryo-EM and cryo-ET processing with RELION-compatible files and PyTorch compute.

Layout (data flows top to bottom):

* :mod:`cryopipe.io`        STAR (RELION 3.0 / 3.1+), MRC/MRCS, optics groups
* :mod:`cryopipe.core`      geometry, CTF, Fourier ops, projector/back-projector, FSC, masks, symmetry
* :mod:`cryopipe.engine`    the shared likelihood / gradient optimiser
* :mod:`cryopipe.sim`       ground-truth simulator (atomic model -> maps, particles, micrographs)
* :mod:`cryopipe.jobs`      one module per job type
* :mod:`cryopipe.pipeline`  job folders and ``default_pipeline.star``
* :mod:`cryopipe.cli`       the ``cryopipe`` command line
* :mod:`cryopipe.api`       the Python API (arrays in, arrays out)

The main functions are importable from the package (``from cryopipe import reconstruct, fsc``); each is loaded
on first use, so ``import cryopipe`` does not import torch. Messages go to ``logging.getLogger("cryopipe")``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it (imported lazily by __getattr__)
_EXPORTS = {
    # arrays in, arrays out
    "project": "cryopipe.api", "reconstruct": "cryopipe.api", "fsc": "cryopipe.api", "resolution": "cryopipe.api",
    "lowpass": "cryopipe.api", "ctf": "cryopipe.api", "pick_log": "cryopipe.api", "postprocess": "cryopipe.api",
    # files in, files out: the functions the jobs run
    "reconstruct_particles": "cryopipe.jobs.reconstruct", "classify_2d": "cryopipe.jobs.class2d",
    "refine_3d": "cryopipe.jobs.refine3d", "run_postprocess": "cryopipe.jobs.postprocess",
    # readers and writers
    "read_mrc": "cryopipe.io.mrc", "write_mrc": "cryopipe.io.mrc", "read_star": "cryopipe.io.star",
    "write_star": "cryopipe.io.star", "read_particles": "cryopipe.io.particles",
    "write_particles": "cryopipe.io.particles",
    "CryopipeError": "cryopipe.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cryopipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
