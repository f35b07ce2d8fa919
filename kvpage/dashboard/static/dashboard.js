/* kvpage KV page map dashboard.
 *
 * Plain ES2020, no dependencies, no modules: Python either links this file
 * (live, under /dashboard) or inlines it into a self-contained HTML file with
 * a recorded timeline (offline).  It runs at the end of <body>, so the DOM is
 * already there.  Everything that comes from data is written with textContent
 * or setAttribute, never innerHTML: prompts and request ids are user input.
 */
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_CELLS = 2048;    // above this many pages, one rect stands for k pages
  const MAX_POINTS = 3000;   // live series history kept in memory
  const KEY_STORE = "kvpage-api-key";
  const STATES = { ".": "free", x: "frag", c: "cached", u: "used", s: "shared", r: "reserved" };
  // Tie-break of a bin's majority: occupied states win, they are what one looks for.
  const STATE_ORDER = ["used", "shared", "reserved", "cached", "frag", "free"];
  const COUNTERS = [["pages-in-use", "kv_blocks_used"], ["pages-cached", "kv_blocks_cached"],
    ["pages-free", "kv_blocks_free"], ["pages-total", "kv_blocks_total"],
    ["running-requests", "num_requests_running"], ["waiting-requests", "num_requests_waiting"],
    ["swapped-requests", "num_requests_swapped"]];

  const $ = (id) => document.getElementById(id);

  let currentFrame = null;       // the frame on screen
  let series = [];               // points drawn in the charts, oldest first
  let selectedRequestId = null;  // string or null
  let offline = null;            // {data, frames, index} in offline mode
  let drawPending = false;

  // ---------------------------------------------------------------- helpers

  function html(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }

  function svgEl(tag, attrs, parent) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function setText(el, value) {
    const e = typeof el === "string" ? $(el) : el, s = String(value);
    if (e && e.textContent !== s) e.textContent = s;  // skip no-op writes at 10 Hz
  }

  const int = (v) => (Number.isFinite(+v) ? Math.round(+v) : 0);
  const num = (v) => (Number.isFinite(+v) ? +v : 0);
  const secs = (t) => num(t).toFixed(2);
  const pushNew = (arr, vals) => { for (const v of vals) if (!arr.includes(v)) arr.push(v); };

  // FNV-1a of the request id -> hue, so a request keeps its colour across frames.
  function hue(str) {
    let h = 0x811c9dc5;
    for (let i = 0; i < str.length; i++) h = Math.imul(h ^ str.charCodeAt(i), 16777619);
    return ((h >>> 0) * 137.508) % 360;  // golden angle spreads close hashes apart
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const e = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * e >= v * 0.9999) return m * e;
    return 10 * e;
  }

  function setStatus(s) {
    setText("status", s);
    $("status").dataset.state = s.replace(/\s+/g, "-");
  }

  // ------------------------------------------------------- frame indexing

  // Owners of device and host pages and the frame's requests, computed once per frame.
  let indexed = null, indexedFrame = null;
  function indexFrame(f) {
    if (indexedFrame === f) return indexed;
    const owners = new Map(), hostOwners = new Map(), requests = new Map();
    const add = (map, key, id) => { if (!map.has(key)) map.set(key, []); pushNew(map.get(key), [id]); };
    for (const s of f.sequences || []) {
      const id = String(s.request);
      if (!requests.has(id)) requests.set(id, { id, seqs: [] });
      requests.get(id).seqs.push(s);
      // "spare": a contiguous run held for samples not forked yet; named in tooltips only.
      for (const p of (s.pages || []).concat(s.spare || [])) add(owners, p, id);
      for (const h of s.host || []) add(hostOwners, h, id);
    }
    indexedFrame = f;
    return (indexed = { owners, hostOwners, requests });
  }

  // ----------------------------------------------------------------- grids

  // A grid keeps its rects between frames; only their class/fill/title change,
  // and only when they differ from the last write (2048 rects at 10 Hz).
  const makeGrid = (svg, maxPx, host) => ({ svg, maxPx, host, n: -1, k: 1, rects: [], titles: [], cache: [] });
  const grid = makeGrid($("grid"), 30, false);
  const hostGrid = makeGrid($("host-grid"), 16, true);
  const binOf = (n) => (n > MAX_CELLS ? Math.ceil(n / MAX_CELLS) : 1);
  const range = (a, b) => (a === b ? `page ${a}` : `pages ${a}–${b}`);

  function layoutGrid(g, n, k) {
    if (g.n === n && g.k === k) return;
    for (const r of g.rects) r.remove();
    const cells = Math.ceil(n / k);
    // Columns in multiples of 8 so page ids are easy to count; roughly 3:1 wide.
    const cols = Math.min(64, Math.max(8, Math.ceil(Math.sqrt(cells * 3) / 8) * 8));
    const rows = Math.max(1, Math.ceil(cells / cols));
    g.svg.setAttribute("viewBox", `0 0 ${cols * 10} ${rows * 10}`);
    g.svg.style.maxWidth = cols * g.maxPx + "px";
    g.rects = new Array(cells);
    g.titles = new Array(cells);
    g.cache = new Array(cells);
    const frag = document.createDocumentFragment();
    const [a, b] = g.host ? ["data-host-first", "data-host-last"] : ["data-first", "data-last"];
    for (let i = 0; i < cells; i++) {
      g.rects[i] = svgEl("rect", { x: (i % cols) * 10 + 0.6, y: Math.floor(i / cols) * 10 + 0.6, width: 8.8,
        height: 8.8, rx: 1.4, class: "cell free", [a]: i * k, [b]: Math.min(n, i * k + k) - 1 }, frag);
      g.titles[i] = svgEl("title", {}, g.rects[i]);
    }
    g.svg.appendChild(frag);
    Object.assign(g, { n, k });
  }

  function paintCell(g, i, cls, fill, opacity, title) {
    const key = cls + "|" + fill + "|" + opacity + "|" + title;
    if (g.cache[i] === key) return;
    g.cache[i] = key;
    const r = g.rects[i];
    r.setAttribute("class", cls);
    r.style.fill = fill || "";
    r.style.fillOpacity = opacity == null ? "" : String(opacity);
    g.titles[i].textContent = title;
  }

  function drawGrid(f, idx, selPages) {
    const pages = typeof f.pages === "string" ? f.pages : "";
    const n = pages.length, k = binOf(n);
    layoutGrid(grid, n, k);
    const rank = new Map();
    (f.lru || []).forEach((p, i) => rank.set(p, i));
    const L = Math.max(1, rank.size);
    for (let i = 0; i < grid.rects.length; i++) {
      const first = i * k, last = Math.min(n, first + k) - 1, counts = {}, owners = [];
      let minRank = Infinity, lit = false;
      for (let p = first; p <= last; p++) {
        const st = STATES[pages[p]] || "free";
        counts[st] = (counts[st] || 0) + 1;
        if (idx.owners.has(p)) pushNew(owners, idx.owners.get(p));
        if (st === "cached" && rank.has(p)) minRank = Math.min(minRank, rank.get(p));
        if (selPages.has(p)) lit = true;
      }
      let state = "free", best = -1;
      for (const s of STATE_ORDER) if ((counts[s] || 0) > best) { best = counts[s] || 0; state = s; }
      const owned = (state === "used" || state === "shared") && owners.length;
      const fill = owned ? `hsl(${hue(owners[0]).toFixed(0)}, 62%, 58%)` : "";
      // LRU age: index 0 is evicted next and drawn palest.
      const aged = state === "cached" && minRank !== Infinity;
      const opacity = aged ? (0.22 + 0.78 * (minRank + 1) / L).toFixed(2) : null;
      let title = `${range(first, last)}: ${state}`;
      if (k > 1) title += " (" + STATE_ORDER.filter((s) => counts[s]).map((s) => `${s} ${counts[s]}`).join(", ") + ")";
      else if (aged) title += `, LRU rank ${minRank} (0 = evicted next)`;
      if (owners.length) title += " — " + owners.join(", ");
      paintCell(grid, i, "cell " + state + (lit ? " hl" : ""), fill, opacity, title);
    }
    grid.svg.classList.toggle("has-sel", selectedRequestId != null);
    setText("grid-info", k > 1 ? `${n} pages, ${k} per cell` : `${n} pages`);
  }

  function drawHostGrid(f, idx, selHost) {
    const n = Math.max(0, int(f.host_pages)), k = binOf(n);
    layoutGrid(hostGrid, n, k);
    let used = 0;
    for (let i = 0; i < hostGrid.rects.length; i++) {
      const first = i * k, last = Math.min(n, first + k) - 1, owners = [];
      let lit = false, owned = 0;
      for (let p = first; p <= last; p++) {
        if (idx.hostOwners.has(p)) { owned++; pushNew(owners, idx.hostOwners.get(p)); }
        if (selHost.has(p)) lit = true;
      }
      used += owned;
      const busy = owned * 2 > last - first + 1 || (k === 1 && owned > 0);
      const title = `host ${range(first, last)}: ` + (owners.length ? `swapped — ${owners.join(", ")}` : "free");
      paintCell(hostGrid, i, (busy ? "cell host-used" : "cell free") + (lit ? " hl" : ""), "", null, title);
    }
    hostGrid.svg.classList.toggle("has-sel", selectedRequestId != null);
    hostGrid.svg.classList.toggle("empty", n === 0);
    setText("host-info", n ? `${used} of ${n} pages hold swapped K/V` : "none");
  }

  // -------------------------------------------------------------- counters

  function drawCounters(f) {
    const m = f.metrics || {};
    for (const [id, key] of COUNTERS) setText(id, int(m[key]));
    setText("step", int(f.step));
    setText("frame-time", secs(f.t));
    setText("layout", `${f.layout || "?"} · ${int(f.block_size)} tokens/page`);
    const thrashing = !!(f.point && num(f.point.is_thrashing) >= 1);
    $("thrashing").classList.toggle("on", thrashing);
    setText("thrashing", thrashing ? "thrashing" : "");
  }

  // -------------------------------------------------------------- requests

  const rowsById = new Map();  // rows are reused, so a click is never lost to a rebuild

  function drawRequests(idx) {
    const tbody = $("requests").tBodies[0];
    let i = 0;
    for (const r of idx.requests.values()) {
      let tr = rowsById.get(r.id);
      if (!tr) {
        rowsById.set(r.id, (tr = html("tr", "request")));
        tr.dataset.request = r.id;
        for (let j = 0; j < 6; j++) tr.appendChild(html("td"));
      }
      const statuses = [...new Set(r.seqs.map((s) => String(s.status)))], pages = new Set();
      let tokens = 0, computed = 0;
      for (const s of r.seqs) {
        for (const p of s.pages || []) pages.add(p);
        tokens += int(s.tokens);
        computed += int(s.computed);
      }
      [r.id, statuses.join(", "), r.seqs.length, tokens, computed, pages.size].forEach((v, j) => setText(tr.cells[j], v));
      tr.cells[1].className = statuses.length === 1 ? "st-" + statuses[0] : "st-mixed";
      tr.classList.toggle("selected", r.id === selectedRequestId);
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
      i++;
    }
    for (const [id, tr] of rowsById) if (!idx.requests.has(id)) { tr.remove(); rowsById.delete(id); }
  }

  // --------------------------------------------------------------- details

  // Live token text of the selected request: fetched on selection, refreshed each second.
  const freshDetails = (id) => ({ id, fetchedAt: -Infinity, inflight: false });
  let detailsState = freshDetails(null);
  let detailsTablesKey = "";

  function pageSpan(cls, id, title) {
    const sp = html("span", cls, id);
    sp.dataset.page = String(id);
    sp.title = title;
    return sp;
  }

  // One sequence's text: a label, then <pre class="details-text" data-seq>.
  function textBlock(parent, s, text) {
    parent.appendChild(html("div", "details-label", `seq ${s.seq} · ${s.status}`));
    parent.appendChild(html("pre", "details-text", text)).dataset.seq = String(s.seq);
  }

  function drawDetails(f, r) {
    const box = $("details");
    if (!r) {
      if (box.dataset.request == null) return;
      delete box.dataset.request;
      box.replaceChildren(html("p", "hint", "Select a request to see its block tables and tokens."));
      return;
    }
    if (box.dataset.request !== r.id) {  // a new selection: build the skeleton
      box.dataset.request = r.id;
      detailsTablesKey = "";
      const head = html("h3", "details-head", "request ");
      head.appendChild(html("code", "", r.id));
      box.replaceChildren(head, html("div", "details-tables"));
      if (!offline) {
        box.appendChild(html("pre", "", "loading…")).id = "details-prompt";
        detailsState = freshDetails(r.id);
      }
      box.appendChild(html("div", "details-texts"));
    }
    const bs = Math.max(1, int(f.block_size)), states = typeof f.pages === "string" ? f.pages : "";
    // Rebuild the block tables only when they (or their pages' states) changed.
    const key = JSON.stringify([bs, r.seqs, r.seqs.map((s) => (s.pages || []).map((p) => states[p]))]);
    if (key !== detailsTablesKey) {
      detailsTablesKey = key;
      const tables = box.querySelector(".details-tables");
      tables.replaceChildren();
      for (const s of r.seqs) {
        const div = tables.appendChild(html("div", "table"));
        div.dataset.seq = String(s.seq);
        div.appendChild(html("span", "seq-label", `seq ${s.seq} · ${s.status}`));
        // The first floor(cached_tokens / block_size) pages came from the prefix cache.
        const hits = Math.floor(int(s.cached_tokens) / bs), copied = new Set(s.copied || []);
        (s.pages || []).forEach((p, i) => {
          const cls = ["page", i < hits && "hit", copied.has(i) && "cow", states[p] === "s" && "shared"];
          div.appendChild(pageSpan(cls.filter(Boolean).join(" "), p, `logical ${i} → page ${p}`));
        });
        for (const h of s.host || []) div.appendChild(pageSpan("page host", h, `host page ${h}`));
        if (!(s.pages || []).length && !(s.host || []).length) div.appendChild(html("span", "none", "no pages"));
      }
      if (offline) {  // no server to ask for the text: only the count is known
        const texts = box.querySelector(".details-texts");
        texts.replaceChildren();
        for (const s of r.seqs) textBlock(texts, s, `tokens: ${int(s.tokens)}`);
      }
    }
    if (!offline && !detailsState.inflight && performance.now() - detailsState.fetchedAt > 1000) fetchDetails(r.id);
  }

  async function fetchDetails(id) {
    const d = detailsState;  // a newer selection replaces the object; this fetch then goes stale
    d.inflight = true;
    d.fetchedAt = performance.now();
    try {
      const res = await apiFetch("requests/" + encodeURIComponent(id));
      if (res.status === 401) return needKey();
      if (!res.ok) return;  // 404: the request just finished
      const body = await res.json();
      const prompt = $("details-prompt"), texts = $("details").querySelector(".details-texts");
      if (d !== detailsState || id !== selectedRequestId || !prompt || !texts) return;
      prompt.textContent = body.prompt == null ? "(prompt text not available)" : String(body.prompt);
      texts.replaceChildren();
      for (const s of body.sequences || []) {
        textBlock(texts, s, s.text != null ? String(s.text) : (s.token_ids || []).join(" "));
      }
    } catch (e) {
      /* network hiccup: the next frame retries */
    } finally {
      d.inflight = false;
    }
  }

  function select(id) {
    selectedRequestId = id == null ? null : String(id);
    if (currentFrame) draw();  // synchronous, so a click (or a test) sees the result at once
    return selectedRequestId;
  }

  $("requests").tBodies[0].addEventListener("click", (e) => {
    const tr = e.target.closest("tr.request");
    if (tr) select(tr.dataset.request === selectedRequestId ? null : tr.dataset.request);
  });

  // ---------------------------------------------------------------- charts

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

  function drawCharts(cursorT) {
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

  // ---------------------------------------------------------------- events

  let eventsKey = "";

  function row(cls, cells) {
    const tr = html("tr", cls);
    for (const c of cells) tr.appendChild(html("td", "", c == null ? "" : c));
    return tr;
  }

  function drawEvents(f) {
    const ev = f.events || {}, key = JSON.stringify(ev);
    if (key === eventsKey) return;  // events change far less often than frames
    eventsKey = key;
    const newest = (a) => (Array.isArray(a) ? a.slice().sort((x, y) => num(y.t) - num(x.t)).slice(0, 200) : []);

    const pb = $("preemptions").tBodies[0];
    pb.replaceChildren();
    for (const p of newest(ev.preemptions)) {
      const tr = pb.appendChild(row("preemption", [secs(p.t), p.request, p.seq, p.mode, int(p.tokens), p.reason]));
      tr.cells[3].className = "mode-" + p.mode;
    }
    if (!pb.children.length) pb.appendChild(row("empty", ["none"])).cells[0].colSpan = 6;

    const db = $("delays").tBodies[0];
    db.replaceChildren();
    const sub = (labels) => {
      const tr = db.appendChild(html("tr", "sub"));
      for (const l of labels) tr.appendChild(html("th", "", l));
    };
    sub(["rule", "requests delayed", ""]);
    for (const [rule, count] of Object.entries(ev.delay_counts || {})) {
      const tr = db.appendChild(row("delay-rule", [rule, int(count)]));
      tr.cells[1].colSpan = 2;  // the third column is for the delay events below
      tr.dataset.rule = rule;
      tr.classList.toggle("zero", int(count) === 0);
    }
    sub(["t (s)", "request", "rule"]);
    for (const d of newest(ev.delays)) db.appendChild(row("delay", [secs(d.t), d.request, d.rule]));
  }

  // ------------------------------------------------------------------ draw

  function draw() {
    const f = currentFrame;
    if (!f) return;
    const idx = indexFrame(f);
    // The selection lives until its request leaves the frame.
    if (selectedRequestId != null && !idx.requests.has(selectedRequestId)) selectedRequestId = null;
    const r = selectedRequestId != null ? idx.requests.get(selectedRequestId) : null;
    const selPages = new Set(), selHost = new Set();
    for (const s of r ? r.seqs : []) {
      for (const p of s.pages || []) selPages.add(p);
      for (const h of s.host || []) selHost.add(h);
    }
    drawCounters(f);
    drawGrid(f, idx, selPages);
    drawHostGrid(f, idx, selHost);
    drawRequests(idx);
    drawDetails(f, r);
    drawCharts(offline ? num(f.point ? f.point.t : f.t) : null);
    drawEvents(f);
  }

  // Live frames arrive up to 10 Hz; draw at most once per animation frame.
  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => { drawPending = false; draw(); });
  }

  // ------------------------------------------------------------------ live

  let liveGen = 0;      // bumped to abandon a connection (new key, 401)
  let aborter = null;

  function storage(op, value) {  // sessionStorage may be disabled: then the key lasts a page load
    try {
      if (op === "get") return sessionStorage.getItem(KEY_STORE);
      if (op === "set") sessionStorage.setItem(KEY_STORE, value);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) { return null; }
    return null;
  }

  function apiFetch(path, opts) {
    const key = storage("get"), headers = key ? { Authorization: "Bearer " + key } : {};
    // From the origin: a relative url resolves wrongly from /dashboard (no trailing slash).
    return fetch(location.origin + "/dashboard/api/" + path, Object.assign({ cache: "no-store" }, opts, { headers }));
  }

  function pushPoint(p) {
    if (!p || !Number.isFinite(+p.t)) return;
    const last = series[series.length - 1];
    if (last && +p.t < +last.t) series = [];           // server restarted: time went back
    else if (last && +p.t === +last.t) series.pop();   // same point again (snapshot, then stream)
    series.push(p);
    if (series.length > MAX_POINTS) series.splice(0, series.length - MAX_POINTS);
  }

  function acceptFrame(f) {
    if (!f || typeof f !== "object") return;
    currentFrame = f;
    pushPoint(f.point);
    scheduleDraw();
  }

  function needKey() {
    liveGen++;
    if (aborter) aborter.abort();
    storage("remove");  // a rejected key is forgotten, so a reload asks again
    setStatus("need API key");
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  // SSE by hand: EventSource cannot send an Authorization header.
  async function readStream(body, gen) {
    const reader = body.getReader(), dec = new TextDecoder();
    let buf = "", cut;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || gen !== liveGen) break;
        // Unconsumed text stays in buf, so a \r\n split across chunks is joined before this replace.
        buf = (buf + dec.decode(value, { stream: true })).replace(/\r\n/g, "\n");
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const data = buf.slice(0, cut).split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n");
          buf = buf.slice(cut + 2);
          if (!data) continue;  // comments / keep-alives
          try { acceptFrame(JSON.parse(data)); } catch (e) { /* a malformed message: skip it */ }
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  async function connect() {
    const gen = ++liveGen;
    if (aborter) aborter.abort();
    aborter = new AbortController();
    const signal = aborter.signal;
    setStatus("connecting");
    try {
      const snap = await apiFetch("snapshot", { signal });
      if (snap.status === 401) return needKey();
      if (!snap.ok) throw new Error("snapshot: HTTP " + snap.status);
      const body = await snap.json();
      if (gen !== liveGen) return;
      series = [];
      for (const p of body.series || []) pushPoint(p);
      if (body.frame) acceptFrame(body.frame);
      const res = await apiFetch("stream", { signal });
      if (res.status === 401) return needKey();
      if (!res.ok || !res.body) throw new Error("stream: HTTP " + res.status);
      setStatus("live");
      await readStream(res.body, gen);
    } catch (e) {
      /* refused, dropped or aborted: retried below unless superseded */
    }
    if (gen !== liveGen) return;
    setStatus("connecting");
    setTimeout(() => { if (gen === liveGen) connect(); }, 1000);
  }

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    storage("set", key);
    $("api-key").value = "";
    $("key-form").hidden = true;
    connect();
  });

  // --------------------------------------------------------------- offline

  function showFrame(i) {
    const frames = offline.frames;
    if (!frames.length) return;
    offline.index = Math.max(0, Math.min(frames.length - 1, int(i)));
    currentFrame = frames[offline.index];
    setText("frame-label", `${offline.index + 1} / ${frames.length}`);
    draw();  // synchronous: a scrub is a user action, and tests read the DOM right after
  }

  function chooseRun(i) {
    const run = offline.data.runs[int(i)] || {};
    offline.frames = Array.isArray(run.frames) ? run.frames : [];
    series = offline.frames.map((f) => f.point).filter(Boolean);  // the whole run, cursor on the frame
    $("scrubber").max = String(Math.max(0, offline.frames.length - 1));
    $("scrubber").value = "0";
    showFrame(0);
  }

  function startOffline(text) {
    setStatus("offline");
    let data;
    try { data = JSON.parse(text); } catch (e) { data = { title: "unreadable timeline", runs: [] }; }
    if (!Array.isArray(data.runs)) data.runs = [];
    offline = { data, frames: [], index: 0 };
    if (data.title != null) {
      document.querySelector("h1").textContent = String(data.title);
      document.title = String(data.title) + " · kvpage";
    }
    const sel = $("run");
    data.runs.forEach((r, i) => {
      sel.appendChild(html("option", "", r.name != null ? r.name : `run ${i}`)).value = String(i);
    });
    $("offline-controls").hidden = false;
    sel.addEventListener("change", () => chooseRun(sel.value));
    $("scrubber").addEventListener("input", (e) => showFrame(e.target.value));
    chooseRun(0);
  }

  window.kvdash = {
    frame: () => currentFrame,
    selected: () => selectedRequestId,
    select: (id) => select(id),
  };

  const embedded = $("kvpage-timeline");
  if (embedded) startOffline(embedded.textContent);
  else connect();
})();
