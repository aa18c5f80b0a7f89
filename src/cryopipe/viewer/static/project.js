/* cryopipe view: the project page (job graph + job table), refreshed every few seconds. */
"use strict";
(function () {
  const COLW = 184, ROWH = 54, BOXW = 160, BOXH = 40, PAD = 12;
  const STATUS_COLOR = { succeeded: "#2e9d5b", running: "#2f6fd6", failed: "#d23c3c", aborted: "#c98512" };
  let data = null, lastText = "", sortKey = "number", sortDir = 1;

  function durationOf(j, now) {
    if (j.seconds !== null && j.seconds !== undefined && j.status !== "running") return j.seconds;
    if (j.status === "running" && j.started) return Math.max(0, Date.now() / 1000 - j.started);
    return j.seconds;
  }

  function renderCounts() {
    const c = document.getElementById("counts");
    c.replaceChildren();
    for (const [s, n] of Object.entries(data.counts).sort()) c.append(CP.badge(s), CP.el("span", { text: n + "  " }));
    document.getElementById("njobs").textContent = `${data.jobs.length} jobs · ${data.name}`;
  }

  function short(s, n) { return s.length > n ? s.slice(0, n - 1) + "…" : s; }

  function renderGraph() {
    const box = document.getElementById("graph");
    if (!data.jobs.length) { box.innerHTML = '<p class="muted">no jobs in default_pipeline.star yet</p>'; return; }
    const pos = {};
    let maxc = 0, maxr = 0;
    for (const j of data.jobs) {
      pos[j.name] = [PAD + j.col * COLW, PAD + j.row * ROWH];
      maxc = Math.max(maxc, j.col); maxr = Math.max(maxr, j.row);
    }
    const W = PAD * 2 + maxc * COLW + BOXW, H = PAD * 2 + maxr * ROWH + BOXH;
    const parts = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">`];
    for (const [a, b] of data.edges) {
      const p = pos[a], q = pos[b];
      if (!p || !q) continue;
      const x1 = p[0] + BOXW, y1 = p[1] + BOXH / 2, x2 = q[0], y2 = q[1] + BOXH / 2, dx = Math.max(30, (x2 - x1) / 2);
      parts.push(`<path class="edge" d="M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}"/>`);
    }
    for (const j of data.jobs) {
      const [x, y] = pos[j.name];
      const col = STATUS_COLOR[j.status] || "#8a8fa0";
      const title = `${j.name} ${j.label} ${j.status}${j.alias ? " alias " + j.alias : ""}`;
      const sub = j.alias ? j.alias.replace(/\/$/, "").split("/").pop() : j.label.replace(/^relion\.|^cryopipe\./, "");
      parts.push(`<a href="${CP.jobUrl(j.name)}" class="node" data-job="${CP.esc(j.name)}"><title>${CP.esc(title)}</title>` +
        `<rect x="${x}" y="${y}" width="${BOXW}" height="${BOXH}"/>` +
        `<rect class="stripe" x="${x}" y="${y}" width="6" height="${BOXH}" fill="${col}"/>` +
        `<text x="${x + 12}" y="${y + 16}">${CP.esc(j.type)}/job${String(j.number).padStart(3, "0")}</text>` +
        `<text class="t2" x="${x + 12}" y="${y + 31}">${CP.esc(short(sub + " · " + j.status, 25))}</text></a>`);
    }
    parts.push("</svg>");
    box.innerHTML = parts.join("");
  }

  function renderTable() {
    const f = document.getElementById("filter").value.trim().toLowerCase();
    const rows = data.jobs.filter((j) => !f || `${j.name} ${j.label} ${j.alias || ""} ${j.status}`.toLowerCase().includes(f));
    const key = sortKey;
    rows.sort((a, b) => {
      const va = key === "seconds" ? durationOf(a) : a[key], vb = key === "seconds" ? durationOf(b) : b[key];
      if (va === vb) return a.number - b.number;
      if (va === null || va === undefined) return 1;
      if (vb === null || vb === undefined) return -1;
      return (va < vb ? -1 : 1) * sortDir;
    });
    const html = rows.map((j) => `<tr data-job="${CP.esc(j.name)}"><td class="num">${j.number}</td>` +
      `<td><a href="${CP.jobUrl(j.name)}">${CP.esc(j.name)}</a></td><td>${CP.esc(j.label)}</td>` +
      `<td>${CP.esc(j.alias || "")}</td><td><span class="badge status-${CP.esc(j.status)}">${CP.esc(j.status)}</span></td>` +
      `<td>${CP.fmtTime(j.started)}</td><td class="num">${CP.fmtDur(durationOf(j))}</td></tr>`);
    document.querySelector("#jobs tbody").innerHTML = html.join("");
    document.getElementById("shown").textContent = f ? `${rows.length} of ${data.jobs.length} shown` : "";
  }

  async function refresh() {
    const d = await CP.api("/api/project");
    const text = JSON.stringify([d.jobs, d.edges]);
    document.getElementById("updated").textContent = CP.stamp();
    const running = d.jobs.some((j) => j.status === "running");
    if (text === lastText && !running) return;
    const graphChanged = !data || JSON.stringify([data.jobs.map((j) => [j.name, j.status, j.col, j.row]), data.edges]) !==
      JSON.stringify([d.jobs.map((j) => [j.name, j.status, j.col, j.row]), d.edges]);
    lastText = text;
    data = d;
    renderCounts();
    if (graphChanged) renderGraph();
    renderTable();
  }

  document.getElementById("filter").addEventListener("input", () => data && renderTable());
  for (const th of document.querySelectorAll("#jobs th")) {
    th.addEventListener("click", () => {
      const k = th.dataset.k;
      sortDir = k === sortKey ? -sortDir : 1;
      sortKey = k;
      renderTable();
    });
  }
  refresh().then(() => { document.body.dataset.ready = "1"; }).catch((e) => {
    document.getElementById("graph").innerHTML = `<p class="error">${CP.esc(e.message)}</p>`;
    document.body.dataset.ready = "1";
  });
  CP.poll(refresh, 4000);
})();
