"""The STAR operations on tables (pandas DataFrames), no files: re-centring, selection masks, splits, combining
with optics-group merging, duplicate masks, image-statistics masks and the Warp/M downgrade
(semantics: :mod:`cryopipe.starops`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.starops.document import _numeric_column, _say, _warn


_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


# optics columns RELION fills when only some of the combined files have them, with their neutral values
_OPTICS_FILL = {
    "rlnBeamTiltX": 0.0, "rlnBeamTiltY": 0.0,
    "rlnMagMat00": 1.0, "rlnMagMat01": 0.0, "rlnMagMat10": 0.0, "rlnMagMat11": 1.0,
    "rlnOddZernike": "[0,0,0,0,0,0]", "rlnEvenZernike": "[0,0,0,0,0,0,0,0,0]",
    "rlnCtfDataAreCtfPremultiplied": 0,
}


# optics values that must agree for two groups with the same name to be joined
_OPTICS_MUST_AGREE = ("rlnImagePixelSize", "rlnMicrographPixelSize", "rlnVoltage", "rlnSphericalAberration",
                      "rlnAmplitudeContrast", "rlnImageSize", "rlnImageDimensionality")


def recenter_table(table: pd.DataFrame, center_px: Sequence[float], pixel_size: np.ndarray | float | None = None,
                   where="<table>") -> pd.DataFrame:
    """``relion_star_handler --center`` on one table (a copy is returned).

    ``center_px``: ``(x, y, z)`` reference pixels from the box centre. Origins in Å (``rlnOriginX/YAngst`` and
    ``rlnOriginZAngst`` when present) need ``pixel_size`` (Å/px, scalar or per row); RELION-3.0 origins
    ``rlnOriginX/Y(/Z)`` (pixels) are shifted in pixels. Absent angle columns count as 0.
    """
    from cryopipe.core.geometry import recenter_origins

    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(table.columns):
        labels = ["rlnOriginXAngst", "rlnOriginYAngst"] + (["rlnOriginZAngst"] if "rlnOriginZAngst" in table else [])
        if pixel_size is None:
            raise InputFileError(where, "origins are in Å but there is no pixel size (no data_optics table)",
                                 "give a RELION 3.1+ particles file with data_optics")
        apix = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (len(table),))
    elif {"rlnOriginX", "rlnOriginY"} <= set(table.columns):
        labels = ["rlnOriginX", "rlnOriginY"] + (["rlnOriginZ"] if "rlnOriginZ" in table else [])
        apix = np.ones(len(table))
    else:
        raise InputFileError(where, "no rlnOriginXAngst/rlnOriginYAngst (or 3.0 rlnOriginX/Y) columns to re-centre",
                             "re-centring needs refined particles (angles and origins)")
    angles = np.stack([_numeric_column(table, a, where) if a in table else np.zeros(len(table)) for a in _ANGLES], 1)
    origins = np.stack([_numeric_column(table, lab, where) for lab in labels], 1)
    new = recenter_origins(torch.from_numpy(angles), torch.from_numpy(origins),
                           torch.as_tensor(list(center_px), dtype=torch.float64), torch.from_numpy(apix.copy()))
    out = table.copy()
    new_np = new.cpu().numpy()
    for j, lab in enumerate(labels):
        out[lab] = new_np[:, j]
    return out


def select_range_mask(table: pd.DataFrame, label: str, minval: float = -99999999.0, maxval: float = 99999999.0,
                      where="<table>") -> np.ndarray:
    """Rows with ``minval ≤ label ≤ maxval`` (RELION's inclusive ``subsetMetaDataTable``)."""
    vals = _numeric_column(table, label, where)
    if minval > maxval:
        raise CryopipeError(f"--minval {minval} is larger than --maxval {maxval}: nothing could be selected")
    return (vals >= minval) & (vals <= maxval)


def select_str_mask(table: pd.DataFrame, label: str, include: str | None = None, exclude: str | None = None,
                    where="<table>") -> np.ndarray:
    """Rows whose ``label`` string contains ``include`` (or does not contain ``exclude``); exactly one given."""
    if (include is None) == (exclude is None):
        raise CryopipeError("--select_by_str needs exactly one of --select_include or --select_exclude")
    if label not in table.columns:
        raise InputFileError(where, f"no {label} column", "choose a string column of the table")
    found = table[label].astype(str).str.contains(include if include is not None else exclude, regex=False)
    found = found.to_numpy(bool)
    return found if include is not None else ~found


def split_indices(n: int, nr_split: int = -1, size_split: int = -1, random_order: bool = False,
                  random_seed: int = -1) -> list[np.ndarray]:
    """Row indices of each output of ``relion_star_handler --split`` (see module doc). ``random_seed < 0``: a
    fresh random order."""
    if n == 0:
        raise CryopipeError("--split: the input table is empty")
    if nr_split <= 0 and size_split <= 0:
        raise CryopipeError("--split needs --nr_split N or --size_split M (a positive number)")
    if nr_split <= 0:
        nr_split = math.ceil(n / size_split)
    elif size_split <= 0:
        size_split = math.ceil(n / nr_split)
    order = np.arange(n)
    if random_order:
        rng = np.random.default_rng(None if random_seed < 0 else random_seed)
        order = rng.permutation(n)
    return [order[i * size_split: min((i + 1) * size_split, n)] for i in range(nr_split)]


def _common_columns(tables: Sequence[pd.DataFrame], what: str, names: Sequence) -> list[str]:
    first = list(tables[0].columns)
    common = [c for c in first if all(c in t.columns for t in tables[1:])]
    for t, name in zip(tables, names):
        dropped = [c for c in t.columns if c not in common]
        if dropped:
            _warn(f"combine: ignoring {', '.join(dropped)} of {name} ({what}): not present in all files")
    return common


def combine_tables(particles: Sequence[pd.DataFrame], optics: Sequence[pd.DataFrame | None],
                   names: Sequence = ()) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Concatenate particle tables and merge their optics tables as ``relion_star_handler --combine``.

    Args:
        particles: the tables, in order.
        optics: their optics tables (all DataFrames, or all None for tables without optics).
        names: file names for messages.

    Returns:
        ``(particles, optics)`` — optics None when the inputs had none.
    """
    names = list(names) or [f"input {i + 1}" for i in range(len(particles))]
    if len(particles) < 2:
        raise CryopipeError("--combine needs at least two input STAR files (--i \"a.star b.star\")")
    has_optics = [o is not None for o in optics]
    if any(has_optics) and not all(has_optics):
        raise CryopipeError("combine: some inputs have data_optics and some do not (internal: convert them first)")
    parts = [p.copy() for p in particles]
    merged_optics = None
    if all(has_optics):
        opt = [o.copy() for o in optics]
        for o, name in zip(opt, names):
            for lab in ("rlnOpticsGroup", "rlnOpticsGroupName"):
                if lab not in o.columns:
                    raise InputFileError(name, f"data_optics has no {lab} column",
                                         "RELION names every optics group (rlnOpticsGroupName)")
        uniq = [str(v) for v in opt[0]["rlnOpticsGroupName"]]
        first_by_name = {str(r["rlnOpticsGroupName"]): r for _, r in opt[0].iterrows()}
        for i in range(1, len(opt)):
            o, p = opt[i], parts[i]
            if "rlnOpticsGroup" not in p.columns:
                raise InputFileError(names[i], "the particles have no rlnOpticsGroup column",
                                     "add it (1 for one group)")
            old = p["rlnOpticsGroup"].to_numpy()
            new = old.copy()
            keep_rows = []
            for j, row in o.iterrows():
                name = str(row["rlnOpticsGroupName"])
                if name in uniq:
                    g = uniq.index(name) + 1
                    ref = first_by_name[name]
                    for lab in _OPTICS_MUST_AGREE:
                        if lab in o.columns and lab in ref.index and not _same_value(row[lab], ref[lab]):
                            raise InputFileError(names[i], f"optics group {name!r} has {lab} {row[lab]} but "
                                                           f"{ref[lab]} in an earlier file",
                                                 "give the groups different rlnOpticsGroupName values before "
                                                 "combining")
                    _say(f"combine: joining optics groups named {name} (group {g})")
                else:
                    uniq.append(name)
                    g = len(uniq)
                    first_by_name[name] = row
                    keep_rows.append(j)
                if int(row["rlnOpticsGroup"]) != g:
                    _say(f"combine: renumbering optics group {name} of {names[i]} from {int(row['rlnOpticsGroup'])} "
                         f"to {g}")
                new[old == row["rlnOpticsGroup"]] = g
                o.loc[j, "rlnOpticsGroup"] = g
            p["rlnOpticsGroup"] = new.astype(np.int64)
            if "rlnGroupName" in p.columns:
                p["rlnGroupName"] = ["optics" + str(int(g)) + "_" + str(s) for g, s in zip(new, p["rlnGroupName"])]
            opt[i] = o.loc[keep_rows]
        for lab, val in _OPTICS_FILL.items():
            present = [lab in o.columns for o in opt]
            if any(present) and not all(present):
                for o in opt:
                    if lab not in o.columns:
                        o[lab] = val
        opt_nonempty = [o for o in opt if len(o)]
        cols = _common_columns(opt_nonempty, "optics", names)
        merged_optics = pd.concat([o[cols] for o in opt_nonempty], ignore_index=True)
        merged_optics["rlnOpticsGroup"] = merged_optics["rlnOpticsGroup"].astype(np.int64)
    cols = _common_columns(parts, "particles", names)
    out = pd.concat([p[cols] for p in parts], ignore_index=True)
    if "rlnGroupNumber" in out.columns:
        out = out.drop(columns=["rlnGroupNumber"])
    return out, merged_optics


def _same_value(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def particle_centres(data, extract_angpix: float) -> np.ndarray:
    """Particle centres in micrograph pixels ``[N, 2|3]``: ``rlnCoordinate − rlnOrigin…Angst / extract_angpix``
    (``data``: :class:`~cryopipe.io.particles.ParticleData`; z when ``rlnCoordinateZ`` exists)."""
    t = data.particles
    where = data.path or "<particles>"
    axes = "XYZ" if "rlnCoordinateZ" in t.columns else "XY"
    cols = []
    for a in axes:
        c = _numeric_column(t, f"rlnCoordinate{a}", where)
        o = _numeric_column(t, f"rlnOrigin{a}Angst", where) if f"rlnOrigin{a}Angst" in t else np.zeros(len(t))
        cols.append(c - o / extract_angpix)
    return np.stack(cols, axis=1)


def duplicate_mask(centres_px: np.ndarray, groups: Sequence, threshold_px: float) -> np.ndarray:
    """``True`` for rows to **keep**: RELION's ``removeDuplicatedParticles`` — a particle is removed when a later
    particle (file order) of the same group (micrograph) lies within ``threshold_px`` (≤) of it."""
    from scipy.spatial import cKDTree

    n = len(centres_px)
    keep = np.ones(n, dtype=bool)
    if n < 2 or threshold_px < 0:
        return keep
    codes, _ = pd.factorize(pd.Series(list(groups), dtype=object))
    # one KD-tree over all particles; different micrographs are put far apart along an extra axis
    sep = 4.0 * float(threshold_px) + 1.0
    pts = np.concatenate([np.asarray(centres_px, np.float64), (codes.astype(np.float64) * sep)[:, None]], axis=1)
    pairs = cKDTree(pts).query_pairs(float(threshold_px), output_type="ndarray")
    if len(pairs):
        pairs = pairs[codes[pairs[:, 0]] == codes[pairs[:, 1]]]
        keep[np.minimum(pairs[:, 0], pairs[:, 1])] = False
    return keep


def image_stats_mask(means: torch.Tensor, stds: torch.Tensor, sigma: float = 4.0) -> np.ndarray:
    """Rows to keep: mean and stddev both strictly within ``sigma`` ensemble standard deviations of the ensemble
    averages (``relion_star_handler --discard_on_stats``)."""
    m, s = means.to(torch.float64), stds.to(torch.float64)
    mu_m, sd_m = m.mean(), m.std(unbiased=False)
    mu_s, sd_s = s.mean(), s.std(unbiased=False)
    ok = (m > mu_m - sigma * sd_m) & (m < mu_m + sigma * sd_m) & (s > mu_s - sigma * sd_s) & (s < mu_s + sigma * sd_s)
    return ok.cpu().numpy()


def downgrade_table(data, coord_angpix: float | None = None) -> pd.DataFrame:
    """The Warp/M RELION-3.0 table of ``data`` (:class:`~cryopipe.io.particles.ParticleData`), ``dynamo2m``
    ``relion_star_downgrade`` semantics (see module doc)."""
    from cryopipe.io.particles import pixel_sizes

    t = data.particles
    where = data.path or "<particles>"
    for lab in ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY") + _ANGLES:
        if lab not in t.columns:
            raise InputFileError(where, f"no {lab} column",
                                 "Warp/M need rlnMicrographName, coordinates and angles of refined particles")
    apix = pixel_sizes(data) if coord_angpix is None else np.full(len(t), float(coord_angpix))
    axes = "XYZ" if "rlnCoordinateZ" in t.columns else "XY"
    out = pd.DataFrame({"rlnMicrographName": t["rlnMicrographName"].astype(str).to_numpy()})
    for a in axes:
        c = _numeric_column(t, f"rlnCoordinate{a}", where)
        o = _numeric_column(t, f"rlnOrigin{a}Angst", where) if f"rlnOrigin{a}Angst" in t else np.zeros(len(t))
        out[f"rlnCoordinate{a}"] = c - o / apix
    for a in _ANGLES:
        out[a] = _numeric_column(t, a, where)
    return out
