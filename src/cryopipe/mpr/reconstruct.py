"""Half-maps from the tilt series (or particle stacks) at the (refined) parameters of :mod:`cryopipe.mpr`.

The insertion is :func:`cryopipe.tomo.reconstruct_particle.insert_particle_pairs` (cut, −CTF·W premultiplication,
gather insertion into the half set's accumulators; RELION's heuristic division by :func:`finalise_map`), driven
by per-pair positions (image warp, magnification and poses over dose included) and defocus from
:func:`cryopipe.mpr.forward.pair_geometry`, and the data demodulated by their beam-tilt and odd Zernike phase when
they carry them. Not modelled here (the forward model has them): the even Zernike phase in the CTF and the
magnification's change of the frequencies (``M·k``; positions do move by ``Mᵀ``).
"""

from __future__ import annotations

import torch

from cryopipe.core.ctf import beam_tilt_phase, zernike_phase
from cryopipe.core.fourier import freq_grid_2d
from cryopipe.mpr.forward import TiltSeriesData, pair_beam_tilt, pair_geometry, zero_parameters, zernike_totals
from cryopipe.tomo.reconstruct_particle import ParticleAccumulator, finalise_map, insert_particle_pairs

__all__ = ["insert_pairs", "reconstruct_halves"]


def insert_pairs(acc: ParticleAccumulator, data: TiltSeriesData, binning: float, batch_pairs: int = 512,
                 do_ctf: bool = True) -> int:
    """Insert every pair of ``data`` (at its metadata, warp and beam tilt included) into ``acc``; returns the
    pairs used."""
    box = acc.box
    zero = zero_parameters(data)
    pixel = data.pixel_size * binning
    kx, ky = freq_grid_2d(box, device=data.positions.device, dtype=torch.float64)
    kx, ky = kx / (box * pixel), ky / (box * pixel)
    odd, _ = zernike_totals(data, zero)
    with torch.no_grad():
        for s in range(0, len(data.pairs), batch_pairs):
            n, f = data.pairs[s:s + batch_pairs].unbind(-1)
            geo = pair_geometry(data, zero, n, f)
            phase = None
            if data.beam_tilt is not None:
                bt = pair_beam_tilt(data, zero, f)
                phase = beam_tilt_phase(kx, ky, bt[:, 0, None, None], bt[:, 1, None, None], data.voltage, data.cs)
            if odd is not None:
                z = zernike_phase(kx, ky, odd, odd=True).expand(len(n), *kx.shape)
                phase = z if phase is None else phase + z
            insert_particle_pairs(acc, data.images, f, geo.xy, geo.defocus, geo.matrices, data.half_sets[n],
                                  data.pre_exposure[f], data.ctf_scale[f], pixel_size=data.pixel_size,
                                  binning=binning, voltage=data.voltage, cs=data.cs,
                                  amplitude_contrast=data.amplitude_contrast,
                                  bfactor_per_dose=data.bfactor_per_dose, do_ctf=do_ctf, phase=phase,
                                  flip_contrast=data.flip_contrast)
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
