"""Conventions of multi-particle refinement checked against *images* (issue 13): the even Zernike phase adds to
RELION's CTF phase ``γ`` (``CTF = −sin(γ + Σ Z_even·c)``, ``ctf.h``), so a pure ``ρ⁴`` term is a change of Cs;
the magnification ``M`` (rlnMagMat) evaluates the slice and CTF at ``M·k`` (``CTF::getCTF``); and the half-maps
rebuilt from such data (:mod:`cryopipe.mpr.reconstruct`) use the same CTF and frequency mapping as the forward
model. Images with the aberrations are the simulated tilt series of test_mpr resampled through ``M``
(:func:`test_mpr_groups._magnified`) and, for the even term, the true images (Cs 2.7 mm) described by metadata with
a smaller Cs plus the equivalent ``ρ⁴`` Zernike term."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from test_mpr import BOX, sim  # noqa: F401  (the module-scoped simulated tilt series)
from test_mpr_groups import _magnified, truth  # noqa: F401

from cryopipe.core.ctf import ctf_gamma, wavelength_A
from cryopipe.mpr.forward import make_band, pair_ctf, zero_parameters
from cryopipe.mpr.optimise import pair_centres, tilt_series_score
from cryopipe.mpr.reconstruct import reconstruct_halves

M_TRUE = torch.tensor([[1.03, 0.07], [-0.07, 0.98]], dtype=torch.float64)  # M ≠ Mᵀ: a 4° rotation part


def _rho4_even(a: float) -> torch.Tensor:
    """RELION's even Zernike coefficients (9) of the pure phase ``a·|k|⁴`` (``a`` in rad·Å⁴, ``k`` in Å⁻¹):
    ``ρ⁴ = Z₄⁰/6 + Z₂⁰/2 + Z₀⁰/3``."""
    return torch.tensor([a / 3, 0, a / 2, 0, 0, 0, a / 6, 0, 0], dtype=torch.float64)


def _cs_equivalent(delta_cs_mm: float, voltage: float) -> float:
    """The ``ρ⁴`` coefficient (rad·Å⁴) of a Cs change of ``delta_cs_mm``: RELION's ``K2 = π/2·Cs·λ³``."""
    return 0.5 * math.pi * delta_cs_mm * 1e7 * wavelength_A(voltage) ** 3


def test_even_zernike_is_a_cs_change_in_the_ctf(truth):  # noqa: F811
    """The model's CTF (:func:`pair_ctf`) with Cs ``2.7 − δ`` and the ``ρ⁴`` term of ``+δ`` equals the CTF of Cs
    2.7 (core/ctf's γ, RELION's ``K2·u⁴``); the sign-flipped term does not."""
    data = truth["data"]
    f = torch.arange(3)
    k = torch.linspace(-0.12, 0.12, 41, dtype=torch.float64)
    kx, ky = k[None, :, None].expand(1, 41, 41), k[None, None, :].expand(1, 41, 41)
    defocus = torch.tensor([[21000.0, 19000.0, 30.0]] * 3, dtype=torch.float64)
    dose = torch.ones(3, 41, 41, dtype=torch.float64)
    delta = 10.0
    even = _rho4_even(_cs_equivalent(delta, data.voltage))
    want = pair_ctf(replace(data, cs=2.7), defocus, f, kx, ky, None, dose)
    lower = replace(data, cs=2.7 - delta)
    assert torch.allclose(pair_ctf(lower, defocus, f, kx, ky, even, dose), want, atol=1e-9)
    assert (pair_ctf(lower, defocus, f, kx, ky, -even, dose) - want).abs().max() > 0.5
    gamma = ctf_gamma(kx, ky, 21000.0, 19000.0, 30.0, data.voltage, 2.7, data.amplitude_contrast)
    assert torch.allclose(want[0], torch.sin(gamma[0]) * data.ctf_scale[0], atol=1e-12)  # −CTF: dark protein


def _score(data, species, k_max):
    band = make_band(data, species, k_max)
    params = zero_parameters(data)
    return float(tilt_series_score(data, species, band, params, (), pair_centres(data)))


def _with_aberrations(data, magnified_images):
    """The true tilt series seen through ``M_TRUE`` and described with Cs ``cs − δ`` + the ``ρ⁴`` term of ``δ``
    (1.5 rad at 14 Å): ``(metadata that know both, the Zernike coefficients)``."""
    a = 1.5 * 14.0 ** 4
    delta = a / _cs_equivalent(1.0, data.voltage)
    even = _rho4_even(a)
    return replace(data, images=magnified_images, mag_matrix=M_TRUE, cs=data.cs - delta, even_zernike=even), even


def test_forward_model_matches_images_with_magnification_and_even_zernike(truth):  # noqa: F811
    """Score (NCC) of the forward model on the magnified images with the right metadata equals (within 2 %) that of
    the undistorted images with the plain metadata; with ``Mᵀ`` instead of ``M``, or the even term's sign flipped,
    it is clearly lower. (When written: 63.3 vs 63.3; Mᵀ −0.8, flipped 47.3; a model evaluating the slice and
    CTF at ``Mᵀ·k`` instead of ``M·k``, positions unchanged, scores 56.8 and fails.)"""
    data, species, k_max = truth["data"], truth["species"], truth["k_max"]
    right, even = _with_aberrations(data, _magnified(data.images, M_TRUE))
    reference = _score(data, species, k_max)
    good = _score(right, species, k_max)
    transposed = _score(replace(right, mag_matrix=M_TRUE.T.contiguous()), species, k_max)
    flipped = _score(replace(right, even_zernike=-even), species, k_max)
    print("NCC reference", reference, "right", good, "M^T", transposed, "even flipped", flipped)
    assert good > 0.98 * reference
    assert transposed < good - 0.1 * reference
    assert flipped < good - 0.1 * reference


def _correlation(a: torch.Tensor, b: torch.Tensor, k_max: float) -> float:
    """Fourier correlation of two maps over ``|k| ≤ k_max`` (Fourier px)."""
    A, B = torch.fft.rfftn(a.double()), torch.fft.rfftn(b.double())
    n = a.shape[-1]
    f = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    h = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)
    inside = (f[:, None, None] ** 2 + f[None, :, None] ** 2 + h[None, None, :] ** 2) <= k_max ** 2
    A, B = A[inside], B[inside]
    return float((A * B.conj()).real.sum() / torch.sqrt((A.abs() ** 2).sum() * (B.abs() ** 2).sum()))


def test_half_maps_use_even_zernike_and_magnified_frequencies(sim, truth):  # noqa: F811
    """Half-maps rebuilt from the magnified images with the right metadata (``M``, Cs − δ + the even ``ρ⁴`` term)
    correlate with the truth (the half-maps of the undistorted images, band ≤ 14 Å) at ≥ 0.99, better than those
    rebuilt ignoring the even term. Measured when written: the reconstruction of 5038980, which ignored the even
    term and ``M·k`` but moved positions by ``Mᵀ``, gave 0.982 for both (this test fails there); now 0.998 and
    0.983. (It does not tell ``M·k`` from ``Mᵀ·k``: that is the forward-model test's job, same helper.)"""
    data, k_max = truth["data"], truth["k_max"]
    right, _ = _with_aberrations(data, _magnified(data.images, M_TRUE))
    truth_map = sim["true_half1"] + sim["true_half2"]
    scores = {}
    for name, d in {"right": right, "no even": replace(right, even_zernike=None)}.items():
        h1, h2, _ = reconstruct_halves([d], BOX, 1.0)
        scores[name] = _correlation(h1 + h2, truth_map, k_max)
    print("correlation with the truth", scores)
    assert scores["right"] > 0.99
    assert scores["right"] > scores["no even"] + 0.008


def test_identity_magnification_and_zero_even_terms_change_nothing(sim, truth):  # noqa: F811
    """The insertion that applies ``M`` and the even phase (identity / zeros) gives the half-maps of the plain
    insertion (tomo.reconstruct_particle) to float32 precision: both use the same CTF, dose weights and mask."""
    data = truth["data"]
    plain = reconstruct_halves([data], BOX, 1.0)
    same = reconstruct_halves([replace(data, mag_matrix=torch.eye(2, dtype=torch.float64),
                                       even_zernike=torch.zeros(9, dtype=torch.float64))], BOX, 1.0)
    for a, b in zip(plain[:2], same[:2]):
        assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max()), float((a - b).abs().max())
