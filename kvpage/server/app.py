"""The FastAPI application: routes, authentication, body limits and error shapes.

Every refusal is OpenAI's error JSON with a 4xx status: schema violations
and unparsable bodies (400), a missing or wrong API key on ``/v1`` routes
(401; also on the dashboard's data routes), unknown routes (404), wrong methods (405), bodies over the limit
(413).  A 5xx means a fault of the server itself, and only the request that
hit it sees one.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvpage.engine import LLMEngine
from kvpage.server.async_engine import AsyncEngine, EngineDeadError
from kvpage.server.dashboard import add_dashboard_routes
from kvpage.server.openai_api import (
    ApiContext,
    ClientGone,
    create_chat_completion,
    create_completion,
    render_chat,
)
from kvpage.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    ServerLimits,
    TokenizeRequest,
    error_body,
)

logger = logging.getLogger("kvpage.server")
PROTECTED_PREFIXES = ("/v1", "/dashboard/api")  # routes that need the API key, when the server has one
_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, _STATUS_TYPES.get(status, "server_error"), param, code or status),
                        status_code=status)


class GuardMiddleware:
    """Refuses oversized bodies (413) and, on /v1 and dashboard data routes, requests without the API key (401).

    Pure ASGI, so it sees the body as it streams in and stops reading at the
    limit, whatever Content-Length claims (or if it claims nothing).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"].startswith(PROTECTED_PREFIXES):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                await _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")(scope, receive, send)
                return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        # Read the body here, up to the limit, then replay it: refusing inside the app's own
        # body reading would surface as a generic 400.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later reads watch for a disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(413, f"request body exceeds {self.max_body_bytes} bytes")(scope, receive, send)


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    ctx = ApiContext(engine, config.model_name, config.limits)
    llm: LLMEngine = engine.engine
    app = FastAPI(title="kvpage", summary="OpenAI-compatible API over a paged KV cache")
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.limits.max_body_bytes)
    _install_error_handlers(app)

    def check_model(name: str | None) -> None:
        _check_model(config, name)

    def log_unknown(body: Any) -> None:
        unknown = body.unknown_fields()
        if unknown:
            logger.info("ignoring unknown request fields %s", unknown)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Any:
        check_model(body.model)
        log_unknown(body)
        return await create_completion(ctx, body, raw.is_disconnected)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Any:
        check_model(body.model)
        log_unknown(body)
        return await create_chat_completion(ctx, body, raw.is_disconnected)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "kvpage",
            "root": str(llm.model_dir), "max_model_len": llm.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return _error(503, "the engine loop is not running")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(engine.telemetry.render(await engine.snapshot()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    _add_tokenizer_routes(app, engine, config)
    add_dashboard_routes(app, engine, engine.feed)
    return app


def _check_model(config: ServerConfig, name: str | None) -> None:
    if name is not None and name != config.model_name:
        raise RequestError(f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           "model", status=404, code="model_not_found")


def _add_tokenizer_routes(app: FastAPI, engine: AsyncEngine, config: ServerConfig) -> None:
    """``/tokenize`` and ``/detokenize``, vLLM's routes beside the OpenAI API."""
    llm: LLMEngine = engine.engine

    def check_model(name: str | None) -> None:
        _check_model(config, name)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give exactly one of prompt and messages", "prompt")

        def run(e: LLMEngine) -> list[int]:
            if body.messages is not None:
                return render_chat(e, ChatCompletionRequest(messages=body.messages))
            tokenizer = _tokenizer(e, "prompt")
            return list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])

        tokens = await engine.call(run)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": llm.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        vocab = llm.model_config.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise RequestError(f"tokens contains {bad[0]}; token ids must be in [0, {vocab})", "tokens")
        return {"prompt": await engine.call(lambda e: _tokenizer(e, "tokens").decode(body.tokens))}



def _tokenizer(engine: LLMEngine, param: str) -> Any:
    """The engine's tokenizer, for a request whose ``param`` needs one (a 400 if the model has none)."""
    if engine.tokenizer is None:
        raise RequestError("this model has no tokenizer; send and receive token ids instead", param)
    return engine.tokenizer


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "))
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        value = first.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else type(value).__name__
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return _error(400, f"{where}: {first.get('msg', 'invalid value')}, got {shown}{more}", param)

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(404, f"no route {request.method} {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ClientGone)
    async def gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(Exception)
    async def fault(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")
