/* cryopipe view: one job's page. Header, command, options, live log, then the data panels (panels.js, maps.js).
 * While the job runs the header and log are polled every 2 s and the live panels every 8 s; no reload needed. */
"use strict";
(async function () {
  const NAME = window.CRYOPIPE_JOB;
  let job = null;
  const sections = {};
  const logs = { "run.out": { offset: null, text: "" }, "run.err": { offset: null, text: "" } };
  let logFile = "run.out";
  const MAX_LOG = 400000;

  function renderHead() {
    const h = document.getElementById("jobhead");
    document.getElementById("crumb").textContent = job.name;
    h.replaceChildren(...[CP.el("h1", { id: "jobname", text: job.name }), CP.badge(job.status),
      CP.el("span", { class: "label", text: job.label }),
      job.alias ? CP.el("span", { class: "label", text: "alias " + job.alias }) : null,
      job.started ? CP.el("span", { class: "muted", text: `started ${CP.fmtTime(job.started)}` }) : null,
      job.seconds !== null && job.seconds !== undefined ? CP.el("span", { class: "muted",
        text: (job.status === "running" ? "running for " : "took ") + CP.fmtDur(job.status === "running" && job.started ? Date.now() / 1000 - job.started : job.seconds) }) : null].filter(Boolean));
    document.title = `${job.name} (${job.status})`;
    document.getElementById("updated").textContent = CP.stamp();
  }

  function renderCommand() {
    const c = document.getElementById("command");
    c.replaceChildren();
    c.className = "";
    const runs = job.note.runs || [];
    if (!runs.length) c.append(CP.el("p", { class: "muted", text: "no note.txt" }));
    for (const r of runs) {
      c.append(CP.el("div", { class: "muted", text: `${r.verb}${r.when ? " on " + CP.fmtTime(r.when) : ""}` }));
      for (const cmd of r.commands) c.append(CP.el("div", { class: "cmd mono", text: cmd }));
    }
    const links = document.getElementById("links");
    links.replaceChildren();
    if (job.inputs.length) links.append(CP.el("span", { class: "muted", text: "input from " }), ...job.inputs.map((n) => CP.el("a", { href: CP.jobUrl(n), text: n })));
    if (job.children.length) links.append(CP.el("span", { class: "muted", text: " used by " }), ...job.children.map((n) => CP.el("a", { href: CP.jobUrl(n), text: n })));
    const od = document.querySelector("#options > div");
    const opts = (job.options.options || []).filter(([, v]) => v !== "");
    od.replaceChildren(opts.length ? CP.el("table", { class: "kv mono" }, opts.map(([k, v]) => CP.el("tr", {}, CP.el("td", { text: k }), CP.el("td", { text: v }))))
      : CP.el("p", { class: "muted", text: "no job.star" }));
    if (job.output_nodes.length) od.append(CP.el("p", { class: "muted", text: "outputs: " + job.output_nodes.join(", ") }));
  }

  async function pollLog(file) {
    const st = logs[file];
    const d = await CP.api("/api/log", { job: NAME, file, offset: st.offset === null ? undefined : st.offset });
    st.offset = d.offset;
    st.text = d.reset ? d.text : st.text + d.text;
    if (st.text.length > MAX_LOG) st.text = st.text.slice(st.text.length - MAX_LOG);
    st.truncated = st.truncated || d.truncated;
    if (file === logFile) showLog();
  }

  function showLog() {
    const pre = document.getElementById("log");
    const st = logs[logFile];
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
    pre.textContent = (st.truncated ? "… (beginning not shown)\n" : "") + (st.text || "(empty)");
    if (document.getElementById("follow").checked || atBottom) pre.scrollTop = pre.scrollHeight;
    const l = job.logs && job.logs[logFile];
    document.getElementById("logstate").textContent = l ? `${logFile}, ${(l.size / 1024).toFixed(1)} kB` +
      (job.status === "running" ? " · live" : "") : `${logFile}: not written`;
  }

  function ensureSection(p) {
    if (sections[p]) return sections[p];
    const body = CP.el("div", { class: "body" });
    const sec = CP.el("section", { class: "panel", id: "p-" + p, "data-panel": p }, CP.el("h2", { text: PANEL_TITLES[p] || p }), body);
    document.getElementById("panels").append(sec);
    document.getElementById("nav").append(CP.el("a", { href: "#p-" + p, text: PANEL_TITLES[p] || p }));
    sections[p] = body;
    return body;
  }

  async function loadPanel(p) {
    const body = ensureSection(p);
    if (!Panels[p]) { body.textContent = "no viewer for this panel"; return; }
    try {
      const r = await Panels[p](body, job);
      if (r === "hide") {  /* nothing to show after all (e.g. 2D particles have no 3D angles) */
        body.parentElement.hidden = true;
        const a = document.querySelector(`nav.panels a[href="#p-${p}"]`);
        if (a) a.remove();
      }
    } catch (e) {
      body.replaceChildren(CP.el("p", { class: "error", text: `${PANEL_TITLES[p] || p}: ${e.message}` }));
    }
  }

  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => {
      logFile = b.dataset.f;
      for (const o of document.querySelectorAll(".tabs button")) o.classList.toggle("on", o === b);
      showLog();
      pollLog(logFile).catch(() => {});
    });
  }

  try {
    job = await CP.api("/api/job", { job: NAME });
  } catch (e) {
    document.getElementById("command").replaceChildren(CP.el("p", { class: "error", text: e.message }));
    document.body.dataset.ready = "1";
    return;
  }
  renderHead();
  renderCommand();
  document.getElementById("nav").append(CP.el("a", { href: "#p-command", text: "Command" }), CP.el("a", { href: "#p-log", text: "Log" }));
  await Promise.all([pollLog("run.out").catch(() => {}), pollLog("run.err").catch(() => {})]);
  await Promise.all(job.panels.map((p) => { ensureSection(p); return loadPanel(p); }));
  document.body.dataset.ready = "1";

  /* live updates */
  let wasRunning = job.status === "running";
  let lastPanels = 0;
  CP.poll(async () => {
    job = await CP.api("/api/job", { job: NAME });
    renderHead();
    const running = job.status === "running";
    if (running || wasRunning) {
      await pollLog(logFile);
      const now = Date.now();
      const finished = wasRunning && !running;
      if (finished) renderCommand();
      if (finished || now - lastPanels > 8000) {
        lastPanels = now;
        for (const p of job.panels) if (!sections[p] || finished || LIVE_PANELS.has(p)) await loadPanel(p);
      }
    }
    wasRunning = running;
  }, 2000);
})();
