"""3D pseudo-subtomograms as E-step inputs (RELION's default tomographic particles, ``relion_tomo_subtomo``),
so that :func:`cryopipe.engine.estep.expectation` scores them unchanged.

A pseudo-subtomogram of particle ``b`` is a real-space volume ``d_b`` (``n³``) whose FT is the sum of its tilt
images' FTs, each premultiplied by ``c = −CTF·W`` (depth-dependent CTF, dose weight) and splatted into 3D along
``R_f·A_sub``, plus two weight volumes in FFTW half layout (``[2n, n, n//2+1]``: first ``n`` slabs
``C3 = Σ c²`` splatted the same way, next ``n`` slabs the multiplicity ``M``, the summed splatting weights).
RELION's likelihood (``ml_optimiser.cpp``: ``get3DCTFAndMulti``, ``applySubtomoCorrection``,
``precalculateShiftedImagesCtfsAndInvSigma2s``), per coefficient ``k`` of the 3D half-complex set
(:func:`cryopipe.engine.coefficients.volume_coefficient_set`)::

    X_b(k) = C3_b(k) · V̂(Aᵀk) · e^{−2πi k·t/n} + noise,     E-step weight 1/(σ²(shell)·M_b(k))

with ``A`` the particle's orientation in the subtomogram frame (``rlnAngleRot/Tilt/Psi``; the reference is
rotated in 3D, no central slice) and ``t`` a 3D translation. So the engine gets ``X`` = the premultiplied data,
``C = |C3|`` and ``1/σ² → 1/(σ²·M)`` where ``M > 0.1`` (``1/σ²`` elsewhere, as RELION); coefficients with
``M < multi_thr`` (RELION ``--subtomo_multi_thr``, 0.01) have ``X = C = 0``.

M-step (RELION ``storeWeightedSums`` with CTF-premultiplied data): the particle's unmasked premultiplied data go
into the 3D back-projection as ``Σ w·X/σ²`` with weight ``Σ w·C3/σ²`` (no ``M``, no further ``C3`` factor);
in the engine's sums (``S = Σ w·C·X·ι``, ``W = Σ w·C²·ι``, :func:`cryopipe.engine.estep.expectation`) that is
``ι = 1/(σ²·C3)`` (``BatchData.inv_sigma2_sums``), inserted at ``Aᵀk``
(:meth:`cryopipe.engine.reference3d.ClassBackProjectors.insert_sums` with a volume set). The noise spectrum is
RELION's: ``σ² = Σ_b E|X − C3·V̂|² / (2·Σ_b Σ_shell M)`` (:func:`multiplicity_per_shell` gives the denominators).

Units. RELION normalises 3D transforms by ``n³`` (``X_R = FT(d)/n³``); the engine keeps ``X = FT(d)/n²`` (its
unit for volumes, which makes predictions, τ² and reconstructions the same numbers as for single particles), so
``|X|² = n²·|X_R|²``. The noise spectra the engine's callers see (``sigma2`` here, the optimiser's model,
``run_model.star``) are RELION's, ``σ²_R``: this module uses ``σ² = n²·σ²_R`` internally
(:func:`engine_sigma2_scale`), the noise update divides the residuals by ``n²·Σ M``, and the log-likelihood's
normalisation ``Σ log(2πσ²_R·M)`` is RELION's. The current 3D origin ``o_b`` (pixels, subtomogram frame) is
applied as the phase ``e^{−2πi k·o_b/n}`` (the volume is translated by ``+o_b``), so translations are searched
around it. The DC coefficient is left out of the posterior by the E-step itself.
"""

from __future__ import annotations

import torch

from cryopipe.core.fourier import irfft3_centered, phase_shift_3d, rfft3_centered
from cryopipe.engine.coefficients import CoefficientSet
from cryopipe.engine.batch import batch_from_coefficients
from cryopipe.engine.estep import BatchData

__all__ = ["SUBTOMO_MULTI_THR", "engine_sigma2_scale", "split_subtomo_weights", "prepare_subtomo_batch",
           "multiplicity_per_shell"]

#: RELION ``--subtomo_multi_thr``: coefficients with a smaller multiplicity are zeroed
SUBTOMO_MULTI_THR = 0.01
#: RELION divides 1/σ² by the multiplicity only where it exceeds this
_MULTI_DIVIDE_MIN = 0.1


def engine_sigma2_scale(n: int) -> float:
    """``σ²_engine / σ²_RELION`` for pseudo-subtomograms of box ``n``: ``n²`` (the engine's volume coefficients are
    ``FT/n²``, RELION's ``FT/n³``; module docstring)."""
    return float(n) * float(n)


def split_subtomo_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., 2n, n, n//2+1]`` weight volumes (``*_weights.mrc``: FFTW half layout, ``Σc²`` then multiplicity)
    → ``(C3, M)`` each ``[..., n, n, n//2+1]`` (``|Σc²|`` as RELION takes it)."""
    n = weights.shape[-2]
    if weights.shape[-3] != 2 * n or weights.shape[-1] != n // 2 + 1:
        raise ValueError(f"expected [..., 2n, n, n//2+1] subtomogram weights, got {tuple(weights.shape)}")
    return weights[..., :n, :, :].abs(), weights[..., n:, :, :]


def prepare_subtomo_batch(
    volumes: torch.Tensor,
    ctf2: torch.Tensor,
    multiplicity: torch.Tensor,
    vset: CoefficientSet,
    n_coeffs: int,
    sigma2: torch.Tensor,
    optics_group: torch.Tensor | None = None,
    *,
    origins: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    multi_thr: float = SUBTOMO_MULTI_THR,
    prior_centre: torch.Tensor | None = None,
    log_prior_orient: torch.Tensor | None = None,
    n_classes: int = 1,
    keep_unmasked: bool = True,
) -> BatchData:
    """E-step inputs for ``B`` pseudo-subtomograms (module docstring).

    Args:
        volumes: ``[B, n, n, n]`` real-space data volumes (``*_data.mrc``, CTF·dose-premultiplied).
        ctf2, multiplicity: ``[B, n, n, n//2+1]`` ``Σc²`` and ``M`` (FFT order, :func:`split_subtomo_weights`).
        vset: the volume coefficient set of the box (``r_max`` ≥ the iteration's); the iteration uses its first
            ``n_coeffs`` coefficients, the rest enters the noise power beyond the set.
        sigma2: ``[G, n//2+1]`` (or ``[n//2+1]``) noise spectra in RELION's units (``FT/n³``; module docstring).
        optics_group: ``[B]`` 0-based (default zeros).
        origins: ``[B, 3]`` current origins (pixels, subtomogram frame); the volumes are translated by ``+origin``.
        mask: ``[n, n, n]`` soft spherical mask applied (zero outside) after the translation (RELION masks 3D
            images in the E-step); None: none.
        prior_centre: ``[B, K, 3]`` offset-prior centres relative to the origins (default zeros).
        log_prior_orient: ``[B or 1, K, Rc]`` (default zeros ``[1, K, 1]``).
        keep_unmasked: the M-step sums from the unmasked (translated) data, as RELION back-projects them
            (``BatchData.X_nomask``); the posterior and the noise sums use the masked data.
    """
    dev = volumes.device
    B, n = volumes.shape[0], volumes.shape[-1]
    if not vset.volume or vset.n != n:
        raise ValueError(f"need the volume coefficient set of box {n}")
    ft = rfft3_centered(volumes.to(torch.float32))
    if origins is not None:
        ft = phase_shift_3d(ft, origins.to(dev, torch.float32), n)
    nomask = None
    if mask is not None:
        if keep_unmasked:
            nomask = vset.gather(ft)[:, :n_coeffs] / float(n * n)
        ft = rfft3_centered(irfft3_centered(ft, n) * mask.to(dev, torch.float32))
    coeffs = vset.gather(ft) / float(n * n)  # [B, Pfull]
    C3 = vset.gather(ctf2.to(dev, torch.float64)).abs()
    M = vset.gather(multiplicity.to(dev, torch.float64))
    shell = vset.shell.to(dev)
    ns = n // 2 + 1
    s2all = sigma2.to(dev, torch.float64) * engine_sigma2_scale(n)  # RELION's σ² → the engine's units
    if s2all.dim() == 1:
        s2all = s2all[None]
    og = torch.zeros(B, dtype=torch.long, device=dev) if optics_group is None else optics_group.to(dev).long()
    s2 = s2all[og][:, shell.clamp_max(s2all.shape[1] - 1)]  # [B, Pfull]
    s2 = torch.where((shell < s2all.shape[1])[None], s2, torch.zeros((), dtype=s2.dtype, device=dev))
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    kept = M >= multi_thr
    X = torch.where(kept, coeffs, torch.zeros((), dtype=coeffs.dtype, device=dev))
    C = torch.where(kept, C3, zero)
    var = torch.where(M > _MULTI_DIVIDE_MIN, s2 * M, s2)  # σ²·M (RELION's E-step noise variance)
    inv = torch.where(s2 > 0, 1.0 / var.clamp_min(1e-300), zero)
    scored = (shell > 0)[None, :] & (inv > 0)
    # M-step: Σ w·X/σ² with weight Σ w·C3/σ² (RELION), i.e. 1/(σ²·C3) in the engine's C·X·ι, C²·ι sums
    # (float32 in the E-step: coefficients with C or σ²·C below 1e-30 add nothing, instead of 0·inf)
    inv_sums = torch.where((C > 1e-30) & (s2 * C > 1e-30), 1.0 / (s2 * C).clamp_min(1e-30), zero)
    if nomask is not None:
        nomask = torch.where(kept[:, :n_coeffs], nomask, torch.zeros((), dtype=nomask.dtype, device=dev))
        nomask = nomask.to(torch.complex64)
    return batch_from_coefficients(X, C, inv, var / engine_sigma2_scale(n), scored, shell, n_coeffs, ns, og,
                                   prior_centre, log_prior_orient, n_classes, 3, X_nomask=nomask,
                                   inv_sigma2_sums=inv_sums[:, :n_coeffs].to(torch.float32).contiguous())


def multiplicity_per_shell(multiplicity: torch.Tensor, vset: CoefficientSet, n_shells: int,
                           multi_thr: float = SUBTOMO_MULTI_THR) -> torch.Tensor:
    """``[B, n_shells]`` float64 ``Σ M`` per shell over the set's coefficients (``M < multi_thr`` counts 0): the
    denominator of RELION's subtomogram noise spectrum (``sumw_stMulti``), ``σ² = Σ resid / (2·Σ M)``."""
    M = vset.gather(multiplicity.to(torch.float64))
    M = torch.where(M >= multi_thr, M, torch.zeros((), dtype=M.dtype, device=M.device))
    shell = vset.shell.to(M.device)
    keep = shell < n_shells
    out = torch.zeros(M.shape[0], n_shells, dtype=torch.float64, device=M.device)
    return out.index_add_(1, shell[keep], M[:, keep])
