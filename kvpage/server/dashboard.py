"""The live KV page map: ``GET /dashboard``, its JSON snapshot and its stream of frames.

Routes (the data routes need the API key when the server has one; the page
itself holds no data and asks for the key):

* ``/dashboard``: the page (``kvpage/dashboard/static``), no build step, no CDN;
* ``/dashboard/api/snapshot``: the frame now and the recent series, for scripts;
* ``/dashboard/api/stream``: Server-Sent Events, one frame a message, at most
  10 a second (:class:`~kvpage.server.feed.DashboardFeed`);
* ``/dashboard/api/requests/{id}``: one request's prompt and text so far.

Frames come from the engine loop through :class:`~kvpage.server.feed.DashboardFeed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from kvpage.dashboard import Frame, live_page
from kvpage.dashboard.page import STATIC, STATIC_FILES
from kvpage.engine import LLMEngine
from kvpage.server.async_engine import AsyncEngine
from kvpage.server.feed import DashboardFeed
from kvpage.server.protocol import RequestError


def request_details(engine: LLMEngine, request_id: str) -> dict[str, Any]:
    """A live request's prompt and each sequence's tokens and text so far (runs on the engine loop)."""
    request = engine.scheduler.requests.get(request_id)
    if request is None:
        raise RequestError(f"no unfinished request {request_id!r}", "request_id", status=404)
    tokenizer = engine.tokenizer
    decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else (lambda ids: None)
    prompt = request.prompt if request.prompt is not None else decode(request.prompt_token_ids)
    return {"request": request_id, "prompt": prompt,
            "sequences": [{"seq": seq.seq_id, "status": seq.status.value, "text": decode(seq.output_token_ids),
                           "token_ids": list(seq.output_token_ids)}
                          for seq in request.sequences if not seq.is_finished]}


def add_dashboard_routes(app: FastAPI, engine: AsyncEngine, feed: DashboardFeed) -> None:

    @app.get("/dashboard")
    async def page() -> HTMLResponse:
        return HTMLResponse(live_page())

    @app.get("/dashboard/static/{name}")
    async def static(name: str) -> Response:
        media = STATIC_FILES.get(name)
        if media is None:
            raise RequestError(f"no dashboard file {name!r}; there are {', '.join(STATIC_FILES)}", "name", status=404)
        return Response((STATIC / name).read_bytes(), media_type=media)

    @app.get("/dashboard/api/snapshot")
    async def snapshot() -> dict[str, Any]:
        frame: Frame = await engine.call(lambda e: e.frame())
        return {"frame": frame.to_json(), "series": list(feed.history)}

    @app.get("/dashboard/api/requests/{request_id}")
    async def details(request_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await engine.call(lambda e: request_details(e, request_id))
        return result

    @app.get("/dashboard/api/stream")
    async def stream() -> StreamingResponse:
        # The first frame of an idle engine: nothing would publish one until the next step.
        first: Frame = await engine.call(lambda e: e.frame())

        async def events() -> AsyncIterator[bytes]:
            yield b"data: " + first.encoded() + b"\n\n"
            async for frame in feed.frames():
                if frame.time > first.time:
                    yield b"data: " + frame.encoded() + b"\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
