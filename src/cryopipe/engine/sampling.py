"""Sampling of the hidden variables: in-plane angles, translations, adaptive oversampling (RELION's
``HealpixSampling`` for 2D, re-derived).

* In-plane angle ψ (2D classification): ``n_psi = ceil(360/psi_step)`` rounded up to a multiple of 32 (RELION does
  this "for efficient GPU calculations"; ``--psi_step 12`` → 11.25°), coarse angles
  ``ψ_i = (i + perturbation)·step``.
* Translations (pixels): the grid ``(ix·step, iy·step)``, ``|ix|, |iy| <= ceil(range/step)``, kept where
  ``x² + y² < range² + 0.001`` (RELION's ``setTranslations``), relative to each particle's current origin.
* Adaptive oversampling of order ``o``: each coarse sample is replaced by ``2^o`` (ψ) / ``2^o × 2^o``
  (translation) children centred in its cell: ``c − step/2 + (j + 1/2)·step/2^o``.

Orientation samples are handled as plain tensors so that 3D (HEALPix directions × ψ) can provide its own
``coarse``/``children`` with the same shapes: coarse parameters ``[R, ...]``, children ``[R, S, ...]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "psi_step_adjusted",
    "translation_grid",
    "oversample_translations",
    "InPlaneSampling",
    "coarse_image_size",
]


def psi_step_adjusted(psi_step: float, multiple_of_32: bool = True) -> float:
    """RELION's in-plane step (degrees): ``360/n`` with ``n = ceil(360/psi_step)`` rounded up to a multiple of 32."""
    if psi_step <= 0:
        raise ValueError(f"psi_step must be > 0 degrees, got {psi_step}")
    n = math.ceil(360.0 / psi_step - 1e-9)
    if multiple_of_32 and n % 32:
        n = math.ceil(n / 32.0) * 32
    return 360.0 / n


def translation_grid(offset_range: float, offset_step: float, device=None) -> torch.Tensor:
    """Coarse translations ``[T, 2]`` = ``(x, y)`` in pixels within a disc of radius ``offset_range`` (pixels),
    spacing ``offset_step`` (RELION ``setTranslations``, 2D). ``offset_range = 0`` gives the single ``(0, 0)``."""
    if offset_step <= 0:
        raise ValueError(f"offset_step must be > 0 pixels, got {offset_step}")
    maxp = int(math.ceil(offset_range / offset_step - 1e-9)) if offset_range > 0 else 0
    i = torch.arange(-maxp, maxp + 1, device=device, dtype=torch.float64)
    iy, ix = torch.meshgrid(i, i, indexing="ij")
    x, y = ix.reshape(-1) * offset_step, iy.reshape(-1) * offset_step
    keep = x * x + y * y < offset_range * offset_range + 0.001
    return torch.stack([x[keep], y[keep]], dim=-1).to(torch.float32)


def _child_offsets(step: float, order: int, device=None) -> torch.Tensor:
    """Offsets of the ``2^order`` children of a cell of width ``step`` relative to its centre."""
    m = 2 ** int(order)
    j = torch.arange(m, device=device, dtype=torch.float64)
    return (-0.5 * step + (j + 0.5) * step / m).to(torch.float32)


def oversample_translations(coarse: torch.Tensor, step: float, order: int) -> torch.Tensor:
    """Children ``[T, 4^order, 2]`` of coarse translations ``[T, 2]`` (pixels) with coarse spacing ``step``."""
    if order == 0:
        return coarse[:, None, :].clone()
    d = _child_offsets(step, order, coarse.device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    off = torch.stack([dx.reshape(-1), dy.reshape(-1)], dim=-1)
    return coarse[:, None, :] + off[None]


@dataclass
class InPlaneSampling:
    """2D hidden-variable grid: ψ angles (degrees) and translations (pixels), with adaptive oversampling.

    Attributes:
        psi_step: coarse ψ step (degrees, already adjusted, see :func:`psi_step_adjusted`).
        offset_range, offset_step: translation search range and coarse step (pixels).
        oversampling: adaptive oversampling order (0: single pass).
        perturbation: current random perturbation (fraction of a step, RELION ``random_perturbation``).
    """

    psi_step: float
    offset_range: float
    offset_step: float
    oversampling: int = 1
    perturbation: float = 0.0

    @property
    def n_psi(self) -> int:
        return int(round(360.0 / self.psi_step))

    @property
    def fine_psi_step(self) -> float:
        return self.psi_step / 2 ** self.oversampling

    @property
    def fine_offset_step(self) -> float:
        return self.offset_step / 2 ** self.oversampling

    def coarse_psi(self, device=None) -> torch.Tensor:
        """``[R]`` coarse in-plane angles (degrees)."""
        i = torch.arange(self.n_psi, device=device, dtype=torch.float64)
        return ((i + self.perturbation) * self.psi_step).to(torch.float32)

    def psi_children(self, psi: torch.Tensor, order: int | None = None) -> torch.Tensor:
        """``[R, 2^order]`` children of coarse angles ``[R]``."""
        o = self.oversampling if order is None else order
        return psi[:, None] + _child_offsets(self.psi_step, o, psi.device)[None, :]

    def fine_psi(self, device=None) -> torch.Tensor:
        """All fine angles ``[R·2^o]`` (children of coarse angle ``i`` at ``i·2^o + j``)."""
        return self.psi_children(self.coarse_psi(device)).reshape(-1)

    def coarse_translations(self, device=None) -> torch.Tensor:
        """``[T, 2]`` coarse translations (pixels)."""
        return translation_grid(self.offset_range, self.offset_step, device)

    def translation_children(self, coarse: torch.Tensor, order: int | None = None) -> torch.Tensor:
        o = self.oversampling if order is None else order
        return oversample_translations(coarse, self.offset_step, o)

    def fine_translations(self, device=None) -> torch.Tensor:
        """All fine translations ``[T·4^o, 2]`` (children of coarse ``t`` at ``t·4^o + j``)."""
        return self.translation_children(self.coarse_translations(device)).reshape(-1, 2)


def coarse_image_size(ori_size: int, pixel_size: float, current_size: int, psi_step: float,
                      particle_diameter: float, ref_dim: int = 2, strict_highres_exp: float = -1.0,
                      adaptive_oversampling: int = 1) -> int:
    """Image size (pixels, even) of the coarse E-step pass (RELION ``updateImageSizeAndResolutionPointers``).

    The coarse pass only needs the resolution at which a rotation by one coarse step moves the particle edge by
    about a pixel: ``(step/360)·π·diameter / (1.5 in 2D, 1.2 in 3D)`` Å; ``strict_highres_exp`` (Å) limits it
    strictly instead. Never larger than ``current_size``.
    """
    if strict_highres_exp > 0:
        size = 2 * round(ori_size * pixel_size / strict_highres_exp)
    elif adaptive_oversampling > 0:
        rotated = (psi_step / 360.0) * math.pi * particle_diameter
        res = rotated / (1.5 if ref_dim == 2 else 1.2)
        size = 2 * math.ceil(pixel_size * ori_size / res)
    else:
        size = current_size
    return int(min(size, current_size))
