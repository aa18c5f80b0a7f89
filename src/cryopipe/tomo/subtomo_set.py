"""Tomographic particles as refinement input and output: which form a particles file holds (3D
pseudo-subtomograms or 2D stacks, decided as RELION decides), reading the 3D pseudo-subtomograms a file names
(``rlnImageName`` → ``*_data.mrc``, ``rlnCtfImage`` → ``*_weights.mrc``) batch by batch, and the refined
``_data.star`` in RELION's tomography layout (``data_general``, ``data_optics`` and the particles with the
refinement's columns added; origins in Å in the subtomogram frame, X, Y and Z).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryopipe.errors import InputFileError
from cryopipe.io.mrc import read_mrc
from cryopipe.io.tomo_particles import TomoParticles, read_tomo_particles, write_tomo_particles

__all__ = ["particle_form", "SubtomoVolumes", "subtomo_volumes", "refined_tomo_particles"]

_ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def particle_form(particles: TomoParticles) -> str:
    """``"3d"`` (pseudo-subtomograms), ``"2d"`` (2D stacks) or ``"none"`` (no images yet), as RELION decides:
    ``rlnTomoSubTomosAre2DStacks`` of ``data_general``, else ``rlnImageDimensionality`` of the optics table."""
    if "rlnImageName" not in particles.particles.columns:
        return "none"
    if int(float(particles.general.get("rlnTomoSubTomosAre2DStacks", 0) or 0)) == 1:
        return "2d"
    optics = particles.optics
    if optics is not None and "rlnImageDimensionality" in optics.columns:
        return "3d" if int(optics["rlnImageDimensionality"].iloc[0]) == 3 else "2d"
    return "3d"


@dataclass
class SubtomoVolumes:
    """The 3D pseudo-subtomograms of a particles file: box ``n``, pixel size (Å), per particle its data and
    weights files, optics group (0-based), origins (pixels ``[N, 3]``), angles (degrees ``[N, 3]``) and half-set
    (``rlnRandomSubset``, 0 = none)."""

    particles: TomoParticles
    n: int
    pixel_size: float
    data_files: list[Path]
    weight_files: list[Path]
    optics_group: np.ndarray
    origins_px: np.ndarray
    angles: np.ndarray
    subset: np.ndarray

    def read_data(self, idx: np.ndarray) -> np.ndarray:
        """``[B, n, n, n]`` float32 data volumes of particles ``idx``."""
        return np.stack([read_mrc(self.data_files[i])[0] for i in np.asarray(idx)]).astype(np.float32)

    def read_weights(self, idx: np.ndarray) -> np.ndarray:
        """``[B, 2n, n, n//2+1]`` float32 weight volumes (``Σc²``, multiplicity) of particles ``idx``."""
        return np.stack([read_mrc(self.weight_files[i])[0] for i in np.asarray(idx)]).astype(np.float32)


def _column(t: pd.DataFrame, labels, default: float) -> np.ndarray:
    return np.stack([pd.to_numeric(t[c], errors="coerce").fillna(default).to_numpy() if c in t.columns
                     else np.full(len(t), default) for c in labels], axis=1).astype(np.float64)


def subtomo_volumes(path: str | os.PathLike, root: str | os.PathLike | None = None) -> SubtomoVolumes:
    """Read a particles file of 3D pseudo-subtomograms (from ``subtomo``); file names are resolved relative to
    ``root`` (the project directory; default cwd), then the file's folder and its parents. One pixel size and
    box (the first optics group's rlnImagePixelSize / rlnImageSize; every volume is checked when read)."""
    from cryopipe.engine.relion_files import resolve_relion_path

    path = Path(path)
    particles = read_tomo_particles(path)
    t = particles.particles
    if particle_form(particles) != "3d":
        raise InputFileError(path, "does not hold 3D pseudo-subtomograms (rlnImageName with "
                                   "rlnImageDimensionality 3)", "run subtomo without --stack2d first")
    if "rlnCtfImage" not in t.columns:
        raise InputFileError(path, "no rlnCtfImage column (the *_weights.mrc of each pseudo-subtomogram)",
                             "give the particles.star that subtomo wrote")
    if len(t) == 0:
        raise InputFileError(path, "contains no particles", "give a non-empty particles STAR file")
    optics = particles.optics
    if optics is None or "rlnImagePixelSize" not in optics.columns or "rlnImageSize" not in optics.columns:
        raise InputFileError(path, "no optics table with rlnImagePixelSize and rlnImageSize",
                             "give the particles.star that subtomo wrote")
    if len(set(np.round(optics["rlnImagePixelSize"].astype(float), 4))) > 1 or \
            len(set(optics["rlnImageSize"].astype(int))) > 1:
        raise InputFileError(path, "optics groups with different pixel sizes or boxes",
                             "refine one pixel size and box at a time")
    bases = [Path(root) if root is not None else Path.cwd(), path.resolve().parent, path.resolve().parent.parent,
             path.resolve().parent.parent.parent]
    data = [resolve_relion_path(str(v), *bases) for v in t["rlnImageName"]]
    weights = [resolve_relion_path(str(v), *bases) for v in t["rlnCtfImage"]]
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    n = int(optics["rlnImageSize"].iloc[0])
    labels = optics["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in optics.columns else np.array([1])
    og_col = t["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in t.columns else np.full(len(t), labels[0])
    og = pd.Series(np.arange(len(labels)), index=labels).reindex(og_col).to_numpy()
    if np.isnan(og.astype(float)).any():
        raise InputFileError(path, "particles name optics groups the optics table lacks", "check rlnOpticsGroup")
    subset = (pd.to_numeric(t["rlnRandomSubset"], errors="coerce").fillna(0).to_numpy().astype(np.int64)
              if "rlnRandomSubset" in t.columns else np.zeros(len(t), np.int64))
    return SubtomoVolumes(particles, n, apix, data, weights, og.astype(np.int64), _column(t, _ORIGINS, 0.0) / apix,
                          _column(t, _ANGLES, 0.0), subset)


def refined_tomo_particles(source: TomoParticles, angles: np.ndarray, origins_px: np.ndarray, pixel_size: float,
                           columns: dict[str, np.ndarray]) -> TomoParticles:
    """The input particles with refined ``angles [N, 3]`` (degrees; rot and psi wrapped to [−180, 180)),
    ``origins_px [N, 3]`` (written as rlnOriginX/Y/ZAngst) and further per-particle ``columns`` (rlnClassNumber,
    rlnRandomSubset, …; added after the input's columns, in RELION's order as given)."""
    t = source.particles.copy()
    wrap = lambda a: (a + 180.0) % 360.0 - 180.0  # noqa: E731
    t["rlnAngleRot"], t["rlnAngleTilt"], t["rlnAnglePsi"] = wrap(angles[:, 0]), angles[:, 1], wrap(angles[:, 2])
    for j, lab in enumerate(_ORIGINS):
        t[lab] = origins_px[:, j] * pixel_size
    for k, v in columns.items():
        t[k] = v
    return TomoParticles(dict(source.general), None if source.optics is None else source.optics.copy(), t,
                         None, dict(source.other_blocks))


def write_refined_particles(path: str | os.PathLike, particles: TomoParticles) -> None:
    """Write a refined particle set (RELION 5 layout, :func:`cryopipe.io.tomo_particles.write_tomo_particles`)."""
    write_tomo_particles(path, particles)
