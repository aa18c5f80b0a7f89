"""subtomo (pseudo-subtomograms, 2D stacks) against RELION 5.0.1's relion_tomo_subtomo on the shared tilt series."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cryopipe.cli import main as cli_main
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star, write_star
from cryopipe.io.tomo_particles import read_optimisation_set

KEPT = [("TS_01", 1), ("TS_01", 2), ("TS_02", 1), ("TS_02", 2)]
CENTRED = ["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst"]


@pytest.fixture(scope="module")
def subtomo_run(relion_tomo_dir, tmp_path_factory):
    here = tmp_path_factory.mktemp("subtomo")
    cwd = os.getcwd()
    os.chdir(here)
    try:
        rc = cli_main(["subtomo", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "64", "--crop", "32",
                       "--bin", "2", "--o", "Subtomo"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    return here / "Subtomo"


def test_volumes_equal_relions(subtomo_run, relion_tomo_dir):
    for ts, n in KEPT:
        ours, px = read_mrc(subtomo_run / "Subtomograms" / ts / f"{n}_data.mrc")
        relion, _ = read_mrc(relion_tomo_dir / "Subtomo_bin2" / "Subtomograms" / ts / f"{n}_data.mrc")
        assert px == pytest.approx(8.0)
        assert np.corrcoef(ours.ravel(), relion.ravel())[0, 1] > 0.9999
        assert np.sum(ours * relion) / np.sum(ours * ours) == pytest.approx(1.0, rel=1e-3)
        w_ours, _ = read_mrc(subtomo_run / "Subtomograms" / ts / f"{n}_weights.mrc")
        w_relion, _ = read_mrc(relion_tomo_dir / "Subtomo_bin2" / "Subtomograms" / ts / f"{n}_weights.mrc")
        assert w_ours.shape == (64, 32, 17)
        # Σ(CTF·W)² (depth-corrected defocus with the tomogram's hand, dose weights) and multiplicity
        assert np.abs(w_ours - w_relion).max() < 1e-5 * np.abs(w_relion).max()


def test_particles_file_as_relion_writes_it(subtomo_run, relion_tomo_dir):
    ours = read_star(subtomo_run / "particles.star")
    relion = read_star(relion_tomo_dir / "Subtomo_bin2" / "particles.star")
    assert ours["general"]["rlnTomoSubTomosAre2DStacks"] == 0
    for column in relion["optics"].columns:
        assert ours["optics"][column].iloc[0] == relion["optics"][column].iloc[0], column
    assert list(ours["particles"].columns) == list(relion["particles"].columns)
    assert np.abs(ours["particles"][CENTRED].to_numpy() - relion["particles"][CENTRED].to_numpy()).max() < 1e-4
    assert (ours["particles"]["rlnOriginXAngst"] == 0).all()
    assert ours["particles"]["rlnImageName"].iloc[1] == "Subtomo/Subtomograms/TS_01/2_data.mrc"
    entries = read_optimisation_set(subtomo_run / "optimisation_set.star", root=subtomo_run.parent)
    assert entries["rlnTomoParticlesFile"] == subtomo_run / "particles.star"


def test_only_do_unfinished_keeps_finished_particles(subtomo_run, relion_tomo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["subtomo", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "32", "--crop", "16", "--bin",
            "4", "--o", "plain"]
    assert cli_main(args) == 0
    done = tmp_path / "plain" / "Subtomograms" / "TS_01" / "3_data.mrc"
    removed = tmp_path / "plain" / "Subtomograms" / "TS_02" / "5_data.mrc"
    before = done.stat().st_mtime_ns
    removed.unlink()
    assert cli_main(args + ["--only_do_unfinished"]) == 0
    assert done.stat().st_mtime_ns == before and removed.exists()
    assert len(read_star(tmp_path / "plain" / "particles.star")["particles"]) == 24


def test_particle_outside_its_tomogram_is_one_line(relion_tomo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    star = read_star(relion_tomo_dir / "particles.star")
    star["particles"].loc[2, "rlnCenteredCoordinateZAngst"] = 48 * 4.0 + 10.0  # TS_01 is 96 px of 4 Å thick
    write_star(tmp_path / "outside.star", star)
    for job in ("subtomo", "reconstruct-particle"):
        rc = cli_main([job, "--p", "outside.star", "--t", str(relion_tomo_dir / "tomograms.star"), "--b", "32",
                       "--o", "bad"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and "TS_01/3 lies outside tomogram TS_01" in err[0], err
        assert not (tmp_path / "bad").exists()


def test_stack2d_holds_the_visible_tilts(relion_tomo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["subtomo", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "64", "--crop", "32",
                     "--bin", "2", "--stack2d", "--max_dose", "60", "--float16", "--o", "s2d"]) == 0
    star = read_star(tmp_path / "s2d" / "particles.star")
    assert star["general"]["rlnTomoSubTomosAre2DStacks"] == 1
    assert star["optics"]["rlnImageDimensionality"].iloc[0] == 2
    first = star["particles"].iloc[0]
    frames = [int(v) for v in first["rlnTomoVisibleFrames"].strip("[]").split(",")]
    tilts = read_star(relion_tomo_dir / "tilt_series" / "TS_01.star")["TS_01"]
    assert frames == [int(d <= 60) for d in tilts["rlnMicrographPreExposure"]]
    stack, px = read_mrc(tmp_path / first["rlnImageName"])
    assert stack.shape == (sum(frames), 32, 32) and px == pytest.approx(8.0)
    assert np.isfinite(stack).all() and stack.std() > 0


def test_stack2d_images_make_the_3d_pseudo_subtomogram(relion_tomo_dir):
    """No RELION 2D-stack fixture exists: instead the 2D images, inserted along their tilts' orientations, must give
    the 3D pseudo-subtomogram that equals RELION's (test above), so they are the same premultiplied images."""
    import torch

    from cryopipe.core.fourier import irfft3_centered, radius_2d, rfft2_centered
    from cryopipe.core.slice_insertion import splat_insert_slices
    from cryopipe.core.tilt_geometry import particle_tilt_matrices
    from cryopipe.io.tomo_particles import read_tomo_particles
    from cryopipe.io.tomography import read_tomograms
    from cryopipe.tomo.particle_sets import particles_per_tilt_series, tilt_series_geometry
    from cryopipe.tomo.subtomograms import particle_stacks_2d, pseudo_subtomograms

    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    particles = read_tomo_particles(relion_tomo_dir / "particles.star", tomograms)
    group = next(iter(particles_per_tilt_series(particles, tomograms)))
    images = torch.from_numpy(group.tilt_series.read_images())
    geometry = tilt_series_geometry(group.tilt_series)
    box = crop = 32
    positions, frames = group.positions_px[:3], group.subtomogram_matrices[:3]
    stacks, visible = particle_stacks_2d(images, geometry, positions, box, crop, 4.0, max_dose=60.0)
    volumes = pseudo_subtomograms(images, geometry, positions, frames, box, crop, 4.0, max_dose=60.0)
    assert torch.equal(visible, volumes.visible) and int(visible[0].sum()) < visible.shape[1]
    matrices = particle_tilt_matrices(geometry.projections[:, :3, :3], frames.to(torch.float64))
    inserted = radius_2d(box, dtype=torch.float64) <= box / 2  # where −CTF·W is non-zero (none is below the dose cut-off)
    for j, stack in enumerate(stacks):
        data = torch.zeros((crop, crop, crop // 2 + 1), dtype=torch.complex128)
        weight = torch.zeros(data.shape, dtype=torch.float64)
        slices = rfft2_centered(stack.to(torch.float64))
        splat_insert_slices(data, weight, torch.zeros_like(weight), slices, torch.ones(slices.shape, dtype=torch.float64),
                            matrices[j, visible[j]], pixel_mask=inserted[None].expand(slices.shape))
        rebuilt = irfft3_centered(data, crop).numpy()
        expected = volumes.data[j].numpy().astype(np.float64)
        assert np.corrcoef(rebuilt.ravel(), expected.ravel())[0, 1] > 0.99999
        # 3D data carry RELION's factor sqrt(box/crop)·sqrt(bin) = 2 here; the 2D images are the plain products
        assert np.sum(rebuilt * expected) / np.sum(rebuilt * rebuilt) == pytest.approx(2.0, rel=1e-4)


def test_bad_crop_is_one_line(relion_tomo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["subtomo", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "32", "--crop", "48",
                   "--o", "bad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "crop" in err[0]
    assert not (tmp_path / "bad").exists()
