"""The E-step: posterior weights of all hidden variables for a batch of images, as matrix products.

Model (RELION's, per image ``b`` and Fourier coefficient ``p`` of the current :class:`CoefficientSet`)::

    X_b(p) = C_b(p) · Ref_{k,ω}(p) · e^{+2πi k·t/n} + noise,    noise ~ complex Gaussian, variance σ²(shell) per
                                                                real/imaginary component (optics group of b)

for class ``k``, orientation ``ω`` (2D: in-plane angle ψ; 3D: direction + ψ) and translation ``t``. Translating
the *image* instead (``X_t = X · e^{−2πi k·t/n}``, i.e. :func:`cryopipe.core.fourier.phase_shift_2d` by ``+t``)::

    diff²(b, t, m) = ½ Σ_p |X_t(b,p) − C(b,p)·Ref_m(p)|² / σ²(b,p)
                   = ½ [ Σ_p |X|²/σ²  −  2 Re Σ_p X_t·C/σ² · conj(Ref_m)  +  Σ_p C²/σ² · |Ref_m|² ]

with ``m = (k, ω)``. The cross term is ONE real GEMM ``[B·T, 2P] × [2P, M]`` (real and imaginary parts
stacked), the norm term one GEMM ``[B, P] × [P, M]``. The DC coefficient is left out (``1/σ² = 0``), as RELION.
Log posterior = ``−diff² + log prior(orientation, class) + log N(o_b + t; prior centre, σ²_offset)``.

Two passes (RELION's adaptive oversampling): a coarse pass over the coarse grid (on a low-resolution prefix of
the coefficients), then only the children of the *significant* coarse samples (those carrying the top
``adaptive_fraction`` of each image's posterior mass, at most ``max_significant``) are scored on the fine grid.
For a batch, the fine pass is run on the union over images of the significant (class, orientation) and
translation cells, and each image's non-significant children are masked out, so results do not depend on
how images are grouped into batches.

The M-step sums of a batch (also GEMMs) are returned with the weights: per fine sample ``m``
``W[m, p] = Σ_{b,t} w·C²/σ²`` (with ``S[m, p] = Σ w·C·X_t/σ²``, RELION's back-projection weighting) —
sufficient statistics that add over batches —
plus per-image expectations for the noise spectrum, norm and scale corrections, offsets and class priors.

Everything is batched tensors on the input's device; there is no loop over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

__all__ = [
    "BatchData",
    "PredictionSource",
    "TranslationGrid",
    "EStepSettings",
    "BatchResult",
    "shift_phases",
    "squared_differences",
    "significant_mask",
    "offset_log_prior",
    "expectation",
]


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------

@dataclass
class BatchData:
    """A batch of ``B`` images prepared for the E-step (all tensors on one device).

    Attributes:
        X: ``[B, P]`` complex64 coefficients (FT / n^d, i.e. RELION's normalisation) of the masked images,
            already translated by each image's current origin (``+o_b``) and norm-corrected.
        ctf: ``[B, P]`` float32 CTF (times the group intensity scale; ones without CTF).
        inv_sigma2: ``[B, P]`` float32 ``1/σ²`` of each coefficient (the DC term is left out of the posterior
            but weights the M-step sums).
        optics_group: ``[B]`` long, 0-based.
        prior_centre: ``[B, K, D]`` float32 centre of the Gaussian offset prior for each class, in pixels,
            relative to the image's current origin (2D classification: class prior offset − o_b; refinement:
            zeros).
        log_prior_orient: ``[B or 1, K, Rc]`` log prior of each class and coarse orientation (2D: log pdf_class).
        xi2_outside: ``[B]`` ``½ Σ |X|²/σ²`` over the coefficients beyond the set (only enters the log-likelihood).
        logsigma2: ``[B]`` ``Σ log(2πσ²)`` over the set without DC (log-likelihood normalisation).
        power_outside: ``[B, n_shells]`` ``Σ |X|²`` per shell over coefficients beyond the set (noise spectrum of
            shells beyond the current size, and the norm correction).
        allowed_class: ``[B]`` long, restrict an image to one class (first-iteration seeds); −1 = all classes.
        prior_centre_estep: ``[B, K, D]`` centre of the offset prior in the posterior only, where it differs from
            ``prior_centre`` (which the M-step sum ``wsum_sigma2_offset`` is taken about); None: the same.
        X_nomask: ``[B, P]`` coefficients of the same images without the particle mask: the reference sums ``S``
            are taken from them (RELION back-projects the unmasked images; the posterior and the noise, norm and
            scale sums use the masked ones); None: ``X``.
        inv_sigma2_sums: ``[B, P]`` the ``1/σ²`` the M-step sums ``S``, ``W`` are weighted with where it differs
            from ``inv_sigma2`` (3D pseudo-subtomograms: RELION back-projects ``X/σ²`` with weight ``Σc²/σ²``,
            i.e. ``1/(σ²·Σc²)`` in the sums' ``C·X/σ²``, ``C²/σ²`` form); None: ``inv_sigma2``.
    """

    X: torch.Tensor
    ctf: torch.Tensor
    inv_sigma2: torch.Tensor
    optics_group: torch.Tensor
    prior_centre: torch.Tensor
    log_prior_orient: torch.Tensor
    xi2_outside: torch.Tensor
    logsigma2: torch.Tensor
    power_outside: torch.Tensor
    allowed_class: torch.Tensor | None = None
    prior_centre_estep: torch.Tensor | None = None
    X_nomask: torch.Tensor | None = None
    inv_sigma2_sums: torch.Tensor | None = None

    @property
    def B(self) -> int:
        return int(self.X.shape[0])

    def select(self, idx: torch.Tensor) -> BatchData:
        """The sub-batch of images ``idx``."""
        lp = self.log_prior_orient if self.log_prior_orient.shape[0] == 1 else self.log_prior_orient[idx]
        ac = None if self.allowed_class is None else self.allowed_class[idx]
        pe = None if self.prior_centre_estep is None else self.prior_centre_estep[idx]
        xn = None if self.X_nomask is None else self.X_nomask[idx]
        iv = None if self.inv_sigma2_sums is None else self.inv_sigma2_sums[idx]
        return BatchData(self.X[idx], self.ctf[idx], self.inv_sigma2[idx], self.optics_group[idx],
                         self.prior_centre[idx], lp, self.xi2_outside[idx], self.logsigma2[idx],
                         self.power_outside[idx], ac, pe, xn, iv)


class PredictionSource(Protocol):
    """Reference predictions for the current iteration (2D: rotated class averages; 3D: projections).

    ``coarse()`` → ``[K, Rc, coarse_size]`` complex predictions (coefficient-set prefix of the coarse pass) for
    every class and coarse orientation; ``fine(k_idx, r_idx)`` → ``[M, S, P]`` predictions of the ``S`` children
    of coarse orientation ``r_idx[i]`` of class ``k_idx[i]`` on the full set. Predictions are ``FT / n^d`` of the
    reference as seen in that orientation (no CTF).
    """

    n_classes: int
    n_coarse: int
    n_children: int

    def coarse(self) -> torch.Tensor: ...

    def fine(self, k_idx: torch.Tensor, r_idx: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TranslationGrid:
    """Translations (pixels) relative to each image's current origin: ``coarse [Tc, D]``, ``children
    [Tc, n_children_t, D]`` (identical to ``coarse[:, None]`` without oversampling)."""

    coarse: torch.Tensor
    children: torch.Tensor


@dataclass
class EStepSettings:
    """Options of :func:`expectation`.

    Attributes:
        n: image box (pixels) of the coefficient vectors.
        k: ``[P, D]`` frequencies (Fourier pixels) of the coefficient set; the coarse pass uses
            ``k[:coarse_size]``.
        coarse_size: number of leading coefficients used by the coarse pass.
        sigma2_offset: variance of the Gaussian offset prior (pixels²); ``<= 0`` or inf disables it.
        sigma2_offset_estep: variance of the offset prior in the posterior where it differs from
            ``sigma2_offset`` (see ``BatchData.prior_centre_estep``); None: the same.
        adaptive_fraction: posterior mass kept as significant (RELION ``--adaptive_fraction``, 0.999).
        max_significant: at most this many significant samples per image (``--maxsig``; −1 = no limit).
        oversampling: whether the children pass is run (False: the coarse grid is the final grid).
        compute_corrections: compute the per-image expected residuals (norm correction ``norm_residual`` and
            scale sums; one more GEMM of the size of the M-step sum). Without it the noise spectrum is
            computed per optics group from the sample sums, and the per-image fields are NaN / 0.
        scale_shell_mask: ``[P]`` bool, coefficients used for the scale-correction sums (RELION: shells where
            the data-vs-prior ratio > 3); None: all.
        estep_size: number of leading coefficients that enter the posterior of the final pass
            (``--strict_highres_exp``); the M-step sums always use all ``P``. None: all.
        n_optics_groups: G, for the noise sums.
        n_shells: length of the noise spectra (``n//2 + 1``).
        shell: ``[P]`` long shell index of each coefficient.
        fine_budget: bound on the number of (image × fine translation × fine sample) scores held at once: the
            fine pass runs on sub-batches of images (each on the union of ITS images' significant samples), so
            memory and the union's overhead stay bounded when posteriors are broad (early 3D iterations).
        offset_prior_at_coarse: the fine translations take the offset prior of their coarse parent (RELION:
            "only calculate pdf_offset at the coarse sampling"); False: the prior at each fine translation.
    """

    n: int
    k: torch.Tensor
    shell: torch.Tensor
    coarse_size: int
    n_shells: int
    n_optics_groups: int = 1
    sigma2_offset: float = float("inf")
    sigma2_offset_estep: float | None = None
    adaptive_fraction: float = 0.999
    max_significant: int = -1
    oversampling: bool = True
    compute_corrections: bool = True
    scale_shell_mask: torch.Tensor | None = None
    estep_size: int | None = None
    fine_budget: int = 1 << 25
    offset_prior_at_coarse: bool = False


@dataclass
class BatchResult:
    """Everything the M-step and the metadata need from one batch.

    Per image (``[B]``): ``best_class``, ``best_coarse``/``best_child`` (orientation sample), ``best_offset``
    (pixels, relative to the current origin, ``[B, D]``), ``pmax``, ``n_significant``, ``loglik``
    (RELION's rlnLogLikeliContribution), ``norm_residual`` (``Σ_p E|X_t − C·Ref|²`` incl. beyond the set, for the
    norm correction), ``scale_xa``/``scale_aa`` (group scale sums).

    Per fine sample (``M`` = union samples of the batch): ``sample_class [M]``, ``sample_coarse [M]``,
    ``sample_child [M]``, ``S [M, P]`` complex, ``W [M, P]`` real (the additive M-step sums); only samples with
    any weight are kept.

    Additive scalars/arrays: ``wsum_class [K]``, ``wsum_orient [K, Rc]``, ``wsum_offset [K, D]``
    (``Σ w·(o_b + t)`` in pixels relative to the batch origins: add the origins, see ``wsum_origin``),
    ``wsum_sigma2_offset`` (``Σ w |o + t − centre|²``), ``wsum_sigma2_noise [G, n_shells]``,
    ``sumw_group [G]``, ``loglik_sum``, ``pmax_sum``.
    """

    best_class: torch.Tensor
    best_coarse: torch.Tensor
    best_child: torch.Tensor
    best_offset: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor
    loglik: torch.Tensor
    norm_residual: torch.Tensor
    scale_xa: torch.Tensor
    scale_aa: torch.Tensor
    sample_class: torch.Tensor
    sample_coarse: torch.Tensor
    sample_child: torch.Tensor
    S: torch.Tensor
    W: torch.Tensor
    wsum_class: torch.Tensor
    wsum_orient: torch.Tensor
    wsum_offset_rel: torch.Tensor
    wsum_class_per_image: torch.Tensor
    wsum_sigma2_offset: torch.Tensor
    wsum_sigma2_noise: torch.Tensor
    sumw_group: torch.Tensor
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------------------

def shift_phases(k: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
    """``[T, P]`` complex factors that translate images by ``+t`` (``t [T, D]`` pixels) at frequencies
    ``k [P, D]`` (Fourier pixels): ``exp(−2πi k·t / n)`` (as :func:`cryopipe.core.fourier.phase_shift_2d`)."""
    ang = (-2.0 * math.pi / n) * (t.to(torch.float32) @ k.to(torch.float32).T)
    return torch.polar(torch.ones_like(ang), ang)


def _as_real(z: torch.Tensor) -> torch.Tensor:
    """Complex ``[..., P]`` → real ``[..., 2P]`` view (interleaved real/imaginary parts, no copy when
    contiguous): the real dot product of two such rows is ``Re Σ a·conj(b)``."""
    z = z.contiguous()
    return torch.view_as_real(z).reshape(*z.shape[:-1], 2 * z.shape[-1])


def _cmm(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Real ``[M, N]`` × complex ``[N, P]`` → complex ``[M, P]`` as one real GEMM on the interleaved view."""
    out = a @ _as_real(z)
    return torch.view_as_complex(out.reshape(*out.shape[:-1], -1, 2))


#: above this fraction of (image, translation, sample) cells in play, the dense GEMM over the batch's union is
#: cheaper than gathering the cells one by one (a GEMM cell costs ~4·P flops at full rate, a gathered one a
#: memory-bound pass over P complex values: measured break-even ~5–10 %); early iterations (flat posteriors)
#: take the dense path, later ones (sharp posteriors, ~0.03 %) the sparse one. Both give the same numbers.
DENSE_FRACTION = 0.05


def squared_differences(X: torch.Tensor, ctf: torch.Tensor, inv_sigma2: torch.Tensor, refs: torch.Tensor,
                        phases: torch.Tensor) -> torch.Tensor:
    """``diff² [B, T, M]`` (see module docstring) for images ``X [B, P]``, CTFs ``[B, P]``, ``1/σ² [B, P]``,
    predictions ``refs [M, P]`` and translation phases ``[T, P]``. Two GEMMs; float32."""
    xi2 = (X.real.square() + X.imag.square()).mul_(inv_sigma2).sum(-1)  # [B]
    at = (X * (ctf * inv_sigma2).to(X.dtype))[:, None, :] * phases[None, :, :]  # [B, T, P]  X_t·C/σ²
    return _squared_differences_shifted(at, xi2, ctf.square() * inv_sigma2, refs)


def _squared_differences_shifted(at: torch.Tensor, xi2: torch.Tensor, ctf2_inv_sigma2: torch.Tensor,
                                 refs: torch.Tensor) -> torch.Tensor:
    """``diff² [B, T, M]`` from the translated, weighted images ``at = X_t·C/σ² [B, T, P]``, ``Σ|X|²/σ² [B]``,
    ``C²/σ² [B, P]`` and predictions ``refs [M, P]``: the cross term is one real GEMM, the norm term another."""
    B, T, P = at.shape
    M = refs.shape[0]
    cross = (_as_real(at).reshape(B * T, 2 * P) @ _as_real(refs).T).reshape(B, T, M)  # Re Σ X_t·C/σ²·conj(R)
    norm = ctf2_inv_sigma2 @ (refs.real.square() + refs.imag.square()).T  # [B, M]
    return cross.mul_(-1.0).add_(norm[:, None, :], alpha=0.5).add_(xi2[:, None, None], alpha=0.5)


def significant_mask(w: torch.Tensor, fraction: float, max_significant: int = -1) -> torch.Tensor:
    """Boolean ``[B, N]``: the largest weights of each row that together reach ``fraction`` of the row's sum
    (always at least the largest one; at most ``max_significant`` when > 0, ties at the threshold included)."""
    B, N = w.shape
    total = w.sum(dim=1, keepdim=True)
    # weights below (1 − fraction)·total / N can never be needed: all of them together hold less than the mass
    # that may be left out, so the threshold lies among the larger ones; sort only as many as the fullest row has
    n_cand = int((w >= (1.0 - fraction) * total / N).sum(dim=1).max()) if B and N else 0
    keep = min(N, max(1, n_cand))
    if max_significant is not None and 0 < max_significant < N:
        keep = min(keep, int(max_significant))  # only the candidates can be kept
    if keep < N:
        srt = torch.topk(w, keep, dim=1).values
    else:
        srt, _ = torch.sort(w, dim=1, descending=True)
    cs = torch.cumsum(srt, dim=1)
    n_keep = (cs < fraction * total).sum(dim=1) + 1
    if max_significant is not None and max_significant > 0:
        n_keep = torch.clamp(n_keep, max=int(max_significant))
    n_keep = torch.clamp(n_keep, max=srt.shape[1])
    thr = srt.gather(1, (n_keep - 1)[:, None])
    return (w >= thr) & (w > 0)


def children_squared_differences(at: torch.Tensor, X: torch.Tensor, ctf: torch.Tensor, inv_sigma2: torch.Tensor,
                                  refs: torch.Tensor, parent: torch.Tensor, n_children_t: int,
                                  chunk_values: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """``diff²`` of the fine samples whose parent is significant, and only of those (RELION scores the children
    of each image's own significant coarse samples; a dense pass over the batch's union of them does ~1,000×
    the work once the posteriors are sharp).

    Args:
        at: ``[B, Tf, P]`` translated, CTF- and noise-weighted images ``X_t·C/σ²`` of the fine translations
            (``Tf = Tsel·n_children_t``: the ``n_children_t`` children of each of ``Tsel`` coarse translations,
            child-fastest).
        X, ctf, inv_sigma2: ``[B, P]`` as :func:`squared_differences` (the first ``P`` coefficients are used).
        refs: ``[Msel, n_children, P]`` predictions of the ``n_children`` children of each of ``Msel`` coarse
            samples.
        parent: ``[B, Tsel, Msel]`` bool, the significant (coarse translation, coarse sample) pairs of each image.
        n_children_t: translation children per coarse translation.
        chunk_values: bound on the complex values gathered at once (memory).

    Returns:
        ``entries [E, 3]`` long ``(b, coarse translation, coarse sample)`` of the significant parents, and
        ``diff² [E, n_children_t, n_children]`` of their children (as :func:`squared_differences`).
    """
    P = refs.shape[-1]
    n_children = refs.shape[1]
    n_children_t = int(n_children_t)
    entries = torch.nonzero(parent)  # [E, 3]
    E = entries.shape[0]
    xi2 = (X[:, :P].real.square() + X[:, :P].imag.square()).mul_(inv_sigma2[:, :P]).sum(-1)  # [B]
    c2i = ctf[:, :P].square() * inv_sigma2[:, :P]  # [B, P]
    if E > DENSE_FRACTION * parent.numel():  # flat posteriors: one GEMM over the union, then pick the cells
        B, Tf = at.shape[0], at.shape[1]
        Msel = refs.shape[0]
        diff2 = _squared_differences_shifted(at[:, :, :P], xi2, c2i,
                                             refs.reshape(Msel * n_children, P))  # [B, Tf, Msel·n_children]
        b, ti, mi = entries.unbind(1)
        return entries, diff2.reshape(B, Tf // n_children_t, n_children_t, Msel, n_children)[b, ti, :, mi, :]
    out = torch.empty(E, n_children_t, n_children, device=at.device, dtype=torch.float32)
    child_t = torch.arange(n_children_t, device=at.device)
    step = max(1, int(chunk_values) // ((n_children_t + n_children) * P))
    for e0 in range(0, E, step):
        b, ti, mi = entries[e0:e0 + step].unbind(1)
        shifted = at[b[:, None], ti[:, None] * n_children_t + child_t[None, :], :P]  # [e, n_children_t, P]
        child_refs = refs[mi]  # [e, n_children, P]
        # [e, n_children_t, n_children]: Re Σ X_t·C/σ²·conj(Ref)
        cross = torch.bmm(_as_real(shifted), _as_real(child_refs).transpose(1, 2))
        child_power = child_refs.real.square() + child_refs.imag.square()  # [e, n_children, P]
        norm = torch.einsum("ep,eop->eo", c2i[b], child_power)  # [e, n_children]
        out[e0:e0 + step] = (0.5 * xi2[b])[:, None, None] - cross + 0.5 * norm[:, None, :]
    return entries, out


def offset_log_prior(t: torch.Tensor, centre: torch.Tensor, sigma2: float) -> torch.Tensor:
    """``[B, T, K]`` log of the 2D/3D Gaussian offset prior ``N(t; centre, σ²)`` (normalised) for translations
    ``t [T, D]`` and centres ``[B, K, D]`` (pixels, relative to the image origin); zeros if ``σ²`` is not
    finite/positive."""
    B, K, D = centre.shape
    if not (sigma2 > 0 and math.isfinite(sigma2)):
        return torch.zeros(B, t.shape[0], K, device=t.device, dtype=torch.float32)
    delta = t[None, :, None, :] - centre[:, None, :, :]
    return -(delta.square().sum(-1)) / (2.0 * sigma2) - 0.5 * D * math.log(2.0 * math.pi * sigma2)


def _estep_centre(batch: BatchData) -> torch.Tensor:
    return batch.prior_centre if batch.prior_centre_estep is None else batch.prior_centre_estep


def _estep_sigma2(settings: EStepSettings) -> float:
    return float(settings.sigma2_offset if settings.sigma2_offset_estep is None else settings.sigma2_offset_estep)


# ------------------------------------------------------------------------------------------------------------
# the E-step of one batch
# ------------------------------------------------------------------------------------------------------------

def expectation(batch: BatchData, refs: PredictionSource, trans: TranslationGrid,
                settings: EStepSettings) -> BatchResult:
    """Posterior weights and M-step sums of one batch (module docstring). All outputs on the batch's device."""
    dev = batch.X.device
    B = batch.B
    K, Rc, n_children = refs.n_classes, refs.n_coarse, refs.n_children
    n = settings.n
    kvec = settings.k.to(dev)
    coarse_size = settings.coarse_size
    # the DC term (coefficient 0: the sets are sorted by |k|) is left out of the posterior, as RELION
    inv_score = batch.inv_sigma2.clone()
    inv_score[:, 0] = 0.0
    neg_inf = torch.tensor(-math.inf, device=dev)

    # ---------------- coarse pass
    ref_c = refs.coarse()  # [K, Rc, coarse_size]
    tc = trans.coarse.to(dev)
    Tc = tc.shape[0]
    ph_c = shift_phases(kvec[:coarse_size], tc, n)
    d2 = squared_differences(batch.X[:, :coarse_size], batch.ctf[:, :coarse_size], inv_score[:, :coarse_size],
                             ref_c.reshape(K * Rc, coarse_size), ph_c).reshape(B, Tc, K, Rc)
    log_prior_offset_c = offset_log_prior(tc, _estep_centre(batch), _estep_sigma2(settings))  # [B, Tc, K]
    log_prior_orient = batch.log_prior_orient.expand(batch.log_prior_orient.shape[0], K, Rc)
    logp = -d2 + log_prior_offset_c[..., None] + log_prior_orient[:, None, :, :]
    if batch.allowed_class is not None:
        cls_ok = (batch.allowed_class[:, None] < 0) | (batch.allowed_class[:, None] ==
                                                       torch.arange(K, device=dev)[None, :])
        logp = torch.where(cls_ok[:, None, :, None], logp, neg_inf)
    del d2

    two_pass = settings.oversampling and (n_children > 1 or trans.children.shape[1] > 1)
    if not two_pass:
        return _fine_pass(batch, inv_score, logp, log_prior_orient, refs, trans, settings, None)
    # ---------------- significance of coarse samples
    flat = logp.reshape(B, -1)
    w_c = torch.softmax(flat, dim=1)
    sig = significant_mask(w_c, settings.adaptive_fraction, settings.max_significant).reshape(B, Tc, K, Rc)
    del w_c, flat
    groups = _fine_groups(sig, n_children * refs_children_t(trans), int(settings.fine_budget))
    if len(groups) == 1:
        return _fine_pass(batch, inv_score, logp, log_prior_orient, refs, trans, settings, sig)
    parts = []
    for images in groups:  # sub-batches of images (bounded fine-pass memory)
        orient_images = log_prior_orient if log_prior_orient.shape[0] == 1 else log_prior_orient[images]
        parts.append(_fine_pass(batch.select(images), inv_score[images], logp[images], orient_images, refs, trans,
                                settings, sig[images]))
    return _merge_results(parts)


def refs_children_t(trans: TranslationGrid) -> int:
    """Number of translation children per coarse translation."""
    return int(trans.children.shape[1])


def _fine_groups(sig: torch.Tensor, children: int, budget: int) -> list[torch.Tensor]:
    """Consecutive groups of images whose fine pass (``images × union translations × union samples ×
    children``) stays within ``budget`` scores (at least one image per group)."""
    B = sig.shape[0]
    dev = sig.device
    kr = sig.any(dim=1).reshape(B, -1)  # [B, K*Rc]
    tt = sig.any(dim=3).any(dim=2)  # [B, Tc]
    total = B * int(kr.any(dim=0).sum()) * int(tt.any(dim=0).sum()) * children
    if total <= budget:
        return [torch.arange(B, device=dev)]
    groups = []
    start = 0
    while start < B:  # one step per group
        ukr = torch.cumsum(kr[start:].to(torch.int32), dim=0) > 0
        ut = torch.cumsum(tt[start:].to(torch.int32), dim=0) > 0
        cnt = torch.arange(1, B - start + 1, device=dev, dtype=torch.float64)
        cost = cnt * ukr.sum(dim=1).to(torch.float64) * ut.sum(dim=1).to(torch.float64) * children
        ok = torch.nonzero(cost <= budget).reshape(-1)
        take = int(ok.max()) + 1 if ok.numel() else 1
        groups.append(torch.arange(start, start + take, device=dev))
        start += take
    return groups


def _merge_results(parts: list[BatchResult]) -> BatchResult:
    """One :class:`BatchResult` from those of consecutive image sub-batches: per-image fields concatenated,
    per-sample fields concatenated (a sample may repeat: its sums add), additive fields summed."""
    cat_img = ["best_class", "best_coarse", "best_child", "best_offset", "pmax", "n_significant", "loglik",
               "norm_residual", "scale_xa", "scale_aa", "wsum_offset_rel", "wsum_class_per_image"]
    cat_smp = ["sample_class", "sample_coarse", "sample_child", "S", "W"]
    add = ["wsum_class", "wsum_orient", "wsum_sigma2_offset", "wsum_sigma2_noise", "sumw_group"]
    kw = {}
    for name in cat_img + cat_smp:
        kw[name] = torch.cat([getattr(part, name) for part in parts], dim=0)
    for name in add:
        total = getattr(parts[0], name).clone()
        for part in parts[1:]:
            total = total + getattr(part, name)
        kw[name] = total
    extra = {"two_pass": parts[0].extra.get("two_pass", True), "sub_batches": len(parts)}
    return BatchResult(**kw, extra=extra)


@dataclass
class _Weights:
    """The non-zero (significant) posterior weights of a batch as a list: image ``b``, final translation ``t``
    (index into the translations), final sample ``m`` (index into the samples) and weight ``v``, each ``[nnz]``;
    the pruned posteriors are ~0.03 % dense, so everything after the weights works on this list."""

    b: torch.Tensor
    t: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor

    def select(self, keep: torch.Tensor) -> "_Weights":
        return _Weights(self.b[keep], self.t[keep], self.m[keep], self.v[keep])


def _posterior(logp: torch.Tensor, locate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               settings: EStepSettings):
    """Normalised, pruned weights from log posteriors ``logp [B, L]`` (−inf: not a candidate); ``locate(b, j)``
    maps row positions to (translation, sample) indices. Returns ``(log evidence [B], pmax [B], n_significant [B],
    best translation [B], best sample [B], weights)``."""
    B = logp.shape[0]
    lse = torch.logsumexp(logp, dim=1)  # [B]
    w = logp.sub_(lse[:, None]).exp_()  # in place: the log posteriors are not needed any more
    sig = significant_mask(w, settings.adaptive_fraction, settings.max_significant)
    n_sig = sig.sum(dim=1)
    pmax, best = w.max(dim=1)
    b, j = torch.nonzero(sig, as_tuple=True)
    t, m = locate(b, j)
    best_t, best_m = locate(torch.arange(B, device=logp.device), best)
    return lse, pmax, n_sig, best_t, best_m, _Weights(b, t, m, w[b, j])


def weighted_row_sums(w: _Weights, rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_out: int,
                      width: int, cells: tuple[int, int], chunk_values: int = 1 << 22) -> torch.Tensor:
    """``out[m] = Σ v · rows(b, t)`` over the weight list (``rows(b, t)`` for index vectors ``[e]`` gives complex
    rows ``[e, width]``; ``cells = (B, T)`` the image and translation counts) → ``[n_out, width]`` complex64,
    added in list order (deterministic); a dense GEMM when the list fills more than ``DENSE_FRACTION``."""
    B, T = cells
    dev = w.v.device
    if w.v.numel() > DENSE_FRACTION * B * T * n_out:
        dense = torch.zeros(n_out, B * T, device=dev).index_put_((w.m, w.b * T + w.t), w.v, accumulate=True)
        bb = torch.arange(B, device=dev).repeat_interleave(T)
        tt = torch.arange(T, device=dev).repeat(B)
        return _cmm(dense, rows(bb, tt).to(torch.complex64))
    out = torch.zeros(n_out, width, dtype=torch.complex64, device=dev)
    step = max(1, int(chunk_values) // max(1, width))
    for e0 in range(0, w.v.numel(), step):
        sl = slice(e0, e0 + step)
        out.index_add_(0, w.m[sl], rows(w.b[sl], w.t[sl]) * w.v[sl, None].to(out.real.dtype))
    return out


def _expected_cross(w: _Weights, at: torch.Tensor, refs: torch.Tensor, chunk_values: int = 1 << 22
                    ) -> torch.Tensor:
    """``[B, P]`` ``Re Σ v · at[b,t] · conj(refs[m])`` over the weight list (``at [B, T, P]``, ``refs [M, P]``)."""
    B, T, P = at.shape
    M = refs.shape[0]
    if w.v.numel() > DENSE_FRACTION * B * T * M:  # dense: the weighted mean prediction per (b, t), one GEMM
        dense = torch.zeros(B * T, M, device=at.device).index_put_((w.b * T + w.t, w.m), w.v, accumulate=True)
        rbar = _cmm(dense, refs).reshape(B, T, P)
        return (at * rbar.conj()).real.sum(dim=1)
    out = torch.zeros(B, P, dtype=torch.float32, device=at.device)
    step = max(1, int(chunk_values) // max(1, P))
    for e0 in range(0, w.v.numel(), step):
        sl = slice(e0, e0 + step)
        b = w.b[sl]
        out.index_add_(0, b, (at[b, w.t[sl]] * refs[w.m[sl]].conj()).real * w.v[sl, None])
    return out


def _children_log_posterior(batch: BatchData, inv_score: torch.Tensor, at_f: torch.Tensor, ref_f: torch.Tensor,
                            parent: torch.Tensor, log_prior_offset: torch.Tensor, log_prior_orient: torch.Tensor,
                            n_children_t: int, estep_size: int):
    """Log posteriors of the children of each image's significant parents, packed per image.

    ``parent [B, Tsel, Msel]``; ``log_prior_offset [B, Tsel·n_children_t, Msel]`` and ``log_prior_orient
    [B|1, Msel]`` the offset and orientation log priors. Returns ``logp [B, L]`` (−inf padded; ``L`` = most parents
    of an image × ``n_children_t·n_children``) and ``locate(b, j)`` → (translation index in
    ``[0, Tsel·n_children_t)``, sample index in ``[0, Msel·n_children)``)."""
    dev = at_f.device
    B = parent.shape[0]
    Msel, n_children = ref_f.shape[0], ref_f.shape[1]
    Tsel = parent.shape[1]
    head = slice(0, estep_size)  # the E-step's coefficients
    entries, d2 = children_squared_differences(at_f[:, :, head], batch.X[:, head], batch.ctf[:, head],
                                               inv_score[:, head], ref_f[:, :, head], parent, n_children_t)
    b_e, ti_e, mi_e = entries.unbind(1)  # sorted by image (row-major nonzero)
    off = log_prior_offset.reshape(B, Tsel, n_children_t, Msel)[b_e, ti_e, :, mi_e]  # [E, n_children_t]
    orient = log_prior_orient[b_e if log_prior_orient.shape[0] > 1 else torch.zeros_like(b_e), mi_e]  # [E]
    per = n_children_t * n_children
    children_logp = d2.neg_().add_(off[:, :, None]).add_(orient[:, None, None]).reshape(-1, per)  # [E, per]
    counts = torch.bincount(b_e, minlength=B)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(b_e.numel(), device=dev) - first[b_e]
    L = max(1, int(counts.max()) * per) if b_e.numel() else 1
    logp = torch.full((B, L), -math.inf, device=dev, dtype=torch.float32)
    logp[b_e[:, None], rank[:, None] * per + torch.arange(per, device=dev)[None, :]] = children_logp

    def locate(b: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        entry = (first[b] + j // per).clamp_max(max(0, b_e.numel() - 1))
        within = j % per
        return ti_e[entry] * n_children_t + within // n_children, mi_e[entry] * n_children + within % n_children

    return logp, locate


@dataclass
class _FinalGrid:
    """The final (fine) grid of a batch and the log posteriors on it: ``ref_f [Mf, 1, P]`` the predictions of the
    final samples (class ``sample_k``, coarse sample ``sample_r``, child ``child_of_sample``, each ``[Mf]``);
    ``t_f [Tf, D]`` the final translations (coarse parent ``t_parent``, child ``t_child``); ``flat [B, L]`` the log
    posteriors, ``locate(b, j)`` → (translation, sample) of a row position; ``at_f [B, Tf, P]`` X_t·C/σ² (DC
    left out) when scoring made it, else None."""

    ref_f: torch.Tensor
    t_f: torch.Tensor
    sample_k: torch.Tensor
    sample_r: torch.Tensor
    child_of_sample: torch.Tensor
    t_parent: torch.Tensor
    t_child: torch.Tensor
    flat: torch.Tensor
    locate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    at_f: torch.Tensor | None


def _single_pass_grid(batch: BatchData, logp: torch.Tensor, refs: PredictionSource, trans: TranslationGrid,
                      settings: EStepSettings) -> _FinalGrid:
    """Single pass: the coarse grid is the final grid (samples = all (k, r), "child" 0 = the sample itself) and
    the coarse scores ``logp [B, Tc, K, Rc]`` are the log posteriors."""
    dev = batch.X.device
    K, Rc = refs.n_classes, refs.n_coarse
    coarse_size = settings.coarse_size
    P = batch.X.shape[1]
    estep_size = P if settings.estep_size is None else min(int(settings.estep_size), P)
    if coarse_size != estep_size:
        raise ValueError("without oversampling the coarse pass must use the E-step coefficient set "
                         f"(coarse_size {coarse_size} != {estep_size})")
    tc = trans.coarse.to(dev)
    Tc = tc.shape[0]
    ref_f = refs.fine(torch.arange(K, device=dev).repeat_interleave(Rc),
                      torch.arange(Rc, device=dev).repeat(K))[:, :1]  # full set for the M-step sums
    Mf = K * Rc

    def locate(b: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return j // Mf, j % Mf

    return _FinalGrid(ref_f=ref_f, t_f=tc, sample_k=torch.arange(K, device=dev).repeat_interleave(Rc),
                      sample_r=torch.arange(Rc, device=dev).repeat(K),
                      child_of_sample=torch.zeros(Mf, dtype=torch.long, device=dev),
                      t_parent=torch.arange(Tc, device=dev), t_child=torch.zeros(Tc, dtype=torch.long, device=dev),
                      flat=logp.reshape(batch.B, Tc * Mf), locate=locate, at_f=None)


def _children_grid(batch: BatchData, inv_score: torch.Tensor, log_prior_orient: torch.Tensor,
                   refs: PredictionSource, trans: TranslationGrid, settings: EStepSettings,
                   sig: torch.Tensor) -> _FinalGrid:
    """Two passes: the final grid is the children of the union over the batch of the significant coarse samples
    and translations ``sig [B, Tc, K, Rc]``, but only the children of each image's own significant parents are
    scored (:func:`_children_log_posterior`)."""
    dev = batch.X.device
    kr_any = sig.any(dim=1).any(dim=0)  # [K, Rc]
    t_any = sig.any(dim=3).any(dim=2).any(dim=0)  # [Tc]
    kr_idx = torch.nonzero(kr_any)  # [Msel, 2]
    k_sel, r_sel = kr_idx[:, 0], kr_idx[:, 1]
    t_sel = torch.nonzero(t_any).reshape(-1)
    Msel, Tsel = k_sel.numel(), t_sel.numel()
    ref_f = refs.fine(k_sel, r_sel)  # [Msel, n_children, P]
    n_children = ref_f.shape[1]
    t_ch = trans.children.to(dev)[t_sel]  # [Tsel, n_children_t, D]
    n_children_t = t_ch.shape[1]
    t_f = t_ch.reshape(Tsel * n_children_t, -1)
    P = batch.X.shape[1]
    estep_size = P if settings.estep_size is None else min(int(settings.estep_size), P)
    at_f = (batch.X * (batch.ctf * inv_score).to(batch.X.dtype))[:, None, :] \
        * shift_phases(settings.k.to(dev)[:P], t_f, settings.n)[None]  # [B, Tf, P]  X_t·C/σ² (DC left out)
    t_prior = (trans.coarse.to(dev)[t_sel][:, None, :].expand(Tsel, n_children_t, t_ch.shape[-1])
               .reshape(Tsel * n_children_t, -1) if settings.offset_prior_at_coarse else t_f)
    log_prior_offset = offset_log_prior(t_prior, _estep_centre(batch),
                                        _estep_sigma2(settings))[:, :, k_sel]  # [B, Tf, Msel]
    flat, locate = _children_log_posterior(batch, inv_score, at_f, ref_f, sig[:, t_sel][:, :, k_sel, r_sel],
                                           log_prior_offset, log_prior_orient[:, k_sel, r_sel], n_children_t,
                                           estep_size)
    del log_prior_offset
    return _FinalGrid(ref_f=ref_f.reshape(Msel * n_children, 1, P), t_f=t_f,
                      sample_k=k_sel.repeat_interleave(n_children), sample_r=r_sel.repeat_interleave(n_children),
                      child_of_sample=torch.arange(n_children, device=dev).repeat(Msel),
                      t_parent=t_sel.repeat_interleave(n_children_t),
                      t_child=torch.arange(n_children_t, device=dev).repeat(Tsel),
                      flat=flat, locate=locate, at_f=at_f)


def _noise_sum_inputs(batch: BatchData, settings: EStepSettings, refs_m: torch.Tensor):
    """What both noise-sum paths read, cut to the ``P`` coefficients of ``refs_m [Mf, P]``: ``(ctf [B, P],
    1/σ² [B, P], shell [P], optics group [B], power outside float64 [B, shells], |Ref|² [Mf, P])``."""
    dev = batch.X.device
    P = refs_m.shape[1]
    return (batch.ctf[:, :P], batch.inv_sigma2[:, :P], settings.shell[:P].to(dev), batch.optics_group.to(dev),
            batch.power_outside.to(torch.float64), refs_m.real.square() + refs_m.imag.square())


def _per_image_noise_sums(batch: BatchData, settings: EStepSettings, w: _Weights, wbm: torch.Tensor,
                          at_f: torch.Tensor, refs_m: torch.Tensor, ex_xx: torch.Tensor):
    """σ² sums and per-image norm / scale corrections from the expected residual power
    ``E|X_t − C·Ref|² = sumw·|X|² − 2·E_xa + E_aa`` per coefficient. Returns ``(wsum_sigma2_noise [G, shells],
    norm_residual [B], scale_xa [B], scale_aa [B])``."""
    dev = batch.X.device
    B, P = wbm.shape[0], refs_m.shape[1]
    ctf, inv, shell, og, pw_out, ref_pow = _noise_sum_inputs(batch, settings, refs_m)
    e_xa = _expected_cross(w, at_f, refs_m)  # [B, P]: Re Σ_t,m w·X_t·C/σ²·conj(Ref_m) (DC: ·1/σ²_0)
    e_xa = torch.where(inv > 0, e_xa / inv.clamp_min(1e-30), torch.zeros_like(e_xa))  # → Re Σ X_t·C·E[R]*
    e_aa = ctf.square() * (wbm @ ref_pow)  # [B, P]
    resid = ex_xx - 2.0 * e_xa + e_aa  # [B, P]
    per_shell = torch.zeros(B, settings.n_shells, device=dev, dtype=torch.float64).index_add_(
        1, shell, resid.to(torch.float64))
    wsum_noise = torch.zeros(settings.n_optics_groups, settings.n_shells, device=dev, dtype=torch.float64
                             ).index_add_(0, og, per_shell + pw_out)
    norm_residual = resid.sum(dim=1).to(torch.float64) + pw_out.sum(dim=1)
    if settings.scale_shell_mask is not None:
        smask = settings.scale_shell_mask[:P].to(dev).to(e_xa.dtype)
        return wsum_noise, norm_residual, (e_xa * smask).sum(dim=1), (e_aa * smask).sum(dim=1)
    return wsum_noise, norm_residual, e_xa.sum(dim=1), e_aa.sum(dim=1)


def _per_group_noise_sums(batch: BatchData, settings: EStepSettings, w: _Weights, wbm: torch.Tensor,
                          at_f: torch.Tensor, refs_m: torch.Tensor, ex_xx: torch.Tensor, S: torch.Tensor,
                          Wsum: torch.Tensor, n_translations: int) -> torch.Tensor:
    """σ² sums per optics group only (σ² is the same for all images of a group), from the sample sums ``S``,
    ``Wsum`` (recomputed per group when the batch mixes groups or the sums use other images / 1/σ²) →
    ``wsum_sigma2_noise [G, shells]``."""
    dev = batch.X.device
    B, P = wbm.shape[0], refs_m.shape[1]
    Mf = refs_m.shape[0]
    ctf, inv, shell, og, pw_out, ref_pow = _noise_sum_inputs(batch, settings, refs_m)
    wsum_noise = torch.zeros(settings.n_optics_groups, settings.n_shells, device=dev, dtype=torch.float64)
    for group in torch.unique(og).tolist():  # optics groups of the batch (a handful)
        sel = og == group
        inv_g = inv[sel][0]  # [P]
        if bool(sel.all()) and batch.X_nomask is None and batch.inv_sigma2_sums is None:
            S_g, W_g = S, Wsum
        else:
            w_g = w.select(sel[w.b])
            S_g = weighted_row_sums(w_g, lambda b, t: at_f[b, t], Mf, P, (B, n_translations))
            W_g = wbm[sel].T @ (ctf[sel].square() * inv[sel])
        xa = (refs_m.conj() * S_g).real.sum(dim=0) / inv_g.clamp_min(1e-30)
        aa = (ref_pow * W_g).sum(dim=0) / inv_g.clamp_min(1e-30)
        resid_g = ex_xx[sel].sum(dim=0) - 2.0 * xa + aa
        resid_g = torch.where(inv_g > 0, resid_g, torch.zeros_like(resid_g)).to(torch.float64)
        wsum_noise[group].index_add_(0, shell, resid_g)
        wsum_noise[group] += pw_out[sel].sum(dim=0)
    return wsum_noise


def _fine_pass(batch: BatchData, inv_score: torch.Tensor, logp: torch.Tensor, log_prior_orient: torch.Tensor,
               refs: PredictionSource, trans: TranslationGrid, settings: EStepSettings,
               sig: torch.Tensor | None) -> BatchResult:
    """Everything after the coarse scores ``logp [B, Tc, K, Rc]``: the fine pass on the children of the
    significant coarse samples ``sig`` (None: single pass, the coarse grid is final), the weights and the
    M-step sums."""
    dev = batch.X.device
    B = batch.B
    K, Rc = refs.n_classes, refs.n_coarse
    n = settings.n
    kvec = settings.k.to(dev)
    two_pass = sig is not None
    grid = (_children_grid(batch, inv_score, log_prior_orient, refs, trans, settings, sig) if two_pass
            else _single_pass_grid(batch, logp, refs, trans, settings))
    del logp
    t_f, sample_k, sample_r = grid.t_f, grid.sample_k, grid.sample_r
    at_f = grid.at_f  # X_t·C/σ² of the final grid (DC left out), when the scoring pass already made it

    # ---------------- final weights (a list of the significant ones)
    Tf = t_f.shape[0]
    Mf = sample_k.numel()
    lse, pmax, n_sig, best_t, best_m, w = _posterior(grid.flat, grid.locate, settings)
    grid.flat = None
    loglik = lse - batch.xi2_outside - batch.logsigma2

    # ---------------- M-step sums over the weight list
    refs_m = grid.ref_f.reshape(Mf, -1)  # [Mf, P]
    grid.at_f = None
    P = refs_m.shape[1]
    X = batch.X[:, :P]
    ctf = batch.ctf[:, :P]
    inv = batch.inv_sigma2[:, :P]  # 1/σ² incl. the DC term: the sums are weighted like RELION's back-projection
    inv_s = inv_score[:, :P]
    if at_f is None:
        at_f = (X * (ctf * inv_s).to(X.dtype))[:, None, :] * shift_phases(kvec[:P], t_f, n)[None]  # [B, Tf, P]
    # DC term (phase 1): scored without it, summed with it
    xc0 = X[:, 0] * ctf[:, 0].to(X.dtype)
    at_f[:, :, 0] = (xc0 * inv[:, 0].to(X.dtype))[:, None]
    inv_bp = inv if batch.inv_sigma2_sums is None else batch.inv_sigma2_sums[:, :P]  # the sums' 1/σ²
    if batch.X_nomask is None and batch.inv_sigma2_sums is None:
        S = weighted_row_sums(w, lambda b, t: at_f[b, t], Mf, P, (B, Tf))  # [Mf, P]  Σ w·C·X_t/σ²
    else:  # from the unmasked images and/or with the sums' own 1/σ² (same weights, shifts, CTF; DC included)
        xs = X if batch.X_nomask is None else batch.X_nomask[:, :P]
        an = xs.to(X.dtype) * (ctf * inv_bp).to(X.dtype)  # [B, P]
        ph = shift_phases(kvec[:P], t_f, n)  # [Tf, P]
        S = weighted_row_sums(w, lambda b, t: an[b] * ph[t], Mf, P, (B, Tf))
        del an, ph
    wbm = torch.zeros(B, Mf, device=dev).index_put_((w.b, w.m), w.v, accumulate=True)  # [B, Mf]
    Wsum = wbm.T @ (ctf.square() * inv_bp)  # [Mf, P]

    # expected residual power E|X_t − C·Ref|² = sumw·|X|² − 2·E_xa + E_aa per coefficient
    sumw_b = wbm.sum(dim=1)  # [B] (≈1, minus the pruned mass)
    ex_xx = sumw_b[:, None] * (X.real.square() + X.imag.square())  # [B, P]
    n_groups = settings.n_optics_groups
    og = batch.optics_group.to(dev)
    if settings.compute_corrections:  # per image (norm / scale corrections need it)
        wsum_noise, norm_residual, scale_xa, scale_aa = _per_image_noise_sums(batch, settings, w, wbm, at_f,
                                                                              refs_m, ex_xx)
    else:
        wsum_noise = _per_group_noise_sums(batch, settings, w, wbm, at_f, refs_m, ex_xx, S, Wsum, Tf)
        norm_residual = torch.full((B,), float("nan"), dtype=torch.float64, device=dev)
        scale_xa = torch.zeros(B, dtype=torch.float64, device=dev)
        scale_aa = torch.zeros(B, dtype=torch.float64, device=dev)
    at_f = None  # free the [B, Tf, P] products before the class / offset sums
    sumw_group = torch.zeros(n_groups, device=dev, dtype=torch.float64).index_add_(
        0, og, torch.ones(B, device=dev, dtype=torch.float64))

    # ---------------- class / orientation / offset sums
    wk = sample_k[w.m]
    w_km = torch.zeros(B, K, device=dev).index_put_((w.b, wk), w.v, accumulate=True)  # [B, K]
    wsum_class = w_km.sum(dim=0)
    wsum_orient = torch.zeros(K * Rc, device=dev, dtype=torch.float64).index_add_(
        0, sample_k * Rc + sample_r, wbm.sum(dim=0).to(torch.float64)).reshape(K, Rc)
    # Σ w·t per (b, k): translations relative to the image origin
    tw = t_f[w.t].to(torch.float32)  # [nnz, D]
    D = tw.shape[1]
    wsum_t = torch.zeros(B * K, D, device=dev).index_add_(0, w.b * K + wk, tw * w.v[:, None]).reshape(B, K, D)
    from_centre = tw - batch.prior_centre[w.b, wk]  # [nnz, D]
    wsum_sigma2_offset = (w.v * from_centre.square().sum(-1)).sum().to(torch.float64)

    best_k = sample_k[best_m]
    return BatchResult(
        best_class=best_k,
        best_coarse=sample_r[best_m],
        best_child=grid.child_of_sample[best_m],
        best_offset=t_f[best_t],
        pmax=pmax,
        n_significant=n_sig,
        loglik=loglik,
        norm_residual=norm_residual,
        scale_xa=scale_xa.to(torch.float64),
        scale_aa=scale_aa.to(torch.float64),
        sample_class=sample_k,
        sample_coarse=sample_r,
        sample_child=grid.child_of_sample,
        S=S,
        W=Wsum,
        wsum_class=wsum_class.to(torch.float64),
        wsum_orient=wsum_orient,
        wsum_offset_rel=wsum_t,
        wsum_class_per_image=w_km,
        wsum_sigma2_offset=wsum_sigma2_offset,
        wsum_sigma2_noise=wsum_noise,
        sumw_group=sumw_group,
        extra={"t_parent": grid.t_parent, "t_child": grid.t_child, "two_pass": two_pass, "translations": t_f},
    )
