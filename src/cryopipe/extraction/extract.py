"""Particle extraction from micrographs, batched over all particles of a micrograph (RELION ``relion_preprocess``).

Re-derived from RELION 5 ``src/preprocessing.cpp`` (``extractParticlesFromOneMicrograph``,
``performPerImageOperations``, ``getCoordinateMetaDataTable``) and checked against RELION-written stacks.

Conventions (see ``docs/design.md``):

* Micrographs are ``[H, W]`` = ``[y, x]`` tensors; coordinates are ``(x, y)`` in **pixels of the micrograph**
  (``rlnCoordinateX`` = column, ``rlnCoordinateY`` = row, 0-based, first array element = (0, 0)).
* A particle at coordinate ``X`` is windowed with its box centre (index ``N//2``) at micrograph pixel
  ``(long)X`` (C truncation toward zero), i.e. box pixels ``[(long)X − N//2, (long)X − N//2 + N − 1]``.
* Pixels outside the micrograph take the value of the nearest edge pixel (RELION first fills them with the
  micrograph mean, then replicates the edge columns, then the edge rows; without CTF pre-multiplication the
  mean fill is overwritten everywhere, so the net result is clamped indexing).
* Per-image operations in RELION's order: Fourier **rescale** → centred **re-window** → **normalise** →
  **invert** contrast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cryopipe.errors import CryopipeError
from cryopipe.extraction.normalise import invert_contrast, normalise

__all__ = [
    "FLOAT16_MIN_NORMAL",
    "flush_float16_subnormals",
    "window_corners",
    "extract_windows",
    "rescale_images",
    "rewindow_images",
    "preprocess_particles",
    "extract_particles",
    "default_bg_radius",
    "output_pixel_size",
    "relion_round",
    "reextract_geometry",
]

#: smallest positive normal float16 (2**-14); RELION reads float16 values below it (subnormals) as 0.
FLOAT16_MIN_NORMAL = 2.0 ** -14


def flush_float16_subnormals(x: torch.Tensor) -> torch.Tensor:
    """Set values with ``0 < |v| < 2**-14`` to 0, as RELION does when it reads a float16 (MRC mode 12) file.

    Verified on the RELION 5.0.1 extraction fixture: the only pixels where a plain float16→float32 read differs
    from RELION's extracted particles are float16 subnormals, which RELION turned into exact zeros. Apply this
    only to data that came from a float16 file.
    """
    return torch.where(x.abs() < FLOAT16_MIN_NORMAL, torch.zeros_like(x), x)


def window_corners(coords_xy: torch.Tensor, box: int) -> torch.Tensor:
    """Integer ``(x0, y0)`` of the first box pixel for each coordinate: ``trunc(coord) − box//2`` ([B, 2], int64)."""
    return torch.trunc(coords_xy.to(torch.float64)).to(torch.int64) - (box // 2)


def extract_windows(micrograph: torch.Tensor, coords_xy: torch.Tensor, box: int,
                    name: str = "micrograph") -> torch.Tensor:
    """Cut ``box × box`` windows around each coordinate with one gather (no per-particle loop).

    Args:
        micrograph: ``[H, W]`` real tensor.
        coords_xy: ``[B, 2]`` ``(x, y)`` coordinates in micrograph pixels (fractional allowed; truncated).
        box: window size in pixels.
        name: micrograph name used in error messages.

    Returns:
        ``[B, box, box]`` windows (dtype of ``micrograph``, on its device); pixels outside the micrograph are
        replaced by the nearest edge pixel (edge replication, RELION's boundary rule).

    Raises:
        CryopipeError: if a window lies completely outside the micrograph.
    """
    if micrograph.ndim != 2:
        raise CryopipeError(f"{name}: expected a 2D micrograph, got shape {tuple(micrograph.shape)}")
    h, w = micrograph.shape
    dev = micrograph.device
    coords_xy = torch.as_tensor(coords_xy, device=dev)
    if coords_xy.numel() == 0:
        return micrograph.new_zeros((0, box, box))
    corner = window_corners(coords_xy, box).to(dev)  # [B, 2] (x0, y0)
    x0, y0 = corner[:, 0], corner[:, 1]
    outside = (x0 + box - 1 < 0) | (x0 >= w) | (y0 + box - 1 < 0) | (y0 >= h)
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0, 0])
        c = coords_xy[i].tolist()
        raise CryopipeError(
            f"{name}: particle {i + 1} at (x={c[0]:g}, y={c[1]:g}) lies completely outside the {w}x{h} micrograph "
            "(check that the coordinates are in pixels of this micrograph)")
    r = torch.arange(box, device=dev)
    ys = (y0[:, None] + r).clamp_(0, h - 1)  # [B, box]
    xs = (x0[:, None] + r).clamp_(0, w - 1)
    return micrograph[ys[:, :, None], xs[:, None, :]]


def rescale_images(images: torch.Tensor, new_size: int) -> torch.Tensor:
    """Fourier rescale ``[..., N, N]`` images to ``new_size`` as RELION's ``resizeMap``
    (:func:`cryopipe.extraction.resize.relion_resize`: spectrum cropped or zero-padded with the Nyquist
    components kept as RELION keeps them, pixel values kept: a constant image stays the same constant).

    The pixel size of the result is ``old_pixel_size · N / new_size`` (see :func:`output_pixel_size`).
    """
    from cryopipe.extraction.resize import relion_resize

    if new_size == images.shape[-1]:
        return images
    return relion_resize(images, new_size)


def rewindow_images(images: torch.Tensor, new_size: int) -> torch.Tensor:
    """Centred real-space crop / zero-pad of ``[..., N, N]`` images to ``new_size`` (centre ``N//2`` kept at
    ``new_size//2``; new pixels are 0), as RELION's ``rewindow``."""
    n = images.shape[-1]
    if new_size == n:
        return images
    out = images.new_zeros(images.shape[:-2] + (new_size, new_size))
    # output index i' <-> input index i = i' - new//2 + n//2
    off = n // 2 - new_size // 2
    lo_out = max(0, -off)
    hi_out = min(new_size, n - off)
    out[..., lo_out:hi_out, lo_out:hi_out] = images[..., lo_out + off:hi_out + off, lo_out + off:hi_out + off]
    return out


def preprocess_particles(windows: torch.Tensor, *, scale: int | None = None, window: int | None = None,
                         norm: bool = False, bg_radius: int = -1, white_dust: float = -1.0,
                         black_dust: float = -1.0, ramp: bool = True, invert: bool = False,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """RELION's per-image operations on extracted windows, batched: rescale → re-window → normalise → invert.

    Args:
        windows: ``[B, N, N]`` extracted boxes.
        scale: Fourier-rescale to this size in pixels (``None``/``<= 0``: no rescaling).
        window: re-window (centred crop/pad) to this size after rescaling (``None``/``<= 0``: none).
        norm: normalise the background to mean 0, σ 1.
        bg_radius: background radius in pixels of the final box (required with ``norm``).
        white_dust, black_dust: dust-removal thresholds in σ (``<= 0``: off).
        ramp: subtract a fitted background plane before normalising (RELION default).
        invert: multiply by −1.
        generator: random generator for dust replacement.
    """
    x = windows
    if scale is not None and scale > 0:
        x = rescale_images(x, int(scale))
    if window is not None and window > 0:
        x = rewindow_images(x, int(window))
    if norm:
        if bg_radius is None or bg_radius < 0:
            raise CryopipeError("normalisation needs a background radius: give --bg_radius in pixels of the output box")
        x = normalise(x, int(bg_radius), white_dust, black_dust, ramp=ramp, generator=generator)
    if invert:
        x = invert_contrast(x)
    return x


def extract_particles(micrograph: torch.Tensor, coords_xy: torch.Tensor, box: int, *, name: str = "micrograph",
                      **ops) -> torch.Tensor:
    """Window all particles of one micrograph and apply :func:`preprocess_particles` (``ops`` are its keywords).

    Returns ``[B, M, M]`` with ``M = window or scale or box``, computed in float32 or better on the micrograph's
    device.
    """
    mic = micrograph if micrograph.is_floating_point() and micrograph.dtype != torch.float16 else micrograph.float()
    windows = extract_windows(mic, coords_xy, box, name=name)
    return preprocess_particles(windows, **ops)


def default_bg_radius(box: int, scale: int | None = None, bg_diameter: float = -1.0) -> int:
    """Background radius (pixels of the output box) as RELION's GUI computes it for ``--bg_radius``.

    ``bg_diameter`` in pixels of the extraction box; ``< 0`` means 75 % of the box. Radius = diameter / 2, times
    ``scale / box`` when rescaling, truncated to an integer.
    """
    d = 0.75 * box if bg_diameter is None or bg_diameter < 0 else float(bg_diameter)
    r = d / 2.0
    if scale is not None and scale > 0:
        r *= scale / box
    return int(r)


def output_pixel_size(micrograph_pixel_size: float, box: int, scale: int | None = None) -> float:
    """Pixel size (Å) of the extracted particles: the micrograph's, times ``box / scale`` when rescaling."""
    if scale is not None and scale > 0:
        return float(micrograph_pixel_size) * box / scale
    return float(micrograph_pixel_size)


def relion_round(x: torch.Tensor) -> torch.Tensor:
    """RELION's ``ROUND``: round half away from zero (``torch.round`` rounds half to even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def reextract_geometry(coords_xy: torch.Tensor, origins_A: torch.Tensor | None, particle_pixel_size: torch.Tensor,
                       micrograph_pixel_size: torch.Tensor, *, angles_deg: torch.Tensor | None = None,
                       recenter: bool = False, recenter_xyz: Sequence[float] = (0.0, 0.0, 0.0),
                       ref_pixel_size: float | None = None, reset_offsets: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New coordinates and origins for re-extracting refined particles (RELION ``--reextract_data_star``).

    Args:
        coords_xy: ``[B, 2]`` rlnCoordinateX/Y (micrograph pixels).
        origins_A: ``[B, 2]`` rlnOriginX/YAngst (Å) or ``None`` if the file has none.
        particle_pixel_size: ``[B]`` pixel size (Å) of the refined particles (their optics group).
        micrograph_pixel_size: ``[B]`` pixel size (Å) of the micrographs they come from.
        angles_deg: ``[B, 3]`` rlnAngleRot/Tilt/Psi (needed when re-centring on a non-zero reference point).
        recenter: move each coordinate by the (integer-rounded) refined origin, so the particle centre
            (``coordinate − origin``) lands on the box centre; the sub-pixel remainder stays as the origin.
        recenter_xyz: ``(x, y, z)`` point of the reference, in pixels of the reference, to centre on instead
            of the reference centre; its projection ``A·(x, y, z)`` (A = RELION Euler matrix) is subtracted from
            the origin first (same as :func:`cryopipe.core.geometry.recenter_origins`).
        ref_pixel_size: pixel size of the reference for ``recenter_xyz`` (default: the particle pixel size).
        reset_offsets: set all origins to 0 and keep the coordinates.

    Returns:
        ``(coords_xy [B, 2] float64, origins_A [B, 2] float64 or None)``. Without ``recenter`` /
        ``reset_offsets`` and with equal pixel sizes the inputs are returned unchanged (the origins stay as
        refined and the coordinates are re-used as they are).
    """
    coords = torch.as_tensor(coords_xy, dtype=torch.float64).clone()
    dev = coords.device
    if origins_A is None:
        if recenter:
            raise CryopipeError("re-centring needs rlnOriginXAngst/rlnOriginYAngst in the re-extraction STAR file "
                                "(use a refinement _data.star, or drop --recenter)")
        return coords, None
    origins = torch.as_tensor(origins_A, dtype=torch.float64, device=dev).clone()
    if reset_offsets:
        return coords, torch.zeros_like(origins)
    p_apix = torch.as_tensor(particle_pixel_size, dtype=torch.float64, device=dev).reshape(-1)
    m_apix = torch.as_tensor(micrograph_pixel_size, dtype=torch.float64, device=dev).reshape(-1)
    p_apix = p_apix.expand(coords.shape[0]) if p_apix.numel() == 1 else p_apix
    m_apix = m_apix.expand(coords.shape[0]) if m_apix.numel() == 1 else m_apix
    ratio = p_apix / m_apix  # particle px -> micrograph px
    if not recenter and bool(torch.all(torch.abs(ratio - 1.0) <= 1e-6)):
        return coords, origins
    rc = [float(v) for v in recenter_xyz]
    if recenter and any(abs(v) > 0 for v in rc):
        if angles_deg is None:
            raise CryopipeError("re-centring on --recenter_x/y/z needs rlnAngleRot/Tilt/Psi in the re-extraction STAR "
                                "file (use a 3D refinement _data.star)")
        from cryopipe.core.geometry import recenter_origins

        # origin - p_apix * A.(c * ref_apix / p_apix)  ==  origin - ref_apix * A.c
        apix_c = float(ref_pixel_size) if ref_pixel_size is not None and ref_pixel_size > 0 else p_apix
        origins = recenter_origins(torch.as_tensor(angles_deg, dtype=torch.float64, device=dev), origins, rc,
                                   apix_c).to(torch.float64)
    off = origins / p_apix[:, None]  # particle pixels
    off = off * ratio[:, None]  # micrograph pixels
    if recenter:
        whole = relion_round(off)
        coords = coords - whole
        off = off - whole
    return coords, off * m_apix[:, None]
