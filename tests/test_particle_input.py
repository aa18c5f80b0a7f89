"""Single-particle input checks of the optimiser jobs (engine/particle_input)."""

from __future__ import annotations

import shutil

import pytest
import starfile

from cryopipe.engine.particle_input import load_particles
from cryopipe.errors import InputFileError


def _fixture_copy(relion_dir, tmp_path, premultiplied: int):
    src = relion_dir / "class2d"
    shutil.copyfile(src / "particles.mrcs", tmp_path / "particles.mrcs")
    tables = starfile.read(src / "particles.star", always_dict=True)
    tables["optics"]["rlnCtfDataAreCtfPremultiplied"] = premultiplied
    star = tmp_path / "particles.star"
    starfile.write(tables, star)
    return star


def test_ctf_premultiplied_single_particles_are_refused(relion_dir, tmp_path):
    star = _fixture_copy(relion_dir, tmp_path, premultiplied=1)
    with pytest.raises(InputFileError, match="rlnCtfDataAreCtfPremultiplied 1") as info:
        load_particles(star, "3D refinement")
    message = str(info.value)
    assert "\n" not in message and "particles.star" in message and "re-extract" in message


def test_not_premultiplied_single_particles_load(relion_dir, tmp_path):
    star = _fixture_copy(relion_dir, tmp_path, premultiplied=0)
    data, particle_set, origins = load_particles(star)
    assert particle_set.size == len(data.particles) == origins.shape[0] == 600
