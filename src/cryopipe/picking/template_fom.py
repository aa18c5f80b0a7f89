"""Template picking, part 2: figure-of-merit maps (:class:`TemplateMaps`, :func:`template_fom_maps`: RELION's
autopicker's normalised cross-correlation over references and ψ, on the work grid, with the local background
σ/mean), the sections of a FOM-map stack (:data:`MAP_SECTIONS`).

Split out of :mod:`cryopipe.picking.template` (issue 14), which re-exports everything; see there for the
conventions. Moved verbatim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cryopipe.errors import CryopipeError
from cryopipe.picking.common import WorkGridMixin
from cryopipe.picking.template_references import F32_MAX, TemplateReferences, round_half_away

__all__ = ["MAP_SECTIONS", "TemplateMaps", "FT_PAD", "template_fom_maps"]


#: Sections of a FOM-map stack before the per-reference ``bestCCF``/``bestPSI`` pairs: the best FOM over all
#: references, its ψ (degrees), its reference number (1-based), and the local background σ and mean.
MAP_SECTIONS = ("bestFOM", "bestPSI", "bestREF", "stddevNoise", "avgNoise")




@dataclass
class TemplateMaps(WorkGridMixin):
    """Per-pixel template-matching results on the work grid of one micrograph.

    Attributes:
        fom: ``[R, w, w]`` float32, best FOM over ψ per reference (RELION ``_ref%03d_bestCCF``).
        psi: ``[R, w, w]`` float32, its ψ in degrees (``_bestPSI``).
        stddev: ``[w, w]`` float32 local background σ (``_stddevNoise``).
        mean: ``[w, w]`` float32 local background mean (``_avgNoise``).
        expected_ratio: ``[R]`` float64, ``E`` per reference.
        work_size: ``w``; size: ``N`` (side of the square the micrograph was padded to); shape: ``(H, W)``.
        pixel_size: micrograph Å/px; box: reference box (px); radius_px: RELION's particle radius (px);
        particle_diameter: Å.
    """

    fom: torch.Tensor
    psi: torch.Tensor
    stddev: torch.Tensor
    mean: torch.Tensor
    expected_ratio: torch.Tensor
    work_size: int
    size: int
    shape: tuple[int, int]
    pixel_size: float
    box: int
    radius_px: int
    particle_diameter: float

    @property
    def scale(self) -> float:
        """``w / N`` in float32 arithmetic (RELION keeps it in a float)."""
        return float(np.float32(self.work_size) / np.float32(self.size))


    def best(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fom, psi, ref)`` maximum over the references (``ref`` 1-based, first reference on ties)."""
        f, r = self.fom.max(dim=0)
        p = torch.gather(self.psi, 0, r[None])[0]
        return f, p, (r + 1).to(torch.float32)


def _normalised_square(micrograph: torch.Tensor, outlier_zscore: float, seed: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, int]:
    """RELION's micrograph preparation: outliers → mean, ``(x − μ)/σ``, centred in an ``N × N`` square of N(0,1)."""
    h, w = micrograph.shape
    n = max(h, w)
    x = micrograph.to(dtype)
    x64 = micrograph.to(torch.float64)
    mean = float(x64.mean())
    std = float(torch.sqrt(((x64 - mean) ** 2).mean()))
    del x64
    if not std > 0:
        raise CryopipeError("micrograph has zero variance (constant image); cannot pick on it")
    d = x - mean
    limit = outlier_zscore * std
    d = torch.where(d.abs() > limit, torch.zeros((), dtype=dtype, device=d.device), d)
    d = d / std
    if h != w:
        gen = torch.Generator(device=micrograph.device)
        gen.manual_seed(int(seed))
        square = torch.randn((n, n), generator=gen, device=micrograph.device, dtype=dtype)
        r0, c0 = n // 2 - h // 2, n // 2 - w // 2
        square[r0:r0 + h, c0:c0 + w] = d
        d = square
    return d, n


def _work_rows(n: int, w: int, device) -> torch.Tensor:
    """Rows of an ``n``-FFT holding the frequencies of the ``w``-FFT rows (ky = 0 … w/2−1, −w/2 … −1)."""
    h = w // 2
    return torch.cat([torch.arange(0, h, device=device), torch.arange(n - h, n, device=device)])


def _crop_ft(ft: torch.Tensor, n: int, w: int) -> torch.Tensor:
    """Half-complex ``[n, n//2+1]`` FT windowed to ``[w, w//2+1]`` (frequencies ``−w/2 ≤ ky < w/2``,
    ``0 ≤ kx ≤ w/2``; for ``w = n`` the FT itself)."""
    if w == n:
        return ft
    return ft.index_select(0, _work_rows(n, w, ft.device))[:, : w // 2 + 1]


#: Zero-padding factor of the reference FTs that are interpolated (bilinear) at rotated frequencies. Bilinear
#: interpolation of the FT of a ``P``-padded image is the FT of the image times ``sinc²(x/P)·sinc²(y/P)``
#: (divided out beforehand) plus "ghost" copies at ±P weighted by ``sinc²`` near 1: about 9 % of the amplitude
#: for P = 2b, 0.4 % for P = 8b. (RELION pads to twice the micrograph size, where the ghosts vanish.)
FT_PAD = 8


def _gridding_corrected_padded_ft(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Full-plane FTs of the references zero-padded to ``P = FT_PAD·b``, phase origin at the reference centre, as
    ``[R, 2, P, P]`` float (real, imaginary; frequency ``(fy, fx)`` at index ``(P/2 + fy, P/2 + fx)``). Each
    reference is divided beforehand by ``sinc²(dx/P)·sinc²(dy/P)``, the transform of bilinear interpolation."""
    r, b, _ = images.shape
    p = FT_PAD * b
    c = (torch.arange(b, device=images.device, dtype=torch.float64) - b // 2) / p
    s = torch.sinc(c) ** 2
    corr = (s[:, None] * s[None, :]).to(images.dtype)
    pad = torch.zeros((r, p, p), dtype=images.dtype, device=images.device)
    o = p // 2 - b // 2
    pad[:, o:o + b, o:o + b] = images / corr
    ft = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(pad, dim=(-2, -1))), dim=(-2, -1))
    return torch.view_as_real(ft).permute(0, 3, 1, 2).contiguous(), p


def _sample_grid(pts: torch.Tensor, p: int) -> torch.Tensor:
    """``grid_sample`` coordinates of frequencies ``(fx, fy)`` (Fourier pixels of the ``P`` box) on the full-plane
    FT of :func:`_gridding_corrected_padded_ft` (``align_corners=True``: index ``i`` ↦ ``−1 + 2i/(P−1)``)."""
    return (pts + p // 2) * (2.0 / (p - 1)) - 1.0


def _sample_ft(ft: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``[2, B, H, W]`` (real, imaginary) of one full-plane FT ``[2, P, P]`` at ``grid``
    ``[B, H, W, 2]`` (:func:`_sample_grid`); points outside the plane read 0."""
    b, hh, ww, _ = grid.shape
    out = torch.nn.functional.grid_sample(ft[None], grid.reshape(1, b * hh, ww, 2), mode="bilinear",
                                          padding_mode="zeros", align_corners=True)
    return out.view(2, b, hh, ww)


def _band_box(w: int, r_band: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference band ``|k| <= r_band`` (also ``|kx|, |ky| < w/2``) as a box of the work half grid.

    Returns ``(rows, ky, kx, inside)``: the work-grid rows of the box and their frequencies ``ky`` (``0 … rb,
    −rb … −1``), the columns ``kx = 0 … rb`` (``rb = floor(r_band)``, at most ``w/2 − 1``) and the band mask
    ``[len(rows), len(kx)]``. When the band reaches the edge of the work grid the box is the whole half grid
    (all ``w`` rows in FFT order, ``w/2 + 1`` columns; Nyquist row and column outside the band), so that products
    on the box are the work-grid spectrum itself.
    """
    h = w // 2
    rb = min(int(math.floor(r_band + 1e-3)), h - 1)
    if rb >= h - 1:
        rows = torch.arange(w, device=device)
        ky = torch.fft.fftfreq(w, d=1.0 / w, device=device, dtype=torch.float32)
        kx = torch.arange(h + 1, device=device, dtype=torch.float32)
    else:
        rows = torch.cat([torch.arange(0, rb + 1, device=device), torch.arange(w - rb, w, device=device)])
        ky = torch.cat([torch.arange(0, rb + 1, device=device), torch.arange(-rb, 0, device=device)]).to(torch.float32)
        kx = torch.arange(rb + 1, device=device, dtype=torch.float32)
    inside = (ky[:, None] ** 2 + kx[None, :] ** 2 <= r_band * r_band + 1e-3) & (ky.abs()[:, None] < h) & (kx[None, :] < h)
    return rows, ky, kx, inside


def _dft_matrices(n: int, w: int, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable DFT from a ``b``-box (centre ``b//2``, offsets ``d``) to the work-grid frequencies of an
    ``n``-square: ``Ey [w, b] = exp(−2πi·ky·d/n)``, ``Ex [b, w//2+1] = exp(−2πi·d·kx/n)`` (complex128)."""
    d = torch.arange(b, device=device, dtype=torch.float64) - b // 2
    ky = torch.fft.fftfreq(w, d=1.0 / w, device=device, dtype=torch.float64)
    kx = torch.arange(w // 2 + 1, device=device, dtype=torch.float64)
    ey = torch.polar(torch.ones(w, b, device=device, dtype=torch.float64), (-2 * math.pi / n) * ky[:, None] * d[None, :])
    ex = torch.polar(torch.ones(b, w // 2 + 1, device=device, dtype=torch.float64),
                     (-2 * math.pi / n) * d[:, None] * kx[None, :])
    return ey, ex


def _work_ctf(w: int, n: int, pixel_size: float, ctf: Mapping[str, float], intact_first_peak: bool, device
              ) -> torch.Tensor:
    """CTF ``[w, w//2+1]`` at the work-grid frequencies (Fourier pixels of the ``n``-square), with envelope."""
    from cryopipe.core.ctf import ctf_2d

    return ctf_2d(w, pixel_size * n / w, float(ctf["defocus_u"]), float(ctf.get("defocus_v", ctf["defocus_u"])),
                  float(ctf.get("defocus_angle", 0.0)), voltage=float(ctf.get("voltage", 300.0)),
                  cs=float(ctf.get("cs", 2.7)), amplitude_contrast=float(ctf.get("amplitude_contrast", 0.1)),
                  phase_shift=float(ctf.get("phase_shift", 0.0)), bfactor=float(ctf.get("bfactor", 0.0)),
                  scale=float(ctf.get("scale", 1.0)), intact_until_first_peak=intact_first_peak, device=device)[0]


def _background_statistics(Xw: torch.Tensor, X2w: torch.Tensor, n: int, w: int, b: int, radius: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local background mean and σ ``[w, w]`` (float32 σ; 1 where the variance is ~0) of the micrograph under the
    mask ``r² >= radius²`` of a ``b``-pixel reference box, from the work-grid FTs of the micrograph ``Xw`` and of
    its square ``X2w`` (the ``n``-pixel square, windowed to ``w``). Returns ``(disc [b, b] bool (r² < radius²),
    mean, stddev)``."""
    device = Xw.device
    c = torch.arange(b, device=device) - b // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    bg = (r2 >= radius * radius).to(torch.float64)
    disc = r2 < radius * radius
    n_bg = int(bg.sum())
    if n_bg == 0:
        raise CryopipeError(f"particle radius {radius} px leaves no background in the {b} px reference box; give a "
                            "smaller --particle_diameter")
    norm_w = float(w * w) / float(n * n)  # irfft2 on the work grid divides by w², the N-square sum needs 1/N²
    ey, ex = _dft_matrices(n, w, b, device)
    mask_ft = (ey @ bg.to(ey.dtype) @ ex).conj().to(torch.complex64)
    mean = torch.fft.irfft2(Xw * mask_ft, s=(w, w)) * (norm_w / n_bg)
    sq = torch.fft.irfft2(X2w * mask_ft, s=(w, w)) * (norm_w / n_bg)
    var = sq.double() - mean.double() ** 2
    stddev = torch.where(var > 1e-10, torch.sqrt(var.clamp(min=0)), torch.ones_like(var)).to(torch.float32)
    return disc, mean, stddev


def _reference_disc_sums(ft: torch.Tensor, grid0: torch.Tensor, inside: torch.Tensor, ctf_box: torch.Tensor | None,
                         inverse_dft: tuple[torch.Tensor, torch.Tensor], disc: torch.Tensor, n: int,
                         relion_mean_term: bool) -> tuple[float, float]:
    """``(Σ A, Σ A²)`` terms of one reference (padded FT ``ft``) at ψ = 0: band-limited (``inside``), × CTF, back in
    real space by the separable inverse DFT ``inverse_dft = (ey_inv, ex_inv)``; ``Σ A²`` over the particle
    ``disc`` / (n_disc + 1); ``Σ A`` likewise with ``relion_mean_term``, else the whole reference's DC / n_disc
    (module docstring)."""
    n_disc = int(disc.sum())
    v0 = _sample_ft(ft, grid0)
    a0 = torch.complex(v0[0, 0], v0[1, 0]) * inside
    if ctf_box is not None:
        a0 = a0 * ctf_box
    ey_inv, ex_inv = inverse_dft
    a_real = (ey_inv @ a0.to(torch.complex128) @ ex_inv).real / float(n * n)
    a_disc = a_real[disc]
    sum_a2 = float((a_disc * a_disc).sum()) / (n_disc + 1)
    if relion_mean_term:
        sum_a = float(a_disc.sum()) / (n_disc + 1)
    else:
        # Σ A over the whole (band-limited, CTF-multiplied) reference = its DC coefficient, / n like C
        sum_a = float(a0[0, 0].real) / n_disc
    return sum_a, sum_a2


def _best_over_psi(ft: torch.Tensor, grid_all: torch.Tensor, Y: torch.Tensor, psi: torch.Tensor, chunk: int, w: int,
                   prod: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cross-correlation ``[w, w]`` over the ψ angles ``psi`` and its ψ, of one reference (padded FT ``ft``,
    sampled at ``grid_all [n_psi, rows, kx, 2]``) with the band box of the micrograph ``Y`` (× CTF), ``chunk``
    angles at a time. ``prod``: the zeroed ``[chunk, w, w//2+1]`` buffer when the band box is smaller than the work
    grid (None: it is the whole grid)."""
    device = Y.device
    rb = (Y.shape[0] - 1) // 2
    nkx = Y.shape[1]
    best = torch.full((w, w), -math.inf, dtype=torch.float32, device=device)
    best_psi = torch.zeros((w, w), dtype=torch.float32, device=device)
    for j0 in range(0, psi.numel(), chunk):
        grid = grid_all[j0:j0 + chunk]
        nb = grid.shape[0]
        v = _sample_ft(ft, grid)               # [2, B, rows, kx]
        spec = torch.complex(v[0], v[1].neg_()).mul_(Y)  # conj(A_ψ)·(CTF·X) on the box
        if prod is None:
            cc = torch.fft.irfft2(spec, s=(w, w))
        else:
            prod[:nb, : rb + 1, :nkx] = spec[:, : rb + 1]
            prod[:nb, w - rb:, :nkx] = spec[:, rb + 1:]
            cc = torch.fft.irfft2(prod[:nb], s=(w, w))
        cmax, carg = cc.max(dim=0)
        upd = cmax > best
        best = torch.where(upd, cmax, best)
        best_psi = torch.where(upd, psi[j0:j0 + nb][carg], best_psi)
        del cc, v, spec
    return best, best_psi


def template_fom_maps(micrograph: torch.Tensor, refs: TemplateReferences, *, lowpass: float | None = None,
                      highpass: float | None = None, shrink: float = 1.0, ctf: Mapping[str, float] | None = None,
                      ctf_intact_first_peak: bool = False, outlier_zscore: float = 8.0, optimise_scale: bool = True,
                      seed: int = 1, relion_mean_term: bool = False, chunk_elements: int | None = None
                      ) -> TemplateMaps:
    """FOM, best-ψ and background maps of one micrograph for all references (module docstring).

    Args:
        micrograph: ``[H, W]`` tensor; computed on its device.
        refs: :func:`prepare_references` output (pixel size = the micrograph's).
        lowpass: ``--lowpass`` (Å; None/≤0: none): band limit of the references and work size for ``shrink=0``.
        highpass: ``--highpass`` (Å; None/≤0: none) applied to the micrograph.
        shrink: ``--shrink`` (0 = to the lowpass size, ``0 < s ≤ 1`` fraction, ``s > 1`` size in pixels).
        ctf: the micrograph's CTF (``defocus_u/v`` Å, ``defocus_angle`` deg, ``voltage`` kV, ``cs`` mm,
            ``amplitude_contrast``, ``phase_shift`` deg, optional ``bfactor``) — RELION ``--ctf``; None: no CTF.
        ctf_intact_first_peak: ``--ctf_intact_first_peak``.
        outlier_zscore: ``--outlier_removal_zscore``.
        optimise_scale: False = ``--skip_optimise_scale``.
        seed: seed of the noise that pads a non-square micrograph (RELION: ``random_seed + micrograph index``).
        relion_mean_term: use RELION's ``<A>`` (sum over the particle disc / (n+1)) in the local-mean term
            instead of the sum over the whole band-limited reference / n (module docstring).
        chunk_elements: real elements per batch of correlation maps (memory bound; default 2^24 on CPU, 2^27
            on CUDA).
    """
    from cryopipe.core.fourier import highpass as highpass_filter
    from cryopipe.core.geometry import euler_to_matrix
    from cryopipe.picking.log import log_work_size

    if micrograph.ndim != 2:
        raise CryopipeError(f"template picking needs a 2D micrograph, got shape {tuple(micrograph.shape)}")
    device = micrograph.device
    dt = torch.float32
    apix = refs.pixel_size
    h_mic, w_mic = (int(s) for s in micrograph.shape)
    b = refs.box
    if b > min(h_mic, w_mic):
        raise CryopipeError(f"reference box {b} px is larger than the micrograph ({w_mic}x{h_mic} px)")
    lp = lowpass if lowpass is not None and lowpass > 0 else None
    square, n = _normalised_square(micrograph, outlier_zscore, seed, dt)
    w = min(log_work_size(n, apix, lp, shrink, optimise_scale), n - n % 2)
    h = w // 2
    d_size = n if lp is None else 2 * round_half_away(n * apix / lp)
    r_band = min(d_size, n) / 2.0
    if chunk_elements is None:
        chunk_elements = 1 << (27 if device.type == "cuda" else 24)

    # micrograph FTs (full size), optional high-pass, then windowed to the work grid
    X = torch.fft.rfft2(square)
    if highpass is not None and highpass > 0:
        X = highpass_filter(X, highpass, apix, 2.0, ndim=2)
        square = torch.fft.irfft2(X, s=(n, n))
    X2 = torch.fft.rfft2(square * square)
    del square
    Xw = _crop_ft(X, n, w)
    X2w = _crop_ft(X2, n, w)
    del X, X2
    norm_w = float(w * w) / float(n * n)  # irfft2 on the work grid divides by w², the N-square sum needs 1/N²

    R = refs.radius_px
    disc, mean, stddev = _background_statistics(Xw, X2w, n, w, b, R)
    n_disc = int(disc.sum())
    del X2w

    # the band box: micrograph there (× CTF), rotated reference frequencies
    rows_b, ky_b, kx_b, inside = _band_box(w, r_band, device)
    full = rows_b.numel() == w
    nkx = kx_b.numel()
    Y = Xw.index_select(0, rows_b)[:, :nkx] * inside
    ctf_box = None
    if ctf is not None and refs.apply_ctf:
        ctf_box = _work_ctf(w, n, apix, ctf, ctf_intact_first_peak, device).index_select(0, rows_b)[:, :nkx]
        Y = Y * ctf_box  # conj(A·CTF)·X = conj(A)·(CTF·X): the CTF is real
    del Xw
    psis = refs.psi_angles()
    rot = euler_to_matrix(torch.zeros_like(psis), torch.zeros_like(psis), psis)[:, :2, :2].to(device, torch.float32)
    kgrid = torch.stack(torch.broadcast_tensors(kx_b[None, :], ky_b[:, None]), dim=-1)  # [2rb+1, rb+1, 2] (kx, ky)
    p = FT_PAD * b
    ref_images = refs.images.to(device=device, dtype=dt)
    # p/n · Aᵀk for every ψ: [n_psi, 2rb+1, rb+1, 2]
    grid_all = _sample_grid(torch.einsum("yxi,bij->byxj", kgrid, rot) * (p / n), p)
    grid0 = _sample_grid((kgrid * (p / n))[None], p)
    chunk = max(1, min(len(psis), chunk_elements // (w * w)))

    # real-space ψ = 0 references for <A>, <A²>, E: inverse separable DFT from the band box onto the box
    col_weight = torch.where(kx_b == 0, 1.0, 2.0).to(torch.float64)
    d_off = torch.arange(b, device=device, dtype=torch.float64) - b // 2
    ey_inv = torch.polar(torch.ones(b, ky_b.numel(), device=device, dtype=torch.float64),
                         (2 * math.pi / n) * d_off[:, None] * ky_b.double()[None, :])      # [b, rows]
    ex_inv = torch.polar(torch.ones(nkx, b, device=device, dtype=torch.float64),
                         (2 * math.pi / n) * kx_b.double()[:, None] * d_off[None, :]) * col_weight[:, None]

    n_ref = len(refs)
    fom_maps = torch.empty((n_ref, w, w), dtype=dt, device=device)
    psi_maps = torch.empty((n_ref, w, w), dtype=dt, device=device)
    expected = torch.empty(n_ref, dtype=torch.float64)
    psi_dev = psis.to(device=device, dtype=dt)
    mean64 = mean.double()
    inv_sd64 = 1.0 / stddev.double()
    prod = None if full else torch.zeros((chunk, w, h + 1), dtype=torch.complex64, device=device)  # 0 off the box
    for i in range(n_ref):
        ft = _gridding_corrected_padded_ft(ref_images[i:i + 1])[0][0]
        sum_a, sum_a2 = _reference_disc_sums(ft, grid0, inside, ctf_box, (ey_inv, ex_inv), disc, n,
                                             relion_mean_term)
        em1 = math.expm1(sum_a2 / 2.0)
        expected[i] = math.exp(sum_a2 / 2.0)
        if not em1 > 0:
            raise CryopipeError(f"reference {i + 1} ({refs.names[i] if i < len(refs.names) else ''}) is zero inside "
                                "the particle disc after filtering; check the references and --lowpass")
        best, best_psi = _best_over_psi(ft, grid_all, Y, psi_dev, chunk, w, prod)
        corr = best.double() * (norm_w / n_disc)
        log_p = (corr - mean64 * sum_a) * inv_sd64 - 0.5 * sum_a2
        fom = torch.expm1(log_p) / em1
        fom_maps[i] = torch.nan_to_num(fom, nan=0.0, posinf=F32_MAX, neginf=-F32_MAX).clamp(-F32_MAX, F32_MAX).to(dt)
        psi_maps[i] = best_psi
    return TemplateMaps(fom=fom_maps, psi=psi_maps, stddev=stddev, mean=mean.to(dt), expected_ratio=expected,
                        work_size=int(w), size=int(n), shape=(h_mic, w_mic), pixel_size=float(apix), box=int(b),
                        radius_px=int(R), particle_diameter=float(refs.particle_diameter))
