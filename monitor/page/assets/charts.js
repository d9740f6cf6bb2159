/* trainhealth charts: plain SVG line charts, one line per rank, alerts marked on the curves.
   Shared by the live page (GET /) and the report (trainhealth report). No dependencies, no network.
   Data (one run): {series: [{rank, time: [], loss: [], ...}], gpu_total: {rank: bytes},
   alerts: [{alert, severity, rank, step, time, end, summary}], lr_expected: [[time, lr], ...]}.
   A value is a number, null (not measured: skipped, the line joins its neighbours) or "NaN" / "Infinity" / "-Infinity"
   (drawn as a red x on the top edge: a NaN loss is the news, never a gap). */
(function (global) {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var W = 640, H = 200, L = 62, R = 10, T = 18, B = 24;
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d"];
  var CHARTS = [
    {key: "loss", title: "Loss per rank"},
    {key: "lr", title: "Learning rate per rank", expected: true},
    {key: "grad_norm", title: "Gradient norm per rank"},
    {key: "gpu_mem_peak_bytes", title: "GPU memory peak per rank (dashed: capacity)", bytes: true, capacity: true},
    {key: "host_mem_bytes", title: "Host memory per rank", bytes: true}
  ];

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function finite(v) { return typeof v === "number" && isFinite(v); }
  function fmtBytes(v, fine) {  // fine: a narrow range, where 3 digits would print every tick alike
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (fine ? String(+v.toPrecision(5)) : Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)) + " " + units[i];
  }
  function fmtNum(v) {
    if (v === 0) return "0";
    var a = Math.abs(v);
    return (a >= 1e5 || a < 1e-3) ? v.toExponential(1) : String(+v.toPrecision(3));
  }
  function fmtTime(t, span) {
    var iso = new Date(t * 1000).toISOString();
    return span > 86400 ? iso.slice(5, 16).replace("T", " ") : iso.slice(11, 19);
  }
  function ticks(lo, hi, n) {
    var out = [];
    for (var i = 0; i <= n; i++) out.push(lo + (hi - lo) * i / n);
    return out;
  }

  /* One chart: returns the <svg>, or null when no rank has a value for it. */
  function chart(spec, data) {
    var lines = [], marks = [], t0 = Infinity, t1 = -Infinity, lo = Infinity, hi = -Infinity;
    data.series.forEach(function (s) {
      var ys = s[spec.key], ts = s.time, any = false;
      if (!ys) return;
      for (var i = 0; i < ys.length; i++) {
        var v = ys[i];
        if (v === null || v === undefined) continue;
        any = true;
        if (ts[i] < t0) t0 = ts[i];
        if (ts[i] > t1) t1 = ts[i];
        if (finite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
        else marks.push({t: ts[i], rank: s.rank, step: s.step ? s.step[i] : null, v: v});
      }
      if (any) lines.push(s);
    });
    if (!lines.length) return null;
    var refs = [];  // dashed reference lines: [[t, y], ...]
    if (spec.capacity && data.gpu_total) {
      var caps = {};
      for (var r in data.gpu_total) if (finite(data.gpu_total[r])) caps[data.gpu_total[r]] = true;
      Object.keys(caps).forEach(function (c) { refs.push([[t0, +c], [t1, +c]]); });
    }
    if (spec.expected && data.lr_expected && data.lr_expected.length) refs.push(data.lr_expected);
    refs.forEach(function (pts) { pts.forEach(function (p) { if (finite(p[1])) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); } }); });
    if (lo === Infinity) { lo = 0; hi = 1; }
    var log = !spec.bytes && lo > 0 && hi / lo > 1000;
    var f = log ? Math.log10 : function (x) { return x; };
    var ylo = f(lo), yhi = f(hi);
    if (yhi - ylo < 1e-12 * Math.max(1, Math.abs(yhi))) { ylo -= 0.5 * (Math.abs(ylo) || 1); yhi += 0.5 * (Math.abs(yhi) || 1); }
    var pad = (yhi - ylo) * 0.05; ylo -= pad; yhi += pad;
    if (t1 <= t0) { t0 -= 1; t1 += 1; }
    var X = function (t) { return L + (t - t0) / (t1 - t0) * (W - L - R); };
    var Y = function (v) { return T + (1 - (f(v) - ylo) / (yhi - ylo)) * (H - T - B); };

    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, "class": "chart", "data-key": spec.key,
                         role: "img", "aria-label": spec.title});
    var note = (log ? ", log scale" : "") + (spec.expected && refs.length ? ", dashed: its linear-scaling value" : "");
    el("text", {x: L, y: 12, "class": "title"}, svg).textContent = spec.title + (note ? " (" + note.slice(2) + ")" : "");
    var axes = el("g", {"class": "axes"}, svg);
    var fine = !log && (yhi - ylo) < 0.02 * Math.max(Math.abs(yhi), Math.abs(ylo));
    ticks(ylo, yhi, 4).forEach(function (y) {
      var v = log ? Math.pow(10, y) : y, py = Y(v);
      el("line", {x1: L, x2: W - R, y1: py, y2: py, "class": "grid"}, axes);
      el("text", {x: L - 4, y: py + 3, "class": "ylabel"}, axes).textContent = spec.bytes ? fmtBytes(v, fine) : fmtNum(v);
    });
    ticks(t0, t1, 4).forEach(function (t, i) {
      el("text", {x: X(t), y: H - 6, "class": "xlabel", "text-anchor": i === 4 ? "end" : "middle"}, axes)
        .textContent = fmtTime(t, t1 - t0) + (i === 4 ? " UTC" : "");
    });

    // Alert markers: a band while an alert was open (one per alert name where episodes overlap, so a
    // run-wide incident paged on every rank does not paint the chart over), a line and a label where it fired.
    var bands = {}, labelled = [];
    (data.alerts || []).slice().sort(function (a, b) { return a.time - b.time; }).forEach(function (a) {
      var start = Math.max(a.time, t0), end = a.end === null || a.end === undefined ? t1 : Math.min(a.end, t1);
      if (a.time > t1 || end < t0) return;
      var list = bands[a.alert] = bands[a.alert] || [], last = list[list.length - 1];
      if (last && start <= last.end) last.end = Math.max(last.end, end);
      else list.push({start: start, end: end, severity: a.severity});
    });
    Object.keys(bands).forEach(function (name) {
      bands[name].forEach(function (b) {
        el("rect", {x: X(b.start), y: T, width: Math.max(1, X(b.end) - X(b.start)), height: H - T - B,
                    "class": "band sev-" + b.severity, "data-alert": name}, svg);
      });
    });
    (data.alerts || []).forEach(function (a) {
      if (a.time < t0 || a.time > t1) return;
      var g = el("g", {"class": "marker sev-" + a.severity, "data-alert": a.alert}, svg);
      el("title", {}, g).textContent = a.alert + (a.rank === null ? "" : " rank " + a.rank) + " at step " + a.step +
        ": " + a.summary;
      var x = X(a.time);
      el("line", {x1: x, x2: x, y1: T, y2: H - B, "class": "fired"}, g);
      var near = labelled.filter(function (l) { return Math.abs(l[0] - x) < 90; });
      if (!near.some(function (l) { return l[1] === a.alert; })) {
        el("text", {x: x + 2, y: T + 9 + 10 * (near.length % 5), "class": "mlabel"}, g).textContent = a.alert;
        labelled.push([x, a.alert]);
      }
    });
    refs.forEach(function (pts) {
      var d = "";
      pts.forEach(function (p) {  // a start before the window: the line enters at the left edge
        if (finite(p[1])) d += (d ? "L" : "M") + X(Math.min(Math.max(p[0], t0), t1)).toFixed(1) + " " + Y(p[1]).toFixed(1);
      });
      if (d) el("path", {d: d, "class": "ref"}, svg);
    });
    lines.forEach(function (s, k) {
      var ys = s[spec.key], ts = s.time, d = "", pen = false, n = 0;
      for (var i = 0; i < ys.length; i++) {
        if (ys[i] === null || ys[i] === undefined) continue;  // not measured at this sample: join the neighbours
        if (!finite(ys[i])) { pen = false; continue; }  // NaN/inf: the line breaks, a red x marks it
        d += (pen ? "L" : "M") + X(ts[i]).toFixed(1) + " " + Y(ys[i]).toFixed(1);
        pen = true; n++;
      }
      var p = el("path", {d: d, stroke: COLORS[k % COLORS.length], "class": "line", "data-rank": s.rank,
                          "data-points": n}, svg);
      el("title", {}, p).textContent = "rank " + s.rank;
    });
    var seen = {};
    marks.forEach(function (m) {
      var x = X(m.t), px = m.rank + ":" + Math.round(x / 3);
      if (seen[px]) return;  // one mark per rank per 3 px
      seen[px] = true;
      var g = el("g", {"class": "nonfinite"}, svg);
      el("title", {}, g).textContent = spec.key + " " + m.v + " on rank " + m.rank + (m.step === null ? "" : " at step " + m.step);
      el("path", {d: "M" + (x - 4) + " " + (T - 4) + "l8 8m0 -8l-8 8"}, g);
    });
    return svg;
  }

  function legend(data) {
    var div = document.createElement("div");
    div.className = "legend";
    data.series.slice(0, 16).forEach(function (s, k) {
      var span = document.createElement("span");
      span.innerHTML = "<i style='background:" + COLORS[k % COLORS.length] + "'></i>";
      span.appendChild(document.createTextNode("rank " + s.rank));
      div.appendChild(span);
    });
    if (data.series.length > 16) div.appendChild(document.createTextNode(" and " + (data.series.length - 16) + " more ranks"));
    if (data.ranks_total > data.series.length)
      div.appendChild(document.createTextNode(" (" + data.series.length + " of " + data.ranks_total +
                                              " ranks charted: those alerting first, then the lowest)"));
    return div;
  }

  /* Draw every chart of one run into `box` (replacing what was there). */
  function drawCharts(box, data) {
    box.textContent = "";
    if (!data || !data.series || !data.series.length) {
      box.appendChild(document.createTextNode("No samples in the window yet."));
      return 0;
    }
    box.appendChild(legend(data));
    var drawn = 0;
    CHARTS.forEach(function (spec) {
      var svg = chart(spec, data);
      if (svg) { box.appendChild(svg); drawn++; }
    });
    return drawn;
  }

  global.TH = {drawCharts: drawCharts, fmtBytes: fmtBytes};
})(window);
