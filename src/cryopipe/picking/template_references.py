"""Template picking, part 1: the references (:class:`TemplateReferences`) — from 2D class averages, a STAR list of
images or projections of a 3D map (:func:`read_reference_images`, :func:`reference_projections`), the Gaussian blob
of ``--ref3d``-less runs (:func:`gauss_reference`), the particle diameter guess and the preparation RELION's
autopicker applies (:func:`prepare_references`), with the ψ sampling (:func:`psi_sampling`).

Split out of :mod:`cryopipe.picking.template` (issue 14), which re-exports everything; see there for the
conventions. Moved verbatim.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import CryopipeError, InputFileError

__all__ = ["F32_MAX", "round_half_away", "psi_sampling", "TemplateReferences", "reference_projections",
           "read_reference_images", "gauss_reference", "auto_particle_diameter", "prepare_references"]


F32_MAX = float(np.finfo(np.float32).max)


def round_half_away(x: float) -> int:
    """RELION's ``ROUND`` (half away from zero)."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def psi_sampling(ang: float) -> tuple[float, int]:
    """RELION's in-plane sampling for ``--ang``: ``n = round(360/ang)`` angles ``j·360/n`` (degrees).

    Returns ``(step, n)``.
    """
    if not ang > 0:
        raise CryopipeError(f"--ang {ang}: the in-plane angular step must be > 0 degrees (360 = no rotations)")
    n = max(1, round_half_away(360.0 / ang))
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
    b = int(1.5 * round_half_away(particle_diameter / pixel_size))
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
        new = 2 * round_half_away((b // 2) * apix_ref / pixel_size)
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
    radius = round_half_away(diameter / (2.0 * pixel_size)) - int(shrink_particle_mask)
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
