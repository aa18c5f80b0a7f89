"""Rigid map alignment (rotation, shift, hand) against a known transformation of the enolase map."""

from __future__ import annotations

import math

import pytest

import torch

from cryopipe.core.fourier import fourier_rescale
from cryopipe.core.fsc import fsc
from cryopipe.core.geometry import euler_to_matrix
from cryopipe.core.volume_align import align_volumes
from cryopipe.core.volume_rotation import rotate_volume
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


def test_rotate_volume_batches_channels_shifts_and_methods():
    """One rotation for every caller: a batch of rotations equals one at a time, leading axes are channels rotated
    alike, a shift moves the map by whole pixels, and the Fourier method agrees with the trilinear one on a
    smooth map."""
    g = torch.Generator().manual_seed(0)
    n = 20
    c = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    blob = torch.exp(-((x - 2) ** 2 + (y + 1) ** 2 + z ** 2) / 8.0)
    blob = blob + 0.5 * torch.exp(-(x ** 2 + (y - 3) ** 2 + (z - 2) ** 2) / 6.0)
    A = euler_to_matrix(torch.tensor([10.0, 70.0]), torch.tensor([30.0, 100.0]), torch.tensor([-40.0, 5.0]))
    batch = rotate_volume(blob, A)
    assert batch.shape == (2, n, n, n)
    for b in range(2):
        assert torch.allclose(batch[b], rotate_volume(blob, A[b]), atol=1e-6)
    two = torch.stack([blob, torch.rand(n, n, n, generator=g)])
    both = rotate_volume(two, A[0])
    assert torch.allclose(both[0], rotate_volume(blob, A[0]), atol=1e-6)
    assert torch.allclose(both[1], rotate_volume(two[1], A[0]), atol=1e-6)
    shifted = rotate_volume(blob, torch.eye(3), shift=torch.tensor([2.0, -1.0, 3.0]))
    inner = (slice(4, -4),) * 3  # away from what the roll wraps round
    assert torch.allclose(shifted[inner], torch.roll(blob, shifts=(3, -1, 2), dims=(0, 1, 2))[inner], atol=1e-6)
    four = rotate_volume(blob.double(), A[0].double(), method="fourier")
    lin = rotate_volume(blob.double(), A[0].double())
    cc = float((four * lin).sum() / (four.norm() * lin.norm()))
    assert cc > 0.995
