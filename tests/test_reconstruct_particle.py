"""reconstruct-particle against RELION 5.0.1's relion_tomo_reconstruct_particle on the shared tilt series."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cryopipe.cli import main as cli_main
from cryopipe.io.mrc import read_mrc
from cryopipe.io.tomo_particles import read_optimisation_set
from cryopipe.io.tomography import read_tomograms
from cryopipe.io.tomo_particles import read_tomo_particles
from cryopipe.jobs.reconstruct_particle import reconstruct_particle
from cryopipe.tomo.particle_sets import particles_per_tilt_series, tilt_series_geometry
from cryopipe.tomo.reconstruct_particle import ParticleAccumulator, insert_tilt_series_particles


def _cc(a, b):
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def _relion(fixture, *parts):
    return read_mrc(fixture.joinpath(*parts))[0]


@pytest.fixture(scope="module")
def bin2_maps(relion_tomo_dir):
    return reconstruct_particle(relion_tomo_dir / "particles.star", relion_tomo_dir / "tomograms.star", box=48,
                                crop=40, binning=2, progress=False)


def test_bin2_maps_equal_relions(bin2_maps, relion_tomo_dir):
    out = relion_tomo_dir / "ReconstructParticle_bin2"
    assert bin2_maps.pixel_size == 8.0 and bin2_maps.merged.shape == (40, 40, 40)
    assert bin2_maps.n_images == 984
    assert _cc(bin2_maps.merged, _relion(out, "merged.mrc")) > 0.9999
    assert _cc(bin2_maps.half1, _relion(out, "half1.mrc")) > 0.9999
    assert _cc(bin2_maps.half2, _relion(out, "half2.mrc")) > 0.9999
    assert _cc(bin2_maps.merged_full, _relion(out, "merged_full.mrc")) > 0.999
    # the halves are independent: each differs from the other more than from RELION's version of itself
    assert _cc(bin2_maps.half1, bin2_maps.half2) < 0.999


def test_relion4_coordinates_give_the_same_map(bin2_maps, relion_tomo_dir):
    r4 = reconstruct_particle(relion_tomo_dir / "particles_relion4_coords.star", relion_tomo_dir / "tomograms.star",
                              box=48, crop=40, binning=2, progress=False)
    assert np.abs(r4.merged - bin2_maps.merged).max() < 1e-5 * np.abs(bin2_maps.merged).max()
    assert _cc(r4.merged, _relion(relion_tomo_dir, "ReconstructParticle_bin2_relion4coords", "merged.mrc")) > 0.9999


def test_bin1_map_equals_relions(relion_tomo_dir):
    maps = reconstruct_particle(relion_tomo_dir / "particles.star", relion_tomo_dir / "tomograms.star", box=96,
                                crop=64, binning=1, progress=False)
    assert _cc(maps.merged, _relion(relion_tomo_dir, "ReconstructParticle_bin1", "merged.mrc")) > 0.999


def _half1_weights(relion_tomo_dir, hand_sign=1.0, depth_sign=1.0):
    tomograms = read_tomograms(relion_tomo_dir / "tomograms.star")
    particles = read_tomo_particles(relion_tomo_dir / "particles.star", tomograms)
    acc = ParticleAccumulator(48)
    for group in particles_per_tilt_series(particles, tomograms):
        geometry = tilt_series_geometry(group.tilt_series)
        geometry.hand *= hand_sign * depth_sign
        insert_tilt_series_particles(acc, torch.from_numpy(group.tilt_series.read_images()), geometry,
                                     group.positions_px, group.orientations, group.half_sets, 2.0)
    # RELION's weight_merged.mrc holds half 1's weights ("human" full layout, DC at the centre)
    n = 48
    f = torch.arange(n) - n // 2
    kz, ky, kx = torch.meshgrid(f, f, f, indexing="ij")
    neg = kx < 0
    full = acc.weight[0][torch.where(neg, -kz, kz) % n, torch.where(neg, -ky, ky) % n, torch.where(neg, -kx, kx)]
    radius = torch.sqrt((kx ** 2 + ky ** 2 + kz ** 2).double())
    return full.numpy(), (radius < n // 2 - 1).numpy()


def test_weights_pin_ctf_dose_and_the_depth_defocus_hand(relion_tomo_dir):
    relion = _relion(relion_tomo_dir, "ReconstructParticle_bin2", "weight_merged.m...".replace("...", "rc"))
    ours, inside = _half1_weights(relion_tomo_dir)
    error = np.abs(ours - relion)[inside].max() / relion[inside].max()
    assert error < 1e-5
    flipped, _ = _half1_weights(relion_tomo_dir, hand_sign=-1.0)
    assert np.abs(flipped - relion)[inside].max() / relion[inside].max() > 100 * max(error, 1e-7)


def test_cli_writes_maps_and_optimisation_set(relion_tomo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["reconstruct-particle", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "48",
                   "--crop", "40", "--bin", "2", "--o", "rp"])
    assert rc == 0
    merged = read_mrc(tmp_path / "rp" / "merged.mrc")
    assert merged[1] == pytest.approx(8.0)
    assert _cc(merged[0], _relion(relion_tomo_dir, "ReconstructParticle_bin2", "merged.mrc")) > 0.9999
    entries = read_optimisation_set(tmp_path / "rp" / "optimisation_set.star")
    assert entries["rlnTomoReferenceMap1File"].name == "half1.mrc"
    assert os.path.exists(entries["rlnTomoParticlesFile"])


def test_cli_bad_box_is_one_line(relion_tomo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["reconstruct-particle", "--i", str(relion_tomo_dir / "optimisation_set.star"), "--b", "47",
                   "--o", "bad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--b 47" in err[0]
