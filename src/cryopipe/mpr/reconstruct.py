"""Half-maps from the tilt series (or particle stacks) at the (refined) parameters of :mod:`cryopipe.mpr`.

The insertion is :func:`cryopipe.tomo.reconstruct_particle.insert_particle_pairs` (cut, −CTF·W premultiplication,
gather insertion into the half set's accumulators; RELION's heuristic division by :func:`finalise_map`), driven
by per-pair positions (image warp, magnification and poses over dose included) and defocus from
:func:`cryopipe.mpr.forward.pair_geometry`, and the data demodulated by their beam-tilt and odd Zernike phase when
they carry them. Data with a magnification ``M`` or even Zernike terms are inserted as the forward model sees
them (:func:`_distorted_ctf_and_matrices`, given to the same insertion): the CTF (even phase added to ``γ``,
:func:`cryopipe.mpr.forward.pair_ctf`) and the aberration phases at the undistorted frequencies ``M·k``, and each
observed pixel ``k`` put at ``Aᵀ·(M·k, 0)`` in the map (the gather matrix ``diag(M⁻¹, 1)·A``).
"""

from __future__ import annotations

import torch

from cryopipe.core.ctf import beam_tilt_phase, zernike_phase
from cryopipe.core.fourier import freq_grid_2d, radius_2d
from cryopipe.core.tilt_geometry import dose_weights
from cryopipe.mpr.forward import (TiltSeriesData, magnified_frequencies, pair_beam_tilt, pair_ctf, pair_geometry,
                                  total_magnification, zero_parameters, zernike_totals)
from cryopipe.tomo.reconstruct_particle import ParticleAccumulator, finalise_map, insert_particle_pairs

__all__ = ["insert_pairs", "reconstruct_halves"]


def _aberration_phase(data: TiltSeriesData, f: torch.Tensor, kA: torch.Tensor, odd: torch.Tensor | None
                      ) -> torch.Tensor | None:
    """Beam-tilt + odd Zernike phase ``[P, b, b//2+1]`` (radians) of tilts ``f`` ``[P]`` at ``kA`` ``[b, b//2+1, 2]``
    (Å⁻¹, undistorted), or None when the data carry neither."""
    phase = None
    if data.beam_tilt is not None:
        bt = pair_beam_tilt(data, zero_parameters(data), f)
        phase = beam_tilt_phase(kA[..., 0], kA[..., 1], bt[:, 0, None, None], bt[:, 1, None, None], data.voltage,
                                data.cs)
    if odd is not None:
        z = zernike_phase(kA[..., 0], kA[..., 1], odd, odd=True).expand(len(f), *kA.shape[:2])
        phase = z if phase is None else phase + z
    return phase


def _distorted_ctf_and_matrices(data: TiltSeriesData, geo, f: torch.Tensor, kA: torch.Tensor,
                                mag: torch.Tensor | None, even: torch.Tensor | None, box: int, binning: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For pairs in tilts ``f`` ``[P]`` (geometry ``geo`` of :func:`pair_geometry`): the forward model's CTF factor
    ``pair_ctf`` ``[P, b, b//2+1]`` (float32) at the undistorted frequencies ``kA`` ``[b, b//2+1, 2]`` (Å⁻¹), zero
    beyond ``box/2``, and the gather matrices ``[P, 3, 3]`` that put each pixel ``k`` at ``Aᵀ·(M·k, 0)``."""
    dose = dose_weights(box, data.pixel_size * binning, data.pre_exposure[f], data.bfactor_per_dose, 0.01,
                        device=kA.device).to(torch.float64)
    c = pair_ctf(data, geo.defocus, f, kA[None, ..., 0], kA[None, ..., 1], even, dose)
    c = (c * (radius_2d(box, device=c.device) <= box / 2.0)).to(torch.float32)
    matrices = geo.matrices
    if mag is not None:  # voxel K → slice pixel k = M⁻¹·(A·K)_xy, depth (A·K)_z unchanged
        inverse = torch.eye(3, dtype=matrices.dtype, device=matrices.device)
        inverse[:2, :2] = torch.linalg.inv(mag.to(matrices.dtype))
        matrices = inverse @ matrices
    return c, matrices


def insert_pairs(acc: ParticleAccumulator, data: TiltSeriesData, binning: float, batch_pairs: int = 512,
                 do_ctf: bool = True) -> int:
    """Insert every pair of ``data`` (at its metadata: warp, beam tilt, Zernike terms and magnification
    included) into ``acc``; returns the pairs used."""
    box = acc.box
    zero = zero_parameters(data)
    pixel = data.pixel_size * binning
    kx, ky = freq_grid_2d(box, device=data.positions.device, dtype=torch.float64)
    mag = total_magnification(data, zero)
    kA = magnified_frequencies(torch.stack([kx, ky], -1), mag) / (box * pixel)  # [b, b//2+1, 2] Å⁻¹
    odd, even = zernike_totals(data, zero)
    distorted = do_ctf and (mag is not None or even is not None)
    with torch.no_grad():
        for s in range(0, len(data.pairs), batch_pairs):
            n, f = data.pairs[s:s + batch_pairs].unbind(-1)
            geo = pair_geometry(data, zero, n, f)
            phase = _aberration_phase(data, f, kA, odd)
            ctf_factor, matrices = None, geo.matrices
            if distorted:
                ctf_factor, matrices = _distorted_ctf_and_matrices(data, geo, f, kA, mag, even, box, binning)
            insert_particle_pairs(acc, data.images, f, geo.xy, geo.defocus, matrices, data.half_sets[n],
                                  data.pre_exposure[f], data.ctf_scale[f], pixel_size=data.pixel_size,
                                  binning=binning, voltage=data.voltage, cs=data.cs,
                                  amplitude_contrast=data.amplitude_contrast,
                                  bfactor_per_dose=data.bfactor_per_dose, do_ctf=do_ctf, phase=phase,
                                  flip_contrast=data.flip_contrast, ctf_factor=ctf_factor)
    return len(data.pairs)


def reconstruct_halves(datas, box: int, binning: float, symmetry: str = "C1", batch_pairs: int = 512,
                       device=None, snr: float = -1.0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(half1, half2, pairs used)``: ``[box³]`` float32 maps (tapered; RELION's heuristic weight division, or
    with ``snr > 0`` the Wiener division ``Σc² + 1/snr`` of :func:`finalise_map`, which small single-particle sets
    need: the heuristic amplifies the noise of sparsely sampled voxels) from the data sets ``datas`` (iterable of
    :class:`TiltSeriesData`)."""
    acc = ParticleAccumulator(box, device=device)
    used = sum(insert_pairs(acc, d, binning, batch_pairs) for d in datas)
    if symmetry.upper() != "C1":
        acc = acc.symmetrised(symmetry)
    h1, h2 = (finalise_map(acc.data[h], acc.weight[h], snr=snr)[0] for h in range(2))
    return h1, h2, used
