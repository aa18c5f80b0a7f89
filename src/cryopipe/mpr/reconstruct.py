"""Half-maps from the tilt series at the (refined) parameters of :mod:`cryopipe.mpr`.

Same insertion as :func:`cryopipe.tomo.reconstruct_particle.insert_tilt_series_particles` (cut, −CTF·W
premultiplication, gather insertion into the half set's accumulators, RELION's heuristic division), but driven by
per-pair positions and defocus from :func:`cryopipe.mpr.forward.pair_geometry`, because the image warp moves each
(particle, tilt) pair individually and ``insert_tilt_series_particles`` derives positions from the projection
matrices alone.
"""

from __future__ import annotations

import torch

from cryopipe.core.slice_insertion import gather_insert_slices
from cryopipe.mpr.forward import TiltSeriesData, pair_geometry
from cryopipe.mpr.parameters import TiltSeriesParameters
from cryopipe.tomo.particle_images import ctf_dose_weights, cut_particle_slices
from cryopipe.tomo.reconstruct_particle import ParticleAccumulator, finalise_map

__all__ = ["insert_pairs", "reconstruct_halves"]


def insert_pairs(acc: ParticleAccumulator, data: TiltSeriesData, binning: float, batch_pairs: int = 512,
                 do_ctf: bool = True) -> int:
    """Insert every pair of ``data`` (at its metadata, warp included) into ``acc``; returns the pairs used."""
    box = acc.box
    zero = TiltSeriesParameters.zeros(len(data.positions), len(data.angles),
                                      (data.warp.shape[-1], data.warp.shape[-2]), device=data.positions.device)
    pixel = data.pixel_size * binning
    with torch.no_grad():
        for s in range(0, len(data.pairs), batch_pairs):
            n, f = data.pairs[s:s + batch_pairs].unbind(-1)
            geo = pair_geometry(data, zero, n, f)
            slices = cut_particle_slices(data.images, f, geo.xy, box, binning)
            c = ctf_dose_weights(box, pixel, geo.defocus[:, 0], geo.defocus[:, 1], geo.defocus[:, 2],
                                 data.pre_exposure[f], voltage=data.voltage, cs=data.cs,
                                 amplitude_contrast=data.amplitude_contrast, scale=data.ctf_scale[f],
                                 bfactor_per_dose=data.bfactor_per_dose, do_ctf=do_ctf)
            half = data.half_sets[n]
            for h in (1, 2):
                sel = half == h
                if bool(sel.any()):
                    gather_insert_slices(acc.data[h - 1], acc.weight[h - 1], slices[sel] * c[sel], c[sel] * c[sel],
                                         geo.matrices[sel])
    return len(data.pairs)


def reconstruct_halves(datas, box: int, binning: float, symmetry: str = "C1", batch_pairs: int = 512,
                       device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(half1, half2, pairs used)``: ``[box³]`` float32 maps (tapered, RELION's heuristic weight division) from
    the tilt series ``datas`` (iterable of :class:`TiltSeriesData`)."""
    acc = ParticleAccumulator(box, device=device)
    used = sum(insert_pairs(acc, d, binning, batch_pairs) for d in datas)
    if symmetry.upper() != "C1":
        acc = acc.symmetrised(symmetry)
    h1, h2 = (finalise_map(acc.data[h], acc.weight[h])[0] for h in range(2))
    return h1, h2, used
