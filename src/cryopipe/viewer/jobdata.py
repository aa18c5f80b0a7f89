"""What a job's folder holds, as the viewer shows it: iteration curves, classes, picks, FSC, angles, maps.

Each job page is made of *panels*; :meth:`JobData.panels` finds which apply from the folder's file names only
(no file is parsed, so a job page answers at once even for a large job), and each panel's data comes from its
own method (one JSON request each):

=============  ===========================================================================================
panel          source files (RELION and cryopipe write the same names)
=============  ===========================================================================================
iterations     ``<root>_itNNN_model.star`` (``_half1_model.star`` for 3D auto-refine): ``data_model_general``
               (rlnCurrentResolution, rlnAveragePmax, rlnCurrentImageSize …), ``data_model_classes``
               (rlnClassDistribution); ``<root>_itNNN_optimiser.star``: ``data_optimiser_general``
               (rlnChangesOptimalOrientations / Offsets / Classes, rlnOverallAccuracyRotations …); the time
               of an iteration is the difference of consecutive model files' modification times.
classes        the last iteration's ``data_model_classes`` (rlnReferenceImage ``NNNNNN@..._classes.mrcs`` for
               2D, ``..._classNNN.mrc`` for 3D), particles per class from the last ``_data.star``
               (rlnClassNumber), the selection from a Select job's ``backup_selection.star`` (rlnSelected).
picks          a coordinate list (``data_coordinate_files``: rlnMicrographName, rlnMicrographCoordinates;
               RELION / cryopipe autopick and manual pick) or a micrograph list (``data_micrographs``);
               coordinates rlnCoordinateX/Y (pixels) and rlnAutopickFigureOfMerit.
postprocess    ``postprocess.star``: ``data_general``, ``data_fsc``, ``data_guinier``.
fsc            gold-standard FSC of a 3D refinement: ``run_model.star`` or the last ``_half1_model.star``,
               table ``data_model_class_1`` (rlnResolution, rlnGoldStandardFsc).
angles         ``run_data.star`` / the last ``_itNNN_data.star`` / ``particles.star``: rlnAngleRot, rlnAngleTilt.
maps           MRC files in the folder and its small sub-folders: cubic volumes (maps), other volumes
               (tomograms), ``.mrcs`` stacks (tilt series, particles) — the last iteration's only.
=============  ===========================================================================================
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryopipe.io.mrc import mrc_info, parse_image_name
from cryopipe.io.star import read_star
from cryopipe.viewer.files import StatCache, loop_column, read_star_blocks, resolve_name, star_has_block
from cryopipe.viewer.project import ProjectIndex

__all__ = ["JobData", "IterationFiles", "ANGLE_BINS"]

_MODEL_RE = re.compile(r"^(?P<root>.+?)_it(?P<it>\d{3,})_(?:half1_)?model\.star$")
_ITER_FILE_RE = re.compile(r"_it(\d{3,})_")
_SKIP_STARS = {"job.star", "job_pipeline.star", "default_pipeline.star"}
#: (rot bins, tilt bins) of the angular-distribution histogram: 5° x 5°
ANGLE_BINS = (72, 36)
_MAX_SUBDIR_ENTRIES = 60
_MAX_MAPS = 40
_MAP_PRIORITY = ("postprocess_masked", "postprocess", "run_class", "initial_model", "merged", "reconstruct")


@dataclass
class IterationFiles:
    """The iteration files of one output root (``Class2D/job007/run``): iteration numbers and model stars."""

    root: str                      # file-name root inside the job folder, e.g. "run"
    iterations: list[int]
    models: dict[int, str]         # iteration -> model star (file name in the job folder)

    @property
    def last(self) -> int:
        return self.iterations[-1]


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class JobData:
    """Panel data of the jobs of one project.

    Args:
        index: the project.
        cache: parsed-file cache (shared with the server).
    """

    def __init__(self, index: ProjectIndex, cache: StatCache | None = None):
        self.index = index
        self.root = index.root
        self.cache = cache or StatCache()

    # ------------------------------------------------------------------ folder listing
    def listing(self, name: str) -> list[str]:
        """Top-level entries of a job folder (sorted)."""
        d = self.index.job_dir(name)
        return self.cache.get("listing", d, lambda: sorted(os.listdir(d)) if d.is_dir() else [])

    def iteration_files(self, name: str) -> IterationFiles | None:
        """The output root with the most ``_itNNN_model.star`` files (None if the job has none)."""
        groups: dict[str, dict[int, str]] = {}
        for f in self.listing(name):
            m = _MODEL_RE.match(f)
            if m:
                groups.setdefault(m.group("root"), {})
                it = int(m.group("it"))
                # prefer half1 when both a plain and a half1 model exist for the same iteration
                if it not in groups[m.group("root")] or "_half1_" in f:
                    groups[m.group("root")][it] = f
        if not groups:
            return None
        root = max(groups, key=lambda r: len(groups[r]))
        its = sorted(groups[root])
        return IterationFiles(root=root, iterations=its, models=groups[root])

    def _sub_entries(self, d: Path) -> list[str]:
        """Entries of a small sub-folder (empty for one with more than ``_MAX_SUBDIR_ENTRIES`` entries, such as
        a folder of thousands of micrographs)."""
        out = []
        try:
            with os.scandir(d) as it:
                for i, e in enumerate(it):
                    if i >= _MAX_SUBDIR_ENTRIES:
                        return []
                    out.append(e.name)
        except OSError:
            return []
        return sorted(out)

    # ------------------------------------------------------------------ panels
    def panels(self, name: str) -> list[str]:
        """Which panels the job page shows, from file names only."""
        files = self.listing(name)
        fset = set(files)
        out = []
        its = self.iteration_files(name)
        if its is not None:
            out.append("iterations")
        if (its is not None and self._class_refs_exist(files, its)) or "backup_selection.star" in fset:
            out.append("classes")
        if self._pick_source(name) is not None:
            out.append("picks")
        if "postprocess.star" in fset:
            out.append("postprocess")
        if self._fsc_source(name) is not None:
            out.append("fsc")
        if not any(f.endswith("_classes.mrcs") for f in files) and self._angles_source(name) is not None:
            out.append("angles")
        if self.map_candidates(name):
            out.append("maps")
        return out

    @staticmethod
    def _class_refs_exist(files: list[str], its: IterationFiles) -> bool:
        pre = f"{its.root}_it{its.last:03d}_"
        if f"{pre}classes.mrcs" in files:
            return True
        return len({m.group(1) for f in files if f.startswith(pre) and (m := re.search(r"class(\d{3})\.mrc$", f))}) > 1

    # ------------------------------------------------------------------ iterations
    def iterations(self, name: str) -> dict[str, Any]:
        """Per-iteration values: ``{"root", "iterations": [...], "series": {label: [values]}, "classes":
        [[distribution per class] per iteration], "seconds": [...]}``."""
        its = self.iteration_files(name)
        if its is None:
            return {"iterations": [], "series": {}}
        d = self.index.job_dir(name)
        gen_keys = ("rlnCurrentResolution", "rlnAveragePmax", "rlnCurrentImageSize", "rlnLogLikelihood",
                    "rlnSigmaOffsetsAngst", "rlnNrClasses")
        opt_keys = ("rlnChangesOptimalOrientations", "rlnChangesOptimalOffsets", "rlnChangesOptimalClasses",
                    "rlnOverallAccuracyRotations", "rlnOverallAccuracyTranslationsAngst")
        series: dict[str, list[Any]] = {k: [] for k in gen_keys + opt_keys}
        dists: list[list[float]] = []
        mtimes: list[float | None] = []
        for it in its.iterations:
            mpath = d / its.models[it]
            model = self.cache.get("model-head", mpath, lambda p=mpath: _model_head(p))
            gen = model.get("general", {})
            for k in gen_keys:
                series[k].append(_finite(gen.get(k)))
            dists.append(model.get("distribution", []))
            opath = d / f"{its.root}_it{it:03d}_optimiser.star"
            opt = self.cache.get("optimiser-head", opath, lambda p=opath: _optimiser_head(p))
            for k in opt_keys:
                series[k].append(_finite(opt.get(k)))
            try:
                mtimes.append(os.stat(mpath).st_mtime)
            except OSError:
                mtimes.append(None)
        seconds: list[float | None] = [None]
        for a, b in zip(mtimes[:-1], mtimes[1:]):
            seconds.append(None if a is None or b is None else round(b - a, 2))
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        return {"root": its.root, "iterations": its.iterations, "series": series, "classes": dists,
                "seconds": seconds}

    # ------------------------------------------------------------------ classes
    def _selection_for(self, name: str) -> tuple[str, int | None, list[int] | None, str | None]:
        """(job with the classes, iteration or None for the last, rlnSelected list or None, selecting job)."""
        files = set(self.listing(name))
        if "backup_selection.star" in files and self.iteration_files(name) is None:
            info = self.index.job(name)
            sel = self._read_selection(self.index.job_dir(name) / "backup_selection.star")
            src, it = None, None
            for node in (info.input_nodes if info else []):
                parts = node.split("/")
                if len(parts) >= 3 and _ITER_FILE_RE.search(parts[-1]):
                    src = f"{parts[0]}/{parts[1]}/"
                    it = int(_ITER_FILE_RE.search(parts[-1]).group(1))  # type: ignore[union-attr]
                    break
            if src is None and info is not None and info.inputs:
                src = info.inputs[0]
            return (src or name), it, sel, name
        for child in self.index.children(name):
            path = self.index.job_dir(child) / "backup_selection.star"
            if path.is_file():
                return name, None, self._read_selection(path), child
        return name, None, None, None

    def _read_selection(self, path: Path) -> list[int] | None:
        def read() -> list[int] | None:
            blocks = read_star_blocks(path)
            for b in blocks.values():
                col = loop_column(b, "rlnSelected")
                if col is not None:
                    return [int(v) for v in col]
            return None
        return self.cache.get("selection", path, read)

    def classes(self, name: str) -> dict[str, Any]:
        """Class gallery: ``{"job", "iteration", "dimensionality", "selected_by", "classes": [{"k",
        "distribution", "count", "resolution", "acc_rot", "acc_trans", "selected"}]}``."""
        src, it, sel, by = self._selection_for(name)
        its = self.iteration_files(src) if self.index.job(src) is not None else None
        if its is None:
            return {"job": src, "classes": [], "selected_by": by}
        if it is None or it not in its.models:
            it = its.last
        d = self.index.job_dir(src)
        mpath = d / its.models[it]
        model = self.cache.get("model-head", mpath, lambda: _model_head(mpath))
        table = model.get("classes_table", {})
        counts = self._class_counts(d / f"{its.root}_it{it:03d}_data.star")
        rows = []
        cols = table.get("columns", [])
        for k, row in enumerate(table.get("rows", []), start=1):
            r = dict(zip(cols, row))
            rows.append({
                "k": k, "distribution": _finite(r.get("rlnClassDistribution")),
                "count": counts.get(k, 0) if counts is not None else None,
                "resolution": _finite(r.get("rlnEstimatedResolution")),
                "acc_rot": _finite(r.get("rlnAccuracyRotations")),
                "acc_trans": _finite(r.get("rlnAccuracyTranslationsAngst")),
                "selected": (bool(sel[k - 1]) if sel is not None and k - 1 < len(sel) else None),
            })
        return {"job": src, "iteration": it, "dimensionality": model.get("general", {}).get(
            "rlnReferenceDimensionality", 2), "selected_by": by, "classes": rows}

    def _class_counts(self, data_star: Path, max_bytes: int = 400_000_000) -> dict[int, int] | None:
        try:
            if os.stat(data_star).st_size > max_bytes:
                return None
        except OSError:
            return None

        def count() -> dict[int, int] | None:
            for block in read_star(data_star).values():
                if hasattr(block, "columns") and "rlnClassNumber" in block.columns:
                    vals, n = np.unique(block["rlnClassNumber"].to_numpy(), return_counts=True)
                    return {int(v): int(c) for v, c in zip(vals, n)}
            return None
        return self.cache.get("class-counts", data_star, count)

    def class_image(self, name: str, it: int, k: int) -> tuple[Path, int, bool]:
        """(file, 0-based image index, is a 3D map) of class ``k`` (1-based) at iteration ``it``."""
        src, _, _, _ = self._selection_for(name)
        its = self.iteration_files(src)
        if its is None or it not in its.models:
            raise KeyError(f"{src}: no iteration {it}")
        d = self.index.job_dir(src)
        mpath = d / its.models[it]
        model = self.cache.get("model-head", mpath, lambda: _model_head(mpath))
        refs = loop_column(model.get("classes_table"), "rlnReferenceImage") or []
        if not 1 <= k <= len(refs):
            raise KeyError(f"{src}: no class {k}")
        ref = str(refs[k - 1])
        if "@" in ref:
            idx, fname = parse_image_name(ref)
        else:
            idx, fname = 0, ref
        path = resolve_name(fname, self.root, d)
        if path is None:
            raise FileNotFoundError(f"{ref}: class image not found")
        return path, idx, "@" not in ref

    # ------------------------------------------------------------------ picks
    def _pick_source(self, name: str) -> tuple[str, str] | None:
        """(kind "coords" | "micrographs", STAR file name in the job folder) of the job's pick / micrograph list."""
        def find() -> tuple[str, str] | None:
            d = self.index.job_dir(name)
            stars = [f for f in self.listing(name) if f.endswith(".star") and f not in _SKIP_STARS
                     and not _ITER_FILE_RE.search(f)]
            stars.sort(key=lambda f: (f not in ("autopick.star", "manualpick.star", "coords_suffix_autopick.star"), f))
            for f in stars:
                if star_has_block(d / f, "coordinate_files"):
                    return "coords", f
            for f in stars:
                if star_has_block(d / f, "micrographs", 8192):
                    return "micrographs", f
            return None
        return self.cache.get("pick-source", self.index.job_dir(name), find)

    def _pick_table(self, name: str) -> tuple[str, Path, list[str], list[str | None]]:
        src = self._pick_source(name)
        if src is None:
            raise KeyError(f"{name}: no coordinate or micrograph list")
        kind, fname = src
        path = self.index.job_dir(name) / fname

        def read() -> tuple[list[str], list[str | None]]:
            blocks = read_star(path)
            block = blocks.get("coordinate_files" if kind == "coords" else "micrographs")
            if block is None or not hasattr(block, "columns") or "rlnMicrographName" not in block.columns:
                return [], []
            mics = block["rlnMicrographName"].astype(str).tolist()
            coords = (block["rlnMicrographCoordinates"].astype(str).tolist()
                      if "rlnMicrographCoordinates" in block.columns else [None] * len(mics))
            return mics, coords
        mics, coords = self.cache.get("pick-table", path, read)
        return kind, path, mics, coords

    def picks_list(self, name: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """One page of the job's micrographs: ``{"kind", "total", "offset", "items": [{"i", "micrograph",
        "n_picks"}]}`` (pick counts only for the page's micrographs)."""
        kind, path, mics, coords = self._pick_table(name)
        offset = max(0, int(offset))
        limit = max(1, min(int(limit), 1000))
        items = []
        for i in range(offset, min(len(mics), offset + limit)):
            n = None
            if coords[i]:
                cpath = resolve_name(coords[i], self.root, path.parent)
                if cpath is not None:
                    n = self.cache.get("pick-count", cpath, lambda p=cpath: _count_rows(p))
            items.append({"i": i, "micrograph": mics[i], "n_picks": n})
        return {"kind": kind, "list": path.name, "total": len(mics), "offset": offset, "items": items}

    def micrograph_path(self, name: str, i: int) -> Path:
        kind, path, mics, _ = self._pick_table(name)
        if not 0 <= i < len(mics):
            raise KeyError(f"{name}: no micrograph {i}")
        p = resolve_name(mics[i], self.root, path.parent)
        if p is None:
            raise FileNotFoundError(f"{mics[i]}: micrograph not found")
        return p

    def picks(self, name: str, i: int, threshold: float | None = None) -> dict[str, Any]:
        """Micrograph ``i`` and its picks: ``{"micrograph", "width", "height", "pixel_size", "diameter_px",
        "picks": [[x, y, fom], ...] (pixels of the micrograph, fom None when not stored), "has_fom",
        "candidates": [[x, y, fom], ...] (only with stored LoG FOM maps: every maximum, for re-thresholding),
        "repick": {"min", "max", "threshold"} (only with stored template FOM maps: ``threshold`` given re-picks
        the maps at it, as ``autopick --read_fom_maps --threshold`` would, into "candidates")}``."""
        kind, path, mics, coords = self._pick_table(name)
        if not 0 <= i < len(mics):
            raise KeyError(f"{name}: no micrograph {i}")
        out: dict[str, Any] = {"i": i, "total": len(mics), "micrograph": mics[i], "picks": [], "has_fom": False,
                               "kind": kind}
        mpath = resolve_name(mics[i], self.root, path.parent)
        if mpath is not None:
            info = self.cache.get("mrc-info", mpath, lambda: mrc_info(mpath))
            out.update(width=info.shape[2], height=info.shape[1], pixel_size=info.pixel_size, found=True)
        else:
            out.update(found=False)
        if coords[i]:
            cpath = resolve_name(coords[i], self.root, path.parent)
            if cpath is not None:
                picks, has_fom = self.cache.get("picks", cpath, lambda: _read_picks(cpath))
                out["picks"], out["has_fom"] = picks, has_fom
                out["coordinates"] = coords[i]
                if out.get("found"):
                    cands = self._fom_map_candidates(name, cpath, (out["height"], out["width"]), out["pixel_size"])
                    if cands is not None:
                        out["candidates"] = cands
                    self._template_repick(name, cpath, threshold, out)
        out["diameter_px"] = self._pick_diameter_px(name, out.get("pixel_size") or 0.0, out.get("width") or 0,
                                                    out.get("height") or 0)
        return out

    def _fom_map_candidates(self, name: str, coordinate_file: Path, shape: tuple[int, int],
                            pixel_size: float) -> list[list[float]] | None:
        """``[[x, y, fom], ...]`` from the LoG FOM maps stored next to ``coordinate_file`` by ``autopick
        --write_fom_maps`` (all maxima in picking order, :mod:`cryopipe.picking.fom_candidates`), so the threshold
        slider re-thresholds the maps rather than the stored picks; None without maps or LoG options."""
        from cryopipe.picking.fom_candidates import log_candidates, log_map_paths, read_log_maps

        def number(default: float | None, *names: str) -> float | None:
            v = self.index.job_option(name, *names)
            try:
                return float(v) if v is not None else default
            except ValueError:
                return default
        dmin, dmax = number(None, "LoG_diam_min", "log_diam_min"), number(None, "LoG_diam_max", "log_diam_max")
        paths = log_map_paths(coordinate_file)
        if dmin is None or dmax is None or not pixel_size > 0 or not all(p.is_file() for p in paths):
            return None
        robust = str(self.index.job_option(name, "LoG_robust_threshold") or "").lower() in ("1", "true", "yes")

        def compute() -> list[list[float]]:
            maps = read_log_maps(coordinate_file, shape, dmin, dmax, number(5.0, "log_max_search"))
            c = log_candidates(maps, pixel_size, dmin, dmax,
                               upper_threshold=number(99999.0, "LoG_upper_threshold", "log_upper_thr"),
                               neighbour=number(100.0, "LoG_neighbour"), skip_side=int(number(0.0, "skip_side")),
                               robust_threshold=robust)
            return [[round(float(x), 2), round(float(y), 2), float(f)]
                    for x, y, f in zip(c.x.tolist(), c.y.tolist(), c.fom.tolist())]
        return self.cache.get("fom-candidates", paths, compute, extra=(dmin, dmax, robust, tuple(shape)))

    def _template_repick(self, name: str, coordinate_file: Path, threshold: float | None,
                         out: dict[str, Any]) -> None:
        """With template FOM maps next to ``coordinate_file`` (``autopick --ref --write_fom_maps``): the slider's
        range in ``out["repick"]`` and, for a ``threshold``, the picks of the maps at it in ``out["candidates"]``
        (RELION's peak search and cluster pruning depend on the threshold, so the maps are re-picked, not cut)."""
        from cryopipe.picking.template import read_template_maps, template_maps_paths, template_pick_from_maps

        base = str(coordinate_file)[: -len(".star")] if str(coordinate_file).endswith(".star") else str(coordinate_file)
        paths = template_maps_paths(base)
        if not all(p.is_file() for p in paths):
            return
        maps = self.cache.get("template-maps", paths, lambda: read_template_maps(base)[0])

        def option(default: float, *names: str) -> float:
            v = self.index.job_option(name, *names)
            try:
                return float(v) if v is not None else default
            except ValueError:
                return default
        job_threshold = option(0.25, "threshold", "threshold_autopick")
        best = float(maps.fom.max())
        out["repick"] = {"min": min(0.0, job_threshold), "max": max(best, job_threshold), "threshold": job_threshold}
        if threshold is None:
            return
        t = self.cache.get("template-repick", paths, lambda: template_pick_from_maps(
            maps, threshold=float(threshold), min_distance=option(-1.0, "min_distance", "mindist_autopick"),
            max_stddev_noise=option(-1.0, "max_stddev_noise", "maxstddevnoise_autopick"),
            min_avg_noise=option(-999.0, "min_avg_noise", "minavgnoise_autopick"),
            skip_side=int(option(0.0, "skip_side"))), extra=(float(threshold),))
        out["candidates"] = [[round(float(x), 2), round(float(y), 2), float(f)]
                             for x, y, f in zip(t.x.tolist(), t.y.tolist(), t.fom.tolist())]

    def _pick_diameter_px(self, name: str, apix: float, w: int, h: int) -> float:
        for opts in (("LoG_diam_max", "log_diam_max"), ("particle_diameter", "topaz_particle_diameter"),
                     ("diameter",)):
            v = self.index.job_option(name, *opts)
            try:
                dA = float(v) if v is not None else -1.0
            except ValueError:
                dA = -1.0
            if dA > 0 and apix > 0:
                return dA / apix
        return max(8.0, 0.04 * max(w, h, 1))

    # ------------------------------------------------------------------ FSC / postprocess
    def postprocess(self, name: str) -> dict[str, Any]:
        """``postprocess.star`` as ``{"general": {...}, "fsc": {label: [...]}, "guinier": {label: [...]}}``;
        RELION's -99 "no value" entries become None."""
        path = self.index.job_dir(name) / "postprocess.star"

        def read() -> dict[str, Any]:
            blocks = read_star_blocks(path, ["general", "fsc", "guinier"])
            out: dict[str, Any] = {"general": {k: _finite(v) for k, v in blocks.get("general", {}).items()}}
            for b in ("fsc", "guinier"):
                tab = blocks.get(b)
                cols: dict[str, list[Any]] = {}
                if isinstance(tab, dict) and "columns" in tab:
                    for j, c in enumerate(tab["columns"]):
                        cols[c] = [_nodata(r[j]) for r in tab["rows"]]
                out[b] = cols
            return out
        return self.cache.get("postprocess", path, read)

    def _fsc_source(self, name: str) -> str | None:
        files = self.listing(name)
        if "run_model.star" in files and "run_half1_model.star" in files:
            return "run_model.star"
        its = self.iteration_files(name)
        if its is not None and "_half1_" in its.models[its.last]:
            return its.models[its.last]
        return None

    def fsc(self, name: str) -> dict[str, Any]:
        """Gold-standard FSC of a 3D refinement: ``{"file", "resolution": [1/Å], "fsc": [...],
        "current_resolution": Å}``."""
        src = self._fsc_source(name)
        if src is None:
            return {"resolution": [], "fsc": []}
        path = self.index.job_dir(name) / src

        def read() -> dict[str, Any]:
            blocks = read_star_blocks(path, ["model_general", "model_class_1"])
            tab = blocks.get("model_class_1")
            res = loop_column(tab, "rlnResolution") or []
            fsc = loop_column(tab, "rlnGoldStandardFsc") or []
            gen = blocks.get("model_general", {})
            return {"file": src, "resolution": [_finite(x) for x in res], "fsc": [_finite(x) for x in fsc],
                    "current_resolution": _finite(gen.get("rlnCurrentResolution"))}
        return self.cache.get("fsc", path, read)

    # ------------------------------------------------------------------ angular distribution
    def _angles_source(self, name: str) -> str | None:
        """The job's data STAR with particle angles: ``run_data.star``, the last ``_itNNN_data.star`` or
        ``particles.star`` (the first whose header has rlnAngleTilt)."""
        files = self.listing(name)
        cands = ["run_data.star"]
        its = self.iteration_files(name)
        if its is not None:
            cands.append(f"{its.root}_it{its.last:03d}_data.star")
        cands.append("particles.star")
        d = self.index.job_dir(name)
        for f in cands:
            if f in files:
                has = self.cache.get("has-angles", d / f, lambda p=d / f: _header_has(p, b"_rlnAngleTilt"))
                if has:
                    return f
        return None

    def angles(self, name: str) -> dict[str, Any]:
        """Histogram of (rlnAngleRot, rlnAngleTilt): ``{"file", "n", "rot_bins", "tilt_bins", "counts"
        [tilt bin][rot bin], "available"}``; rot in [-180, 180), tilt in [0, 180] degrees, 5° bins."""
        src = self._angles_source(name)
        if src is None:
            return {"available": False, "n": 0}
        path = self.index.job_dir(name) / src

        def compute() -> dict[str, Any]:
            for block in read_star(path).values():
                if hasattr(block, "columns") and {"rlnAngleRot", "rlnAngleTilt"} <= set(block.columns):
                    rot = block["rlnAngleRot"].to_numpy(np.float64)
                    tilt = block["rlnAngleTilt"].to_numpy(np.float64)
                    if len(tilt) == 0 or (np.ptp(tilt) == 0 and np.ptp(rot) == 0):
                        return {"available": False, "n": int(len(tilt)), "file": src}
                    rot = (rot + 180.0) % 360.0 - 180.0
                    tilt = np.clip(tilt, 0.0, 180.0)
                    nr, nt = ANGLE_BINS
                    h, _, _ = np.histogram2d(tilt, rot, bins=(nt, nr), range=((0.0, 180.0), (-180.0, 180.0)))
                    return {"available": True, "n": int(len(tilt)), "file": src, "rot_bins": nr,
                            "tilt_bins": nt, "counts": h.astype(int).tolist()}
            return {"available": False, "n": 0, "file": src}
        return self.cache.get("angles", path, compute)

    # ------------------------------------------------------------------ maps, tomograms, stacks
    def map_candidates(self, name: str) -> list[str]:
        """MRC files of the job (relative to its folder): top level and small sub-folders; of the per-iteration
        files (``_itNNN_``) only the last iteration's; class-average stacks left out (the gallery shows them)."""
        d = self.index.job_dir(name)

        def find() -> list[str]:
            files = self.listing(name)
            cands: list[str] = []
            for f in files:
                full = d / f
                if f.endswith((".mrc", ".mrcs")):
                    cands.append(f)
                elif not f.startswith(".") and full.is_dir():
                    cands.extend(f"{f}/{g}" for g in self._sub_entries(full) if g.endswith((".mrc", ".mrcs")))
            its = [int(m.group(1)) for f in cands if (m := _ITER_FILE_RE.search(f))]
            last = max(its) if its else None
            out = [f for f in cands if not f.endswith("_classes.mrcs")
                   and ((m := _ITER_FILE_RE.search(f)) is None or int(m.group(1)) == last)]

            def prio(f: str) -> tuple[int, str]:
                base = f.rsplit("/", 1)[-1]
                for i, p in enumerate(_MAP_PRIORITY):
                    if base.startswith(p):
                        return i, f
                return len(_MAP_PRIORITY) + (2 if f.endswith(".mrcs") else 0) + ("weight" in base), f
            out.sort(key=prio)
            return out[:_MAX_MAPS]
        return self.cache.get("map-candidates", d, find, extra=tuple(self._subdir_stamps(d)))

    def _subdir_stamps(self, d: Path) -> list[int]:
        out = []
        for f in self.listing(str(d.relative_to(self.root)) + "/"):
            full = d / f
            if not f.startswith(".") and full.is_dir():
                try:
                    out.append(os.stat(full).st_mtime_ns)
                except OSError:
                    pass
        return out

    def maps(self, name: str) -> dict[str, Any]:
        """``{"maps": [{"file", "kind" (map | tomogram | stack | image), "shape" [z, y, x], "pixel_size",
        "mb"}]}``."""
        d = self.index.job_dir(name)
        out = []
        for f in self.map_candidates(name):
            path = d / f
            try:
                info = self.cache.get("mrc-info", path, lambda p=path: mrc_info(p))
            except Exception:  # an unreadable file is listed by name only
                out.append({"file": f, "kind": "unreadable"})
                continue
            nz, ny, nx = info.shape
            if info.is_stack:
                kind = "stack"
            elif nz == 1:
                kind = "image"
            elif nz == ny == nx:
                kind = "map"
            else:
                kind = "tomogram"
            out.append({"file": f, "kind": kind, "shape": [nz, ny, nx], "pixel_size": round(info.pixel_size, 4),
                        "mb": round(os.stat(path).st_size / 1e6, 2)})
        return {"maps": out}

    def map_path(self, name: str, file: str) -> Path:
        """The MRC file ``file`` of the job, only if it is one of the files :meth:`map_candidates` lists."""
        if file not in self.map_candidates(name):
            raise KeyError(f"{name}: {file} is not a map of this job")
        return self.index.job_dir(name) / file


# ---------------------------------------------------------------------- file readers (cached by the caller)

def _model_head(path: Path) -> dict[str, Any]:
    blocks = read_star_blocks(path, ["model_general", "model_classes"])
    table = blocks.get("model_classes", {})
    dist = [_finite(x) for x in (loop_column(table, "rlnClassDistribution") or [])]
    return {"general": blocks.get("model_general", {}), "classes_table": table, "distribution": dist}


def _optimiser_head(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_star_blocks(path, ["optimiser_general"]).get("optimiser_general", {})


def _header_has(path: Path, label: bytes, head_bytes: int = 16384) -> bool:
    try:
        with open(path, "rb") as fh:
            return label in fh.read(head_bytes)
    except OSError:
        return False


def _nodata(v: Any) -> Any:
    if isinstance(v, (int, float)) and (v == -99 or v == -999 or (isinstance(v, float) and not math.isfinite(v))):
        return None
    return v


def _count_rows(path: Path) -> int:
    n = 0
    for b in read_star_blocks(path).values():
        if isinstance(b, dict) and "rows" in b:
            n += len(b["rows"])
    return n


def _read_picks(path: Path) -> tuple[list[list[Any]], bool]:
    """``[[x, y, fom or None], ...]`` (pixels) and whether FOMs are stored."""
    for b in read_star_blocks(path).values():
        xs = loop_column(b, "rlnCoordinateX")
        ys = loop_column(b, "rlnCoordinateY")
        if xs is None or ys is None:
            continue
        foms = loop_column(b, "rlnAutopickFigureOfMerit")
        has = foms is not None
        return ([[round(float(x), 2), round(float(y), 2), (_finite(float(f)) if has else None)]
                 for x, y, f in zip(xs, ys, foms if has else [None] * len(xs))], has)
    return [], False
