"""Template picking, part 4: FOM-map files (:func:`write_template_maps`, :func:`read_template_maps`,
:func:`template_maps_paths`: one float32 MRC stack and one STAR file per micrograph) and the per-micrograph picker
used by the job (:func:`make_template_picker`: reuses stored maps made with the same settings).

Split out of :mod:`cryopipe.picking.template` (issue 14), which re-exports everything; see there for the
conventions. Moved verbatim.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.picking.common import PickTable
from cryopipe.picking.template_fom import MAP_SECTIONS, TemplateMaps
from cryopipe.picking.template_peaks import TemplateOptions, template_maps_for, template_pick_from_maps
from cryopipe.picking.template_references import TemplateReferences, psi_sampling

__all__ = ["template_maps_paths", "write_template_maps", "read_template_maps", "make_template_picker"]


def template_maps_paths(base: str | os.PathLike) -> tuple[Path, Path]:
    """``(<base>_fom.mrcs, <base>_fom.star)`` for a coordinate-file root ``base`` (e.g.
    ``AutoPick/job004/Micrographs/mic001_autopick``)."""
    base = str(base)
    return Path(base + "_fom.mrcs"), Path(base + "_fom.star")


def write_template_maps(base: str | os.PathLike, maps: TemplateMaps, ref_names: Sequence[str] | None = None,
                        settings: Mapping[str, object] | None = None) -> tuple[Path, Path]:
    """Write ``maps`` as one float32 MRC stack + a STAR description (module docstring); atomic. Returns the paths."""
    from cryopipe.io.mrc import write_mrc
    from cryopipe.io.star import write_star

    stack_path, star_path = template_maps_paths(base)
    stack_path.parent.mkdir(parents=True, exist_ok=True)
    bf, bp, br = maps.best()
    n_ref = maps.fom.shape[0]
    per_ref = torch.stack([maps.fom, maps.psi], dim=1).reshape(2 * n_ref, maps.work_size, maps.work_size)
    data = torch.cat([torch.stack([bf, bp, br, maps.stddev, maps.mean]), per_ref]).to(torch.float32)
    write_mrc(stack_path, data.cpu().numpy(), maps.pixel_size / maps.scale)
    names = list(MAP_SECTIONS) + [f"ref{i + 1:03d}_{s}" for i in range(n_ref) for s in ("bestCCF", "bestPSI")]
    labels = list(ref_names) if ref_names is not None else [f"ref{i + 1:03d}" for i in range(n_ref)]
    info = {"cryopipeMapStack": stack_path.name, "cryopipeWorkSize": int(maps.work_size),
            "cryopipeSquareSize": int(maps.size), "rlnImageSizeY": int(maps.shape[0]),
            "rlnImageSizeX": int(maps.shape[1]), "rlnMicrographPixelSize": float(maps.pixel_size),
            "rlnImageSize": int(maps.box), "cryopipeParticleRadius": int(maps.radius_px),
            "rlnParticleDiameter": float(maps.particle_diameter), "cryopipeNumberOfReferences": int(n_ref)}
    blocks: dict[str, object] = {
        "fom_maps": info,
        "sections": pd.DataFrame({"cryopipeSection": np.arange(1, len(names) + 1), "cryopipeMapLabel": names}),
        "references": pd.DataFrame({"rlnClassNumber": np.arange(1, n_ref + 1),
                                    "cryopipeReferenceLabel": [str(s) for s in labels[:n_ref]],
                                    "cryopipeExpectedRatio": maps.expected_ratio.double().cpu().numpy()}),
    }
    if settings:
        blocks["settings"] = {f"cryopipe_{k}": v for k, v in settings.items()}
    write_star(star_path, blocks)
    return stack_path, star_path


def read_template_maps(base: str | os.PathLike, device: torch.device | str | None = None
                       ) -> tuple[TemplateMaps, dict[str, object]]:
    """Read maps written by :func:`write_template_maps`: ``(maps, settings)`` (settings without the prefix)."""
    from cryopipe.io.mrc import read_mrc
    from cryopipe.io.star import read_star

    stack_path, star_path = template_maps_paths(base)
    for p in (stack_path, star_path):
        if not p.exists():
            raise InputFileError(p, "FOM map file not found (--read_fom_maps)",
                                 "run once with --write_fom_maps on these micrographs, or leave out --read_fom_maps")
    blocks = read_star(star_path)
    info = blocks.get("fom_maps")
    refs = blocks.get("references")
    if not isinstance(info, dict) or not isinstance(refs, pd.DataFrame):
        raise InputFileError(star_path, "has no fom_maps / references blocks", "re-create it with --write_fom_maps")
    data, _ = read_mrc(stack_path)
    n_ref = int(info["cryopipeNumberOfReferences"])
    w = int(info["cryopipeWorkSize"])
    k = len(MAP_SECTIONS)
    if data.ndim != 3 or data.shape != (k + 2 * n_ref, w, w):
        raise InputFileError(stack_path, f"shape {data.shape} does not match {star_path.name} "
                                         f"({k + 2 * n_ref} sections of {w}x{w})", "re-create it with --write_fom_maps")
    t = torch.from_numpy(data)
    if device is not None:
        t = t.to(device)
    per_ref = t[k:].reshape(n_ref, 2, w, w)
    maps = TemplateMaps(fom=per_ref[:, 0].contiguous(), psi=per_ref[:, 1].contiguous(), stddev=t[3].contiguous(),
                        mean=t[4].contiguous(),
                        expected_ratio=torch.tensor(refs["cryopipeExpectedRatio"].to_numpy(dtype=np.float64)),
                        work_size=w, size=int(info["cryopipeSquareSize"]),
                        shape=(int(info["rlnImageSizeY"]), int(info["rlnImageSizeX"])),
                        pixel_size=float(info["rlnMicrographPixelSize"]), box=int(info["rlnImageSize"]),
                        radius_px=int(info["cryopipeParticleRadius"]),
                        particle_diameter=float(info["rlnParticleDiameter"]))
    settings = blocks.get("settings")
    settings = {str(key).removeprefix("cryopipe_"): v for key, v in settings.items()} if isinstance(settings, dict) else {}
    return maps, settings


def make_template_picker(refs: TemplateReferences, options: TemplateOptions, *,
                         maps_base: Callable[[object], str | os.PathLike] | None = None, write_maps: bool = False,
                         read_maps: bool = False, warn: Callable[[str], None] | None = None
                         ) -> Callable[[torch.Tensor, float, object], PickTable]:
    """A picking function ``(micrograph, pixel_size, ctx) -> PickTable`` for the ``autopick`` job's driver.

    ``ctx`` is any object with ``index`` (micrograph number, 0-based: padding seed ``random_seed + index``),
    ``name`` and ``ctf`` (CTF parameters or None). ``maps_base(ctx)`` gives the FOM-map root of a micrograph
    (needed with ``write_maps`` / ``read_maps``). With ``read_maps`` the maps are read instead of computed
    (the micrograph is not used) and ``warn`` is called when they were made with other map settings.
    """
    if (write_maps or read_maps) and maps_base is None:
        raise ValueError("make_template_picker: write_maps/read_maps need maps_base")
    settings = dict(options.map_settings(), n_references=len(refs), psi_step=psi_sampling(refs.psi_step)[0],
                    particle_diameter=refs.particle_diameter, box=refs.box)

    def pick(micrograph: torch.Tensor, pixel_size: float, ctx) -> PickTable:
        if abs(pixel_size - refs.pixel_size) > 1e-6:
            raise CryopipeError(f"micrograph pixel size {pixel_size} Å differs from the references' preparation "
                                f"({refs.pixel_size} Å)")
        if read_maps:
            maps, stored = read_template_maps(maps_base(ctx), device=micrograph.device)
            diff = [key for key, v in settings.items() if key in stored and not _same(stored[key], v)]
            if diff and warn is not None:
                warn(f"{ctx.name}: FOM maps were made with other settings ({', '.join(diff)}); they are used as they are")
        else:
            maps = template_maps_for(micrograph, refs, options, ctx.ctf, options.random_seed + int(ctx.index))
            if write_maps:
                write_template_maps(maps_base(ctx), maps, refs.names, settings)
        return template_pick_from_maps(maps, **options.pick_settings())

    return pick


def _same(a: object, b: object) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(a) == str(b)
