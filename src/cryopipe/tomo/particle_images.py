"""Particle images cut from tilt series, as RELION's tomography programs cut them, and their CTF·dose weights.

For particle ``n`` in tilt ``f`` (projected centre ``q = (x, y)`` unbinned px, see
:func:`cryopipe.core.tilt_geometry.project_points`), with output box ``b`` (binned px) and binning ``bin``:

1. a square of ``s0 = round(bin·b)`` unbinned pixels is cut with its pixel ``s0//2`` at ``round(q)`` (pixels
   beyond the image edge repeat the edge pixel);
2. the mean outside the circle of radius ``s0//2`` is subtracted and a 5-pixel raised-cosine edge inside that
   circle applied;
3. the FT is cropped to ``b`` (binned pixel ``px·bin``) and the sub-pixel remainder ``q − round(q)`` shifted out,
   so the FT's phase origin is the particle centre exactly;
4. optionally multiplied by ``c = −CTF·W`` (−1: the raw images have dark protein; CTF with the particle's
   depth-corrected defocus; W the dose weight), the weight being ``c²``.

Slices come back as half-complex FTs ``[P, b, b//2+1]`` (:mod:`cryopipe.core.fourier` convention) for ``P``
(particle, tilt) pairs given as flat index arrays, so callers batch over both.
"""

from __future__ import annotations

import math

import torch

from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import fourier_crop_2d, phase_shift_2d, radius_2d, rfft2_centered
from cryopipe.core.tilt_geometry import dose_weights
from cryopipe.errors import CryopipeError

__all__ = ["binned_square_size", "cut_particle_slices", "ctf_dose_weights", "EDGE_FALLOFF_PX"]

#: width of the raised-cosine edge applied inside the circle (RELION's EDGE_FALLOFF)
EDGE_FALLOFF_PX = 5.0


def binned_square_size(box: int, binning: float) -> int:
    """Unbinned square cut for a box of ``box`` binned pixels: ``round(binning·box)``."""
    return int(binning * box + 0.5)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _circle_crop(squares: torch.Tensor, falloff: float) -> torch.Tensor:
    """Subtract the mean outside radius ``s//2`` and taper to zero over ``falloff`` px inside it."""
    s = squares.shape[-1]
    c = torch.arange(s, device=squares.device, dtype=squares.dtype) - float(s // 2)
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    radius = float(s // 2)
    outside = (r > radius).to(squares.dtype)
    count = outside.sum()
    mean = (squares * outside).sum(dim=(-1, -2), keepdim=True) / count if float(count) > 0 else 0.0
    taper = torch.where(r < radius - falloff, torch.ones_like(r),
                        torch.where(r < radius, 0.5 - 0.5 * torch.cos(math.pi * (radius - r) / falloff),
                                    torch.zeros_like(r)))
    return taper * (squares - mean)


def cut_particle_slices(images: torch.Tensor, tilt_index: torch.Tensor, centres_px: torch.Tensor, box: int,
                        binning: float = 1.0, circle_crop: bool = True) -> torch.Tensor:
    """FTs ``[P, box, box//2+1]`` (complex64) of particle squares cut from tilt images.

    ``images``: ``[F, H, W]`` tilt images (unbinned, any real dtype); ``tilt_index``: ``[P]`` long, the tilt of
    each pair; ``centres_px``: ``[P, 2]`` projected particle centres (x, y) in unbinned px; ``box``: output box in
    binned px. The phase origin of each FT is the exact particle centre; values are scaled by ``1/binning``."""
    F, H, W = images.shape
    s0 = binned_square_size(box, binning)
    centres = centres_px.to(torch.float64)
    rounded = _round_half_away(centres)
    corner = rounded.long() - s0 // 2
    offsets = torch.arange(s0, device=images.device)
    xs = (corner[:, 0, None] + offsets).clamp(0, W - 1)
    ys = (corner[:, 1, None] + offsets).clamp(0, H - 1)
    squares = images[tilt_index[:, None, None], ys[:, :, None], xs[:, None, :]].to(torch.float32)
    if circle_crop:
        squares = _circle_crop(squares, EDGE_FALLOFF_PX)
    ft = rfft2_centered(squares)
    if s0 != box:
        ft = fourier_crop_2d(ft, box) / float(binning)
    remainder = ((centres - rounded) / binning).to(torch.float32)
    return phase_shift_2d(ft, -remainder, box)


def ctf_dose_weights(box: int, pixel_size: float, defocus_u: torch.Tensor, defocus_v: torch.Tensor,
                     defocus_angle: torch.Tensor, pre_exposure: torch.Tensor, *, voltage: float, cs: float,
                     amplitude_contrast: float, scale: torch.Tensor | float = 1.0, bfactor_per_dose: float = 0.0,
                     cutoff_fraction: float = 0.01, flip_contrast: bool = True, do_ctf: bool = True
                     ) -> torch.Tensor:
    """``c = ±CTF·W`` ``[P, box, box//2+1]`` (float32) for ``P`` (particle, tilt) pairs.

    ``pixel_size``: binned pixel (Å); ``defocus_u/v`` ``[P]`` depth-corrected (Å), ``defocus_angle`` ``[P]`` (deg),
    ``pre_exposure`` ``[P]`` (e/Å²); ``scale`` rlnCtfScalefactor per pair. ``flip_contrast`` multiplies by −1
    (RELION's default contrast inversion); ``do_ctf=False`` gives ``±W`` only."""
    weights = dose_weights(box, pixel_size, pre_exposure, bfactor_per_dose, cutoff_fraction,
                           device=defocus_u.device)
    if do_ctf:
        ctf = ctf_2d(box, pixel_size, defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast,
                     scale=scale)
        weights = weights * ctf
    weights = weights * (radius_2d(box, device=weights.device) <= box / 2.0)
    return -weights if flip_contrast else weights


def check_box_sizes(box: int, crop: int | None, binning: float) -> int:
    """The final box in binned pixels (``crop``; ``box`` where crop is None or <= 0) after checking that both are
    even with ``crop <= box`` and ``binning > 0``; a one-line :class:`CryopipeError` naming the option otherwise."""
    crop = box if crop is None or crop <= 0 else int(crop)
    if box < 2 or box % 2 or crop % 2 or crop > box:
        raise CryopipeError(f"--b {box} --crop {crop}: both must be even and crop <= box (binned pixels)")
    if binning <= 0:
        raise CryopipeError(f"--bin {binning}: the binning must be > 0")
    return crop
