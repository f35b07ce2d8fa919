/* kvpage dashboard: the page grids, device pages and host swap space, one SVG rect per page (or per bin). */
(function (kv) {
  "use strict";

  const { $, svgEl, setText, int, pushNew, hue } = kv;
  const MAX_CELLS = 2048;    // above this many pages, one rect stands for k pages
  // One character a page (kvpage/kv/page_map.py) -> the cell's class.
  const STATES = { ".": "free", x: "frag", c: "cached", u: "used", s: "shared", r: "reserved" };
  // Tie-break of a bin's majority: occupied states win, they are what one looks for.
  const STATE_ORDER = ["used", "shared", "reserved", "cached", "frag", "free"];

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

  function drawGrid(f, idx, selPages, hasSelection) {
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
    grid.svg.classList.toggle("has-sel", hasSelection);
    setText("grid-info", k > 1 ? `${n} pages, ${k} per cell` : `${n} pages`);
  }

  function drawHostGrid(f, idx, selHost, hasSelection) {
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
    hostGrid.svg.classList.toggle("has-sel", hasSelection);
    hostGrid.svg.classList.toggle("empty", n === 0);
    setText("host-info", n ? `${used} of ${n} pages hold swapped K/V` : "none");
  }

  kv.grid = { drawGrid, drawHostGrid };
})(window.kvpage);
