"""Rigid map alignment (rotation, shift, hand) against a known transformation of the enolase map."""

from __future__ import annotations

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
