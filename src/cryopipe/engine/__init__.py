"""The shared likelihood engine of 2D classification, 3D initial model (gradient mode) and 3D refinement.

Layers (each a module; all tensors, batched, device-agnostic):

* :mod:`~cryopipe.engine.coefficients` — ``CoefficientSet``: an image's half-complex Fourier coefficients up to
  the current radius as one flat vector (sorted by ``|k|``, so lower resolutions are prefixes).
* :mod:`~cryopipe.engine.batch` — ``prepare_batch``: images → ``BatchData`` (norm correction, shift by the current
  origin, particle mask, ``FT/n²``, CTF, ``1/σ²``).
* :mod:`~cryopipe.engine.estep` — ``expectation``: squared differences as GEMMs over (image × translation) ×
  (class × orientation), posterior weights with class/orientation and offset priors, significance pruning,
  coarse-to-fine adaptive oversampling, and the additive M-step sums ``S = Σ w·C·X/σ²``, ``W = Σ w·C²/σ²`` per
  sample plus noise / norm / scale / offset / class statistics.
  A reference model plugs in through a ``PredictionSource`` (``coarse()`` / ``fine(k, r)``: predicted
  ``FT/n²`` images for every class and orientation sample) and consumes the per-sample sums: 2D rotates them
  back into the class frames (:mod:`~cryopipe.engine.reference2d`), 3D back-projects them
  (:class:`cryopipe.core.backprojector.BackProjector`).
* :mod:`~cryopipe.engine.mstep` — RELION's regularised update, SSNR/τ²/σ² spectra, resolution bookkeeping;
  :mod:`~cryopipe.engine.vdam` — the gradient (VDAM) update and its schedules;
  :mod:`~cryopipe.engine.accuracy` — expected angular/translational accuracies.
* :mod:`~cryopipe.engine.sampling` — in-plane angles, translations, oversampling;
  :mod:`~cryopipe.engine.classify2d` — the 2D optimiser; :mod:`~cryopipe.engine.relion_files` — model.star,
  optimiser.star, sampling.star.

Units: FT values are divided by the number of pixels (RELION's normalisation); spectra are per real/imaginary
component; offsets in pixels internally (Å in files); angles in degrees.
"""
