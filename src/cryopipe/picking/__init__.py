"""Particle picking on micrographs.

* :mod:`cryopipe.picking.log` — Laplacian-of-Gaussian blob picker (RELION ``relion_autopick --LoG``).
* :mod:`cryopipe.picking.peaks` — peak selection shared by the pickers (RELION's greedy disc suppression).
* :mod:`cryopipe.picking.common` — the pick table and RELION coordinate-file naming / writing shared by all
  pickers and the ``autopick`` job.
"""

from cryopipe.picking.common import PickTable
from cryopipe.picking.log import log_fom_maps, log_pick

__all__ = ["PickTable", "log_fom_maps", "log_pick"]
