"""Template-matching particle picker, RELION's ``relion_autopick --ref``.

Re-derived from RELION 5 ``src/autopicker.cpp`` (``initialise``, ``autoPickOneMicrograph``,
``calculateStddevAndMeanUnderMask``, ``peakSearch``, ``prunePeakClusters``,
``removeTooCloselyNeighbouringPeaks``), computed in torch with every in-plane rotation of a reference in one
batch of FFT correlations (CPU or CUDA, the same code).

**References** (:func:`read_reference_images`, :func:`prepare_references`): 2D images from a STAR file
(``rlnReferenceImage`` or ``rlnImageName``), an ``.mrcs`` stack or a single 2D ``.mrc``; projections of a 3D map
at the HEALPix directions of ``healpix_order`` in the asymmetric unit of ``sym`` (:func:`reference_projections`,
psi = 0: in-plane rotations are searched separately); or RELION's Gaussian blob (:func:`gauss_reference`).
References with a pixel size ``apix_ref`` different from the micrograph's ``apix`` are resampled by Fourier
cropping/padding to ``2·round((b/2)·apix_ref/apix)`` pixels and, when enlarged, multiplied by ``b / new size``
(RELION's correction for references made from down-scaled, re-normalised particles). The particle diameter is
``--particle_diameter`` or, when negative, RELION's automatic value (on the central row of each reference, the
distance between the first and the last pixel that differ from the corner value, averaged, times
``apix_ref``). ``R = round(diameter / (2·apix)) − shrink_particle_mask`` (micrograph pixels) is the particle
radius: references are multiplied by the hard disc ``r² < R²`` and by −1 with ``invert``.

**Micrograph**: pixels with ``|x − μ|/σ > outlier_zscore`` are set to ``μ``, then ``x ← (x − μ)/σ`` (μ, σ of
the raw micrograph); a non-square micrograph is centred in an ``N × N`` square (``N`` = larger side) filled with
N(0, 1) noise (seeded). ``--highpass`` filters the micrograph (raised-cosine edge of 2 Fourier pixels).

**Work grid** (``--shrink``, ``--lowpass``): as the LoG picker (:func:`cryopipe.picking.log.log_work_size`):
size ``w`` (even, FFT-friendly), ``scale = w / N`` (float32). Map pixel ``q`` (row or column) is the square's
pixel ``q / scale``. The references are band-limited to ``|k| ≤ d/2`` with ``d = 2·round(N·apix/lowpass)``
(``N`` without lowpass), all frequencies in Fourier pixels of the ``N``-square, and to the work grid
(``|kx|, |ky| < w/2``; its Nyquist row and column are left out).

**Figure of merit** (per reference ``A``, per map pixel ``s``):

* local background statistics ``μ(s)``, ``σ(s)`` of the micrograph under the background mask (the pixels
  ``r² ≥ R²`` of the reference box, ``n_bg`` of them), by FFT correlation of the micrograph and its square with
  the mask on the work grid; ``σ = 1`` where the variance is ``≤ 1e-10`` (the ``_avgNoise`` / ``_stddevNoise``
  maps);
* correlation ``C_ψ(s) = Σ_x A_ψ(x)·X(s + x) / n`` (``n`` = number of pixels of the disc ``r² < R²``) for every
  in-plane angle ``ψ = j·360/round(360/ang)``, by FFT on the work grid. ``A_ψ`` is sampled in Fourier space at
  ``Aᵀk`` with ``A = euler_to_matrix(0, 0, ψ)`` (RELION's ``get2DFourierTransform``; bilinear interpolation of the
  reference's FT zero-padded 2×, with the gridding pre-correction ``sinc²`` per axis), multiplied by the
  micrograph's CTF with ``ctf`` (``−sin γ`` with B-factor envelope; 1 below the first peak with
  ``ctf_intact_first_peak``), so ``rlnAnglePsi`` follows RELION's particle convention;
* ``<A>``, ``<A²>``: sums of the real-space (band-limited, CTF-multiplied) ψ = 0 reference over the disc
  ``r² < R²`` divided by ``n + 1`` (as RELION);
* ``diff2 = (−2·C + 2·μ·S)/σ + <A²>``, ``P = exp(−diff2/2)`` (the likelihood ratio of "reference" against
  "empty", σ_noise = 1), ``E = exp(<A²>/2)`` and **FOM = (P − 1)/(E − 1)**, the best over ψ kept with its ψ
  (the ``_ref%03d_bestCCF`` / ``_bestPSI`` maps). FOM = 1 is the likelihood ratio of a median noisy copy of the
  reference itself.

  *Deviation (local-mean term):* RELION uses ``S = <A>`` (disc sum / (n + 1)), but ``C`` correlates the whole
  band-limited reference, which leaks out of the disc (strongly so after multiplication by a CTF), so a local
  offset μ of the micrograph (ice gradient, contamination) does not cancel and biases the FOM by ``∝ μ``
  (measured: up to 0.24 in FOM units inside a −1.5 σ patch of the fixture micrograph with ``--ctf``).
  Here ``S = Σ A / n`` over the whole reference (its DC coefficient, the same support and normalisation as ``C``),
  so that ``C − μ·S`` is exactly invariant to a constant offset. ``relion_mean_term=True`` restores RELION's
  term; for μ ≈ 0 (clean ice) both agree.

  *Deviation:* RELION's ``E`` adds a random term ``Σ 2·A·ξ`` (ξ ~ N(0, 1), one draw per micrograph) to the
  exponent's ``Σ A²``; its expectation is 0 and it only makes the FOM scale of each micrograph random (by
  ~10 % for typical references), so it is left out here: ``E`` is deterministic. ``P`` and the FOM are
  computed in float64 from the best correlation and stored as float32, clamped to ±3.4e38 (RELION overflows
  to inf on strong contamination).

**Peaks** (:func:`template_pick_from_maps`), per reference: map pixels inside the micrograph at least
``max(1, int((skip_side + box/2)·scale))`` work pixels from its edges with ``FOM ≥ threshold``, not rejected
by ``max_stddev_noise > 0 and σ > max_stddev_noise`` or ``min_avg_noise > −900 and μ < min_avg_noise``, and
local maxima against their 4 neighbours (with ``scale ≥ 1`` the neighbours must also reach the threshold).
:func:`prune_peak_clusters` (single-linkage clusters with link distance² ``< R²·scale²``; in each cluster the
best FOM is kept and cluster members closer than ``min_distance`` removed, repeatedly) runs per reference,
then on the union over the references; finally :func:`remove_close_neighbours` drops every peak whose nearest
neighbour is closer than ``min_distance`` (default ``box·apix/2`` Å). Coordinates
``(index − first index)/scale`` in micrograph pixels (RELION's ``FIRST_XMIPP_INDEX`` bookkeeping, as LoG);
``rlnClassNumber`` = reference number (1-based), ``rlnAnglePsi`` = best ψ.

**FOM maps** (:func:`write_template_maps` / :func:`read_template_maps`): one float32 MRC stack
``<base>_fom.mrcs`` per micrograph on the work grid (pixel size ``apix/scale``) with the sections listed in
:data:`MAP_SECTIONS` followed by ``ref001_bestCCF``, ``ref001_bestPSI``, ``ref002_bestCCF``, … (RELION's
per-reference maps, one file instead of ``2·R + 2`` files), and ``<base>_fom.star`` with the geometry needed
to pick from them (work and square sizes, micrograph shape, box, radius, diameter, pixel size), ``E`` per
reference and the settings that made the maps. Picking from re-read maps gives exactly the picks of a fresh
run (the fresh run also picks from the float32 maps it writes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.picking.common import PickTable, WorkGridMixin

__all__ = [
    "TemplateReferences",
    "TemplateMaps",
    "TemplateOptions",
    "MAP_SECTIONS",
    "psi_sampling",
    "read_reference_images",
    "reference_projections",
    "gauss_reference",
    "auto_particle_diameter",
    "prepare_references",
    "template_fom_maps",
    "peak_search",
    "prune_peak_clusters",
    "remove_close_neighbours",
    "template_pick_from_maps",
    "template_pick",
    "write_template_maps",
    "read_template_maps",
    "template_maps_paths",
    "make_template_picker",
]

#: Sections of a FOM-map stack before the per-reference ``bestCCF``/``bestPSI`` pairs: the best FOM over all
#: references, its ψ (degrees), its reference number (1-based), and the local background σ and mean.
MAP_SECTIONS = ("bestFOM", "bestPSI", "bestREF", "stddevNoise", "avgNoise")

_F32_MAX = float(np.finfo(np.float32).max)


def _round_half_away(x: float) -> int:
    """RELION's ``ROUND`` (half away from zero)."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def psi_sampling(ang: float) -> tuple[float, int]:
    """RELION's in-plane sampling for ``--ang``: ``n = round(360/ang)`` angles ``j·360/n`` (degrees).

    Returns ``(step, n)``.
    """
    if not ang > 0:
        raise CryopipeError(f"--ang {ang}: the in-plane angular step must be > 0 degrees (360 = no rotations)")
    n = max(1, _round_half_away(360.0 / ang))
    return 360.0 / n, n


# ------------------------------------------------------------------------------------------------ references


@dataclass
class TemplateReferences:
    """References ready for picking on micrographs of pixel size ``pixel_size``.

    Attributes:
        images: ``[R, b, b]`` float32 real-space references at the micrograph pixel size, centred at ``b//2``,
            multiplied by the disc ``r² < radius_px²`` and by −1 when inverted.
        pixel_size: Å per pixel (the micrographs').
        particle_diameter: Å (given or automatic).
        radius_px: RELION's particle radius ``round(diameter/(2·apix)) − shrink_particle_mask`` (pixels).
        psi_step: in-plane step (degrees, ``360/n``).
        names: one label per reference (file/image name or projection direction).
        apply_ctf: False for the Gaussian blob (RELION never multiplies it by a CTF).
    """

    images: torch.Tensor
    pixel_size: float
    particle_diameter: float
    radius_px: int
    psi_step: float = 10.0
    names: list[str] = field(default_factory=list)
    apply_ctf: bool = True

    @property
    def box(self) -> int:
        """Reference box size ``b`` (pixels of the micrograph)."""
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def psi_angles(self) -> torch.Tensor:
        """The searched in-plane angles (degrees, float64, CPU)."""
        step, n = psi_sampling(self.psi_step)
        return torch.arange(n, dtype=torch.float64) * step


def _resolve(name: str, star_dir: Path, root: Path) -> Path:
    p = Path(name)
    if p.is_absolute():
        return p
    for base in (root, star_dir):
        if (base / p).exists():
            return base / p
    return root / p


def reference_projections(volume: torch.Tensor, healpix_order: int = 1, sym: str | None = "C1",
                          ) -> tuple[torch.Tensor, list[str]]:
    """Projections ``[D, n, n]`` of a 3D map ``[n, n, n]`` at the HEALPix directions of ``healpix_order`` in
    the asymmetric unit of ``sym`` (ψ = 0), with labels ``"rot=…,tilt=…"`` (degrees)."""
    from cryopipe.core.geometry import euler_to_matrix
    from cryopipe.core.healpix import asymmetric_unit_pixels, healpix_directions
    from cryopipe.core.projector import Projector

    pix = asymmetric_unit_pixels(healpix_order, sym, device="cpu")
    rot, tilt = healpix_directions(healpix_order, device="cpu")
    rot, tilt = rot[pix], tilt[pix]
    mats = euler_to_matrix(rot, tilt, torch.zeros_like(rot))
    proj = Projector(volume.to(torch.float32), pad=2).project_images(mats.to(volume.device))
    names = [f"rot={float(r):.2f},tilt={float(t):.2f}" for r, t in zip(rot, tilt)]
    return proj.to(torch.float32), names


def read_reference_images(path: str | os.PathLike, *, root: str | os.PathLike = ".", healpix_order: int = 1,
                          sym: str | None = "C1", device: torch.device | str | None = None,
                          ) -> tuple[torch.Tensor, float, list[str], bool]:
    """Read ``--ref``: a STAR file, an ``.mrcs`` stack / 2D ``.mrc``, or a 3D map (projected).

    Args:
        path: the reference file. STAR: first table with ``rlnReferenceImage`` (else ``rlnImageName``);
            names like ``000003@Class2D/job008/run_it025_classes.mrcs`` are looked up relative to ``root``
            (the project directory), then to the STAR file's folder.
        root: project directory.
        healpix_order, sym: directions for a 3D map (RELION ``--healpix_order``, ``--sym``).
        device: where the projections are computed.

    Returns:
        ``(images [R, b, b] float32 CPU tensor, header pixel size in Å (0 if unset), names, is_3d)``.
    """
    from cryopipe.io.mrc import MrcStack, mrc_info, parse_image_name, read_mrc
    from cryopipe.io.star import read_star

    path = Path(path)
    root = Path(root)
    if not path.exists():
        raise InputFileError(path, "reference file not found", "give a class-averages STAR, an .mrcs stack or a 3D map")
    if path.suffix.lower() == ".star":
        blocks = read_star(path)
        table, label = None, None
        for block in blocks.values():
            if isinstance(block, pd.DataFrame):
                for lab in ("rlnReferenceImage", "rlnImageName"):
                    if lab in block.columns:
                        table, label = block, lab
                        break
            if table is not None:
                break
        if table is None or len(table) == 0:
            raise InputFileError(path, "has no table with rlnReferenceImage or rlnImageName (or it is empty)",
                                 "give e.g. Select/jobNNN/class_averages.star or an .mrcs stack")
        names = [str(v) for v in table[label]]
        images, apix = [], 0.0
        stacks: dict[Path, MrcStack] = {}
        for name in names:
            idx, file = parse_image_name(name)
            fpath = _resolve(file, path.parent, root)
            if fpath not in stacks:
                stacks[fpath] = MrcStack(fpath)
            st = stacks[fpath]
            if idx >= len(st):
                raise InputFileError(path, f"{label} {name}: image {idx + 1} does not exist in {fpath} "
                                           f"({len(st)} images)", "fix the reference STAR file")
            images.append(np.asarray(st[idx], dtype=np.float32))
            apix = apix or float(st.pixel_size)
        for st in stacks.values():
            st.close()
        shapes = {im.shape for im in images}
        if len(shapes) != 1 or any(s[0] != s[1] for s in shapes):
            raise InputFileError(path, f"references must be square and of one size, got shapes {sorted(shapes)}",
                                 "use references from one 2D classification")
        return torch.from_numpy(np.stack(images)), apix, names, False
    info = mrc_info(path)
    data, apix = read_mrc(path)
    if data.ndim == 3 and not info.is_stack:
        if not (data.shape[0] == data.shape[1] == data.shape[2]):
            raise InputFileError(path, f"3D reference must be a cube, got {data.shape}", "resize the map")
        vol = torch.from_numpy(data).to(device if device is not None else "cpu")
        proj, names = reference_projections(vol, healpix_order, sym)
        return proj.cpu(), apix, names, True
    if data.ndim == 2:
        data = data[None]
    if data.shape[1] != data.shape[2]:
        raise InputFileError(path, f"references must be square, got {data.shape[1]}x{data.shape[2]}", "resize them")
    names = [f"{i + 1:06d}@{path}" for i in range(data.shape[0])]
    return torch.from_numpy(np.ascontiguousarray(data)), apix, names, False


def gauss_reference(particle_diameter: float, pixel_size: float, gauss_max: float = 0.1) -> torch.Tensor:
    """RELION's ``--ref gauss`` blob ``[1, b, b]``: box ``b = int(1.5·round(d/apix))`` made even, Gaussian with
    σ = b/6 pixels and peak value ``gauss_max``, centred at ``b//2``."""
    if not particle_diameter > 0:
        raise CryopipeError("--ref gauss needs --particle_diameter > 0 (Å)")
    b = int(1.5 * _round_half_away(particle_diameter / pixel_size))
    b += b % 2
    c = torch.arange(b, dtype=torch.float64) - b // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    sigma = b / 6.0
    return (gauss_max * torch.exp(-r2 / (2 * sigma * sigma))).to(torch.float32)[None]


def auto_particle_diameter(images: torch.Tensor, pixel_size_ref: float) -> float:
    """RELION's automatic diameter (Å): on the central row of each reference, last − first column whose value
    differs from the corner pixel by more than 1e-6 (the first such run only), averaged, times ``pixel_size_ref``."""
    imgs = images.detach().cpu().double().numpy()
    b = imgs.shape[-1]
    total = 0.0
    for im in imgs:
        corner = im[0, 0]
        row = im[b // 2]
        diff = np.abs(row - corner) > 1e-6
        first, last = 0, b - 1
        nz = np.flatnonzero(diff)
        if len(nz):
            first = int(nz[0])
            back = np.flatnonzero(~diff[first + 1:])
            if len(back):
                last = first + int(back[0])
        total += last - first
    return total / len(imgs) * pixel_size_ref


def prepare_references(images: torch.Tensor, pixel_size: float, *, pixel_size_ref: float | None = None,
                       particle_diameter: float = -1.0, shrink_particle_mask: int = 2, invert: bool = False,
                       psi_step: float = 10.0, names: Sequence[str] | None = None,
                       apply_ctf: bool = True) -> TemplateReferences:
    """Rescale, mask and sign references for micrographs of ``pixel_size`` Å (see the module docstring).

    Args:
        images: ``[R, b, b]`` (or ``[b, b]``) references, centred at ``b//2``.
        pixel_size: micrograph pixel size (Å).
        pixel_size_ref: references' pixel size (Å; RELION ``--angpix_ref``; None = same as the micrographs).
        particle_diameter: Å; ``<= 0`` = automatic (RELION ``--particle_diameter -1``).
        shrink_particle_mask: ``--shrink_particle_mask`` (pixels).
        invert: ``--invert`` (the micrograph's particles have the opposite contrast of the references).
        psi_step: ``--ang`` (degrees).
        apply_ctf: whether ``--ctf`` may multiply these references by the CTF.
    """
    from cryopipe.core.fourier import fourier_rescale

    if not pixel_size > 0:
        raise CryopipeError(f"micrograph pixel size {pixel_size} Å is not positive; give --angpix")
    imgs = images.detach().to(torch.float32)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3 or imgs.shape[-1] != imgs.shape[-2] or imgs.shape[0] == 0:
        raise CryopipeError(f"references must be a non-empty stack of square images, got shape {tuple(imgs.shape)}")
    apix_ref = float(pixel_size_ref) if pixel_size_ref is not None and pixel_size_ref > 0 else float(pixel_size)
    psi_sampling(psi_step)  # validates
    diameter = float(particle_diameter)
    if not diameter > 0:
        diameter = auto_particle_diameter(imgs, apix_ref)
    b = imgs.shape[-1]
    if abs(apix_ref - pixel_size) > 1e-3:
        new = 2 * _round_half_away((b // 2) * apix_ref / pixel_size)
        if new < 4:
            raise CryopipeError(f"--angpix_ref {apix_ref}: the references would be only {new} px at the micrograph "
                                f"pixel size {pixel_size} Å; check the pixel sizes")
        imgs = fourier_rescale(imgs, new, ndim=2)
        if new > b:
            imgs = imgs * (b / new)
        b = new
    if diameter > b * pixel_size + 1e-6:
        raise CryopipeError(f"--particle_diameter {diameter:g} Å is larger than the reference box ({b} px × "
                            f"{pixel_size:g} Å); give a smaller diameter")
    radius = _round_half_away(diameter / (2.0 * pixel_size)) - int(shrink_particle_mask)
    if radius < 1:
        raise CryopipeError(f"particle radius {radius} px (diameter {diameter:g} Å, pixel {pixel_size:g} Å, "
                            f"--shrink_particle_mask {shrink_particle_mask}) is too small; give a larger --particle_diameter")
    c = torch.arange(b) - b // 2
    disc = (c[:, None] ** 2 + c[None, :] ** 2) < radius * radius
    imgs = imgs * disc.to(imgs.dtype)
    if invert:
        imgs = -imgs
    labels = list(names) if names is not None else [f"ref{i + 1:03d}" for i in range(imgs.shape[0])]
    return TemplateReferences(images=imgs.contiguous(), pixel_size=float(pixel_size), particle_diameter=diameter,
                              radius_px=int(radius), psi_step=float(psi_step), names=labels, apply_ctf=apply_ctf)


# ------------------------------------------------------------------------------------------------ FOM maps


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
    d_size = n if lp is None else 2 * _round_half_away(n * apix / lp)
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

    # background statistics under the mask r² >= R² of the reference box
    R = refs.radius_px
    c = torch.arange(b, device=device) - b // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    bg = (r2 >= R * R).to(torch.float64)
    disc = r2 < R * R
    n_bg = int(bg.sum())
    n_disc = int(disc.sum())
    if n_bg == 0:
        raise CryopipeError(f"particle radius {R} px leaves no background in the {b} px reference box; give a "
                            "smaller --particle_diameter")
    ey, ex = _dft_matrices(n, w, b, device)
    mask_ft = (ey @ bg.to(ey.dtype) @ ex).conj().to(torch.complex64)
    mean = torch.fft.irfft2(Xw * mask_ft, s=(w, w)) * (norm_w / n_bg)
    sq = torch.fft.irfft2(X2w * mask_ft, s=(w, w)) * (norm_w / n_bg)
    var = sq.double() - mean.double() ** 2
    stddev = torch.where(var > 1e-10, torch.sqrt(var.clamp(min=0)), torch.ones_like(var)).to(dt)
    del sq, var, X2w

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
    rb = (rows_b.numel() - 1) // 2
    prod = None if full else torch.zeros((chunk, w, h + 1), dtype=torch.complex64, device=device)  # 0 off the box
    for i in range(n_ref):
        ft = _gridding_corrected_padded_ft(ref_images[i:i + 1])[0][0]
        # ψ = 0 reference in real space (band-limited, × CTF), sums over the disc
        v0 = _sample_ft(ft, grid0)
        a0 = torch.complex(v0[0, 0], v0[1, 0]) * inside
        if ctf_box is not None:
            a0 = a0 * ctf_box
        a_real = (ey_inv @ a0.to(torch.complex128) @ ex_inv).real / float(n * n)
        a_disc = a_real[disc]
        sum_a2 = float((a_disc * a_disc).sum()) / (n_disc + 1)
        if relion_mean_term:
            sum_a = float(a_disc.sum()) / (n_disc + 1)
        else:
            # Σ A over the whole (band-limited, CTF-multiplied) reference = its DC coefficient, / n like C
            sum_a = float(a0[0, 0].real) / n_disc
        em1 = math.expm1(sum_a2 / 2.0)
        expected[i] = math.exp(sum_a2 / 2.0)
        if not em1 > 0:
            raise CryopipeError(f"reference {i + 1} ({refs.names[i] if i < len(refs.names) else ''}) is zero inside "
                                "the particle disc after filtering; check the references and --lowpass")
        # correlations for all ψ, in chunks; keep the best correlation and its ψ
        best = torch.full((w, w), -math.inf, dtype=dt, device=device)
        best_psi = torch.zeros((w, w), dtype=dt, device=device)
        for j0 in range(0, len(psis), chunk):
            grid = grid_all[j0:j0 + chunk]
            nb = grid.shape[0]
            v = _sample_ft(ft, grid)               # [2, B, rows, kx]
            spec = torch.complex(v[0], v[1].neg_()).mul_(Y)  # conj(A_ψ)·(CTF·X) on the box
            if full:
                cc = torch.fft.irfft2(spec, s=(w, w))
            else:
                prod[:nb, : rb + 1, :nkx] = spec[:, : rb + 1]
                prod[:nb, w - rb:, :nkx] = spec[:, rb + 1:]
                cc = torch.fft.irfft2(prod[:nb], s=(w, w))
            cmax, carg = cc.max(dim=0)
            upd = cmax > best
            best = torch.where(upd, cmax, best)
            best_psi = torch.where(upd, psi_dev[j0:j0 + nb][carg], best_psi)
            del cc, v, spec
        corr = best.double() * (norm_w / n_disc)
        log_p = (corr - mean64 * sum_a) * inv_sd64 - 0.5 * sum_a2
        fom = torch.expm1(log_p) / em1
        fom_maps[i] = torch.nan_to_num(fom, nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX).clamp(-_F32_MAX, _F32_MAX).to(dt)
        psi_maps[i] = best_psi
    return TemplateMaps(fom=fom_maps, psi=psi_maps, stddev=stddev, mean=mean.to(dt), expected_ratio=expected,
                        work_size=int(w), size=int(n), shape=(h_mic, w_mic), pixel_size=float(apix), box=int(b),
                        radius_px=int(R), particle_diameter=float(refs.particle_diameter))


# ------------------------------------------------------------------------------------------------ peaks


def peak_search(fom: torch.Tensor, stddev: torch.Tensor, mean: torch.Tensor, *, threshold: float,
                first_index: tuple[int, int], extent: tuple[int, int], skip: int, scale_below_one: bool,
                max_stddev_noise: float = -1.0, min_avg_noise: float = -999.0) -> np.ndarray:
    """RELION's ``peakSearch`` on FOM maps ``[R, w, w]`` (or one ``[w, w]``), vectorised over references.

    Pixels of the micrograph's extent (``first_index``, ``extent`` on the work grid) at least ``skip`` (≥ 1)
    pixels from its edges with ``fom ≥ threshold``, not rejected by the noise criteria (``stddev``, ``mean``
    ``[w, w]``), and ``≥`` their four neighbours (which, unless ``scale_below_one``, must also be
    ``≥ threshold``).

    Returns:
        ``[K, 3]`` int64 NumPy array of ``(reference, row, col)`` work-grid peaks, per reference in row-major
        order (the order RELION visits them).
    """
    f3 = fom if fom.ndim == 3 else fom[None]
    r0, c0 = first_index
    hy, wx = extent
    skip = max(1, int(skip))
    i0, i1 = r0 + skip, r0 + hy - 1 - skip  # inclusive
    j0, j1 = c0 + skip, c0 + wx - 1 - skip
    if i1 < i0 or j1 < j0:
        return np.zeros((0, 3), dtype=np.int64)
    f = f3[:, i0:i1 + 1, j0:j1 + 1]
    ok = f >= threshold
    if max_stddev_noise > 0:
        ok &= ~(stddev[i0:i1 + 1, j0:j1 + 1] > max_stddev_noise)
    if min_avg_noise > -900:
        ok &= ~(mean[i0:i1 + 1, j0:j1 + 1] < min_avg_noise)
    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nb = f3[:, i0 + di:i1 + 1 + di, j0 + dj:j1 + 1 + dj]
        ok &= ~(nb > f)
        if not scale_below_one:
            ok &= ~(nb < threshold)
    idx = torch.nonzero(ok, as_tuple=False).cpu().numpy().astype(np.int64)
    idx[:, 1] += i0
    idx[:, 2] += j0
    return idx


def _pairs_within(pts: np.ndarray, d2_limit: float) -> np.ndarray:
    """Index pairs ``[K, 2]`` (i < j) with squared distance strictly below ``d2_limit``."""
    from scipy.spatial import cKDTree

    if len(pts) < 2 or not d2_limit > 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = cKDTree(pts).query_pairs(r=math.sqrt(d2_limit), output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    d2 = ((pts[pairs[:, 0]] - pts[pairs[:, 1]]) ** 2).sum(axis=1)
    return pairs[d2 < d2_limit].astype(np.int64)


def prune_peak_clusters(x: np.ndarray, y: np.ndarray, fom: np.ndarray, link_d2: float, min_d2: float) -> np.ndarray:
    """RELION's ``prunePeakClusters``: indices of the kept peaks, in RELION's output order.

    Peaks (integer work-grid positions) are grouped in single-linkage clusters (squared distance
    ``< link_d2``); clusters are visited in the order of their first peak in the input; in each cluster the
    peak with the highest FOM is kept and every member at squared distance ``< min_d2`` from it removed,
    repeatedly. (Equal FOMs in one cluster are resolved by input order; RELION uses its cluster-building order.)
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pts = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1)
    links = _pairs_within(pts, link_d2)
    graph = coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    first = np.full(label.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, label, np.arange(n))
    comp_rank = np.argsort(np.argsort(first))[label]
    sup = _pairs_within(pts, min_d2)
    sup = sup[label[sup[:, 0]] == label[sup[:, 1]]]
    nbr_i = np.concatenate([sup[:, 0], sup[:, 1]])
    nbr_j = np.concatenate([sup[:, 1], sup[:, 0]])
    o = np.argsort(nbr_i, kind="stable")
    nbr_i, nbr_j = nbr_i[o], nbr_j[o]
    start = np.searchsorted(nbr_i, np.arange(n + 1))
    order = np.lexsort((np.arange(n), -np.asarray(fom, dtype=np.float64), comp_rank))
    suppressed = np.zeros(n, dtype=bool)
    kept: list[int] = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[nbr_j[start[i]:start[i + 1]]] = True
    return np.asarray(kept, dtype=np.int64)


def remove_close_neighbours(x: np.ndarray, y: np.ndarray, min_d2: float) -> np.ndarray:
    """RELION's ``removeTooCloselyNeighbouringPeaks``: indices (input order) of the peaks whose nearest other
    peak is at squared distance ``> min_d2`` (both members of a too-close pair are removed)."""
    from scipy.spatial import cKDTree

    n = len(x)
    if n < 2:
        return np.arange(n, dtype=np.int64)
    pts = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1)
    _, idx = cKDTree(pts).query(pts, k=2)
    other = np.where(idx[:, 0] == np.arange(n), idx[:, 1], idx[:, 0])
    d2 = ((pts - pts[other]) ** 2).sum(axis=1)
    return np.flatnonzero(d2 > min_d2).astype(np.int64)


def template_pick_from_maps(maps: TemplateMaps, *, threshold: float = 0.25, min_distance: float = -1.0,
                            max_stddev_noise: float = -1.0, min_avg_noise: float = -999.0,
                            skip_side: int = 0) -> PickTable:
    """Peaks of precomputed :class:`TemplateMaps` (RELION's peak search, cluster pruning, close-pair removal).

    Args:
        threshold: ``--threshold`` (fraction of the expected likelihood ratio; RELION CLI 0.25, GUI 0.05).
        min_distance: ``--min_distance`` (Å); ``< 0`` = half the reference box (``box·apix/2``).
        max_stddev_noise: ``--max_stddev_noise`` (> 0: reject peaks whose local background σ is larger, e.g.
            on contamination / carbon edges; RELION GUI 1.1).
        min_avg_noise: ``--min_avg_noise`` (> −900: reject peaks whose local background mean is lower).
        skip_side: ``--skip_side`` extra micrograph pixels kept from the edges (besides box/2).

    Returns:
        :class:`PickTable`: ``x, y`` micrograph pixels (work-grid index / scale), ``fom``, ``class_number``
        (reference, 1-based), ``psi`` (degrees), ``diameter`` (the particle diameter, Å).
    """
    device = maps.fom.device
    scale32 = np.float32(maps.scale)
    md = min_distance if min_distance >= 0 else maps.box * maps.pixel_size / 2.0
    md_px = _round_half_away(md / maps.pixel_size)
    min_d2 = float(np.float32(np.float32(md_px) * np.float32(md_px)) * scale32 * scale32)
    link_d2 = float(np.float32(maps.radius_px * maps.radius_px) * scale32 * scale32)
    skip = int(np.float32(skip_side + maps.box // 2) * scale32)
    r0, c0 = maps.first_index()
    extent = maps.extent()
    peaks = peak_search(maps.fom, maps.stddev, maps.mean, threshold=float(threshold), first_index=(r0, c0),
                        extent=extent, skip=skip, scale_below_one=bool(scale32 < 1),
                        max_stddev_noise=max_stddev_noise, min_avg_noise=min_avg_noise)
    if len(peaks) == 0:
        return PickTable.empty(device)
    sel = torch.as_tensor(peaks, device=device)
    f_all = maps.fom[sel[:, 0], sel[:, 1], sel[:, 2]].cpu().numpy()
    p_all = maps.psi[sel[:, 0], sel[:, 1], sel[:, 2]].cpu().numpy()
    bounds = np.searchsorted(peaks[:, 0], np.arange(maps.fom.shape[0] + 1))
    xs, ys, fs, refs_, ps = [], [], [], [], []
    for i in range(maps.fom.shape[0]):
        a, z = bounds[i], bounds[i + 1]
        if a == z:
            continue
        px, py, f = peaks[a:z, 2] - c0, peaks[a:z, 1] - r0, f_all[a:z]
        keep = prune_peak_clusters(px, py, f, link_d2, min_d2)
        xs.append(px[keep]); ys.append(py[keep]); fs.append(f[keep]); ps.append(p_all[a:z][keep])
        refs_.append(np.full(len(keep), i + 1, dtype=np.int64))
    px, py, f, ref, p = (np.concatenate(v) for v in (xs, ys, fs, refs_, ps))
    keep = prune_peak_clusters(px, py, f, link_d2, min_d2)
    px, py, f, ref, p = px[keep], py[keep], f[keep], ref[keep], p[keep]
    keep = remove_close_neighbours(px, py, min_d2)
    px, py, f, ref, p = px[keep], py[keep], f[keep], ref[keep], p[keep]
    s = float(scale32)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return PickTable(x=t(px / s, torch.float64), y=t(py / s, torch.float64), fom=t(f.astype(np.float64), torch.float64),
                     diameter=torch.full((len(px),), float(maps.particle_diameter), dtype=torch.float64, device=device),
                     class_number=t(ref, torch.int64), psi=t(p.astype(np.float64), torch.float64))


@dataclass(frozen=True)
class TemplateOptions:
    """Template-picking options (RELION ``relion_autopick`` names in brackets; CLI defaults).

    Map options (change the FOM maps): ``lowpass`` (``--lowpass`` Å, None = none), ``highpass`` (``--highpass``
    Å), ``shrink`` (``--shrink``), ``ctf`` (``--ctf``), ``ctf_intact_first_peak``, ``outlier_zscore``
    (``--outlier_removal_zscore``), ``optimise_scale`` (not ``--skip_optimise_scale``), ``random_seed``,
    ``relion_mean_term`` (RELION's disc-sum local-mean term, see the module docstring).
    Peak options (re-picking from maps): ``threshold`` (``--threshold``), ``min_distance`` (``--min_distance``
    Å, < 0 = box/2), ``max_stddev_noise``, ``min_avg_noise``, ``skip_side`` (px).
    """

    lowpass: float | None = None
    highpass: float | None = None
    shrink: float = 1.0
    ctf: bool = False
    ctf_intact_first_peak: bool = False
    outlier_zscore: float = 8.0
    optimise_scale: bool = True
    random_seed: int = 1
    relion_mean_term: bool = False
    threshold: float = 0.25
    min_distance: float = -1.0
    max_stddev_noise: float = -1.0
    min_avg_noise: float = -999.0
    skip_side: int = 0

    def map_settings(self) -> dict[str, object]:
        """The options that determine the FOM maps (stored with them)."""
        return {"lowpass": self.lowpass if self.lowpass is not None else -1.0,
                "highpass": self.highpass if self.highpass is not None else -1.0,
                "shrink": self.shrink, "ctf": int(self.ctf), "ctf_intact_first_peak": int(self.ctf_intact_first_peak),
                "outlier_zscore": self.outlier_zscore, "optimise_scale": int(self.optimise_scale),
                "relion_mean_term": int(self.relion_mean_term)}

    def pick_settings(self) -> dict[str, float]:
        return {"threshold": self.threshold, "min_distance": self.min_distance,
                "max_stddev_noise": self.max_stddev_noise, "min_avg_noise": self.min_avg_noise,
                "skip_side": self.skip_side}


def template_pick(micrograph: torch.Tensor, refs: TemplateReferences, options: TemplateOptions | None = None, *,
                  ctf: Mapping[str, float] | None = None, seed: int | None = None) -> PickTable:
    """Pick one micrograph ``[H, W]`` with ``refs``: :func:`template_fom_maps` then :func:`template_pick_from_maps`.

    ``ctf``: the micrograph's CTF parameters (required with ``options.ctf``); ``seed``: padding-noise seed
    (default ``options.random_seed``).
    """
    o = options or TemplateOptions()
    maps = _maps_for(micrograph, refs, o, ctf, o.random_seed if seed is None else seed)
    return template_pick_from_maps(maps, **o.pick_settings())


def _maps_for(micrograph: torch.Tensor, refs: TemplateReferences, o: TemplateOptions,
              ctf: Mapping[str, float] | None, seed: int) -> TemplateMaps:
    if o.ctf and refs.apply_ctf and ctf is None:
        raise CryopipeError("--ctf needs CTF parameters for each micrograph (rlnDefocusU/V/Angle in the input STAR; "
                            "use the CtfFind output)")
    return template_fom_maps(micrograph, refs, lowpass=o.lowpass, highpass=o.highpass, shrink=o.shrink,
                             ctf=ctf if o.ctf else None, ctf_intact_first_peak=o.ctf_intact_first_peak,
                             outlier_zscore=o.outlier_zscore, optimise_scale=o.optimise_scale, seed=seed,
                             relion_mean_term=o.relion_mean_term)


# ------------------------------------------------------------------------------------------------ map files


def template_maps_paths(base: str | os.PathLike) -> tuple[Path, Path]:
    """``(<base>_fom.mrcs, <base>_fom.star)`` for a coordinate-file root ``base`` (e.g.
    ``AutoPick/job004/Micrographs/mic001_autopick``)."""
    base = str(base)
    return Path(base + "_fom.mrcs"), Path(base + "_fom.star")


def write_template_maps(base: str | os.PathLike, maps: TemplateMaps, ref_names: Sequence[str] | None = None,
                        settings: Mapping[str, object] | None = None) -> tuple[Path, Path]:
    """Write ``maps`` as one float32 MRC stack + a STAR description (module docstring); atomic. Returns the paths."""
    from cryopipe.io.mrc import write_mrc
    from cryopipe.io.star import write_star

    stack_path, star_path = template_maps_paths(base)
    stack_path.parent.mkdir(parents=True, exist_ok=True)
    bf, bp, br = maps.best()
    n_ref = maps.fom.shape[0]
    per_ref = torch.stack([maps.fom, maps.psi], dim=1).reshape(2 * n_ref, maps.work_size, maps.work_size)
    data = torch.cat([torch.stack([bf, bp, br, maps.stddev, maps.mean]), per_ref]).to(torch.float32)
    write_mrc(stack_path, data.cpu().numpy(), maps.pixel_size / maps.scale)
    names = list(MAP_SECTIONS) + [f"ref{i + 1:03d}_{s}" for i in range(n_ref) for s in ("bestCCF", "bestPSI")]
    labels = list(ref_names) if ref_names is not None else [f"ref{i + 1:03d}" for i in range(n_ref)]
    info = {"cryopipeMapStack": stack_path.name, "cryopipeWorkSize": int(maps.work_size),
            "cryopipeSquareSize": int(maps.size), "rlnImageSizeY": int(maps.shape[0]),
            "rlnImageSizeX": int(maps.shape[1]), "rlnMicrographPixelSize": float(maps.pixel_size),
            "rlnImageSize": int(maps.box), "cryopipeParticleRadius": int(maps.radius_px),
            "rlnParticleDiameter": float(maps.particle_diameter), "cryopipeNumberOfReferences": int(n_ref)}
    blocks: dict[str, object] = {
        "fom_maps": info,
        "sections": pd.DataFrame({"cryopipeSection": np.arange(1, len(names) + 1), "cryopipeMapLabel": names}),
        "references": pd.DataFrame({"rlnClassNumber": np.arange(1, n_ref + 1),
                                    "cryopipeReferenceLabel": [str(s) for s in labels[:n_ref]],
                                    "cryopipeExpectedRatio": maps.expected_ratio.double().cpu().numpy()}),
    }
    if settings:
        blocks["settings"] = {f"cryopipe_{k}": v for k, v in settings.items()}
    write_star(star_path, blocks)
    return stack_path, star_path


def read_template_maps(base: str | os.PathLike, device: torch.device | str | None = None
                       ) -> tuple[TemplateMaps, dict[str, object]]:
    """Read maps written by :func:`write_template_maps`: ``(maps, settings)`` (settings without the prefix)."""
    from cryopipe.io.mrc import read_mrc
    from cryopipe.io.star import read_star

    stack_path, star_path = template_maps_paths(base)
    for p in (stack_path, star_path):
        if not p.exists():
            raise InputFileError(p, "FOM map file not found (--read_fom_maps)",
                                 "run once with --write_fom_maps on these micrographs, or leave out --read_fom_maps")
    blocks = read_star(star_path)
    info = blocks.get("fom_maps")
    refs = blocks.get("references")
    if not isinstance(info, dict) or not isinstance(refs, pd.DataFrame):
        raise InputFileError(star_path, "has no fom_maps / references blocks", "re-create it with --write_fom_maps")
    data, _ = read_mrc(stack_path)
    n_ref = int(info["cryopipeNumberOfReferences"])
    w = int(info["cryopipeWorkSize"])
    k = len(MAP_SECTIONS)
    if data.ndim != 3 or data.shape != (k + 2 * n_ref, w, w):
        raise InputFileError(stack_path, f"shape {data.shape} does not match {star_path.name} "
                                         f"({k + 2 * n_ref} sections of {w}x{w})", "re-create it with --write_fom_maps")
    t = torch.from_numpy(data)
    if device is not None:
        t = t.to(device)
    per_ref = t[k:].reshape(n_ref, 2, w, w)
    maps = TemplateMaps(fom=per_ref[:, 0].contiguous(), psi=per_ref[:, 1].contiguous(), stddev=t[3].contiguous(),
                        mean=t[4].contiguous(),
                        expected_ratio=torch.tensor(refs["cryopipeExpectedRatio"].to_numpy(dtype=np.float64)),
                        work_size=w, size=int(info["cryopipeSquareSize"]),
                        shape=(int(info["rlnImageSizeY"]), int(info["rlnImageSizeX"])),
                        pixel_size=float(info["rlnMicrographPixelSize"]), box=int(info["rlnImageSize"]),
                        radius_px=int(info["cryopipeParticleRadius"]),
                        particle_diameter=float(info["rlnParticleDiameter"]))
    settings = blocks.get("settings")
    settings = {str(key).removeprefix("cryopipe_"): v for key, v in settings.items()} if isinstance(settings, dict) else {}
    return maps, settings


def make_template_picker(refs: TemplateReferences, options: TemplateOptions, *,
                         maps_base: Callable[[object], str | os.PathLike] | None = None, write_maps: bool = False,
                         read_maps: bool = False, warn: Callable[[str], None] | None = None
                         ) -> Callable[[torch.Tensor, float, object], PickTable]:
    """A picking function ``(micrograph, pixel_size, ctx) -> PickTable`` for the ``autopick`` job's driver.

    ``ctx`` is any object with ``index`` (micrograph number, 0-based: padding seed ``random_seed + index``),
    ``name`` and ``ctf`` (CTF parameters or None). ``maps_base(ctx)`` gives the FOM-map root of a micrograph
    (needed with ``write_maps`` / ``read_maps``). With ``read_maps`` the maps are read instead of computed
    (the micrograph is not used) and ``warn`` is called when they were made with other map settings.
    """
    if (write_maps or read_maps) and maps_base is None:
        raise ValueError("make_template_picker: write_maps/read_maps need maps_base")
    settings = dict(options.map_settings(), n_references=len(refs), psi_step=psi_sampling(refs.psi_step)[0],
                    particle_diameter=refs.particle_diameter, box=refs.box)

    def pick(micrograph: torch.Tensor, pixel_size: float, ctx) -> PickTable:
        if abs(pixel_size - refs.pixel_size) > 1e-6:
            raise CryopipeError(f"micrograph pixel size {pixel_size} Å differs from the references' preparation "
                                f"({refs.pixel_size} Å)")
        if read_maps:
            maps, stored = read_template_maps(maps_base(ctx), device=micrograph.device)
            diff = [key for key, v in settings.items() if key in stored and not _same(stored[key], v)]
            if diff and warn is not None:
                warn(f"{ctx.name}: FOM maps were made with other settings ({', '.join(diff)}); they are used as they are")
        else:
            maps = _maps_for(micrograph, refs, options, ctx.ctf, options.random_seed + int(ctx.index))
            if write_maps:
                write_template_maps(maps_base(ctx), maps, refs.names, settings)
        return template_pick_from_maps(maps, **options.pick_settings())

    return pick


def _same(a: object, b: object) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(a) == str(b)
