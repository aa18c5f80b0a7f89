"""Tomographic particles as E-step inputs: a particle's tilt images (RELION 5's 2D stacks) become ONE coefficient
vector with 3D frequencies, so that :func:`cryopipe.engine.estep.expectation` scores them unchanged.

Per particle ``b`` of one tilt series (``F`` tilts with rotations ``R_f``, the particle frame's tilt-``f``
projection; see :func:`cryopipe.engine.coefficients.stack_coefficient_set`):

* the images are the particle's tilt images cut at its projected position, **premultiplied** by
  ``c_bf = −CTF_bf·W_bf`` (CTF with the depth-dependent defocus, dose weight ``W``; what ``subtomo --stack2d``
  writes: real-space crops of the premultiplied images, so not exactly ``c·I`` where ``c`` is small; plain
  images are premultiplied by the caller, ``ft·c``);
* RELION's premultiplied model (``ml_optimiser.cpp`` with ``ctf_premultiplied``), one path for every stack:
  ``X = c·I`` against ``c²·V̂(Aᵀk₃)·e^{−2πi k₃·t/n}`` with the noise ``σ²`` of the premultiplied images
  (``C = c²``, ``1/σ²``: no division by ``c²``, which would blow up the cropped data's residuals near CTF
  zeros); the M-step sums are RELION's ``Σ w·X/σ²`` with weight ``Σ w·c²/σ²`` (``BatchData.inv_sigma2_sums``
  ``= 1/(σ²c²)``; coefficients with ``c = 0`` add nothing);
* tilts in which the particle is not visible get ``C = 0`` and ``1/σ² = 0``;
* the particle's current 3D origin ``o_b`` (pixels, in the frame the rotations ``R_f`` refer to) is applied as
  the phase ``e^{−2πi k₃·o_b/n}`` (the images are translated by ``+o_b``, as
  :func:`cryopipe.engine.batch.prepare_batch` does in 2D), so translations are searched around it.

The DC coefficient of every tilt is left out of the posterior (``1/σ² = 0`` at shell 0), as for single images.
"""

from __future__ import annotations

import math

import torch

from cryopipe.engine.coefficients import CoefficientSet
from cryopipe.engine.batch import batch_from_coefficients
from cryopipe.engine.estep import BatchData

__all__ = ["prepare_stack_batch"]


def prepare_stack_batch(
    ft: torch.Tensor,
    c: torch.Tensor,
    visible: torch.Tensor,
    stack: CoefficientSet,
    n_coeffs: int,
    sigma2: torch.Tensor,
    *,
    origins: torch.Tensor | None = None,
    prior_centre: torch.Tensor | None = None,
    log_prior_orient: torch.Tensor | None = None,
    n_classes: int = 1,
) -> BatchData:
    """E-step inputs for ``B`` particles of one tilt series (see module docstring).

    Args:
        ft: ``[B, F, n, n//2+1]`` complex centred FTs of the particles' premultiplied tilt images (not yet
            divided by ``n²``).
        c: ``[B, F, n, n//2+1]`` real ``−CTF·W`` of every tilt image (0 where a frequency is dropped).
        visible: ``[B, F]`` bool, tilts in which the particle is seen.
        stack: the stack coefficient set of this tilt series (``n_images = F``); the iteration uses its first
            ``n_coeffs`` coefficients.
        sigma2: ``[n//2+1]`` noise spectrum (per real/imaginary component, RELION units).
        origins: ``[B, 3]`` current 3D origins (pixels); the images are translated by ``+origin``.
        prior_centre: ``[B, K, 3]`` offset-prior centres relative to the origins (default zeros).
        log_prior_orient: ``[B or 1, K, Rc]`` (default zeros ``[1, K, 1]``).
    """
    dev = ft.device
    B, F, n, _ = ft.shape
    coeffs = stack.gather(ft / float(n * n))  # [B, Pfull]
    cc = stack.gather(c.to(dev, torch.float64))
    seen = visible.to(dev)[:, stack.flat // (n * (n // 2 + 1))]  # [B, Pfull] the coefficient's tilt is visible
    if origins is not None:
        phase = (-2.0 * math.pi / n) * (origins.to(dev, torch.float64) @ stack.k.to(dev, torch.float64).T)
        coeffs = coeffs * torch.polar(torch.ones_like(phase), phase).to(coeffs.dtype)
    shell = stack.shell.to(dev)
    s2 = sigma2.to(dev, torch.float64)[shell][None, :].expand(B, -1)
    usable = seen & (s2 > 0) & (shell > 0)[None, :]
    zero = torch.zeros((), dtype=s2.dtype, device=dev)
    C = torch.where(usable, cc * cc, zero)
    inv = torch.where(usable, 1.0 / s2.clamp_min(1e-300), zero)
    # (float32 in the E-step: coefficients with c² or σ²·c² below 1e-30 add nothing, instead of 0·inf)
    inv_sums = torch.where((C > 1e-30) & (s2 * C > 1e-30), 1.0 / (s2 * C).clamp_min(1e-30), zero)
    X = torch.where(usable, coeffs, torch.zeros((), dtype=coeffs.dtype, device=dev))
    return batch_from_coefficients(X, C, inv, s2, usable, shell, n_coeffs, sigma2.shape[0],
                                   torch.zeros(B, dtype=torch.long, device=dev), prior_centre, log_prior_orient,
                                   n_classes, 3, inv_sigma2_sums=inv_sums[:, :n_coeffs].to(torch.float32).contiguous())
