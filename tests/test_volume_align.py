"""Rigid map alignment (rotation, shift, hand) against a known transformation of the enolase map."""

from __future__ import annotations

import math

import pytest

import torch

from cryopipe.core.fourier import fourier_rescale
from cryopipe.core.fsc import fsc
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.volume_align import align_volumes, rotate_volume
from cryopipe.io.mrc import read_mrc


def _map(relion_dir, n=32):
    v, apix = read_mrc(relion_dir / "ref_map.mrc")
    v = torch.from_numpy(v)
    return fourier_rescale(v, n), apix * v.shape[-1] / n


def test_rotate_volume_identity_and_composition(relion_dir):
    v, _ = _map(relion_dir)
    eye = torch.eye(3)
    assert torch.allclose(rotate_volume(v, eye), v, atol=1e-5)
    A = euler_to_matrix(torch.tensor(20.0), torch.tensor(30.0), torch.tensor(40.0)).float()
    back = rotate_volume(rotate_volume(v, A), A.T)
    inner = fsc(back, v)[: 8]
    assert float(inner.min()) > 0.95  # two trilinear resamplings: low frequencies intact


def test_align_volumes_recovers_rotation_shift_and_hand(relion_dir):
    v, apix = _map(relion_dir)
    A = euler_to_matrix(torch.tensor(37.0), torch.tensor(71.0), torch.tensor(-122.0)).float()
    moved = torch.roll(rotate_volume(v, A), shifts=(2, -1, 1), dims=(0, 1, 2))
    for mirror in (False, True):
        m = torch.roll(moved.flip(0, 1, 2), shifts=(1, 1, 1), dims=(0, 1, 2)) if mirror else moved
        al = align_volumes(m, v, pixel_size=apix, search_box=24, resolution_A=3 * apix)
        assert al.mirror == mirror
        f = fsc(al.aligned, v)
        assert float(f[1:6].min()) > 0.9, f  # two trilinear resamplings blur the highest shells
        cc = float(torch.corrcoef(torch.stack([al.aligned.flatten(), v.flatten()]))[0, 1])
        assert cc > 0.85, cc  # a wrong pose gives < 0.3; the residue is trilinear blur (two resamplings)


def test_symmetry_axes_error_up_to_the_axes_own_symmetries():
    """A rotation that only permutes D2's 2-folds (120° about x+y+z) or swaps them (90° about z) leaves the axis
    set in place: error 0; a 5° tilt gives 5°. Cn: only the z line counts (any rotation about z: 0)."""
    from cryopipe.core.volume_align import symmetry_axes_error

    def rot(axis, deg):
        a = torch.tensor(axis, dtype=torch.float64)
        a = a / a.norm()
        K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
        t = math.radians(deg)
        return torch.eye(3, dtype=torch.float64) + math.sin(t) * K + (1 - math.cos(t)) * K @ K

    assert symmetry_axes_error(rot((1, 1, 1), 120), "D2") < 1e-6
    assert symmetry_axes_error(rot((0, 0, 1), 90), "D2") < 1e-6
    assert symmetry_axes_error(rot((1, 0, 0), 5) @ rot((1, 1, 1), 120), "D2") == pytest.approx(5.0, abs=1e-6)
    assert symmetry_axes_error(rot((0, 0, 1), 37), "C4") < 1e-6
    assert symmetry_axes_error(rot((0, 1, 0), 3), "C4") == pytest.approx(3.0, abs=1e-6)
    assert symmetry_axes_error(rot((0, 0, 1), 90), "D3") == pytest.approx(30.0, abs=1e-6)  # D6 normaliser: 30°
    assert symmetry_axes_error(rot((1, 2, 3), 4), "C1") == 0.0
