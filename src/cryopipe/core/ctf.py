"""Contrast transfer function exactly as RELION (``src/ctf.cpp`` ``CTF::initialise``, ``src/ctf.h`` ``getCTF``).

Formula (units: Å, Å⁻¹, degrees at the API, kV, mm):

* electron wavelength ``λ = 12.2643247 / sqrt(V·(1 + 0.978466e-6·V))`` Å with ``V`` in volts;
* defocus along the direction ``θ = atan2(ky, kx)`` of the frequency (angle from +x, counter-clockwise towards +y):
  ``Δf(θ) = ΔfU·cos²(θ−θa) + ΔfV·sin²(θ−θa)``, ``θa`` = rlnDefocusAngle; positive defocus = underfocus;
* ``γ(k) = −π·λ·Δf(θ)·k² + (π/2)·Cs·λ³·k⁴ − φ − atan(Q0/sqrt(1−Q0²))``, Cs in Å (mm × 1e7),
  ``φ`` = rlnPhaseShift (degrees → radians), ``Q0`` = rlnAmplitudeContrast;
* ``CTF(k) = −sin(γ)·exp(−B·k²/4)·scale`` (B = rlnCtfBfactor, scale = rlnCtfScalefactor), so ``CTF(0) = +Q0``
  without phase shift.

Grids: :func:`ctf_2d` is evaluated on the half-complex grid of :mod:`cryopipe.core.fourier` (``[n, n//2+1]``; a
frequency of ``(kx, ky)`` Fourier pixels is ``(kx, ky) / (n · pixel_size)`` Å⁻¹), matching RELION's
``CTF::getFftwImage`` for a square box. Internally computed in float64 (float32 on devices without float64);
outputs are float32 on the parameters' device. On the grid, ``γ`` is evaluated as a product of per-image
coefficients ``[B, 5]`` with the per-pixel basis ``(k², kx²−ky², 2·kx·ky, k⁴, 1)`` (Fourier pixels; the pixel
size is folded into the coefficients), i.e. the same terms as the formula above.
"""

from __future__ import annotations

import math

import torch

from cryopipe.core.device import resolve_device
from cryopipe.core.fourier import freq_grid_2d
from cryopipe.errors import CryopipeError

__all__ = [
    "wavelength_A",
    "ctf_gamma",
    "ctf_at",
    "ctf_2d",
    "ctf_1d",
    "first_peak_mask",
    "beam_tilt_phase",
    "zernike_index_to_mn",
    "zernike_cartesian",
    "zernike_phase",
    "beam_tilt_zernike",
]

_PARAM_NAMES = (
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "voltage",
    "cs",
    "amplitude_contrast",
    "phase_shift",
    "bfactor",
    "scale",
)


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _find_device(values, device) -> torch.device:
    if device is not None:
        return resolve_device(device)
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return resolve_device(None)


def _as_compute(v, device, dtype) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype)
    return t.to(device=device, dtype=dtype)


def _params(values: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Convert parameters to tensors of ``dtype`` on ``device`` and check their physical ranges."""
    out = {}
    for name, v in values.items():
        # numbers / NumPy arrays go straight to the compute dtype (no float32 rounding on the way)
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype)
        out[name] = t.to(device=device, dtype=dtype)
    if "voltage" in out and bool((out["voltage"] <= 0).any()):
        raise CryopipeError(
            f"CTF: voltage must be > 0 kV (got min {float(out['voltage'].min()):g}); check rlnVoltage"
        )
    if "amplitude_contrast" in out:
        q = out["amplitude_contrast"]
        if bool(((q < 0) | (q > 1)).any()):
            raise CryopipeError(
                "CTF: amplitude contrast Q0 must be in [0, 1] "
                f"(got {float(q.min()):g}..{float(q.max()):g}); check rlnAmplitudeContrast"
            )
    return out


def wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (RELION's constants).

    Accepts a number (returns a float) or a tensor (returns a tensor of the same dtype/device).
    """
    if isinstance(voltage_kV, torch.Tensor):
        v = voltage_kV * 1e3
        return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))
    v = float(voltage_kV) * 1e3
    if v <= 0:
        raise CryopipeError(f"CTF: voltage must be > 0 kV (got {voltage_kV}); check rlnVoltage")
    return 12.2643247 / math.sqrt(v * (1.0 + v * 0.978466e-6))


def _gamma(kx, ky, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, k²) for frequencies in Å⁻¹; all tensors broadcast together."""
    lam = wavelength_A(p["voltage"])
    k2 = kx * kx + ky * ky
    a = torch.deg2rad(p["defocus_angle"])
    avg = 0.5 * (p["defocus_u"] + p["defocus_v"])
    dev = 0.5 * (p["defocus_u"] - p["defocus_v"])
    # Δf(θ)·k² = avg·k² + dev·cos(2(θ−θa))·k², with cos(2θ)k² = kx²−ky², sin(2θ)k² = 2·kx·ky
    dfk2 = avg * k2 + dev * ((kx * kx - ky * ky) * torch.cos(2 * a) + 2.0 * kx * ky * torch.sin(2 * a))
    q0 = p["amplitude_contrast"]
    k3 = torch.atan2(q0, torch.sqrt(torch.clamp(1.0 - q0 * q0, min=0.0)))
    gamma = (
        -math.pi * lam * dfk2
        + (math.pi / 2.0) * (p["cs"] * 1e7) * lam**3 * k2 * k2
        - torch.deg2rad(p["phase_shift"])
        - k3
    )
    return gamma, k2


def ctf_gamma(
    kx_per_A,
    ky_per_A,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage=300.0,
    cs=2.7,
    amplitude_contrast=0.1,
    phase_shift=0.0,
) -> torch.Tensor:
    """Phase ``γ`` (radians) of the CTF at frequencies ``(kx, ky)`` in Å⁻¹; every argument broadcasts.

    Returned in the compute dtype (float64 on CPU/CUDA) on the inputs' device.
    """
    vals = dict(zip(_PARAM_NAMES[:7], (defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast,
                                       phase_shift)))
    device = _find_device([kx_per_A, ky_per_A, *vals.values()], None)
    dtype = _compute_dtype(device)
    p = _params(vals, device, dtype)
    kx = _as_compute(kx_per_A, device, dtype)
    ky = _as_compute(ky_per_A, device, dtype)
    return _gamma(kx, ky, p)[0]


def _ctf_from_gamma(gamma, k2, p, intact, abs_value, phase_flip):
    ctf = -torch.sin(gamma)
    if intact is not None:
        ctf = torch.where(intact, torch.ones_like(ctf), ctf)
    ctf = ctf * torch.exp(-0.25 * p["bfactor"] * k2)
    if abs_value:
        ctf = ctf.abs()
    elif phase_flip:
        ctf = torch.where(ctf < 0, -torch.ones_like(ctf), torch.ones_like(ctf))
    return ctf * p["scale"]


def ctf_at(
    kx_per_A,
    ky_per_A,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage=300.0,
    cs=2.7,
    amplitude_contrast=0.1,
    phase_shift=0.0,
    bfactor=0.0,
    scale=1.0,
) -> torch.Tensor:
    """CTF value at arbitrary frequencies ``(kx, ky)`` (Å⁻¹); every argument broadcasts. Float32 output."""
    vals = dict(zip(_PARAM_NAMES, (defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast,
                                   phase_shift, bfactor, scale)))
    device = _find_device([kx_per_A, ky_per_A, *vals.values()], None)
    dtype = _compute_dtype(device)
    p = _params(vals, device, dtype)
    kx = _as_compute(kx_per_A, device, dtype)
    ky = _as_compute(ky_per_A, device, dtype)
    gamma, k2 = _gamma(kx, ky, p)
    return _ctf_from_gamma(gamma, k2, p, None, False, False).to(torch.float32)


def _batched_params(values: dict, device, dtype) -> tuple[dict[str, torch.Tensor], int]:
    """Parameters as ``[B, 1, 1]`` tensors (scalars broadcast to the common batch size ``B``)."""
    p = _params(values, device, dtype)
    flat = {k: v.reshape(-1) for k, v in p.items()}
    sizes = {v.numel() for v in flat.values()} - {1}
    if len(sizes) > 1:
        shapes = {k: tuple(v.shape) for k, v in p.items() if v.numel() != 1}
        raise CryopipeError(f"CTF: parameter batch sizes differ {shapes}; give scalars or [B] tensors of one size")
    b = sizes.pop() if sizes else 1
    return {k: v.expand(b).reshape(b, 1, 1) for k, v in flat.items()}, b


def _grid_per_A(n: int, pixel_size: torch.Tensor, device, dtype):
    if n < 2:
        raise CryopipeError(f"CTF: box size must be >= 2 pixels (got {n})")
    if bool((pixel_size <= 0).any()):
        raise CryopipeError(f"CTF: pixel size must be > 0 Å (got {pixel_size.min().item():g}); check the optics table")
    kx, ky = freq_grid_2d(n, device=device, dtype=dtype)
    scale = 1.0 / (n * pixel_size)
    return kx * scale, ky * scale


def ctf_2d(
    n: int,
    pixel_size,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage=300.0,
    cs=2.7,
    amplitude_contrast=0.1,
    phase_shift=0.0,
    bfactor=0.0,
    scale=1.0,
    *,
    intact_until_first_peak: bool = False,
    abs_value: bool = False,
    phase_flip: bool = False,
    device=None,
) -> torch.Tensor:
    """CTF on the half-complex grid ``[B, n, n//2+1]`` of an ``n × n`` image (float32).

    ``pixel_size`` (Å) and every CTF parameter are numbers or ``[B]`` tensors (Å, degrees, kV, mm, Å²); scalars
    broadcast to the batch. Output on the tensors' device (or ``device`` / the default device when all are numbers).

    Options as RELION's ``getCTF``: ``intact_until_first_peak`` sets the CTF to 1 (before B-factor and scale)
    below the first peak (see :func:`first_peak_mask`, radial rule); ``abs_value`` gives ``|CTF|``;
    ``phase_flip`` gives ``sign(CTF)·scale`` (±1, no envelope).
    """
    vals = dict(zip(_PARAM_NAMES, (defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast,
                                   phase_shift, bfactor, scale)))
    vals["pixel_size"] = pixel_size
    dev = _find_device(vals.values(), device)
    dtype = _compute_dtype(dev)
    p, b = _batched_params(vals, dev, dtype)
    if n < 2:
        raise CryopipeError(f"CTF: box size must be >= 2 pixels (got {n})")
    if bool((p["pixel_size"] <= 0).any()):
        raise CryopipeError(
            f"CTF: pixel size must be > 0 Å (got {p['pixel_size'].min().item():g}); check the optics table"
        )
    # γ = c·(k², kx²−ky², 2·kx·ky, k⁴, 1) with per-image coefficients c [B, 5] and the per-pixel basis [5, G]
    # (Fourier pixels): one small matrix product instead of ~20 full-size float64 passes
    basis = _gamma_basis(n, dev, dtype)
    s2 = 1.0 / (n * p["pixel_size"].reshape(b)) ** 2  # (Å⁻¹ per Fourier pixel)²
    ctf = torch.sin_(torch.neg(_gamma_coefficients(p, s2)) @ basis)  # −sin(γ) = sin(−γ), [B, G], in place
    if intact_until_first_peak:
        kx, ky = _grid_per_A(n, p["pixel_size"], dev, dtype)
        intact = _first_peak_from_gamma_params(kx, ky, p).reshape(b, -1)
        ctf = torch.where(intact, torch.ones_like(ctf), ctf)
    ctf = ctf.view(b, n, n // 2 + 1)
    bf = p["bfactor"].reshape(b)
    if bool((bf != 0).any()):  # exp(0) = 1 exactly: skipping it changes nothing
        # exp(−B·k²/4) = exp(−B·kx²/4)·exp(−B·ky²/4): B·(n + n//2 + 1) exponentials instead of B·n·(n//2+1)
        kx, ky = freq_grid_2d(n, device=dev, dtype=dtype)
        a = (-0.25 * bf * s2)[:, None]
        ctf = ctf * torch.exp(a * (ky[:, 0] ** 2))[:, :, None]
        ctf.mul_(torch.exp(a * (kx[0] ** 2))[:, None, :])
    if abs_value:
        ctf = ctf.abs()
    elif phase_flip:
        ctf = torch.where(ctf < 0, -torch.ones_like(ctf), torch.ones_like(ctf))
    scale = p["scale"].reshape(b)
    if bool((scale != 1).any()):
        ctf = ctf * scale[:, None, None]
    return ctf.to(torch.float32)


def _gamma_basis(n: int, device, dtype) -> torch.Tensor:
    """Basis ``[5, G]`` = (k², kx²−ky², 2·kx·ky, k⁴, 1) of γ on the half-complex grid (``G = n·(n//2+1)``,
    Fourier pixels)."""
    kx, ky = freq_grid_2d(n, device=device, dtype=dtype)
    kx, ky = kx.reshape(-1), ky.reshape(-1)
    k2 = kx * kx + ky * ky
    return torch.stack([k2, kx * kx - ky * ky, 2.0 * kx * ky, k2 * k2, torch.ones_like(k2)])


def _gamma_coefficients(p: dict[str, torch.Tensor], s2: torch.Tensor) -> torch.Tensor:
    """Per-image coefficients ``[B, 5]`` of γ on the basis of :func:`_gamma_basis` (``s2`` ``[B]``: squared
    frequency step in Å⁻² per Fourier pixel²); the same formula as :func:`_gamma`, term by term."""
    b = s2.numel()
    q = {k: v.reshape(b) for k, v in p.items()}
    lam = wavelength_A(q["voltage"])
    a = torch.deg2rad(q["defocus_angle"])
    avg = 0.5 * (q["defocus_u"] + q["defocus_v"])
    dev = 0.5 * (q["defocus_u"] - q["defocus_v"])
    q0 = q["amplitude_contrast"]
    k3 = torch.atan2(q0, torch.sqrt(torch.clamp(1.0 - q0 * q0, min=0.0)))
    c = -math.pi * lam * s2
    return torch.stack([
        c * avg,
        c * dev * torch.cos(2 * a),
        c * dev * torch.sin(2 * a),
        (math.pi / 2.0) * (q["cs"] * 1e7) * lam**3 * s2 * s2,
        -torch.deg2rad(q["phase_shift"]) - k3,
    ], dim=1)


def ctf_1d(
    k_per_A,
    defocus,
    voltage=300.0,
    cs=2.7,
    amplitude_contrast=0.1,
    phase_shift=0.0,
    bfactor=0.0,
    scale=1.0,
) -> torch.Tensor:
    """Radial (non-astigmatic) CTF at spatial frequencies ``k_per_A`` (Å⁻¹) for a defocus in Å (float32).

    All arguments broadcast, e.g. ``k[None, :]`` with ``defocus[:, None]`` gives ``[B, K]`` curves.
    """
    return ctf_at(k_per_A, 0.0, defocus, defocus, 0.0, voltage, cs, amplitude_contrast, phase_shift, bfactor, scale)


def _smallest_positive_root(bq: torch.Tensor, a: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """Smallest u > 0 with ``bq·u² − a·u + c0 = 0`` (``bq ≥ 0``); +inf when there is none. Numerically stable."""
    inf = torch.full_like(a, math.inf)
    disc = a * a - 4.0 * bq * c0
    ok = disc >= 0
    sq = torch.sqrt(torch.clamp(disc, min=0.0))
    sgn = torch.where(a >= 0, torch.ones_like(a), -torch.ones_like(a))
    q = 0.5 * (a + sgn * sq)  # |q| is the larger magnitude of (a ± sq)/2
    r1 = torch.where(bq > 0, q / torch.where(bq > 0, bq, torch.ones_like(bq)), inf)
    r2 = torch.where(q != 0, c0 / torch.where(q != 0, q, torch.ones_like(q)), inf)
    r1 = torch.where(ok & (r1 > 0), r1, inf)
    r2 = torch.where(ok & (r2 > 0), r2, inf)
    return torch.minimum(r1, r2)


def _first_peak_from_gamma_params(kx, ky, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boolean mask of frequencies strictly inside the first CTF peak along their own radial direction."""
    lam = wavelength_A(p["voltage"])
    k2 = kx * kx + ky * ky
    a_ang = torch.deg2rad(p["defocus_angle"])
    avg = 0.5 * (p["defocus_u"] + p["defocus_v"])
    dev = 0.5 * (p["defocus_u"] - p["defocus_v"])
    safe_k2 = torch.where(k2 > 0, k2, torch.ones_like(k2))
    cos2 = torch.where(k2 > 0, (kx * kx - ky * ky) / safe_k2, torch.ones_like(k2))
    sin2 = torch.where(k2 > 0, 2.0 * kx * ky / safe_k2, torch.zeros_like(k2))
    defocus = avg + dev * (cos2 * torch.cos(2 * a_ang) + sin2 * torch.sin(2 * a_ang))
    # γ(u) = −A·u + Bq·u² − C with u = k²
    A = math.pi * lam * defocus
    Bq = (math.pi / 2.0) * (p["cs"] * 1e7) * lam**3 * torch.ones_like(A)
    q0 = p["amplitude_contrast"]
    C = torch.deg2rad(p["phase_shift"]) + torch.atan2(q0, torch.sqrt(torch.clamp(1.0 - q0 * q0, min=0.0)))
    C = C * torch.ones_like(A)
    half_pi = math.pi / 2.0
    u_minus = _smallest_positive_root(Bq, A, half_pi - C)  # γ = −π/2
    u_plus = _smallest_positive_root(Bq, A, -(half_pi + C))  # γ = +π/2
    u_first = torch.minimum(u_minus, u_plus)
    return (k2 < u_first) & (C.abs() < half_pi)


def first_peak_mask(
    n: int,
    pixel_size,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage=300.0,
    cs=2.7,
    amplitude_contrast=0.1,
    phase_shift=0.0,
    *,
    pointwise: bool = False,
    device=None,
) -> torch.Tensor:
    """``[B, n, n//2+1]`` bool: True for frequencies below the first CTF peak ("ignore CTFs until first peak").

    Default (radial): a frequency ``k`` in direction ``θ`` is inside when ``|γ(s·θ̂)| < π/2`` for every
    ``0 ≤ s ≤ |k|``, i.e. before the first ``|CTF| = 1`` maximum along that direction (solved analytically from
    the quadratic ``γ(k²)``). ``pointwise=True`` reproduces RELION's ``getCTF`` test ``|γ(k)| < π/2`` literally;
    the two differ only where ``γ`` comes back within ±π/2 at high frequency (tiny pixels or Cs ≈ 0), where
    RELION's rule would wrongly leave high frequencies intact.
    """
    vals = dict(zip(_PARAM_NAMES[:7], (defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast,
                                       phase_shift)))
    vals["pixel_size"] = pixel_size
    dev = _find_device(vals.values(), device)
    dtype = _compute_dtype(dev)
    p, _ = _batched_params(vals, dev, dtype)
    kx, ky = _grid_per_A(n, p["pixel_size"], dev, dtype)
    if pointwise:
        gamma, _ = _gamma(kx, ky, p)
        return gamma.abs() < math.pi / 2.0
    return _first_peak_from_gamma_params(kx, ky, p)


def beam_tilt_phase(kx_per_A, ky_per_A, beam_tilt_x_mrad, beam_tilt_y_mrad, voltage=300.0, cs=2.7
                    ) -> torch.Tensor:
    """Antisymmetric phase error (radians) of a beam tilt at frequencies ``(kx, ky)`` (Å⁻¹), RELION's
    ``selfApplyBeamTilt`` (rlnBeamTiltX/Y in mrad, Cs in mm, voltage in kV):

    ``φ(k) = 2π·Cs·λ²·|k|²·(kx·τx + ky·τy)`` with ``τ = beam tilt / 1000`` (radians) and Cs in Å, i.e. RELION's
    ``0.360·Cs·1e7·λ²/L³·(i² + j²)·(i·τy + j·τx)`` degrees for Fourier pixels ``(j, i)`` of an ``L`` Å box.
    The image of a tilted beam is the untilted one with its FT multiplied by ``exp(i·φ)`` (the phase is odd in
    ``k``, so a real image stays real). Every argument broadcasts; differentiable in the beam tilt; float64 (the
    dtype of the inputs if they are tensors of another floating dtype)."""
    lam = wavelength_A(voltage if not isinstance(voltage, torch.Tensor) else voltage.to(torch.float64))
    tensors = [t for t in (kx_per_A, ky_per_A, beam_tilt_x_mrad, beam_tilt_y_mrad) if isinstance(t, torch.Tensor)]
    dtype = tensors[0].dtype if tensors and tensors[0].is_floating_point() else torch.float64
    device = tensors[0].device if tensors else None
    kx, ky, tx, ty = (t.to(dtype) if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=dtype, device=device)
                      for t in (kx_per_A, ky_per_A, beam_tilt_x_mrad, beam_tilt_y_mrad))
    factor = 2.0 * math.pi * float(cs) * 1e7 * lam * lam * 1e-3
    return factor * (kx * kx + ky * ky) * (kx * tx + ky * ty)


def zernike_index_to_mn(index: int, odd: bool) -> tuple[int, int]:
    """``(m, n)`` of RELION's ``index``-th odd or even Zernike coefficient (``Zernike::oddIndexToMN`` /
    ``evenIndexToMN``): odd (1,−1), (1,1), (3,−3), (3,−1), (3,1), (3,3), (5,−5) …; even (0,0), (2,−2), (2,0), (2,2),
    (4,−4) …"""
    if odd:
        k = int((math.sqrt(1 + 4 * index) - 1.0) / 2.0)
        n = 2 * k + 1
        return 2 * (index - k * k - k) - n, n
    k = int(math.sqrt(index))
    return 2 * (index - k * k - k), 2 * k


def zernike_cartesian(m: int, n: int, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """RELION's unnormalised Zernike polynomial ``Z_n^m`` at ``(kx, ky)`` (``Zernike::Z_cart``: ``R_n^|m|(ρ)·cos(mφ)``
    for ``m ≥ 0``, ``R_n^|m|(ρ)·sin(|m|φ)`` for ``m < 0``; no unit-disk scaling), written as a polynomial in ``kx, ky``
    (``ρ^|m|·e^{i|m|φ} = (kx + i·ky)^|m|``), so it is smooth and differentiable everywhere."""
    a = abs(m)
    rho2 = kx * kx + ky * ky
    radial = torch.zeros_like(rho2)
    for j in range((n - a) // 2 + 1):  # R_n^a(ρ) = ρ^a · Σ_j c_j ρ^(n−a−2j)
        c = (-1) ** j * math.factorial(n - j) / (math.factorial(j) * math.factorial((n + a) // 2 - j)
                                                  * math.factorial((n - a) // 2 - j))
        radial = radial + c * rho2 ** ((n - a) // 2 - j)
    re, im = torch.ones_like(kx), torch.zeros_like(kx)
    for _ in range(a):
        re, im = re * kx - im * ky, re * ky + im * kx
    return radial * (re if m >= 0 else im)


def zernike_phase(kx_per_A: torch.Tensor, ky_per_A: torch.Tensor, coefficients: torch.Tensor, odd: bool
                  ) -> torch.Tensor:
    """Aberration phase (radians) ``Σ_i c_i·Z_i(kx, ky)`` of RELION's odd (rlnOddZernike: antisymmetric, multiplies
    the prediction by ``exp(i·φ)``) or even (rlnEvenZernike: symmetric, added to the CTF phase ``γ``) coefficients
    ``[..., K]`` at frequencies in Å⁻¹ (``ObservationModel::getPhaseCorrection`` / ``getGammaOffset``). The
    frequencies broadcast with ``coefficients[..., i]``; differentiable in both."""
    phase = torch.zeros((), dtype=coefficients.dtype, device=coefficients.device)
    for i in range(coefficients.shape[-1]):
        m, n = zernike_index_to_mn(i, odd)
        phase = phase + coefficients[..., i] * zernike_cartesian(m, n, kx_per_A, ky_per_A)
    return phase


def beam_tilt_zernike(beam_tilt_x_mrad, beam_tilt_y_mrad, voltage=300.0, cs=2.7) -> torch.Tensor:
    """The six odd Zernike coefficients ``[..., 6]`` (RELION's order, :func:`zernike_index_to_mn`) whose phase is
    :func:`beam_tilt_phase` (RELION's ``TiltHelper::insertTilt``): ``φ = K·ρ²·(kx·τx + ky·τy)`` and
    ``ρ²·x = (Z₃¹ + 2·Z₁¹)/3`` (same for y), with ``K`` taken from :func:`beam_tilt_phase` itself."""
    one = torch.ones((), dtype=torch.float64)
    factor = beam_tilt_phase(one, 0.0 * one, 1.0, 0.0, voltage, cs)  # K·τ for τ = 1 mrad at (1, 0) Å⁻¹
    tx = torch.as_tensor(beam_tilt_x_mrad, dtype=torch.float64) * factor
    ty = torch.as_tensor(beam_tilt_y_mrad, dtype=torch.float64) * factor
    zero = torch.zeros_like(tx)
    return torch.stack([2.0 * ty / 3.0, 2.0 * tx / 3.0, zero, ty / 3.0, tx / 3.0, zero], -1)
