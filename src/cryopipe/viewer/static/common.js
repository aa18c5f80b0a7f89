/* cryopipe view: helpers shared by the pages (no framework, no build step). */
"use strict";
window.__viewerErrors = [];
window.addEventListener("error", (e) => window.__viewerErrors.push(String(e.message || e)));
window.addEventListener("unhandledrejection", (e) => window.__viewerErrors.push(String(e.reason)));

const CP = {
  qs(params) {
    return Object.entries(params || {}).filter(([, v]) => v !== undefined && v !== null)
      .map(([k, v]) => encodeURIComponent(k) + "=" + encodeURIComponent(v)).join("&");
  },
  url(path, params) { const q = CP.qs(params); return q ? path + "?" + q : path; },
  async api(path, params) {
    const r = await fetch(CP.url(path, params), { cache: "no-store" });
    let body = null;
    try { body = await r.json(); } catch (e) { body = { error: r.statusText }; }
    if (!r.ok) throw new Error((body && body.error) || r.statusText);
    return body;
  },
  el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  },
  esc(s) {
    return String(s === undefined || s === null ? "" : s).replace(/[&<>"']/g,
      (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  },
  pad(n) { return String(n).padStart(2, "0"); },
  fmtTime(t) {
    if (!t) return "";
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${CP.pad(d.getMonth() + 1)}-${CP.pad(d.getDate())} ${CP.pad(d.getHours())}:${CP.pad(d.getMinutes())}`;
  },
  fmtDur(s) {
    if (s === null || s === undefined) return "";
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${CP.pad(Math.round(s % 60))} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${CP.pad(Math.floor((s % 3600) / 60))} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  },
  fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (typeof x !== "number") return String(x);
    return Math.abs(x) >= 1000 || Number.isInteger(x) ? String(Math.round(x * 100) / 100) : x.toFixed(digits === undefined ? 2 : digits);
  },
  badge(status) { return CP.el("span", { class: "badge status-" + status, text: status }); },
  jobUrl(name) { return "/job/" + name.split("/").filter(Boolean).map(encodeURIComponent).join("/") + "/"; },
  /* run fn every ms milliseconds (after it finishes), while keep() is true */
  poll(fn, ms, keep) {
    let stopped = false;
    const tick = async () => {
      if (stopped || (keep && !keep())) return;
      try { await fn(); } catch (e) { /* shown by fn; keep polling */ }
      if (!stopped) setTimeout(tick, ms);
    };
    setTimeout(tick, ms);
    return () => { stopped = true; };
  },
  stamp() { const d = new Date(); return `updated ${CP.pad(d.getHours())}:${CP.pad(d.getMinutes())}:${CP.pad(d.getSeconds())}`; },
};
window.CP = CP;
