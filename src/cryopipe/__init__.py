"""cryopipe: cryo-EM and cryo-ET processing with RELION-compatible files and PyTorch compute.

Layout (data flows top to bottom):

* :mod:`cryopipe.io`        STAR (RELION 3.0 / 3.1+), MRC/MRCS, optics groups
* :mod:`cryopipe.core`      geometry, CTF, Fourier ops, projector/back-projector, FSC, masks, symmetry
* :mod:`cryopipe.engine`    the shared likelihood / gradient optimiser
* :mod:`cryopipe.sim`       ground-truth simulator (atomic model -> maps, particles, micrographs)
* :mod:`cryopipe.jobs`      one module per job type
* :mod:`cryopipe.pipeline`  job folders and ``default_pipeline.star``
* :mod:`cryopipe.cli`       the ``cryopipe`` command line
"""

__version__ = "0.1.0"
