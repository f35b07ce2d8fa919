"""The OpenAI-compatible HTTP server (``kvpage serve``); needs the ``serve`` extra.

``async_engine`` runs one :class:`~kvpage.engine.LLMEngine` in a background
loop for many asyncio handlers; ``protocol`` holds the request schemas;
``openai_api`` the two generation endpoints; ``app`` the FastAPI app with
authentication, limits and error shapes; ``telemetry`` the Prometheus
metrics; ``launch`` the command itself.
"""
