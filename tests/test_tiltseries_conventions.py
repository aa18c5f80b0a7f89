"""Tilt-series conventions at the level of the reconstruction: on a tiny noise-free simulated data set (thick slab,
fine pixel, true poses) ``reconstruct_particle`` agrees with the truth map far better with the correct sign of the
depth-defocus term than with the sign flipped.

The hand itself is pinned elsewhere (the RELION weights in test_reconstruct_particle.py, the forward model in
test_sim_tiltseries.py). In cryopipe rlnTomoHand enters only the depth-defocus term (``hand·slope·px·depth``), so
here it is only checked that flipping rlnTomoHand is the same manipulation as flipping the depth sign
(rlnTomoDefocusSlope −1), and that a geometric hand flip of the tomogram (mirror in z: tilt angles, particle z and
Euler tilt negated) gives the mirror image of the structure, as good as the original only when rlnTomoHand is flipped
with it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopipe.core.fsc import fsc
from cryopipe.io.mrc import read_mrc
from cryopipe.io.star import read_star, write_star
from cryopipe.io.tomography import read_tomograms, write_tomograms
from cryopipe.jobs.reconstruct_particle import reconstruct_particle
from cryopipe.jobs.simulate import simulate_tiltseries_dataset
from cryopipe.tomo.reconstruct_particle import taper_sphere

PX = 3.0  # Å: Nyquist 6 Å, where a depth error of ~1000 Å changes the CTF phase by several radians
CROP = 48  # the truth map's box (3ENL at 3 Å)
BOX = 64


def _write_variant(sim, out, *, hand=1.0, slope=None, mirror=False):
    """The truth STAR files with rlnTomoHand × ``hand``, rlnTomoDefocusSlope = ``slope`` and, with ``mirror``, the
    tomogram mirrored in z (rlnTomoXTilt/YTilt, rlnCenteredCoordinateZAngst and rlnAngleTilt negated)."""
    tomos = read_tomograms(sim.truth_tomograms_star)
    for ts in tomos:
        ts.globals["rlnTomoHand"] = hand * ts.hand
        if slope is not None:
            ts.globals["rlnTomoDefocusSlope"] = float(slope)
        if mirror:
            for lab in ("rlnTomoXTilt", "rlnTomoYTilt"):
                ts.tilts[lab] = -ts.tilts[lab]
    write_tomograms(out / "tomograms.star", tomos, out / "tilt_series")
    blocks = read_star(sim.truth_particles_star)
    if mirror:
        for lab in ("rlnCenteredCoordinateZAngst", "rlnOriginZAngst", "rlnAngleTilt", "rlnTomoSubtomogramTilt"):
            blocks["particles"][lab] = -blocks["particles"][lab]
    write_star(out / "particles.star", blocks, version=50001)
    return out / "particles.star", out / "tomograms.star"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("conventions")
    # one tomogram, 12 particles in a 4000 Å slab (depths up to ±1900 Å), 31 tilts ±60°, 1 e/Å² per tilt, no noise.
    # The tomogram is narrow across the tilt axis (ZRot 85°: tomogram x ends up along image y) and the images tall,
    # so that every particle stays inside every tilt image: all 372 (particle, tilt) images are used.
    sim = simulate_tiltseries_dataset(
        root / "sim", box=CROP, pixel_size=PX, n_tomograms=1, particles_per_tomogram=12, image_size=(400, 1400),
        tomogram_size=(240, 240, 1334), thickness_A=4000.0, tilt_range=(-60.0, 60.0), tilt_step=4.0,
        dose_per_tilt=1.0, defocus_range=(10000.0, 15000.0), snr=float("inf"), seed=5, device="cpu")
    truth = taper_sphere(torch.from_numpy(np.ascontiguousarray(read_mrc(sim.map_path)[0])), 10.0)

    maps = {}

    def rec(name, **kw):
        """Merged map (cached by ``name``) from the truth STAR files, or from a variant (:func:`_write_variant`)."""
        if name not in maps:
            p, t = (sim.truth_particles_star, sim.truth_tomograms_star) if not kw else \
                _write_variant(sim, root / name, **kw)
            maps[name] = reconstruct_particle(p, t, box=BOX, crop=CROP, binning=1.0, device="cpu",
                                              progress=False).merged
        return maps[name]

    return sim, truth, rec


def _high_fsc(rec: np.ndarray, ref: torch.Tensor) -> float:
    """Mean FSC over the shells from 4 px (12 Å) to Nyquist (6 Å)."""
    f = fsc(torch.from_numpy(rec), ref)
    return float(f[CROP // 4:].mean())


def _mirror_z(vol: torch.Tensor) -> torch.Tensor:
    return torch.roll(torch.flip(vol, [0]), 1, 0)


def test_wrong_depth_sign_lowers_fsc_with_truth(data):
    sim, truth, rec = data
    depths = sim.particles_truth["rlnCenteredCoordinateZAngst"].abs()
    assert depths.max() > 1200  # the slab is thick enough for the depth term to matter at 6-12 Å
    correct = _high_fsc(rec("correct"), truth)
    flipped_map = rec("depth_sign", slope=-1.0)
    flipped = _high_fsc(flipped_map, truth)
    print(f"mean FSC 12-6 Å: correct {correct:.3f}, depth sign flipped {flipped:.3f}")
    assert correct > 0.7
    assert correct - flipped > 0.3
    # rlnTomoHand enters only through the depth term: flipping it is the very same manipulation
    hand_map = rec("hand", hand=-1.0)
    np.testing.assert_allclose(hand_map, flipped_map, rtol=0, atol=1e-6 * np.abs(flipped_map).max())


def test_geometric_hand_flip_needs_the_hand_flipped_too(data):
    sim, truth, rec = data
    correct = _high_fsc(rec("correct"), truth)
    mirrored_truth = _mirror_z(truth)
    # mirrored tomogram + flipped rlnTomoHand: the same data explained by the mirror-image structure, exactly
    both = rec("mirror_hand", mirror=True, hand=-1.0)
    assert abs(_high_fsc(both, mirrored_truth) - correct) < 0.01
    assert _high_fsc(both, truth) < 0.2  # the map has the other hand
    # mirrored tomogram alone: every particle's depth is negated while the hand is not → the wrong depth sign
    only_geometry = _high_fsc(rec("mirror", mirror=True), mirrored_truth)
    assert correct - only_geometry > 0.3
