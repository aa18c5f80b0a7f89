"""Per-image background normalisation as in RELION's particle extraction (``relion_preprocess --norm``).

Re-derived from RELION 5 ``src/image.cpp`` (``normalise``, ``calculateBackgroundAvgStddev``,
``subtractBackgroundRamp``, ``removeDust``, ``invert_contrast``) and checked against RELION-written stacks.

Conventions:

* Images are ``[..., N, N]`` (``[y, x]``), all pixel quantities in **pixels**. The centre is index ``N // 2``
  (RELION's logical origin), so pixel ``(i, j)`` has logical coordinates ``(y, x) = (i - N//2, j - N//2)``.
* Background = pixels with ``x² + y² > bg_radius²`` (strictly outside the circle; ``bg_radius`` an integer
  number of pixels, as RELION parses it).
* Statistics are population statistics (``σ² = <v²> − <v>²``) over the background pixels of each image.
* All functions are batched over the leading dimensions and work on any device; the arithmetic is done in
  float64 where the device supports it (RELION computes in double) and returned in the input dtype.
"""

from __future__ import annotations

import torch

from cryopipe.errors import CryopipeError

__all__ = [
    "background_mask",
    "background_stats",
    "subtract_background_ramp",
    "remove_dust",
    "normalise",
    "invert_contrast",
]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA), else float32."""
    return torch.float64 if t.device.type in ("cpu", "cuda") else torch.float32


def _logical_grid(n: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` logical pixel coordinates (centre ``N//2`` = 0) of an ``n × n`` image, each ``[n, n]``."""
    c = torch.arange(n, device=device, dtype=dtype) - (n // 2)
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def background_mask(n: int, bg_radius: int, device=None) -> torch.Tensor:
    """Boolean ``[n, n]`` mask of the background: logical ``x² + y² > bg_radius²`` (pixels).

    Raises :class:`CryopipeError` if ``2·bg_radius > n`` (RELION refuses this) or if no pixel is left.
    """
    bg_radius = int(bg_radius)
    if bg_radius < 0:
        raise CryopipeError(f"bg_radius {bg_radius} px is negative (give a radius in pixels of the output box)")
    if 2 * bg_radius > n:
        raise CryopipeError(
            f"bg_radius {bg_radius} px: 2*bg_radius is larger than the image size {n} px "
            "(use a background radius of at most half the (rescaled) box)")
    x, y = _logical_grid(n, device, torch.int64)
    mask = (x * x + y * y) > bg_radius * bg_radius
    if not bool(mask.any()):
        raise CryopipeError(f"bg_radius {bg_radius} px leaves no background pixels in a {n} px box "
                            "(use a smaller radius)")
    return mask


def background_stats(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of the pixels under ``mask`` for each image.

    Args:
        images: ``[..., N, N]`` real tensor.
        mask: ``[N, N]`` boolean background mask (see :func:`background_mask`).

    Returns:
        ``(mean, std)``, each of shape ``images.shape[:-2]``, in the working dtype (float64 on CPU/CUDA).
    """
    wd = _work_dtype(images)
    v = images.to(wd)
    m = mask.to(device=images.device, dtype=wd)
    n = m.sum()
    s1 = (v * m).sum(dim=(-2, -1))
    s2 = (v * v * m).sum(dim=(-2, -1))
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0.0)
    return mean, torch.sqrt(var)


def subtract_background_ramp(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fit ``a·x + b·y + c`` (least squares, logical pixel coordinates) to the background pixels of each image
    and subtract the plane from the whole image (RELION ``subtractBackgroundRamp``).

    All images share the same design matrix, so the fit is one batched matrix product with its pseudo-inverse.
    """
    wd = _work_dtype(images)
    n = images.shape[-1]
    x, y = _logical_grid(n, images.device, wd)
    msk = mask.to(images.device)
    design = torch.stack([x[msk], y[msk], torch.ones_like(x[msk])], dim=-1)  # [P, 3]
    pinv = torch.linalg.pinv(design)  # [3, P]
    v = images.to(wd)
    coef = v[..., msk] @ pinv.T  # [..., 3]
    plane = coef[..., 0, None, None] * x + coef[..., 1, None, None] * y + coef[..., 2, None, None]
    return (v - plane).to(images.dtype)


def remove_dust(images: torch.Tensor, mask: torch.Tensor, white_sigma: float = -1.0, black_sigma: float = -1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace outlier pixels by Gaussian noise with the background's mean and standard deviation.

    Background ``μ, σ`` are computed once (before any replacement). Pixels anywhere in the image with
    ``v − μ > white_sigma·σ`` (white dust) and, with the same ``μ, σ``, ``v − μ < −black_sigma·σ``
    (black dust) are replaced by ``N(μ, σ)`` draws. A threshold ``<= 0`` disables that side (RELION: ``-1`` = off).

    Args:
        images: ``[..., N, N]``.
        mask: ``[N, N]`` background mask.
        white_sigma, black_sigma: thresholds in units of the background σ.
        generator: a ``torch.Generator`` on ``images.device`` for reproducible noise (seeded by the caller).
    """
    if not (white_sigma > 0 or black_sigma > 0):
        return images
    wd = _work_dtype(images)
    v = images.to(wd)
    mean, std = background_stats(v, mask)
    mu = mean[..., None, None]
    sd = std[..., None, None]
    out = v
    for thresh, white in ((white_sigma, True), (black_sigma, False)):
        if thresh > 0:
            bad = (out - mu > thresh * sd) if white else (out - mu < -thresh * sd)
            noise = torch.randn(v.shape, generator=generator, device=v.device, dtype=wd) * sd + mu
            out = torch.where(bad, noise, out)
    return out.to(images.dtype)


def normalise(images: torch.Tensor, bg_radius: int, white_dust: float = -1.0, black_dust: float = -1.0,
              ramp: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """RELION's extraction normalisation: optional dust removal, optional background-ramp subtraction, then
    ``(v − μ_bg) / σ_bg`` with the background statistics recomputed after the previous steps.

    Images whose background σ is below ``1e-10`` are returned unnormalised (RELION warns and skips them).

    Args:
        images: ``[..., N, N]`` particle images (after any rescaling / re-windowing).
        bg_radius: background radius in pixels of *this* box (integer; background is ``r > bg_radius``).
        white_dust, black_dust: dust thresholds in σ (``<= 0``: off).
        ramp: subtract a least-squares plane fitted to the background (RELION default; ``--no_ramp`` turns off).
        generator: random generator for the dust-replacement noise.

    Returns:
        Normalised images, same shape and dtype as ``images``.
    """
    if images.shape[-1] != images.shape[-2]:
        raise CryopipeError(f"images of size {tuple(images.shape[-2:])} are not square "
                            "(extraction boxes must be square)")
    mask = background_mask(images.shape[-1], bg_radius, device=images.device)
    wd = _work_dtype(images)
    v = images.to(wd)
    v = remove_dust(v, mask, white_dust, black_dust, generator=generator)
    if ramp:
        v = subtract_background_ramp(v, mask)
    mean, std = background_stats(v, mask)
    ok = std >= 1e-10
    safe_std = torch.where(ok, std, torch.ones_like(std))
    normed = (v - mean[..., None, None]) / safe_std[..., None, None]
    out = torch.where(ok[..., None, None], normed, v)
    return out.to(images.dtype)


def invert_contrast(images: torch.Tensor) -> torch.Tensor:
    """Multiply by −1 (RELION ``--invert_contrast``: dark particles on raw micrographs become white)."""
    return -images
