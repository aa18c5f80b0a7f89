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

__all__ = ["particle_form", "SubtomoVolumes", "subtomo_volumes", "TiltStacks", "tilt_stacks", "refined_tomo_particles",
           "write_refined_particles"]

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
    # absolute: Dask workers read them, whatever their working directory (issue 15)
    data = [resolve_relion_path(str(v), *bases).absolute() for v in t["rlnImageName"]]
    weights = [resolve_relion_path(str(v), *bases).absolute() for v in t["rlnCtfImage"]]
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


@dataclass
class TiltStacks:
    """RELION 5's 2D-stack particles (``subtomo --stack2d``): per particle ``<n>_stack2d.mrcs`` with its visible
    tilts (rlnTomoVisibleFrames), CTF·dose-premultiplied, ``n × n`` at ``pixel_size`` (binned Å). The CTFs come
    from the tomograms (depth-corrected defocus at the position the images were cut, dose weights, the same
    ``c = −CTF·W`` as ``subtomo``). Particles of one tilt series share ``rotations[ts]`` (``R_f``, ``[F, 3, 3]``).

    ``origins_px`` (binned px) and ``angles`` (degrees) are the file's (subtomogram frame); ``A_sub`` ``[N, 3, 3]``
    turns them into the tomogram frame the stacks' rotations refer to."""

    particles: TomoParticles
    n: int
    pixel_size: float
    files: list[Path]
    ts_index: np.ndarray
    geometries: list
    rotations: list
    positions_px: np.ndarray
    A_sub: np.ndarray
    visible: list[np.ndarray]
    optics_group: np.ndarray
    origins_px: np.ndarray
    angles: np.ndarray
    subset: np.ndarray

    def read(self, idx: np.ndarray, data: bool = True):
        """``(ft [B, F, n, n//2+1] complex64 or None, visible [B, F] bool)`` of particles ``idx`` (one tilt
        series): the centred FTs of the stored tilt images placed at their tilts (zeros elsewhere)."""
        import torch

        from cryopipe.core.fourier import rfft2_centered

        idx = np.asarray(idx)
        F = self.rotations[int(self.ts_index[idx[0]])].shape[0]
        visible = np.stack([self.visible[i] for i in idx])
        if visible.shape[1] != F:
            raise InputFileError(self.files[int(idx[0])], f"rlnTomoVisibleFrames has {visible.shape[1]} entries, "
                                                          f"the tilt series {F} tilts", "check the tomograms file")
        if not data:
            return None, visible
        imgs = np.zeros((len(idx), F, self.n, self.n), dtype=np.float32)
        for j, i in enumerate(idx):  # one file per particle
            stack = read_mrc(self.files[i])[0]
            stack = stack.reshape(-1, self.n, self.n)
            if stack.shape[0] != int(self.visible[i].sum()):
                raise InputFileError(self.files[i], f"holds {stack.shape[0]} images, rlnTomoVisibleFrames "
                                                    f"{int(self.visible[i].sum())}", "re-run subtomo --stack2d")
            imgs[j, self.visible[i]] = stack
        return rfft2_centered(torch.from_numpy(imgs)).to(torch.complex64), visible

    def ctf(self, idx: np.ndarray):
        """``c = −CTF·W`` ``[B, F, n, n//2+1]`` float32 of particles ``idx`` (one tilt series)."""
        import torch

        from cryopipe.core.tilt_geometry import depth_defocus, project_points
        from cryopipe.tomo.particle_images import ctf_dose_weights

        idx = np.asarray(idx)
        g = self.geometries[int(self.ts_index[idx[0]])]
        pos = torch.as_tensor(self.positions_px[idx], dtype=torch.float64)
        q = project_points(g.projections, pos)  # [B, F, 3]
        B, F = q.shape[0], q.shape[1]
        u, v = depth_defocus(g.defocus[:, 0], g.defocus[:, 1], q[..., 2], g.hand, g.pixel_size, g.defocus_slope)
        c = ctf_dose_weights(self.n, self.pixel_size, u.reshape(-1), v.reshape(-1), g.defocus[:, 2].repeat(B),
                             g.pre_exposure.repeat(B), voltage=g.voltage, cs=g.cs,
                             amplitude_contrast=g.amplitude_contrast, scale=g.ctf_scale.repeat(B),
                             bfactor_per_dose=g.bfactor_per_dose)
        return c.reshape(B, F, self.n, self.n // 2 + 1)


def tilt_stacks(path: str | os.PathLike, tomograms_path: str | os.PathLike,
                root: str | os.PathLike | None = None) -> TiltStacks:
    """Read a 2D-stack particles file (``subtomo --stack2d``) and its tomograms."""
    from cryopipe.engine.relion_files import resolve_relion_path
    from cryopipe.io.tomography import read_tomograms
    from cryopipe.tomo.particle_sets import tilt_series_geometry

    path = Path(path)
    tomograms = read_tomograms(tomograms_path)
    particles = read_tomo_particles(path, tomograms)
    t = particles.particles
    if particle_form(particles) != "2d" or "rlnTomoVisibleFrames" not in t.columns:
        raise InputFileError(path, "does not hold 2D stacks (rlnTomoSubTomosAre2DStacks 1, rlnTomoVisibleFrames)",
                             "run subtomo --stack2d first")
    optics = particles.optics
    apix = float(optics["rlnImagePixelSize"].iloc[0])
    n = int(optics["rlnImageSize"].iloc[0])
    bases = [Path(root) if root is not None else Path.cwd(), path.resolve().parent, path.resolve().parent.parent,
             path.resolve().parent.parent.parent]
    files = [resolve_relion_path(str(v), *bases).absolute() for v in t["rlnImageName"]]  # for Dask workers too
    names = particles.tomo_names
    order = [ts.name for ts in tomograms if ts.name in set(names.tolist())]
    ts_index = np.array([order.index(nm) for nm in names], dtype=np.int64)
    geometries = [tilt_series_geometry(tomograms[nm]) for nm in order]
    rotations = [g.projections[:, :3, :3].clone() for g in geometries]
    cut = particles.copy()  # the images were cut at the coordinates (subtomo folds the origins in)
    for lab in _ORIGINS:
        if lab in cut.particles.columns:
            cut.particles[lab] = 0.0
    visible = [np.array([int(x) for x in str(v).strip("[]").split(",")], dtype=bool)
               for v in t["rlnTomoVisibleFrames"]]
    labels = optics["rlnOpticsGroup"].to_numpy()
    og_col = t["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in t.columns else np.full(len(t), labels[0])
    og = pd.Series(np.arange(len(labels)), index=labels).reindex(og_col).to_numpy().astype(np.int64)
    subset = (pd.to_numeric(t["rlnRandomSubset"], errors="coerce").fillna(0).to_numpy().astype(np.int64)
              if "rlnRandomSubset" in t.columns else np.zeros(len(t), np.int64))
    return TiltStacks(particles, n, apix, files, ts_index, geometries, rotations, cut.positions_px(tomograms),
                      particles.subtomogram_matrices(), visible, og, _column(t, _ORIGINS, 0.0) / apix,
                      _column(t, _ANGLES, 0.0), subset)
