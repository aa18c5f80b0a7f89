"""The Python API for notebooks and scripts: array in, array out (NumPy arrays or torch tensors accepted, NumPy
returned), RELION's conventions throughout.

Importable from the package itself (``import cryopipe; cryopipe.fsc(a, b)``); :mod:`cryopipe` loads this module
(and torch) only when one of these names is first used, so ``import cryopipe`` stays cheap.

Conventions: maps ``[z, y, x]`` and images ``[y, x]`` (square / cubic, centre at ``N//2``); pixel sizes in Å/px;
Euler angles ``(rot, tilt, psi)`` in degrees (RELION's ZYZ, :func:`cryopipe.core.geometry.euler_to_matrix`);
particle origins in Å as RELION's ``rlnOriginX/YAngst`` (the particle's centre sits at ``centre − origin``);
defocus in Å, voltage in kV, Cs in mm. Messages go to ``logging.getLogger("cryopipe")``.

Array functions: :func:`project`, :func:`reconstruct`, :func:`fsc`, :func:`resolution`, :func:`lowpass`,
:func:`ctf`, :func:`pick_log`, :func:`postprocess`. File-level jobs (the same functions the command line runs) are
re-exported by :mod:`cryopipe`: ``reconstruct_particles``, ``classify_2d``, ``refine_3d``, ``run_postprocess``,
and the readers/writers ``read_mrc``, ``write_mrc``, ``read_star``, ``write_star``, ``read_particles``,
``write_particles``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from cryopipe.core.backprojector import BackProjector
from cryopipe.core.ctf import ctf_2d
from cryopipe.core.fourier import lowpass_map, phase_shift_2d, resolution_shell, rfft2_centered
from cryopipe.core.fsc import fsc as _fsc
from cryopipe.core.fsc import resolution_at
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.postprocess import PostprocessResult, postprocess_maps
from cryopipe.core.projector import Projector
from cryopipe.core.symmetry import symmetry_operators
from cryopipe.errors import CryopipeError
from cryopipe.picking.common import picks_to_frame
from cryopipe.picking.log import log_pick

__all__ = ["project", "reconstruct", "fsc", "resolution", "lowpass", "ctf", "pick_log", "postprocess"]


def _tensor(x, name: str, ndim: tuple[int, ...] | None = None, dtype=torch.float32) -> torch.Tensor:
    """``x`` as a tensor of ``dtype`` (NumPy arrays and lists accepted), checked to have one of ``ndim`` axes
    counts and finite values; a one-line CryopipeError otherwise."""
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(dtype)
    if ndim is not None and t.dim() not in ndim:
        raise CryopipeError(f"{name}: expected {' or '.join(f'{d}D' for d in ndim)} array, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise CryopipeError(f"{name}: contains NaN or infinite values (clean the array first)")
    return t


def _angles(angles, count: int | None = None) -> torch.Tensor:
    """Euler angles ``[B, 3]`` (degrees; a single ``[3]`` → ``B = 1``) → RELION matrices ``[B, 3, 3]``."""
    a = _tensor(angles, "angles", (1, 2), torch.float64)
    a = a.reshape(-1, 3) if a.numel() % 3 == 0 else a
    if a.dim() != 2 or a.shape[1] != 3 or (count is not None and a.shape[0] != count):
        raise CryopipeError(f"angles: expected [{count if count is not None else 'B'}, 3] (rot, tilt, psi in "
                            f"degrees), got shape {tuple(np.shape(angles))}")
    return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])


def _origins_px(origins_A, count: int, pixel_size: float) -> torch.Tensor:
    if origins_A is None:
        return torch.zeros(count, 2)
    o = _tensor(origins_A, "origins_A", (1, 2)).reshape(-1, 2)
    if o.shape[0] != count:
        raise CryopipeError(f"origins_A: expected [{count}, 2] (rlnOriginX/YAngst), got shape {tuple(o.shape)}")
    return o / float(pixel_size)


def _ctf_grid(n: int, pixel_size: float, params: Mapping[str, object] | None, count: int) -> torch.Tensor | None:
    """CTF ``[B, n, n//2+1]`` from a dict of per-image values (scalars broadcast): defocus_u (required),
    defocus_v (= defocus_u), defocus_angle (0), voltage (300), cs (2.7), amplitude_contrast (0.1), phase_shift (0),
    bfactor (0), scale (1)."""
    if params is None:
        return None
    if "defocus_u" not in params:
        raise CryopipeError("ctf: give at least 'defocus_u' (Å); optional defocus_v, defocus_angle, voltage, cs, "
                            "amplitude_contrast, phase_shift, bfactor, scale")
    known = {"defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "phase_shift",
             "bfactor", "scale"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CryopipeError(f"ctf: unknown parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    p = {k: _tensor(v, f"ctf[{k!r}]", (0, 1)).reshape(-1).expand(count) for k, v in params.items()}
    return ctf_2d(n, pixel_size, p["defocus_u"], p.get("defocus_v", p["defocus_u"]),
                  p.get("defocus_angle", torch.zeros(count)), voltage=p.get("voltage", 300.0), cs=p.get("cs", 2.7),
                  amplitude_contrast=p.get("amplitude_contrast", 0.1), phase_shift=p.get("phase_shift", 0.0),
                  bfactor=p.get("bfactor", 0.0), scale=p.get("scale", 1.0))


def project(volume, angles, pixel_size: float = 1.0, origins_A=None, ctf: Mapping[str, object] | None = None
            ) -> np.ndarray:
    """Projections ``[B, N, N]`` of a map ``[N, N, N]`` for Euler angles ``[B, 3]`` (degrees), as particles with
    origins ``origins_A [B, 2]`` (Å, RELION's rlnOriginX/YAngst) and, with ``ctf`` (dict of per-image values, see
    :func:`ctf`), multiplied by their CTF."""
    vol = _tensor(volume, "volume", (3,))
    rot = _angles(angles)
    count = rot.shape[0]
    proj = Projector(vol)
    ft = proj.project(rot, -_origins_px(origins_A, count, pixel_size))
    c = _ctf_grid(vol.shape[-1], pixel_size, ctf, count)
    if c is not None:
        ft = ft * c.to(ft.real.dtype)
    from cryopipe.core.fourier import irfft2_centered

    return irfft2_centered(ft, vol.shape[-1]).float().numpy()


def reconstruct(images, angles, pixel_size: float, origins_A=None, ctf: Mapping[str, object] | None = None,
                symmetry: str = "C1", pad: int = 2, max_resolution_A: float | None = None) -> np.ndarray:
    """Direct Fourier reconstruction (``relion_reconstruct``) of a map ``[N, N, N]`` from images ``[B, N, N]``
    at Euler angles ``[B, 3]`` (degrees) with origins ``origins_A [B, 2]`` (Å); with ``ctf`` (a dict of per-image
    values: defocus_u required, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, phase_shift) the
    images are CTF-weighted (``C·X`` inserted, ``C²`` accumulated, as ``--ctf``). ``symmetry``: point group
    (C1, Cn, Dn, T, O, I); ``max_resolution_A``: highest resolution inserted (Nyquist by default)."""
    imgs = _tensor(images, "images", (2, 3))
    imgs = imgs[None] if imgs.dim() == 2 else imgs
    count, n = imgs.shape[0], imgs.shape[-1]
    if imgs.shape[-2] != n or n % 2:
        raise CryopipeError(f"images: expected square images of even size, got shape {tuple(imgs.shape)}")
    if pixel_size <= 0:
        raise CryopipeError(f"pixel_size {pixel_size}: must be positive (Å/px)")
    rot = _angles(angles, count).to(torch.float32)
    ft = phase_shift_2d(rfft2_centered(imgs), _origins_px(origins_A, count, pixel_size), n)
    r_max = None if not max_resolution_A else min(n / 2.0, n * pixel_size / float(max_resolution_A))
    bp = BackProjector(n, pad=pad, r_max=r_max)
    bp.insert(ft, rot, ctf=_ctf_grid(n, pixel_size, ctf, count), zero_dc=True)
    ops = symmetry_operators(symmetry)
    return bp.reconstruct(symmetry=ops if ops.shape[0] > 1 else None).float().numpy()


def fsc(map1, map2) -> np.ndarray:
    """Fourier shell correlation ``[N//2+1]`` of two maps ``[N, N, N]`` (or ring correlation of two images
    ``[N, N]``); shell ``i`` is at resolution ``N·pixel_size/i``."""
    return _fsc(_tensor(map1, "map1", (2, 3), torch.float64), _tensor(map2, "map2", (2, 3), torch.float64)).numpy()


def resolution(fsc_curve, pixel_size: float, threshold: float = 0.143) -> float:
    """Resolution (Å) where ``fsc_curve [N//2+1]`` first drops below ``threshold`` (RELION postprocess's
    rule; Nyquist if it never does, 999 Å if shell 1 already does)."""
    f = _tensor(fsc_curve, "fsc_curve", (1,), torch.float64)
    return float(resolution_at(f, float(threshold), float(pixel_size), 2 * (f.numel() - 1)))


def lowpass(array, resolution_A: float, pixel_size: float, edge_px: float = 2.0, edge: str = "centred"
            ) -> np.ndarray:
    """Low-pass filter a map ``[N, N, N]`` or images ``[N, N]`` / ``[B, N, N]`` (2D when the last two axes are
    square and there are at most 3 axes of which the first differs) at ``resolution_A`` Å: the cut-off shell of
    RELION's ``lowPassFilterMap`` with a raised-cosine edge of ``edge_px`` Fourier pixels, centred on the cut-off
    (``edge="centred"``) or starting at it (``"after"``, as RELION's ``--ini_high``)."""
    x = _tensor(array, "array", (2, 3))
    ndim = 3 if x.dim() == 3 and len(set(x.shape)) == 1 else 2
    cutoff = resolution_shell(x.shape[-1], float(pixel_size), float(resolution_A))
    return lowpass_map(x, cutoff, edge_px, ndim=ndim, edge=edge).numpy()


def ctf(box: int, pixel_size: float, defocus_u: float, defocus_v: float | None = None, defocus_angle: float = 0.0,
        voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.1, phase_shift: float = 0.0,
        bfactor: float = 0.0) -> np.ndarray:
    """The CTF of a ``box × box`` image on its half-complex grid ``[box, box//2+1]`` (rows in ``fftfreq`` order,
    ``[0, 0]`` the DC term, as :func:`cryopipe.core.fourier.rfft2_centered`); RELION's formula
    (:mod:`cryopipe.core.ctf`), so ``CTF(0) = +amplitude_contrast`` without phase shift."""
    params = {"defocus_u": defocus_u, "defocus_v": defocus_u if defocus_v is None else defocus_v,
              "defocus_angle": defocus_angle, "voltage": voltage, "cs": cs, "amplitude_contrast": amplitude_contrast,
              "phase_shift": phase_shift, "bfactor": bfactor}
    return _ctf_grid(int(box), float(pixel_size), params, 1)[0].numpy()


def pick_log(micrograph, pixel_size: float, diameter_min_A: float, diameter_max_A: float, **options) -> pd.DataFrame:
    """RELION's Laplacian-of-Gaussian picker on one micrograph ``[H, W]`` (rows = y): a table with columns
    rlnCoordinateX/Y (pixels), rlnAutopickFigureOfMerit, rlnClassNumber, rlnAnglePsi, ordered by decreasing figure
    of merit. ``options``: those of :func:`cryopipe.picking.log.log_pick` (lowpass, adjust_threshold,
    neighbour, invert, ...)."""
    mic = _tensor(micrograph, "micrograph", (2,))
    return picks_to_frame(log_pick(mic, float(pixel_size), float(diameter_min_A), float(diameter_max_A), **options))


def postprocess(half1, half2, pixel_size: float, mask=None, **options) -> PostprocessResult:
    """``relion_postprocess`` on two half maps ``[N, N, N]`` (optional soft ``mask`` in [0, 1]): FSC curves
    (unmasked, masked, phase-randomised, corrected), the resolution at 0.143, the B-factor and the sharpened
    map (:class:`cryopipe.core.postprocess.PostprocessResult`; tensors). ``options``: those of
    :func:`cryopipe.core.postprocess.postprocess_maps` (auto_bfac, adhoc_bfac, low_pass, ...)."""
    h1 = _tensor(half1, "half1", (3,))
    h2 = _tensor(half2, "half2", (3,))
    m = None if mask is None else _tensor(mask, "mask", (3,))
    return postprocess_maps(h1, h2, float(pixel_size), m, **options)
