"""Scores of a reconstructed map against the ground truth, as the demos and benchmarks report them (FSC after
rigid alignment, hand, symmetry-axis error)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["aligned_fsc_summary", "correlation"]


def aligned_fsc_summary(map_path: Path, truth_path: Path, sym: str = "C1",
                        frame_rotations: list | None = None) -> dict:
    """FSC of a map against the truth after rigid alignment (rotation, shift, hand): the truth is Fourier-rescaled
    to the map's pixel size, then windowed (centred) to its box; with ``sym`` other than C1 also the error of the
    map's symmetry axes (:func:`cryopipe.core.volume_align.symmetry_axes_error`).

    ``frame_rotations``: candidate rotations ``Q [3, 3]`` of the map's frame known from the particles' poses
    (:func:`cryopipe.tomo.evaluate.pose_errors`; the truth turned by ``Q`` or ``Qᵀ``, same hand, no shift). The
    rigid search can settle on a wrong local optimum (for a low-resolution C6 ring, even the mirrored hand); the
    alignment with the larger correlation is scored (``"alignment"``: ``"search"`` or ``"poses"``)."""
    import torch

    from cryopipe.core.fourier import fourier_rescale
    from cryopipe.core.fsc import fsc, resolution_at
    from cryopipe.core.volume_align import align_volumes
    from cryopipe.io.mrc import read_mrc

    m, apix = read_mrc(map_path)
    t, apix_t = read_mrc(truth_path)
    mt, tt = torch.from_numpy(m), torch.from_numpy(t)
    n = mt.shape[-1]
    if abs(apix_t - apix) > 1e-3 * apix:  # Fourier-rescale the truth to the map's pixel size
        tt = fourier_rescale(tt, int(round(tt.shape[-1] * apix_t / apix)))
    if tt.shape[-1] != n:  # then window it (centred) to the map's box
        nt = tt.shape[-1]
        if nt > n:
            a = nt // 2 - n // 2
            tt = tt[a:a + n, a:a + n, a:a + n]
        else:
            a = n // 2 - nt // 2
            tt = torch.nn.functional.pad(tt, (a, n - nt - a) * 3)
    al = align_volumes(mt, tt, pixel_size=apix, resolution_A=max(12.0, 3 * apix), order=1)
    f = fsc(al.aligned, tt)
    best_cc, mirror, how = correlation(al.aligned, tt), al.mirror, "search"
    for Q in frame_rotations or []:
        from cryopipe.core.volume_rotation import rotate_volume

        Q = torch.as_tensor(Q, dtype=torch.float64)
        for R in (Q, Q.T):
            turned = rotate_volume(tt.to(torch.float64), R, method="linear").to(tt.dtype)
            cc = correlation(mt, turned)
            if cc > best_cc:
                best_cc, mirror, how, f = cc, False, "poses", fsc(mt, turned)
    out = {"pixel_size_A": apix, "box": n, "hand_flipped": mirror, "alignment": how,
           "fsc_truth_0.5_A": round(float(resolution_at(f, 0.5, apix, n)), 2),
           "fsc_truth_0.143_A": round(float(resolution_at(f, 0.143, apix, n)), 2)}
    if sym.upper() != "C1":
        # the map and the truth are both in the group's convention: what the alignment still has to rotate
        # (up to the axes' own symmetries) is the error of the map's symmetry axes
        from cryopipe.core.volume_align import symmetry_axes_error

        out["symmetry_axes_error_deg"] = round(symmetry_axes_error(al.rotation, sym), 2)
    return out


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (all voxels)."""
    import torch

    x, y = a.to(torch.float64).ravel(), b.to(torch.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / ((x @ x).sqrt() * (y @ y).sqrt()).clamp_min(1e-30))
