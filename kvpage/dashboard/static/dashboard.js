/* kvpage KV page map dashboard: the page's state, its requests, details and events, live and offline.
 *
 * Plain ES2020, no dependencies, no modules: Python either links the scripts
 * (live, under /dashboard) or inlines them into a self-contained HTML file with
 * a recorded timeline (offline).  They run at the end of <body>, so the DOM is
 * already there; common.js, grid.js and charts.js come first (window.kvpage).  Everything that comes from data is written with textContent
 * or setAttribute, never innerHTML: prompts and request ids are user input.
 */
(function (kv) {
  "use strict";

  const MAX_POINTS = 3000;   // live series history kept in memory
  const KEY_STORE = "kvpage-api-key";
  const COUNTERS = [["pages-in-use", "kv_blocks_used"], ["pages-cached", "kv_blocks_cached"],
    ["pages-free", "kv_blocks_free"], ["pages-total", "kv_blocks_total"],
    ["running-requests", "num_requests_running"], ["waiting-requests", "num_requests_waiting"],
    ["swapped-requests", "num_requests_swapped"]];

  const { $, html, setText, int, num, secs, pushNew } = kv;
  const { drawGrid, drawHostGrid } = kv.grid, { drawCharts } = kv.charts;

  let currentFrame = null;       // the frame on screen
  let series = [];               // points drawn in the charts, oldest first
  let selectedRequestId = null;  // string or null
  let offline = null;            // {data, frames, index} in offline mode
  let drawPending = false;

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
    drawGrid(f, idx, selPages, r != null);
    drawHostGrid(f, idx, selHost, r != null);
    drawRequests(idx);
    drawDetails(f, r);
    drawCharts(series, offline ? num(f.point ? f.point.t : f.t) : null);
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
})(window.kvpage);
