"""The postprocess job's plots: FSC curves (corrected on top, Å axis, 0.143 labelled, a note when the
resolution is Nyquist-limited) and the Guinier plot with its fit range, as PNGs and a two-page PDF."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryopipe.core.postprocess import PostprocessResult
from cryopipe.core.postprocess_files import shell_resolutions
from cryopipe.io.atomic import atomic_path

__all__ = ["plot_postprocess", "angstrom_axis"]


def angstrom_axis(ax) -> None:
    """Ticks in Å on top of ``ax`` (whose x axis is in 1/Å), at the bottom axis' tick positions (call after the
    x limits are set)."""
    top = ax.twiny()
    lo, hi = ax.get_xlim()
    top.set_xlim(lo, hi)
    ticks = [t for t in ax.get_xticks() if lo < t <= hi]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1.0 / t:.3g}" for t in ticks], fontsize=8)
    top.set_xlabel("resolution (Å)")


def plot_postprocess(res: PostprocessResult, fsc_png: Path, guinier_png: Path, pdf: Path | None,
                     fit_minres: float, fit_maxres: float) -> None:
    """FSC curves and Guinier plot as PNGs and (optionally) a two-page PDF (bare matplotlib ``Figure`` objects
    rendered by Agg: no pyplot, no backend switch)."""
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    _, inv, _ = shell_resolutions(res.box, res.pixel_size)
    fig1 = Figure(figsize=(7.5, 5))
    ax = fig1.subplots()
    if res.fsc_masked is not None:
        ax.plot(inv, res.fsc_unmasked.numpy(), "g-", lw=1, label="unmasked maps")
        ax.plot(inv, res.fsc_masked.numpy(), "b-", lw=1, label="masked maps")
        ax.plot(inv, res.fsc_random.numpy(), "r-", lw=1, label="phase-randomised masked maps")
        ax.plot(inv, res.fsc_true.numpy(), "k--", lw=2, label="corrected (masked − phase-randomised)", zorder=5)
    else:
        ax.plot(inv, res.fsc_true.numpy(), "k-", lw=2, label="unmasked maps")
    ax.axhline(0.143, color="0.5", ls=":", lw=1)
    ax.text(inv[-1], 0.143, "0.143 ", ha="right", va="bottom", fontsize=8, color="0.4")
    ax.axhline(0.0, color="0.7", lw=0.5)
    nyquist = 2.0 * res.pixel_size
    limited = res.resolution <= nyquist * 1.0001
    ax.axvline(1.0 / res.resolution, color="0.6", ls="--", lw=0.8)
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_title(f"Final resolution = {res.resolution:.2f} Å"
                 + (f" (Nyquist-limited: the FSC stays above 0.143 up to {nyquist:.2f} Å)" if limited else ""),
                 fontsize=10)
    ax.set_xlim(0, inv[-1])
    ax.set_ylim(min(-0.1, float(np.nanmin(res.fsc_true.numpy())) - 0.02), 1.05)
    angstrom_axis(ax)
    ax.legend(loc="upper right", fontsize=8)
    fig1.tight_layout()

    fig2 = Figure(figsize=(7.5, 5))
    bx = fig2.subplots()
    x = res.guinier_in.x.numpy()

    def curve(g, style, label):
        y = g.y.numpy()
        ok = y > -99
        bx.plot(x[ok], y[ok], style, label=label)

    curve(res.guinier_in, "k-", "original")
    if res.guinier_mtf is not None:
        curve(res.guinier_mtf, "g-", "MTF-corrected")
    curve(res.guinier_weighted, "b-", "FSC-weighted")
    if abs(res.bfactor) > 0:
        curve(res.guinier_sharpened, "r-", f"sharpened (B = {res.bfactor:.1f} Å²)")
    if res.slope != 0 or res.intercept != 0:
        w = res.guinier_weighted.w.numpy() > 0
        if w.any():
            xf = x[w]
            bx.plot(xf, res.slope * xf + res.intercept, "m--",
                    label=f"fit {fit_minres:g}-{fit_maxres:g} Å (r² = {res.fit_correlation:.3f})")
    bx.set_xlabel("resolution² (1/Å²)")
    bx.set_ylabel("ln(amplitudes)")
    bx.set_title("Guinier plot")
    bx.legend(loc="upper right", fontsize=8)
    fig2.tight_layout()
    with atomic_path(fsc_png) as tmp:
        fig1.savefig(tmp, dpi=100, format="png")
    with atomic_path(guinier_png) as tmp:
        fig2.savefig(tmp, dpi=100, format="png")
    if pdf is not None:
        with atomic_path(pdf) as tmp:
            with PdfPages(tmp) as pp:
                pp.savefig(fig1)
                pp.savefig(fig2)
