/* kvpage dashboard: the helpers its scripts share (loaded first, before grid.js, charts.js, dashboard.js).
 *
 * Each script is one function over the namespace window.kvpage, so the page works
 * linked from /dashboard/static/ or inlined into one offline file alike.
 */
(function (kv) {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

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

  Object.assign(kv, { $, html, svgEl, setText, int, num, secs, pushNew, hue, niceMax });
})(window.kvpage = window.kvpage || {});
