"""refine3d --ios with --sym on tomographic particles (issue 12): a small simulated C6 set (pseudo-subtomograms
of a C6-symmetrised blob map, perturbed poses) refined in C6 gives a C6-symmetric map that is closer to the truth
than the C1 refinement of the same data."""

from __future__ import annotations

import numpy as np
import torch

from cryopipe.cli import main as cli_main
from cryopipe.core.fsc import fsc
from cryopipe.core.geometry import axis_angle_matrix
from cryopipe.core.symmetry import symmetrise_volume
from cryopipe.core.volume_rotation import rotate_volume
from cryopipe.engine.optimiser3d import random_blob_volume
from cryopipe.io.mrc import read_mrc, write_mrc


def _rotation_cc(vol: np.ndarray, degrees: float) -> float:
    """Correlation of a map with itself rotated about z (the C6 axis)."""
    R = axis_angle_matrix(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), degrees)
    rot = rotate_volume(torch.from_numpy(vol).double(), R).float().numpy()
    return float(np.corrcoef(vol.ravel(), rot.ravel())[0, 1])


def test_c6_refinement_is_symmetric_and_better_than_c1(tmp_path, monkeypatch):
    """20 particles (24³ at 8 Å, 2 tilt series of 16 tilts ±60°, SNR 0.5, 6° / 4 Å pose errors), one
    (final) local-search iteration each: the C6 map's 60° self-correlation is the truth's (0.997 measured; C1
    0.969) and its FSC with the truth is higher at 27–19 Å (shells 7–10; measured at 24 / 21 Å: C6 0.80 / 0.40,
    C1 0.50 / 0.14). ~30 CPU-s."""
    from cryopipe.sim.tiltseries import Perturbations, simulate_tilt_series

    monkeypatch.chdir(tmp_path)
    n, apix = 24, 8.0
    vol = random_blob_volume(n, 9.0, torch.Generator().manual_seed(11), count=30)
    vol = symmetrise_volume(vol.double(), "C6").float()
    write_mrc("truth.mrc", vol.numpy(), apix)
    simulate_tilt_series(vol.numpy(), apix, "Simulate", n_tomograms=2, particles_per_tomogram=10,
                         image_size=(224, 224), thickness_A=400.0, tilt_step=8.0, snr=0.5, device="cpu", seed=4,
                         defocus_range=(20000.0, 30000.0),
                         perturbations=Perturbations(particle_angle_deg=6.0, particle_shift_A=4.0))
    assert cli_main(["subtomo", "--i", "Simulate/optimisation_set.star", "--b", "32", "--crop", "24", "--bin", "1",
                     "--o", "Subtomo"]) == 0
    fscs, sym_cc = {}, {}
    for sym in ("C1", "C6"):
        assert cli_main(["refine3d", "--ios", "Subtomo/optimisation_set.star", "--ref", "truth.mrc", "--o",
                         f"Refine{sym}/run", "--iter", "1", "--healpix_order", "3", "--sigma_ang", "5",
                         "--offset_range", "2", "--offset_step", "1", "--particle_diameter", "170", "--ini_high",
                         "30", "--sym", sym]) == 0
        m, _ = read_mrc(f"Refine{sym}/run_class001.mrc")
        fscs[sym] = fsc(torch.from_numpy(m), vol).numpy()
        sym_cc[sym] = _rotation_cc(m, 60.0)
    truth_cc = _rotation_cc(vol.numpy(), 60.0)  # interpolation of the rotation itself: 0.996
    assert sym_cc["C6"] >= truth_cc - 0.005 and sym_cc["C6"] > sym_cc["C1"] + 0.01, (sym_cc, truth_cc)
    assert fscs["C6"][7:11].mean() > fscs["C1"][7:11].mean() + 0.1, (fscs["C6"].round(2), fscs["C1"].round(2))
