"""Particles STAR → :class:`~cryopipe.engine.classify2d.ParticleSet2D` for the optimiser jobs (class2d, refine3d,
initialmodel): one pixel size and one square, even box; image names resolved against the project (current
directory) or the STAR file's folder; RELION's scale-correction groups (``Experiment::read``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cryopipe.engine.classify2d import ParticleSet2D
from cryopipe.errors import InputFileError
from cryopipe.io.mrc import ImageReader
from cryopipe.io.particles import ParticleData, ctf_parameters, origins_px, pixel_sizes, read_particles

__all__ = ["load_particles", "particle_groups"]


def _image_root(star_path: Path, first_name: str) -> Path:
    stack = first_name.split("@", 1)[-1]
    if Path(stack).is_absolute() or (Path.cwd() / stack).exists():
        return Path.cwd()
    return star_path.resolve().parent


def load_particles(star_path: str | os.PathLike, purpose: str = "2D classification"
                   ) -> tuple[ParticleData, ParticleSet2D, np.ndarray]:
    """Read a particles STAR file: ``(data, ParticleSet2D, origins px [N, 2])``; one pixel size and box required
    (``purpose`` names the job in the error messages)."""
    star_path = Path(star_path)
    data = read_particles(star_path)
    t = data.particles
    if "rlnImageName" not in t.columns:
        raise InputFileError(star_path, "no rlnImageName column", "give a particles STAR file (from extraction)")
    if len(t) == 0:
        raise InputFileError(star_path, "contains no particles", "give a non-empty particles STAR file")
    _refuse_premultiplied(star_path, data.optics)
    apix_all = pixel_sizes(data)
    apix = float(apix_all[0])
    if not np.allclose(apix_all, apix, rtol=1e-4):
        raise InputFileError(star_path, f"particles have different pixel sizes {sorted(set(np.round(apix_all, 4)))}",
                             f"{purpose} takes one pixel size at a time (rescale particles to a common pixel size)")
    names = t["rlnImageName"].astype(str).to_numpy()
    reader = ImageReader(names, root_dir=_image_root(star_path, names[0]))
    ny, nx = reader.image_shape
    if ny != nx or nx % 2:
        raise InputFileError(star_path, f"images are {nx}x{ny}", f"{purpose} needs square, even-sized images")
    og_labels = data.optics["rlnOpticsGroup"].to_numpy()
    og = pd.Series(np.arange(len(og_labels)), index=og_labels).reindex(t["rlnOpticsGroup"].to_numpy()).to_numpy()
    grp, group_names = particle_groups(t, og.astype(int))
    try:
        ctf = ctf_parameters(data)
    except InputFileError:
        ctf = None
    ps = ParticleSet2D(int(nx), apix, reader.read, ctf, og.astype(np.int64), np.asarray(grp, dtype=np.int64),
                       group_names=group_names)
    return data, ps, origins_px(data)[:, :2]


_PIPELINE_JOB_RE = re.compile(r"(?:^|/)job\d+/")


def _refuse_premultiplied(star_path: Path, optics: pd.DataFrame) -> None:
    """Single-particle images premultiplied by their CTF (``rlnCtfDataAreCtfPremultiplied 1``) would get the CTF a
    second time in the E-step: refuse them (tomographic particles take the
    optimisation-set path, :mod:`cryopipe.io.tomo_particles`)."""
    column = "rlnCtfDataAreCtfPremultiplied"
    if column not in optics.columns:
        return
    flags = pd.to_numeric(optics[column], errors="coerce").fillna(0).to_numpy()
    if (flags != 0).any():
        group = optics["rlnOpticsGroupName"].iloc[int(np.flatnonzero(flags != 0)[0])] \
            if "rlnOpticsGroupName" in optics.columns else "?"
        raise InputFileError(star_path, f"optics group {group} has {column} 1 (CTF-premultiplied images)",
                             "re-extract the particles without CTF premultiplication, or give tomographic particles "
                             "with their optimisation set (--ios)")


def particle_groups(t: pd.DataFrame, optics_group: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """Scale-correction groups ``([N] 0-based, names)`` as RELION's ``Experiment::read``: ``rlnGroupName`` if
    given, else one group per micrograph (``rlnMicrographName`` without its ``Type/jobNNN/`` prefix), numbered in
    order of first appearance with the particles sorted by micrograph name. Without either column, the given
    ``rlnGroupNumber`` (RELION would make one group) or else the optics groups (names None)."""
    n = len(t)
    if "rlnGroupName" in t.columns:
        names = t["rlnGroupName"].astype(str).to_numpy()
    elif "rlnMicrographName" in t.columns:
        names = np.array([_PIPELINE_JOB_RE.split(str(m), maxsplit=1)[-1] for m in t["rlnMicrographName"]],
                         dtype=object)
    elif "rlnGroupNumber" in t.columns:
        grp = pd.to_numeric(t["rlnGroupNumber"], errors="coerce").fillna(1).to_numpy(int) - 1
        return pd.factorize(grp, sort=True)[0].astype(np.int64), None
    else:
        return np.asarray(optics_group, dtype=np.int64), None
    order = (np.argsort(t["rlnMicrographName"].astype(str).to_numpy(), kind="stable")
             if "rlnMicrographName" in t.columns else np.arange(n))
    codes, uniques = pd.factorize(pd.Series(names[order]), sort=False)
    grp = np.empty(n, dtype=np.int64)
    grp[order] = codes
    return grp, [str(u) for u in uniques]
