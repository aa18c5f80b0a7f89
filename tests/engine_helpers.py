"""Small simulated 2D data sets for the engine / class2d tests (projections of fixtures/relion/ref_map.mrc)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import fourier_rescale, irfft2_centered, rfft2_centered
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.projector import Projector
from cryopipe.io.mrc import read_mrc

#: three clearly different views (rot, tilt) of the enolase map
VIEWS = torch.tensor([[0.0, 0.0], [60.0, 45.0], [120.0, 90.0]])


@dataclass
class SimData:
    images: np.ndarray  # [N, n, n] float32
    klass: np.ndarray  # true view index
    psi: np.ndarray  # degrees
    origin: np.ndarray  # [N, 2] pixels (RELION origin: prediction = shift(P, -origin))
    ctf: dict  # per-particle CTF parameters (ctf_parameters keys)
    views: torch.Tensor  # [K, n, n] true class images (no CTF, centred, psi 0)
    pixel_size: float
    n: int


def projector(relion_dir: Path, n: int = 32) -> tuple[Projector, float]:
    vol, apix = read_mrc(relion_dir / "ref_map.mrc")
    v = torch.from_numpy(vol)
    if n != v.shape[-1]:
        v = fourier_rescale(v, n)
        apix = apix * vol.shape[-1] / n
    return Projector(v), float(apix)


def simulate(relion_dir: Path, N: int = 150, n: int = 32, snr: float | None = 0.3, seed: int = 1,
             psi: np.ndarray | None = None, origin: np.ndarray | None = None, klass: np.ndarray | None = None,
             ctf: bool = True, max_shift: float = 2.0) -> SimData:
    pr, apix = projector(relion_dir, n)
    g = np.random.default_rng(seed)
    K = VIEWS.shape[0]
    klass = g.integers(0, K, N) if klass is None else np.asarray(klass)
    psi = g.uniform(0, 360, N) if psi is None else np.asarray(psi, float)
    origin = g.uniform(-max_shift, max_shift, (N, 2)) if origin is None else np.asarray(origin, float)
    A = euler_to_matrix(VIEWS[klass, 0], VIEWS[klass, 1], torch.tensor(psi, dtype=torch.float32))
    clean = pr.project_images(A, shifts_px=-torch.tensor(origin, dtype=torch.float32))
    du = g.uniform(8000, 25000, N)
    dv = du + g.uniform(-500, 500, N)
    da = g.uniform(0, 180, N)
    params = dict(defocus_u=du, defocus_v=dv, defocus_angle=da, voltage=np.full(N, 300.0), cs=np.full(N, 2.7),
                  amplitude_contrast=np.full(N, 0.1), phase_shift=np.zeros(N), bfactor=np.zeros(N),
                  scale=np.ones(N))
    if ctf:
        c = ctf_2d(n, apix, torch.tensor(du), torch.tensor(dv), torch.tensor(da))
        clean = irfft2_centered(rfft2_centered(clean) * c, n)
    imgs = clean
    if snr is not None:
        sig = clean.std().item()
        gen = torch.Generator().manual_seed(seed + 1000)
        imgs = clean + torch.randn(clean.shape, generator=gen) * sig / math.sqrt(snr)
    views = pr.project_images(euler_to_matrix(VIEWS[:, 0], VIEWS[:, 1], torch.zeros(K)))
    return SimData(imgs.numpy().astype(np.float32), klass, psi, origin, params if ctf else None, views, apix, n)


def best_aligned_correlation(img: torch.Tensor, target: torch.Tensor, step: float = 2.0) -> float:
    """Max over in-plane rotations (``step`` degrees, via Fourier rotation) and integer-free shifts (FFT
    cross-correlation) of the normalised correlation of ``img`` with ``target`` (both ``[n, n]``)."""
    from cryopipe.engine.coefficients import coefficient_set
    from cryopipe.engine.reference2d import ClassReferences2D

    n = img.shape[-1]
    cs = coefficient_set(n, n // 2)
    psis = torch.arange(0.0, 360.0, step)
    src = ClassReferences2D(target[None], cs, cs.size, psis, None)
    from cryopipe.engine.reference2d import coefficients_to_images

    rot = coefficients_to_images(src.coarse()[0], cs)  # [R, n, n]: target at all angles
    a = img - img.mean()
    t = rot - rot.mean(dim=(1, 2), keepdim=True)
    cc = irfft2_centered(rfft2_centered(t).conj() * rfft2_centered(a)[None], n)
    cc = cc / (a.norm() * t.norm(dim=(1, 2)))[:, None, None]
    return float(cc.max())


def write_particle_stack(relion_dir: Path, folder: Path, N: int = 32, seed: int = 4) -> SimData:
    """``N`` simulated 32² particles (3 views, SNR 0.5, CTF) as ``folder/parts.mrcs`` + a RELION 3.1
    ``folder/particles.star`` (one optics group; image names relative to ``folder``), for command-line tests."""
    import pandas as pd

    from cryopipe.io.mrc import write_mrc
    from cryopipe.io.particles import ParticleData, write_particles

    sim = simulate(relion_dir, N=N, n=32, snr=0.5, seed=seed)
    write_mrc(folder / "parts.mrcs", sim.images, sim.pixel_size)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [sim.pixel_size], "rlnImageSize": [32], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:08d}@parts.mrcs" for i in range(N)], "rlnOpticsGroup": 1,
                          "rlnDefocusU": sim.ctf["defocus_u"], "rlnDefocusV": sim.ctf["defocus_v"],
                          "rlnDefocusAngle": sim.ctf["defocus_angle"]})
    write_particles(folder / "particles.star", ParticleData(optics, parts))
    return sim


def copy_relion_files(source: Path, target: Path) -> None:
    """Copy a folder of RELION output files into ``target`` (created), decompressing the ``.gz`` ones."""
    import gzip
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as src, open(target / f.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(f, target / f.name)
