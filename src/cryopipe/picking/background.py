"""Local background, local noise and contamination of a micrograph, for picking that holds on hard data (issue 11).

Not in RELION; every function here is opt-in (``autopick --flatten`` / ``--contamination_mask``), so RELION's
LoG and template pickers keep their exact output by default.

Model: ``x(p) = b(p) + σ(p)·(n(p) + s(p)) + c(p)`` with a smooth ice background ``b`` (thickness ramps,
sinusoids: scales of several particle diameters and more), a smooth noise level ``σ`` (thicker ice is noisier),
white noise ``n``, the particles ``s`` and contamination ``c`` (ice crystals, ethane drops, carbon film: regions much
larger than a particle and offset from the ice by more than ``threshold·σ``).

:func:`micrograph_background` works on a grid of square blocks of ``block`` micrograph pixels (≈ ``bin_A`` Å):

1. block means ``m`` and block variances ``v`` (one pooling pass); global noise level ``σ₀ = sqrt(median v)``;
   ``m_s`` = ``m`` lightly smoothed (Gaussian of ``smooth_A``);
2. **rims**: blocks where ``|∇m_s|`` exceeds ``edge_threshold`` noise σ per 100 Å (contamination and carbon
   edges are steps; ice-thickness variations and particles at low SNR are far gentler);
3. **regions**: the 4-connected regions between rims; the largest is the ice. A robust linear trend (plane) is
   fitted to the ice (iteratively restricted to the blocks within ``min(threshold·σ₀, 2.5·1.4826·MAD)`` of it); every
   other region whose mean is offset from that trend by more than ``threshold·σ₀`` (dark or bright: inside an
   ice crystal, a drop, the carbon film) is contamination, and so are spots offset by more than twice that,
   opened with a disc of ``min_size_A`` (no particle-sized specks);
4. **background** ``b`` and **noise** ``σ``: normalised convolutions (Gaussian of ``background_A``) of ``m`` and
   ``v`` over the blocks outside the contamination mask dilated by ``dilate_A``, so that neither contamination
   nor its rim enters them.

``b``, ``σ`` and the mask are upsampled to the micrograph (bilinear; the mask by nearest block) by
:meth:`MicrographBackground.full`. :func:`flatten_micrograph` returns ``(x − b)/σ`` with the contaminated pixels
(mask dilated by ``fill_margin_A``) replaced by seeded N(0, 1) noise: the pickers' filters then see white noise of
unit variance everywhere, with no steps at contamination rims (the LoG's strongest false responses) and no
gradient. :func:`contamination_distance` and :func:`reject_near_contamination` drop picks whose centre lies within
a margin of the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryopipe.errors import CryopipeError
from cryopipe.picking.common import PickTable

__all__ = [
    "MicrographBackground",
    "micrograph_background",
    "flatten_micrograph",
    "contamination_distance",
    "reject_near_contamination",
    "ContaminationOptions",
    "contamination_aware_picker",
]


@dataclass
class MicrographBackground:
    """Block-grid estimates for one micrograph (see the module docstring).

    Attributes:
        background: ``[h, w]`` float64 local ice background ``b`` on the block grid (micrograph units).
        sigma: ``[h, w]`` float64 local noise standard deviation ``σ`` on the block grid.
        contamination: ``[h, w]`` bool, blocks that are contamination.
        noise_sigma: global noise standard deviation ``σ₀``.
        block: block side in micrograph pixels; block ``(i, j)`` covers rows ``i·block … (i+1)·block − 1``
            (the last ``H mod block`` rows and ``W mod block`` columns take the values of the last blocks).
        shape: ``(H, W)`` of the micrograph.
    """

    background: torch.Tensor
    sigma: torch.Tensor
    contamination: torch.Tensor
    noise_sigma: float
    block: int
    shape: tuple[int, int]

    def full(self, name: str) -> torch.Tensor:
        """``background`` / ``sigma`` (bilinear, block centres at ``(i + ½)·block − ½``) or ``contamination``
        (nearest block) at every micrograph pixel, ``[H, W]``."""
        h, w = self.shape
        grid = getattr(self, name)
        hb, wb = grid.shape
        if name == "contamination":
            up = grid.double().repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)
        else:
            up = F.interpolate(grid[None, None].double(), size=(hb * self.block, wb * self.block), mode="bilinear",
                               align_corners=False)[0, 0]
        up = F.pad(up[None, None], (0, w - wb * self.block, 0, h - hb * self.block), mode="replicate")[0, 0]
        return up > 0.5 if name == "contamination" else up


def _gauss_kernel(sigma_blocks: float, device) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma_blocks)))
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / max(sigma_blocks, 1e-6)) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, sigma_blocks: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[h, w]`` with zero padding (use with a weight image for normalisation)."""
    if sigma_blocks <= 0:
        return x
    k = _gauss_kernel(sigma_blocks, x.device)
    r = (k.numel() - 1) // 2
    y = F.conv2d(x[None, None], k.view(1, 1, 1, -1), padding=(0, r))
    y = F.conv2d(y, k.view(1, 1, -1, 1), padding=(r, 0))
    return y[0, 0]


def _normalised_blur(x: torch.Tensor, weight: torch.Tensor, sigma_blocks: float) -> torch.Tensor:
    """Normalised convolution: ``G*(w·x) / G*w``; where ``G*w`` underflows (no weight in reach), the weighted mean."""
    num = _blur(x * weight, sigma_blocks)
    den = _blur(weight, sigma_blocks)
    total = float(weight.sum())
    fallback = float((x * weight).sum()) / total if total > 0 else float(x.mean())
    return torch.where(den > 1e-12, num / den.clamp(min=1e-12), torch.full_like(x, fallback))


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``[h, w]`` bool with a disc of ``radius`` blocks."""
    if radius <= 0:
        return mask
    off = torch.arange(-radius, radius + 1, device=mask.device)
    disc = ((off[:, None] ** 2 + off[None, :] ** 2) <= radius * radius).double()
    y = F.conv2d(mask.double()[None, None], disc[None, None], padding=radius)[0, 0]
    return y > 0.5


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion (outside the grid counts as set, so regions touching the edge are kept)."""
    if radius <= 0:
        return mask
    return ~_dilate(~mask, radius)


def _surface_fit(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares plane in (row, column) over ``[h, w]``, evaluated on the grid (a plane, not a
    higher-order surface: the trend is extrapolated into large contaminated regions, where curvature runs away)."""
    h, w = values.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64, device=values.device),
                            torch.linspace(-1, 1, w, dtype=torch.float64, device=values.device), indexing="ij")
    basis = torch.stack([torch.ones_like(xx), xx, yy], dim=-1).reshape(-1, 3)
    wv = weight.reshape(-1, 1)
    coef = torch.linalg.lstsq(basis * wv, values.reshape(-1, 1) * wv).solution
    return (basis @ coef).reshape(h, w)


def _edge_strength(ms: torch.Tensor, block_A: float, sigma0: float) -> torch.Tensor:
    """Gradient magnitude of ``ms`` ``[h, w]`` in noise σ per 100 Å (central differences, edges replicated)."""
    p = F.pad(ms[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    gy = (p[2:, 1:-1] - p[:-2, 1:-1]) / 2
    gx = (p[1:-1, 2:] - p[1:-1, :-2]) / 2
    return torch.sqrt(gx * gx + gy * gy) * (100.0 / block_A) / sigma0


def _components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """4-connected components of a small bool grid ``[h, w]``: labels ``[h, w]`` int64 (0 = not in the mask,
    1 … n) and ``n`` (scipy's labelling on the CPU; the block grid has ~10⁴–10⁵ cells)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask.cpu().numpy())
    return torch.from_numpy(lab).to(device=mask.device, dtype=torch.int64), int(n)


def _robust_trend(values: torch.Tensor, support: torch.Tensor, thr: float) -> torch.Tensor:
    """Plane fitted to ``values`` on ``support`` (bool), iteratively restricted to the blocks within
    ``min(thr, max(2.5·1.4826·MAD, thr/4))`` of it: it settles on the majority (the ice)."""
    weight = support.double()
    fit = _surface_fit(values, weight)
    for _ in range(10):
        r = values - fit
        rs = r[support]
        scale = 1.4826 * float((rs - rs.median()).abs().median()) if rs.numel() else 0.0
        c = min(thr, max(2.5 * scale, 0.25 * thr))
        new = (support & (r.abs() <= c)).double()
        if bool((new == weight).all()) or float(new.sum()) < 6:
            break
        weight = new
        fit = _surface_fit(values, weight)
    return fit


def micrograph_background(micrograph: torch.Tensor, pixel_size: float, *, bin_A: float = 20.0,
                          threshold: float = 0.75, edge_threshold: float = 1.2, smooth_A: float = 20.0,
                          background_A: float = 120.0, dilate_A: float = 40.0, min_size_A: float = 200.0
                          ) -> MicrographBackground:
    """Local background, local noise and contamination mask of ``micrograph`` ``[H, W]`` (module docstring).

    Args:
        micrograph: ``[H, W]`` real tensor (rows = y), any device.
        pixel_size: Å per pixel.
        bin_A: block size (Å; rounded to whole pixels, at least 2).
        threshold: contamination = offset from the ice by more than this many noise σ (dark or bright), at the
            block scale lightly smoothed.
        edge_threshold: contamination rim = gradient of the lightly smoothed block means steeper than this many
            noise σ per 100 Å (ice-thickness variations are far gentler; particles at low SNR too).
        smooth_A: Gaussian σ (Å) applied to the block means before thresholds and gradients.
        background_A: Gaussian σ (Å) of the background and noise estimates (longer than a particle).
        dilate_A: contamination rims left out of the background and noise estimates (Å).
        min_size_A: diameter (Å) of the opening disc: offset spots smaller than this are not contamination.
    """
    if micrograph.ndim != 2:
        raise CryopipeError(f"background estimate needs a 2D micrograph, got shape {tuple(micrograph.shape)}")
    if not pixel_size > 0:
        raise CryopipeError(f"pixel size {pixel_size} Å is not positive")
    block = int(round(bin_A / pixel_size))
    if block < 2:
        raise CryopipeError(f"bin_A {bin_A} Å is less than two pixels of {pixel_size} Å: no noise estimate per block")
    h, w = micrograph.shape
    hb, wb = h // block, w // block  # whole blocks only (a partial block's mean is too noisy: false rims)
    if hb < 3 or wb < 3:
        raise CryopipeError(f"micrograph {w}x{h} px is too small for background blocks of {block} px ({bin_A:g} Å)")
    x = micrograph[: hb * block, : wb * block].to(torch.float64)
    blocks = x.reshape(hb, block, wb, block)
    m = blocks.mean(dim=(1, 3))
    v = blocks.var(dim=(1, 3), unbiased=False)
    sigma0 = float(v.median().sqrt())
    if not sigma0 > 0:
        raise CryopipeError("micrograph has zero variance; cannot estimate its background")
    block_A = block * pixel_size
    thr = threshold * sigma0
    ones = torch.ones_like(m)
    ms = _blur(m, smooth_A / block_A) / _blur(ones, smooth_A / block_A)

    # rims: steep gradients; regions between rims: the largest is the ice (its robust linear trend is the
    # reference), any other whose mean is offset from that trend by more than the threshold is contamination
    edges = _edge_strength(ms, block_A, sigma0) > edge_threshold
    labels, n = _components(~edges)
    counts = torch.bincount(labels.reshape(-1), minlength=n + 1).to(torch.float64)
    counts[0] = 0
    ice = labels == int(torch.argmax(counts)) if n else torch.ones_like(edges)
    fit = _robust_trend(ms, ice, thr)
    resid = ms - fit
    sums = torch.bincount(labels.reshape(-1), weights=resid.reshape(-1), minlength=n + 1)
    offset_region = (sums / counts.clamp(min=1)).abs() > thr
    offset_region[0] = False
    offset_region[int(torch.argmax(counts))] = False
    mask = edges | offset_region[labels]
    # strong spots offset from the trend (blobs without a closed rim, e.g. soft-edged): twice the threshold, as
    # a plane does not follow every ice variation
    r_open = max(0, int(round(0.5 * min_size_A / block_A)))
    spots = resid.abs() > 2 * thr
    if r_open > 0:
        spots = _dilate(_erode(spots, r_open), r_open) & spots
    mask = mask | spots
    # background and noise by normalised convolution outside the dilated mask
    dil = max(0, int(round(dilate_A / block_A)))
    keep = (~_dilate(mask, dil)).double()
    bg = _normalised_blur(m, keep, background_A / block_A)
    var = _normalised_blur(v, keep, background_A / block_A).clamp(min=1e-30)
    return MicrographBackground(background=bg, sigma=var.sqrt(), contamination=mask, noise_sigma=sigma0,
                                block=block, shape=(int(h), int(w)))


def flatten_micrograph(micrograph: torch.Tensor, bg: MicrographBackground, *, fill_margin_A: float = 0.0,
                       pixel_size: float | None = None, seed: int = 1) -> torch.Tensor:
    """``(x − b)/σ`` at every pixel, contaminated pixels (mask dilated by ``fill_margin_A``) replaced by N(0, 1)
    noise from a generator seeded with ``seed`` (float32 ``[H, W]`` on the micrograph's device).

    ``pixel_size`` (Å) converts the margin to blocks (without it the margin is one block)."""
    b = bg.full("background")
    s = bg.full("sigma")
    out = ((micrograph.to(torch.float64) - b) / s).to(torch.float32)
    margin = 1 if pixel_size is None else max(0, int(math.ceil(fill_margin_A / (bg.block * pixel_size))))
    grid = _dilate(bg.contamination, margin)
    if bool(grid.any()):
        full = MicrographBackground(bg.background, bg.sigma, grid, bg.noise_sigma, bg.block, bg.shape).full(
            "contamination")
        gen = torch.Generator(device=micrograph.device)
        gen.manual_seed(int(seed))
        noise = torch.randn(out.shape, generator=gen, device=micrograph.device, dtype=out.dtype)
        out = torch.where(full, noise, out)
    return out


def contamination_distance(bg: MicrographBackground, xy: torch.Tensor) -> torch.Tensor:
    """Distance (micrograph pixels) from each point ``xy`` ``[P, 2]`` (x, y) to the nearest contaminated block
    (to its nearest point; 0 inside one; ``inf`` without contamination). ``[P]`` float64."""
    xy = torch.as_tensor(xy, dtype=torch.float64)
    idx = torch.nonzero(bg.contamination)
    if idx.numel() == 0 or xy.numel() == 0:
        return torch.full((xy.shape[0],), math.inf, dtype=torch.float64, device=xy.device)
    lo = idx.to(torch.float64).to(xy.device) * bg.block - 0.5  # block edges in pixel coordinates
    hi = lo + bg.block
    dy = torch.clamp(torch.maximum(lo[None, :, 0] - xy[:, None, 1], xy[:, None, 1] - hi[None, :, 0]), min=0)
    dx = torch.clamp(torch.maximum(lo[None, :, 1] - xy[:, None, 0], xy[:, None, 0] - hi[None, :, 1]), min=0)
    return torch.sqrt(dx * dx + dy * dy).min(dim=1).values


def reject_near_contamination(picks: PickTable, bg: MicrographBackground, margin_px: float) -> PickTable:
    """The picks whose centre is farther than ``margin_px`` from contamination (in emission order)."""
    if len(picks) == 0:
        return picks
    d = contamination_distance(bg, picks.xy().to(torch.float64)).to(picks.x.device)
    return picks.select(d > float(margin_px))


@dataclass(frozen=True)
class ContaminationOptions:
    """``autopick`` options of this module (cryopipe only; all off by default = RELION's pickers unchanged).

    Attributes:
        flatten: ``--flatten``: pick on :func:`flatten_micrograph` (local background and noise normalised,
            contamination replaced by noise).
        reject: ``--contamination_mask``: drop picks within ``margin_A`` of the contamination mask.
        threshold: ``--contamination_threshold`` (noise σ; :func:`micrograph_background` ``threshold``).
        edge_threshold: ``--contamination_edge`` (noise σ per 100 Å).
        margin_A: ``--contamination_margin`` (Å).
        bin_A: block size of the estimates (Å).
    """

    flatten: bool = False
    reject: bool = False
    threshold: float = 0.75
    edge_threshold: float = 1.2
    margin_A: float = 0.0
    bin_A: float = 20.0

    @property
    def active(self) -> bool:
        return self.flatten or self.reject


def contamination_aware_picker(picker: Callable, opts: ContaminationOptions) -> Callable:
    """Wrap a picking function ``picker(micrograph [H, W], pixel_size, ctx) -> PickTable`` (the autopick driver's
    ``PickFunction``) so that it sees the flattened micrograph (``opts.flatten``) and/or its picks near
    contamination are dropped (``opts.reject``). ``ctx.index`` seeds the fill noise. Without an active option
    ``picker`` itself is returned."""
    if not opts.active:
        return picker

    def pick(micrograph: torch.Tensor, pixel_size: float, ctx) -> PickTable:
        bg = micrograph_background(micrograph, pixel_size, bin_A=opts.bin_A, threshold=opts.threshold,
                                   edge_threshold=opts.edge_threshold)
        image = flatten_micrograph(micrograph, bg, pixel_size=pixel_size,
                                   seed=1000003 + int(getattr(ctx, "index", 0))) if opts.flatten else micrograph
        picks = picker(image, pixel_size, ctx)
        if opts.reject:
            picks = reject_near_contamination(picks, bg, opts.margin_A / pixel_size)
        return picks

    return pick
