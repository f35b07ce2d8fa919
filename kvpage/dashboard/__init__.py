"""The KV page map: the cache drawn page by page, live in a browser or from a recorded run (pure Python, no torch).

* :mod:`~kvpage.dashboard.frame`: one frame, copied between two steps and
  turned into the page's JSON later;
* :mod:`~kvpage.dashboard.timeline`: frames of a whole run, thinned as they
  come (``kvpage plan --html``, ``kvpage bench --html``);
* :mod:`~kvpage.dashboard.page`: the page itself (``static/``), served by
  ``kvpage serve`` at ``/dashboard`` or written out as one self-contained
  HTML file with a timeline in it.

The live routes and the stream are in :mod:`kvpage.server.dashboard`.
"""

from kvpage.dashboard.frame import Frame, SeriesPoint, capture
from kvpage.dashboard.page import live_page, offline_page, write_offline_page
from kvpage.dashboard.timeline import Timeline

__all__ = ["Frame", "SeriesPoint", "Timeline", "capture", "live_page", "offline_page", "write_offline_page"]
