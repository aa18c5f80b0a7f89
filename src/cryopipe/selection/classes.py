"""Class selection after 2D classification: scores, centre of mass, re-centring, sorting, regrouping.

Pure functions on tensors / tables (no files; :mod:`cryopipe.selection.files` reads and writes them). Images are
class averages ``[K, N, N]`` (index ``[y, x]``, box centre at pixel ``N // 2``), in the arbitrary units
RELION writes (white = protein). Class numbers are 1-based as in ``rlnClassNumber``.

Automatic score (``cryopipe select --classes --auto``), in ``[0, 1]``, higher is better::

    score = f_img * (0.4 f_res + 0.2 f_dist + 0.2 f_rot + 0.2 f_trans)

Metadata terms (from ``data_model_classes``; relative to the best non-empty class of the same run):

* ``f_res   = res_best / rlnEstimatedResolution``      (1 for the best-resolved class, 0.5 at twice its value)
* ``f_dist  = u / (u + 0.25)``, ``u = K · rlnClassDistribution`` (share relative to a uniform split: 0.8 for
  an average-sized class, 0.5 at a quarter of it, → 0 for nearly empty classes)
* ``f_rot   = acc_best / rlnAccuracyRotations``, ``f_trans = acc_best / rlnAccuracyTranslationsAngst``
  (terms whose column is missing are left out and the weights renormalised).

Image term ``f_img = f_contrast · f_shape`` ("particle-likeness" of the average itself, absolute, computed
inside the particle mask of radius ``r_m`` = particle diameter / 2, with the *solvent ring*
``0.8 r_m <= r <= r_m`` as background):

* contrast ``z = peak / σ_ring``: highest background-subtracted value inside the mask over the standard
  deviation in the solvent ring; ``f_contrast = z² / (z² + 6²)``. An average of empty ice / noise has
  mottled density everywhere (``z ≈ 2–4`` → 0.1–0.3); a particle has a compact object over flat solvent
  (``z ≳ 15`` → > 0.85).
* shape ``f_shape = max(a² / (a² + 0.015²), clip((h − 0.25) / 0.35, 0, 1))``: ``a`` is the fraction of the
  (background-subtracted, masked) image energy that is *not* rotationally symmetric about the centre of mass
  of the white density, after subtracting the part expected from the solvent noise (``σ_ring²`` per pixel);
  ``h = 1 − p(0) / max p``
  (``p`` the rotational average about that centre) is the "hollowness" of a ring-shaped view. A featureless
  blob (ice ball, contamination, a Gaussian blob from averaging misaligned junk) has ``a < 0.005`` and
  ``h < 0.25`` (the dip of Fourier ringing in a sharp disc); protein views have ``a ≳ 0.02`` even at 25–30 Å
  (enolase projections at 3 Å/px: 0.02–0.16), and ring-like top views have ``h`` ≳ 0.5.

Classes without particles get score 0. RELION's own ranker (``relion_class_ranker``) is a trained network on
other features; this score is a transparent rule, not a reimplementation of it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.core.fourier import shift_images
from cryopipe.errors import CryopipeError

__all__ = [
    "SCORE_WEIGHTS", "SORT_DIRECTIONS", "ImageFeatures", "parse_class_numbers", "class_counts", "solvent_radius",
    "center_of_mass", "masked_center_of_mass", "recenter_images", "image_features", "score_classes", "auto_select",
    "sort_order", "regroup_particles",
]

#: weights of the metadata terms of the automatic score (see the module docstring)
SCORE_WEIGHTS: dict[str, float] = {"res": 0.4, "dist": 0.2, "rot": 0.2, "trans": 0.2}
_CONTRAST_SCALE = 6.0
_ANISOTROPY_SCALE = 0.015
_HOLLOW_START, _HOLLOW_RANGE = 0.25, 0.35
_RING_INNER = 0.8
MASK_EDGE_PX = 5.0                 # soft edge of the re-centring mask (RELION's default --width_mask_edge)
_CHUNK_ELEMENTS = 8_000_000          # pixels per batch in image_features (~64 MB per float64 temporary)

#: sort keys for ``--sort_by``: label -> True when larger values come first
SORT_DIRECTIONS: dict[str, bool] = {
    "rlnClassDistribution": True,
    "rlnClassScore": True,
    "rlnAccuracyRotations": False,
    "rlnAccuracyTranslationsAngst": False,
    "rlnEstimatedResolution": False,
    "rlnClassNumber": False,
}


# ------------------------------------------------------------------------------------------------ class lists


def parse_class_numbers(spec: str | Sequence[int], n_classes: int | None = None) -> list[int]:
    """Class numbers (1-based) from ``--select_classes``: ``"1,3,5"``, ranges ``"2-4"``, or a text file with
    such numbers (whitespace/comma separated, ``#`` comments). Order kept, duplicates dropped; each number must
    be within ``1..n_classes`` when that is given."""
    if isinstance(spec, str):
        p = Path(spec)
        text = spec
        if p.is_file():
            text = "\n".join(line.split("#", 1)[0] for line in p.read_text().splitlines())
        tokens = [t for t in re.split(r"[\s,]+", text.strip()) if t]
        nums: list[int] = []
        for t in tokens:
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", t)
            if not m:
                raise CryopipeError(f"--select_classes {spec}: {t!r} is not a class number or range "
                                    "(give e.g. 1,3,5-7)")
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) else a
            if b < a:
                raise CryopipeError(f"--select_classes: range {t!r} runs backwards (write {b}-{a})")
            nums.extend(range(a, b + 1))
    else:
        nums = [int(v) for v in spec]
    if not nums:
        raise CryopipeError("--select_classes: no class numbers given (e.g. --select_classes 1,3,5)")
    out = list(dict.fromkeys(nums))
    bad = [k for k in out if k < 1 or (n_classes is not None and k > n_classes)]
    if bad:
        limit = f"1..{n_classes}" if n_classes is not None else ">= 1"
        raise CryopipeError(f"--select_classes: class {bad[0]} does not exist (the run has classes {limit})")
    return out


def class_counts(class_numbers: np.ndarray | pd.Series, n_classes: int) -> np.ndarray:
    """Particles per class ``[n_classes]`` (int64) from a ``rlnClassNumber`` column (numbers outside
    ``1..n_classes`` are not counted)."""
    c = np.asarray(class_numbers, dtype=np.int64)
    c = c[(c >= 1) & (c <= n_classes)]
    return np.bincount(c - 1, minlength=n_classes).astype(np.int64)


# ------------------------------------------------------------------------------------------------ geometry


def solvent_radius(n: int, particle_diameter_A: float | None, pixel_size: float) -> float:
    """Mask radius in pixels for an ``n`` box: particle diameter / 2 (Å → px), else ``0.45 n``; clamped to
    ``[n/8, n/2 − 1]``."""
    r = 0.45 * n
    if particle_diameter_A is not None and particle_diameter_A > 0 and pixel_size > 0:
        r = 0.5 * particle_diameter_A / pixel_size
    return float(min(max(r, n / 8.0), n / 2.0 - 1.0))


def _grid(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel coordinates ``x, y`` ``[n, n]`` and distance ``r`` from the box centre ``n // 2``."""
    a = torch.arange(n, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(a, a, indexing="ij")
    c = float(n // 2)
    return xx, yy, torch.sqrt((xx - c) ** 2 + (yy - c) ** 2)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise CryopipeError(f"class averages must be a stack of square images [K, N, N], got {tuple(images.shape)}")
    return images if images.is_floating_point() else images.float()


def _ring_background(images: torch.Tensor, r: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and standard deviation ``[K]`` of each image in the solvent ring ``0.8 radius <= r <= radius``."""
    ring = (r >= _RING_INNER * radius) & (r <= radius)
    if int(ring.sum()) < 8:
        ring = r >= _RING_INNER * radius
    vals = images[:, ring]
    return vals.median(dim=1).values, vals.std(dim=1, unbiased=False)


def center_of_mass(images: torch.Tensor, mask_radius_px: float | None = None) -> torch.Tensor:
    """Centre of mass ``[K, 2]`` = ``(x, y)`` pixels of the white (positive) density of each image.

    The background level (median of the solvent ring ``0.8 r_m <= r <= r_m`` about the box centre,
    ``r_m = mask_radius_px`` or ``N/2 − 1``) is subtracted, negative values are set to 0, and the centre of mass
    of what remains is taken over the whole box. An image with no positive density gives the box centre.
    """
    images = _check_images(images)
    k, n, _ = images.shape
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(dtype)
    xx, yy, r = _grid(n, x.device, dtype)
    radius = float(mask_radius_px) if mask_radius_px is not None else n / 2.0 - 1.0
    bg, _ = _ring_background(x, r, radius)
    w = torch.clamp(x - bg[:, None, None], min=0.0)
    total = w.sum(dim=(1, 2))
    cx = (w * xx).sum(dim=(1, 2)) / total.clamp(min=torch.finfo(dtype).tiny)
    cy = (w * yy).sum(dim=(1, 2)) / total.clamp(min=torch.finfo(dtype).tiny)
    com = torch.stack([cx, cy], dim=1)
    empty = total <= 0
    if bool(empty.any()):
        com[empty] = float(n // 2)
    return com


def masked_center_of_mass(images: torch.Tensor, mask_radius_px: float, edge_px: float = MASK_EDGE_PX
                          ) -> torch.Tensor:
    """Centre of mass ``[K, 2]`` = ``(x, y)`` pixels of the white density *inside a soft circular mask* about the
    box centre ``N // 2`` (radius ``mask_radius_px``, raised-cosine edge ``edge_px`` outside it, as
    :func:`cryopipe.core.masks.soft_circular_mask`).

    The background (median of the solvent ring ``0.8 r_m <= r <= r_m``) is subtracted, the result multiplied by
    the mask, negative values set to 0, and the centre of mass of what remains taken. Density outside the mask (a
    neighbouring particle in a crowded box) does not count. An image with no positive density in the mask gives
    the box centre.
    """
    from cryopipe.core.masks import soft_circular_mask

    images = _check_images(images)
    k, n, _ = images.shape
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(dtype)
    xx, yy, r = _grid(n, x.device, dtype)
    bg, _ = _ring_background(x, r, float(mask_radius_px))
    mask = soft_circular_mask(n, float(mask_radius_px), float(edge_px), device=x.device, dtype=dtype)
    w = torch.clamp((x - bg[:, None, None]) * mask, min=0.0)
    total = w.sum(dim=(1, 2))
    tiny = torch.finfo(dtype).tiny
    com = torch.stack([(w * xx).sum(dim=(1, 2)) / total.clamp(min=tiny),
                       (w * yy).sum(dim=(1, 2)) / total.clamp(min=tiny)], dim=1)
    empty = total <= 0
    if bool(empty.any()):
        com[empty] = float(n // 2)
    return com


def recenter_images(images: torch.Tensor, mask_radius_px: float | None = None, n_iter: int = 20,
                    edge_px: float = MASK_EDGE_PX, tol_px: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Translate each image so that the centre of mass of its white density inside a soft circular mask of the
    particle radius lands on the box centre ``(N//2, N//2)``, with sub-pixel Fourier (periodic) shifts.

    As RELION's centre-of-mass re-centring within the particle mask, the estimate is iterated: the image is
    shifted by the current estimate, the masked centre of mass (:func:`masked_center_of_mass`, mask about the
    box centre, i.e. about the current estimate in the input frame) is measured again and the shift updated,
    until it changes by less than ``tol_px`` or after ``n_iter`` rounds. A neighbour at the edge of a crowded
    box therefore no longer pulls the centre off the particle, as the whole-box :func:`center_of_mass` does.

    Args:
        images: class averages ``[K, N, N]`` (white = protein).
        mask_radius_px: particle radius in pixels (:func:`solvent_radius`; default ``N/2 − 1``).
        n_iter: maximum number of rounds; edge_px: raised-cosine edge of the mask (pixels, RELION's default 5);
        tol_px: stop when no shift changes by more than this (pixels).

    Returns:
        ``(recentred images [K, N, N] in the input dtype, shifts [K, 2] = (dx, dy) pixels applied)``.
    """
    images = _check_images(images)
    n = images.shape[-1]
    radius = float(mask_radius_px) if mask_radius_px is not None else n / 2.0 - 1.0
    x = images.to(torch.float64)
    shifts = torch.zeros(images.shape[0], 2, dtype=torch.float64, device=images.device)
    out = x
    for _ in range(max(1, int(n_iter))):
        step = float(n // 2) - masked_center_of_mass(out, radius, edge_px)
        shifts = shifts + step
        out = shift_images(x, shifts)
        if float(step.abs().max()) < tol_px:
            break
    return out.to(images.dtype), shifts


# ------------------------------------------------------------------------------------------------ scores


@dataclass
class ImageFeatures:
    """Per-class image features (tensors ``[K]``), see the module docstring."""

    contrast: torch.Tensor        # z = peak / σ_ring
    anisotropy: torch.Tensor      # a: noise-corrected non-rotationally-symmetric energy fraction
    hollowness: torch.Tensor      # h = 1 − p(0) / max p
    f_contrast: torch.Tensor
    f_shape: torch.Tensor

    @property
    def particle_likeness(self) -> torch.Tensor:
        """``f_img = f_contrast · f_shape`` in [0, 1]."""
        return self.f_contrast * self.f_shape


def _radial_profile(values: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, n_bins: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotational average of ``values`` ``[K, n, n]`` over distances ``r`` ``[K, n, n]`` (linear binning), and
    the linear-interpolation indices/fractions to expand it back onto the pixels."""
    k = values.shape[0]
    r0 = torch.floor(r).long().clamp(0, n_bins - 2)
    fr = (r - r0.to(r.dtype)).clamp(0.0, 1.0)
    i0, i1 = r0.flatten(1), (r0 + 1).flatten(1)
    w0, w1 = (weight * (1 - fr)).flatten(1), (weight * fr).flatten(1)
    v = values.flatten(1)
    s = torch.zeros(k, n_bins, dtype=values.dtype, device=values.device)
    c = torch.zeros_like(s)
    s.scatter_add_(1, i0, v * w0).scatter_add_(1, i1, v * w1)
    c.scatter_add_(1, i0, w0).scatter_add_(1, i1, w1)
    prof = s / c.clamp(min=1e-12)
    return prof, r0, fr


def image_features(images: torch.Tensor, mask_radius_px: float) -> ImageFeatures:
    """Contrast and shape features of class averages ``[K, N, N]`` (see the module docstring).

    Args:
        images: class averages (white = protein), any device.
        mask_radius_px: particle radius in pixels (:func:`solvent_radius`); the solvent ring
            ``0.8 r_m <= r <= r_m`` gives the background level and noise.
    """
    images = _check_images(images)
    k, n, _ = images.shape
    chunk = max(1, int(_CHUNK_ELEMENTS // (n * n)))
    if k > chunk:   # bound the memory of the [K, N, N] float64 temporaries (large K and boxes)
        parts = [image_features(images[i:i + chunk], mask_radius_px) for i in range(0, k, chunk)]
        return ImageFeatures(*(torch.cat([getattr(p, f) for p in parts]) for f in
                               ("contrast", "anisotropy", "hollowness", "f_contrast", "f_shape")))
    x = images.to(torch.float64)
    xx, yy, r = _grid(n, x.device, torch.float64)
    radius = float(mask_radius_px)
    bg, sd = _ring_background(x, r, radius)
    inside = (r < radius).to(torch.float64)
    d = (x - bg[:, None, None]) * inside
    scale = d.abs().amax(dim=(1, 2))
    sd = torch.maximum(sd, 1e-6 * scale + 1e-30)
    peak = d.amax(dim=(1, 2)).clamp(min=0.0)
    z = peak / sd
    f_contrast = z * z / (z * z + _CONTRAST_SCALE ** 2)

    w = torch.clamp(d, min=0.0)
    total = w.sum(dim=(1, 2)).clamp(min=1e-300)
    cx = (w * xx).sum(dim=(1, 2)) / total
    cy = (w * yy).sum(dim=(1, 2)) / total
    rc = torch.sqrt((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2)
    n_bins = int(math.ceil(radius + n * math.sqrt(0.5))) + 3
    prof, r0, fr = _radial_profile(d, rc, inside.expand(k, n, n), n_bins)
    rot = (torch.gather(prof, 1, r0.flatten(1)) * (1 - fr.flatten(1))
           + torch.gather(prof, 1, (r0 + 1).flatten(1)) * fr.flatten(1)).view(k, n, n)
    e_total = (d * d).sum(dim=(1, 2)).clamp(min=1e-300)
    e_aniso = (((d - rot) * inside) ** 2).sum(dim=(1, 2))
    e_noise = sd * sd * inside.sum()
    a = torch.clamp(e_aniso - e_noise, min=0.0) / e_total
    pmax = prof.amax(dim=1)
    h = torch.where(pmax > 0, (1.0 - prof[:, 0] / pmax.clamp(min=1e-300)).clamp(0.0, 1.0), torch.zeros_like(pmax))
    f_hollow = ((h - _HOLLOW_START) / _HOLLOW_RANGE).clamp(0.0, 1.0)
    f_shape = torch.maximum(a * a / (a * a + _ANISOTROPY_SCALE ** 2), f_hollow)
    flat = peak <= 0
    f_shape = torch.where(flat, torch.zeros_like(f_shape), f_shape)
    return ImageFeatures(contrast=z, anisotropy=a, hollowness=h, f_contrast=f_contrast, f_shape=f_shape)


def _relative_best(values: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    """``best / value`` for "smaller is better" quantities (best over ``valid`` entries), in [0, 1]."""
    if values is None:
        return None
    v = values.to(torch.float64)
    ok = valid & torch.isfinite(v) & (v > 0)
    if not bool(ok.any()):
        return None
    best = v[ok].min()
    return torch.where(ok, best / v.clamp(min=1e-300), torch.zeros_like(v)).clamp(0.0, 1.0)


def score_classes(images: torch.Tensor, *, distribution: torch.Tensor | np.ndarray,
                  estimated_resolution: torch.Tensor | np.ndarray,
                  accuracy_rotations: torch.Tensor | np.ndarray | None = None,
                  accuracy_translations: torch.Tensor | np.ndarray | None = None,
                  counts: torch.Tensor | np.ndarray | None = None, mask_radius_px: float,
                  weights: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Automatic class scores (module docstring) for ``K`` classes.

    Args:
        images: class averages ``[K, N, N]``.
        distribution: ``rlnClassDistribution`` ``[K]`` (fractions).
        estimated_resolution: ``rlnEstimatedResolution`` ``[K]`` (Å).
        accuracy_rotations: ``rlnAccuracyRotations`` ``[K]`` (degrees) or None.
        accuracy_translations: ``rlnAccuracyTranslationsAngst`` ``[K]`` (Å) or None.
        counts: particles per class ``[K]``; a class with 0 particles (or distribution 0) scores 0.
        mask_radius_px: particle radius in pixels (:func:`solvent_radius`).
        weights: metadata weights (default :data:`SCORE_WEIGHTS`).

    Returns:
        dict of float64 tensors ``[K]`` on the images' device: ``score``, ``f_img``, ``f_contrast``, ``f_shape``,
        ``contrast``, ``anisotropy``, ``hollowness``, ``f_res``, ``f_dist`` and, when given, ``f_rot``, ``f_trans``.
    """
    images = _check_images(images)
    dev = images.device
    k = images.shape[0]

    def vec(v, name: str) -> torch.Tensor:
        t = (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, dtype=np.float64)))
        t = t.to(device=dev, dtype=torch.float64).reshape(-1)
        if t.numel() != k:
            raise CryopipeError(f"class scores: {name} has {t.numel()} values for {k} class averages")
        return t

    dist = vec(distribution, "rlnClassDistribution")
    res = vec(estimated_resolution, "rlnEstimatedResolution")
    nonempty = dist > 0
    if counts is not None:
        nonempty = nonempty & (vec(counts, "particle counts") > 0)
    feats = image_features(images, mask_radius_px)
    terms: dict[str, torch.Tensor] = {}
    terms["res"] = _relative_best(res, nonempty)
    u = k * dist.clamp(min=0.0)
    terms["dist"] = u / (u + 0.25)
    if accuracy_rotations is not None:
        terms["rot"] = _relative_best(vec(accuracy_rotations, "rlnAccuracyRotations"), nonempty)
    if accuracy_translations is not None:
        terms["trans"] = _relative_best(vec(accuracy_translations, "rlnAccuracyTranslationsAngst"), nonempty)
    w = dict(SCORE_WEIGHTS if weights is None else weights)
    used = {name: t for name, t in terms.items() if t is not None and w.get(name, 0.0) > 0}
    wsum = sum(w[name] for name in used)
    meta = sum(w[name] * t for name, t in used.items()) / wsum if wsum > 0 else torch.ones(k, dtype=torch.float64,
                                                                                             device=dev)
    f_img = feats.particle_likeness
    score = torch.where(nonempty, f_img * meta, torch.zeros_like(f_img))
    out = {"score": score, "f_img": f_img, "f_contrast": feats.f_contrast, "f_shape": feats.f_shape,
           "contrast": feats.contrast, "anisotropy": feats.anisotropy, "hollowness": feats.hollowness}
    for name, t in terms.items():
        if t is not None:
            out[f"f_{name}"] = t
    return out


def auto_select(scores: np.ndarray | torch.Tensor, counts: np.ndarray, *, min_score: float = 0.5,
                max_score: float = math.inf, min_nr_particles: int = -1, min_nr_classes: int = -1) -> np.ndarray:
    """Boolean mask ``[K]`` of the classes kept by score, as ``relion_class_ranker --auto_select``.

    Classes with ``min_score <= score <= max_score`` are kept; then, if fewer than ``min_nr_particles``
    particles or fewer than ``min_nr_classes`` classes are kept, further non-empty classes are added from the
    best score down until both are reached (``-1``: no minimum).
    """
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    keep = (s >= min_score) & (s <= max_score) & (counts > 0)
    order = np.argsort(-s, kind="stable")
    for i in order:
        if counts[keep].sum() >= min_nr_particles and keep.sum() >= min_nr_classes:
            break
        if not keep[i] and counts[i] > 0:
            keep[i] = True
    return keep


def sort_order(table: pd.DataFrame, sort_by: str | None, reverse: bool = False) -> np.ndarray:
    """Row order ``[K]`` of a classes table for ``--sort_by`` (see :data:`SORT_DIRECTIONS`: distribution and
    score largest first, accuracies and resolution smallest (best) first); ``None``/``"none"``: table order.
    Ties keep the table order; ``reverse`` flips the result."""
    k = len(table)
    if sort_by is None or str(sort_by).lower() in ("none", ""):
        order = np.arange(k)
    else:
        if sort_by not in SORT_DIRECTIONS:
            raise CryopipeError(f"--sort_by {sort_by}: unknown key (use one of {', '.join(SORT_DIRECTIONS)} "
                                "or none)")
        if sort_by not in table:
            raise CryopipeError(f"--sort_by {sort_by}: the classes table has no such column")
        v = pd.to_numeric(table[sort_by], errors="coerce").to_numpy(dtype=np.float64)
        v = np.where(np.isfinite(v), v, -np.inf if SORT_DIRECTIONS[sort_by] else np.inf)
        order = np.argsort(-v if SORT_DIRECTIONS[sort_by] else v, kind="stable")
    return order[::-1].copy() if reverse else order


# ------------------------------------------------------------------------------------------------ regrouping


def _group_width(n_groups: int) -> int:
    return int(math.floor(math.log10(max(n_groups, 1)))) + 1


def regroup_particles(particles: pd.DataFrame, n_groups: int, *, by: str = "defocus",
                      group_scales: Mapping[int, float] | None = None, min_group_size: int = 10) -> pd.DataFrame:
    """Regroup particles into about ``n_groups`` groups (RELION's Select "Regroup the particles? / Approximate
    nr of groups"), writing ``rlnGroupName`` (``group_01`` …) and ``rlnGroupNumber`` (1 …).

    Rule: the target size is ``T = len(particles) // n_groups`` (RELION requires ``T >= 10``). Units that
    are never split — micrographs (``rlnMicrographName``) when that column exists, otherwise single
    particles — are sorted by their mean defocus ``(rlnDefocusU + rlnDefocusV) / 2`` (``by="defocus"``), or
    the old groups (``rlnGroupNumber``) by their ``rlnGroupScaleCorrection`` from ``data_model_groups``
    (``by="scale"``, what RELION 5's ``relion_display --regroup`` does). Within each optics group
    (``rlnOpticsGroup``; groups never mix optics groups) consecutive units are collected into a group until it
    holds at least ``T`` particles; a last remainder smaller than ``T`` joins the previous group of the same
    optics group. So every group has ``>= T`` particles (unless a whole optics group has fewer) and there are
    at most ``n_groups`` groups.

    Returns:
        a copy of ``particles`` (same row order) with the two columns set.
    """
    n = len(particles)
    if n_groups < 1:
        raise CryopipeError(f"--regroup {n_groups}: the number of groups must be at least 1")
    target = n // n_groups
    if target < min_group_size:
        raise CryopipeError(f"--regroup {n_groups}: {n} particles give groups of {target} particles; each group "
                            f"should have at least {min_group_size} (use --regroup {max(1, n // min_group_size)} "
                            "or fewer)")
    optics = (particles["rlnOpticsGroup"].to_numpy(dtype=np.int64) if "rlnOpticsGroup" in particles
              else np.ones(n, dtype=np.int64))
    if by == "defocus":
        for lab in ("rlnDefocusU",):
            if lab not in particles:
                raise CryopipeError(f"--regroup: the particles have no {lab} column (needed to group by defocus; "
                                    "use --regroup_by scale or add CTF values)")
        du = particles["rlnDefocusU"].to_numpy(dtype=np.float64)
        dv = particles["rlnDefocusV"].to_numpy(dtype=np.float64) if "rlnDefocusV" in particles else du
        key_per_particle = 0.5 * (du + dv)
        if "rlnMicrographName" in particles:
            unit_names = particles["rlnMicrographName"].astype(str).to_numpy()
        else:
            unit_names = np.arange(n)
    elif by == "scale":
        if "rlnGroupNumber" not in particles:
            raise CryopipeError("--regroup_by scale: the particles have no rlnGroupNumber column (use a "
                                "run_itNNN_data.star from relion_refine / cryopipe class2d)")
        if not group_scales:
            raise CryopipeError("--regroup_by scale: no data_model_groups table with rlnGroupScaleCorrection in "
                                "the model.star (use --regroup_by defocus)")
        unit_names = particles["rlnGroupNumber"].to_numpy(dtype=np.int64)
        old, inverse = np.unique(unit_names, return_inverse=True)
        missing = sorted(set(old.tolist()) - set(int(g) for g in group_scales))
        if missing:
            raise CryopipeError(f"--regroup_by scale: group {missing[0]} is not in data_model_groups of the "
                                "model.star (use --regroup_by defocus)")
        key_per_particle = np.array([float(group_scales[int(g)]) for g in old.tolist()])[inverse]
    else:
        raise CryopipeError(f"--regroup_by {by}: use defocus or scale")

    # units = (unit name, optics group) pairs, in order of first appearance
    frame = pd.DataFrame({"unit": unit_names, "optics": optics, "key": key_per_particle})
    unit_id = frame.groupby(["unit", "optics"], sort=False, dropna=False).ngroup().to_numpy()
    n_units = int(unit_id.max()) + 1 if n else 0
    u_count = np.bincount(unit_id, minlength=n_units)
    u_key = np.bincount(unit_id, weights=key_per_particle, minlength=n_units) / np.maximum(u_count, 1)
    u_optics = np.zeros(n_units, dtype=np.int64)
    u_optics[unit_id] = optics
    u_group = np.zeros(n_units, dtype=np.int64)
    next_group = 0
    for og in np.unique(u_optics):
        units = np.flatnonzero(u_optics == og)
        units = units[np.argsort(u_key[units], kind="stable")]
        cnt = u_count[units]
        local = np.zeros(len(units), dtype=np.int64)
        if np.all(cnt == 1):
            local = np.arange(len(units)) // target
        else:
            g, acc = 0, 0
            for j, c in enumerate(cnt.tolist()):
                if acc >= target:
                    g, acc = g + 1, 0
                local[j] = g
                acc += c
        sizes = np.bincount(local)
        if len(sizes) > 1 and sizes[-1] < target:
            local[local == len(sizes) - 1] = len(sizes) - 2
        u_group[units] = next_group + local
        next_group += int(local.max()) + 1 if len(local) else 0
    new_group = u_group[unit_id] + 1
    width = max(_group_width(n_groups), _group_width(next_group))
    out = particles.copy()
    out["rlnGroupNumber"] = new_group.astype(np.int64)
    names = np.array([f"group_{g:0{width}d}" for g in range(1, next_group + 1)], dtype=object)
    out["rlnGroupName"] = names[new_group - 1]
    return out
