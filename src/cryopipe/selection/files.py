"""Class selection on the files of a 2D classification (RELION ``relion_refine`` or ``cryopipe class2d``).

Input: ``run_itNNN_optimiser.star`` (names its model and data STAR files), ``run_itNNN_model.star`` or
``run_itNNN_data.star`` (the others are found by replacing the ``_model`` / ``_data`` / ``_optimiser``
suffix). File names inside these STAR files (``rlnModelStarFile``, ``rlnReferenceImage``
``000003@Class2D/job008/run_it025_classes.mrcs``, ``rlnImageName``) are relative to the project directory
(``root``, where RELION ran); names that only exist relative to the folder of the STAR file that names them
(e.g. a classification run in its own folder, like the RELION fixtures) are also found.

Outputs of :func:`select_classes` in ``output_dir`` (what RELION's Select job writes, plus a gallery):

* ``particles.star`` – the particles of the selected classes, in input order, every block of the data STAR
  kept (``optics`` table, STAR version); with ``regroup`` new ``rlnGroupName``/``rlnGroupNumber``. Image names
  that are not valid relative to ``root`` but are relative to the data STAR's folder are rewritten relative to
  ``root``.
* ``class_averages.star`` (2D runs) – the selected classes in ``sort_by`` order: the ``data_model_classes``
  columns (``rlnReferenceImage`` pointing at an existing image, ``rlnClassDistribution``,
  ``rlnAccuracyRotations``, ``rlnEstimatedResolution`` …) plus ``rlnClassNumber`` and ``rlnClassScore``
  (when the class averages could be read). Usable directly as template-picking references.
* ``class_averages.mrcs`` (with ``recenter``) – the selected averages re-centred on the centre of mass of their
  white density inside a soft mask of the particle diameter, iterated
  (:func:`cryopipe.selection.classes.recenter_images`), referenced by ``class_averages.star``.
* ``backup_selection.star`` – ``rlnSelected`` 0/1 per class in class order (as RELION's Select writes).
* ``class_scores.star`` – every class with its score and score components (2D runs with readable images).
* ``class_averages.png`` – gallery of all classes in ``sort_by`` order, selected ones framed
  (:func:`cryopipe.selection.gallery.write_class_gallery`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryopipe.errors import CryopipeError, InputFileError
from cryopipe.selection.classes import (
    auto_select,
    class_counts,
    parse_class_numbers,
    recenter_images,
    regroup_particles,
    score_classes,
    solvent_radius,
    sort_order,
)

__all__ = ["Class2DRun", "find_class2d_run", "read_class_images", "ClassSelectResult", "select_classes",
           "resolve_name"]


# ------------------------------------------------------------------------------------------------ inputs


def resolve_name(name: str, bases: Sequence[Path]) -> Path | None:
    """The file ``name`` (absolute, or relative to one of ``bases`` in turn), or None if it exists nowhere."""
    p = Path(name)
    if p.is_absolute():
        return p if p.exists() else None
    for b in bases:
        q = Path(b) / p
        if q.exists():
            return q
    return None


def _name_relative_to_root(name: str, bases: Sequence[Path], root: Path) -> str:
    """``name`` if it is valid relative to ``root`` (or absolute), else the file found relative to ``bases``,
    named relative to ``root`` when it lies inside it and by its absolute path otherwise (unchanged if not
    found)."""
    p = Path(name)
    if p.is_absolute() or (root / p).exists():
        return name
    found = resolve_name(name, bases)
    return name if found is None else _project_name(found, root)


def _project_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else absolute (valid wherever the project is used from)."""
    full, top = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return full.relative_to(top).as_posix()
    except ValueError:
        return full.as_posix()


def _relocate_image_names(names: pd.Series, bases: Sequence[Path], root: Path) -> pd.Series:
    """Image names ``NNN@file`` with each file made valid relative to ``root`` (see
    :func:`_name_relative_to_root`); the number part is kept as written."""
    if len(names) == 0:
        return names
    s = names.astype(str)
    parts = s.str.partition("@")
    has_at = parts[1] == "@"
    files = parts[2].where(has_at, parts[0])
    mapping = {f: _name_relative_to_root(f, bases, root) for f in pd.unique(files)}
    if all(k == v for k, v in mapping.items()):
        return names
    new_files = files.map(mapping)
    return (parts[0] + "@" + new_files).where(has_at, new_files)


def _sibling(path: Path, suffixes: Sequence[str], new: str) -> Path | None:
    name = path.name
    for suf in suffixes:
        if name.endswith(suf):
            return path.with_name(name[: -len(suf)] + new)
    return None


@dataclass
class Class2DRun:
    """The files of one iteration of a classification run, read."""

    model_star: Path
    data_star: Path
    optimiser_star: Path | None
    root: Path
    general: dict
    classes: pd.DataFrame               # data_model_classes, with rlnClassNumber 1..K added
    groups: pd.DataFrame | None         # data_model_groups
    model_version: int | None
    data_blocks: dict
    data_version: int | None
    particles_key: str
    particle_diameter: float | None     # Å, from the optimiser (rlnParticleDiameter), when known
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def particles(self) -> pd.DataFrame:
        return self.data_blocks[self.particles_key]

    @property
    def dimensionality(self) -> int:
        return int(self.general.get("rlnReferenceDimensionality", 2))

    @property
    def pixel_size(self) -> float:
        """Å per pixel of the class averages (``rlnPixelSize`` of ``data_model_general``; 0 if unknown)."""
        v = self.general.get("rlnPixelSize")
        try:
            return float(v) if v is not None else 0.0
        except (TypeError, ValueError):
            return 0.0

    def bases(self, star: Path) -> list[Path]:
        """Folders that names inside ``star`` are looked up in: the project root, then the STAR's folder."""
        return [self.root, star.parent]


def _read_blocks(path: Path) -> tuple[dict, int | None]:
    from cryopipe.io.star import read_star_with_version

    if not path.is_file():
        raise InputFileError(path, "file not found", "give a run_itNNN_optimiser.star, _model.star or _data.star")
    return read_star_with_version(path)


def _particles_key(blocks: dict) -> str | None:
    if isinstance(blocks.get("particles"), pd.DataFrame):
        return "particles"
    for name, b in blocks.items():
        if isinstance(b, pd.DataFrame) and "rlnImageName" in b:
            return name
    return None


def _class_numbers(values: pd.Series, path: Path) -> np.ndarray:
    """``rlnClassNumber`` as int64, or a one-line error naming the first particle whose value is not an integer."""
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num) | (num != np.round(num))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputFileError(path, f"rlnClassNumber of particle {i + 1} is {values.iloc[i]!r}, not a class number",
                             "give the data.star of a classification")
    return num.astype(np.int64)


def find_class2d_run(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Class2DRun:
    """Read a classification run from its optimiser, model or data STAR file.

    Args:
        path: ``run_itNNN_optimiser.star`` | ``run_itNNN_model.star`` | ``run_itNNN_data.star``.
        root: project directory that names inside the files are relative to (default: current directory).
    """
    path = Path(path)
    root = Path(root) if root is not None else Path(".")
    blocks, version = _read_blocks(path)
    optimiser: Path | None = None
    model: Path | None = None
    data: Path | None = None
    diameter: float | None = None
    if isinstance(blocks.get("optimiser_general"), dict):
        optimiser = path
        og = blocks["optimiser_general"]
        for label in ("rlnModelStarFile", "rlnExperimentalDataStarFile"):
            if not og.get(label):
                raise InputFileError(path, f"data_optimiser_general has no {label}", "give the model.star instead")
        model = resolve_name(str(og["rlnModelStarFile"]), [root, path.parent])
        data = resolve_name(str(og["rlnExperimentalDataStarFile"]), [root, path.parent])
        if model is None or data is None:
            missing = og["rlnModelStarFile"] if model is None else og["rlnExperimentalDataStarFile"]
            raise InputFileError(path, f"names {missing}, which does not exist relative to {root} or {path.parent}",
                                 "run from the project directory or give the model.star")
    elif isinstance(blocks.get("model_classes"), pd.DataFrame):
        model = path
        data = _sibling(path, ("_model.star",), "_data.star")
        if data is None or not data.is_file():
            what = data.name if data else "the name must end in _model.star"
            raise InputFileError(path, f"no data STAR next to it ({what})", "give the run_itNNN_data.star or "
                                                                            "optimiser.star")
    else:
        key = _particles_key(blocks)
        if key is None or "rlnClassNumber" not in blocks[key]:
            raise InputFileError(path, "is not a classification optimiser/model/data STAR (no data_optimiser_general,"
                                       " data_model_classes or particles with rlnClassNumber)",
                                 "give Class2D/jobNNN/run_itNNN_optimiser.star")
        data = path
        model = _sibling(path, ("_data.star",), "_model.star")
        if model is None or not model.is_file():
            what = model.name if model else "the name must end in _data.star"
            raise InputFileError(path, f"no model STAR next to it ({what})", "give the run_itNNN_model.star or "
                                                                             "optimiser.star")
    if optimiser is None:
        cand = _sibling(model, ("_model.star",), "_optimiser.star")
        optimiser = cand if cand is not None and cand.is_file() else None
    if optimiser is not None:
        ob = blocks if optimiser == path else _read_blocks(optimiser)[0]
        try:
            diameter = float(ob.get("optimiser_general", {}).get("rlnParticleDiameter"))
        except (TypeError, ValueError):
            diameter = None

    mblocks, mversion = (blocks, version) if model == path else _read_blocks(model)
    classes = mblocks.get("model_classes")
    if not isinstance(classes, pd.DataFrame) or len(classes) == 0:
        raise InputFileError(model, "has no data_model_classes table", "give the model.star of a classification")
    for label in ("rlnReferenceImage", "rlnClassDistribution"):
        if label not in classes:
            raise InputFileError(model, f"data_model_classes has no {label} column", "give a relion_refine model.star")
    classes = classes.reset_index(drop=True).copy()
    classes["rlnClassNumber"] = np.arange(1, len(classes) + 1, dtype=np.int64)
    general = mblocks.get("model_general") if isinstance(mblocks.get("model_general"), dict) else {}
    groups = mblocks.get("model_groups") if isinstance(mblocks.get("model_groups"), pd.DataFrame) else None

    dblocks, dversion = (blocks, version) if data == path else _read_blocks(data)
    key = _particles_key(dblocks)
    if key is None:
        raise InputFileError(data, "has no particles table (rlnImageName)", "give the run_itNNN_data.star")
    if "rlnClassNumber" not in dblocks[key]:
        raise InputFileError(data, "particles have no rlnClassNumber column", "give the data.star of a classification")
    dblocks = dict(dblocks)
    dblocks[key] = dblocks[key].copy()
    dblocks[key]["rlnClassNumber"] = _class_numbers(dblocks[key]["rlnClassNumber"], data)
    run = Class2DRun(model_star=model, data_star=data, optimiser_star=optimiser, root=root, general=dict(general),
                     classes=classes, groups=groups, model_version=mversion, data_blocks=dict(dblocks),
                     data_version=dversion, particles_key=key, particle_diameter=diameter)
    run.counts = class_counts(run.particles["rlnClassNumber"], run.n_classes)
    return run


def read_class_images(run: Class2DRun, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """The class averages named in ``rlnReferenceImage`` as ``[K, N, N]`` float32 on ``device`` (CPU default),
    and their pixel size in Å (model ``rlnPixelSize``, else the MRC header)."""
    from cryopipe.io.mrc import MrcStack, parse_image_names

    if run.dimensionality != 2:
        raise CryopipeError(f"{run.model_star}: class averages are {run.dimensionality}D; image-based scores, "
                            "re-centring and galleries need a 2D classification")
    idx, files = parse_image_names(run.classes["rlnReferenceImage"])
    out: list[np.ndarray | None] = [None] * len(idx)
    apix = 0.0
    for f in pd.unique(files):
        fpath = resolve_name(str(f), run.bases(run.model_star))
        if fpath is None:
            raise InputFileError(run.model_star, f"rlnReferenceImage file {f} not found relative to {run.root} or "
                                                 f"{run.model_star.parent}", "run from the project directory")
        rows = np.flatnonzero(files == f)
        with MrcStack(fpath) as st:
            if idx[rows].max() >= len(st):
                raise InputFileError(fpath, f"has {len(st)} images but rlnReferenceImage asks for image "
                                            f"{int(idx[rows].max()) + 1}", "use the classes stack of the same run")
            imgs = st[idx[rows]]
            apix = apix or float(st.pixel_size)
        for j, r in enumerate(rows.tolist()):
            out[r] = imgs[j]
    stack = np.stack(out).astype(np.float32, copy=False)
    finite = np.isfinite(stack).reshape(len(stack), -1).all(axis=1)
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        raise InputFileError(resolve_name(str(files[k]), run.bases(run.model_star)) or files[k],
                             f"the average of class {k + 1} (image {int(idx[k]) + 1}) has NaN or infinite pixels",
                             "re-run the classification, or select classes by number without --auto/--recenter")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return torch.from_numpy(stack).to(dev), (run.pixel_size or apix)


# ------------------------------------------------------------------------------------------------ selection


@dataclass
class ClassSelectResult:
    """What :func:`select_classes` wrote and chose."""

    particles_star: Path
    class_averages_star: Path | None
    class_averages_stack: Path | None
    gallery_png: Path | None
    backup_selection_star: Path
    class_scores_star: Path | None
    selected: list[int]                 # class numbers, in output (sort) order
    n_particles_in: int
    n_particles_selected: int
    scores: pd.DataFrame | None         # one row per class (class order) with the score components
    n_groups: int | None = None
    recenter_shifts: np.ndarray | None = None   # [n_selected, 2] (dx, dy) px applied, output order


def _scores_table(run: Class2DRun, images: torch.Tensor, mask_radius: float) -> pd.DataFrame:
    cl = run.classes

    def col(label: str):
        return cl[label].to_numpy(dtype=np.float64) if label in cl else None

    res = col("rlnEstimatedResolution")
    if res is None:
        res = np.full(len(cl), float(run.general.get("rlnCurrentResolution", 999.0) or 999.0))
    sc = score_classes(images, distribution=col("rlnClassDistribution"), estimated_resolution=res,
                       accuracy_rotations=col("rlnAccuracyRotations"),
                       accuracy_translations=col("rlnAccuracyTranslationsAngst"), counts=run.counts,
                       mask_radius_px=mask_radius)
    table = pd.DataFrame({"rlnClassNumber": cl["rlnClassNumber"].to_numpy(),
                          "rlnReferenceImage": cl["rlnReferenceImage"].astype(str).to_numpy(),
                          "rlnClassScore": sc["score"].cpu().numpy()})
    for label in ("rlnClassDistribution", "rlnEstimatedResolution", "rlnAccuracyRotations",
                  "rlnAccuracyTranslationsAngst"):
        if label in cl:
            table[label] = cl[label].to_numpy()
    table["cryopipeNrParticles"] = run.counts
    for name in ("f_img", "f_contrast", "f_shape", "f_res", "f_dist", "f_rot", "f_trans", "contrast",
                 "anisotropy", "hollowness"):
        if name in sc:
            table["cryopipeScore" + "".join(w.capitalize() for w in name.split("_"))] = sc[name].cpu().numpy()
    return table


def _write_selected_particles(run, pmask: np.ndarray, out: Path, root: Path, regroup: int, regroup_by: str,
                              say) -> tuple[Path, int | None]:
    """Write ``out/particles.star``: the run's data blocks with the particles of ``pmask`` (input order, image
    names relative to ``root``), regrouped into about ``regroup`` groups when ``regroup > 0``. Returns the path
    and the number of groups (None without regrouping)."""
    from cryopipe.io.star import write_star

    n_sel = int(pmask.sum())
    sel = run.particles.loc[pmask].reset_index(drop=True)
    if "rlnImageName" in sel:
        sel["rlnImageName"] = _relocate_image_names(sel["rlnImageName"], run.bases(run.data_star), root)
    n_groups = None
    if regroup and regroup > 0 and n_sel > 0:
        scales = None
        if run.groups is not None and {"rlnGroupNumber", "rlnGroupScaleCorrection"} <= set(run.groups.columns):
            scales = dict(zip(run.groups["rlnGroupNumber"].astype(int), run.groups["rlnGroupScaleCorrection"]))
        sel = regroup_particles(sel, regroup, by=regroup_by, group_scales=scales)
        n_groups = int(sel["rlnGroupNumber"].max())
        say(f"regrouped {n_sel} particles into {n_groups} groups (by {regroup_by})")
    dblocks = dict(run.data_blocks)
    dblocks[run.particles_key] = sel
    particles_star = out / "particles.star"
    write_star(particles_star, dblocks, version=run.data_version)
    return particles_star, n_groups


def _write_class_averages(run, table: pd.DataFrame, chosen: list[int], keep: np.ndarray, order, images, apix: float,
                          scores, mask_radius, out: Path, root: Path, *, recenter: bool, gallery: bool,
                          sort_by: str | None, reverse: bool, n_selected_particles: int, say):
    """The 2D outputs of a selection: ``class_averages.star`` (the ``chosen`` classes in display order; with
    ``recenter`` their re-centred averages in ``class_averages.mrcs``), ``class_scores.star`` (with scores) and
    the gallery PNG. Returns ``(class_averages.star, .mrcs or None, png or None, class_scores.star or None,
    re-centring shifts [n, 2] px or None)``."""
    from cryopipe.io.star import write_star

    k = run.n_classes
    n_sel = n_selected_particles
    selected_numbers = [i + 1 for i in chosen]
    ca_stack = png = scores_star = None
    shifts_out = None
    rows = table.iloc[chosen].reset_index(drop=True).copy()
    model_bases = run.bases(run.model_star)
    if recenter and len(chosen):
        from cryopipe.io.mrc import write_mrc

        rec, shifts = recenter_images(images[chosen], mask_radius)
        ca_stack = out / "class_averages.mrcs"
        write_mrc(ca_stack, rec.cpu().numpy(), apix)
        rel = _project_name(ca_stack, root)
        rows["rlnReferenceImage"] = [f"{i + 1:06d}@{rel}" for i in range(len(chosen))]
        shifts_out = shifts.cpu().numpy()
        say("re-centred class averages (shifts in px): " + ", ".join(
            f"{c}: ({s[0]:+.2f}, {s[1]:+.2f})" for c, s in zip(selected_numbers, shifts_out)))
    else:
        rows["rlnReferenceImage"] = _relocate_image_names(rows["rlnReferenceImage"], model_bases, root)
    front = ["rlnReferenceImage", "rlnClassNumber"]
    rows = rows[front + [c for c in rows.columns if c not in front]]
    ca_star = out / "class_averages.star"
    write_star(ca_star, {"": rows}, version=run.model_version if run.model_version is not None else 50001)
    if scores is not None:
        scores_star = out / "class_scores.star"
        st = scores.copy()
        st["rlnReferenceImage"] = _relocate_image_names(st["rlnReferenceImage"], model_bases, root)
        st["rlnSelected"] = keep.astype(np.int64)
        write_star(scores_star, {"model_classes": st}, version=run.model_version or 50001)
    if gallery and images is not None:
        from cryopipe.selection.gallery import write_class_gallery

        png = write_class_gallery(
            out / "class_averages.png", images, class_numbers=table["rlnClassNumber"].to_numpy(),
            distribution=table["rlnClassDistribution"].to_numpy(),
            resolution=table["rlnEstimatedResolution"].to_numpy() if "rlnEstimatedResolution" in table else None,
            scores=table["rlnClassScore"].to_numpy() if "rlnClassScore" in table else None,
            counts=run.counts, selected=keep, order=order,
            title=f"{run.model_star.name}: {len(chosen)} of {k} classes selected, {n_sel} particles"
                  + (f" (sorted by {sort_by}{', reversed' if reverse else ''})" if sort_by else ""))
    return ca_star, ca_stack, png, scores_star, shifts_out


def select_classes(input_star: str | os.PathLike, output_dir: str | os.PathLike, *,
                   select: str | Sequence[int] | None = None, auto: bool = False, min_score: float = 0.5,
                   max_score: float = math.inf, select_min_nr_particles: int = -1, select_min_nr_classes: int = -1,
                   recenter: bool = False, sort_by: str | None = "rlnClassDistribution", reverse: bool = False,
                   regroup: int = 0, regroup_by: str = "defocus", allow_empty: bool = False, gallery: bool = True,
                   particle_diameter: float | None = None, root: str | os.PathLike | None = None,
                   device: torch.device | str | None = None, log=None) -> ClassSelectResult:
    """Select classes of a classification run and write the Select-job outputs (module docstring).

    Args:
        input_star: optimiser / model / data STAR of the run.
        output_dir: folder for the outputs (created if needed).
        select: class numbers to keep (``"1,3,5-7"``, a file of numbers, or a list); exactly one of
            ``select`` / ``auto``.
        auto: keep classes by score (:func:`cryopipe.selection.classes.score_classes`) in
            ``[min_score, max_score]``, topped up to ``select_min_nr_particles`` / ``select_min_nr_classes``
            (RELION ``relion_class_ranker`` semantics).
        recenter: write re-centred averages to ``class_averages.mrcs`` (2D).
        sort_by: order of ``class_averages.star`` and the gallery (``rlnClassDistribution``,
            ``rlnAccuracyRotations``, ``rlnEstimatedResolution``, ``rlnClassScore``, ``rlnClassNumber``, None);
            ``reverse`` flips it. ``particles.star`` keeps the input order.
        regroup: with ``N > 0`` regroup the selected particles into about N groups
            (:func:`cryopipe.selection.classes.regroup_particles`, ``regroup_by`` "defocus" | "scale").
        allow_empty: write empty outputs instead of failing when nothing is selected.
        gallery: write ``class_averages.png`` (2D runs whose averages can be read).
        particle_diameter: mask diameter in Å for the image features (default: the optimiser's
            ``rlnParticleDiameter``, else 90 % of the box).
        root: project directory (names in the STAR files are relative to it; default current directory).
        device: torch device for scores / re-centring (default CPU; these are small).
        log: optional callable taking one line of text (progress messages).
    """
    say = log if log is not None else (lambda _msg: None)
    if (select is None) == (not auto):
        raise CryopipeError("select --classes: give exactly one of --select_classes LIST or --auto")
    root = Path(root) if root is not None else Path(".")
    run = find_class2d_run(input_star, root)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = run.n_classes
    is2d = run.dimensionality == 2
    if (auto or recenter) and not is2d:
        raise CryopipeError(f"{run.model_star}: --auto and --recenter need a 2D classification "
                            f"(rlnReferenceDimensionality is {run.dimensionality}); use --select_classes")

    images: torch.Tensor | None = None
    apix = run.pixel_size
    if is2d:
        try:
            images, apix = read_class_images(run, device)
        except CryopipeError as exc:
            if auto or recenter:
                raise
            say(f"warning: class averages not read ({exc}); no scores or gallery")
    scores = None
    mask_radius = None
    if images is not None:
        diameter = particle_diameter if particle_diameter is not None else run.particle_diameter
        mask_radius = solvent_radius(images.shape[-1], diameter, apix)
        scores = _scores_table(run, images, mask_radius)

    if auto:
        assert scores is not None
        keep = auto_select(scores["rlnClassScore"].to_numpy(), run.counts, min_score=min_score, max_score=max_score,
                           min_nr_particles=select_min_nr_particles, min_nr_classes=select_min_nr_classes)
    else:
        keep = np.zeros(k, dtype=bool)
        keep[np.asarray(parse_class_numbers(select, k), dtype=np.int64) - 1] = True
    table = run.classes.copy()
    if scores is not None:
        table["rlnClassScore"] = scores["rlnClassScore"].to_numpy()
    elif sort_by == "rlnClassScore":
        raise CryopipeError("--sort_by rlnClassScore: scores need the class averages, which could not be read")
    order = sort_order(table, sort_by, reverse)
    chosen = [int(i) for i in order if keep[i]]
    selected_numbers = [i + 1 for i in chosen]

    parts = run.particles
    pmask = np.isin(parts["rlnClassNumber"].to_numpy(dtype=np.int64), np.asarray(selected_numbers, dtype=np.int64))
    n_sel = int(pmask.sum())
    if n_sel == 0 and not allow_empty:
        if auto:
            best = float(scores["rlnClassScore"].max()) if scores is not None and len(scores) else float("nan")
            raise CryopipeError(f"select --classes --auto: no class with particles has a score >= {min_score} "
                                f"(best {best:.3f}); lower --min_score or give --select_min_nr_classes 1")
        raise CryopipeError(f"select --classes: the selected classes {selected_numbers} have no particles in "
                            f"{run.data_star} (add --allow_empty to write empty files)")

    particles_star, n_groups = _write_selected_particles(run, pmask, out, root, regroup, regroup_by, say)
    from cryopipe.io.star import write_star

    # -- backup_selection.star (RELION: one rlnSelected per class, class order)
    backup = out / "backup_selection.star"
    write_star(backup, {"": pd.DataFrame({"rlnSelected": keep.astype(np.int64)})},
               version=run.model_version if run.model_version is not None else 50001)

    # -- class averages
    ca_star = ca_stack = png = scores_star = None
    shifts_out = None
    if is2d:
        ca_star, ca_stack, png, scores_star, shifts_out = _write_class_averages(
            run, table, chosen, keep, order, images, apix, scores, mask_radius, out, root,
            recenter=recenter, gallery=gallery, sort_by=sort_by, reverse=reverse, n_selected_particles=n_sel,
            say=say)
    return ClassSelectResult(particles_star=particles_star, class_averages_star=ca_star, class_averages_stack=ca_stack,
                             gallery_png=png, backup_selection_star=backup, class_scores_star=scores_star,
                             selected=selected_numbers, n_particles_in=len(parts), n_particles_selected=n_sel,
                             scores=scores, n_groups=n_groups, recenter_shifts=shifts_out)
