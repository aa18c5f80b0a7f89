"""Tilt-series operations: particle images cut from tilt series, tomograms, pseudo-subtomograms, particle
reconstruction. Functions take tensors and :mod:`cryopipe.io.tomography` objects; jobs live in
:mod:`cryopipe.jobs`."""
