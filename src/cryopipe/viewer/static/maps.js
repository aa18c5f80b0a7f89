/* cryopipe view: maps (central slices, projections, isosurface with NGL), tomograms (slices) and stacks. */
"use strict";
(function () {
  let nglLoading = null;
  function loadNgl() {
    if (window.NGL) return Promise.resolve();
    if (!nglLoading) {
      nglLoading = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = "/static/vendor/ngl.js";
        s.onload = () => resolve();
        s.onerror = () => reject(new Error("could not load the NGL viewer"));
        document.head.append(s);
      });
    }
    return nglLoading;
  }

  function view(job, m, params, caption) {
    return CP.el("figure", {}, CP.el("img", { loading: "lazy", alt: caption,
      src: CP.url("/img/vol.png", { job: job.name, file: m.file, ...params }) }), CP.el("figcaption", { text: caption }));
  }

  function isosurface(container, job, m) {
    const box = CP.el("div", { class: "ngl", id: "ngl-viewport" });
    const slider = CP.el("input", { type: "range", id: "iso-threshold", min: 0.5, max: 6, step: 0.1, value: 2 });
    const label = CP.el("span", { class: "mono", text: "2.0 σ" });
    const state = CP.el("span", { class: "muted", text: "loading the isosurface…" });
    container.append(CP.el("div", {}, CP.el("div", { class: "toolbar" }, CP.el("label", {}, "isosurface threshold ", slider),
      label, state), box));
    loadNgl().then(() => {
      const stage = new NGL.Stage(box, { backgroundColor: "white", tooltip: false });
      box._stage = stage;
      const url = CP.url("/map.mrc", { job: job.name, file: m.file });
      return stage.loadFile(url, { ext: "mrc", name: m.file }).then((comp) => {
        const repr = comp.addRepresentation("surface", { isolevelType: "sigma", isolevel: Number(slider.value),
          color: "#5b8fd9", useWorker: false, opacity: 1.0 });
        comp.autoView();
        slider.addEventListener("input", () => {
          label.textContent = `${Number(slider.value).toFixed(1)} σ`;
          repr.setParameters({ isolevel: Number(slider.value) });
        });
        state.textContent = "drag to rotate, scroll to zoom";
        stage.viewer.requestRender();
        setTimeout(() => { box.dataset.ready = "1"; }, 300);
      });
    }).catch((e) => { state.textContent = "isosurface viewer: " + e.message; state.className = "error"; box.dataset.ready = "error"; });
  }

  function showMap(area, job, m) {
    area.replaceChildren();
    const dims = m.shape ? `${m.shape[2]}×${m.shape[1]}×${m.shape[0]}` : "";
    area.append(CP.el("p", { class: "muted", text: `${m.file} · ${dims} · ${m.pixel_size || "?"} Å/px · ${m.mb} MB` }));
    if (m.kind === "map") {
      const grid = CP.el("div", { class: "mapgrid" });
      const views = CP.el("div", { class: "views", id: "map-views" },
        view(job, m, { view: "slice", axis: "z" }, "central slice z (xy)"),
        view(job, m, { view: "slice", axis: "y" }, "central slice y (xz)"),
        view(job, m, { view: "slice", axis: "x" }, "central slice x (yz)"),
        view(job, m, { view: "proj", axis: "z" }, "projection along z"),
        view(job, m, { view: "proj", axis: "y" }, "projection along y"),
        view(job, m, { view: "proj", axis: "x" }, "projection along x"));
      grid.append(views);
      area.append(grid);
      isosurface(grid, job, m);
    } else if (m.kind === "tomogram") {
      const nz = m.shape[0];
      const slider = CP.el("input", { type: "range", min: 0, max: nz - 1, step: 1, value: Math.floor(nz / 2), id: "tomo-z" });
      const lab = CP.el("span", { class: "mono", text: `z ${Math.floor(nz / 2)} / ${nz}` });
      const xy = CP.el("img", { alt: "xy slice", src: CP.url("/img/vol.png", { job: job.name, file: m.file, view: "slice", axis: "z" }) });
      let timer = null;
      slider.addEventListener("input", () => {
        lab.textContent = `z ${slider.value} / ${nz}`;
        clearTimeout(timer);
        timer = setTimeout(() => { xy.src = CP.url("/img/vol.png", { job: job.name, file: m.file, view: "slice", axis: "z", index: slider.value }); }, 120);
      });
      area.append(CP.el("div", { class: "toolbar" }, CP.el("label", {}, "slice ", slider), lab),
        CP.el("div", { class: "tomo" }, xy),
        CP.el("div", { class: "views" }, view(job, m, { view: "slice", axis: "y" }, "central slice y (xz)"),
          view(job, m, { view: "slice", axis: "x" }, "central slice x (yz)")));
    } else if (m.kind === "stack" || m.kind === "image") {
      const n = m.shape ? m.shape[0] : 1;
      const im = CP.el("img", { alt: "image", src: CP.url("/img/stack.png", { job: job.name, file: m.file, index: 0 }) });
      const slider = CP.el("input", { type: "range", min: 0, max: Math.max(0, n - 1), step: 1, value: 0 });
      const lab = CP.el("span", { class: "mono", text: `image 1 / ${n}` });
      let timer = null;
      slider.addEventListener("input", () => {
        lab.textContent = `image ${Number(slider.value) + 1} / ${n}`;
        clearTimeout(timer);
        timer = setTimeout(() => { im.src = CP.url("/img/stack.png", { job: job.name, file: m.file, index: slider.value }); }, 120);
      });
      if (n > 1) area.append(CP.el("div", { class: "toolbar" }, CP.el("label", {}, "image ", slider), lab));
      area.append(CP.el("div", { class: "tomo" }, im));
    } else {
      area.append(CP.el("p", { class: "error", text: `${m.file}: not readable as MRC` }));
    }
  }

  Panels.maps = async function (body, job) {
    const d = await CP.api("/api/maps", { job: job.name });
    const prev = body.querySelector("select.mapsel");
    const keep = prev ? prev.value : null;
    if (prev && d.maps.map((m) => m.file).join("|") === body.dataset.files) return; // nothing new
    body.dataset.files = d.maps.map((m) => m.file).join("|");
    body.replaceChildren();
    if (!d.maps.length) { body.append(CP.el("p", { class: "muted", text: "no maps" })); return; }
    const sel = CP.el("select", { class: "mapsel", id: "map-select" }, ...d.maps.map((m, i) =>
      CP.el("option", { value: m.file, text: `${m.file} (${m.kind}${m.shape ? ", " + m.shape[2] + "×" + m.shape[1] + "×" + m.shape[0] : ""})` })));
    const first = d.maps.find((m) => m.kind === "map") || d.maps.find((m) => m.kind === "tomogram") || d.maps[0];
    sel.value = keep && d.maps.some((m) => m.file === keep) ? keep : first.file;
    const area = CP.el("div");
    sel.addEventListener("change", () => showMap(area, job, d.maps.find((m) => m.file === sel.value)));
    body.append(CP.el("div", { class: "toolbar" }, CP.el("label", {}, "file ", sel),
      CP.el("span", { class: "muted", text: `${d.maps.length} MRC files` })), area);
    showMap(area, job, d.maps.find((m) => m.file === sel.value));
  };
})();
