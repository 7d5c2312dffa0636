"""The report page's script: draws its charts as inline SVG from the embedded summary.

No library and no external asset: the page must be readable offline, years later. After
drawing, every chart carries ``data-points`` (data points drawn) and the body carries
``data-charts`` (charts drawn), so a headless browser can check what a person would see.
"""

from typing import Final

__all__ = ["REPORT_JS"]

REPORT_JS: Final = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("fermion-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2", "#be123c", "#65a30d"];
  var W = 760, H = 260, M = {l: 56, r: 56, t: 30, b: 34};

  function node(name, attrs, parent, text) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (text !== undefined) { e.textContent = text; }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function niceMax(v) {
    if (!(v > 0)) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }
  function fmt(v) {
    if (v === 0) { return "0"; }
    var a = Math.abs(v);
    if (Number.isInteger(v) && a < 1000) { return String(v); }
    if (a >= 1000) { return (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k"; }
    if (a >= 10) { return v.toFixed(0); }
    if (a >= 1) { return v.toFixed(1); }
    return v.toPrecision(2);
  }
  function svgFor(id) {
    var fig = document.getElementById(id);
    var svg = node("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "class": "plot"}, fig);
    return {fig: fig, svg: svg};
  }
  function done(fig, points) {
    fig.setAttribute("data-points", String(points));
    fig.setAttribute("data-drawn", "1");
  }
  function empty(c) {
    node("text", {x: W / 2, y: H / 2, "text-anchor": "middle", "class": "empty"}, c.svg, "no data");
    done(c.fig, 0);
  }
  function legend(svg, items) {
    var x = M.l;
    items.forEach(function (it) {
      node("rect", {x: x, y: 8, width: 12, height: 12, fill: it.color, rx: 2}, svg);
      node("text", {x: x + 16, y: 18, "class": "legend"}, svg, it.name);
      x += 28 + it.name.length * 7;
    });
  }
  function yAxis(svg, max, right, unit) {
    for (var i = 0; i <= 4; i++) {
      var v = max * i / 4, y = H - M.b - (H - M.t - M.b) * i / 4;
      if (!right) { node("line", {x1: M.l, x2: W - M.r, y1: y, y2: y, "class": "grid"}, svg); }
      node("text", {x: right ? W - M.r + 6 : M.l - 6, y: y + 4,
                    "text-anchor": right ? "start" : "end", "class": "tick"}, svg, fmt(v) + unit);
    }
  }
  function xAxis(svg, maxT, xUnit) {
    var step = Math.max(niceMax(maxT / 6), 1);
    for (var t = 0; t <= maxT + 1e-9; t += step) {
      var x = M.l + (W - M.l - M.r) * (maxT ? t / maxT : 0);
      node("text", {x: x, y: H - M.b + 16, "text-anchor": "middle", "class": "tick"}, svg,
           fmt(t) + xUnit);
    }
  }

  // series: [{name, color, points: [[x, y] or [x, null]], right: bool}]; x in seconds
  // unless xUnit says otherwise (e.g. "/s" for a rate).
  function lineChart(id, series, unit, rightUnit, xUnit) {
    xUnit = xUnit || "s";
    var c = svgFor(id);
    var shown = series.filter(function (s) {
      return s.points.some(function (p) { return p[1] !== null; });
    });
    if (!shown.length) { return empty(c); }
    var maxT = 0, maxL = 0, maxR = 0;
    shown.forEach(function (s) {
      s.points.forEach(function (p) {
        if (p[1] === null) { return; }
        maxT = Math.max(maxT, p[0]);
        if (s.right) { maxR = Math.max(maxR, p[1]); } else { maxL = Math.max(maxL, p[1]); }
      });
    });
    maxL = niceMax(maxL); maxR = niceMax(maxR);
    yAxis(c.svg, maxL, false, unit);
    if (shown.some(function (s) { return s.right; })) { yAxis(c.svg, maxR, true, rightUnit); }
    xAxis(c.svg, maxT, xUnit);
    legend(c.svg, shown);
    var count = 0;
    shown.forEach(function (s) {
      var max = s.right ? maxR : maxL, d = "", pen = "M";
      var g = node("g", {"class": "series", "data-series": s.name}, c.svg);
      s.points.forEach(function (p) {
        if (p[1] === null) { pen = "M"; return; }
        var x = M.l + (W - M.l - M.r) * (maxT ? p[0] / maxT : 0.5);
        var y = H - M.b - (H - M.t - M.b) * p[1] / max;
        d += pen + x.toFixed(1) + "," + y.toFixed(1) + " ";
        pen = "L";
        count++;
        var dot = node("circle", {cx: x, cy: y, r: 2.2, fill: s.color, "class": "point"}, g);
        node("title", {}, dot,
             s.name + " at " + fmt(p[0]) + xUnit + ": " + fmt(p[1]) +
             (s.right ? rightUnit : unit));
      });
      node("path", {d: d, fill: "none", stroke: s.color, "stroke-width": 1.8,
                    "stroke-dasharray": s.right || s.dashed ? "5 3" : "none"}, g);
    });
    done(c.fig, count);
  }

  function histogramChart(id, bins) {
    var c = svgFor(id);
    var total = bins.reduce(function (a, b) { return a + b.count; }, 0);
    if (!total) { return empty(c); }
    var max = niceMax(Math.max.apply(null, bins.map(function (b) { return b.count; })));
    yAxis(c.svg, max, false, "");
    var bw = (W - M.l - M.r) / bins.length, count = 0;
    bins.forEach(function (b, i) {
      var h = (H - M.t - M.b) * b.count / max, x = M.l + i * bw;
      if (b.count > 0) {
        var bar = node("rect", {x: x + 0.5, y: H - M.b - h, width: Math.max(bw - 1, 1), height: h,
                                fill: COLORS[0], "class": "bar"}, c.svg);
        node("title", {}, bar, fmt(b.lo_ms) + "-" + fmt(b.hi_ms) + " ms: " + b.count);
        count++;
      }
      if (i % Math.ceil(bins.length / 6) === 0 || i === bins.length - 1) {
        var edge = i === bins.length - 1 ? b.hi_ms : b.lo_ms;
        var ex = i === bins.length - 1 ? x + bw : x;
        node("text", {x: ex, y: H - M.b + 16, "text-anchor": "middle", "class": "tick"}, c.svg,
             fmt(edge) + "ms");
      }
    });
    done(c.fig, count);
  }

  // groups: [{name, bars: [{name, value}]}]; one colour per bar name across groups.
  function barChart(id, groups, unit) {
    var c = svgFor(id);
    var names = [], max = 0, count = 0;
    groups.forEach(function (g) {
      g.bars.forEach(function (b) {
        if (names.indexOf(b.name) < 0) { names.push(b.name); }
        if (b.value !== null && b.value !== undefined) { max = Math.max(max, b.value); }
      });
    });
    if (!names.length || !groups.length) { return empty(c); }
    max = niceMax(max);
    yAxis(c.svg, max, false, unit);
    legend(c.svg, names.map(function (n, i) {
      return {name: n, color: COLORS[i % COLORS.length]};
    }));
    var gw = (W - M.l - M.r) / groups.length;
    groups.forEach(function (g, gi) {
      var bw = Math.max((gw - 12) / Math.max(g.bars.length, 1), 1), x0 = M.l + gi * gw + 6;
      node("text", {x: M.l + gi * gw + gw / 2, y: H - M.b + 16, "text-anchor": "middle",
                    "class": "tick"}, c.svg, g.name);
      g.bars.forEach(function (b, bi) {
        if (b.value === null || b.value === undefined) { return; }
        var h = (H - M.t - M.b) * b.value / max;
        var bar = node("rect", {x: x0 + bi * bw, y: H - M.b - h, width: Math.max(bw - 1, 1),
                                height: h, fill: COLORS[names.indexOf(b.name) % COLORS.length],
                                "class": "bar"}, c.svg);
        node("title", {}, bar, g.name + " " + b.name + ": " + fmt(b.value) + unit);
        count++;
      });
    });
    done(c.fig, count);
  }

  function shareChart(id, versions) {
    var c = svgFor(id);
    var names = Object.keys(versions);
    if (!names.length) { return empty(c); }
    var rowH = Math.min(40, (H - M.t - M.b) / names.length), count = 0;
    names.forEach(function (v, i) {
      var row = versions[v], y = M.t + i * rowH, w = (W - M.l - 200) * row.share;
      node("text", {x: M.l - 8, y: y + rowH / 2 + 4, "text-anchor": "end", "class": "tick"},
           c.svg, "v" + v);
      var bar = node("rect", {x: M.l, y: y + 4, width: Math.max(w, 1), height: rowH - 8,
                              fill: COLORS[i % COLORS.length], "class": "bar"}, c.svg);
      node("title", {}, bar, "v" + v + ": " + row.requests + " requests");
      var p99 = row.latency_ms && row.latency_ms.p99 !== undefined ? row.latency_ms.p99 : null;
      node("text", {x: M.l + w + 8, y: y + rowH / 2 + 4, "class": "legend"}, c.svg,
           (row.share * 100).toFixed(1) + "% \u00b7 " + row.requests + " req" +
           (p99 === null ? "" : " \u00b7 p99 " + fmt(p99) + "ms"));
      count++;
    });
    done(c.fig, count);
  }

  var tl = data.timeline || [];
  var users = null;
  var usersPts = tl.map(function (p) {
    if (p.users !== null && p.users !== undefined) { users = p.users; }
    return [p.t, users];
  });
  function pts(key) {
    return tl.map(function (p) { return [p.t, p[key] === undefined ? null : p[key]]; });
  }
  var versionNames = Object.keys(data.versions || {});
  var throughput = [{name: "requests/s", color: COLORS[0], points: pts("rps")},
                    {name: "failures/s", color: COLORS[5], points: pts("failures")}];
  if (versionNames.length > 1) {
    versionNames.forEach(function (v, i) {
      throughput.push({name: "v" + v + "/s", color: COLORS[(i + 1) % 5 + 1],
                       points: tl.map(function (p) { return [p.t, p.versions[v] || 0]; })});
    });
  }
  throughput.push({name: "users", color: "#6b7280", points: usersPts, right: true});

  var extra = document.getElementById("fermion-charts");
  var charts = extra ? JSON.parse(extra.textContent) : {};
  var drawn = 0;
  function run(id, f) {
    if (document.getElementById(id)) { f(); drawn++; }
  }
  run("chart-throughput", function () { lineChart("chart-throughput", throughput, "", ""); });
  run("chart-latency", function () {
    lineChart("chart-latency", [
      {name: "p50", color: COLORS[1], points: pts("p50")},
      {name: "p90", color: COLORS[2], points: pts("p90")},
      {name: "p99", color: COLORS[5], points: pts("p99")}], "ms", "");
  });
  run("chart-histogram", function () { histogramChart("chart-histogram", data.histogram || []); });
  run("chart-versions", function () { shareChart("chart-versions", data.versions || {}); });
  run("chart-errors", function () {
    lineChart("chart-errors", [{name: "error rate", color: COLORS[5], points: tl.map(function (p) {
      return [p.t, p.rps ? 100 * p.failures / p.rps : null];
    })}], "%", "");
  });
  run("chart-server", function () { barChart("chart-server", charts.server || [], "ms"); });
  run("chart-batch", function () { barChart("chart-batch", charts.batch || [], ""); });
  run("chart-capacity", function () {
    lineChart("chart-capacity", (charts.capacity || []).map(function (s, i) {
      return {name: s.name, color: s.dashed ? "#6b7280" : COLORS[i + 1], points: s.points,
              dashed: s.dashed};
    }), "ms", "", "/s");
  });
  document.body.setAttribute("data-charts", String(drawn));
})();
"""
