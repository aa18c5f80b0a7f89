"""Multi-particle refinement (as Warp's M): particle poses, per-tilt shifts, image warp, stage angles and CTF
refined against the particles' own half-maps by L-BFGS on autograd gradients (tilt series).

Modules: :mod:`~cryopipe.mpr.parameters` (parameter groups and units), :mod:`~cryopipe.mpr.forward`
(differentiable forward model and score), :mod:`~cryopipe.mpr.optimise` (L-BFGS per tilt series, batches of
pairs), :mod:`~cryopipe.mpr.reconstruct` (half-maps at refined parameters), :mod:`~cryopipe.mpr.driver`
(stages, sub-iterations, FSC before/after, refined metadata).
"""
