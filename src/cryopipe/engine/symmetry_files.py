"""The files of a symmetry alignment (``align-symmetry`` and ``initialmodel``'s final map): the aligned map and
the rotation found, both as JSON (every field of :class:`~cryopipe.core.symmetry_align.AlignSymmetryResult`) and as
a RELION-style key-value STAR block (``data_align_symmetry``: rlnAngleRot/Tilt/Psi in degrees, rlnSymmetryGroup,
the 3×3 rotation matrix, the symmetry residual and the centre shift in pixels).

Moved from ``jobs/align_symmetry.py`` (issue 14) so that both jobs call one public writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cryopipe.core.symmetry_align import AlignSymmetryResult
from cryopipe.io.atomic import atomic_path
from cryopipe.io.mrc import write_mrc
from cryopipe.io.star import write_star

__all__ = ["write_symmetry_outputs"]


def write_symmetry_outputs(out_map: Path, res: AlignSymmetryResult, pixel_size: float, source: Path
                           ) -> tuple[Path, Path]:
    """Write the aligned map ``out_map`` (float32, ``pixel_size`` Å/px) and next to it
    ``<stem>_symmetry.json`` and ``<stem>_symmetry.star`` (atomically); ``source`` is the input map named in the
    JSON. Returns ``(json path, star path)``."""
    out_map = Path(out_map)
    out_map.parent.mkdir(parents=True, exist_ok=True)
    write_mrc(out_map, res.aligned.detach().cpu().numpy().astype(np.float32), pixel_size)
    angles = [float(a) for a in res.angles]
    rotation = res.rotation.tolist()
    info = {
        "input": str(source), "output": str(out_map), "symmetry": res.sym,
        "rot": angles[0], "tilt": angles[1], "psi": angles[2], "rotation_matrix": rotation,
        "symmetry_residual": res.residual, "global_residual": res.global_residual,
        "centre_shift_px": list(res.centre_shift_px), "box": res.box, "working_box": res.working_box,
        "working_pixel_size": res.working_pixel_size, "n_evaluations": res.n_evaluations,
        "seconds": round(res.seconds, 3),
    }
    stem = out_map.with_suffix("")
    json_path = Path(str(stem) + "_symmetry.json")
    star_path = Path(str(stem) + "_symmetry.star")
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    values = {"rlnAngleRot": angles[0], "rlnAngleTilt": angles[1], "rlnAnglePsi": angles[2],
              "rlnSymmetryGroup": res.sym, "cryopipeSymmetryResidual": res.residual,
              "cryopipeCentreShiftX": res.centre_shift_px[0], "cryopipeCentreShiftY": res.centre_shift_px[1],
              "cryopipeCentreShiftZ": res.centre_shift_px[2]}
    for i in range(3):
        for j in range(3):
            values[f"cryopipeRotationMatrix{i}{j}"] = float(rotation[i][j])
    write_star(star_path, {"align_symmetry": values}, version=50001)
    return json_path, star_path
