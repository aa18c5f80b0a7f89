"""Fourier-space conventions and basic operations shared by every module.

Conventions (all of cryopipe follows them):

* Real-space arrays are ``[..., y, x]`` (images) and ``[..., z, y, x]`` (volumes), as stored in MRC files.
  The image/volume **centre is the element at index ``N // 2``** on every axis (RELION's ``(int)(N/2)``).
* Fourier transforms are **half-complex** (``rfft``) of the *centred* array: ``F = rfftn(ifftshift(x))``, so
  the centre voxel is the phase origin. No normalisation on the forward transform (torch ``norm="backward"``);
  :func:`irfft2_centered` / :func:`irfft3_centered` invert exactly.
* Frequency indices: along every axis but the last, index ``i`` is frequency ``fftfreq(N)[i] * N`` (0, 1, …,
  N/2−1, −N/2, …, −1); along the last axis index ``j`` is frequency ``j`` (0 … N/2). Frequencies are given in
  **Fourier pixels** (cycles per box) unless a function says ``_per_A`` (cycles per Å = pixels / (N · apix)).
* A vector ``(kx, ky[, kz])`` is ordered x first, as RELION's geometry does; arrays are indexed ``[.., ky, kx]``.
"""

from __future__ import annotations

import math

import torch

_DIMS2 = (-2, -1)
_DIMS3 = (-3, -2, -1)


def rfft2_centered(images: torch.Tensor) -> torch.Tensor:
    """Half-complex 2D FT of images ``[..., N, N]`` with the phase origin at the centre pixel ``N//2``."""
    return torch.fft.rfftn(torch.fft.ifftshift(images, dim=_DIMS2), dim=_DIMS2)


def irfft2_centered(ft: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_centered`; ``n`` is the real-space box size (needed for the half axis)."""
    return torch.fft.fftshift(torch.fft.irfftn(ft, s=(n, n), dim=_DIMS2), dim=_DIMS2)


def rfft3_centered(volume: torch.Tensor) -> torch.Tensor:
    """Half-complex 3D FT of volumes ``[..., N, N, N]`` with the phase origin at the centre voxel."""
    return torch.fft.rfftn(torch.fft.ifftshift(volume, dim=_DIMS3), dim=_DIMS3)


def irfft3_centered(ft: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`rfft3_centered` for a cubic box of size ``n``."""
    return torch.fft.fftshift(torch.fft.irfftn(ft, s=(n, n, n), dim=_DIMS3), dim=_DIMS3)


def freq_grid_2d(n: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kx, ky)`` in Fourier pixels on the half-complex grid ``[n, n//2+1]`` of an ``n × n`` image."""
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    kx = torch.arange(n // 2 + 1, device=device, dtype=dtype)
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    return kxx, kyy


def freq_grid_3d(n: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kx, ky, kz)`` in Fourier pixels on the half-complex grid ``[n, n, n//2+1]`` of an ``n³`` volume."""
    kz = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=dtype)
    kx = torch.arange(n // 2 + 1, device=device, dtype=dtype)
    kzz, kyy, kxx = torch.meshgrid(kz, ky, kx, indexing="ij")
    return kxx, kyy, kzz


def radius_2d(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Radial frequency ``|k|`` (Fourier pixels) on the half-complex 2D grid."""
    kx, ky = freq_grid_2d(n, device=device, dtype=dtype)
    return torch.sqrt(kx * kx + ky * ky)


def radius_3d(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Radial frequency ``|k|`` (Fourier pixels) on the half-complex 3D grid."""
    kx, ky, kz = freq_grid_3d(n, device=device, dtype=dtype)
    return torch.sqrt(kx * kx + ky * ky + kz * kz)


def shell_index_2d(n: int, device=None) -> torch.Tensor:
    """Integer shell ``round(|k|)`` per half-complex 2D coefficient (RELION's shell assignment)."""
    return torch.round(radius_2d(n, device=device, dtype=torch.float64)).long()


def shell_index_3d(n: int, device=None) -> torch.Tensor:
    """Integer shell ``round(|k|)`` per half-complex 3D coefficient (RELION's shell assignment)."""
    return torch.round(radius_3d(n, device=device, dtype=torch.float64)).long()


def phase_shift_2d(ft: torch.Tensor, shifts: torch.Tensor, n: int) -> torch.Tensor:
    """Translate images given as centred half-complex FTs ``[..., n, n//2+1]``.

    ``shifts`` is ``[..., 2]`` = ``(dx, dy)`` in pixels: the content moves by ``+dx`` along x and ``+dy``
    along y (a feature at ``(x, y)`` ends at ``(x+dx, y+dy)``). Broadcasts over leading dimensions.
    RELION's prediction of an observation with origin ``o`` is ``phase_shift_2d(P, -o)``.
    """
    kx, ky = freq_grid_2d(n, device=ft.device, dtype=shifts.dtype if shifts.is_floating_point() else torch.float32)
    dx = shifts[..., 0, None, None]
    dy = shifts[..., 1, None, None]
    phase = (-2.0 * math.pi / n) * (kx * dx + ky * dy)
    return ft * torch.polar(torch.ones_like(phase), phase).to(ft.dtype)


def phase_shift_3d(ft: torch.Tensor, shifts: torch.Tensor, n: int) -> torch.Tensor:
    """3D version of :func:`phase_shift_2d`; ``shifts`` is ``[..., 3]`` = ``(dx, dy, dz)`` pixels."""
    kx, ky, kz = freq_grid_3d(n, device=ft.device, dtype=shifts.dtype if shifts.is_floating_point() else torch.float32)
    dx = shifts[..., 0, None, None, None]
    dy = shifts[..., 1, None, None, None]
    dz = shifts[..., 2, None, None, None]
    phase = (-2.0 * math.pi / n) * (kx * dx + ky * dy + kz * dz)
    return ft * torch.polar(torch.ones_like(phase), phase).to(ft.dtype)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Real-space images ``[..., n, n]`` translated by ``shifts`` ``[..., 2]`` = ``(dx, dy)`` pixels (sub-pixel, periodic)."""
    n = images.shape[-1]
    return irfft2_centered(phase_shift_2d(rfft2_centered(images), shifts, n), n)


def good_fft_size(n: int, max_prime: int = 7) -> int:
    """Smallest even size ``>= n`` whose prime factors are all ``<= max_prime`` (fast FFT sizes)."""
    m = max(2, n + (n % 2))
    while True:
        k = m
        for p in (2, 3, 5, 7, 11, 13):
            if p > max_prime:
                break
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


# ----------------------------------------------------------------------------------------------------------------
# Fourier cropping / padding and resolution filters
# ----------------------------------------------------------------------------------------------------------------


def _infer_ndim(shape: tuple[int, ...], ndim: int | None, half: bool) -> int:
    """Spatial dimensionality (2 or 3) of an array of images/volumes (``half``: half-complex FT layout).

    Without ``ndim``: 3 when there are >= 3 dimensions and the last three look like one cube
    (``[N, N, N]`` real, ``[N, N, N//2+1]`` half-complex), else 2. A batch of exactly ``N`` images of size ``N``
    is ambiguous and must pass ``ndim=2``.
    """
    if ndim is not None:
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        return ndim
    if len(shape) >= 3:
        n = shape[-2]
        last_ok = shape[-1] == (n // 2 + 1 if half else n)
        if shape[-3] == n and last_ok:
            return 3
    return 2


def fourier_rescale(x: torch.Tensor, new_n: int, ndim: int | None = None) -> torch.Tensor:
    """Resample centred real-space images ``[..., n, n]`` or volumes ``[..., n, n, n]`` to box ``new_n`` by
    cropping (``new_n < n``) or zero-padding (``new_n > n``) their Fourier transform.

    * The physical extent of a pixel changes by ``n / new_n`` (pixel size ``apix · n / new_n``); the box centre
      ``N//2`` stays the phase origin, so a feature at the centre stays at the centre.
    * Values are kept (the mean is preserved exactly): the FT is multiplied by ``(new_n / n)^d``.
    * Nyquist handling: every Fourier component at the Nyquist frequency of the *smaller* box along any axis
      (frequency ``-m/2`` for an even size ``m``; in the half-complex layout also ``+m/2`` on the last axis) is
      set to zero. This keeps the result real and Hermitian-consistent for all parities, so that cropping then
      padding back returns an image that was band-limited below the smaller box's Nyquist frequency exactly.
    * ``ndim`` (2 or 3): see :func:`_infer_ndim`; pass ``ndim=2`` for a batch of exactly ``n`` images.
    """
    d = _infer_ndim(tuple(x.shape), ndim, half=False)
    n = x.shape[-1]
    if any(s != n for s in x.shape[-d:]):
        raise ValueError(f"fourier_rescale expects square/cubic arrays, got shape {tuple(x.shape)}")
    if new_n < 1:
        raise ValueError(f"new_n must be >= 1, got {new_n}")
    if new_n == n:
        return x.clone()
    dims = tuple(range(-d, 0))
    ft = torch.fft.rfftn(torch.fft.ifftshift(x, dim=dims), dim=dims)
    small = min(n, new_n)
    dev = x.device
    # Non-last axes: source index for each new index, valid where the frequency exists in both grids and is
    # not the smaller grid's Nyquist frequency.
    f_new = torch.fft.fftfreq(new_n, d=1.0 / new_n, device=dev).round().long()
    valid = f_new.abs() < (small + 1) // 2 if small % 2 == 1 else f_new.abs() < small // 2
    src = torch.remainder(f_new, n)
    # Last (half) axis
    j_new = torch.arange(new_n // 2 + 1, device=dev)
    valid_x = j_new < (small // 2 if small % 2 == 0 else small // 2 + 1)
    src_x = torch.clamp(j_new, max=n // 2)
    out = ft
    for ax in range(-d, -1):
        out = torch.index_select(out, ax, src)
        shape = [1] * out.dim()
        shape[ax] = new_n
        out = out * valid.view(shape).to(out.real.dtype)
    out = torch.index_select(out, -1, src_x) * valid_x.to(out.real.dtype)
    out = out * (float(new_n) / n) ** d
    res = torch.fft.irfftn(out, s=(new_n,) * d, dim=dims)
    return torch.fft.fftshift(res, dim=dims).to(x.dtype)


def _radius_for(ft: torch.Tensor, ndim: int | None) -> tuple[torch.Tensor, int]:
    d = _infer_ndim(tuple(ft.shape), ndim, half=True)
    n = ft.shape[-2]
    if ft.shape[-1] != n // 2 + 1 or (d == 3 and ft.shape[-3] != n):
        raise ValueError(f"expected a half-complex FT [..., N, N//2+1] or [..., N, N, N//2+1], got {tuple(ft.shape)}")
    dt = torch.float64
    r = radius_2d(n, device=ft.device, dtype=dt) if d == 2 else radius_3d(n, device=ft.device, dtype=dt)
    return r, n


def resolution_shell(n: int, pixel_size: float, res_A: float) -> float:
    """The Fourier shell (pixels of an ``n`` box) of resolution ``res_A`` Å at ``pixel_size`` Å/px, rounded as
    RELION's ``ROUND`` does (``floor(x + 0.5)``): ``n · pixel_size / res_A``."""
    if res_A <= 0 or pixel_size <= 0:
        raise ValueError(f"res_A and pixel_size must be positive (got {res_A}, {pixel_size})")
    return float(math.floor(n * pixel_size / res_A + 0.5))


def lowpass_weights(r: torch.Tensor, cutoff: float, edge_px: float = 2.0, *, edge: str = "centred",
                    clamp_at_zero: bool = True) -> torch.Tensor:
    """The one low-pass profile of cryopipe: factor at Fourier radius ``r`` (any shape; the unit of ``r``,
    ``cutoff`` and ``edge_px`` is the caller's: Fourier pixels for RELION's filters, cycles/px for
    :func:`lowpass_real`).

    1 for ``r < lo``, 0 for ``r > hi`` and the raised cosine ``0.5 + 0.5·cos(π·(r − lo)/(hi − lo))`` between;
    ``hi <= lo`` (``edge_px = 0``) gives a hard cutoff keeping ``r <= lo``. Where the edge sits (RELION's variants
    as options, not separate functions):

    * ``edge="centred"``: ``lo = cutoff − edge_px/2``, ``hi = cutoff + edge_px/2`` (0.5 at the cutoff):
      RELION's ``lowPassFilterMap`` (with ``clamp_at_zero``: ``lo = max(0, lo)``) and
      ``initialLowPassFilterReferences`` (``clamp_at_zero=False``);
    * ``edge="outside"``: ``lo = cutoff``, ``hi = cutoff + edge_px`` (1 up to the cutoff, the edge beyond it;
      the 3D optimiser's initial-reference filter).
    """
    if edge_px < 0:
        raise ValueError(f"edge_px must be >= 0, got {edge_px}")
    if edge == "centred":
        lo, hi = cutoff - edge_px / 2.0, cutoff + edge_px / 2.0
    elif edge == "outside":
        lo, hi = cutoff, cutoff + edge_px
    else:
        raise ValueError(f"edge must be 'centred' or 'outside', not {edge!r}")
    if clamp_at_zero:
        lo = max(0.0, lo)
    if hi <= lo:
        return (r <= lo).to(r.dtype)
    t = ((r - lo) / (hi - lo)).clamp(0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def lowpass(ft: torch.Tensor, res_A: float, pixel_size: float, edge_px: float = 2.0,
            ndim: int | None = None, *, edge: str = "centred") -> torch.Tensor:
    """Low-pass filter a centred half-complex FT (2D ``[..., N, N//2+1]`` or 3D ``[..., N, N, N//2+1]``).

    The cutoff shell is :func:`resolution_shell` ``(N, pixel_size, res_A)`` (RELION's ``lowPassFilterMap``), the
    profile :func:`lowpass_weights` with ``edge_px`` (Fourier pixels) placed by ``edge``. ``res_A`` and
    ``pixel_size`` in Å. ``edge_px = 0`` gives a hard cutoff keeping ``|k| <= shell``. Returns a new tensor.
    """
    r, n = _radius_for(ft, ndim)
    w = lowpass_weights(r, resolution_shell(n, pixel_size, res_A), edge_px, edge=edge)
    return ft * w.to(ft.real.dtype if ft.is_complex() else ft.dtype)


def lowpass_map(x: torch.Tensor, cutoff_px: float, edge_px: float = 2.0, *, ndim: int = 3, edge: str = "centred",
                clamp_at_zero: bool = True) -> torch.Tensor:
    """Low-pass real square images ``[..., N, N]`` (``ndim=2``) or cubic maps ``[..., N, N, N]`` at ``cutoff_px``
    Fourier pixels (a resolution ``res_A`` is :func:`resolution_shell` ``(N, pixel_size, res_A)`` rounded as
    RELION, or ``N·pixel_size/res_A`` unrounded) with the profile of :func:`lowpass_weights` (``edge_px``,
    ``edge``, ``clamp_at_zero`` as there). Computed in float64, returned in ``x``'s dtype."""
    dims = tuple(range(-ndim, 0))
    n = x.shape[-1]
    if x.dim() < ndim or len(set(x.shape[-ndim:])) != 1:
        raise ValueError(f"low-pass filtering needs a {'cubic map' if ndim == 3 else 'square image'}, "
                         f"got shape {tuple(x.shape)}")
    r = (radius_2d if ndim == 2 else radius_3d)(n, device=x.device, dtype=torch.float64)
    w = lowpass_weights(r, float(cutoff_px), edge_px, edge=edge, clamp_at_zero=clamp_at_zero)
    # the radius is the same for the centred and the plain FT (the centring is a phase factor)
    ft = torch.fft.rfftn(x.to(torch.float64), dim=dims)
    return torch.fft.irfftn(ft * w, s=(n,) * ndim, dim=dims).to(x.dtype)


def lowpass_real(x: torch.Tensor, cutoff: float, ndim: int = 3) -> torch.Tensor:
    """Hard low-pass of the last ``ndim`` axes of a real array of any shape (e.g. a non-cubic tomogram
    ``[nz, ny, nx]``): keeps ``|k| <= cutoff`` cycles per pixel (0.5 = Nyquist), with ``k`` measured per axis
    in that axis's own grid (:func:`lowpass_weights` with no edge). For square/cubic arrays at a resolution in
    Å use :func:`lowpass_map` or :func:`lowpass`."""
    dims = tuple(range(-ndim, 0))
    ft = torch.fft.rfftn(x, dim=dims)
    k2 = torch.zeros(ft.shape[-ndim:], dtype=torch.float64, device=x.device)
    for axis, n in enumerate(x.shape[-ndim:]):
        f = torch.fft.rfftfreq(n, device=x.device) if axis == ndim - 1 else torch.fft.fftfreq(n, device=x.device)
        shape = [1] * ndim
        shape[axis] = -1
        k2 = k2 + f.to(torch.float64).reshape(shape) ** 2
    # compare squared radii (exact for on-grid frequencies), as the hard profile of lowpass_weights
    w = lowpass_weights(k2, float(cutoff) ** 2, 0.0).to(ft.real.dtype)
    return torch.fft.irfftn(ft * w, s=x.shape[-ndim:], dim=dims).to(x.dtype)


def highpass(ft: torch.Tensor, res_A: float, pixel_size: float, edge_px: float = 2.0,
             ndim: int | None = None) -> torch.Tensor:
    """High-pass counterpart of :func:`lowpass`: multiplies by ``1 − lowpass_weights`` (0 below
    ``shell − edge_px/2``, 1 above ``shell + edge_px/2``, raised cosine in between), so that
    ``lowpass(ft) + highpass(ft) == ft``. ``res_A``/``pixel_size`` in Å."""
    r, n = _radius_for(ft, ndim)
    w = 1.0 - lowpass_weights(r, resolution_shell(n, pixel_size, res_A), edge_px)
    return ft * w.to(ft.real.dtype if ft.is_complex() else ft.dtype)


def fourier_crop_2d(ft: torch.Tensor, new_n: int) -> torch.Tensor:
    """Keep the frequencies of a smaller ``new_n × new_n`` box from half-complex FTs ``[..., n, n//2+1]``
    (``new_n <= n``); the phase origin stays at the centre pixel. Values are not rescaled (the mean of the
    image scales by ``(n/new_n)²``); the smaller box's Nyquist row takes the ``−new_n/2`` frequency."""
    n = ft.shape[-2]
    if new_n > n:
        raise ValueError(f"fourier_crop_2d: new box {new_n} is larger than {n}")
    rows = torch.remainder(torch.fft.fftfreq(new_n, d=1.0 / new_n, device=ft.device).round().long(), n)
    return ft.index_select(-2, rows)[..., : new_n // 2 + 1]
