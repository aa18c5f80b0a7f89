"""Laplacian-of-Gaussian (LoG) blob picker, RELION's ``relion_autopick --LoG``.

Re-derived from RELION 5 ``src/autopicker.cpp`` (``initialise``, ``autoPickLoGOneMicrograph``,
``getGoodFourierDims``) and ``src/fftw.cpp`` (``LoGFilterMap``), and checked against RELION-written
coordinate files (same picks, same order, same FOMs). The steps, for a micrograph of ``H × W`` pixels
(``N = max(H, W)``, pixel size ``apix`` Å):

1. **Normalise** (statistics in float64): pixels with ``|x − μ| / σ > outlier_zscore`` are set to ``μ``, then
   ``x ← (x − μ) / σ`` with the mean and population standard deviation of the *raw* micrograph; ``x ← −x``
   unless ``invert`` (``--Log_invert``: white particles), so that dark particles give positive responses.
   A non-square micrograph is centred in an ``N × N`` square (logical origins ``size // 2`` aligned) whose
   extra pixels are white Gaussian noise N(0, 1).
2. **Work grid**: ``downsize = 2·round(N·apix / lowpass)`` (``N`` when ``lowpass`` is None); ``shrink = 0``
   → ``work = downsize``; ``0 < shrink ≤ 1`` → ``work = round(shrink·N)`` made even; ``shrink > 1`` →
   ``work = round(shrink)`` made even (must be < N). The size is then moved to the nearest even size whose
   FFTs (``work`` and ``work/2+1``) have no prime factor ≥ 43 (RELION's ``getGoodFourierDims``; ties go up,
   never above ``N``), unless ``optimise_scale=False`` (``--skip_optimise_scale``). ``scale = work / N``
   (float32, as RELION).
3. **Fourier crop**: the FT of the ``N × N`` image (forward transform divided by ``N²``, RELION's FFTW
   normalisation) is windowed to the ``work × (work/2+1)`` half grid keeping the integer frequencies
   ``(ky, kx)`` with ``−work/2 < ky ≤ work/2``, ``0 ≤ kx ≤ work/2``; the inverse transform is not
   normalised, so real-space values are those of the full-size filtered image sampled every ``1/scale`` px.
4. **Filters**, one per diameter ``d`` (Å) of ``round(dmin/k)`` for ``k = max_search … 2``, ``dmin``,
   ``(dmin+dmax)/2``, ``dmax``, ``round(dmax·k)`` for ``k = 2 … max_search``: the FT is multiplied by
   ``r²·exp(−r²/(2s²))/s²`` with ``r² = kx² + ky²`` in Fourier pixels of the *full* micrograph and
   ``s = 0.5·N·apix/d`` (a scale-normalised LoG; its real-space blob radius is ``d/2`` Å). Per work pixel the
   best response over the diameters is the FOM and its diameter the best size (first diameter on ties).
   All diameters are filtered in one batched inverse FFT.
5. **Edge band**: ``skip = int(max(skip_side, 0.5·dmin/apix))`` micrograph pixels, ``int(skip·scale)`` work
   pixels; FOMs outside ``[first + skip, last − skip]`` of the micrograph's extent on the work grid are set to 0.
6. **Statistics and threshold**: pixels whose best diameter is outside ``[dmin, dmax]`` get FOM 0; over the
   other ("ok") pixels (edge band included, with FOM 0) ``μ_ok, σ_ok`` (population) give
   ``thr = μ_ok + adjust_threshold·σ_ok`` and ``upper = μ_ok + upper_threshold·σ_ok``; FOM < thr → 0.
7. **Greedy picking** (:func:`cryopipe.picking.peaks.greedy_disc_suppression`): take the maximum, emit it if
   FOM < upper, zero a disc of radius ``round(scale·(d_best + dmin)·neighbour/100 / 2 / apix)`` work pixels
   (strictly inside), repeat while the maximum is > 0. Coordinates in micrograph pixels are
   ``(index − work/2 + int(W·scale)//2) / scale`` (RELION's ``FIRST_XMIPP_INDEX`` bookkeeping).

``use_ctf`` (``--LoG_use_ctf``) divides the cropped FT by the CTF up to its first peak (``|γ| ≤ π/2``) and by
1 beyond, without envelope. ``robust_threshold`` (cryopipe only, off by default) replaces ``μ_ok, σ_ok`` by the
median and ``1.4826·MAD`` of the ok pixels' FOMs (contamination then no longer raises the threshold).

Cost: one pass over the micrograph in row blocks (statistics and the row FFTs, of which only the
``work/2+1`` lowest columns are kept), a column FFT of those, and one batched inverse FFT of all diameters on
the work grid; about 0.1 CPU-second for a 4096² micrograph at 1.5 Å with the default ``--shrink 0 --lowpass 20``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cryopipe.errors import CryopipeError
from cryopipe.picking.common import PickTable, WorkGridMixin
from cryopipe.picking.peaks import greedy_disc_suppression

__all__ = [
    "LARGEST_ACCEPTABLE_PRIME",
    "largest_prime_factor",
    "good_fourier_size",
    "log_work_size",
    "log_diameters",
    "log_filters",
    "LoGMaps",
    "log_fom_maps",
    "log_pick",
    "log_pick_from_maps",
]

#: RELION's bound on the largest prime factor of the work size and of ``work/2 + 1``.
LARGEST_ACCEPTABLE_PRIME = 43


def _c_round(x: float) -> int:
    """RELION's ``ROUND``: half away from zero, then truncate (C ``(int)``)."""
    return int(x + 0.5) if x > 0 else int(x - 0.5)


def largest_prime_factor(n: int) -> int:
    """Largest prime factor of ``n`` (``n`` itself for ``n <= 3``), as RELION's ``largestPrime``."""
    i, rest = 2, int(n)
    while i * i <= rest:
        if rest % i:
            i += 1
        else:
            rest //= i
    return rest


def _fft_prime(n: int) -> int:
    return max(largest_prime_factor(n), largest_prime_factor(n // 2 + 1))


def good_fourier_size(requested: int, limit: int, optimise: bool = True) -> int:
    """RELION's ``getGoodFourierDims``: an even size near ``requested`` with small prime factors.

    If ``requested`` and ``requested/2 + 1`` have no prime factor above :data:`LARGEST_ACCEPTABLE_PRIME`,
    it is returned unchanged. Otherwise the nearest sizes in steps of 2 upwards and downwards with all prime
    factors below the bound are found; the lower one is chosen when it is strictly closer or the upper one
    exceeds ``limit`` (the micrograph size), else the upper one. ``optimise=False`` returns ``requested``.
    """
    requested = int(requested)
    if not optimise or _fft_prime(requested) <= LARGEST_ACCEPTABLE_PRIME:
        return requested
    up = requested
    while _fft_prime(up) >= LARGEST_ACCEPTABLE_PRIME and up <= limit + 2:
        up += 2
    down = requested
    while _fft_prime(down) >= LARGEST_ACCEPTABLE_PRIME:
        down -= 2
    if (up - requested) > (requested - down) or up > limit:
        return down
    return up


def log_work_size(size: int, pixel_size: float, lowpass: float | None = 20.0, shrink: float = 0.0,
                  optimise_scale: bool = True) -> int:
    """Size (pixels) of the square working grid for a micrograph of ``size`` pixels (the larger side).

    ``shrink``: ``0`` → the lowpass size ``2·round(size·pixel_size/lowpass)``; ``0 < shrink ≤ 1`` → that
    fraction of ``size``; ``shrink > 1`` → that size (must be < ``size``). Then :func:`good_fourier_size`
    (unless ``optimise_scale`` is False) and made even. ``lowpass`` None (or ≤ 0) means no lowpass (``size``).
    """
    size = int(size)
    if lowpass is None or lowpass <= 0:
        downsize = size
    else:
        downsize = 2 * _c_round(size * pixel_size / lowpass)
    frac = np.float32(shrink)  # RELION keeps --shrink in a float
    if frac > 1:
        target = _c_round(float(frac))
        target -= target % 2
        if target >= size:
            raise CryopipeError(f"--shrink {shrink}: a work size of {target} px is not smaller than the micrograph "
                                f"({size} px); give a fraction 0 < shrink <= 1 or a size < {size}")
        work = good_fourier_size(target, size, optimise_scale)
    elif frac > 0:
        target = _c_round(float(frac) * size)
        target -= target % 2
        work = good_fourier_size(target, size, optimise_scale)
    elif frac == 0:
        work = good_fourier_size(downsize, size, optimise_scale)
    else:
        raise CryopipeError(f"--shrink {shrink}: negative values are not allowed (0 = downscale to the lowpass "
                            "resolution, 0 < s <= 1 = fraction, s > 1 = size in pixels)")
    work -= work % 2
    if work < 2:
        raise CryopipeError(f"LoG work size {work} px is too small (micrograph {size} px, --lowpass {lowpass}, "
                            f"--shrink {shrink}); use a smaller --lowpass or a larger --shrink")
    return work


def log_diameters(diam_min: float, diam_max: float, max_search: float = 5.0) -> list[float]:
    """Diameters (Å) searched by the LoG picker, in RELION's order.

    ``round(dmin/k)`` for ``k = int(max_search) … 2``, then ``dmin``, ``(dmin+dmax)/2``, ``dmax``, then
    ``round(dmax·k)`` for ``k = 2 … max_search``. Those outside ``[dmin, dmax]`` only serve to reject blobs
    that are too small or too large.
    """
    diams: list[float] = [float(_c_round(diam_min / k)) for k in range(int(max_search), 1, -1)]
    diams += [float(diam_min), (diam_max + diam_min) / 2.0, float(diam_max)]
    k = 2
    while k <= max_search:
        diams.append(float(_c_round(diam_max * k)))
        k += 1
    return diams


def _work_frequencies_sq(work: int, device, dtype) -> torch.Tensor:
    """``kx² + ky²`` (integer Fourier pixels) on the half grid ``[work, work//2+1]``."""
    ky = torch.fft.fftfreq(work, d=1.0 / work, device=device, dtype=dtype)
    kx = torch.arange(work // 2 + 1, device=device, dtype=dtype)
    return ky[:, None] ** 2 + kx[None, :] ** 2


def log_filters(work: int, size: int, pixel_size: float, diameters, device=None,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Scale-normalised LoG filters ``[D, work, work//2+1]`` on the cropped half grid.

    ``r²·exp(−r²/(2s²))/s²`` with ``r`` in Fourier pixels of the ``size``-pixel micrograph and
    ``s = 0.5·size·pixel_size/d`` for each diameter ``d`` (Å) — RELION's ``LoGFilterMap``.
    """
    r2 = _work_frequencies_sq(work, device, dtype)
    d = torch.as_tensor(list(diameters), device=device, dtype=dtype)
    s2 = ((0.5 * size * pixel_size) / d) ** 2
    s2 = s2[:, None, None]
    return r2[None] * torch.exp(-0.5 * r2[None] / s2) / s2


@functools.lru_cache(maxsize=8)
def _cached_filters(work: int, size: int, pixel_size: float, diameters: tuple[float, ...], device: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """:func:`log_filters` memoised for a run over many micrographs of one size (read-only result)."""
    return log_filters(work, size, pixel_size, diameters, device=torch.device(device), dtype=dtype)


def _row_chunk(device: torch.device, rows: int) -> int:
    """Rows per block of the pass over the micrograph: on the CPU at most 8 blocks of at least 128 rows (blocks
    stay in cache; few blocks keep the number of parallel regions low on a busy machine), all rows on a GPU."""
    if device.type != "cpu":
        return max(rows, 1)
    return max(128, -(-rows // 8))


def _row_pass(x: torch.Tensor, shift: float, keep_cols: int, chunk: int
              ) -> tuple[torch.Tensor | None, float, float, float, float]:
    """One pass over the rows of ``x − shift`` in blocks of ``chunk`` rows.

    Returns ``(fx, Σ, Σ², min, max)`` where ``fx`` ``[rows, keep_cols]`` holds the first ``keep_cols``
    coefficients of each row's real FFT (None when ``keep_cols`` is 0). Working block by block keeps the data
    in cache and avoids the full ``[N, N/2+1]`` complex intermediate.
    """
    rows, cols = x.shape
    fx = None
    if keep_cols > 0:
        ctype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        fx = torch.empty((rows, keep_cols), dtype=ctype, device=x.device)
    s1 = s2 = 0.0
    lo, hi = math.inf, -math.inf
    for r in range(0, rows, chunk):
        c = x[r:r + chunk] - shift
        s1 += float(c.sum())
        s2 += float(torch.linalg.vector_norm(c)) ** 2
        cmin, cmax = torch.aminmax(c)
        lo, hi = min(lo, float(cmin)), max(hi, float(cmax))
        if fx is not None:
            fx[r:r + chunk] = torch.fft.rfft(c, dim=-1)[:, :keep_cols]
    return fx, s1, s2, lo, hi


def _rows_rfft(x: torch.Tensor, keep_cols: int, chunk: int) -> torch.Tensor:
    """First ``keep_cols`` coefficients of the real FFT of each row of ``x``, block by block."""
    ctype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    fx = torch.empty((x.shape[0], keep_cols), dtype=ctype, device=x.device)
    for r in range(0, x.shape[0], chunk):
        fx[r:r + chunk] = torch.fft.rfft(x[r:r + chunk], dim=-1)[:, :keep_cols]
    return fx


def _crop_columns_ft(fx: torch.Tensor, work: int) -> torch.Tensor:
    """From the row transforms ``[N, work/2+1]`` of a square image, the 2D FT windowed to ``[work, work/2+1]``
    (RELION's ``windowFourierTransform``: rows ``ky = 0 … work/2`` and ``−work/2+1 … −1``)."""
    n = fx.shape[0]
    h = work // 2
    f = torch.fft.fft(fx, dim=0)
    if work == n:
        return f
    return torch.cat([f[: h + 1], f[n - h + 1:]], dim=0)


def _upsized_ft(image: torch.Tensor, work: int) -> torch.Tensor:
    """Work size above the micrograph size (lowpass finer than Nyquist): RELION zero-pads the FT, keeping only
    ``|k| <= N/2``."""
    n = image.shape[-1]
    h = work // 2
    full = torch.fft.rfft2(image)
    out = torch.zeros((work, h + 1), dtype=full.dtype, device=full.device)
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=full.device).round().long()
    ky = torch.where(torch.arange(n, device=full.device) == n // 2, torch.full_like(ky, n // 2), ky)  # FFTW: +N/2
    kx = torch.arange(n // 2 + 1, device=full.device)
    keep = (ky[:, None] ** 2 + kx[None, :] ** 2) <= (n // 2) ** 2
    rows = (ky % work)[:, None].expand(n, n // 2 + 1)
    cols = kx[None, :].expand(n, n // 2 + 1)
    out[rows[keep], cols[keep]] = full[keep]
    return out


def _ctf_first_peak(work: int, size: int, pixel_size: float, ctf: Mapping[str, float], device,
                    dtype: torch.dtype) -> torch.Tensor:
    """CTF ``−sin γ`` on the cropped half grid (frequencies of the ``size``-pixel micrograph), set to 1 where
    ``|γ| > π/2`` (after the first peak), no envelope — RELION's ``getFftwImage(..., intact_after_first_peak)``.
    """
    from cryopipe.core.ctf import ctf_gamma
    from cryopipe.core.fourier import freq_grid_2d

    kx, ky = freq_grid_2d(work, device=device, dtype=torch.float64)
    per_A = 1.0 / (size * pixel_size)  # frequencies of the full micrograph
    gamma = ctf_gamma(kx * per_A, ky * per_A, float(ctf["defocus_u"]), float(ctf["defocus_v"]),
                      float(ctf["defocus_angle"]), voltage=float(ctf.get("voltage", 300.0)),
                      cs=float(ctf.get("cs", 2.7)), amplitude_contrast=float(ctf.get("amplitude_contrast", 0.1)),
                      phase_shift=float(ctf.get("phase_shift", 0.0)))
    value = torch.where(gamma.abs() > math.pi / 2, torch.ones_like(gamma), -torch.sin(gamma))
    return value.to(device=device, dtype=dtype)


@dataclass
class LoGMaps(WorkGridMixin):
    """Per-pixel LoG results on the work grid.

    Attributes:
        best_fom: ``[work, work]`` float32, best filter response over the diameters (RELION's ``bestLoG``).
        best_diameter: ``[work, work]`` float32, diameter (Å) giving it (RELION's ``bestSize``).
        diameters: the searched diameters (Å), in order.
        work_size: side of the work grid (pixels).
        scale: ``work_size / size`` as float32 (RELION keeps it in a float).
        size: side ``N`` of the square the micrograph was padded to (pixels).
        shape: ``(H, W)`` of the micrograph.
    """

    best_fom: torch.Tensor
    best_diameter: torch.Tensor
    diameters: list[float]
    work_size: int
    scale: float
    size: int
    shape: tuple[int, int]



def log_fom_maps(micrograph: torch.Tensor, pixel_size: float, diam_min: float, diam_max: float, *,
                 lowpass: float | None = 20.0, shrink: float = 0.0, invert: bool = False, max_search: float = 5.0,
                 outlier_zscore: float = 8.0, use_ctf: bool = False, ctf: Mapping[str, float] | None = None,
                 optimise_scale: bool = True, seed: int = 1, dtype: torch.dtype | None = None) -> LoGMaps:
    """Steps 1–4 of the LoG picker (see the module docstring): best FOM and best diameter per work pixel.

    Args:
        micrograph: ``[H, W]`` tensor (any real dtype), computed on its device.
        pixel_size: Å per micrograph pixel.
        diam_min, diam_max: particle diameter range (Å).
        lowpass: resolution (Å) that sets the work size for ``shrink=0`` (None: no lowpass).
        shrink: RELION ``--shrink`` (0, fraction, or size).
        invert: particles are white (``--Log_invert``).
        max_search: ``--Log_max_search``.
        outlier_zscore: ``--outlier_removal_zscore``.
        use_ctf, ctf: divide by the CTF up to its first peak; ``ctf`` maps ``defocus_u``, ``defocus_v`` (Å),
            ``defocus_angle`` (deg), ``voltage`` (kV), ``cs`` (mm), ``amplitude_contrast``, ``phase_shift`` (deg).
        optimise_scale: False = RELION ``--skip_optimise_scale``.
        seed: seed of the N(0,1) noise that pads non-square micrographs.
        dtype: dtype of the image, FFTs and filters (default float32; the statistics are accumulated in
            float64 either way). float32 reproduces RELION's (double-precision) picks on the test fixtures.
    """
    if micrograph.ndim != 2:
        raise CryopipeError(f"LoG picking needs a 2D micrograph, got shape {tuple(micrograph.shape)}")
    if not (diam_min > 0 and diam_max >= diam_min):
        raise CryopipeError(f"--LoG_diam_min {diam_min} / --LoG_diam_max {diam_max}: need 0 < min <= max (Å)")
    if not pixel_size > 0:
        raise CryopipeError(f"pixel size {pixel_size} Å is not positive; give --angpix")
    device = micrograph.device
    dt = dtype or torch.float32
    h, w = micrograph.shape
    n = max(h, w)
    work = log_work_size(n, pixel_size, lowpass, shrink, optimise_scale)

    # 1-3. One pass over the rows (block by block): statistics of the raw micrograph and, for a square
    # micrograph, the row FFTs cropped to the work columns. Mean and population σ: float32 block sums of the
    # image minus a subsampled mean estimate (accurate for large offsets), accumulated in float64. Outliers
    # (|x − μ| > zσ) -> μ (then the pass is redone on the corrected image, rare). The factor sign/σ and RELION's
    # forward normalisation 1/N² are applied to the small cropped FT; its inverse is unnormalised.
    x = micrograph if micrograph.dtype == dt else micrograph.to(dt)
    npix = h * w
    chunk = _row_chunk(device, n)
    shift = float(x[:: max(1, h // 64)].double().mean())
    square_fast = h == w and work <= n
    fx, s1, s2, lo, hi = _row_pass(x, shift, work // 2 + 1 if square_fast else 0, chunk)
    mean_d = s1 / npix  # micrograph mean = shift + mean_d
    std = math.sqrt(max(s2 / npix - mean_d * mean_d, 0.0))
    if not std > 0:
        raise CryopipeError("micrograph has zero variance (constant image); cannot pick on it")
    limit = outlier_zscore * std
    outliers = lo - mean_d < -limit or hi - mean_d > limit
    if square_fast and not outliers:
        ft = _crop_columns_ft(fx, work)
    else:
        d = x - (shift + mean_d)
        if outliers:
            d = torch.where(d.abs() > limit, torch.zeros((), dtype=dt, device=device), d)
        if h != w:
            # white N(0,1) noise (in normalised units) around the micrograph, centred as RELION's rewindow
            gen = torch.Generator(device=device)
            gen.manual_seed(int(seed))
            square = torch.randn((n, n), generator=gen, device=device, dtype=dt) * std
            r0, c0 = n // 2 - h // 2, n // 2 - w // 2
            square[r0:r0 + h, c0:c0 + w] = d
            d = square
        ft = _crop_columns_ft(_rows_rfft(d, work // 2 + 1, chunk), work) if work <= n else _upsized_ft(d, work)
    ft = ft * (((1.0 if invert else -1.0) / std) / (n * n))
    if use_ctf:
        if ctf is None:
            raise CryopipeError("--LoG_use_ctf needs CTF parameters for each micrograph (rlnDefocusU/V/Angle in the input STAR)")
        ft = ft / _ctf_first_peak(work, n, pixel_size, ctf, device, dt)

    # 4. all diameters at once
    diams = log_diameters(diam_min, diam_max, max_search)
    filt = _cached_filters(work, n, float(pixel_size), tuple(diams), str(device), dt)
    maps = torch.fft.irfft2(ft[None] * filt, s=(work, work), norm="forward")
    best, arg = maps.max(dim=0)
    diam_f32 = torch.tensor(diams, dtype=torch.float32, device=device)
    scale = float(np.float32(work) / np.float32(n))
    return LoGMaps(best_fom=best.to(torch.float32), best_diameter=diam_f32[arg], diameters=diams,
                   work_size=work, scale=scale, size=n, shape=(int(h), int(w)))


def log_pick_from_maps(maps: LoGMaps, pixel_size: float, diam_min: float, diam_max: float, *,
                       adjust_threshold: float = 0.0, upper_threshold: float = 99999.0, neighbour: float = 100.0,
                       skip_side: int = 0, robust_threshold: bool = False) -> PickTable:
    """Steps 5–7 of the LoG picker (edge band, thresholds, greedy picking) on precomputed :class:`LoGMaps`.

    Args:
        adjust_threshold: ``--LoG_adjust_threshold`` (in σ_ok; positive = fewer picks).
        upper_threshold: ``--LoG_upper_threshold`` (in σ_ok; maxima at or above are not emitted, e.g. ice
            contamination, but still suppress their neighbourhood).
        neighbour: ``--LoG_neighbour`` (%): exclusion disc diameter = (best diameter + dmin)·neighbour/100.
        skip_side: ``--skip_side`` extra edge (micrograph pixels); at least ``0.5·dmin/apix`` is skipped.
        robust_threshold: not in RELION (default off = RELION's rule). Use the median and ``1.4826·MAD`` of the
            ok pixels' FOMs instead of their mean and σ for both thresholds. Contamination (ice, carbon edges)
            gives a few very high FOMs that inflate σ and with RELION's rule raise the threshold above the
            particles; the robust statistics ignore them, so ``upper_threshold`` can then remove contamination
            without losing particles. The numbers differ from RELION's σ units (typical thresholds are higher).
    """
    fom = maps.best_fom
    size_f = maps.best_diameter
    device = fom.device
    scale32 = np.float32(maps.scale)
    zero = torch.zeros((), dtype=fom.dtype, device=device)

    # 6a. pixels whose best diameter is in range ("ok"); the others get FOM 0
    size64 = size_f.double()
    ok = (size64 <= float(diam_max)) & (size64 >= float(diam_min))
    keep = ok.clone()
    count = int(ok.sum())
    if count == 0:
        return PickTable.empty(device)

    # 5. edge band (before the statistics: ok pixels in the band count with FOM 0, as in RELION)
    skip = int(max(float(skip_side), 0.5 * diam_min / pixel_size))
    my_skip = int(np.float32(skip) * scale32)
    if my_skip > 0:
        hy, wx = maps.extent()
        r0, c0 = maps.first_index()
        inner = torch.zeros_like(keep)
        inner[r0 + my_skip: r0 + hy - my_skip, c0 + my_skip: c0 + wx - my_skip] = True
        keep &= inner
    fom = torch.where(keep, fom, zero)

    # 6b. mean and population σ of the ok pixels' FOMs (zeros elsewhere add nothing), thresholds
    if robust_threshold:
        vals = fom[ok].double()
        mean_ok = float(vals.median())
        sd_ok = 1.4826 * float((vals - mean_ok).abs().median())
    else:
        f64 = fom.double()
        mean_ok = float(f64.sum()) / count
        var_ok = float((f64 * f64).sum()) / count - mean_ok * mean_ok
        sd_ok = math.sqrt(max(var_ok, 0.0))
    thr = np.float32(mean_ok + adjust_threshold * sd_ok)
    upper = np.float32(mean_ok + upper_threshold * sd_ok)
    fom = torch.where(fom < float(thr), zero, fom)

    # 7. greedy picking with disc suppression
    fudge = neighbour / 100.0
    rad = torch.floor(float(scale32) * (size64 + float(diam_min)) * fudge / 2.0 / pixel_size + 0.5).to(torch.int64)
    rows, cols = greedy_disc_suppression(fom, rad, emit_below=float(upper))
    r0, c0 = maps.first_index()
    x = (cols - c0).double() / float(scale32)
    y = (rows - r0).double() / float(scale32)
    return PickTable(x=x, y=y, fom=fom[rows, cols].double(), diameter=size_f[rows, cols].double())


def log_pick(micrograph: torch.Tensor, pixel_size: float, diam_min: float, diam_max: float, *,
             lowpass: float | None = 20.0, shrink: float = 0.0, adjust_threshold: float = 0.0,
             upper_threshold: float = 99999.0, invert: bool = False, neighbour: float = 100.0,
             max_search: float = 5.0, outlier_zscore: float = 8.0, use_ctf: bool = False,
             ctf: Mapping[str, float] | None = None, skip_side: int = 0, optimise_scale: bool = True,
             robust_threshold: bool = False, seed: int = 1, dtype: torch.dtype | None = None) -> PickTable:
    """Pick blobs of diameter ``diam_min … diam_max`` Å on one micrograph with RELION's LoG picker.

    Args: see :func:`log_fom_maps` and :func:`log_pick_from_maps` (RELION option names in brackets there).
    ``micrograph`` is ``[H, W]`` (rows = y, columns = x); ``pixel_size`` in Å.

    Returns:
        :class:`PickTable` in emission order (decreasing FOM): ``x, y`` in micrograph pixels (fractional:
        work-grid index / scale), ``fom`` (float32 values), ``diameter`` (Å, best LoG diameter).
    """
    maps = log_fom_maps(micrograph, pixel_size, diam_min, diam_max, lowpass=lowpass, shrink=shrink, invert=invert,
                        max_search=max_search, outlier_zscore=outlier_zscore, use_ctf=use_ctf, ctf=ctf,
                        optimise_scale=optimise_scale, seed=seed, dtype=dtype)
    return log_pick_from_maps(maps, pixel_size, diam_min, diam_max, adjust_threshold=adjust_threshold,
                              upper_threshold=upper_threshold, neighbour=neighbour, skip_side=skip_side,
                              robust_threshold=robust_threshold)
