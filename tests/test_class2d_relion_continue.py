"""Our 2D EM from RELION's own state follows RELION iteration by iteration (issue 11).

RELION 3.1.3 ran the ``class2d_hard`` fixture's command (one group, ``--skip_gridding`` = RELION 4/5's M-step;
``tests/data/relion31_class2d_continue/README.md``). We continue from its iteration-1 files for two iterations and
compare with RELION's own iterations 2 and 3: current resolution and image size equal, ⟨Pmax⟩ and every class's
share close. Before the M-step divided on the padded grid and cropped in real space as RELION does
(``PaddedGrid``), our iteration 3 reported 26.2 Å against RELION's 28.8 Å.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cryopipe.engine.classify2d import Class2DSettings
from cryopipe.engine.relion_files import read_model_star
from cryopipe.jobs.class2d import classify_2d

from engine_helpers import copy_relion_files

DATA = Path(__file__).parent / "data" / "relion31_class2d_continue"


@pytest.fixture(scope="module")
def continued(relion_dir, tmp_path_factory):
    project = tmp_path_factory.mktemp("relion31_continue")
    copy_relion_files(DATA / "out", project / "out")
    # RELION's image names are relative to the folder it ran in: the float16 fixture stack holds the same values
    (project / "particles.mrcs").symlink_to(relion_dir / "class2d_hard" / "particles.mrcs")
    s = Class2DSettings(n_classes=10, n_iter=3, tau2_fudge=2, particle_diameter=150, do_ctf=True, zero_mask=True,
                        psi_step=6, offset_range=5, offset_step=2, do_norm=True, do_scale=True, random_seed=4321)
    torch.set_num_threads(2)
    out = {}
    here = Path.cwd()
    os.chdir(project)  # RELION's file names are relative to its project folder
    try:
        for prior in (False, True):
            classify_2d(None, project / f"ours{int(prior)}" / "run", dataclasses.replace(s, relion_offset_prior=prior),
                        root=project, log=lambda *a: None, continue_from=Path("out") / "run_it001_optimiser.star",
                        overrides={"n_iter": 3, "relion_offset_prior": prior})
            out[prior] = [read_model_star(project / f"ours{int(prior)}" / f"run_it00{i}_model.star") for i in (2, 3)]
    finally:
        os.chdir(here)
    relion = [read_model_star(DATA / "relion" / f"run_it00{i}_model.star") for i in (2, 3)]
    return out, relion


@pytest.mark.parametrize("prior", [False, True])
def test_resolution_and_image_size_equal_relions(continued, prior):
    ours, relion = continued[0][prior], continued[1]
    for o, r in zip(ours, relion):
        assert float(o.general["rlnCurrentResolution"]) == pytest.approx(float(r.general["rlnCurrentResolution"]),
                                                                         rel=1e-3)
        assert int(o.general["rlnCurrentImageSize"]) == int(r.general["rlnCurrentImageSize"])


def test_classes_and_pmax_follow_relion(continued):
    ours, relion = continued[0][True], continued[1]  # RELION's own offset prior: the same posterior width
    for o, r in zip(ours, relion):
        po = o.classes["rlnClassDistribution"].to_numpy(float)
        pr = r.classes["rlnClassDistribution"].to_numpy(float)
        # class by class (they keep their identity from the same start). Measured max |Δ| 0.002 / 0.010 at
        # iterations 2 / 3, the same for random seeds 4321, 1 and 2 (0.002 / 0.006 when our M-step sampled a padded
        # transform of the sums instead of back-projecting them as RELION: that M-step left 3–7× RELION's power in
        # the class averages of the plain simulated set, test_class2d_relion_plain_continue.py)
        assert np.abs(po - pr).max() < 0.015
        assert float(o.general["rlnAveragePmax"]) == pytest.approx(float(r.general["rlnAveragePmax"]), abs=0.015)
