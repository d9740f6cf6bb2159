/* trainhealth charts: plain SVG line charts, one line per rank, alerts marked on the curves.
   Shared by the live page (GET /) and the report (trainhealth report). No dependencies, no network.
   Data (one run): {series: [{rank, time: [], step: [], loss: [], ...}], gpu_total: {rank: bytes},
   alerts: [{alert, severity, rank, root_ranks, step, time, end, summary}], lr_expected: [[time, lr], ...]}.
   A value is a number, null (not measured: skipped, the line joins its neighbours) or "NaN" / "Infinity" / "-Infinity"
   (drawn as a red x on the top edge: a NaN loss is the news, never a gap).
   The x axis is the training step (hover for the time): a failure after hours of healthy steps still gets
   its share of the width. Loss, gradient norm and LR go to a log scale when they span a decade or more;
   memory starts at zero, with the GPU's capacity and the rank's host memory limit (where it sends one) dashed. Alerts are numbered in step order: a badge on every
   chart (stacked in rows, merged into "3-5" where they would touch, so badges never overlap) and the
   numbered list above the charts says what each one is. */
(function (global) {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var W = 640, H = 210, L = 62, R = 12, T = 18, B = 26, ROW = 14, CHAR = 6.1;
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d"];
  var CHARTS = [
    {key: "loss", title: "Loss per rank", logish: true},
    {key: "lr", title: "Learning rate per rank", logish: true, expected: true, zero: true},
    {key: "grad_norm", title: "Gradient norm per rank", logish: true},
    {key: "gpu_mem_peak_bytes", title: "GPU memory peak per rank", bytes: true, limits: "gpu_total", dashed: "capacity"},
    {key: "host_mem_bytes", title: "Host memory per rank", bytes: true, limits: "host_limit", dashed: "its limit"}
  ];

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function finite(v) { return typeof v === "number" && isFinite(v); }
  function fmtBytes(v) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (Math.abs(v) >= 100 ? v.toFixed(0) : String(+v.toPrecision(3))) + " " + units[i];
  }
  function fmtNum(v) {
    if (v === 0) return "0";
    var a = Math.abs(v);
    return (a >= 1e5 || a < 1e-3) ? v.toExponential(1) : String(+v.toPrecision(3));
  }
  function fmtTime(t) { return new Date(t * 1000).toISOString().slice(11, 19); }
  function fmtDate(t) { return new Date(t * 1000).toISOString().slice(0, 19).replace("T", " "); }

  /* Tick values: "nice" multiples (1, 2, 5 x 10^k) for a linear axis, decades (and 2, 5 between them when
     there are few) for a log one. Each is distinct, and labelled with the digits its spacing needs. */
  function niceStep(span, n) {
    var raw = span / n, p = Math.pow(10, Math.floor(Math.log10(raw))), m = raw / p;
    return (m < 1.5 ? 1 : m < 3 ? 2 : m < 7 ? 5 : 10) * p;
  }
  function linear(lo, hi, n) {
    var step = niceStep(hi - lo, n), out = [];
    var a = Math.floor(lo / step + 1e-9) * step, b = Math.ceil(hi / step - 1e-9) * step;
    for (var v = a; v <= b + step * 1e-6; v += step) out.push(+v.toPrecision(12));
    return {lo: a, hi: b, ticks: out, step: step};
  }
  function fmtTick(v, step) {
    if (v === 0) return "0";
    var a = Math.abs(v), digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    if (a >= 1e5 || digits > 4) {
      var k = Math.max(0, Math.floor(Math.log10(a)) - Math.floor(Math.log10(step) + 1e-9));
      return v.toExponential(Math.min(k, 6));
    }
    return v.toFixed(digits);
  }
  function fmtStep(v, step) {  // 25k, 1.5M: a step count reads better than 2.5e+4
    if (Math.abs(v) >= 1e6 && step >= 1e4) return fmtTick(v / 1e6, step / 1e6) + "M";
    if (Math.abs(v) >= 1e4 && step >= 10) return fmtTick(v / 1e3, step / 1e3) + "k";
    return fmtTick(v, step);
  }
  function logTicks(ylo, yhi) {  // ylo, yhi: log10 of the range
    var out = [], d;
    for (d = Math.ceil(ylo); d <= Math.floor(yhi); d++) out.push(Math.pow(10, d));
    if (out.length < 3) {
      out = [];
      for (d = Math.floor(ylo); d <= Math.ceil(yhi); d++) [1, 2, 5].forEach(function (m) {
        var v = m * Math.pow(10, d), y = Math.log10(v);
        if (y >= ylo - 1e-9 && y <= yhi + 1e-9) out.push(v);
      });
    }
    while (out.length > 7) out = out.filter(function (_, i) { return i % 2 === 0; });
    return out;
  }
  function fmtLog(v) {
    var a = Math.abs(v);
    return (a >= 1e4 || a < 1e-3) ? v.toExponential(0).replace("e+", "e") : String(+v.toPrecision(2));
  }
  function bytesAxis(hi) {  // from zero, nice ticks in the unit of the top value: "2 GiB, 4 GiB", never "4.00 GiB" twice
    var unit = 1, i = 0, units = ["B", "KiB", "MiB", "GiB", "TiB"];
    while (hi / unit >= 1024 && i < units.length - 1) { unit *= 1024; i++; }
    var ax = linear(0, Math.max(hi / unit, 1e-9), 4);
    return {lo: 0, hi: ax.hi * unit, ticks: ax.ticks.map(function (v) { return v * unit; }),
            label: function (v) { return fmtTick(v / unit, ax.step) + " " + units[i]; }};
  }

  /* The run's steps and their times: the x axis and the tooltip's time; alerts placed by their step,
     else by their time (the step of the last sample at or before it). */
  function timeline(data) {
    var pts = [];
    data.series.forEach(function (s) {
      for (var i = 0; i < (s.step || []).length; i++) if (finite(s.step[i])) pts.push([s.time[i], s.step[i]]);
    });
    pts.sort(function (a, b) { return a[0] - b[0]; });
    var stepTime = {}, s0 = Infinity, s1 = -Infinity;
    pts.forEach(function (p) {
      if (!(p[1] in stepTime)) stepTime[p[1]] = p[0];
      if (p[1] < s0) s0 = p[1];
      if (p[1] > s1) s1 = p[1];
    });
    var reached = [], top = -Infinity;  // reached[i]: the highest step of pts[0..i]
    pts.forEach(function (p) { top = Math.max(top, p[1]); reached.push(top); });
    function stepAt(t) {  // the highest step reached by time t (null: before the first sample)
      var a = 0, b = pts.length;  // the first sample after t
      while (a < b) { var m = (a + b) >> 1; if (pts[m][0] <= t) a = m + 1; else b = m; }
      return a ? reached[a - 1] : null;
    }
    if (s0 === Infinity) { s0 = 0; s1 = 1; }
    return {s0: s0, s1: s1, stepTime: stepTime, stepAt: stepAt,
            t0: pts.length ? pts[0][0] : null, t1: pts.length ? pts[pts.length - 1][0] : null};
  }

  /* The x scale. With a focus step (the failure came late: its last stretch would get a sliver of the
     width), steps before it take the left FRAME of the plot and the rest the right part: the whole run
     as context, the failure framed. Ticks: [value, spacing] per part. */
  var FRAME = 0.55;
  function xScale(s0, s1, focus) {
    var w = W - L - R;
    if (focus === null || focus <= s0 || focus >= s1) {
      var all = linear(s0, s1, 6);
      return {focus: null, X: function (st) { return L + (st - s0) / (s1 - s0) * w; },
              step: function (x) { return s0 + (x - L) / w * (s1 - s0); },
              ticks: all.ticks.filter(function (v) { return v >= s0 && v <= s1; }).map(function (v) { return [v, all.step]; })};
    }
    var mid = L + FRAME * w, a = linear(s0, focus, 3), b = linear(focus, s1, 3);
    return {
      focus: focus,
      X: function (st) { return st <= focus ? L + (st - s0) / (focus - s0) * FRAME * w : mid + (st - focus) / (s1 - focus) * (1 - FRAME) * w; },
      step: function (x) { return x <= mid ? s0 + (x - L) / (FRAME * w) * (focus - s0) : focus + (x - mid) / ((1 - FRAME) * w) * (s1 - focus); },
      ticks: a.ticks.filter(function (v) { return v >= s0 && v < focus; }).map(function (v) { return [v, a.step]; })
        .concat(b.ticks.filter(function (v) { return v >= focus && v <= s1; }).map(function (v) { return [v, b.step]; }))
    };
  }

  /* The focus: when the first alert after the run's start (not a setting flagged at step 0) comes in the
     last quarter of the steps, frame from a little before it. */
  function focusStep(marked, tl) {
    var span = tl.s1 - tl.s0, first = null;
    marked.forEach(function (e) { if (first === null && e.step > tl.s0 + 0.05 * span) first = e; });
    if (first === null || span < 40 || first.step < tl.s1 - 0.25 * span) return null;
    return Math.max(tl.s0 + 1, Math.floor(first.step - Math.max(5, 0.1 * span)));
  }

  /* The alerts as numbered entries, one per (alert, step): the ranks of one alert at one step together. */
  function entries(data, tl) {
    var byKey = {}, out = [];
    (data.alerts || []).forEach(function (a) {
      var step = finite(a.step) ? a.step : tl.stepAt(a.time);
      if (step === null) return;
      var key = a.alert + "@" + step, e = byKey[key];
      if (!e) {
        e = byKey[key] = {alert: a.alert, severity: a.severity, step: step, time: a.time, ranks: [],
                          roots: a.root_ranks || [], summary: a.summary, end: a.end, run: false};
        out.push(e);
      }
      if (a.rank === null || a.rank === undefined) e.run = true; else if (e.ranks.indexOf(a.rank) < 0) e.ranks.push(a.rank);
      if (a.end === null || a.end === undefined) e.end = null;
      else if (e.end !== null && a.end > e.end) e.end = a.end;
    });
    out.sort(function (a, b) { return a.step - b.step || a.time - b.time; });
    out.forEach(function (e, i) { e.n = i + 1; });
    return out;
  }
  function where(e) {  // "rank 3", "ranks 0-63", "run (root rank 1)"
    var sorted = function (xs) { return xs.slice().sort(function (a, b) { return a - b; }); };
    if (e.ranks.length) return (e.ranks.length > 1 ? "ranks " : "rank ") + numbers(sorted(e.ranks)).replace(/,/g, ", ");
    return "run" + (e.roots.length ? " (root rank" + (e.roots.length > 1 ? "s " : " ") +
                    numbers(sorted(e.roots)).replace(/,/g, ", ") + ")" : "");
  }

  function numbers(ns) {  // [2, 3, 4, 7, 8] -> "2-4,7,8": what a merged badge stands for, and only that
    var out = [], i = 0;
    while (i < ns.length) {
      var j = i;
      while (j + 1 < ns.length && ns[j + 1] === ns[j] + 1) j++;
      if (j - i >= 2) { out.push(ns[i] + "-" + ns[j]); i = j + 1; } else { out.push(String(ns[i])); i++; }
    }
    return out.join(",");
  }

  /* Badges in rows, left to right: each takes the first row where it fits (with its name if there is room,
     else its number), else it joins the last badge of the bottom row ("3-5"). Never two overlap. */
  function layout(list, X0, x0, x1) {
    var X = function (step) { return Math.max(x0, X0(step)); };
    var rows = [[], [], []], out = [];
    function place(left, w) {
      for (var r = 0; r < rows.length; r++) {
        var row = rows[r], last = row[row.length - 1];
        if (!last || left >= last.left + last.w + 4) return r;
      }
      return -1;
    }
    list.forEach(function (e) {
      var x = X(e.step), num = String(e.n), named = num + " " + e.alert;
      var tries = [named, num], done = false;
      for (var k = 0; k < tries.length && !done; k++) {
        var w = tries[k].length * CHAR + 6, left = Math.max(x0, Math.min(x - 6, x1 - w)), r = place(left, w);
        if (r >= 0) {
          var b = {left: left, w: w, row: r, text: tries[k], first: e, x: [x], all: [e]};
          rows[r].push(b); out.push(b); done = true;
        }
      }
      if (!done) {  // join the bottom row's last badge: it is the rightmost there, so growing right is safe
        var row = rows[rows.length - 1], m = row[row.length - 1];
        m.all.push(e); m.x.push(x);
        m.text = numbers(m.all.map(function (a) { return a.n; }));
        m.w = Math.max(m.w, m.text.length * CHAR + 6);
      }
    });
    return out;
  }

  /* One chart: returns the <svg>, or null when no rank has a value for it. */
  function chart(spec, data, tl, marked) {
    var lines = [], marks = [], lo = Infinity, hi = -Infinity;
    data.series.forEach(function (s) {
      var ys = s[spec.key], any = false;
      if (!ys || !s.step) return;
      for (var i = 0; i < ys.length; i++) {
        var v = ys[i];
        if (v === null || v === undefined) continue;
        any = true;
        if (finite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
        else marks.push({step: s.step[i], t: s.time[i], rank: s.rank, v: v});
      }
      if (any) lines.push(s);
    });
    if (!lines.length) return null;
    var noFinite = lo === Infinity;  // every value shown is NaN or infinite: an empty plot says so (below)
    var s0 = tl.s0, s1 = tl.s1 > tl.s0 ? tl.s1 : tl.s0 + 1;
    var xs = xScale(s0, s1, tl.focus), X = xs.X;
    var refs = [];  // dashed reference lines: [[step, y], ...]
    var limits = spec.limits && data[spec.limits];  // GPU capacity, the host memory limit: a dashed line each
    if (limits) {
      var caps = {};
      for (var r in limits) if (finite(limits[r])) caps[limits[r]] = true;
      Object.keys(caps).forEach(function (c) { refs.push([[s0, +c], [s1, +c]]); });
    }
    if (spec.expected && data.lr_expected && data.lr_expected.length) {
      refs.push(data.lr_expected.map(function (p) {  // a start before the first sample: from the left edge
        var st = tl.stepAt(p[0]);
        return [st === null ? s0 : Math.min(st, s1), p[1]];
      }));
    }
    refs.forEach(function (pts) { pts.forEach(function (p) { if (finite(p[1])) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); } }); });
    if (lo === Infinity) { lo = 0; hi = 1; }

    var log = !!spec.logish && lo > 0 && hi / lo >= 10, ylo, yhi, tickVals, label;
    if (log) {
      ylo = Math.log10(lo); yhi = Math.log10(hi);
      var pad = (yhi - ylo) * 0.06; ylo -= pad; yhi += pad;
      tickVals = logTicks(ylo, yhi); label = fmtLog;
    } else if (spec.bytes) {
      var ax = bytesAxis(hi);
      ylo = ax.lo; yhi = ax.hi; tickVals = ax.ticks; label = ax.label;
    } else {
      if (spec.zero && lo > 0) lo = 0;
      if (hi - lo < 1e-12 * Math.max(1, Math.abs(hi))) { var d = Math.abs(hi) * 0.5 || 1; lo -= d; hi += d; if (spec.zero && lo < 0) lo = 0; }
      var lin = linear(lo, hi + (hi - lo) * 0.04, 4);  // a line at the top is not drawn on the frame
      ylo = lin.lo; yhi = lin.hi; tickVals = lin.ticks;
      label = function (v) { return fmtTick(v, lin.step); };
    }
    var f = log ? Math.log10 : function (x) { return x; };
    var Y = function (v) { return T + (1 - (f(v) - ylo) / (yhi - ylo)) * (H - T - B); };

    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, "class": "chart", "data-key": spec.key, role: "img",
                         "aria-label": spec.title, "data-scale": log ? "log" : "linear",
                         "data-steps": s0 + "-" + s1, "data-focus": xs.focus === null ? "" : String(xs.focus)});
    var note = (log ? ", log scale" : "") + (spec.expected && refs.length ? ", dashed: its linear-scaling value" : "") +
      (spec.dashed && refs.length ? ", dashed: " + spec.dashed : "");
    el("text", {x: L, y: 12, "class": "title"}, svg).textContent = spec.title + (note ? " (" + note.slice(2) + ")" : "");
    var axes = el("g", {"class": "axes"}, svg);
    tickVals.forEach(function (v) {
      var py = Y(v);
      el("line", {x1: L, x2: W - R, y1: py, y2: py, "class": "grid"}, axes);
      el("text", {x: L - 4, y: py + 3, "class": "ylabel"}, axes).textContent = label(v);
    });
    var placed = [];
    xs.ticks.forEach(function (tk) {  // distinct values, at least 34 px apart
      var px = X(tk[0]);
      if (placed.some(function (p) { return p[0] === tk[0] || Math.abs(p[1] - px) < 34; })) return;
      placed.push([tk[0], px]);
      el("line", {x1: px, x2: px, y1: H - B, y2: H - B + 3, "class": "tick"}, axes);
      el("text", {x: px, y: H - B + 13, "class": "xlabel", "text-anchor": "middle"}, axes).textContent = fmtStep(tk[0], tk[1]);
    });
    if (xs.focus !== null) {  // where the scale changes: the steps after it get the right part of the width
      var fx = X(xs.focus);
      el("line", {x1: fx, x2: fx, y1: T, y2: H - B, "class": "focus"}, axes);
      el("text", {x: fx + 3, y: H - B - 4, "class": "xlabel focus-label"}, axes).textContent =
        "zoom: steps " + xs.focus + "-" + s1;
    }
    el("text", {x: L - 4, y: H - B + 13, "class": "xlabel xname", "text-anchor": "end"}, axes).textContent = "step";
    if (tl.t0 !== null) {
      el("text", {x: W - R, y: H - 2, "class": "xlabel span", "text-anchor": "end"}, axes).textContent =
        fmtDate(tl.t0) + " to " + (tl.t1 - tl.t0 > 86400 ? fmtDate(tl.t1) : fmtTime(tl.t1)) + " UTC (hover: step and time)";
    }

    // Bands while an alert was open (one per alert name where episodes overlap, so a run-wide incident paged
    // on every rank does not paint the chart over), then a line where each fired, its badge on top.
    var bands = {};
    marked.forEach(function (e) {
      var endStep = e.end === null || e.end === undefined ? s1 : tl.stepAt(e.end);
      if (endStep === null) return;
      var a = Math.max(e.step, s0), b = Math.min(Math.max(endStep, e.step), s1);
      var list = bands[e.alert] = bands[e.alert] || [], last = list[list.length - 1];
      if (last && a <= last.end) last.end = Math.max(last.end, b);
      else list.push({start: a, end: b, severity: e.severity});
    });
    Object.keys(bands).forEach(function (name) {
      bands[name].forEach(function (b) {
        if (X(b.end) - X(b.start) > 0.9 * (W - L - R)) return;  // open the whole time (a setting): no news
        el("rect", {x: X(b.start), y: T, width: Math.max(1, X(b.end) - X(b.start)), height: H - T - B,
                    "class": "band sev-" + b.severity, "data-alert": name}, svg);
      });
    });
    lines.forEach(function (s, k) {
      var ys = s[spec.key], d = "", pen = false, n = 0, lone = [], run = [];
      // a point with no finite neighbour draws no line (a grad norm sent only on logging steps, then NaN): a dot
      var endRun = function () { if (run.length === 1) lone.push(run[0]); run = []; };
      for (var i = 0; i < ys.length; i++) {
        if (ys[i] === null || ys[i] === undefined) continue;  // not measured at this sample: join the neighbours
        if (!finite(ys[i])) { pen = false; endRun(); continue; }  // NaN/inf: the line breaks, a red x marks it
        d += (pen ? "L" : "M") + X(s.step[i]).toFixed(1) + " " + Y(ys[i]).toFixed(1);
        run.push([X(s.step[i]), Y(ys[i])]);
        pen = true; n++;
      }
      endRun();
      var color = COLORS[k % COLORS.length];
      var p = el("path", {d: d, stroke: color, "class": "line", "data-rank": s.rank, "data-points": n}, svg);
      el("title", {}, p).textContent = "rank " + s.rank;
      lone.forEach(function (pt) {
        el("circle", {cx: pt[0].toFixed(1), cy: pt[1].toFixed(1), r: 2.5, fill: color, "class": "dot",
                      "data-rank": s.rank}, svg);
      });
    });
    // the dashed references over the lines: a rank exactly at its expected LR still shows the dash
    refs.forEach(function (pts) {
      var dd = "";
      pts.forEach(function (p) { if (finite(p[1])) dd += (dd ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1); });
      if (dd) el("path", {d: dd, "class": "ref"}, svg);
    });
    var seen = {};
    marks.forEach(function (m) {
      var x = X(m.step), px = m.rank + ":" + Math.round(x / 3);
      if (seen[px]) return;  // one mark per rank per 3 px
      seen[px] = true;
      var g = el("g", {"class": "nonfinite"}, svg);
      el("title", {}, g).textContent = spec.key + " " + m.v + " on rank " + m.rank + " at step " + m.step +
        " (" + fmtTime(m.t) + " UTC)";
      el("path", {d: "M" + (x - 4) + " " + (T - 4) + "l8 8m0 -8l-8 8"}, g);
    });
    if (noFinite) {  // a run that went on after its NaN: the live window holds no finite value of it any more
      el("text", {x: (L + W - R) / 2, y: (T + H - B) / 2, "class": "no-finite", "text-anchor": "middle"}, svg)
        .textContent = "every value here is NaN or infinite (steps " + s0 + "-" + s1 + "): see where it began above";
    }
    // an alert just before the first sample (lr_scaling at step 0, the start) is drawn at the left edge
    var near = (s1 - s0) * 0.05;
    var shown = marked.filter(function (e) { return e.step >= s0 - near && e.step <= s1; });
    layout(shown, X, L, W - R).forEach(function (b) {
      var g = el("g", {"class": "marker sev-" + b.first.severity, "data-alert": b.first.alert,
                       "data-n": numbers(b.all.map(function (a) { return a.n; }))}, svg);
      el("title", {}, g).textContent = b.all.map(function (e) {
        return e.n + ". " + e.alert + " (" + where(e) + ") at step " + e.step + ": " + e.summary;
      }).join("\n");
      var y = T + 5 + b.row * ROW;  // below the row of NaN marks
      b.x.forEach(function (x) { el("line", {x1: x, x2: x, y1: y + ROW - 2, y2: H - B, "class": "fired"}, g); });
      el("rect", {x: b.left, y: y, width: b.w, height: ROW - 2, rx: 3, "class": "badge"}, g);
      el("text", {x: b.left + 3, y: y + ROW - 5, "class": "mlabel"}, g).textContent = b.text;
    });
    hover(svg, lines, spec, tl, xs);
    return svg;
  }

  /* Hover: the step under the pointer, its time, and each rank's value (the first 4). */
  function hover(svg, lines, spec, tl, xs) {
    var X = xs.X;
    var g = el("g", {"class": "hover", visibility: "hidden"}, svg);
    var line = el("line", {y1: T, y2: H - B, "class": "cursor"}, g);
    var text = el("text", {x: W - R - 2, y: H - B - 5, "text-anchor": "end", "class": "hlabel"}, g);
    svg.addEventListener("mousemove", function (ev) {
      var m = svg.getScreenCTM();
      if (!m) return;
      var x = (ev.clientX - m.e) / m.a, step = Math.round(xs.step(x));
      if (x < L || x > W - R) { g.setAttribute("visibility", "hidden"); return; }
      var parts = [];
      lines.slice(0, 4).forEach(function (s) {
        var best = -1;
        for (var i = 0; i < s.step.length; i++) if (s.step[i] <= step && s[spec.key][i] !== null) best = i;
        if (best >= 0) { var v = s[spec.key][best]; parts.push("r" + s.rank + " " + (finite(v) ? (spec.bytes ? fmtBytes(v) : fmtNum(v)) : v)); }
      });
      var t = tl.stepTime[step];
      line.setAttribute("x1", X(step)); line.setAttribute("x2", X(step));
      text.textContent = "step " + step + (t === undefined ? "" : ", " + fmtTime(t) + " UTC") + (parts.length ? ": " + parts.join("  ") : "");
      g.setAttribute("visibility", "visible");
    });
    svg.addEventListener("mouseleave", function () { g.setAttribute("visibility", "hidden"); });
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

  var MAX_LISTED = 40;
  function alertList(marked) {  // what each numbered badge is: built as text nodes (summaries are not HTML)
    var ol = document.createElement("ol");
    ol.className = "alert-legend";
    marked.slice(0, MAX_LISTED).forEach(function (e) {
      var li = document.createElement("li");
      li.value = e.n;
      li.className = "sev-" + e.severity;
      li.setAttribute("data-alert", e.alert);
      var b = document.createElement("b");
      b.textContent = e.alert;
      li.appendChild(b);
      li.appendChild(document.createTextNode(" " + where(e) + ", step " + e.step + ", " + fmtTime(e.time) + " UTC: " + e.summary));
      ol.appendChild(li);
    });
    if (marked.length > MAX_LISTED) {
      var more = document.createElement("li");
      more.textContent = "and " + (marked.length - MAX_LISTED) + " more (the alert table lists them all)";
      ol.appendChild(more);
    }
    return ol;
  }

  /* Draw every chart of one run into `box` (replacing what was there). */
  function drawCharts(box, data) {
    box.textContent = "";
    if (!data || !data.series || !data.series.length) {
      box.appendChild(document.createTextNode("No samples in the window yet."));
      return 0;
    }
    var tl = timeline(data), marked = entries(data, tl);
    tl.focus = focusStep(marked, tl);
    box.appendChild(legend(data));
    if (marked.length) box.appendChild(alertList(marked));
    var drawn = 0;
    CHARTS.forEach(function (spec) {
      var svg = chart(spec, data, tl, marked);
      if (svg) { box.appendChild(svg); drawn++; }
    });
    return drawn;
  }

  global.TH = {drawCharts: drawCharts, fmtBytes: fmtBytes};
})(window);
