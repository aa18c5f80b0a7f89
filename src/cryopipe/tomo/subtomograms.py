"""Pseudo-subtomograms and 2D particle stacks (RELION's ``relion_tomo_subtomo``).

For each particle, its visible tilt images are cut (:func:`cryopipe.tomo.particle_images.cut_particle_slices`,
box ``b`` binned px), multiplied by ``c = −CTF·W`` where the dose weight ``W`` is at least ``cutoff_fraction``,
inverse transformed, circle-cropped to the final box (mean outside radius ``crop/2`` removed, 5-px raised-cosine
edge inside it; RELION's narrow circle crop), and then

* **3D** (default): each slice is spread with trilinear weights into a ``crop³`` half-complex volume along
  ``R_f·A_sub`` (the subtomogram frame; ``A_sub·A_particle`` with ``apply_orientations``) scaled by ``crop/b``
  (:func:`cryopipe.core.slice_insertion.splat_insert_slices`). Outputs per particle: the real-space data volume
  ``Σ c·X`` (``crop³``) and the weights ``Σ c²`` and multiplicity ``Σ 1`` in FFTW half layout
  (``[2·crop, crop, crop//2+1]`` as z, y, x: first ``crop`` slabs weights, next ``crop`` slabs multiplicity; DC at
  index 0). RELION's refinement divides by the weights where the multiplicity is large enough.
* **2D stacks**: the premultiplied real-space images of the visible tilts, centre-cropped to ``crop²``
  (``[n_visible, crop, crop]``), with the list of visible tilts (rlnTomoVisibleFrames).

Particles are processed in batches of (particle, tilt) pairs; every particle's output depends only on its own
images, so batches can go to any worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryopipe.core.fourier import irfft2_centered, irfft3_centered, rfft2_centered
from cryopipe.core.slice_insertion import splat_insert_slices
from cryopipe.core.tilt_geometry import depth_defocus, particle_tilt_matrices, project_points, visible_in_tilts
from cryopipe.tomo.particle_images import EDGE_FALLOFF_PX, ctf_dose_weights, cut_particle_slices
from cryopipe.tomo.reconstruct_particle import TiltSeriesGeometry

__all__ = ["SubtomogramBatch", "particle_visibility", "pseudo_subtomograms", "particle_stacks_2d",
           "particle_tilt_stacks"]


@dataclass
class SubtomogramBatch:
    """Pseudo-subtomograms of ``N`` particles."""

    data: torch.Tensor  # [N, crop, crop, crop] float32 real space
    weights: torch.Tensor  # [N, 2·crop, crop, crop//2+1] float32 (Σc², then multiplicity), FFTW half layout
    visible: torch.Tensor  # [N, F] bool


def particle_visibility(geometry: TiltSeriesGeometry, positions_px: torch.Tensor, image_size, margin_px: float,
                        max_dose: float | None = None, min_frames: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(projected [N, F, 3], visible [N, F])``: a tilt is visible when the centre is ``margin_px`` unbinned px
    inside the image and its dose ≤ ``max_dose``; particles with fewer than ``min_frames`` visible tilts get none."""
    q = project_points(geometry.projections.to(positions_px.device), positions_px.to(torch.float64))
    visible = visible_in_tilts(q[..., :2], image_size, margin_px, geometry.pre_exposure, max_dose)
    enough = visible.sum(dim=1) >= max(1, int(min_frames))
    return q, visible & enough[:, None]


def _slices_and_weights(images, geometry, q, particle, tilt, box, binning, cutoff_fraction, do_ctf, circle_crop):
    """FTs ``[P, b, b//2+1]`` of the (particle, tilt) pairs cut at their projected centres and their
    ``c = −CTF·W`` (depth-corrected defocus of each particle in each tilt, dose weight with cut-off)."""
    slices = cut_particle_slices(images, tilt, q[particle, tilt, :2], box, binning, circle_crop=circle_crop)
    u, v = depth_defocus(geometry.defocus[tilt, 0], geometry.defocus[tilt, 1], q[particle, tilt, 2],
                         geometry.hand, geometry.pixel_size, geometry.defocus_slope)
    c = ctf_dose_weights(box, geometry.pixel_size * binning, u, v, geometry.defocus[tilt, 2],
                         geometry.pre_exposure[tilt], voltage=geometry.voltage, cs=geometry.cs,
                         amplitude_contrast=geometry.amplitude_contrast, scale=geometry.ctf_scale[tilt],
                         bfactor_per_dose=geometry.bfactor_per_dose, cutoff_fraction=cutoff_fraction,
                         do_ctf=do_ctf)
    return slices, c


def particle_tilt_stacks(images: torch.Tensor, geometry: TiltSeriesGeometry, positions_px: torch.Tensor, box: int,
                         binning: float, cutoff_fraction: float = 0.01, max_dose: float | None = None,
                         min_frames: int = 1, do_ctf: bool = True, circle_crop: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every tilt image of ``N`` particles, for the engine (:func:`cryopipe.engine.tomo_batch.prepare_stack_batch`):
    ``(ft [N, F, b, b//2+1]`` complex64 plain (not premultiplied) FTs with the phase origin at each projected
    centre, ``c [N, F, b, b//2+1]`` = ``−CTF·W``, ``visible [N, F]``). Tilts where a particle is not visible hold
    edge-clamped cut-outs: use ``visible``."""
    F, H, W = images.shape
    q, visible = particle_visibility(geometry, positions_px, (W, H), box / 2.0, max_dose, min_frames)
    N = positions_px.shape[0]
    particle = torch.arange(N, device=images.device).repeat_interleave(F)
    tilt = torch.arange(F, device=images.device).repeat(N)
    slices, c = _slices_and_weights(images, geometry, q, particle, tilt, box, binning, cutoff_fraction, do_ctf,
                                    circle_crop)
    h = box // 2 + 1
    return slices.reshape(N, F, box, h), c.reshape(N, F, box, h), visible


def _premultiplied_images(images, geometry, q, particle, tilt, box, binning, cutoff_fraction, do_ctf,
                          circle_precrop, circle_radius):
    """Premultiplied, circle-cropped FTs ``[P, b, b//2+1]``, weights ``c²`` and the inserted-pixel mask."""
    slices, c = _slices_and_weights(images, geometry, q, particle, tilt, box, binning, cutoff_fraction, do_ctf,
                                    circle_precrop)
    real = irfft2_centered(slices * c, box)
    n = box
    centre = torch.arange(n, device=real.device, dtype=real.dtype) - float(n // 2)
    r = torch.sqrt(centre[:, None] ** 2 + centre[None, :] ** 2)
    radius = float(circle_radius)
    outside = (r > radius).to(real.dtype)
    mean = (real * outside).sum(dim=(-1, -2), keepdim=True) / outside.sum().clamp(min=1)
    edge = torch.where(r < radius - EDGE_FALLOFF_PX, torch.ones_like(r),
                       torch.where(r < radius, 0.5 - 0.5 * torch.cos(math.pi * (radius - r) / EDGE_FALLOFF_PX),
                                   torch.zeros_like(r)))
    real = edge * (real - mean)
    return real, c * c, c != 0


def pseudo_subtomograms(images: torch.Tensor, geometry: TiltSeriesGeometry, positions_px: torch.Tensor,
                        frame_matrices: torch.Tensor, box: int, crop: int, binning: float,
                        cutoff_fraction: float = 0.01, max_dose: float | None = None, min_frames: int = 1,
                        do_ctf: bool = True, circle_precrop: bool = False) -> SubtomogramBatch:
    """3D pseudo-subtomograms of the ``N`` particles of one tilt series (see the module docstring).

    ``images`` ``[F, H, W]``; ``positions_px`` ``[N, 3]`` decentred unbinned px; ``frame_matrices`` ``[N, 3, 3]``:
    the frame each subtomogram is written in (``A_sub``, or the full orientation)."""
    F, H, W = images.shape
    q, visible = particle_visibility(geometry, positions_px, (W, H), box / 2.0, max_dose, min_frames)
    particle, tilt = torch.nonzero(visible, as_tuple=True)
    N = positions_px.shape[0]
    half = crop // 2 + 1
    data = torch.zeros((N, crop, crop, half), dtype=torch.complex128)
    weight = torch.zeros((N, crop, crop, half), dtype=torch.float64)
    multiplicity = torch.zeros_like(weight)
    matrices = particle_tilt_matrices(geometry.projections[:, :3, :3], frame_matrices.to(torch.float64))
    if particle.numel():
        real, weights2d, mask = _premultiplied_images(images, geometry, q, particle, tilt, box, binning,
                                                      cutoff_fraction, do_ctf, circle_precrop, crop / 2.0)
        splat_insert_slices(data, weight, multiplicity, rfft2_centered(real), weights2d, matrices[particle, tilt],
                            pixel_mask=mask, scale=crop / box, volume_index=particle)
    # RELION's scale of the data (matched on its bin-2, box 64 → crop 32 fixture, where √bin = √(box/crop) = √2)
    data = data * math.sqrt(box / crop) * math.sqrt(binning)
    volumes = irfft3_centered(data, crop).float()
    return SubtomogramBatch(volumes, torch.cat([weight, multiplicity], dim=1).float(), visible)


def particle_stacks_2d(images: torch.Tensor, geometry: TiltSeriesGeometry, positions_px: torch.Tensor, box: int,
                       crop: int, binning: float, cutoff_fraction: float = 0.01, max_dose: float | None = None,
                       min_frames: int = 1, do_ctf: bool = True, circle_precrop: bool = False
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """RELION 5's 2D-stack particles: per particle ``[n_visible, crop, crop]`` premultiplied real-space images of
    its visible tilts (divided by the binning), and ``visible`` ``[N, F]``."""
    F, H, W = images.shape
    q, visible = particle_visibility(geometry, positions_px, (W, H), box / 2.0, max_dose, min_frames)
    particle, tilt = torch.nonzero(visible, as_tuple=True)
    start = (box - crop) // 2
    stacks: list[torch.Tensor] = []
    if particle.numel():
        real, _, _ = _premultiplied_images(images, geometry, q, particle, tilt, box, binning, cutoff_fraction,
                                           do_ctf, circle_precrop, crop / 2.0)
        real = real[:, start:start + crop, start:start + crop]
        counts = visible.sum(dim=1).tolist()
        stacks = list(torch.split(real.float(), counts))
    else:
        stacks = [torch.zeros((0, crop, crop)) for _ in range(positions_px.shape[0])]
    return stacks, visible
