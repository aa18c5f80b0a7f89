"""Fourier shell correlation (RELION definition) and resolution bookkeeping.

``FSC(i) = Σ Re(F1*·F2) / sqrt(Σ|F1|² · Σ|F2|²)`` over the half-complex coefficients of the two maps whose
shell index ``round(|k|)`` equals ``i`` (``|k|`` in Fourier pixels), for ``i = 0 … N//2`` — exactly RELION's
``getFSC`` (each stored half-complex coefficient counted once; coefficients with ``round(|k|) > N//2``, the
corners of the cube, are ignored). Shell ``i`` has resolution ``N · pixel_size / i`` Å.
"""

from __future__ import annotations

import torch

from cryopipe.core.fourier import rfft2_centered, rfft3_centered, shell_index_2d, shell_index_3d

__all__ = ["fsc", "fsc_from_ft", "resolution_at", "shell_resolutions"]


def fsc_from_ft(ft1: torch.Tensor, ft2: torch.Tensor, n: int, ndim: int = 3) -> torch.Tensor:
    """FSC of two centred half-complex FTs (``[N, N, N//2+1]`` for ``ndim=3``, ``[N, N//2+1]`` for 2D FRC).

    Returns ``Tensor[N//2+1]`` (float64). A shell with zero power in either map gets FSC 0.
    """
    if ft1.shape != ft2.shape:
        raise ValueError(f"FSC needs equal shapes, got {tuple(ft1.shape)} and {tuple(ft2.shape)}")
    idx = (shell_index_3d(n, device=ft1.device) if ndim == 3 else shell_index_2d(n, device=ft1.device)).reshape(-1)
    nsh = n // 2 + 1
    keep = idx < nsh
    idx = idx[keep]
    a = ft1.reshape(-1)[keep].to(torch.complex128)
    b = ft2.reshape(-1)[keep].to(torch.complex128)
    num = torch.zeros(nsh, dtype=torch.float64, device=ft1.device)
    d1 = torch.zeros_like(num)
    d2 = torch.zeros_like(num)
    num.index_add_(0, idx, (a.conj() * b).real)
    d1.index_add_(0, idx, a.real ** 2 + a.imag ** 2)
    d2.index_add_(0, idx, b.real ** 2 + b.imag ** 2)
    den = torch.sqrt(d1 * d2)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def fsc(map1: torch.Tensor, map2: torch.Tensor) -> torch.Tensor:
    """FSC between two real-space maps ``[N, N, N]`` (or FRC between two images ``[N, N]``).

    Shells ``round(|k|)`` in Fourier pixels, ``0 … N//2``; returns ``Tensor[N//2+1]`` (float64) on the maps'
    device. Shell 0 is the correlation of the two mean values (±1).
    """
    if map1.shape != map2.shape:
        raise ValueError(f"FSC needs maps of equal shape, got {tuple(map1.shape)} and {tuple(map2.shape)}")
    if map1.dim() not in (2, 3) or any(s != map1.shape[-1] for s in map1.shape):
        raise ValueError(f"FSC needs a square image or cubic map, got shape {tuple(map1.shape)}")
    n = map1.shape[-1]
    m1 = map1.to(torch.float64)
    m2 = map2.to(device=map1.device, dtype=torch.float64)  # maps on different devices: computed on map1's
    if map1.dim() == 3:
        return fsc_from_ft(rfft3_centered(m1), rfft3_centered(m2), n, ndim=3)
    return fsc_from_ft(rfft2_centered(m1), rfft2_centered(m2), n, ndim=2)


def shell_resolutions(box: int, pixel_size: float) -> torch.Tensor:
    """Resolution (Å) of shells ``0 … box//2``: ``box · pixel_size / i``; shell 0 is given as 999 Å, as RELION
    writes it (``rlnAngstromResolution``)."""
    i = torch.arange(box // 2 + 1, dtype=torch.float64)
    res = box * pixel_size / torch.where(i > 0, i, torch.ones_like(i))
    res[0] = 999.0
    return res


def resolution_at(fsc_curve: torch.Tensor, threshold: float, pixel_size: float, box: int) -> float:
    """Resolution (Å) where the FSC first drops below ``threshold``, RELION style (postprocess).

    Scanning shells ``i = 1, 2, …``, the result is the resolution ``box · pixel_size / i`` of the last shell
    *before* the first shell with ``FSC < threshold``. If the curve never drops below the threshold the last
    shell's (Nyquist) resolution is returned; if shell 1 already fails, 999 Å (RELION's value for "none").
    """
    f = torch.as_tensor(fsc_curve, dtype=torch.float64).reshape(-1).cpu()
    last_good = 0
    for i in range(1, f.numel()):
        if float(f[i]) < threshold:
            break
        last_good = i
    if last_good == 0:
        return 999.0
    return float(box * pixel_size / last_good)
