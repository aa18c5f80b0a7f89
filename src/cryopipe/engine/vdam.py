"""Gradient-driven optimisation (RELION's VDAM, ``--grad``): the schedules and the update rule.

Same E-step and the same sufficient statistics as EM (``data = Σ w·C·X/σ²``, ``weight = Σ w·C²/σ²`` per
class-frame Fourier coefficient, accumulated separately for two *pseudo-halfsets* of particles); only the update
differs. Re-derived from RELION 5 (``MlOptimiser::updateSubsetSize``, ``updateStepSize``, ``updateTau2Fudge``;
``BackProjector::reweightGrad``, ``getFristMoment``, ``getSecondMoment``, ``applyMomenta``, ``reconstructGrad``):

* schedule over ``--iter`` mini-batch iterations: ``ini = iter·0.3`` iterations at the initial subset size, then a
  linear ramp over ``inbetween = iter − ini − fin`` to the final size (``fin = iter·0.2``);
* step size ``s·inflate·σ + s·(1 − σ)`` with the decreasing sigmoid ``σ = 1/(10^((x − b − a/2)/(a/4)) + 1)``,
  ``a = inbetween/2``, ``b = ini`` (``inflate = 0.9/s``: starts at 0.9); per class ``s_k = s·(1 − e^{−(3K+10)·pdf_k})``;
* ``tau2_fudge`` rises from 1 to ``T`` with the same sigmoid over ``a = inbetween/4``;
* gradient per pseudo-half ``g_h = (data_h − weight_h·F) / max(1, weight_h)``; first moments
  ``m1_h ← 0.9·m1_h + 0.1·g_h`` (first: ``g_h``); second moment (from 1)
  ``m2 ← 0.999·m2 + 0.001·|g₂ − g₁|²/(|(g₁ + g₂)/2|² + 1e-12)``; direction ``g = mean_h(m1_h)/√m2``; per shell
  mean amplitudes ``N = ⟨|m1₁ − m1₂|⟩``, ``A = ⟨|F|⟩``, ``snr = 2T·A/N``, ``f = snr/(1 + snr)``; update
  ``F ← F + s_k·(f·g − (1 − f)·F)``.

The optimisers mix the particle-level estimates of each mini-batch (noise spectra, class and offset priors, norm
and scale) into the model with RELION's momentum ``--mu 0.9`` (:data:`cryopipe.engine.stream.GRAD_MODEL_MOMENTUM`).
Inactive classes are replaced by copies of the class that still changes most (``--class_inactivity_threshold``,
:meth:`GradUpdate.replace_inactive_class`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GradSchedule", "default_subset_sizes", "subset_size", "step_size", "tau2_fudge_value", "class_step",
           "GradUpdate", "initial_model_rule", "grad_star_values"]


@dataclass(frozen=True)
class GradSchedule:
    """Iteration phases of a gradient run of ``n_iter`` iterations (RELION ``--grad_ini_frac/--grad_fin_frac``)."""

    n_iter: int
    ini_frac: float = 0.3
    fin_frac: float = 0.2

    @property
    def ini_iter(self) -> int:
        return int(self.n_iter * self.ini_frac)

    @property
    def fin_iter(self) -> int:
        return int(self.n_iter * self.fin_frac)

    @property
    def inbetween_iter(self) -> int:
        return self.n_iter - self.ini_iter - self.fin_iter


def default_subset_sizes(n_particles: int, kind: str = "2d") -> tuple[int, int]:
    """RELION's default (initial, final) mini-batch sizes: ``"2d"`` clamp(0.005·N, 200, 10000) /
    clamp(0.05·N, 1000, 100000); ``"initial_model"`` clamp(0.005·N, 200, 5000) / clamp(0.1·N, 1000, 50000);
    ``"3d"`` (classification/refinement) clamp(0.1·N, 200, 100000) / clamp(0.1·N, 1000, 100000)."""
    def clamp(x, lo, hi):
        return int(min(max(x, lo), hi))

    N = float(n_particles)
    if kind == "2d":
        return clamp(0.005 * N, 200, 10000), clamp(0.05 * N, 1000, 100000)
    if kind == "initial_model":
        return clamp(0.005 * N, 200, 5000), clamp(0.1 * N, 1000, 50000)
    if kind == "3d":
        return clamp(0.1 * N, 200, 100000), clamp(0.1 * N, 1000, 100000)
    raise ValueError(f"kind must be '2d', 'initial_model' or '3d', not {kind!r}")


def subset_size(iteration: int, schedule: GradSchedule, ini_subset: int, fin_subset: int, n_particles: int,
                grad_em_iters: int = 0) -> int:
    """Mini-batch size of ``iteration`` (1-based), or −1 for all particles (RELION ``updateSubsetSize``, non
    auto-refine branch): the last ``grad_em_iters`` iterations, and any size ``>= n_particles``, use all."""
    ini, mid = schedule.ini_iter, schedule.inbetween_iter
    if iteration < ini:
        s = ini_subset
    elif iteration < ini + mid:
        s = ini_subset + round((iteration - ini) / mid * (fin_subset - ini_subset))
    else:
        s = fin_subset
    if schedule.n_iter - iteration < grad_em_iters or s >= n_particles:
        return -1
    return int(s)


def _sigmoid(x: float, a: float, b: float) -> float:
    a = max(a, 1e-9)
    z = (x - b - a / 2.0) / (a / 4.0)
    if z > 300:
        return 0.0
    return 1.0 / (10.0 ** z + 1.0)


def step_size(iteration: int, schedule: GradSchedule, base: float | None = None, kind: str = "2d",
              scheme: str | None = None) -> float:
    """Step size of ``iteration`` (RELION ``updateStepSize``): base 0.3 (2D, 3D classification) or 0.5 (initial
    model); scheme ``"<inflate>-step"`` (default for 2D and initial model, inflate = 0.9/base) or ``"plain"``
    (default for 3D classification)."""
    s = base if base is not None and base > 0 else (0.5 if kind == "initial_model" else 0.3)
    if scheme is None:
        scheme = "plain" if kind == "3d" else f"{0.9 / s}-step"
    if scheme == "plain":
        return s
    if not scheme.endswith("-step"):
        raise ValueError(f"step-size scheme must be 'plain' or '<inflate>-step', not {scheme!r}")
    inflate = float(scheme[:-5])
    sig = _sigmoid(float(iteration), schedule.inbetween_iter / 2.0, float(schedule.ini_iter))
    return s * inflate * sig + s * (1.0 - sig)


def tau2_fudge_value(iteration: int, schedule: GradSchedule, T: float | None = None, kind: str = "2d",
                     scheme: str | None = None) -> float:
    """``tau2_fudge`` of ``iteration`` (RELION ``updateTau2Fudge``): default T = 4; scheme ``"<T>-step"`` (2D and
    initial model: rises from 1 to T) or ``"plain"`` (3D classification)."""
    t = T if T is not None and T > 0 else 4.0
    if scheme is None:
        scheme = "plain" if kind == "3d" else f"{t}-step"
    if scheme == "plain":
        return t
    deflate = float(scheme[:-5])
    sig = _sigmoid(float(iteration), schedule.inbetween_iter / 4.0, float(schedule.ini_iter))
    return (t / deflate) * sig + t * (1.0 - sig)


def class_step(step: float, pdf_class: torch.Tensor) -> torch.Tensor:
    """Per-class step ``step·(1 − exp(−(3K + 10)·pdf_k))`` (small classes move slowly)."""
    K = pdf_class.numel()
    return step * (1.0 - torch.exp(-(3.0 * K + 10.0) * pdf_class.to(torch.float64)))


class GradUpdate:
    """The VDAM update rule for the engine's optimisers (``needs_halves``: the statistics come per pseudo-half).

    Call with ``data [2, K, P]`` (complex), ``weight [2, K, P]``, the current references ``[K, P]`` (same
    coefficient set, prefix of the largest set seen: momenta persist while the resolution grows), ``tau2``,
    ``shell [P]``, the current ``tau2_fudge``, ``pdf_class [K]`` and the iteration number.
    """

    name = "grad"
    needs_halves = True

    def __init__(self, schedule: GradSchedule, base_step: float | None = None, kind: str = "2d",
                 T: float | None = None, ini_subset: int | None = None, fin_subset: int | None = None,
                 grad_em_iters: int = 0, class_inactivity_threshold: float = 0.0):
        self.schedule = schedule
        self.base_step = base_step
        self.kind = kind
        self.T = T
        self.ini_subset = ini_subset
        self.fin_subset = fin_subset
        self.grad_em_iters = grad_em_iters
        self.class_inactivity_threshold = float(class_inactivity_threshold)
        self.last_error: torch.Tensor | None = None  # [K] mean |update direction|² of the last call
        self.m1: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def subset_size(self, iteration: int, n_particles: int) -> int:
        ini, fin = default_subset_sizes(n_particles, self.kind)
        ini = self.ini_subset or ini
        fin = self.fin_subset or fin
        return subset_size(iteration, self.schedule, ini, fin, n_particles, self.grad_em_iters)

    def tau2_fudge(self, iteration: int) -> float:
        return tau2_fudge_value(iteration, self.schedule, self.T, self.kind)

    def step(self, iteration: int) -> float:
        return step_size(iteration, self.schedule, self.base_step, self.kind)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The momenta (``m1 [2, K, P]`` complex, ``m2 [K, P]``, ``fresh [K, P]``) on the CPU, to save with a run's
        files so that a continued run goes on exactly (empty before the first update)."""
        if self.m1 is None:
            return {}
        return {"m1": self.m1.detach().cpu().clone(), "m2": self.m2.detach().cpu().clone(),
                "fresh": self._fresh.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device=None) -> None:
        """Restore momenta saved by :meth:`state_dict` (an empty dict: none yet)."""
        if not state:
            self.m1 = self.m2 = None
            return
        dev = torch.device(device) if device is not None else state["m1"].device
        self.m1 = state["m1"].to(dev).clone()
        self.m2 = state["m2"].to(dev).clone()
        self._fresh = state["fresh"].to(dev).clone()

    def _momenta(self, K: int, P: int, dev, dtype) -> None:
        if self.m1 is None or self.m1.shape[1] != K or self.m1.device != dev:
            self.m1 = torch.zeros(2, K, P, dtype=dtype, device=dev)
            self.m2 = torch.ones(K, P, dtype=torch.float64, device=dev)
            self._fresh = torch.ones(K, P, dtype=torch.bool, device=dev)
        elif self.m1.shape[2] < P:
            extra = P - self.m1.shape[2]
            self.m1 = torch.cat([self.m1, torch.zeros(2, K, extra, dtype=self.m1.dtype, device=dev)], dim=2)
            self.m2 = torch.cat([self.m2, torch.ones(K, extra, dtype=torch.float64, device=dev)], dim=1)
            self._fresh = torch.cat([self._fresh, torch.ones(K, extra, dtype=torch.bool, device=dev)], dim=1)

    def __call__(self, data: torch.Tensor, weight: torch.Tensor, current: torch.Tensor, tau2: torch.Tensor,
                 shell: torch.Tensor, tau2_fudge: float, minres_map: int, r_max: int, pdf_class: torch.Tensor,
                 iteration: int) -> torch.Tensor:
        if data.dim() != 3 or data.shape[0] != 2:
            raise ValueError("GradUpdate needs statistics of two pseudo-halves: data [2, K, P]")
        _, K, P = data.shape
        dev = data.device
        self._momenta(K, P, dev, torch.complex128)
        F = current.to(torch.complex128)
        w = weight.to(torch.float64)
        g = (data.to(torch.complex128) - w * F[None]) / torch.clamp(w, min=1.0)  # [2, K, P]
        m1 = self.m1[:, :, :P]
        fresh = self._fresh[:, :P]
        m1 = torch.where(fresh[None], g, 0.9 * m1 + 0.1 * g)
        diff = (g[1] - g[0]).abs().square()
        mean = ((g[0] + g[1]) / 2).abs().square()
        m2 = 0.999 * self.m2[:, :P] + 0.001 * diff / (mean + 1e-12)  # starts from 1 (RELION's Igrad2)
        self.m1[:, :, :P] = m1
        self.m2[:, :P] = m2
        self._fresh[:, :P] = False
        direction = (m1[0] + m1[1]) / 2 / (torch.sqrt(m2) + 1e-12)
        self.last_error = direction.abs().square().mean(dim=1)  # per class: how much it still has to move
        # per-shell "FSC" from the momentum noise and the reference power
        sh = shell.to(dev)
        ns = int(sh.max()) + 1
        cnt = torch.zeros(ns, dtype=torch.float64, device=dev).index_add_(0, sh, torch.ones(P, dtype=torch.float64,
                                                                                            device=dev))
        noise = torch.zeros(K, ns, dtype=torch.float64, device=dev).index_add_(
            1, sh, (m1[1] - m1[0]).abs()) / cnt.clamp_min(1)  # mean amplitudes, as RELION
        power = torch.zeros(K, ns, dtype=torch.float64, device=dev).index_add_(1, sh, F.abs()) / cnt.clamp_min(1)
        snr = torch.where(noise > 0, 2.0 * tau2_fudge * power / noise.clamp_min(1e-300), torch.zeros_like(noise))
        # RELION floors this estimate with the FSC of true half-sets (rlnFourierShellCorrelation), which are zero
        # without --split_random_halves; the two pseudo-halves share the reference, so their FSC is no floor
        f_shell = (snr / (1.0 + snr)).clamp(0.0, 1.0)  # [K, ns]
        self.last_fsc = f_shell  # the per-shell FSC estimate of the update (resolution bookkeeping)
        f = f_shell[:, sh]  # [K, P]
        step_k = class_step(self.step(iteration), pdf_class.to(dev))[:, None]
        new = F + step_k * (f * direction - (1.0 - f) * F)  # RELION sets T := 1 once f is estimated
        new = torch.where((sh <= r_max)[None], new, torch.zeros((), dtype=new.dtype, device=dev))
        return new.to(current.dtype)

    def replace_inactive_class(self, pdf_class: torch.Tensor, iteration: int) -> tuple[int, int] | None:
        """RELION's ``--class_inactivity_threshold`` (re-derived): in the in-between phase of the schedule, the
        active class (``pdf > 0``) with the smallest ``pdf_class`` (the model's, before this iteration's update)
        is replaced when ``pdf < threshold / n_active``, by a copy of the class with the largest error
        ``pdf_k·mean|update direction_k|²`` of the last call. The momenta are copied here (the first pseudo-half's
        first moment damped by 0.9); the caller copies the reference, ``pdf_class`` and τ². Returns
        ``(dropped, source)`` (0-based) or None."""
        thr = self.class_inactivity_threshold
        ini, mid = self.schedule.ini_iter, self.schedule.inbetween_iter
        if thr <= 0 or self.last_error is None or self.m1 is None or not (ini < iteration < ini + mid):
            return None
        pdf = torch.as_tensor(pdf_class, dtype=torch.float64).cpu()
        active = pdf > 0
        n_active = int(active.sum())
        if n_active < 2:
            return None
        drop = int(torch.argmin(torch.where(active, pdf, torch.full_like(pdf, math.inf))))
        if float(pdf[drop]) >= thr / n_active:
            return None
        err = self.last_error.detach().cpu().to(torch.float64) * pdf
        err[drop] = -math.inf
        src = int(torch.argmax(err))
        if not float(err[src]) > 0:
            return None
        self.m1[:, drop] = self.m1[:, src]
        self.m1[0, drop] *= 0.9
        self.m2[drop] = self.m2[src]
        self._fresh[drop] = self._fresh[src]
        return drop, src


def initial_model_rule(n_iter: int, tau2_fudge: float, options: dict) -> GradUpdate:
    """The gradient rule of an ``initialmodel`` run of ``n_iter`` iterations (RELION's VDAM schedule; ``options``:
    ``ini_frac``, ``fin_frac``, ``base_step``, ``ini_subset``, ``fin_subset``, ``grad_em_iters``)."""
    sched = GradSchedule(int(n_iter), float(options.get("ini_frac", 0.3)), float(options.get("fin_frac", 0.2)))
    return GradUpdate(sched, options.get("base_step"), kind="initial_model", T=float(tau2_fudge),
                      ini_subset=options.get("ini_subset"), fin_subset=options.get("fin_subset"),
                      grad_em_iters=int(options.get("grad_em_iters", 0) or 0))


def grad_star_values(rule: GradUpdate, it: int, n: int, momenta: str, write_iter: int, symmetry: str) -> dict:
    """The optimiser.star values of a gradient run at iteration ``it`` over ``n`` particles (RELION's rlnGrad* /
    rlnSgd* fields, plus cryopipe's momenta file, write interval and requested symmetry)."""
    ini, fin = default_subset_sizes(n, rule.kind)
    return {
        "rlnGradCurrentStepsize": float(rule.step(max(it, 1))),
        "rlnSgdStepsize": float(rule.base_step) if rule.base_step else -1.0,
        "rlnSgdInitialIterationsFraction": float(rule.schedule.ini_frac),
        "rlnSgdFinalIterationsFraction": float(rule.schedule.fin_frac),
        "rlnSgdInitialSubsetSize": int(rule.ini_subset or ini),
        "rlnSgdFinalSubsetSize": int(rule.fin_subset or fin),
        "rlnSgdSubsetSize": int(rule.subset_size(max(it, 1), n)),
        "rlnGradEmIters": int(rule.grad_em_iters),
        "rlnGradHasConverged": 0,
        "cryopipeGradMomentaFile": momenta,
        "cryopipeGradWriteIter": int(write_iter),
        "cryopipeRequestedSymmetry": symmetry,
    }
