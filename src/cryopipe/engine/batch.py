"""Turning a batch of particle images into E-step inputs (:class:`~cryopipe.engine.estep.BatchData`).

Per image (RELION's ``getFourierTransformsAndCtfs``, re-derived and batched):

1. multiply by the norm-correction factor ``avg_norm / norm_b`` (``--norm``);
2. translate by the image's current origin (``+o_b``, exact phase shift), so the particle sits at the box centre
   and translations are searched around its current position;
3. mask with a soft circle of the particle diameter: zeros outside (``--zero_mask``) or, otherwise, white noise of
   the image's own background standard deviation (RELION fills with noise of the current noise spectrum);
4. centred FT divided by ``n²`` (RELION's normalisation), reduced to the iteration's coefficient set;
5. CTF (times the group scale) and ``1/σ²(shell)`` of the image's optics group per coefficient (DC excluded);
   the power beyond the set per shell (noise spectrum at shells not in the E-step, norm correction) and its
   ``½Σ|X|²/σ²`` (log-likelihood) are kept.

The masked image is used everywhere (E-step, class sums, noise spectrum, norm correction), so the noise model is
consistent with the data the likelihood sees (RELION's noise spectra show the same mask attenuation).
"""

from __future__ import annotations

import math

import torch

from cryopipe.core.fourier import irfft2_centered, phase_shift_2d, rfft2_centered
from cryopipe.engine.coefficients import CoefficientSet
from cryopipe.engine.estep import BatchData
from cryopipe.engine.seeds import particle_normal

__all__ = ["mask_images", "prepare_batch", "batch_from_coefficients"]


def mask_images(images: torch.Tensor, mask: torch.Tensor, zero_mask: bool = True,
                generator: torch.Generator | None = None, noise_seeds=None) -> torch.Tensor:
    """Apply a soft mask ``[n, n]`` (1 inside, 0 outside) to images ``[B, n, n]``.

    ``zero_mask``: ``x·mask``; otherwise the outside is filled with white Gaussian noise of each image's standard
    deviation where ``mask == 0`` (``x·mask + noise·(1 − mask)``). The noise of image ``b`` comes from
    ``noise_seeds[b]`` (``[B] uint64``, :func:`cryopipe.engine.seeds.particle_seeds`: independent of the batch it
    is in) when given, else from ``generator`` (or torch's global generator).
    """
    if zero_mask:
        return images * mask
    bg = mask <= 0
    if int(bg.sum()) < 2:
        return images * mask
    vals = images[:, bg]
    sd = vals.std(dim=1, keepdim=True)[:, :, None]
    mean = vals.mean(dim=1, keepdim=True)[:, :, None]
    if noise_seeds is not None:
        noise = particle_normal(noise_seeds, tuple(images.shape[1:]), images.device, images.dtype)
    else:
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
    return images * mask + (mean + sd * noise) * (1.0 - mask)


def batch_from_coefficients(X: torch.Tensor, ctf: torch.Tensor, inv_sigma2: torch.Tensor, noise_var: torch.Tensor,
                            scored: torch.Tensor, shell: torch.Tensor, n_coeffs: int, n_shells: int,
                            optics_group: torch.Tensor, prior_centre: torch.Tensor | None,
                            log_prior_orient: torch.Tensor | None, n_classes: int, offset_dim: int,
                            **extra) -> BatchData:
    """The :class:`BatchData` of prepared coefficients, for every kind of particle (images, tilt stacks,
    pseudo-subtomograms): the first ``n_coeffs`` enter the E-step, the rest only the sums beyond the set.

    Args:
        X: ``[B, P_full]`` complex coefficients (masked / translated / zeroed where unusable, as the data type needs).
        ctf: ``[B, >= n_coeffs]`` the factor the predictions are multiplied by (CTF, or ``Σc²`` for subtomograms).
        inv_sigma2: ``[B, P_full]`` ``1/σ²`` of each coefficient as it enters the E-step (0: not used).
        noise_var: ``[B, >= n_coeffs]`` that variance, for the log-likelihood normalisation ``Σ log(2πσ²)`` over
            the ``scored`` ``[B, >= n_coeffs]`` coefficients.
        shell: ``[P_full]`` shell of each coefficient; ``n_shells``: length of the noise spectra.
        optics_group: ``[B]`` long; ``prior_centre`` ``[B, K, offset_dim]`` and ``log_prior_orient`` (default
            zeros); ``extra``: further :class:`BatchData` fields (``allowed_class``, ``X_nomask``).
    """
    dev = X.device
    B = X.shape[0]
    outside = X[:, n_coeffs:]
    pow_out = (outside.real.square() + outside.imag.square()).to(torch.float64)
    power_outside = torch.zeros(B, n_shells, device=dev, dtype=torch.float64)
    sh_out = shell[n_coeffs:]
    keep = sh_out < n_shells
    power_outside.index_add_(1, sh_out[keep], pow_out[:, keep])
    xi2_outside = 0.5 * (pow_out * inv_sigma2[:, n_coeffs:]).sum(dim=1)
    var = noise_var[:, :n_coeffs]
    logsigma2 = torch.where(scored[:, :n_coeffs], torch.log(2.0 * math.pi * var.clamp_min(1e-300)),
                            torch.zeros((), dtype=var.dtype, device=dev)).sum(dim=1)
    if prior_centre is None:
        prior_centre = torch.zeros(B, n_classes, offset_dim, device=dev)
    if log_prior_orient is None:
        log_prior_orient = torch.zeros(1, n_classes, 1, device=dev)
    return BatchData(
        X=X[:, :n_coeffs].to(torch.complex64).contiguous(),
        ctf=ctf[:, :n_coeffs].to(torch.float32).contiguous(),
        inv_sigma2=inv_sigma2[:, :n_coeffs].to(torch.float32).contiguous(),
        optics_group=optics_group,
        prior_centre=prior_centre.to(dev, torch.float32),
        log_prior_orient=log_prior_orient.to(dev, torch.float32),
        xi2_outside=xi2_outside.to(torch.float32),
        logsigma2=logsigma2.to(torch.float32),
        power_outside=power_outside,
        **extra,
    )


def prepare_batch(
    images: torch.Tensor,
    full: CoefficientSet,
    n_coeffs: int,
    sigma2: torch.Tensor,
    optics_group: torch.Tensor,
    *,
    origins: torch.Tensor | None = None,
    norm_factor: torch.Tensor | None = None,
    ctf: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    zero_mask: bool = True,
    prior_centre: torch.Tensor | None = None,
    log_prior_orient: torch.Tensor | None = None,
    n_classes: int = 1,
    allowed_class: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    keep_unmasked: bool = False,
    noise_seeds=None,
) -> BatchData:
    """E-step inputs for images ``[B, n, n]`` (see module docstring).

    Args:
        full: coefficient set of the whole image (``r_max = n//2``); the iteration uses its first ``n_coeffs``.
        sigma2: ``[G, n//2+1]`` noise spectra (RELION units, per real/imaginary component).
        optics_group: ``[B]`` 0-based.
        origins: ``[B, 2]`` current origins (pixels); the images are shifted by ``+origin``.
        norm_factor: ``[B]`` multiplicative intensity correction.
        ctf: ``[B, n, n//2+1]`` CTF (already including any group scale); None: 1.
        mask: ``[n, n]`` soft particle mask (None: no masking).
        prior_centre: ``[B, K, 2]`` offset-prior centres relative to the current origins (default zeros).
        log_prior_orient: ``[B or 1, K, Rc]`` (default zeros ``[1, K, 1]``).
        noise_seeds: ``[B] uint64`` per-image seeds of the background noise fill (``zero_mask=False``); None:
            ``generator``.
        keep_unmasked: also keep the unmasked (shifted, norm-corrected) coefficients as ``X_nomask`` (the
            reference sums are then taken from them, as RELION's back-projection).
    """
    dev = images.device
    B, n, _ = images.shape
    img = images.to(torch.float32)
    if norm_factor is not None:
        img = img * norm_factor.to(dev, torch.float32)[:, None, None]
    ft = rfft2_centered(img)
    if origins is not None:
        ft = phase_shift_2d(ft, origins.to(dev, torch.float32), n)
    X_nomask = None
    if keep_unmasked and mask is not None:
        X_nomask = full.gather(ft / float(n * n))[:, :n_coeffs].to(torch.complex64)
    if mask is not None:
        img = irfft2_centered(ft, n)
        img = mask_images(img, mask.to(dev, torch.float32), zero_mask, generator, noise_seeds)
        ft = rfft2_centered(img)
    ft = ft / float(n * n)
    coeffs = full.gather(ft)  # [B, Pfull]
    og = optics_group.to(dev).long()
    shell = full.shell.to(dev)
    s2 = sigma2.to(dev, torch.float64)[og][:, shell]  # [B, Pfull]
    inv = torch.where(s2 > 0, 1.0 / s2.clamp_min(1e-300), torch.zeros((), dtype=s2.dtype, device=dev))
    if ctf is None:
        c = torch.ones(B, n_coeffs, device=dev, dtype=torch.float32)
    else:
        c = full.gather(ctf.to(dev, torch.float32))[:, :n_coeffs]
    scored = (shell > 0)[None, :] & (s2 > 0)
    return batch_from_coefficients(coeffs, c, inv, s2, scored, shell, n_coeffs, sigma2.shape[1], og, prior_centre,
                                   log_prior_orient, n_classes, 2,
                                   allowed_class=None if allowed_class is None else allowed_class.to(dev).long(),
                                   X_nomask=X_nomask)
