"""``kvpage serve``: build the engine, wrap it, and run the app under uvicorn.

uvicorn owns the signals: on SIGINT or SIGTERM it stops accepting
connections, lets open responses finish for up to ``graceful_shutdown_s``,
then runs the app's shutdown, which stops the engine loop (aborting whatever
is left, so every page returns to the pool) and the engine's tensor-parallel
ranks. An engine that fails for good (a rank died) stops the server the
same way, and ``serve`` then returns a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from kvpage.server.async_engine import AsyncEngine
from kvpage.server.protocol import ServerLimits

logger = logging.getLogger("kvpage.server")
DEFAULT_MODEL_NAME = "kvpage-demo"


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    log_level: str = "info"
    graceful_shutdown_s: int = 5  # whole seconds, as uvicorn takes it
    limits: ServerLimits = ServerLimits()


def build_app(engine_options: dict[str, Any], options: ServeOptions,
              on_fatal: Callable[[BaseException], None] | None = None) -> tuple[FastAPI, AsyncEngine]:
    """The app and its engine loop (already running); engine errors raise here, before serving."""
    from kvpage.engine import LLMEngine
    from kvpage.server.app import ServerConfig, create_app

    engine = LLMEngine.from_kwargs(**engine_options)
    name = options.served_model_name or (engine_options.get("model") or DEFAULT_MODEL_NAME)
    async_engine = AsyncEngine(engine, on_fatal=on_fatal)
    app = create_app(async_engine, ServerConfig(model_name=str(name), api_key=options.api_key,
                                                limits=options.limits))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        async_engine.shutdown()
        logger.info("engine loop stopped; %d KV pages in use", engine.kv.usage().num_pages_used)

    app.router.lifespan_context = lifespan
    return app, async_engine


def describe(engine: Any, url: str) -> str:
    usage = engine.kv.usage()
    gib = engine.bytes_per_page * usage.num_pages_total / 2**30
    tp = engine.tensor_parallel_size
    where = f"{engine.device}" if tp == 1 else f"{tp} ranks from {engine.device} (tensor parallel)"
    return (f"model {engine.model_dir} ({engine.model_config.architecture}, {engine.dtype}) on {where}; "
            f"KV cache {usage.num_pages_total} pages of {usage.block_size} tokens = {gib:.2f} GiB "
            f"({engine.kv_cache_dtype}, {engine.bytes_per_page // usage.block_size} bytes a token); "
            f"max_model_len {engine.max_model_len}; serving at {url}/v1, the KV page map at {url}/dashboard")


def serve(engine_options: dict[str, Any], options: ServeOptions) -> int:
    import uvicorn

    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server: uvicorn.Server | None = None

    def stop_serving(_: BaseException) -> None:
        if server is not None:
            server.should_exit = True  # read by uvicorn's main loop: a graceful shutdown, as on SIGTERM

    app, async_engine = build_app(engine_options, options, stop_serving)
    url = f"http://{options.host}:{options.port}"
    logger.info(describe(async_engine.engine, url))
    if options.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use it", options.host)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            timeout_graceful_shutdown=options.graceful_shutdown_s)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        async_engine.shutdown()
    if async_engine.fatal is not None:
        logger.error("exiting: %s", async_engine.fatal)
        return 1
    return 0
