/* cryopipe view: line plots (uPlot, vendored) with the axes cryo-EM plots need. */
"use strict";
const Plots = {
  COLORS: ["#2f6fd6", "#d23c3c", "#2e9d5b", "#c98512", "#7b4fc9", "#1aa3a3", "#555555", "#e377c2", "#8c564b", "#17becf"],
  /* spatial frequency (1/Å) as a resolution label */
  angstrom(v) { return v > 0 ? (1 / v >= 100 ? (1 / v).toFixed(0) : (1 / v).toFixed(1)) : "∞"; },
  /* squared frequency (1/Å²) as a resolution label */
  angstrom2(v) { return v > 0 ? (1 / Math.sqrt(v)).toFixed(1) : "∞"; },
  width(el) { return Math.max(300, Math.min(560, (el.clientWidth || 600) - 20)); },

  /**
   * A line plot. opt: {title, x: [...], series: [{label, values, color, dash, width}], xlabel, ylabel,
   * xfmt (tick label of an x value), yrange [min, max], height}. Returns the uPlot object.
   */
  line(container, opt) {
    const div = CP.el("div", { class: "plot", "data-title": opt.title || "" });
    container.append(div);
    const xfmt = opt.xfmt;
    const series = [{ label: opt.xlabel || "x", value: (u, v) => (v === null || v === undefined ? "–" : (xfmt ? xfmt(v) : CP.fmt(v, 3))) }];
    opt.series.forEach((s, i) => series.push({
      label: s.label, stroke: s.color || Plots.COLORS[i % Plots.COLORS.length], width: s.width || 1.6,
      dash: s.dash, spanGaps: true, points: { show: !s.dash && opt.x.length <= 40, size: 5 },
      value: (u, v) => CP.fmt(v, 3),
    }));
    const yscale = { auto: !opt.yrange };
    if (opt.yrange) yscale.range = opt.yrange;
    const xaxis = { label: opt.xlabel, size: 44 };
    if (xfmt) xaxis.values = (self, ticks) => ticks.map(xfmt);
    if (opt.xint) xaxis.incrs = [1, 2, 5, 10, 20, 50, 100, 200, 500];
    const u = new uPlot({
      title: opt.title, width: opt.width || Plots.width(container), height: opt.height || 240,
      scales: { x: { time: false }, y: yscale },
      axes: [xaxis, { label: opt.ylabel, size: 56 }],
      series,
      cursor: { drag: { x: true, y: false } },
    }, [opt.x, ...opt.series.map((s) => s.values)], div);
    return u;
  },
};
window.Plots = Plots;
