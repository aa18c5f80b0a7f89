"""How good are 2D class averages of a known structure? Two measures that do not reward noise.

A low-pass comparison of class averages with projections of the truth cannot tell a clean average from one that
carries fitted noise beyond its resolution (the "Einstein from noise" failure: the noise texture lives at high
frequency, which the low-pass removes). The measures here are the two the shared ``class2d_hard`` fixture states for
RELION's own classes (fixtures README §11):

* :func:`high_frequency_power_ratio`: power inside a disc at 12–6 Å over power at 100–20 Å. RELION's classes on
  that data: at most 0.0013; a noise-textured average: orders of magnitude more.
* :func:`best_projection_correlation`: the best normalised correlation of each class, Fourier-cropped and low-passed
  at 20 Å, with many noise-free projections of the true map over in-plane rotations and small shifts. RELION: median
  0.948 (min 0.894) on that data.

Images are ``[K, n, n]`` real space, centre pixel ``n // 2``; pixel sizes in Å.
"""

from __future__ import annotations

import torch

from cryopipe.core.fourier import fourier_crop_2d, irfft2_centered, lowpass, rfft2_centered
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.masks import soft_circular_mask
from cryopipe.core.projector import Projector

__all__ = ["high_frequency_power_ratio", "best_match_correlation", "best_projection_correlation",
           "uniform_rotations"]


def high_frequency_power_ratio(images: torch.Tensor, pixel_size: float, disc_radius_A: float = 75.0,
                               high_band_A: tuple[float, float] = (12.0, 6.0),
                               low_band_A: tuple[float, float] = (100.0, 20.0)) -> torch.Tensor:
    """``[K]`` power of each image inside a disc of ``disc_radius_A`` in the resolution band ``high_band_A``
    (coarse, fine: Å) over its power in ``low_band_A``; the disc is applied in real space (hard edge), the bands
    are rings of spatial frequency ``1/d`` for ``d`` between the two limits."""
    x = images.to(torch.float64)
    n = x.shape[-1]
    x = x * soft_circular_mask(n, disc_radius_A / pixel_size, 0.0, device=x.device, dtype=torch.float64)
    ft = rfft2_centered(x)
    ky = torch.fft.fftfreq(n, d=pixel_size, device=x.device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(n, d=pixel_size, device=x.device, dtype=torch.float64)
    s = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)  # 1/Å
    power = ft.real.square() + ft.imag.square()

    def band(lims: tuple[float, float]) -> torch.Tensor:
        sel = (s >= 1.0 / lims[0]) & (s <= 1.0 / lims[1])
        return (power * sel).sum(dim=(-2, -1))

    return band(high_band_A) / band(low_band_A).clamp_min(1e-300)


def uniform_rotations(count: int, seed: int) -> torch.Tensor:
    """``[count, 3, 3]`` rotation matrices with viewing directions uniform on the sphere (rot uniform, cos(tilt)
    uniform) and zero psi (the in-plane angle is searched separately)."""
    g = torch.Generator().manual_seed(int(seed))
    rot = torch.rand(count, generator=g, dtype=torch.float64) * 360.0
    tilt = torch.rad2deg(torch.acos(1.0 - 2.0 * torch.rand(count, generator=g, dtype=torch.float64)))
    return euler_to_matrix(rot, tilt, torch.zeros(count, dtype=torch.float64))


def _prepare(images: torch.Tensor, pixel_size: float, crop: int, lowpass_A: float, disc_radius_A: float
             ) -> torch.Tensor:
    """Fourier-crop ``[B, n, n]`` to ``crop`` pixels, low-pass, apply the disc, zero mean and unit norm in it."""
    x = images.to(torch.float64)
    n = x.shape[-1]
    ft = fourier_crop_2d(rfft2_centered(x), crop) if crop != n else rfft2_centered(x)
    apix = pixel_size * n / crop
    ft = lowpass(ft, lowpass_A, apix)
    y = irfft2_centered(ft, crop)
    d = soft_circular_mask(crop, disc_radius_A / apix, 0.0, device=y.device, dtype=torch.float64)
    y = y - (y * d).sum(dim=(-2, -1), keepdim=True) / d.sum()
    y = y * d
    return y / y.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-300)


def _rotate(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """``[B, R, n, n]`` each image of ``[B, n, n]`` rotated in-plane by each angle (counter-clockwise in (x, y),
    bilinear, about pixel ``n // 2``; outside the image: 0)."""
    B, n, _ = images.shape
    a = torch.deg2rad(angles_deg.to(torch.float64))
    R = a.numel()
    c = torch.arange(n, dtype=torch.float64) - n // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    xs = cos * x + sin * y + n // 2  # source pixel of each output pixel: R(-angle)
    ys = -sin * x + cos * y + n // 2
    grid = torch.stack((2.0 * xs / (n - 1) - 1.0, 2.0 * ys / (n - 1) - 1.0), dim=-1)  # [R, n, n, 2]
    src = images.to(torch.float64)[:, None].expand(B, R, n, n).reshape(B * R, 1, n, n)
    out = torch.nn.functional.grid_sample(src, grid.repeat(B, 1, 1, 1), mode="bilinear", align_corners=True)
    return out.reshape(B, R, n, n)


def best_match_correlation(classes: torch.Tensor, pixel_size: float, references: torch.Tensor,
                           reference_pixel_size: float | None = None, crop: int = 32, lowpass_A: float = 20.0,
                           disc_radius_A: float = 75.0, psi_step: float = 3.0, max_shift_px: int = 2,
                           chunk: int = 100) -> torch.Tensor:
    """``[K]`` best normalised correlation of each class ``[K, n, n]`` with any of the ``references`` ``[R, m, m]``
    (same physical box), both brought to ``crop`` pixels, low-passed at ``lowpass_A`` and masked by a disc of
    ``disc_radius_A``; maximised over in-plane rotations of the class (``psi_step`` degrees, rotated at the full
    sampling) and integer shifts up to ``max_shift_px`` (cropped pixels)."""
    K, n, _ = classes.shape
    ref_apix = pixel_size if reference_pixel_size is None else reference_pixel_size
    if abs(references.shape[-1] * ref_apix - n * pixel_size) > 1e-3 * n * pixel_size:
        raise ValueError(f"the references' box ({references.shape[-1]} × {ref_apix} Å) must span the class box "
                         f"({n} × {pixel_size} Å)")
    psis = torch.arange(0.0, 360.0, psi_step, dtype=torch.float64)
    # rotate at the full sampling (bilinear interpolation at the cropped sampling would blur the 20 Å band)
    rot_cls = _rotate(classes.to(torch.float64), psis).reshape(K * psis.numel(), n, n)
    rot_cls = _prepare(rot_cls, pixel_size, crop, lowpass_A, disc_radius_A)
    rot_cls = rot_cls.reshape(K * psis.numel(), crop * crop).to(torch.float32)  # [K·R, c²]
    shifts = [(dy, dx) for dy in range(-max_shift_px, max_shift_px + 1)
              for dx in range(-max_shift_px, max_shift_px + 1) if dy * dy + dx * dx <= max_shift_px ** 2]
    best = torch.full((K,), -1.0, dtype=torch.float64)
    for b0 in range(0, references.shape[0], chunk):
        p = _prepare(references[b0:b0 + chunk].to(torch.float64), ref_apix, crop, lowpass_A, disc_radius_A)
        shifted = torch.stack([torch.roll(p, s, dims=(-2, -1)) for s in shifts], dim=1)  # [P, S, c, c]
        cc = rot_cls @ shifted.reshape(-1, crop * crop).to(torch.float32).T  # [K·R, P·S]
        best = torch.maximum(best, cc.reshape(K, -1).amax(dim=1).to(torch.float64))
    return best


def best_projection_correlation(classes: torch.Tensor, pixel_size: float, volume: torch.Tensor,
                                volume_pixel_size: float, n_projections: int = 1500, seed: int = 7,
                                crop: int = 32, lowpass_A: float = 20.0, disc_radius_A: float = 75.0,
                                psi_step: float = 3.0, max_shift_px: int = 2, chunk: int = 100) -> torch.Tensor:
    """``[K]`` :func:`best_match_correlation` of each class ``[K, n, n]`` with ``n_projections`` noise-free
    projections of ``volume`` ``[N, N, N]`` (uniform directions, ``seed``)."""
    n = classes.shape[-1]
    if abs(volume.shape[-1] * volume_pixel_size - n * pixel_size) > 1e-3 * n * pixel_size:
        raise ValueError(f"the volume box ({volume.shape[-1]} × {volume_pixel_size} Å) must span the class box "
                         f"({n} × {pixel_size} Å)")
    proj = Projector(volume.to(torch.float32), pad=2.0)
    images = proj.project_images(uniform_rotations(n_projections, seed))
    return best_match_correlation(classes, pixel_size, images, volume_pixel_size, crop, lowpass_A, disc_radius_A,
                                  psi_step, max_shift_px, chunk)
