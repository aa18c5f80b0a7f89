"""RELION 3.1's ``_model.star`` (noise spectra per group, not per optics group) is read for a continuation."""

from pathlib import Path

import numpy as np
import pytest

from cryopipe.engine.relion_files import read_model_star
from cryopipe.errors import InputFileError
from cryopipe.io.star import read_star, write_star

DATA = Path(__file__).parent / "data" / "relion31_class2d" / "run_it001_model.star"


def test_relion31_group_noise_spectra_are_averaged_by_particle_count():
    blocks = read_star(DATA)
    assert "model_optics_group_1" not in blocks  # the RELION 3.1 layout
    groups = blocks["model_groups"]
    counts = groups["rlnGroupNrParticles"].to_numpy(float)
    spectra = np.stack([blocks[f"model_group_{g + 1}"]["rlnSigma2Noise"].to_numpy(float)
                        for g in range(len(groups))])
    model = read_model_star(DATA)
    assert model.sigma2_noise.shape == (1, spectra.shape[1])
    np.testing.assert_allclose(model.sigma2_noise[0], counts @ spectra / counts.sum(), rtol=1e-12)
    # the groups differ (one per micrograph), so this is not any single group's spectrum
    assert np.ptp(spectra[:, 5]) > 0.01 * spectra[:, 5].mean()
    assert model.n_classes == 10 and model.tau2.shape == (10, 49)


def test_relion31_group_spectra_with_several_optics_groups_is_a_clear_error(tmp_path):
    blocks = read_star(DATA)
    general = dict(blocks["model_general"])
    general["rlnNrOpticsGroups"] = 2
    blocks["model_general"] = general
    bad = tmp_path / "run_it001_model.star"
    write_star(bad, blocks)
    with pytest.raises(InputFileError, match="optics groups"):
        read_model_star(bad)
