"""The dashboard page: served live, or written out as one self-contained HTML file with a run's timeline.

``static/dashboard.html`` marks where its stylesheet, its script and its data
go with three comment lines.  Served by ``kvpage serve``, the markers become
links to ``/dashboard/static/``; written out (:func:`offline_page`), the
files are inlined and the timeline is embedded as JSON, so the file opens
from disk with no server and no network.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STATIC = Path(__file__).parent / "static"
SCRIPTS = ("common.js", "grid.js", "charts.js", "dashboard.js")  # in load order: each adds to window.kvpage
STATIC_FILES = {"dashboard.css": "text/css; charset=utf-8",
                **{name: "text/javascript; charset=utf-8" for name in SCRIPTS}}
_CSS, _JS, _DATA = "<!--kvpage:css-->", "<!--kvpage:js-->", "<!--kvpage:data-->"


def _template() -> str:
    html = (STATIC / "dashboard.html").read_text()
    for marker in (_CSS, _JS, _DATA):
        if marker not in html:
            raise RuntimeError(f"static/dashboard.html lacks its {marker} line")
    return html


def live_page() -> str:
    """The page ``/dashboard`` serves: its files linked, its data from the stream."""
    scripts = "\n".join(f'<script src="/dashboard/static/{name}"></script>' for name in SCRIPTS)
    return (_template().replace(_CSS, '<link rel="stylesheet" href="/dashboard/static/dashboard.css">')
            .replace(_JS, scripts).replace(_DATA, ""))


def _inline_json(value: Any) -> str:
    """JSON safe inside a <script> element: no '</' can close it, no '<!--' can open a comment."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


def _inline_script(name: str) -> str:
    """A script's text, safe inside a <script> element (no '</script' can close it early)."""
    return (STATIC / name).read_text().replace("</script", "<\\/script")


def offline_page(title: str, runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> str:
    """One HTML file holding the page, its files and ``runs`` (name, frames as :meth:`Frame.to_json` gives)."""
    timeline = {"title": title, "runs": [{"name": name, "frames": frames} for name, frames in runs]}
    css = (STATIC / "dashboard.css").read_text()
    js = "\n".join(f"<script>\n{_inline_script(name)}\n</script>" for name in SCRIPTS)
    data = f'<script id="kvpage-timeline" type="application/json">{_inline_json(timeline)}</script>'
    # Split the template on its markers before anything is inlined: the inlined text may contain anything.
    html = _template()
    head, rest = html.split(_CSS, 1)
    middle, tail = rest.split(_DATA, 1)
    between, end = tail.split(_JS, 1)
    return "".join((head, f"<style>\n{css}\n</style>", middle, data, between, js, end))


def write_offline_page(path: Path, title: str, runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(offline_page(title, runs))
    return path
