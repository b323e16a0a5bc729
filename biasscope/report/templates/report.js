/* biasscope report: figures, attention explorer, detail panel, confusion-matrix cells.
 * Data comes from two JSON blobs (#bs-data, #bs-thumbs). Strings from the data are put into
 * the page with textContent only, and into Plotly text (which reads a subset of HTML) through
 * ptext(), which turns & < > into entities. */
(function () {
  "use strict";

  var D = JSON.parse(document.getElementById("bs-data").textContent);
  var R = D.rows;
  var CLASSES = D.classes;
  var THUMBS = null;
  var CONFIG = { displaylogo: false, responsive: true,
                 modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d", "toggleSpikelines"] };
  var PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6",
                 "#9d755d", "#bab0ac", "#eeca3b", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b",
                 "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939"];

  // #bs-thumbs comes after this script: use it once the document is parsed
  var domReady = new Promise(function (resolve) {
    if (document.readyState !== "loading") { resolve(); } else { document.addEventListener("DOMContentLoaded", resolve); }
  });
  function thumbs() {
    if (THUMBS === null) {
      THUMBS = JSON.parse(document.getElementById("bs-thumbs").textContent);
    }
    return THUMBS;
  }
  function parsed() { return document.readyState !== "loading"; }

  // ---- small DOM helpers (textContent only) -------------------------------------------
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function img(src, alt) {
    var i = document.createElement("img");
    i.decoding = "async";
    i.alt = alt || "";
    i.src = src;
    return i;
  }
  function ptext(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  function baseName(p) {
    var s = String(p);
    var i = Math.max(s.lastIndexOf("/"), s.lastIndexOf("\\"));
    return i >= 0 ? s.slice(i + 1) : s;
  }
  function fmt(v, nd) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) { return "–"; }
    return Number(v).toFixed(nd === undefined ? 3 : nd);
  }
  function pct(v) {
    if (v === null || v === undefined) { return "–"; }
    return (100 * v).toFixed(1) + "%";
  }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  // ---- thumbnails ---------------------------------------------------------------------
  var NO_THUMB = { "-1": "no thumbnail (report capped)", "-2": "no thumbnail (image not readable)" };

  function thumbUris(i) {
    if (R.thumb[i] !== 1) { return null; }
    return thumbs().images[String(i)] || null;
  }
  function noImg(i) {
    return el("span", "noimg", NO_THUMB[String(R.thumb[i])] || "no thumbnail");
  }
  /* mode: "pair" = image + CAM overlay; "cam" = CAM overlay; "cams" = predicted-class CAM +
   * true-class CAM (misclassified) or image + CAM (correct). */
  function fillThumb(btn, i, mode) {
    clear(btn);
    var u = thumbUris(i);
    var imgs = el("span", "imgs");
    var sub = null;
    if (!u) {
      imgs.appendChild(noImg(i));
    } else if (mode === "cam") {
      imgs.appendChild(img(u[1], "CAM overlay"));
    } else if (mode === "cams" && u[2]) {
      imgs.appendChild(img(u[1], "CAM of the predicted class"));
      imgs.appendChild(img(u[2], "CAM of the true class"));
      sub = el("span", "sub");
      sub.appendChild(el("span", null, "pred: " + CLASSES[R.pred[i]]));
      sub.appendChild(el("span", null, "true: " + CLASSES[R.label[i]]));
    } else {
      imgs.appendChild(img(u[0], "image"));
      imgs.appendChild(img(u[1], "CAM overlay"));
    }
    btn.appendChild(imgs);
    if (sub) { btn.appendChild(sub); }
    var wrong = !R.correct[i];
    var cap = mode === "cam" ? baseName(R.path[i])
      : (mode === "cams" ? baseName(R.path[i]) + " · " + pct(R.confidence[i])
      : baseName(R.path[i]) + " · " + CLASSES[R.label[i]] + (wrong ? " → " + CLASSES[R.pred[i]] : " ✓"));
    btn.appendChild(el("span", "cap" + (wrong ? " wrong" : ""), cap));
    btn.title = R.path[i] + "\ntrue " + CLASSES[R.label[i]] + ", predicted " + CLASSES[R.pred[i]] +
      " (" + pct(R.confidence[i]) + ")";
    btn.dataset.filled = "1";
  }
  function makeThumb(i, mode) {
    var b = el("button", "thumb");
    b.type = "button";
    b.dataset.row = String(i);
    fillThumb(b, i, mode);
    return b;
  }
  /* Static thumbnails (findings, clusters) are filled in chunks, so that no single task
   * blocks the page for long. */
  function thumbTasks() {
    var list = Array.prototype.slice.call(document.querySelectorAll(".thumb[data-row]"));
    var tasks = [];
    var CHUNK = 80;
    for (var k = 0; k < list.length; k += CHUNK) {
      (function (part) {
        tasks.push(function () {
          return domReady.then(function () {
            part.forEach(function (b) {
              if (!b.dataset.filled) { fillThumb(b, +b.dataset.row, b.dataset.mode || "pair"); }
            });
          });
        });
      })(list.slice(k, k + CHUNK));
    }
    tasks.push(function () {
      return domReady.then(function () {
        var maps = document.querySelectorAll("img.meanmap[data-cluster]");
        for (var j = 0; j < maps.length; j++) {
          var uri = thumbs().clusters[maps[j].dataset.cluster];
          if (uri) { maps[j].src = uri; }
        }
      });
    });
    return tasks;
  }

  // ---- detail panel -------------------------------------------------------------------
  var detail = document.getElementById("detail");
  function addRow(tbody, key, value) {
    var tr = el("tr");
    tr.appendChild(el("th", null, key));
    var td = el("td");
    if (value instanceof Node) { td.appendChild(value); } else { td.textContent = value; }
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
  function figure(src, caption) {
    var f = el("figure");
    f.appendChild(img(src, caption));
    f.appendChild(el("figcaption", null, caption));
    return f;
  }
  function showDetail(i) {
    if (!parsed()) { domReady.then(function () { showDetail(i); }); return; }
    i = +i;
    if (!(i >= 0 && i < D.n)) { return; }
    detail.hidden = false;
    detail.dataset.row = String(i);
    document.getElementById("detail-title").textContent = baseName(R.path[i]);
    document.getElementById("detail-path").textContent = R.path[i];
    var box = document.getElementById("detail-images");
    clear(box);
    var u = thumbUris(i);
    if (u) {
      box.appendChild(figure(u[0], "image"));
      box.appendChild(figure(u[1], "CAM: " + CLASSES[R.pred[i]] + " (predicted)"));
      if (u[2]) { box.appendChild(figure(u[2], "CAM: " + CLASSES[R.label[i]] + " (true)")); }
    } else {
      box.appendChild(el("div", "noimg", NO_THUMB[String(R.thumb[i])] || "no thumbnail"));
    }
    var tb = document.querySelector("#detail-table tbody");
    clear(tb);
    addRow(tb, "true label", CLASSES[R.label[i]]);
    addRow(tb, "predicted", CLASSES[R.pred[i]] + (R.correct[i] ? " ✓ correct" : " ✗ wrong"));
    addRow(tb, "confidence", pct(R.confidence[i]));
    addRow(tb, "p(true label)", pct(R.label_prob[i]));
    if (R.top5 && R.top5[i] && R.top5[i].length) {
      var t = el("table", "top5");
      for (var k = 0; k < R.top5[i].length; k++) {
        var p = R.top5_prob[i][k];
        var tr = el("tr");
        tr.appendChild(el("td", null, CLASSES[R.top5[i][k]]));
        var td = el("td");
        var bar = el("span", "bar");
        bar.style.width = Math.max(1, Math.round(80 * (p || 0))) + "px";
        td.appendChild(bar);
        td.appendChild(document.createTextNode(pct(p)));
        tr.appendChild(td);
        t.appendChild(tr);
      }
      addRow(tb, "top predictions", t);
    }
    addRow(tb, "inside_frac", fmt(R.inside_frac[i]));
    addRow(tb, "mask_frac", fmt(R.mask_frac[i]));
    addRow(tb, "lift", fmt(R.lift[i], 2));
    addRow(tb, "pointing game", R.pointing_hit[i] === null ? "–" : (R.pointing_hit[i] ? "hit" : "miss"));
    addRow(tb, "energy_inside", fmt(R.energy_inside[i]));
    addRow(tb, "cam_entropy", fmt(R.cam_entropy[i]));
    addRow(tb, "cluster", R.cluster[i] === null ? "–" : String(R.cluster[i]));
    Object.keys(D.attributes).forEach(function (a) {
      var code = D.attributes[a].codes[i];
      addRow(tb, a, code < 0 ? "–" : D.attributes[a].values[code]);
    });
    var flags = (R.flags[i] || []).map(function (k) { return D.kinds[k]; });
    addRow(tb, "flags", flags.length ? flags.join(", ") : "none");
    highlightExplorer(i);
  }
  document.getElementById("detail-close").addEventListener("click", function () { detail.hidden = true; });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") { detail.hidden = true; } });
  document.addEventListener("click", function (e) {
    var t = e.target.closest ? e.target.closest("[data-row]") : null;
    if (t && !t.closest("#detail")) { showDetail(t.dataset.row); }
  });

  // ---- findings filter ------------------------------------------------------------------
  var filters = document.querySelectorAll(".filter[data-band]");
  Array.prototype.forEach.call(filters, function (b) {
    b.addEventListener("click", function () {
      Array.prototype.forEach.call(filters, function (o) { o.classList.toggle("active", o === b); });
      var band = b.dataset.band;
      Array.prototype.forEach.call(document.querySelectorAll(".finding"), function (f) {
        f.hidden = band !== "all" && f.dataset.band !== band;
      });
    });
  });

  // a link to a finding (verdict, "explained by") opens it, even when filtered out or closed
  function revealFinding(hash) {
    if (!hash || hash.indexOf("#finding-") !== 0) { return; }
    var f = document.getElementById(hash.slice(1));
    if (!f) { return; }
    f.hidden = false;
    f.open = true;
  }
  document.addEventListener("click", function (e) {
    var a = e.target.closest ? e.target.closest("a[href^='#finding-']") : null;
    if (a) { revealFinding(a.getAttribute("href")); }
  });
  window.addEventListener("hashchange", function () { revealFinding(window.location.hash); });
  revealFinding(window.location.hash);

  var toggle = document.getElementById("findings-toggle");
  if (toggle) {
    toggle.addEventListener("click", function () {
      var open = toggle.textContent === "expand all";
      Array.prototype.forEach.call(document.querySelectorAll("details.finding"), function (d) { d.open = open; });
      toggle.textContent = open ? "collapse all" : "expand all";
    });
  }

  // ---- sortable tables ------------------------------------------------------------------
  function cellKey(td) {
    var s = td.textContent.trim().replace(/[,%]/g, "").replace("–", "");
    var v = parseFloat(s.replace(/^\+/, ""));
    return isNaN(v) ? td.textContent.trim().toLowerCase() : v;
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (t) {
    var ths = t.querySelectorAll("thead th");
    Array.prototype.forEach.call(ths, function (th, col) {
      th.addEventListener("click", function () {
        var tb = t.tBodies[0];
        var rows = Array.prototype.slice.call(tb.rows);
        var dir = th.dataset.dir === "asc" ? -1 : 1;
        th.dataset.dir = dir === 1 ? "asc" : "desc";
        rows.sort(function (a, b) {
          var x = cellKey(a.cells[col]), y = cellKey(b.cells[col]);
          if (typeof x !== typeof y) { return (typeof x === "number" ? -1 : 1) * dir; }
          return (x < y ? -1 : x > y ? 1 : 0) * dir;
        });
        rows.forEach(function (r) { tb.appendChild(r); });
      });
    });
  });

  // ---- attention explorer ---------------------------------------------------------------
  var explorerDiv = document.getElementById("explorer-plot");
  var explorerMode = "cluster";
  var scatterType = "scatter";
  var highlightTrace = -1;
  var hoverText = null;

  function webglAvailable() {
    try {
      var c = document.createElement("canvas");
      return !!(window.WebGLRenderingContext && (c.getContext("webgl") || c.getContext("experimental-webgl")));
    } catch (e) { return false; }
  }
  function hover(i) {
    if (hoverText === null) { hoverText = new Array(D.n); }
    if (hoverText[i] === undefined) {
      hoverText[i] = ptext(baseName(R.path[i])) + "<br>true " + ptext(CLASSES[R.label[i]]) +
        (R.correct[i] ? " ✓" : " → " + ptext(CLASSES[R.pred[i]])) +
        "<br>inside_frac " + fmt(R.inside_frac[i]) + " · confidence " + pct(R.confidence[i]);
    }
    return hoverText[i];
  }
  function placed() {
    var out = [];
    for (var i = 0; i < D.n; i++) { if (R.x[i] !== null && R.y[i] !== null) { out.push(i); } }
    return out;
  }
  var PLACED = null;
  function markerSize() { return D.n > 3000 ? 4 : (D.n > 800 ? 6 : 8); }
  function trace(idx, name, color, extra) {
    var t = { type: scatterType, mode: "markers", name: name, x: [], y: [], customdata: [], text: [],
              hovertemplate: "%{text}<extra></extra>",
              marker: { size: markerSize(), color: color, opacity: 0.8, line: { width: 0 } } };
    for (var k = 0; k < idx.length; k++) {
      var i = idx[k];
      t.x.push(R.x[i]); t.y.push(R.y[i]); t.customdata.push(i); t.text.push(hover(i));
    }
    if (extra) { Object.keys(extra).forEach(function (key) { t[key] = extra[key]; }); }
    return t;
  }
  function categorical(keyOf, nameOf) {
    var groups = {}, order = [];
    PLACED.forEach(function (i) {
      var k = keyOf(i);
      if (!(k in groups)) { groups[k] = []; order.push(k); }
      groups[k].push(i);
    });
    order.sort(function (a, b) { return (+a) - (+b); });
    return order.map(function (k, n) { return trace(groups[k], nameOf(k), PALETTE[n % PALETTE.length]); });
  }
  function continuous(vals, title, scale) {
    var ok = [], nan = [];
    PLACED.forEach(function (i) { (vals[i] === null ? nan : ok).push(i); });
    var traces = [];
    if (nan.length) { traces.push(trace(nan, "no value", "#c8ced4", { showlegend: true })); }
    var t = trace(ok, title, ok.map(function (i) { return vals[i]; }), { showlegend: false });
    t.marker.colorscale = scale;
    t.marker.cmin = 0; t.marker.cmax = 1;
    t.marker.colorbar = { title: { text: title }, thickness: 12, len: 0.8 };
    traces.push(t);
    return traces;
  }
  function explorerTraces(mode) {
    if (PLACED === null) { PLACED = placed(); }
    var tr;
    if (mode === "cluster") {
      tr = categorical(function (i) { return R.cluster[i] === null ? -1 : R.cluster[i]; }, function (k) {
        if (+k < 0) { return "no cluster"; }
        var c = D.clusters[+k];
        return "cluster " + k + (c ? " (" + ptext(c["class"]) + ")" : "");
      });
    } else if (mode === "label" || mode === "pred") {
      tr = categorical(function (i) { return R[mode][i]; }, function (k) { return ptext(CLASSES[+k]); });
    } else if (mode === "correct") {
      tr = [trace(PLACED.filter(function (i) { return R.correct[i]; }), "correct", "#2a9d8f"),
            trace(PLACED.filter(function (i) { return !R.correct[i]; }), "wrong", "#e76f51")];
    } else if (mode === "inside_frac") {
      tr = continuous(R.inside_frac, "inside_frac", "Viridis");
    } else {
      tr = continuous(R.confidence, "confidence", "Cividis");
    }
    var showLegend = tr.length <= 40;
    tr.forEach(function (t) { if (t.showlegend === undefined) { t.showlegend = showLegend; } });
    var sel = detail.hidden ? null : +detail.dataset.row;
    tr.push({ type: scatterType, mode: "markers", name: "selected", showlegend: false, hoverinfo: "skip",
              x: sel !== null && R.x[sel] !== null ? [R.x[sel]] : [],
              y: sel !== null && R.y[sel] !== null ? [R.y[sel]] : [],
              marker: { size: 16, color: "rgba(0,0,0,0)", line: { width: 2.5, color: "#111" } } });
    highlightTrace = tr.length - 1;
    return tr;
  }
  function layoutOf(name) {
    var spec = D.figures[name];
    var layout = JSON.parse(JSON.stringify(spec.layout));
    layout.template = D.template;
    return layout;
  }
  function renderExplorer(div) {
    if (!D.has_embedding) {
      div.appendChild(el("p", "empty", "No 2-D map in this scan (the analysis was not run)."));
      return Promise.resolve();
    }
    scatterType = D.n > 2000 && webglAvailable() ? "scattergl" : "scatter";
    var note = document.getElementById("explorer-note");
    note.textContent = (PLACED === null ? placed() : PLACED).length.toLocaleString() + " images" +
      (D.thumb_capped ? " · thumbnails only for flagged images and cluster samples" : "");
    return Plotly.newPlot(div, explorerTraces(explorerMode), layoutOf("explorer"), CONFIG).then(function () {
      div.on("plotly_click", function (ev) {
        var p = ev && ev.points && ev.points[0];
        if (p && p.customdata !== undefined && p.customdata !== null) { showDetail(p.customdata); }
      });
      document.getElementById("explorer-colour").addEventListener("change", function (e) {
        explorerMode = e.target.value;
        Plotly.react(div, explorerTraces(explorerMode), layoutOf("explorer"), CONFIG);
      });
    });
  }
  function highlightExplorer(i) {
    if (!explorerDiv || !explorerDiv.dataset.rendered || highlightTrace < 0 || R.x[i] === null) { return; }
    Plotly.restyle(explorerDiv, { x: [[R.x[i]]], y: [[R.y[i]]] }, [highlightTrace]);
  }

  // ---- confusion-matrix cells -----------------------------------------------------------
  var PAGE = 100;
  var cellRows = [], cellShown = 0;
  function showCell(t, p) {
    if (!parsed()) { domReady.then(function () { showCell(t, p); }); return; }
    if (!(t >= 0 && t < D.n_label_classes && p >= 0 && p < CLASSES.length)) { return; }
    cellRows = [];
    for (var i = 0; i < D.n; i++) { if (R.label[i] === t && R.pred[i] === p) { cellRows.push(i); } }
    var view = document.getElementById("cell-view");
    view.hidden = false;
    document.getElementById("cell-hint").hidden = true;
    view.dataset.label = String(t);
    view.dataset.pred = String(p);
    document.getElementById("cell-title").textContent = "true " + CLASSES[t] + " → predicted " + CLASSES[p] +
      ": " + cellRows.length + " image" + (cellRows.length === 1 ? "" : "s") +
      (t === p ? " (correct; image · CAM)" : " (CAM of the predicted class · CAM of the true class)");
    clear(document.getElementById("cell-grid"));
    cellShown = 0;
    moreCell();
  }
  function moreCell() {
    var grid = document.getElementById("cell-grid");
    var stop = Math.min(cellRows.length, cellShown + PAGE);
    for (var k = cellShown; k < stop; k++) {
      var b = makeThumb(cellRows[k], "cams");
      b.classList.add("cell-thumb");
      grid.appendChild(b);
    }
    cellShown = stop;
    var more = document.getElementById("cell-more");
    more.hidden = cellShown >= cellRows.length;
    more.textContent = "show more (" + (cellRows.length - cellShown) + " left)";
  }
  document.getElementById("cell-more").addEventListener("click", moreCell);
  function attachConfusion(div) {
    div.on("plotly_click", function (ev) {
      var p = ev && ev.points && ev.points[0];
      if (p) { showCell(+p.y, +p.x); }
    });
  }

  // ---- work queue: figures in page order, one task at a time, so the first appears fast ----
  function renderFigure(div) {
    var name = div.dataset.fig;
    if (name === "explorer") { return renderExplorer(div); }
    var spec = D.figures[name];
    if (!spec) { return Promise.resolve(); }
    return Plotly.newPlot(div, spec.data, layoutOf(name), CONFIG).then(function () {
      if (name === "confusion") { attachConfusion(div); }
    });
  }
  function figureTask(div) {
    return function () {
      return renderFigure(div).then(function () {
        div.dataset.rendered = "1";
        if (window.__bsFirstFigure === undefined) { window.__bsFirstFigure = performance.now(); }
      }, function (err) {
        div.dataset.rendered = "error";
        console.error("biasscope: figure " + div.dataset.fig + " failed", err);
      });
    };
  }
  var tasks = Array.prototype.slice.call(document.querySelectorAll(".fig[data-fig]")).map(figureTask);
  // thumbnails of the findings right after the first figure (the summary's): they come next on the page
  Array.prototype.splice.apply(tasks, [Math.min(1, tasks.length), 0].concat(thumbTasks()));
  var done = 0;
  function next() {
    var task = tasks.shift();
    if (!task) { window.__bsReportReady = true; return; }
    var first = done === 0;
    done += 1;
    var result;
    try {
      result = task();
    } catch (err) {
      console.error("biasscope: report task failed", err);
    }
    Promise.resolve(result).then(function () {
      // after the first figure, let the browser paint before anything else runs
      if (first && window.requestAnimationFrame) {
        requestAnimationFrame(function () {
          window.__bsFirstPaint = performance.now();
          setTimeout(next, 0);
        });
      } else {
        setTimeout(next, 0);
      }
    });
  }
  next();

  window.biasscope = { showDetail: showDetail, showCell: showCell, data: D };
})();
