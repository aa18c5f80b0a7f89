"""M-step pieces shared by 2D classification, 3D classification/refinement and the gradient (VDAM) mode.

All functions work on Fourier values of any layout (``[..., P]`` coefficient vectors or 3D grids) together with
the integer shell (``round(|k|)``, Fourier pixels of the original box) of each value, and use RELION's units:
FT divided by the number of pixels, spectra per real/imaginary component (``|F|²/2``).

* :func:`regularised_update` — the MAP reference (``MlOptimiser::maximization`` → ``BackProjector::reconstruct``):
  ``F = data / (weight + 1/(T·τ²))`` for shells ``>= minres_map`` (RELION 5), ``data/weight`` below; with
  ``τ² = 0`` RELION uses ``1/(0.001·weight)``.
* :func:`ssnr_arrays` — ``BackProjector::updateSSNRarrays`` without gold-standard FSC: per shell the reference
  noise ``σ²_ref = 1/mean(weight)`` (rlnReferenceSigma2), ``data_vs_prior = mean(weight·T·τ²)`` (rlnSsnrMap) and
  the Fourier coverage ``mean(weight·T·τ² >= 1)``.
* :func:`reference_tau2` — ``τ²`` (rlnReferenceTau2) = the reference power spectrum ``mean |F|²/2`` per shell,
  computed from the current reference at the start of an iteration (RELION ``computeFourierTransformMap``).
* :func:`noise_spectrum` — ``σ²(s) = wsum(s) / (2·Σw·Npix(s))`` per optics group.
* :func:`current_resolution_shell`, :func:`estimated_resolution_shell`, :func:`total_fourier_coverage` —
  RELION's resolution bookkeeping from ``data_vs_prior``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "regularised_update",
    "ssnr_arrays",
    "reference_tau2",
    "noise_spectrum",
    "current_resolution_shell",
    "estimated_resolution_shell",
    "total_fourier_coverage",
    "resolution_per_A",
]


def _shell_mean(values: torch.Tensor, shell: torch.Tensor, n_shells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shell sums and counts of ``values [K, *S]`` over the last dims matching ``shell [*S]``."""
    K = values.shape[0]
    v = values.reshape(K, -1).to(torch.float64)
    s = shell.reshape(-1).to(values.device)
    keep = (s >= 0) & (s < n_shells)
    sums = torch.zeros(K, n_shells, dtype=torch.float64, device=values.device).index_add_(1, s[keep], v[:, keep])
    counts = torch.zeros(n_shells, dtype=torch.float64, device=values.device).index_add_(
        0, s[keep], torch.ones(int(keep.sum()), dtype=torch.float64, device=values.device))
    return sums, counts


def regularised_update(data: torch.Tensor, weight: torch.Tensor, tau2: torch.Tensor, shell: torch.Tensor,
                       tau2_fudge: float = 1.0, minres_map: int = 5, r_max: int | None = None,
                       do_map: bool = True, oversampling: float = 1.0,
                       floor_shell: torch.Tensor | None = None) -> torch.Tensor:
    """MAP estimate ``[K, *S]`` of the references from the summed data ``[K, *S]`` (complex) and weights (real).

    ``tau2 [K, n_shells]``; ``shell [*S]``; coefficients with ``shell > r_max`` are set to 0. Without ``do_map``,
    ``data / weight`` everywhere (zero where the weight is 0).

    On an oversampled (padded) grid, as RELION's ``BackProjector::reconstruct``: ``oversampling`` = ``pad^dim``
    divides the prior term (``1/(pad^dim·T·τ²)``, a grid point holds ``1/pad^dim`` of a coefficient's weight), and
    ``floor_shell [*S]`` (``FLOOR(|p|/pad)``, with ``r_max``) turns on the ``--skip_gridding`` floor: no weight
    below 1/1000 of the mean weight of its floor-shell (shells ``>= r_max`` use shell ``r_max − 1``).
    """
    K = data.shape[0]
    sh = shell.to(data.device)
    t2 = tau2.to(data.device, torch.float64)
    t2_at = t2[:, sh.clamp(0, t2.shape[1] - 1).reshape(-1)].reshape(K, *sh.shape)
    w = weight.to(torch.float64)
    inv_tau = torch.where(t2_at > 0, 1.0 / (oversampling * tau2_fudge * t2_at.clamp_min(1e-300)),
                          torch.where(w > 1e-20, 1.0 / (0.001 * w.clamp_min(1e-300)), torch.zeros_like(w)))
    use_map = (sh >= minres_map)[None].expand_as(w) if do_map else torch.zeros_like(w, dtype=torch.bool)
    denom = torch.where(use_map, w + inv_tau, w)
    if floor_shell is not None:
        if r_max is None:
            raise ValueError("floor_shell needs r_max")
        fs = floor_shell.to(data.device).reshape(-1)
        inside = fs < int(r_max)
        sums, counts = _shell_mean(denom.reshape(K, -1)[:, inside], fs[inside], int(r_max))
        floor = sums / (1000.0 * counts.clamp_min(1))[None]
        denom = torch.maximum(denom, floor[:, fs.clamp(max=int(r_max) - 1)].reshape(denom.shape))
    out = torch.where(denom > 0, data.to(torch.complex128) / denom.clamp_min(1e-300),
                      torch.zeros((), dtype=torch.complex128, device=data.device))
    if r_max is not None:
        out = torch.where((sh <= r_max)[None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.to(data.dtype)


def ssnr_arrays(weight: torch.Tensor, tau2: torch.Tensor, shell: torch.Tensor, n_shells: int,
                tau2_fudge: float = 1.0, r_max: int | None = None, oversampling: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigma2_ref, data_vs_prior, fourier_coverage)``, each ``[K, n_shells]`` (see module docstring).

    Only coefficients with ``shell <= r_max`` count; ``data_vs_prior`` is 0 beyond ``r_max`` and 999 for an empty
    shell inside it (RELION's conventions). ``oversampling`` (``pad^dim`` on a padded grid, RELION's
    ``oversampling_correction``) scales the weights up to those of one coefficient.
    """
    K = weight.shape[0]
    sh = shell.to(weight.device)
    rm = int(sh.max().item()) if r_max is None else int(r_max)
    inside = sh <= rm
    w = weight.to(torch.float64)
    wsum, counts = _shell_mean(torch.where(inside[None], oversampling * w, torch.zeros_like(w)),
                               torch.where(inside, sh, -1), n_shells)
    sigma2 = torch.where(wsum > 1e-10, counts[None] / wsum.clamp_min(1e-300), torch.zeros_like(wsum))
    t2 = tau2.to(weight.device, torch.float64)
    t2_at = t2[:, sh.clamp(0, t2.shape[1] - 1).reshape(-1)].reshape(K, *sh.shape)
    inv_tau = torch.where(t2_at > 0, 1.0 / (oversampling * tau2_fudge * t2_at.clamp_min(1e-300)),
                          torch.where(w > 0, 1.0 / (0.001 * w.clamp_min(1e-300)), torch.full_like(w, math.inf)))
    ratio = w / inv_tau
    dvp_sum, _ = _shell_mean(torch.where(inside[None], ratio, torch.zeros_like(ratio)), torch.where(inside, sh, -1),
                             n_shells)
    cov_sum, _ = _shell_mean(torch.where(inside[None], (ratio >= 1.0).to(torch.float64), torch.zeros_like(ratio)),
                             torch.where(inside, sh, -1), n_shells)
    idx = torch.arange(n_shells, device=weight.device)
    dvp = torch.where(counts[None] < 0.001, torch.full_like(dvp_sum, 999.0), dvp_sum / counts.clamp_min(1)[None])
    dvp = torch.where(idx[None] > rm, torch.zeros_like(dvp), dvp)
    cov = torch.where(counts[None] > 0, cov_sum / counts.clamp_min(1)[None], torch.zeros_like(cov_sum))
    return sigma2, dvp, cov


def reference_tau2(ref_ft: torch.Tensor, shell: torch.Tensor, n_shells: int, r_max: int | None = None
                   ) -> torch.Tensor:
    """``[K, n_shells]`` power spectra ``mean |F|²/2`` per shell of references ``ref_ft [K, *S]`` (RELION's FT
    normalisation), zero beyond ``r_max``."""
    p = (ref_ft.real.square() + ref_ft.imag.square()).to(torch.float64) / 2.0
    sums, counts = _shell_mean(p, shell, n_shells)
    out = torch.where(counts[None] > 0, sums / counts.clamp_min(1)[None], torch.zeros_like(sums))
    if r_max is not None:
        out[:, int(r_max) + 1:] = 0.0
    return out


def noise_spectrum(wsum: torch.Tensor, sumw: torch.Tensor, npix: torch.Tensor,
                   previous: torch.Tensor | None = None) -> torch.Tensor:
    """``σ²[G, n_shells] = wsum / (2·sumw·Npix)``; optics groups without images keep ``previous`` (or 0); tiny
    values (< 1e-14, e.g. empty shells) take the value of the shell below (RELION)."""
    G, ns = wsum.shape
    denom = 2.0 * sumw.to(torch.float64)[:, None] * npix.to(torch.float64)[None, :ns]
    zero = torch.zeros((), dtype=torch.float64, device=wsum.device)
    out = torch.where(denom > 0, wsum.to(torch.float64) / denom.clamp_min(1e-300), zero)
    for s in range(1, ns):  # sequential by nature (each shell may copy the corrected one below); ns ~ n/2
        out[:, s] = torch.where(out[:, s] < 1e-14, out[:, s - 1], out[:, s])
    if previous is not None:
        empty = sumw.to(out.device) <= 0
        out = torch.where(empty[:, None], previous.to(out.device, out.dtype), out)
    return out


def resolution_per_A(shell: int | torch.Tensor, ori_size: int, pixel_size: float):
    """RELION ``getResolution``: shell index → spatial frequency (1/Å)."""
    return shell / (ori_size * pixel_size)


def current_resolution_shell(data_vs_prior: torch.Tensor, ori_size: int, minres_map: int = 5) -> int:
    """Largest over classes of (first shell ``>= 1`` with ``data_vs_prior < 1``) − 1, at least ``minres_map``
    (RELION ``updateCurrentResolution``, classification branch)."""
    best = 0
    dvp = data_vs_prior.detach().cpu()
    for k in range(dvp.shape[0]):  # K scalars
        row = dvp[k]
        ires = 1
        while ires < ori_size // 2 and row[ires] >= 1.0:
            ires += 1
        best = max(best, ires - 1)
    return max(best, int(minres_map))


def estimated_resolution_shell(data_vs_prior: torch.Tensor) -> torch.Tensor:
    """``[K]`` last shell (from 0) before ``data_vs_prior`` first drops below 1 (RELION
    ``calculateTotalFourierCoverage``; 0 if shell 0 is already below 1)."""
    below = data_vs_prior < 1.0
    ns = data_vs_prior.shape[1]
    idx = torch.arange(ns, device=data_vs_prior.device)
    first_below = torch.where(below, idx[None], torch.full_like(below, ns, dtype=torch.long)).min(dim=1).values
    return (first_below - 1).clamp_min(0)


def total_fourier_coverage(fourier_coverage: torch.Tensor, maxres: torch.Tensor) -> torch.Tensor:
    """``[K]`` RELION's overall coverage: average of the per-shell coverage over the integer points of a cube of
    half-width ``maxres − 1`` with ``int(|r|) <= maxres`` (shell by truncation), per class."""
    K, ns = fourier_coverage.shape
    out = torch.zeros(K, dtype=torch.float64)
    fc = fourier_coverage.detach().cpu().to(torch.float64)
    for k in range(K):  # K scalars
        m = int(maxres[k])
        w = 2 * m - 1
        if w <= 0:
            out[k] = fc[k, 0]
            continue
        c = torch.arange(w, dtype=torch.float64) - (w // 2)
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).floor().long()
        r = r[r <= m].clamp_max(ns - 1)
        out[k] = fc[k, r].mean() if r.numel() else 0.0
    return out
