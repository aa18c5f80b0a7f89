"""Post-processing of two half maps (RELION's ``relion_postprocess``): masked / phase-randomised FSC, the
solvent-corrected FSC, resolution, FSC weighting, Guinier fit and B-factor sharpening.

Conventions (see :mod:`cryopipe.core.fourier`): maps ``[N, N, N]`` with the centre at ``N//2``; Fourier
coefficients on the half-complex grid; a coefficient at integer frequency ``k`` (Fourier pixels) belongs to shell
``round(|k|)``; shell ``i`` has resolution ``N·apix/i`` Å (shell 0: 999 Å, as RELION writes it). Resolutions in Å,
spatial frequencies ``s`` in 1/Å (``s = |k| / (N·apix)``), B-factors in Å² (negative B sharpens: amplitudes are
multiplied by ``exp(−B·s²/4)``).

The steps, in RELION's order (:func:`postprocess_maps`):

1. ``FSC_unmasked`` of the half maps; with a mask: ``FSC_masked`` of the masked halves.
2. Phase randomisation (Chen et al. 2013): both halves get random phases for every coefficient with
   ``|k| >= i_r`` (amplitudes kept), are masked, giving ``FSC_random``. ``i_r`` is the first shell ``i > 0`` with
   ``FSC_unmasked < randomize_at_fsc`` (0.8), or ``int(N·apix/randomize_at_A)``.
3. ``FSC_true = FSC_masked`` for shells ``i < i_r + 2``, else ``(FSC_masked − FSC_random)/(1 − FSC_random)``.
4. Resolution: the last shell before ``FSC_true`` first drops below 0.143. If the unmasked FSC stays above 0.143
   further out, RELION warns and (without ``force_mask``) uses the unmasked curve instead.
5. Average of the halves: optional division by the detector MTF, FSC weighting ``sqrt(2·FSC/(1+FSC))``
   (Rosenthal & Henderson 2003; weight 0 from the first shell with FSC < 1e-4), B-factor from a straight-line
   fit of the Guinier plot ``ln(mean |F|)`` against ``s²`` between ``fit_minres`` and ``fit_maxres`` Å
   (``B = 4·slope``) or an ad-hoc B, applied up to Nyquist (coefficients beyond Nyquist are zeroed), optional
   low-pass filter with a raised-cosine edge of ``filter_edge_width`` shells.

Phase randomisation reproduces RELION exactly: the random phases come from the same pseudo-random stream
(glibc ``rand()`` after ``srand(seed)``, RELION's ``--random_seed``, default 0; :class:`RelionRandom`), converted to
single-precision uniform phases in [0, 2π) as RELION's ``rnd_unif`` does, and assigned in RELION's order (all
stored half-complex coefficients with ``|k| >= i_r``, C order of the uncentred transform, half 1 then half 2).
The non-Hermitian ``kx = 0`` (and ``kx = N/2``) planes this creates are made Hermitian explicitly
(``(F(k) + F*(−k))/2``, what a real inverse FFT does with them), so CPU and GPU give the same maps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from cryopipe.core.fourier import freq_grid_3d, irfft3_centered, lowpass, rfft3_centered, shell_index_3d
from cryopipe.core.fsc import fsc_from_ft

__all__ = [
    "RelionRandom",
    "GuinierCurve",
    "PostprocessResult",
    "randomize_phases_beyond",
    "randomization_shell",
    "corrected_fsc",
    "particle_fsc",
    "resolution_shell",
    "fsc_weights",
    "guinier_curve",
    "fit_straight_line",
    "bfactor_filter",
    "mtf_filter",
    "solvent_mask_fraction",
    "postprocess_maps",
]

#: FSC threshold of the gold-standard resolution
FSC_THRESHOLD = 0.143


def _r2_grid(n: int, device) -> torch.Tensor:
    """Integer squared radius ``kx² + ky² + kz²`` on the half-complex grid of an ``n³`` map (int64)."""
    kx, ky, kz = freq_grid_3d(n, device=device, dtype=torch.float64)
    return (kx * kx + ky * ky + kz * kz).round().long()


# ------------------------------------------------------------------------------------------------------------
# FSC bookkeeping
# ------------------------------------------------------------------------------------------------------------

class RelionRandom:
    """The pseudo-random stream of RELION's ``rnd_unif`` (glibc ``random()``/``rand()`` after ``srand(seed)``).

    glibc's generator: ``r[0] = seed`` (0 is taken as 1), ``r[i] = 16807·r[i−1] mod (2³¹ − 1)`` for ``i < 31``,
    ``r[i] = r[i−31]`` for ``i = 31 … 33``, then ``r[i] = r[i−31] + r[i−3] (mod 2³²)``; output ``k`` is
    ``r[k+344] >> 1``. The recurrence is linear, so blocks of ``block`` outputs are computed at once as a matrix
    (``block × 31``, entries mod 2³²) times the last 31 values, in float64 on 16-bit halves (exact). The state
    is explicit in the object; successive calls continue the stream.
    """

    _LAG, _SHORT = 31, 3

    def __init__(self, seed: int = 0, block: int = 8192):
        seed = int(seed) & 0xFFFFFFFF
        if seed == 0:
            seed = 1
        word = seed - (1 << 32) if seed >= (1 << 31) else seed
        r = [word]
        for _ in range(30):
            hi = int(word / 127773)  # C division (truncation), as glibc's srandom_r
            lo = word - hi * 127773
            word = 16807 * lo - 2836 * hi
            if word < 0:
                word += 2147483647
            r.append(word)
        r += r[:3]
        self._state = torch.tensor(r[3:34], dtype=torch.int64) & 0xFFFFFFFF
        rows = torch.zeros(block + self._LAG, self._LAG, dtype=torch.int64)
        rows[: self._LAG] = torch.eye(self._LAG, dtype=torch.int64)
        for t in range(block):  # one-off: the block's outputs as combinations of the previous 31 values
            rows[t + self._LAG] = (rows[t] + rows[t + self._LAG - self._SHORT]) & 0xFFFFFFFF
        mat = rows[self._LAG:]
        self._m_lo = (mat & 0xFFFF).double()
        self._m_hi = (mat >> 16).double()
        self._buffer = torch.zeros(0, dtype=torch.int64)
        self.integers(310)  # glibc discards the first 310 outputs

    def _block(self) -> torch.Tensor:
        s = self._state
        s_lo, s_hi = (s & 0xFFFF).double(), (s >> 16).double()
        lo = (self._m_lo @ s_lo).long()
        mid = ((self._m_lo @ s_hi).long() + (self._m_hi @ s_lo).long()) & 0xFFFF
        out = (lo + (mid << 16)) & 0xFFFFFFFF
        self._state = out[-self._LAG:]
        return out

    def integers(self, count: int) -> torch.Tensor:
        """The next ``count`` values of glibc ``rand()`` (int64 CPU tensor, in [0, 2³¹))."""
        parts = [self._buffer]
        have = self._buffer.numel()
        while have < count:
            blk = self._block()
            parts.append(blk)
            have += blk.numel()
        allv = torch.cat(parts)
        self._buffer = allv[count:]
        return allv[:count] >> 1

    def uniform(self, a: float, b: float, count: int) -> torch.Tensor:
        """RELION's ``rnd_unif(a, b)`` ``count`` times: ``a + float(rand()) / float(RAND_MAX / (b − a))`` in
        single precision (float32 CPU tensor)."""
        fa, fb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
        scale = torch.tensor(2147483647, dtype=torch.float32) / (fb - fa)
        return fa + self.integers(count).to(torch.float32) / scale


def _hermitian_plane(plane: torch.Tensor) -> torch.Tensor:
    """``(P(k) + P*(−k)) / 2`` for a ``[N, N]`` plane of Fourier coefficients indexed by (kz, ky)."""
    mirrored = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    return 0.5 * (plane + mirrored.conj())


def randomize_phases_beyond(volume: torch.Tensor, shell: int, rng: RelionRandom) -> torch.Tensor:
    """The map with random phases for every stored half-complex coefficient with ``|k| >= shell`` (Fourier
    pixels); amplitudes and the lower-frequency coefficients are kept (RELION's ``randomizePhasesBeyond``).

    The phases are ``rng.uniform(0, 2π)`` assigned in C order of the transform of the map as stored (phase origin
    at voxel 0, as RELION/FFTW), so with the same seed the result equals RELION's. Returns a real map of the
    input's dtype and device.
    """
    n = volume.shape[-1]
    dims = (-3, -2, -1)
    ft = torch.fft.rfftn(volume.to(torch.float64), dim=dims)
    sel = _r2_grid(n, volume.device) >= shell * shell
    count = int(sel.sum())
    phase = rng.uniform(0.0, 2.0 * math.pi, count).to(torch.float64).to(volume.device)
    mag = ft[sel].abs()
    ft[sel] = torch.polar(mag, phase)
    ft[..., 0] = _hermitian_plane(ft[..., 0])
    if n % 2 == 0:
        ft[..., n // 2] = _hermitian_plane(ft[..., n // 2])
    return torch.fft.irfftn(ft, s=(n, n, n), dim=dims).to(volume.dtype)


def randomization_shell(fsc_unmasked: torch.Tensor, randomize_at_fsc: float = 0.8,
                        randomize_at_A: float = -1.0, box: int | None = None, pixel_size: float | None = None) -> int:
    """Shell from which phases are randomised: ``int(box·apix/randomize_at_A)`` when ``randomize_at_A > 0``,
    else the first shell ``i > 0`` with ``FSC_unmasked[i] < randomize_at_fsc``; -1 if there is none."""
    if randomize_at_A > 0:
        if box is None or pixel_size is None:
            raise ValueError("randomize_at_A needs box and pixel_size")
        return int(pixel_size * box / randomize_at_A)
    f = torch.as_tensor(fsc_unmasked).reshape(-1).cpu()
    below = torch.nonzero(f[1:] < randomize_at_fsc)
    return int(below[0]) + 1 if below.numel() else -1


def corrected_fsc(fsc_masked: torch.Tensor, fsc_random: torch.Tensor, randomize_at: int) -> torch.Tensor:
    """Solvent-corrected FSC (RELION's ``calculateFSCtrue``): ``FSC_masked`` below shell ``randomize_at + 2``,
    ``(FSC_masked − FSC_random) / (1 − FSC_random)`` from there on. Shell-0 values ``<= 0`` of either input
    are taken as 1 (RELION does the same). Returns float64."""
    fm = torch.as_tensor(fsc_masked, dtype=torch.float64).clone()
    fr = torch.as_tensor(fsc_random, dtype=torch.float64).clone()
    if fm[0] <= 0:
        fm[0] = 1.0
    if fr[0] <= 0:
        fr[0] = 1.0
    i = torch.arange(fm.numel(), device=fm.device)
    corr = (fm - fr) / (1.0 - fr)
    return torch.where(i < randomize_at + 2, fm, corr)


def particle_fsc(fsc_unmasked: torch.Tensor, fraction: float) -> torch.Tensor:
    """cisTEM-style "part FSC" from the unmasked FSC: ``f·FSC / (1 + (f − 1)·FSC)`` with ``f`` the ratio of the
    box-inscribed sphere volume fraction (0.476) to the particle volume fraction."""
    f = torch.as_tensor(fsc_unmasked, dtype=torch.float64)
    return fraction * f / (1.0 + (fraction - 1.0) * f)


def resolution_shell(fsc_curve: torch.Tensor, threshold: float = FSC_THRESHOLD) -> int:
    """Last shell ``i`` (from 0) before the first shell with ``FSC < threshold`` (0 if shell 0 already fails)."""
    f = torch.as_tensor(fsc_curve).reshape(-1).cpu()
    below = torch.nonzero(f < threshold)
    if not below.numel():
        return f.numel() - 1
    return max(int(below[0]) - 1, 0)


def shell_resolution_A(shell: int, box: int, pixel_size: float) -> float:
    """Resolution (Å) of shell ``i``: ``box·apix/i``; 999 for shell 0 (RELION's "no resolution")."""
    return 999.0 if shell <= 0 else box * pixel_size / shell


#: a Guinier fit with fewer shells or a lower r² than this is reported as unreliable
MIN_GUINIER_SHELLS = 10
MIN_GUINIER_R2 = 0.9


def solvent_mask_fraction(mask: torch.Tensor) -> float:
    """RELION's ``rlnParticleBoxFractionSolventMask``: ``0.476 / (fraction of mask voxels > 0.5)``."""
    frac = float((mask > 0.5).double().mean())
    return 0.476 / frac if frac > 0 else math.inf


# ------------------------------------------------------------------------------------------------------------
# Fourier filters (all return real multipliers on the half-complex grid, float64)
# ------------------------------------------------------------------------------------------------------------

def fsc_weights(fsc_curve: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """FSC weighting filter ``sqrt(2·FSC/(1+FSC))`` per shell (Rosenthal & Henderson 2003), RELION rules:
    shells after the first shell with ``FSC < 1e-4`` get 0, shells with ``FSC <= 0`` get 0, as do the
    corners beyond shell ``n//2``. Returns ``[n, n, n//2+1]`` float64."""
    f = torch.as_tensor(fsc_curve, dtype=torch.float64).reshape(-1).to(device)
    below = torch.nonzero(f < 1e-4)
    ires_max = (max(int(below[0]) - 1, 0) if below.numel() else f.numel() - 1)
    w = torch.where(f > 0, torch.sqrt(2 * f.clamp_min(0) / (1 + f.clamp_min(0))), torch.zeros_like(f))
    w[ires_max + 1:] = 0.0
    idx = shell_index_3d(n, device=device)
    w_full = torch.zeros(max(int(idx.max()) + 1, f.numel()), dtype=torch.float64, device=device)
    w_full[: f.numel()] = w
    return w_full[idx]


def bfactor_filter(n: int, pixel_size: float, bfactor: float, device=None) -> torch.Tensor:
    """``exp(−B·s²/4)`` up to Nyquist (``|k| <= n/2``) and 0 beyond (RELION's ``applyBFactorToMap``);
    ``s = |k|/(n·apix)`` in 1/Å, ``bfactor`` in Å². Returns ``[n, n, n//2+1]`` float64."""
    r2 = _r2_grid(n, device)
    s2 = r2.double() / (n * pixel_size) ** 2
    return torch.where(4 * r2 <= n * n, torch.exp(-(bfactor / 4.0) * s2), torch.zeros_like(s2))


def mtf_filter(n: int, pixel_size: float, mtf_inv_px: torch.Tensor, mtf_value: torch.Tensor,
               mtf_pixel_size: float, device=None) -> torch.Tensor:
    """Multiplier ``1/MTF(s)`` below Nyquist (1 elsewhere), RELION's ``divideByMtf``.

    ``mtf_inv_px`` (``rlnResolutionInversePixel``, 1/pixel of the detector, Nyquist 0.5) and ``mtf_value``
    (``rlnMtfValue``) tabulate the detector MTF; ``mtf_pixel_size`` is the detector pixel size (Å). As in RELION,
    the table index is ``floor(s / Δ)`` with ``Δ = (s_last − s_first)/count`` and the value is interpolated
    linearly between that entry and the next (clamped to the first/last values at the ends).
    """
    res_tab = torch.as_tensor(mtf_inv_px, dtype=torch.float64, device=device) / mtf_pixel_size
    val_tab = torch.as_tensor(mtf_value, dtype=torch.float64, device=device)
    m = res_tab.numel()
    per_elem = float(res_tab[-1] - res_tab[0]) / m
    if per_elem < 1e-10:
        raise ValueError("the MTF resolutions do not increase")
    r2 = _r2_grid(n, device)
    s = torch.sqrt(r2.double()) / (n * pixel_size)
    i0 = torch.floor(s / per_elem).long()
    i0c = i0.clamp(0, max(m - 2, 0))
    x0, x1 = res_tab[i0c], res_tab[(i0c + 1).clamp_max(m - 1)]
    y0, y1 = val_tab[i0c], val_tab[(i0c + 1).clamp_max(m - 1)]
    interp = y0 + (y1 - y0) * (s - x0) / torch.where(x1 != x0, x1 - x0, torch.ones_like(x1))
    mtf = torch.where(i0 >= m - 1, val_tab[-1], torch.where(i0 <= 0, val_tab[0], interp))
    return torch.where(4 * r2 < n * n, 1.0 / mtf, torch.ones_like(mtf))


# ------------------------------------------------------------------------------------------------------------
# Guinier plot
# ------------------------------------------------------------------------------------------------------------

@dataclass
class GuinierCurve:
    """Guinier plot of a map: per shell ``i = 0 … n//2``: ``x = s² = (i/(n·apix))²`` (1/Å²), ``y = ln`` of the
    mean amplitude of the shell's coefficients (FT normalised by ``1/n³``, RELION's convention; -99 for an
    empty/zero shell), ``w`` = 1 for shells used in the fit (``fit_maxres <= d <= fit_minres`` Å), else 0."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor


def guinier_curve(ft: torch.Tensor, n: int, pixel_size: float, fit_minres: float = 10.0, fit_maxres: float = 0.0
                  ) -> GuinierCurve:
    """Guinier curve of a (centred, unnormalised torch) half-complex FT ``[n, n, n//2+1]`` of an ``n³`` map."""
    nsh = n // 2 + 1
    idx = shell_index_3d(n, device=ft.device).reshape(-1)
    keep = idx < nsh
    amp = (ft.reshape(-1)[keep].abs().to(torch.float64)) / float(n) ** 3
    sums = torch.zeros(nsh, dtype=torch.float64, device=ft.device).index_add_(0, idx[keep], amp)
    counts = torch.zeros(nsh, dtype=torch.float64, device=ft.device).index_add_(0, idx[keep], torch.ones_like(amp))
    i = torch.arange(nsh, dtype=torch.float64, device=ft.device)
    x = (i / (n * pixel_size)) ** 2
    pos = sums > 0
    y = torch.where(pos, torch.log(torch.where(pos, sums, torch.ones_like(sums)) / counts.clamp_min(1)),
                    torch.full_like(sums, -99.0))
    res = n * pixel_size / torch.where(i > 0, i, torch.full_like(i, math.nan))
    in_range = (i > 0) & (res <= fit_minres) & (res >= fit_maxres)
    w = (pos & in_range).double()
    return GuinierCurve(x=x, y=y, w=w)


def fit_straight_line(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[float, float, float]:
    """Weighted least-squares line ``y = slope·x + intercept``; returns ``(slope, intercept, r²)`` (RELION's
    ``fitStraightLine``: its "correlation" is the squared correlation coefficient). Zeros if degenerate."""
    x, y, w = (torch.as_tensor(a, dtype=torch.float64) for a in (x, y, w))
    sw = float(w.sum())
    if sw <= 0:
        return 0.0, 0.0, 0.0
    ax = float((w * x).sum()) / sw
    ay = float((w * y).sum()) / sw
    sxx = float((w * x * x).sum()) - sw * ax * ax
    syy = float((w * y * y).sum()) - sw * ay * ay
    sxy = float((w * x * y).sum()) - sw * ax * ay
    if sxx <= 0:
        return 0.0, 0.0, 0.0
    slope = sxy / sxx
    corr = sxy * sxy / (sxx * syy) if syy > 0 else 0.0
    return slope, ay - slope * ax, corr


# ------------------------------------------------------------------------------------------------------------
# the whole procedure
# ------------------------------------------------------------------------------------------------------------

@dataclass
class PostprocessResult:
    """Everything ``relion_postprocess`` reports. Curves are float64 CPU tensors over shells ``0 … N//2``."""

    sharpened: torch.Tensor  # [N, N, N] sharpened (and filtered) average of the halves, unmasked
    masked: torch.Tensor | None  # sharpened × mask (None without a mask)
    pixel_size: float
    box: int
    fsc_unmasked: torch.Tensor
    fsc_masked: torch.Tensor | None
    fsc_random: torch.Tensor | None
    fsc_true: torch.Tensor  # the curve the resolution was read from (= unmasked without a mask)
    fsc_part_mask: torch.Tensor | None
    fsc_part_molweight: torch.Tensor | None
    randomize_at: int  # shell (-1 without a mask)
    resolution_shell: int
    resolution: float  # Å
    bfactor: float  # Å², as applied
    guinier_in: GuinierCurve
    guinier_mtf: GuinierCurve | None
    guinier_weighted: GuinierCurve
    guinier_sharpened: GuinierCurve
    slope: float = 0.0
    intercept: float = 0.0
    fit_correlation: float = 0.0
    applied_lowpass: float = 0.0  # Å (0: none)
    solvent_fraction: float = 0.0  # rlnParticleBoxFractionSolventMask (0 without a mask)
    molweight_fraction: float = 0.0
    warnings: list[str] = field(default_factory=list)


def postprocess_maps(half1: torch.Tensor, half2: torch.Tensor, pixel_size: float, mask: torch.Tensor | None = None,
                     *, auto_bfac: bool = False, fit_minres: float = 10.0, fit_maxres: float = 0.0,
                     adhoc_bfac: float = 0.0, randomize_at_fsc: float = 0.8, randomize_at_A: float = -1.0,
                     fsc_weighting: bool = True, low_pass: float = 0.0, filter_edge_width: int = 2,
                     force_mask: bool = False, mtf: tuple[torch.Tensor, torch.Tensor] | None = None,
                     mtf_pixel_size: float | None = None, molweight_kda: float = -1.0,
                     seed: int = 0) -> PostprocessResult:
    """RELION's ``relion_postprocess`` on two half maps ``[N, N, N]`` (same device); see the module docstring.

    Args:
        half1, half2: unfiltered half maps; pixel_size: Å/px.
        mask: soft mask in [0, 1] (``[N, N, N]``), or None (no masking: FSC = unmasked FSC).
        auto_bfac / adhoc_bfac: B-factor from the Guinier fit between ``fit_minres`` and ``fit_maxres`` Å, or
            a given B (Å²; negative sharpens). Not both.
        randomize_at_fsc / randomize_at_A: where phase randomisation starts (see :func:`randomization_shell`).
        fsc_weighting: apply ``sqrt(2·FSC/(1+FSC))``. low_pass: Å; 0 none, negative: at the final resolution.
        filter_edge_width: shells of the low-pass raised-cosine edge. force_mask: keep the masked FSC even when
            the unmasked one extends further.
        mtf: ``(rlnResolutionInversePixel, rlnMtfValue)`` of the detector; mtf_pixel_size: detector pixel (Å),
            default ``pixel_size``. molweight_kda: ordered mass for the molecular-weight part-FSC (<=0: none).
        seed: seed of the phase randomisation (RELION's ``--random_seed``; negative: a random seed).

    Raises:
        ValueError: inconsistent shapes, or the unmasked FSC never drops below ``randomize_at_fsc``.
    """
    if half1.shape != half2.shape or half1.dim() != 3 or len(set(half1.shape)) != 1:
        raise ValueError(f"half maps must be cubic and of equal size, got {tuple(half1.shape)} and "
                         f"{tuple(half2.shape)}")
    if mask is not None and mask.shape != half1.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the half maps {tuple(half1.shape)}")
    if auto_bfac and abs(adhoc_bfac) > 0:
        raise ValueError("give either auto_bfac or adhoc_bfac, not both")
    n = half1.shape[-1]
    dev = half1.device
    h1 = half1.to(torch.float64)
    h2 = half2.to(torch.float64)
    warnings: list[str] = []
    ft1, ft2 = rfft3_centered(h1), rfft3_centered(h2)
    fsc_unmasked = fsc_from_ft(ft1, ft2, n).cpu()

    fsc_masked = fsc_random = fsc_part_mask = fsc_part_mw = None
    randomize_at = -1
    solvent_fraction = 0.0
    mw_fraction = 0.0
    if molweight_kda > 0:
        mw_fraction = 0.476 * (n * pixel_size) ** 3 * 0.81 / (molweight_kda * 1000.0)
    if mask is not None:
        m = mask.to(device=dev, dtype=torch.float64)
        solvent_fraction = solvent_mask_fraction(m)
        fsc_masked = fsc_from_ft(rfft3_centered(h1 * m), rfft3_centered(h2 * m), n).cpu()
        randomize_at = randomization_shell(fsc_unmasked, randomize_at_fsc, randomize_at_A, n, pixel_size)
        if randomize_at <= 0:
            raise ValueError(f"the unmasked FSC never drops below --randomize_at_fsc {randomize_at_fsc}")
        rng = RelionRandom(seed if seed >= 0 else int.from_bytes(os.urandom(4), "little"))
        r1 = randomize_phases_beyond(h1, randomize_at, rng)
        r2 = randomize_phases_beyond(h2, randomize_at, rng)
        fsc_random = fsc_from_ft(rfft3_centered(r1 * m), rfft3_centered(r2 * m), n).cpu()
        if fsc_masked[0] <= 0:
            fsc_masked[0] = 1.0
        if fsc_random[0] <= 0:
            fsc_random[0] = 1.0
        fsc_true = corrected_fsc(fsc_masked, fsc_random, randomize_at)
        fsc_part_mask = particle_fsc(fsc_unmasked, solvent_fraction)
        if molweight_kda > 0:
            fsc_part_mw = particle_fsc(fsc_unmasked, mw_fraction)
    else:
        fsc_true = fsc_unmasked.clone()
        if molweight_kda > 0:
            fsc_part_mw = particle_fsc(fsc_unmasked, mw_fraction)

    res_i = resolution_shell(fsc_true)
    resolution = shell_resolution_A(res_i, n, pixel_size)
    if mask is not None:
        unmasked_i = resolution_shell(fsc_unmasked)
        if unmasked_i > res_i:
            if force_mask:
                warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC")
            else:
                warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC; the mask is not used "
                                "for the resolution (adjust the mask, or use --force_mask)")
                fsc_true = fsc_unmasked.clone()
                res_i = unmasked_i
                resolution = shell_resolution_A(unmasked_i, n, pixel_size)
        elif float(fsc_random[res_i]) > 0.1:
            warnings.append("the phase-randomised FSC is larger than 0.10 at the estimated resolution (a softer mask "
                            "with fewer features gives lower phase-randomised FSCs)")

    # ---- sharpening of the average of the halves
    ft = (ft1 + ft2) * 0.5
    g_in = guinier_curve(ft, n, pixel_size, fit_minres, fit_maxres)
    g_mtf = None
    if mtf is not None:
        ft = ft * mtf_filter(n, pixel_size, mtf[0], mtf[1], mtf_pixel_size or pixel_size, device=dev)
        g_mtf = guinier_curve(ft, n, pixel_size, fit_minres, fit_maxres)
    if fsc_weighting:
        ft = ft * fsc_weights(fsc_true, n, device=dev)
    g_w = guinier_curve(ft, n, pixel_size, fit_minres, fit_maxres)
    slope = intercept = corr = 0.0
    bfactor = 0.0
    if auto_bfac:
        slope, intercept, corr = fit_straight_line(g_w.x, g_w.y, g_w.w)
        bfactor = 4.0 * slope
        n_fit = int((g_w.w > 0).sum())
        if n_fit < MIN_GUINIER_SHELLS or corr < MIN_GUINIER_R2:
            warnings.append(f"the B-factor comes from a Guinier fit over {n_fit} shells with r² {corr:.2f} (wanted: "
                            f">= {MIN_GUINIER_SHELLS} shells, r² >= {MIN_GUINIER_R2}); treat it as rough, or give "
                            "--adhoc_bfac (a larger box or a lower --autob_lowres adds shells)")
    elif abs(adhoc_bfac) > 0:
        bfactor = float(adhoc_bfac)
        if bfactor > 0:
            warnings.append("a positive B-factor dampens the map; use a negative value to sharpen it")
    if abs(bfactor) > 0:
        ft = ft * bfactor_filter(n, pixel_size, bfactor, device=dev)
    else:
        warnings.append("the map is not sharpened (no B-factor)")
    g_s = guinier_curve(ft, n, pixel_size, fit_minres, fit_maxres)
    applied = float(low_pass)
    if low_pass != 0:
        if low_pass < 0:
            applied = resolution
        # RELION's lowPassFilterMap: the edge's half width is integer (``filter_edge_width / 2`` in C++)
        ft = lowpass(ft, applied, pixel_size, 2 * (int(filter_edge_width) // 2))
    sharpened = irfft3_centered(ft, n)
    masked = sharpened * mask.to(device=dev, dtype=torch.float64) if mask is not None else None
    out_dtype = half1.dtype if half1.is_floating_point() else torch.float32
    cpu = (lambda g: GuinierCurve(g.x.cpu(), g.y.cpu(), g.w.cpu()))
    return PostprocessResult(
        sharpened=sharpened.to(out_dtype), masked=None if masked is None else masked.to(out_dtype),
        pixel_size=float(pixel_size), box=n, fsc_unmasked=fsc_unmasked, fsc_masked=fsc_masked, fsc_random=fsc_random,
        fsc_true=fsc_true.cpu(), fsc_part_mask=fsc_part_mask, fsc_part_molweight=fsc_part_mw,
        randomize_at=randomize_at, resolution_shell=res_i, resolution=resolution, bfactor=bfactor,
        guinier_in=cpu(g_in), guinier_mtf=None if g_mtf is None else cpu(g_mtf), guinier_weighted=cpu(g_w),
        guinier_sharpened=cpu(g_s), slope=slope, intercept=intercept, fit_correlation=corr, applied_lowpass=applied,
        solvent_fraction=solvent_fraction, molweight_fraction=mw_fraction, warnings=warnings)
