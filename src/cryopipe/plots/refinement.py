"""Plots of a 3D refinement or initial model (refine3d, initialmodel), from the files the run wrote: the resolution
per iteration (``rlnCurrentResolution`` of each ``_itNNN[_half1]_model.star``), the gold-standard FSC per iteration
(``rlnGoldStandardFsc`` of class 1; refine3d only, the initial model has no half sets) and the angular distribution
of the last ``_data.star`` (rlnAngleRot/Tilt; counts per solid angle on a Mollweide map).

Bare matplotlib ``Figure`` objects rendered by Agg (no pyplot, no backend switch): the figure functions return
them, :func:`write_refinement_plots` saves ``<prefix>_resolution.png``, ``<prefix>_fsc.png`` (with half sets),
``<prefix>_angdist.png`` and ``<prefix>_plots.pdf`` (all pages) atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cryopipe.io.atomic import atomic_path
from cryopipe.io.star import read_star
from cryopipe.plots.postprocess import angstrom_axis

__all__ = ["RefinementHistory", "read_refinement_history", "resolution_figure", "fsc_figure",
           "angular_distribution_figure", "write_refinement_plots"]

_ITER = re.compile(r"_it(\d{3,})(_half1)?_model\.star$")


class RefinementHistory:
    """Per-iteration values of a run: ``iterations [I]``, ``resolutions [I]`` (Å, rlnCurrentResolution),
    ``fsc {iteration: (inverse resolution 1/Å [S], rlnGoldStandardFsc [S])}`` (empty without half sets) and the
    last data table's ``rot``, ``tilt`` (degrees, may be empty)."""

    def __init__(self, iterations, resolutions, fsc, rot, tilt):
        self.iterations = np.asarray(iterations, dtype=int)
        self.resolutions = np.asarray(resolutions, dtype=float)
        self.fsc = fsc
        self.rot = np.asarray(rot, dtype=float)
        self.tilt = np.asarray(tilt, dtype=float)


def read_refinement_history(prefix: str | Path) -> RefinementHistory:
    """The history of the run ``prefix`` (e.g. ``Refine3D/job012/run``) from its iteration files."""
    prefix = Path(prefix)
    models = {}
    for path in prefix.parent.glob(f"{prefix.name}_it*_model.star"):
        m = _ITER.search(path.name)
        if m is None or (m.group(2) is None and "_half2_" in path.name):
            continue
        models[int(m.group(1))] = path
    iterations, resolutions, fsc = [], [], {}
    for it in sorted(models):
        blocks = read_star(models[it])
        general = blocks.get("model_general", {})
        iterations.append(it)
        resolutions.append(float(general.get("rlnCurrentResolution", np.nan)))
        table = blocks.get("model_class_1")
        if table is not None and "rlnGoldStandardFsc" in getattr(table, "columns", []) \
                and float(np.abs(table["rlnGoldStandardFsc"].to_numpy(float)).max()) > 0:
            fsc[it] = (table["rlnResolution"].to_numpy(float), table["rlnGoldStandardFsc"].to_numpy(float))
    rot = tilt = np.zeros(0)
    data_files = sorted(prefix.parent.glob(f"{prefix.name}_it*_data.star"))
    if data_files:
        table = read_star(data_files[-1]).get("particles")
        if table is not None and {"rlnAngleRot", "rlnAngleTilt"} <= set(table.columns):
            rot, tilt = table["rlnAngleRot"].to_numpy(float), table["rlnAngleTilt"].to_numpy(float)
    return RefinementHistory(iterations, resolutions, fsc, rot, tilt)


def resolution_figure(history: RefinementHistory, title: str = ""):
    """Resolution (Å, rlnCurrentResolution) against iteration."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    ok = np.isfinite(history.resolutions) & (history.resolutions > 0) & (history.resolutions < 999)
    ax.plot(history.iterations[ok], history.resolutions[ok], "o-", color="k", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("resolution (Å)")
    if ok.any():
        best = int(np.argmin(np.where(ok, history.resolutions, np.inf)))
        ax.set_title(f"{title}resolution per iteration (best {history.resolutions[best]:.2f} Å at iteration "
                     f"{history.iterations[best]})", fontsize=10)
    ax.invert_yaxis()  # better (smaller) resolution upwards
    fig.tight_layout()
    return fig


def fsc_figure(history: RefinementHistory, title: str = ""):
    """Gold-standard FSC of each iteration (darker = later), 0.143 labelled, Å axis on top; None without half
    sets."""
    if not history.fsc:
        return None
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    its = sorted(history.fsc)
    cmap = colormaps["viridis"]
    for j, it in enumerate(its):
        inv, curve = history.fsc[it]
        ax.plot(inv, curve, color=cmap(j / max(1, len(its) - 1)), lw=2 if it == its[-1] else 1,
                label=f"iteration {it}" if it in (its[0], its[-1]) or len(its) <= 6 else None)
    inv_last = history.fsc[its[-1]][0]
    ax.axhline(0.143, color="0.5", ls=":", lw=1)
    ax.text(inv_last[-1], 0.143, "0.143 ", ha="right", va="bottom", fontsize=8, color="0.4")
    ax.axhline(0.0, color="0.7", lw=0.5)
    ax.set_xlim(0, inv_last[-1])
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("gold-standard FSC")
    ax.set_title(f"{title}FSC per iteration", fontsize=10, pad=32)
    angstrom_axis(ax)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def angular_distribution_figure(rot_deg: np.ndarray, tilt_deg: np.ndarray, title: str = "", bins: int = 36):
    """Particles per solid angle over the viewing directions (rot = longitude, 90° − tilt = latitude) on a
    Mollweide map; None without angles."""
    if rot_deg.size == 0:
        return None
    from matplotlib.figure import Figure

    lon = np.radians((np.asarray(rot_deg) + 180.0) % 360.0 - 180.0)
    lat = np.radians(90.0 - np.clip(np.asarray(tilt_deg), 0.0, 180.0))
    lon_edges = np.linspace(-np.pi, np.pi, 2 * bins + 1)
    lat_edges = np.linspace(-np.pi / 2, np.pi / 2, bins + 1)
    counts, _, _ = np.histogram2d(lon, lat, bins=(lon_edges, lat_edges))
    solid = np.diff(lon_edges)[:, None] * np.diff(np.sin(lat_edges))[None, :]  # sr per bin
    density = counts / solid / max(1, lon.size) * 4 * np.pi  # 1 = uniform
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot(projection="mollweide")
    mesh = ax.pcolormesh(lon_edges, lat_edges, density.T, cmap="viridis", shading="flat")
    ax.set_xticklabels([])
    ax.grid(True, color="0.8", lw=0.4)
    fig.colorbar(mesh, ax=ax, shrink=0.7, label="particles per solid angle (1 = uniform)")
    ax.set_title(f"{title}angular distribution ({lon.size} particles; rot across, tilt down)", fontsize=10)
    return fig


def write_refinement_plots(prefix: str | Path) -> list[Path]:
    """Write the plots of run ``prefix`` next to it (PNGs and ``<prefix>_plots.pdf``); returns the paths
    written (none when the run has no iteration files yet)."""
    from matplotlib.backends.backend_pdf import PdfPages

    prefix = Path(prefix)
    history = read_refinement_history(prefix)
    if history.iterations.size == 0:
        return []
    figures = {"resolution": resolution_figure(history), "fsc": fsc_figure(history),
               "angdist": angular_distribution_figure(history.rot, history.tilt)}
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        path = Path(f"{prefix}_{name}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        written.append(path)
    pdf = Path(f"{prefix}_plots.pdf")
    with atomic_path(pdf) as tmp:
        with PdfPages(tmp) as pages:
            for fig in figures.values():
                if fig is not None:
                    pages.savefig(fig)
    written.append(pdf)
    return written
