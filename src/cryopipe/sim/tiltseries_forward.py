"""Forward model of a tilt series (RELION 5 conventions): particles of a reference map → noise-free tilt images.

For tilt ``f`` and particle ``p`` (conventions of :mod:`cryopipe.core.tilt_geometry`, fixture README A1–A5):

``image_f += shift_to(q_f(p)) ∘ IFFT[ −CTF_f,p(k) · W_f(k) · F_V(A_effᵀ k) ]``

* ``q_f(p)`` = projected position (``project_points``), ``A_eff = R_f·A`` (``particle_tilt_matrices``);
* ``F_V(A_effᵀ k)``: Fourier slice of the map (:class:`~cryopipe.core.projector.Projector`, trilinear, padded);
* ``CTF_f,p``: RELION's CTF with the depth-corrected defocus of that particle in that tilt (``depth_defocus``,
  hand and slope), times ``rlnCtfScalefactor``; ``W_f``: dose weight of the tilt's pre-exposure
  (``dose_weights``);
* the minus sign is the contrast of raw data: protein dark (``−CTF`` is negative at low frequency).

Each particle's image is computed in a square ``box`` (room for CTF delocalisation) whose centre pixel
``box//2`` lands on ``round(q)``; the sub-pixel remainder ``q − round(q)`` is applied as a Fourier phase shift,
and the boxes are scatter-added (``index_add_``) into the images (pixels outside are dropped). When the map's box
``N`` is smaller than ``box``, the slice is computed at ``N``, transformed to real space and zero-padded to
``box`` (the projection of a map confined to its box is confined to the same square), which avoids a
``(2·box)³`` Fourier grid.

Slices stop at the Nyquist circle (:class:`~cryopipe.core.projector.Projector`): against the RELION fixture's tilt
series, whose generator also kept the corners of the square spectrum, correlation is ≥ 0.996 per tilt (lowest-dose
tilts; the dose weight removes the corners of later ones) and ≥ 0.99999 with both restricted to the circle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import good_fft_size, irfft2_centered, phase_shift_2d, rfft2_centered
from cryopipe.core.projector import Projector
from cryopipe.core.tilt_geometry import depth_defocus, dose_weights, particle_tilt_matrices, project_points
from cryopipe.errors import CryopipeError

__all__ = ["TiltOptics", "delocalisation_px", "default_render_box", "overlapping_pairs", "render_particle_boxes",
           "render_tilt_series"]


@dataclass(frozen=True)
class TiltOptics:
    """Optics and global tilt-series constants (one row of tomograms.star)."""

    pixel_size: float  #: rlnTomoTiltSeriesPixelSize (Å)
    voltage: float = 300.0  #: kV
    cs: float = 2.7  #: mm
    amplitude_contrast: float = 0.07
    hand: float = 1.0  #: rlnTomoHand
    defocus_slope: float = 1.0  #: rlnTomoDefocusSlope
    bfactor_per_dose: float = 0.0  #: rlnCtfBfactorPerElectronDose (0: critical-exposure curve)


def delocalisation_px(max_defocus_A: float, pixel_size: float, voltage: float = 300.0, cs: float = 2.7) -> float:
    """Largest CTF delocalisation (px) up to Nyquist: ``|∇γ|/2π = λ·Δf·k + Cs·λ³·k³`` at ``k = 1/(2·px)``."""
    lam = 12.2643247 / math.sqrt(voltage * 1e3 * (1 + 0.978466e-6 * voltage * 1e3))
    k = 1.0 / (2.0 * pixel_size)
    return (lam * abs(max_defocus_A) * k + cs * 1e7 * lam ** 3 * k ** 3) / pixel_size


def default_render_box(map_box: int, max_defocus_A: float, pixel_size: float, voltage: float = 300.0,
                       cs: float = 2.7) -> int:
    """A fast even render box: the map box plus twice the delocalisation at ``max_defocus_A`` (Å; include the
    depth range and astigmatism)."""
    return good_fft_size(int(math.ceil(map_box + 2 * delocalisation_px(max_defocus_A, pixel_size, voltage, cs))))


def overlapping_pairs(q_xy: torch.Tensor, image_size, box: int) -> torch.Tensor:
    """``[K, 2]`` (particle, tilt) index pairs whose ``box`` around the rounded position ``q_xy`` ``[N, F, 2]``
    overlaps an image ``(W, H)``."""
    W, H = int(image_size[0]), int(image_size[1])
    r = torch.floor(q_xy + 0.5)
    lo = r - box // 2
    hi = lo + box - 1
    ok = (hi[..., 0] >= 0) & (lo[..., 0] < W) & (hi[..., 1] >= 0) & (lo[..., 1] < H)
    return torch.nonzero(ok, as_tuple=False)


def render_particle_boxes(projector: Projector, A_eff: torch.Tensor, defocus_u: torch.Tensor,
                          defocus_v: torch.Tensor, defocus_angle: torch.Tensor, weights: torch.Tensor,
                          subpixel: torch.Tensor, box: int, optics: TiltOptics,
                          ctf_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Real-space particle images ``[B, box, box]`` (float32): ``IFFT[−CTF·W·F_V(A_effᵀk)]`` moved by
    ``subpixel`` ``[B, 2]`` px (x, y), centre pixel ``box//2``.

    ``A_eff`` ``[B, 3, 3]``; defocus ``[B]`` (Å, Å, degrees, already depth-corrected); ``weights``
    ``[B, box, box//2+1]`` dose weights; ``ctf_scale`` ``[B]`` or None."""
    n = projector.n
    if box < n:
        raise CryopipeError(f"render box {box} px is smaller than the map box {n} px; use a box >= {n}")
    ft = projector.project(A_eff.to(torch.float32))
    if n != box:
        img = irfft2_centered(ft, n)
        pad = torch.zeros((img.shape[0], box, box), dtype=img.dtype, device=img.device)
        s = box // 2 - n // 2
        pad[:, s:s + n, s:s + n] = img
        ft = rfft2_centered(pad)
    ctf = ctf_2d(box, optics.pixel_size, defocus_u, defocus_v, defocus_angle, voltage=optics.voltage,
                 cs=optics.cs, amplitude_contrast=optics.amplitude_contrast,
                 scale=1.0 if ctf_scale is None else ctf_scale, device=ft.device)
    ft = ft * (-(ctf * weights))
    ft = phase_shift_2d(ft, subpixel.to(torch.float32), box)
    return irfft2_centered(ft, box)


def render_tilt_series(projector: Projector, P: torch.Tensor, positions_px: torch.Tensor,
                       orientations: torch.Tensor, defocus: torch.Tensor, pre_exposure: torch.Tensor,
                       image_size, optics: TiltOptics, *, box: int, ctf_scale: torch.Tensor | None = None,
                       image_shifts_px: torch.Tensor | None = None, max_boxes: int = 256,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Noise-free tilt images ``[F, H, W]`` (float32) of particles of ``projector``'s map.

    Args:
        projector: Fourier-slice projector of the reference map (box ``N``, centre voxel ``N//2``).
        P: ``[F, 4, 4]`` projection matrices (``core.tilt_geometry.projection_matrices``) of the tilts to render.
        positions_px: ``[N, 3]`` particle centres (decentred tomogram px, origins applied).
        orientations: ``[N, 3, 3]`` ``A = A_sub·A_particle`` (reference → tomogram).
        defocus: ``[F, 3]`` rlnDefocusU/V (Å), rlnDefocusAngle (deg) of the tilts.
        pre_exposure: ``[F]`` rlnMicrographPreExposure (e/Å²).
        image_size: ``(W, H)``.
        optics: :class:`TiltOptics`.
        box: render box (px, even, ≥ N; room for delocalisation, see :func:`default_render_box`).
        ctf_scale: ``[F]`` rlnCtfScalefactor (None: 1).
        image_shifts_px: ``[N, F, 2]`` extra in-plane displacement of each particle's image (e.g. a local image
            warp), added to ``q`` (None: 0).
        max_boxes: particle images computed at once (memory ~ ``max_boxes·box²`` complex values).
        out: optional ``[F, H, W]`` float32 tensor to accumulate into.
    """
    W, H = int(image_size[0]), int(image_size[1])
    dev = projector.device
    P = P.to(device=dev, dtype=torch.float64)
    F = P.shape[0]
    pos = positions_px.to(device=dev, dtype=torch.float64)
    if out is None:
        out = torch.zeros((F, H, W), dtype=torch.float32, device=dev)
    if pos.shape[0] == 0 or F == 0:
        return out
    q = project_points(P, pos)  # [N, F, 3]
    q_xy = q[..., :2] + (image_shifts_px.to(device=dev, dtype=torch.float64) if image_shifts_px is not None else 0)
    defocus = defocus.to(device=dev, dtype=torch.float64)
    du, dv = depth_defocus(defocus[:, 0], defocus[:, 1], q[..., 2], optics.hand, optics.pixel_size,
                           optics.defocus_slope)
    A_eff = particle_tilt_matrices(P[:, :3, :3], orientations.to(device=dev, dtype=torch.float64))
    weights = dose_weights(box, optics.pixel_size, pre_exposure, optics.bfactor_per_dose, device=dev)
    scale = ctf_scale.to(device=dev, dtype=torch.float64) if ctf_scale is not None else None
    pairs = overlapping_pairs(q_xy, (W, H), box)
    flat = out.view(-1)
    offs = torch.arange(box, device=dev) - box // 2
    for c0 in range(0, pairs.shape[0], max_boxes):
        n_idx, f_idx = pairs[c0:c0 + max_boxes].unbind(-1)
        qq = q_xy[n_idx, f_idx]  # [B, 2]
        r = torch.floor(qq + 0.5)
        imgs = render_particle_boxes(
            projector, A_eff[n_idx, f_idx], du[n_idx, f_idx], dv[n_idx, f_idx], defocus[f_idx, 2],
            weights[f_idx], qq - r, box, optics, None if scale is None else scale[f_idx])
        ri = r.long()
        ys = (ri[:, 1, None, None] + offs[None, :, None]).expand(-1, box, box)
        xs = (ri[:, 0, None, None] + offs[None, None, :]).expand(-1, box, box)
        valid = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        index = (f_idx[:, None, None] * H + ys) * W + xs
        flat.index_add_(0, index[valid], imgs[valid].to(torch.float32))
    return out
