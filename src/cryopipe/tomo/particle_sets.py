"""Particles grouped by tilt series, with the tensors the tilt-series operations need.

:func:`tilt_series_geometry` turns a :class:`cryopipe.io.tomography.TiltSeries` into a
:class:`cryopipe.tomo.reconstruct_particle.TiltSeriesGeometry`; :func:`particles_per_tilt_series` yields, tilt
series by tilt series, the particle rows and their decentred positions, full orientations and subtomogram
matrices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cryopipe.io.tomography import TiltSeries, TomogramSet
from cryopipe.io.tomo_particles import TomoParticles
from cryopipe.tomo.reconstruct_particle import TiltSeriesGeometry

__all__ = ["tilt_series_geometry", "TiltSeriesParticles", "particles_per_tilt_series"]


def tilt_series_geometry(ts: TiltSeries, device=None) -> TiltSeriesGeometry:
    """Per-tilt geometry, CTF and dose of one tilt series as tensors (float64)."""
    def t(x):
        return torch.as_tensor(np.array(x, dtype=np.float64), device=device)

    return TiltSeriesGeometry(projections=ts.projection_matrices().to(device), defocus=t(ts.defocus()),
                              pre_exposure=t(ts.pre_exposure()), ctf_scale=t(ts.ctf_scale()),
                              pixel_size=ts.pixel_size, hand=ts.hand, defocus_slope=ts.defocus_slope,
                              voltage=ts.voltage, cs=ts.cs, amplitude_contrast=ts.amplitude_contrast,
                              bfactor_per_dose=ts.bfactor_per_dose)


@dataclass
class TiltSeriesParticles:
    """The particles of one tilt series."""

    tilt_series: TiltSeries
    rows: np.ndarray  # [N] row indices into the particles table
    positions_px: torch.Tensor  # [N, 3] decentred unbinned px, origins applied
    orientations: torch.Tensor  # [N, 3, 3] A_sub·A_particle
    subtomogram_matrices: torch.Tensor  # [N, 3, 3] A_sub
    half_sets: torch.Tensor  # [N] 1 or 2 (rlnRandomSubset; alternating 1, 2 when absent)


def particles_per_tilt_series(particles: TomoParticles, tomograms: TomogramSet) -> Iterator[TiltSeriesParticles]:
    """Yield the particles of each tilt series that has any, in the order of the tomogram set."""
    names = particles.tomo_names
    positions = particles.positions_px(tomograms)
    orientations = particles.orientations()
    sub = particles.subtomogram_matrices()
    table = particles.particles
    if "rlnRandomSubset" in table.columns:
        halves = table["rlnRandomSubset"].to_numpy().astype(np.int64)
    else:
        halves = (np.arange(len(table)) % 2) + 1
    for ts in tomograms:
        rows = np.flatnonzero(names == ts.name)
        if rows.size == 0:
            continue
        yield TiltSeriesParticles(ts, rows, torch.from_numpy(positions[rows]), torch.from_numpy(orientations[rows]),
                                  torch.from_numpy(sub[rows]), torch.from_numpy(halves[rows]))
