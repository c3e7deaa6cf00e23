/* fedq dashboard charts: small line charts drawn as inline SVG, no library.
 *
 * fedqChart.draw(container, {series: [{name, cls | color, label, points: [[x, y, round], ...]}], xLabel, yLabel,
 *                            marks: [{x, kind, text}], best: {x, y, text}, xIsTime})
 * replaces the container's <svg> with a new one. Each point is a <circle> carrying
 * data-series, data-round and data-value, so tests and scripts can read the numbers; marks are
 * vertical lines (data-kind) with their text as a tooltip; best is a ring round one point.
 */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var W = 560, H = 270, M = { top: 30, right: 16, bottom: 38, left: 66 };

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, k)) node.setAttribute(k, attrs[k]); }
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, str, attrs) {
    var t = el("text", Object.assign({ x: x, y: y }, attrs || {}), parent);
    t.textContent = str;
    return t;
  }

  /* "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten. */
  function ticks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    var raw = (hi - lo) / Math.max(1, count);
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (f) { return f * mag; }).find(function (s) { return s >= raw; });
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) { out.push(+v.toPrecision(12)); }
    return { values: out, step: step };
  }

  function fmt(v, step) {
    var digits = Math.max(0, Math.min(6, -Math.floor(Math.log10(step))));
    return v.toFixed(digits);
  }

  function draw(container, opts) {
    var old = container.querySelector("svg");
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": opts.yLabel + " per round" });
    var pw = W - M.left - M.right, ph = H - M.top - M.bottom;
    var all = [];
    opts.series.forEach(function (s) { s.points.forEach(function (p) { all.push(p); }); });

    if (!all.length) {
      text(svg, W / 2, H / 2, "no round committed yet", { "text-anchor": "middle", "class": "placeholder" });
      if (old) { container.replaceChild(svg, old); } else { container.appendChild(svg); }
      return svg;
    }
    var xs = all.map(function (p) { return p[0]; }), ys = all.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    var pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.05 || 0.05;
    y0 -= pad; y1 += pad;
    if (opts.clampZero && y0 < 0) { y0 = 0; }
    var yt = ticks(y0, y1, 5);
    y0 = Math.min(y0, yt.values[0]); y1 = Math.max(y1, yt.values[yt.values.length - 1]);
    var sx = function (x) { return M.left + (x - x0) / (x1 - x0) * pw; };
    var sy = function (y) { return M.top + ph - (y - y0) / (y1 - y0) * ph; };

    var grid = el("g", { "class": "axis" }, svg);
    yt.values.forEach(function (v) {
      el("line", { x1: M.left, x2: M.left + pw, y1: sy(v), y2: sy(v), "class": "gridline" }, grid);
      text(grid, M.left - 6, sy(v) + 4, fmt(v, yt.step), { "text-anchor": "end" });
    });
    var xt = ticks(x0, x1, opts.xIsTime ? 6 : Math.min(10, x1 - x0));
    xt.values.filter(function (v) { return opts.xIsTime || Number.isInteger(v); }).forEach(function (v) {
      el("line", { x1: sx(v), x2: sx(v), y1: M.top + ph, y2: M.top + ph + 4 }, grid);
      text(grid, sx(v), M.top + ph + 16, opts.xIsTime ? fmt(v, xt.step) : String(v), { "text-anchor": "middle" });
    });
    (opts.marks || []).forEach(function (m) {
      if (m.x === null || m.x === undefined || m.x < x0 || m.x > x1) { return; }
      var line = el("line", { x1: sx(m.x), x2: sx(m.x), y1: M.top, y2: M.top + ph, "class": "mark mark-" + m.kind,
        "data-kind": m.kind, "data-x": m.x }, svg);
      el("title", {}, line).textContent = m.text;
    });
    el("line", { x1: M.left, x2: M.left + pw, y1: M.top + ph, y2: M.top + ph }, grid);
    el("line", { x1: M.left, x2: M.left, y1: M.top, y2: M.top + ph }, grid);
    text(svg, M.left + pw / 2, H - 4, opts.xLabel || "round", { "text-anchor": "middle" });
    text(svg, 12, M.top + ph / 2, opts.yLabel, { "text-anchor": "middle", transform: "rotate(-90 12 " + (M.top + ph / 2) + ")" });

    var legendX = M.left + 8;
    opts.series.forEach(function (s) {
      if (!s.points.length) { return; }
      var g = el("g", { "class": "series", "data-series": s.name }, svg);
      var line = el("polyline", { "class": s.cls ? "series-" + s.cls : "series-any",
        points: s.points.map(function (p) { return sx(p[0]) + "," + sy(p[1]); }).join(" ") }, g);
      if (s.color) { line.setAttribute("stroke", s.color); }
      s.points.forEach(function (p) {
        var rnd = p.length > 2 ? p[2] : p[0];
        var c = el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: s.color ? 2.5 : 3.5, "class": s.cls ? "pt-" + s.cls : "pt-any",
          "data-series": s.name, "data-round": rnd, "data-value": p[1] }, g);
        if (s.color) { c.setAttribute("fill", s.color); }
        el("title", {}, c).textContent = s.label + ", round " + rnd + ": " + p[1].toFixed(4);
      });
      var last = s.points[s.points.length - 1];
      var lg = el("g", { "class": "legend" }, svg);
      var box = el("rect", { x: legendX, y: 6, width: 10, height: 10, "class": s.cls ? "legend-" + s.cls : "" }, lg);
      if (s.color) { box.setAttribute("fill", s.color); }
      var label = opts.legendValues === false ? s.label : s.label + " " + last[1].toFixed(4);
      text(lg, legendX + 14, 15, label, { "class": "legend-label", "data-series": s.name });
      legendX += Math.max(70, 14 + 6.5 * label.length + 12);
    });
    if (opts.best && opts.best.x >= x0 && opts.best.x <= x1) {
      var ring = el("circle", { cx: sx(opts.best.x), cy: sy(opts.best.y), r: 7, "class": "best",
        "data-round": opts.best.round, "data-value": opts.best.y }, svg);
      el("title", {}, ring).textContent = opts.best.text;
      text(svg, sx(opts.best.x), sy(opts.best.y) - 10, "best", { "text-anchor": "middle", "class": "best-label" });
    }
    if (old) { container.replaceChild(svg, old); } else { container.appendChild(svg); }
    return svg;
  }

  window.fedqChart = { draw: draw, ticks: ticks };
})();
