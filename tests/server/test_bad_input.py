"""Malformed, invalid and hostile requests get OpenAI error JSON with a 4xx, and the server stays up."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[test]'")
pytest.importorskip("openai", reason="the server tests need the test extra: pip install -e '.[test]'")
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpage.server.protocol import ServerLimits
from tests.server.live_server import LiveServer, live_server

MAX_MODEL_LEN = 48


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    limits = ServerLimits(max_body_bytes=64 * 1024, max_n=4, max_stop_strings=4, max_prompts=8)
    with live_server({"max_model_len": MAX_MODEL_LEN}, limits=limits) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.root, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def statuses() -> Counter:
    """Status codes the fuzzers got, so the last test can check they reached the engine too."""
    return Counter()


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_malformed_json(http: httpx.Client) -> None:
    for body in (b"{", b"not json", b'{"prompt": "a",}', b"\xff\xfe"):
        error = assert_error(http.post("/v1/completions", content=body,
                                       headers={"content-type": "application/json"}), 400)
        assert "JSON" in error["message"]
    assert_error(http.post("/v1/completions", json=["a", "list"]), 400)
    assert_error(http.post("/v1/chat/completions", json={}), 400, "messages")


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/completions", {"prompt": ["a", 1]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "stop": 3}, "stop"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
])
def test_wrong_types(http: httpx.Client, route: str, body: dict, param: str) -> None:
    assert_error(http.post(route, json=body), 400, param)


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),  # above --max-n
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),  # prompt + max_tokens > max_model_len
    ({"logprobs": 21}, "logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"prompt": [1, 2, 999_999]}, "prompt"),
    ({"prompt": "word " * 200}, "prompt"),  # longer than max_model_len
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a"] * 9}, "prompt"),  # above max_prompts
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"seed": 1.5}, "seed"),
    ({"seed": 2**64}, "seed"),  # beyond a 64-bit generator seed (found by the fuzz test below)
])
def test_out_of_range_values(http: httpx.Client, body: dict, param: str) -> None:
    assert_error(http.post("/v1/completions", json={"prompt": "And God said", **body}), 400, param)


def test_limits_of_size_routes_and_models(http: httpx.Client, server: LiveServer) -> None:
    assert_error(http.post("/v1/completions", json={"prompt": "x" * 70_000}), 413)
    # A lying Content-Length is caught while the body streams in.
    chunks = (b'{"prompt": "' + b"x" * 1000 for _ in range(100))
    assert_error(http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"}), 413)
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.post("/v1/completions", json={"prompt": "a", "model": "gpt-9"}), 404, "model")
    assert_error(http.post("/detokenize", json={"tokens": [10**7]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={}), 400, "prompt")
    assert http.get("/health").status_code == 200
    assert server.wait_until_idle() == 0


def _json_values() -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


# Ranges reach a little past the valid ones, so most values pass and the edges get tried.
_COMMON = {"model": st.sampled_from(["kvpage-demo", "kvpage-demo", "other"]), "n": st.integers(1, 5),
           "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
           "max_tokens": st.integers(0, 30), "seed": st.integers(-5, 2**64), "stream": st.booleans(),
           "stop": st.one_of(st.text(max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=5)),
           "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
           "presence_penalty": st.floats(-2, 2.2), "min_p": st.floats(0, 1), "ignore_eos": st.booleans(),
           "min_tokens": st.integers(0, 4), "repetition_penalty": st.floats(0.5, 2)}
_PROMPTS = st.one_of(st.text(max_size=60), st.lists(st.text(max_size=10), max_size=3),
                     st.lists(st.integers(-5, 5000), max_size=30))
_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bad"]),
                                            "content": st.one_of(st.text(max_size=40), st.none())}),
                     min_size=1, max_size=3)


def _request(required: dict, specific: dict) -> st.SearchStrategy:
    """Plausible bodies, then up to two fields overwritten with arbitrary JSON; now and then not an object."""
    fields = {**_COMMON, **specific}
    base = st.fixed_dictionaries(required, optional=fields)
    mutation = st.tuples(st.sampled_from(sorted({*fields, *required})), _json_values())
    mutated = st.builds(lambda body, changes: {**body, **dict(changes)}, base, st.lists(mutation, max_size=2))
    return st.one_of(mutated, mutated, mutated, _json_values())


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_request({"prompt": _PROMPTS}, {"logprobs": st.integers(-1, 22), "echo": st.booleans()}))
def test_fuzz_completions_never_5xx(http: httpx.Client, statuses: Counter, body: dict) -> None:
    _check_fuzzed(statuses, http.post("/v1/completions", content=json.dumps(body),
                            headers={"content-type": "application/json"}))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_request({"messages": _MESSAGES}, {"logprobs": st.booleans(), "top_logprobs": st.integers(-1, 22),
                                             "max_completion_tokens": st.integers(-2, 60)}))
def test_fuzz_chat_never_5xx(http: httpx.Client, statuses: Counter, body: dict) -> None:
    _check_fuzzed(statuses, http.post("/v1/chat/completions", content=json.dumps(body),
                            headers={"content-type": "application/json"}))


def _check_fuzzed(statuses: Counter, response: httpx.Response) -> None:
    statuses[response.status_code] += 1
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text


def test_server_is_healthy_and_clean_after_fuzzing(http: httpx.Client, server: LiveServer,
                                                   statuses: Counter) -> None:
    if statuses:  # the fuzzers ran in this module: some bodies were served, not only refused
        assert sum(statuses.values()) >= 600 and statuses[200] >= 30 and statuses[400] >= 100, statuses
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/completions", json={"prompt": "And God said", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert server.wait_until_idle() == 0
    assert server.engine.engine.kv.usage().num_pages_used == 0
