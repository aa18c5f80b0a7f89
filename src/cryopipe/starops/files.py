"""The STAR operations file in → file out (``cryopipe star``; semantics: :mod:`cryopipe.starops`): each reads
the input, runs the table operation of :mod:`cryopipe.starops.tables` and writes the output atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.starops.document import (
    _expand_inputs,
    _image_root,
    _insert_before_extension,
    _pixel_sizes_or_none,
    _say,
    _warn,
    _write_doc,
    read_doc,
)
from cryopipe.starops.tables import (
    combine_tables,
    downgrade_table,
    duplicate_mask,
    image_stats_mask,
    particle_centres,
    recenter_table,
    select_range_mask,
    select_str_mask,
    split_indices,
)


def center_star(input_star, output_star, center_px: Sequence[float], tablename: str | None = None) -> Path:
    """Re-centre the particles of ``input_star`` on reference point ``center_px`` (pixels); writes ``output_star``.

    Tomography particle files (RELION 4/5 ``rlnTomoName`` + 3D origins) are re-centred like ``relion_star_handler``:
    3D origins, pixel size = rlnImagePixelSize of the optics group (else rlnTomoTiltSeriesPixelSize ×
    rlnTomoSubtomogramBinning), particle angles rlnAngle* only (origins live in the subtomogram frame, so
    rlnTomoSubtomogram* are not used); data_general and every other block are kept."""
    doc = read_doc(input_star, tablename)
    if doc.optics is None and "rlnTomoName" in doc.table.columns and "rlnOriginXAngst" in doc.table.columns:
        raise InputFileError(doc.path, "tomography particles without data_optics: the pixel size of the origins is "
                                       "unknown", "re-centre the particles.star written by subtomogram extraction "
                                                  "(it has data_optics with rlnImagePixelSize)")
    apix = None
    if "rlnOriginXAngst" in doc.table.columns:
        apix = _pixel_sizes_or_none(doc)
    table = recenter_table(doc.table, center_px, apix, where=doc.path)
    return _write_doc(output_star, doc, table)


@dataclass
class SelectResult:
    output: Path
    n_input: int
    n_selected: int


def select_star(input_star, output_star, label: str | None = None, minval: float = -99999999.0,
                maxval: float = 99999999.0, *, str_label: str | None = None, include: str | None = None,
                exclude: str | None = None, tablename: str | None = None) -> SelectResult:
    """Keep the rows selected by value range (``label``) or by string (``str_label``) and write them."""
    doc = read_doc(input_star, tablename)
    if label is not None:
        mask = select_range_mask(doc.table, label, minval, maxval, where=doc.path)
    elif str_label is not None:
        mask = select_str_mask(doc.table, str_label, include, exclude, where=doc.path)
    else:
        raise CryopipeError("select: give --select LABEL or --select_by_str LABEL")
    out = _write_doc(output_star, doc, doc.table.loc[mask])
    return SelectResult(out, len(doc.table), int(mask.sum()))


def split_star(input_star, output_star, nr_split: int = -1, size_split: int = -1, random_order: bool = False,
               random_seed: int = -1, tablename: str | None = None) -> list[Path]:
    """Write ``<output>_split1.star`` … (other blocks kept in each)."""
    doc = read_doc(input_star, tablename)
    if len(doc.table) == 0:
        raise InputFileError(input_star, f"data_{doc.key} has no rows: nothing to split", "check the input file")
    parts = split_indices(len(doc.table), nr_split, size_split, random_order, random_seed)
    outs = []
    for i, idx in enumerate(parts):
        p = _write_doc(_insert_before_extension(output_star, f"_split{i + 1}"), doc, doc.table.iloc[idx])
        outs.append(p)
    return outs


@dataclass
class CombineResult:
    output: Path
    n_per_input: list[int]
    n_total: int
    n_optics_groups: int
    n_duplicates: int


def combine_stars(inputs: Sequence[str | os.PathLike], output_star, check_duplicates: str | None = None,
                  tablename: str | None = None) -> CombineResult:
    """Combine several STAR files into ``output_star`` (see module doc). RELION-3.0 inputs are converted to 3.1
    when any input has optics; all-3.0 inputs give a 3.0 output."""
    from cryopipe.io.star import write_star

    paths = _expand_inputs(inputs)
    docs = [read_doc(p, tablename) for p in paths]
    any_optics = any(d.optics is not None for d in docs)
    if any_optics:  # RELION-3.0 inputs are converted (relion_convert_star) so that optics can be merged
        pdatas = [d.particle_data() for d in docs]
        kinds = [p.block_name for p in pdatas]
        tables, optics = [p.particles for p in pdatas], [p.optics for p in pdatas]
    else:
        kinds = [d.key for d in docs]
        tables, optics = [d.table for d in docs], [None] * len(docs)
    if len(set(kinds)) > 1:
        raise CryopipeError("combine: the inputs hold different kinds of tables ("
                            + ", ".join(f"{p}: data_{k}" for p, k in zip(paths, kinds)) + ")")
    kind = kinds[0]
    out, merged_optics = combine_tables(tables, optics, [str(p) for p in paths])
    n_dup = 0
    if check_duplicates:
        if check_duplicates not in out.columns:
            raise CryopipeError(f"--check_duplicates {check_duplicates}: the combined table has no such column "
                                "(it must be present in all input files)")
        dup = out[check_duplicates].duplicated(keep="first")
        n_dup = int(dup.sum())
        for v in out.loc[dup, check_duplicates].head(10):
            _warn(f"combine: duplicate entry {v}")
        if n_dup:
            _warn(f"combine: total number of duplicate {check_duplicates} entries: {n_dup}")
    output_star = Path(output_star)
    if merged_optics is not None:
        version = next((d.version for d in docs if d.optics is not None and d.version), 30001)
        write_star(output_star, {"optics": merged_optics, kind: out}, version=version)
    else:
        write_star(output_star, {kind: out}, version=docs[0].version)
    return CombineResult(output_star, [len(t) for t in tables], len(out),
                         0 if merged_optics is None else len(merged_optics), n_dup)


@dataclass
class DuplicateResult:
    output: Path
    removed_file: Path
    n_input: int
    n_removed: int


def remove_duplicates_star(input_star, output_star, distance_A: float, image_angpix: float = -1.0,
                           tablename: str | None = None) -> DuplicateResult:
    """``relion_star_handler --remove_duplicates``: writes ``output_star`` and ``<output>_removed.star``."""
    from cryopipe.io.particles import pixel_sizes

    if not distance_A > 0:
        raise CryopipeError(f"--remove_duplicates {distance_A}: give a positive distance in Å")
    doc = read_doc(input_star, tablename)
    data = doc.particle_data()
    t = doc.table
    mic = "rlnMicrographName" if "rlnMicrographName" in t else ("rlnTomoName" if "rlnTomoName" in t else None)
    if mic is None:
        raise InputFileError(doc.path, "no rlnMicrographName or rlnTomoName column", "duplicates are looked for per "
                                                                                  "micrograph / tomogram")
    if image_angpix is None or image_angpix <= 0:
        groups_apix = pixel_sizes(data)
        image_angpix = float(groups_apix[0]) if len(groups_apix) else 1.0
        if data.optics is not None and len(data.optics) > 1:
            _warn("remove_duplicates: several optics groups; assuming the original micrographs of all of them had "
                  f"pixel size {image_angpix} Å (else split the file and remove duplicates per group)")
    centres = particle_centres(data, image_angpix)
    keep = duplicate_mask(centres, t[mic].astype(str).tolist(), distance_A / image_angpix)
    out = _write_doc(output_star, doc, t.loc[keep])
    removed = _write_doc(Path(output_star).with_name(Path(output_star).stem + "_removed.star"), doc, t.loc[~keep])
    return DuplicateResult(out, removed, len(t), int((~keep).sum()))


def image_stats(image_names: Sequence[str], root_dir: str | os.PathLike = ".", batch: int = 512,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of every image, ``([N], [N])`` float64 (batched, in torch)."""
    from cryopipe.core.device import resolve_device
    from cryopipe.io.mrc import ImageReader

    dev = resolve_device(device)
    reader = ImageReader(list(image_names), root_dir)
    n = len(reader)
    means = torch.empty(n, dtype=torch.float64)
    stds = torch.empty(n, dtype=torch.float64)
    try:
        for s in range(0, n, batch):
            idx = np.arange(s, min(n, s + batch))
            x = torch.from_numpy(reader.read(idx)).to(dev, torch.float64).reshape(len(idx), -1)
            means[s:s + len(idx)] = x.mean(dim=1).cpu()
            stds[s:s + len(idx)] = x.std(dim=1, unbiased=False).cpu()
    finally:
        reader.close()
    return means, stds


def discard_on_stats_star(input_star, output_star, label: str = "rlnImageName", sigma: float = 4.0,
                          tablename: str | None = None) -> SelectResult:
    """Drop images with outlying mean/stddev (see :func:`image_stats_mask`) and write the rest."""
    doc = read_doc(input_star, tablename)
    if label not in doc.table.columns:
        raise InputFileError(doc.path, f"no {label} column", "give the image column with --discard_label")
    names = doc.table[label].astype(str).tolist()
    means, stds = image_stats(names, _image_root(doc, names))
    _say(f"discard_on_stats: [average, stddev] of the image averages = [{float(means.mean()):.6g}, "
         f"{float(means.std(unbiased=False)):.6g}], of the image stddevs = [{float(stds.mean()):.6g}, "
         f"{float(stds.std(unbiased=False)):.6g}]")
    keep = image_stats_mask(means, stds, sigma)
    out = _write_doc(output_star, doc, doc.table.loc[keep])
    return SelectResult(out, len(doc.table), int(keep.sum()))


def convert_star(input_star, output_star, output_version: str | None = None) -> Path:
    """Full RELION 3.0 ↔ 3.1 conversion (default: the other layout of the input)."""
    from cryopipe.io.particles import read_particles, write_particles

    data = read_particles(input_star)
    if output_version is None:
        output_version = "3.1" if data.source_version == "3.0" else "3.0"
    if output_version not in ("3.0", "3.1"):
        raise CryopipeError(f"--output_version {output_version}: use 3.0 or 3.1")
    star_version = data.file_version if (data.source_version == "3.1" and data.file_version) else 30001
    write_particles(output_star, data, version=output_version, star_version=star_version)
    return Path(output_star)


def downgrade_output_path(input_star: str | os.PathLike) -> Path:
    """``dynamo2m``'s default: ``<dir>/<stem>_rln3.0.star``."""
    p = Path(input_star)
    return p.parent / (p.stem + "_rln3.0.star")


def downgrade_star(input_star, output_star=None, coord_angpix: float | None = None) -> Path:
    """Write the Warp/M 3.0 table of ``input_star`` (default output ``<stem>_rln3.0.star``)."""
    from cryopipe.io.particles import read_particles
    from cryopipe.io.star import write_star

    data = read_particles(input_star)
    out = Path(output_star) if output_star else downgrade_output_path(input_star)
    write_star(out, {"": downgrade_table(data, coord_angpix)}, version=None)
    return out
