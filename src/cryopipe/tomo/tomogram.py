"""Tomogram reconstruction from an aligned tilt series by weighted back-projection (like
``relion_tomo_reconstruct_tomogram``).

Geometry (fixture README A1, A8): voxel ``(i, j, k)`` (z, y, x array indices) of a bin-``b`` tomogram is the
decentred tomogram position ``p = b·(k, j, i)`` (x, y, z) in unbinned tilt-series px; its image in tilt ``f`` is
``q_f = P_f·p`` (:func:`cryopipe.core.tilt_geometry.projection_matrices`), read from the binned image at
``(q_x·W_b/W, q_y·H_b/H)`` by bilinear interpolation. The output has ``(d//b, round(h/b), round(w/b))`` voxels
(RELION's rounding) of ``b·px`` Å.

Steps, per tilt then per voxel:

1. **Binning**: each tilt image is Fourier-cropped to ``(H_b, W_b) = (round(H/b), round(W/b))`` (values kept,
   Nyquist dropped, phase origin at pixel 0 so binned pixel ``x_b`` is unbinned ``x_b·W/W_b``) and its mean is
   set to 0 (RELION's default zero-DC per frame).
2. **CTF (optional)**: phase flipping, ``F_f(k) ← sign(CTF_f(k))·F_f(k)`` with the tilt's own defocus
   (rlnDefocusU/V/Angle, no depth dependence: one defocus per tilt image; the depth term of A3 is ignored).
   Contrast is not inverted (protein stays dark, as RELION).
3. **Weighting** (the Wiener/PSF correction): RELION divides the 3D FT of the back-projection by the
   magnitude of the back-projected point-spread function plus ``1/SNR``. That needs the whole volume in one
   FFT, so here the same correction is applied *per tilt in 2D*, before back-projection, which keeps the
   reconstruction slab-by-slab (exact weighting in the sense of Radermacher, 1992). A 2D frequency ``k`` of tilt
   ``f`` is the 3D frequency ``κ = R_fᵀ·(k_x, k_y, 0)`` (cycles per unbinned px). Back-projecting tilt ``g``
   into a slab of thickness ``T`` (unbinned px) spreads its central plane along ``z`` to a width ``≈ 1/T``: it
   contributes to ``κ`` with the relative weight ``tri(T·(κ·n_g)/n_gz) / |n_gz|`` (``n_g = R_gᵀ·ẑ`` the
   projection direction, ``tri(x) = max(0, 1 − |x|)``: the sinc main lobe of the slab, kept non-negative). The
   filter is

       w_f(k) = 1 / ( Σ_g tri(T·(κ·n_g)/n_gz) / |n_gz|  +  1/SNR ),

   i.e. the Wiener estimate of a frequency observed by that many overlapping tilts of signal-to-noise ratio
   ``SNR`` each (``--SNR``, default 10). At low frequency (all tilts overlap) it is the inverse overlap count,
   at high frequency (no overlap) ``|n_fz|``: a ramp-like filter that stops low frequencies from being
   over-represented. Unlike RELION's PSF division it does not deconvolve the bilinear interpolation (a
   ``sinc²`` fall-off that matters only near Nyquist).
4. **Back-projection**: ``V(p) = (F/n_vis(p)) · Σ_{f visible} w_f∗I_f (q_f(p)) / T``: tilts in which ``q_f(p)``
   falls outside the image are left out and the sum is rescaled by ``F/n_vis`` (RELION averages over the
   visible tilts); dividing by ``T`` makes the result a density per unbinned voxel (the images are line
   integrals over unbinned voxels), so a particle reconstructs with the values of the map that projected it,
   up to the missing wedge.

Memory: the binned, filtered stack (``F·H_b·W_b`` floats) plus one slab; each slab is computed in chunks of
(tilts × voxels) of at most ``max_samples`` samples, so a tomogram bigger than RAM is streamed slab by slab
into its MRC file (:func:`write_tomogram`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import torch
import torch.nn.functional as tnf

from cryopipe.core.ctf import ctf_at
from cryopipe.errors import CryopipeError
from cryopipe.io.atomic import atomic_path

__all__ = [
    "TiltStack",
    "output_shape",
    "binned_image_shape",
    "fourier_bin",
    "weighting_filters",
    "phase_flip_signs",
    "prepare_tilt_stack",
    "backproject_slab",
    "iter_tomogram_slabs",
    "reconstruct_tomogram",
    "write_tomogram",
    "split_by_dose",
]

#: default number of (tilt, voxel) samples evaluated at once (~20 bytes each in temporaries)
DEFAULT_MAX_SAMPLES = 1 << 24


@dataclass
class TiltStack:
    """Binned, weighted tilt images ready for back-projection.

    ``images``: ``[F, H_b, W_b]`` float32; ``matrices``: ``[F, 2, 4]`` float64 mapping homogeneous unbinned tomogram
    px ``(x, y, z, 1)`` to binned image coordinates ``(x_b, y_b)``; ``image_size``: unbinned ``(W, H)``.
    """

    images: torch.Tensor
    matrices: torch.Tensor
    image_size: tuple[int, int]

    @property
    def n_tilts(self) -> int:
        return int(self.images.shape[0])


def output_shape(size_xyz: Sequence[int], binning: float) -> tuple[int, int, int]:
    """Tomogram array shape ``(nz, ny, nx)`` for unbinned size ``(w, h, d)`` at ``binning``, rounded as RELION
    (``nx = int(w/b + 0.5)``, ``ny = int(h/b + 0.5)``, ``nz = int(d/b)``)."""
    w, h, d = (float(s) for s in size_xyz)
    b = float(binning)
    return int(d / b), int(h / b + 0.5), int(w / b + 0.5)


def binned_image_shape(image_size: Sequence[int], binning: float) -> tuple[int, int]:
    """``(H_b, W_b)`` of tilt images of unbinned size ``(W, H)`` Fourier-cropped by ``binning`` (at least 2)."""
    W, H = int(image_size[0]), int(image_size[1])
    return max(2, int(round(H / binning))), max(2, int(round(W / binning)))


def fourier_bin(images: torch.Tensor, shape: tuple[int, int], zero_dc: bool = True) -> torch.Tensor:
    """Fourier-crop (or pad) images ``[F, H, W]`` to ``shape = (H_b, W_b)``.

    Values are kept (mean preserved; multiplied by ``H_b·W_b/(H·W)`` in Fourier space), frequencies at the
    smaller grid's Nyquist are dropped, the phase origin is pixel 0 (binned pixel ``x_b`` ↔ unbinned
    ``x_b·W/W_b``). ``zero_dc`` sets each image's mean to 0.
    """
    F, H, W = images.shape
    Hb, Wb = int(shape[0]), int(shape[1])
    ft = torch.fft.rfft2(images.to(torch.float32))
    fy = torch.fft.fftfreq(Hb, d=1.0 / Hb, device=images.device).round().long()
    hs = min(H, Hb)
    keep_y = fy.abs() < (hs + 1) // 2 if hs % 2 else fy.abs() < hs // 2
    ws = min(W, Wb)
    fx = torch.arange(Wb // 2 + 1, device=images.device)
    keep_x = fx < (ws // 2 + 1 if ws % 2 else ws // 2)
    out = ft[:, torch.remainder(fy, H)][:, :, torch.clamp(fx, max=W // 2)]
    out = out * (keep_y[:, None] & keep_x[None, :]).to(out.real.dtype)
    if zero_dc:
        out[:, 0, 0] = 0
    return torch.fft.irfft2(out * (Hb * Wb / (H * W)), s=(Hb, Wb))


def _frequency_grid(shape: tuple[int, int], image_size: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kx, ky)`` ``[H_b, W_b//2+1]`` float64 in cycles per *unbinned* px on the rfft grid of binned images."""
    Hb, Wb = shape
    W, H = int(image_size[0]), int(image_size[1])
    ky = torch.fft.fftfreq(Hb, d=1.0 / Hb, device=device, dtype=torch.float64) / H
    kx = torch.arange(Wb // 2 + 1, device=device, dtype=torch.float64) / W
    return torch.meshgrid(kx, ky, indexing="xy")


def weighting_filters(rotations: torch.Tensor, shape: tuple[int, int], image_size: Sequence[int],
                      thickness_px: float, snr: float = 10.0) -> torch.Tensor:
    """Per-tilt Wiener/exact-weighting filters ``[F, H_b, W_b//2+1]`` (float32) on the rfft grid of binned
    images (see the module docstring, step 3).

    ``rotations``: ``[F, 3, 3]`` tilt rotations ``R_f`` (the 3×3 blocks of ``P_f``); ``shape``: ``(H_b, W_b)``;
    ``image_size``: unbinned ``(W, H)``; ``thickness_px``: slab thickness ``T`` (unbinned px); ``snr`` > 0.
    """
    if snr <= 0:
        raise CryopipeError(f"--SNR must be > 0 (got {snr})")
    R = rotations.to(torch.float64)
    kx, ky = _frequency_grid(shape, image_size, R.device)
    k2 = torch.stack([kx.reshape(-1), ky.reshape(-1)], dim=-1)  # [G, 2] tilt-frame (k_x, k_y)
    n_z = R[:, 2, 2].abs().clamp_min(1e-3)  # |n_g·ẑ| = |R_g[2, 2]|
    out = []
    for f in range(R.shape[0]):
        # κ·n_g = (R_g·R_fᵀ·(k_x, k_y, 0))_z for every tilt g: [G, F]
        rel = (R[:, 2, :] @ R[f].T)[:, :2]  # [F, 2]
        s = (k2 @ rel.T) / n_z  # [G, F]
        overlap = (1.0 - (float(thickness_px) * s).abs()).clamp_min(0.0) / n_z
        out.append(1.0 / (overlap.sum(dim=1) + 1.0 / float(snr)))
    return torch.stack(out).reshape(R.shape[0], *kx.shape).to(torch.float32)


def phase_flip_signs(defocus: torch.Tensor, pixel_size: float, shape: tuple[int, int], image_size: Sequence[int],
                     voltage: float, cs: float, amplitude_contrast: float) -> torch.Tensor:
    """``sign(CTF_f(k))`` ``[F, H_b, W_b//2+1]`` (±1, float32) on the rfft grid of binned images, from per-tilt
    ``defocus`` ``[F, 3]`` = (rlnDefocusU, V Å, rlnDefocusAngle °); ``pixel_size`` Å per unbinned px."""
    kx, ky = _frequency_grid(shape, image_size, defocus.device)
    kx, ky = kx / pixel_size, ky / pixel_size
    d = defocus.to(torch.float64)
    c = ctf_at(kx[None], ky[None], d[:, 0, None, None], d[:, 1, None, None], d[:, 2, None, None],
               voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast)
    return torch.where(c < 0, -torch.ones_like(c), torch.ones_like(c))


def binned_matrices(P: torch.Tensor, image_size: Sequence[int], shape: tuple[int, int]) -> torch.Tensor:
    """``[F, 2, 4]``: rows x, y of ``P_f`` scaled to binned image pixels (``x_b = q_x·W_b/W``, ``y_b = q_y·H_b/H``)."""
    W, H = int(image_size[0]), int(image_size[1])
    scale = torch.tensor([shape[1] / W, shape[0] / H], dtype=torch.float64, device=P.device)
    return P[:, :2, :].to(torch.float64) * scale[None, :, None]


def prepare_tilt_stack(read_tilts: Callable[[np.ndarray], np.ndarray], P: torch.Tensor, image_size: Sequence[int],
                       binning: float, thickness_px: float, snr: float = 10.0, ctf: dict | None = None,
                       tilt_chunk: int = 8, device: str | torch.device = "cpu") -> TiltStack:
    """Read, bin, (phase-flip) and weight the tilt images (steps 1–3 of the module docstring).

    ``read_tilts(indices)`` returns unbinned images ``[n, H, W]`` (numpy float32) for tilt indices into ``P``
    ``[F, 4, 4]`` (only ``tilt_chunk`` images are held unbinned at a time). ``image_size`` = ``(W, H)``.
    ``ctf``: None, or ``dict(defocus=[F, 3], pixel_size=Å, voltage=kV, cs=mm, amplitude_contrast=Q0)`` for phase
    flipping. ``thickness_px``: tomogram depth in unbinned px (the ``T`` of the weighting).
    """
    dev = torch.device(device)
    P = P.to(dev, torch.float64)
    shape = binned_image_shape(image_size, binning)
    filt = weighting_filters(P[:, :3, :3], shape, image_size, thickness_px, snr)
    if ctf is not None:
        defocus = torch.as_tensor(np.asarray(ctf["defocus"], dtype=np.float64), device=dev)
        filt = filt * phase_flip_signs(defocus, float(ctf["pixel_size"]), shape, image_size, float(ctf["voltage"]),
                                       float(ctf["cs"]), float(ctf["amplitude_contrast"]))
    n = P.shape[0]
    out = torch.empty((n, *shape), dtype=torch.float32, device=dev)
    for start in range(0, n, max(1, tilt_chunk)):
        idx = np.arange(start, min(n, start + max(1, tilt_chunk)))
        imgs = torch.as_tensor(np.asarray(read_tilts(idx), dtype=np.float32), device=dev)
        if tuple(imgs.shape[1:]) != (int(image_size[1]), int(image_size[0])):
            raise CryopipeError(f"tilt images are {imgs.shape[2]}×{imgs.shape[1]} px but {image_size[0]}×"
                                f"{image_size[1]} was expected (all tilts of a series must have one size)")
        binned = fourier_bin(imgs, shape)
        ft = torch.fft.rfft2(binned) * filt[idx[0]: idx[-1] + 1]
        out[idx[0]: idx[-1] + 1] = torch.fft.irfft2(ft, s=shape)
    return TiltStack(out, binned_matrices(P, image_size, shape), (int(image_size[0]), int(image_size[1])))


def backproject_slab(stack: TiltStack, z_start: int, nz: int, ny: int, nx: int, binning: float,
                     thickness_px: float, max_samples: int = DEFAULT_MAX_SAMPLES) -> torch.Tensor:
    """Voxels ``z_start … z_start+nz−1`` of the tomogram ``[nz, ny, nx]`` (float32, on the stack's device):
    bilinear back-projection of the weighted images, visibility-rescaled and divided by ``thickness_px``
    (step 4 of the module docstring). Evaluated in chunks of at most ``max_samples`` (tilt, voxel) pairs."""
    imgs = stack.images
    dev = imgs.device
    F, Hb, Wb = imgs.shape
    A = stack.matrices.to(dev)  # [F, 2, 4]
    n_vox = nz * ny * nx
    total = torch.zeros(n_vox, dtype=torch.float32, device=dev)
    count = torch.zeros(n_vox, dtype=torch.float32, device=dev)
    f_chunk = max(1, min(F, max_samples // max(1, min(n_vox, 4096))))
    v_chunk = max(1, max_samples // f_chunk)
    b = float(binning)
    norm = torch.tensor([2.0 / max(Wb - 1, 1), 2.0 / max(Hb - 1, 1)], dtype=torch.float32, device=dev)
    for v0 in range(0, n_vox, v_chunk):
        v1 = min(n_vox, v0 + v_chunk)
        v = torch.arange(v0, v1, device=dev, dtype=torch.int64)
        pos = torch.stack([(v % nx), (v // nx) % ny, v // (nx * ny) + z_start], dim=-1).to(torch.float64) * b
        for f0 in range(0, F, f_chunk):
            f1 = min(F, f0 + f_chunk)
            Af = A[f0:f1]
            xy = (torch.einsum("fij,vj->fvi", Af[:, :, :3], pos) + Af[:, None, :, 3]).to(torch.float32)  # [f, V, 2]
            visible = ((xy[..., 0] >= 0) & (xy[..., 0] <= Wb - 1) & (xy[..., 1] >= 0) & (xy[..., 1] <= Hb - 1))
            grid = (xy * norm - 1.0)[:, None]  # [f, 1, V, 2], align_corners: −1 ↔ pixel 0, +1 ↔ last pixel
            sampled = tnf.grid_sample(imgs[f0:f1, None], grid, mode="bilinear", padding_mode="border",
                                      align_corners=True)[:, 0, 0]  # [f, V]
            vis = visible.to(torch.float32)
            total[v0:v1] += (sampled * vis).sum(0)
            count[v0:v1] += vis.sum(0)
    vol = torch.where(count > 0, total * (F / count.clamp_min(1.0)), torch.zeros_like(total))
    return (vol / float(thickness_px)).reshape(nz, ny, nx)


def iter_tomogram_slabs(stack: TiltStack, shape: tuple[int, int, int], binning: float, thickness_px: float,
                        slab_voxels: int = 1 << 26, max_samples: int = DEFAULT_MAX_SAMPLES
                        ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(z_start, slab [nz, ny, nx] float32 numpy)`` covering the tomogram of ``shape = (nz, ny, nx)``,
    each slab holding at most ``slab_voxels`` voxels (at least one z-section)."""
    nz, ny, nx = shape
    depth = max(1, int(slab_voxels) // max(1, ny * nx))
    for z0 in range(0, nz, depth):
        n = min(depth, nz - z0)
        yield z0, backproject_slab(stack, z0, n, ny, nx, binning, thickness_px, max_samples).cpu().numpy()


def reconstruct_tomogram(stack: TiltStack, shape: tuple[int, int, int], binning: float, thickness_px: float,
                         slab_voxels: int = 1 << 26, max_samples: int = DEFAULT_MAX_SAMPLES) -> np.ndarray:
    """The whole tomogram ``[nz, ny, nx]`` float32 in memory (see :func:`write_tomogram` for streaming)."""
    out = np.empty(shape, dtype=np.float32)
    for z0, slab in iter_tomogram_slabs(stack, shape, binning, thickness_px, slab_voxels, max_samples):
        out[z0: z0 + slab.shape[0]] = slab
    return out


def write_tomogram(path: str | Path, slabs: Iterator[tuple[int, np.ndarray]], shape: tuple[int, int, int],
                   pixel_size: float, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Stream slabs ``(z_start, [n, ny, nx])`` into an MRC volume of ``shape`` (float32, memory-mapped, voxel
    ``pixel_size`` Å) written atomically (temp file renamed at the end). Returns header statistics
    ``{min, max, mean, rms}``. ``progress(z_done, nz)`` is called after each slab."""
    nz, ny, nx = (int(s) for s in shape)
    lo, hi, total, total_sq, n = math.inf, -math.inf, 0.0, 0.0, 0
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(nz, ny, nx), mrc_mode=2) as mrc:
            mrc.voxel_size = float(pixel_size)
            mrc.header.ispg = 1
            for z0, slab in slabs:
                mrc.data[z0: z0 + slab.shape[0]] = slab
                s64 = slab.astype(np.float64)
                lo, hi = min(lo, float(s64.min())), max(hi, float(s64.max()))
                total += float(s64.sum())
                total_sq += float((s64 * s64).sum())
                n += s64.size
                if progress is not None:
                    progress(z0 + slab.shape[0], nz)
            mean = total / max(n, 1)
            rms = math.sqrt(max(total_sq / max(n, 1) - mean * mean, 0.0))
            h = mrc.header
            h.dmin, h.dmax, h.dmean, h.rms = lo, hi, mean, rms
    return {"min": lo, "max": hi, "mean": mean, "rms": rms}


def split_by_dose(pre_exposure: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Tilt indices of the two halves for denoising: ranks 0, 2, 4 … and 1, 3, 5 … in dose order
    (rlnMicrographPreExposure ascending; ties keep file order)."""
    order = np.argsort(np.asarray(pre_exposure, dtype=np.float64), kind="stable")
    return np.sort(order[0::2]), np.sort(order[1::2])
