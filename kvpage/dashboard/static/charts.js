/* kvpage dashboard: the time series, one small SVG chart each, with the thrashing onsets marked. */
(function (kv) {
  "use strict";

  const { $, svgEl, num, secs, niceMax } = kv;

  const CHARTS = [
    { name: "kv_usage", title: "KV usage", max: 1, keys: [["kv_usage", "usage"]] },
    { name: "waste", title: "Waste (fraction of slots)", keys: [["waste_internal", "internal"],
      ["waste_reservation", "reservation"], ["waste_external", "external"]] },
    { name: "batch", title: "Batch and queue", keys: [["batch_size", "batch"], ["queue_length", "queue"]] },
    { name: "pressure", title: "Pressure (per s)", keys: [["preemptions_per_s", "preemptions"],
      ["evictions_per_s", "evictions"]] },
    { name: "recompute_fraction", title: "Recomputed fraction", max: 1, keys: [["recompute_fraction", "recomputed"]] },
    { name: "goodput", title: "Goodput vs throughput (tok/s)", keys: [["goodput_tokens_per_s", "goodput"],
      ["throughput_tokens_per_s", "throughput"]] },
  ];
  const COLORS = ["#2563eb", "#ea580c", "#16a34a"];
  const W = 240, H = 132, PL = 26, PR = 5, PT = 31, PB = 15;  // chart box and plot margins

  // Static parts (title, legend, frame) are built once; the plot group is rebuilt per draw.
  const charts = CHARTS.map((c) => {
    const svg = svgEl("svg", { class: "chart", "data-series": c.name, viewBox: `0 0 ${W} ${H}` }, $("series"));
    svgEl("text", { class: "chart-title", x: 2, y: 11 }, svg).textContent = c.title;
    const legend = svgEl("g", { class: "legend" }, svg);
    let x = 2;
    c.keys.forEach(([key, label], i) => {
      const item = svgEl("g", { class: "legend-item", "data-key": key }, legend);
      svgEl("rect", { x, y: 17, width: 10, height: 4, fill: COLORS[i] }, item);
      svgEl("text", { x: x + 13, y: 23 }, item).textContent = label;
      x += 19 + label.length * 5.2;
    });
    svgEl("rect", { class: "frame", x: PL, y: PT, width: W - PL - PR, height: H - PT - PB }, svg);
    return { spec: c, plot: svgEl("g", { class: "plot" }, svg) };
  });

  // At most four vertices per half pixel (first, min, max, last): 3000 samples
  // become a few hundred vertices without losing spikes.
  function linePoints(pts, key, xs, ys) {
    const out = [];
    let cur = null;
    const flush = () => {
      if (!cur) return;
      for (const v of cur.min === cur.max ? [cur.min] : [cur.first, cur.min, cur.max, cur.last]) {
        out.push(cur.px.toFixed(1) + "," + ys(v).toFixed(1));
      }
    };
    for (const p of pts) {
      const v = num(p[key]), px = Math.round(xs(num(p.t)) * 2) / 2;
      if (cur && cur.px === px) Object.assign(cur, { min: Math.min(cur.min, v), max: Math.max(cur.max, v), last: v });
      else { flush(); cur = { px, min: v, max: v, first: v, last: v }; }
    }
    flush();
    return out.join(" ");
  }

  // Times where is_thrashing goes 0 -> 1 (or starts at 1).
  function thrashingOnsets(pts) {
    const out = [];
    pts.forEach((p, i) => {
      if (num(p.is_thrashing) >= 1 && (i === 0 || num(pts[i - 1].is_thrashing) < 1)) out.push(num(p.t));
    });
    return out;
  }

  function drawCharts(series, cursorT) {
    const pts = series.filter((p) => p && Number.isFinite(+p.t));
    let t0 = pts.length ? num(pts[0].t) : 0, t1 = pts.length ? num(pts[pts.length - 1].t) : 1;
    if (cursorT != null) { t0 = Math.min(t0, cursorT); t1 = Math.max(t1, cursorT); }
    if (t1 <= t0) { t0 -= 0.5; t1 += 0.5; }
    const xs = (t) => PL + (t - t0) / (t1 - t0) * (W - PL - PR);
    const onsets = thrashingOnsets(pts);
    for (const { spec, plot } of charts) {
      let peak = 0;
      for (const p of pts) for (const [k] of spec.keys) peak = Math.max(peak, num(p[k]));
      const ymax = spec.max || niceMax(peak);
      const ys = (v) => H - PB - Math.min(1, Math.max(0, v / ymax)) * (H - PT - PB);
      const vline = (cls, t, y1) => { const x = xs(t).toFixed(1); return svgEl("line", { class: cls, x1: x, x2: x, y1, y2: H - PB }, plot); };
      const label = (cls, x, y, text, anchor) =>
        (svgEl("text", { class: cls, x, y, "text-anchor": anchor || "start" }, plot).textContent = text);
      plot.replaceChildren();
      label("ymax", PL - 3, PT + 7, +ymax.toPrecision(3), "end");
      label("axis", PL - 3, H - PB, "0", "end");
      label("axis", PL, H - 4, secs(t0) + " s");
      label("axis", W - PR, H - 4, secs(t1) + " s", "end");
      svgEl("line", { class: "grid-line", x1: PL, x2: W - PR, y1: ys(ymax / 2), y2: ys(ymax / 2) }, plot);
      for (const t of onsets) svgEl("title", {}, vline("onset", t, PT)).textContent = `thrashing onset at ${secs(t)} s`;
      if (pts.length) spec.keys.forEach(([key], i) => svgEl("polyline", { class: "line", "data-key": key,
        stroke: COLORS[i], points: linePoints(pts, key, xs, ys) }, plot));
      if (cursorT != null) vline("cursor", cursorT, PT - 2);
    }
  }

  kv.charts = { drawCharts };
})(window.kvpage);
