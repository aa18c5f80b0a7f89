/* cryopipe view: the job page's data panels (iterations, classes, picks, FSC / Guinier, angles).
 * Each Panels.<name>(body, job) fills `body` from its JSON endpoint and may be called again to refresh it. */
"use strict";
const Panels = {};
const PANEL_TITLES = {
  iterations: "Iterations", classes: "Classes", picks: "Picks", postprocess: "FSC and Guinier plot",
  fsc: "Gold-standard FSC", angles: "Angular distribution", maps: "Maps and tomograms",
};
/* panels worth refreshing while the job runs */
const LIVE_PANELS = new Set(["iterations", "classes", "fsc", "picks", "maps"]);

function kvTable(rows) {
  return CP.el("table", { class: "kv" }, rows.filter((r) => r[1] !== undefined && r[1] !== null && r[1] !== "")
    .map(([k, v]) => CP.el("tr", {}, CP.el("td", { text: k }), CP.el("td", { text: v }))));
}

/* ------------------------------------------------------------------ iterations */
Panels.iterations = async function (body, job) {
  const d = await CP.api("/api/iterations", { job: job.name });
  body.replaceChildren();
  const x = d.iterations, s = d.series;
  if (!x.length) { body.append(CP.el("p", { class: "muted", text: "no iterations written yet" })); return; }
  const sentinel = (v) => (v || []).map((y) => (y === null || y >= 999 ? null : y));
  body.append(CP.el("p", { class: "muted", text: `${x.length} iterations (${x[0]}–${x[x.length - 1]}) of ${d.root}_itNNN_*` }));
  const wrap = CP.el("div", { class: "plots" });
  body.append(wrap);
  const base = { x, xlabel: "iteration", xint: true };
  if (s.rlnCurrentResolution) Plots.line(wrap, { ...base, title: "Resolution", ylabel: "Å",
    series: [{ label: "resolution (Å)", values: s.rlnCurrentResolution }] });
  if (s.rlnAveragePmax) Plots.line(wrap, { ...base, title: "Average Pmax", ylabel: "<Pmax>", yrange: [0, 1],
    series: [{ label: "<Pmax>", values: s.rlnAveragePmax }] });
  const ch = [];
  if (s.rlnChangesOptimalOrientations) ch.push({ label: "orientations (°)", values: sentinel(s.rlnChangesOptimalOrientations) });
  if (s.rlnChangesOptimalOffsets) ch.push({ label: "offsets (Å)", values: sentinel(s.rlnChangesOptimalOffsets) });
  if (s.rlnChangesOptimalClasses) ch.push({ label: "classes (%)", values: sentinel(s.rlnChangesOptimalClasses).map((v) => (v === null ? null : 100 * v)) });
  if (ch.length) Plots.line(wrap, { ...base, title: "Changes from the previous iteration", ylabel: "° · Å · %", series: ch });
  const acc = [];
  if (s.rlnOverallAccuracyRotations) acc.push({ label: "rotations (°)", values: sentinel(s.rlnOverallAccuracyRotations) });
  if (s.rlnOverallAccuracyTranslationsAngst) acc.push({ label: "translations (Å)", values: sentinel(s.rlnOverallAccuracyTranslationsAngst) });
  if (acc.length) Plots.line(wrap, { ...base, title: "Estimated accuracy", ylabel: "° · Å", series: acc });
  if (d.seconds && d.seconds.some((v) => v !== null)) Plots.line(wrap, { ...base, title: "Time per iteration", ylabel: "s",
    series: [{ label: "seconds", values: d.seconds }] });
  if (s.rlnCurrentImageSize) Plots.line(wrap, { ...base, title: "Image size in the E-step", ylabel: "pixels",
    series: [{ label: "size (px)", values: s.rlnCurrentImageSize }] });
  const K = Math.max(0, ...d.classes.map((c) => c.length));
  if (K > 1 && K <= 60) {
    const ser = [];
    for (let k = 0; k < K; k++) ser.push({ label: `class ${k + 1}`, values: d.classes.map((c) => (c[k] === undefined ? null : c[k])), width: 1.2 });
    Plots.line(wrap, { ...base, title: "Class distribution", ylabel: "fraction", series: ser });
  }
};

/* ------------------------------------------------------------------ classes */
Panels.classes = async function (body, job) {
  const d = await CP.api("/api/classes", { job: job.name });
  const prev = body.querySelector("select.sort");
  const sortBy = prev ? prev.value : "size";
  const onlySel = body.querySelector("input.onlysel") && body.querySelector("input.onlysel").checked;
  body.replaceChildren();
  if (!d.classes.length) { body.append(CP.el("p", { class: "muted", text: "no classes found" })); return; }
  const hasSel = d.classes.some((c) => c.selected !== null);
  const nsel = d.classes.filter((c) => c.selected).length;
  const info = `${d.classes.length} classes of ${d.job} at iteration ${d.iteration}` +
    (hasSel ? ` · ${nsel} selected by ${d.selected_by}` : "");
  const sort = CP.el("select", { class: "sort" },
    CP.el("option", { value: "size", text: "size (largest first)" }),
    CP.el("option", { value: "resolution", text: "resolution (best first)" }),
    CP.el("option", { value: "number", text: "class number" }));
  sort.value = sortBy;
  const only = CP.el("input", { type: "checkbox", class: "onlysel" });
  only.checked = !!onlySel;
  const gallery = CP.el("div", { class: "gallery" + (hasSel ? " has-selection" : ""), id: "class-gallery" });
  const draw = () => {
    const rows = d.classes.filter((c) => !only.checked || c.selected);
    const key = sort.value;
    rows.sort((a, b) => {
      if (key === "number") return a.k - b.k;
      if (key === "resolution") return (a.resolution === null) - (b.resolution === null) || (a.resolution - b.resolution) || a.k - b.k;
      const sa = a.count !== null ? a.count : a.distribution, sb = b.count !== null ? b.count : b.distribution;
      return (sb - sa) || a.k - b.k;
    });
    gallery.replaceChildren(...rows.map((c) => {
      const size = c.count !== null ? `${c.count} ptcls` : "";
      const pct = c.distribution !== null ? `${(100 * c.distribution).toFixed(1)} %` : "";
      return CP.el("figure", { class: c.selected === true ? "selected" : (c.selected === false ? "unselected" : ""), "data-k": c.k,
        title: `class ${c.k}: ${size} ${pct}, resolution ${CP.fmt(c.resolution, 1)} Å, accuracy ${CP.fmt(c.acc_rot, 1)}° / ${CP.fmt(c.acc_trans, 1)} Å` },
        CP.el("img", { loading: "lazy", alt: `class ${c.k}`, src: CP.url("/img/class.png", { job: job.name, it: d.iteration, k: c.k }) }),
        CP.el("figcaption", {}, CP.el("b", { text: `#${c.k}` }), ` ${size || pct}`, CP.el("br"), `${CP.fmt(c.resolution, 1)} Å · ${pct}`));
    }));
  };
  sort.addEventListener("change", draw);
  only.addEventListener("change", draw);
  body.append(CP.el("div", { class: "toolbar" }, CP.el("span", { class: "muted", text: info }),
    CP.el("label", {}, "sort by ", sort), hasSel ? CP.el("label", {}, only, " selected only") : null), gallery);
  draw();
};

/* ------------------------------------------------------------------ picks */
Panels.picks = async function (body, job) {
  if (body._picks) { await body._picks.refreshList(); return; }
  const PAGE = 100;
  const st = { items: [], total: 0, kind: "", cur: -1, mic: null, thr: null, loading: false };
  const list = CP.el("div", { class: "miclist", id: "miclist" });
  const img = CP.el("img", { id: "micimg", alt: "micrograph" });
  const canvas = CP.el("canvas", { id: "pickcanvas" });
  const slider = CP.el("input", { type: "range", id: "fom-threshold", min: 0, max: 1, step: 0.001, value: 0 });
  const thrText = CP.el("span", { class: "mono", id: "fom-value" });
  const count = CP.el("span", { id: "pick-count", "data-n": "0" });
  const lp = CP.el("select", { id: "lowpass" }, ...[["0", "none"], ["10", "10 Å"], ["20", "20 Å"], ["40", "40 Å"]]
    .map(([v, t]) => CP.el("option", { value: v, text: t })));
  lp.value = "20";
  const showPicks = CP.el("input", { type: "checkbox", checked: true });
  const title = CP.el("div", { class: "muted mono" });
  const prevB = CP.el("button", { text: "◀ previous" }), nextB = CP.el("button", { text: "next ▶" });
  const more = CP.el("button", { text: "more…" });
  const head = CP.el("p", { class: "muted" });
  body.replaceChildren(head, CP.el("div", { class: "picks" },
    CP.el("div", {}, list, more),
    CP.el("div", { class: "micview" },
      CP.el("div", { class: "toolbar" }, prevB, nextB, CP.el("label", {}, "low-pass ", lp),
        CP.el("label", {}, showPicks, " picks"),
        CP.el("label", { title: "re-threshold by rlnAutopickFigureOfMerit" }, "FOM threshold ", slider), thrText, count),
      title, CP.el("div", { class: "micwrap" }, img, canvas))));

  function draw() {
    const m = st.mic;
    if (!m || !img.naturalWidth) return;
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const scale = img.naturalWidth / (m.width || img.naturalWidth);
    // with stored FOM maps the slider cuts every maximum of the maps (picking order), else the stored picks
    const pts = m.candidates || m.picks;
    const graded = Boolean(m.candidates) || m.has_fom;
    // at its lowest position the slider shows every candidate: the browser may round the range's value up past
    // the lowest figure of merit (its minimum)
    const v = Number(slider.value);
    const thr = graded && v > Number(slider.min) + Number(slider.step) / 2 ? v : -Infinity;
    let n = 0;
    ctx.lineWidth = Math.max(1.5, canvas.width / 500);
    ctx.strokeStyle = "#38e27a";
    const r = Math.max(3, (m.diameter_px / 2) * scale);
    for (const [x, y, f] of pts) {
      if (graded && !(f >= thr)) continue;
      n++;
      if (!showPicks.checked) continue;
      ctx.beginPath(); ctx.arc(x * scale, y * scale, r, 0, 2 * Math.PI); ctx.stroke();
    }
    count.dataset.n = String(n);
    count.dataset.source = m.candidates ? "maps" : "stored";
    count.textContent = m.candidates ? `${n} picks at this threshold (FOM maps; ${m.picks.length} stored)`
      : m.has_fom ? `${n} of ${m.picks.length} picks shown` : `${n} picks (no figure of merit stored)`;
    thrText.textContent = graded ? `≥ ${Number(slider.value).toFixed(3)}` : "";
  }

  async function select(i) {
    if (i < 0 || i >= st.total) return;
    st.cur = i;
    for (const e of list.querySelectorAll(".item")) e.classList.toggle("on", Number(e.dataset.i) === i);
    const m = await CP.api("/api/picks/mic", { job: job.name, i });
    st.mic = m;
    title.textContent = `${i + 1} of ${st.total}: ${m.micrograph}` + (m.pixel_size ? ` · ${m.width}×${m.height} px, ${m.pixel_size} Å/px` : "") +
      (m.coordinates ? ` · ${m.coordinates}` : "");
    const pts = m.candidates || m.picks;
    if (m.repick) {
      // template FOM maps: the server re-picks the maps at the slider's threshold (RELION's peak search)
      const { min: lo, max: hi } = m.repick;
      slider.min = lo; slider.max = hi; slider.step = Math.max((hi - lo) / 500, 1e-6);
      slider.value = st.thr === null ? m.repick.threshold : Math.min(Math.max(st.thr, lo), hi);
      slider.disabled = false;
      if (st.thr !== null) await repick(i);
    } else if ((m.candidates || m.has_fom) && pts.length) {
      const foms = pts.map((p) => p[2]).filter((f) => f !== null);
      const lo = Math.min(...foms), hi = Math.max(...foms);
      // the job's own threshold first: the lowest stored pick
      const stored = m.picks.map((p) => p[2]).filter((f) => f !== null);
      const start = stored.length ? Math.min(...stored) : lo;
      slider.min = lo; slider.max = hi; slider.step = Math.max((hi - lo) / 500, 1e-6);
      slider.value = st.thr === null ? start : Math.min(Math.max(st.thr, lo), hi);
      slider.disabled = false;
    } else {
      slider.disabled = true;
    }
    prevB.disabled = i <= 0; nextB.disabled = i >= st.total - 1;
    if (!m.found) {
      img.removeAttribute("src");
      title.textContent += " (micrograph file not found)";
      count.textContent = `${m.picks.length} picks`;
      count.dataset.n = String(m.picks.length);
      return;
    }
    await new Promise((resolve) => {
      img.onload = () => { draw(); resolve(); };
      img.onerror = () => resolve();
      img.src = CP.url("/img/mic.png", { job: job.name, i, lp: lp.value });
    });
  }

  function renderItems() {
    list.replaceChildren(...st.items.map((it) => CP.el("div", { class: "item" + (it.i === st.cur ? " on" : ""), "data-i": it.i,
      onclick: () => select(it.i) }, CP.el("span", { class: "name", text: it.micrograph, title: it.micrograph }),
      CP.el("span", { class: "muted", text: it.n_picks === null ? "" : String(it.n_picks) }))));
    more.hidden = st.items.length >= st.total;
  }

  async function loadPage(offset) {
    const d = await CP.api("/api/picks", { job: job.name, offset, limit: PAGE });
    st.total = d.total; st.kind = d.kind;
    if (offset === 0) st.items = d.items; else st.items = st.items.concat(d.items);
    head.textContent = `${d.total} micrographs in ${d.list}` + (d.kind === "coords" ? " with coordinate files" : "");
    renderItems();
  }

  async function repick(i) {
    const t = Number(slider.value);
    const r = await CP.api("/api/picks/mic", { job: job.name, i, threshold: t });
    if (st.cur !== i || Number(slider.value) !== t) return;  // a newer request is on its way
    st.mic.candidates = r.candidates;
    draw();
  }
  let repickTimer = null;
  slider.addEventListener("input", () => {
    st.thr = Number(slider.value);
    if (st.mic && st.mic.repick) {
      clearTimeout(repickTimer);
      repickTimer = setTimeout(() => repick(st.cur), 120);
    } else {
      draw();
    }
  });
  showPicks.addEventListener("change", draw);
  lp.addEventListener("change", () => select(st.cur));
  prevB.addEventListener("click", () => select(st.cur - 1));
  nextB.addEventListener("click", () => select(st.cur + 1));
  more.addEventListener("click", () => loadPage(st.items.length));
  window.addEventListener("resize", draw);
  body._picks = { refreshList: async () => { await loadPage(0); } };
  await loadPage(0);
  if (st.total) await select(0);
};

/* ------------------------------------------------------------------ FSC, Guinier */
function fscLines(fsc) {
  const out = [];
  const add = (label, key, color, width) => { if (fsc[key]) out.push({ label, values: fsc[key], color, width }); };
  add("corrected", "rlnFourierShellCorrelationCorrected", "#111111", 2.2);
  add("unmasked", "rlnFourierShellCorrelationUnmaskedMaps", "#2e9d5b");
  add("masked", "rlnFourierShellCorrelationMaskedMaps", "#2f6fd6");
  add("phase-randomised masked", "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", "#d23c3c");
  return out;
}

Panels.postprocess = async function (body, job) {
  const d = await CP.api("/api/postprocess", { job: job.name });
  const g = d.general || {};
  body.replaceChildren();
  body.append(kvTable([
    ["final resolution (FSC 0.143)", g.rlnFinalResolution ? `${CP.fmt(g.rlnFinalResolution, 2)} Å` : null],
    ["B-factor used for sharpening", g.rlnBfactorUsedForSharpening !== undefined ? `${CP.fmt(g.rlnBfactorUsedForSharpening, 1)} Å²` : null],
    ["Guinier fit", g.rlnFittedSlopeGuinierPlot !== undefined ? `slope ${CP.fmt(g.rlnFittedSlopeGuinierPlot, 2)}, intercept ${CP.fmt(g.rlnFittedInterceptGuinierPlot, 2)}, correlation ${CP.fmt(g.rlnCorrelationFitGuinierPlot, 3)}` : null],
    ["phase randomisation from", g.rlnRandomiseFrom ? `${CP.fmt(g.rlnRandomiseFrom, 2)} Å` : null],
    ["mask", g.rlnMaskName], ["sharpened map", g.rlnPostprocessedMap],
  ]));
  const wrap = CP.el("div", { class: "plots" });
  body.append(wrap);
  const f = d.fsc || {};
  if (f.rlnResolution) {
    const x = f.rlnResolution;
    const lines = fscLines(f);
    lines.push({ label: "0.143", values: x.map(() => 0.143), color: "#888888", dash: [6, 4], width: 1 });
    Plots.line(wrap, { title: `FSC${g.rlnFinalResolution ? ` · ${CP.fmt(g.rlnFinalResolution, 2)} Å at 0.143` : ""}`,
      x, series: lines, xlabel: "resolution (Å)", ylabel: "FSC", xfmt: Plots.angstrom, yrange: [-0.1, 1.05], height: 280 });
  }
  const gu = d.guinier || {};
  if (gu.rlnResolutionSquared) {
    const ser = [];
    const add = (label, key, color, dash) => { if (gu[key] && gu[key].some((v) => v !== null)) ser.push({ label, values: gu[key], color, dash }); };
    add("original", "rlnLogAmplitudesOriginal", "#2f6fd6");
    add("MTF-corrected", "rlnLogAmplitudesMTFCorrected", "#7b4fc9");
    add("weighted", "rlnLogAmplitudesWeighted", "#2e9d5b");
    add("sharpened", "rlnLogAmplitudesSharpened", "#d23c3c");
    const x2 = gu.rlnResolutionSquared, a = g.rlnFittedSlopeGuinierPlot, b = g.rlnFittedInterceptGuinierPlot;
    if (typeof a === "number" && typeof b === "number") {
      /* the fit line (RELION's intercept column holds the intercept only), drawn where the data are */
      const orig = gu.rlnLogAmplitudesOriginal || x2;
      ser.push({ label: `fit (slope ${a.toFixed(1)})`, values: x2.map((v, i) => (v > 0 && orig[i] !== null ? b + a * v : null)),
        color: "#111111", dash: [5, 4], width: 1.2 });
    }
    Plots.line(wrap, { title: "Guinier plot", x: gu.rlnResolutionSquared, series: ser, xlabel: "resolution (Å), axis 1/d²",
      ylabel: "ln(amplitude)", xfmt: Plots.angstrom2, height: 280 });
  }
};

Panels.fsc = async function (body, job) {
  const d = await CP.api("/api/fsc", { job: job.name });
  body.replaceChildren();
  if (!d.resolution || !d.resolution.length) { body.append(CP.el("p", { class: "muted", text: "no FSC yet" })); return; }
  body.append(CP.el("p", { class: "muted", text: `from ${d.file}; current resolution ${CP.fmt(d.current_resolution, 2)} Å` }));
  const wrap = CP.el("div", { class: "plots" });
  body.append(wrap);
  Plots.line(wrap, { title: "Gold-standard FSC (half maps)", x: d.resolution, xlabel: "resolution (Å)", ylabel: "FSC",
    xfmt: Plots.angstrom, yrange: [-0.1, 1.05], height: 280,
    series: [{ label: "FSC", values: d.fsc, color: "#111111", width: 2 },
      { label: "0.143", values: d.resolution.map(() => 0.143), color: "#888888", dash: [6, 4], width: 1 }] });
};

/* ------------------------------------------------------------------ angular distribution */
function viridis(t) {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i;
  return stops[i].map((c, j) => Math.round(c + f * (stops[i + 1][j] - c)));
}

Panels.angles = async function (body, job) {
  const d = await CP.api("/api/angles", { job: job.name });
  body.replaceChildren();
  if (!d.available) {
    body.append(CP.el("p", { class: "muted", text: `no 3D orientations in ${d.file || "the particles"} (${d.n} particles)` }));
    return "hide";
  }
  const nr = d.rot_bins, nt = d.tilt_bins, cell = 6, L = 44, T = 10, B = 34;
  const W = L + nr * cell + 70, H = T + nt * cell + B;
  const cv = CP.el("canvas", { class: "heat", width: W, height: H, id: "angles-canvas" });
  const ctx = cv.getContext("2d");
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
  let max = 0;
  for (const row of d.counts) for (const c of row) max = Math.max(max, c);
  const lmax = Math.log(Math.max(max, 2));
  for (let t = 0; t < nt; t++) for (let r = 0; r < nr; r++) {
    const c = d.counts[t][r];
    const [R, G, Bc] = c > 0 ? viridis(max > 1 ? Math.log(c) / lmax : 1) : [245, 246, 248];
    ctx.fillStyle = `rgb(${R},${G},${Bc})`;
    ctx.fillRect(L + r * cell, T + t * cell, cell, cell);
  }
  ctx.fillStyle = "#444"; ctx.font = "11px sans-serif"; ctx.textAlign = "center";
  for (const rot of [-180, -90, 0, 90, 180]) ctx.fillText(String(rot), L + ((rot + 180) / 360) * nr * cell, T + nt * cell + 14);
  ctx.fillText("rot (°)", L + (nr * cell) / 2, T + nt * cell + 28);
  ctx.textAlign = "right";
  for (const tilt of [0, 90, 180]) ctx.fillText(String(tilt), L - 4, T + (tilt / 180) * nt * cell + 4);
  ctx.save(); ctx.translate(12, T + (nt * cell) / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center"; ctx.fillText("tilt (°)", 0, 0); ctx.restore();
  const lx = L + nr * cell + 16;
  for (let i = 0; i < nt * cell; i++) {
    const [R, G, Bc] = viridis(1 - i / (nt * cell));
    ctx.fillStyle = `rgb(${R},${G},${Bc})`; ctx.fillRect(lx, T + i, 12, 1);
  }
  ctx.fillStyle = "#444"; ctx.textAlign = "left";
  ctx.fillText(String(max), lx + 16, T + 8); ctx.fillText("1", lx + 16, T + nt * cell);
  body.append(CP.el("p", { class: "muted", text: `${d.n} particles from ${d.file}; particles per 5° × 5° bin (log colour scale)` }), cv);
};
window.Panels = Panels;
