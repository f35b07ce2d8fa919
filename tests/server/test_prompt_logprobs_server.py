"""``echo`` and prompt logprobs on ``/v1/completions``, through the official ``openai`` client.

The reference is the offline engine's ``RequestOutput.prompt_logprobs`` on
the same (built-in) model, which ``tests/test_prompt_logprobs.py`` checks
against transformers.  The legacy ``logprobs`` object of an echoed request
must hold the prompt's tokens first (the first with null logprob and
alternatives), then the completion's; ``max_tokens=0`` with echo (what
lm-evaluation-harness sends for log-likelihoods) returns the prompt alone;
vLLM's ``prompt_logprobs`` extra returns vLLM's shape.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[test]'")
pytest.importorskip("openai", reason="the server tests need the test extra: pip install -e '.[test]'")
import openai

from kvpage import LLM, SamplingParams
from kvpage.outputs import RequestOutput
from tests.server.live_server import LiveServer

PROMPT = "And God said, Let there be light: and there was"
MODEL = "kvpage-demo"


def reference(offline: LLM, prompt: Any, max_tokens: int, k: int) -> RequestOutput:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=k, prompt_logprobs=k)
    return offline.generate(prompt, params, use_tqdm=False)[0]


def expected_prompt_part(offline: LLM, ref: RequestOutput, k: int) -> tuple[list[str], list[Any], list[Any]]:
    """The legacy object's prompt part: tokens, token_logprobs and top_logprobs, the first two null."""
    decode = offline.get_tokenizer().decode
    ids, entries = ref.prompt_token_ids, ref.prompt_logprobs
    assert entries is not None
    tokens = [decode([t]) for t in ids]
    logprobs: list[Any] = [None] + [entries[i][ids[i]] for i in range(1, len(ids))]
    tops: list[Any] = [None] + [{decode([t]): lp for t, lp in sorted(entries[i].items(), key=lambda e: -e[1])[:k]}
                                for i in range(1, len(ids))]
    return tokens, logprobs, tops


def assert_logprobs_equal(got: list[Any], expected: list[Any]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if isinstance(b, dict):
            assert set(a) == set(b) and all(a[t] == pytest.approx(b[t], rel=1e-5, abs=1e-6) for t in b)
        else:
            assert (a is None) == (b is None) and (b is None or a == pytest.approx(b, rel=1e-5, abs=1e-6))


def test_echo_with_logprobs_returns_the_prompt_tokens_first(client: openai.OpenAI, offline: LLM,
                                                            server: LiveServer) -> None:
    ref = reference(offline, PROMPT, 4, 2)
    completion = ref.outputs[0]
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         logprobs=2)
    choice = response.choices[0]
    assert choice.text == PROMPT + completion.text
    tokens, logprobs, tops = expected_prompt_part(offline, ref, 2)
    decode = offline.get_tokenizer().decode
    assert completion.logprobs is not None
    tokens += [decode([t]) for t in completion.token_ids]
    logprobs += [entry[t] for t, entry in zip(completion.token_ids, completion.logprobs)]
    tops += [{decode([t]): lp for t, lp in sorted(e.items(), key=lambda e: -e[1])[:2]} for e in completion.logprobs]
    got = choice.logprobs
    assert got.tokens == tokens
    assert_logprobs_equal(got.token_logprobs, logprobs)
    assert_logprobs_equal(got.top_logprobs, tops)
    num_prompt = len(ref.prompt_token_ids)
    prompt_offsets = [sum(len(t) for t in tokens[:i]) for i in range(num_prompt)]
    assert got.text_offset[:num_prompt] == prompt_offsets
    assert got.text_offset[num_prompt] == len(PROMPT)  # the completion starts after the echoed prompt
    assert response.usage.completion_tokens == 4

    # Streamed, the first chunk carries the echo and the prompt's logprobs; the whole is the same.
    chunks = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                                              temperature=0, echo=True, logprobs=2, stream=True)]
    assert "".join(c.text for c in chunks) == choice.text
    assert sum((c.logprobs.tokens for c in chunks), []) == got.tokens
    assert_logprobs_equal(sum((c.logprobs.token_logprobs for c in chunks), []), got.token_logprobs)
    assert sum((c.logprobs.text_offset for c in chunks), []) == got.text_offset

    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None
    assert server.wait_until_idle() == 0


def test_prompt_only_request_as_lm_eval_sends_it(client: openai.OpenAI, offline: LLM, server: LiveServer) -> None:
    ids = offline.get_tokenizer()(PROMPT)["input_ids"]
    ref = reference(offline, {"prompt_token_ids": ids}, 1, 1)
    for stream in (False, True):
        result = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                           temperature=0, stream=stream,
                                           stream_options={"include_usage": True} if stream else None)
        chunks = list(result) if stream else [result]
        choices = [c.choices[0] for c in chunks if c.choices]
        assert len(choices) == 1
        choice = choices[0]
        assert choice.text == offline.get_tokenizer().decode(ids)  # token ids are echoed as text
        assert choice.finish_reason == "length"
        tokens, logprobs, tops = expected_prompt_part(offline, ref, 1)
        assert choice.logprobs.tokens == tokens  # the prompt alone: the token sampled to finish is dropped
        assert_logprobs_equal(choice.logprobs.token_logprobs, logprobs)
        assert_logprobs_equal(choice.logprobs.top_logprobs, tops)
        assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == len(ids)
    assert server.wait_until_idle() == 0


def test_vllm_prompt_logprobs_field(client: openai.OpenAI, offline: LLM) -> None:
    ref = reference(offline, PROMPT, 2, 3)
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                         extra_body={"prompt_logprobs": 3})
    choice = response.choices[0]
    assert choice.text == ref.outputs[0].text and choice.logprobs is None
    field = choice.model_extra["prompt_logprobs"]
    assert ref.prompt_logprobs is not None and len(field) == len(ref.prompt_logprobs) and field[0] is None
    for got, entry in zip(field[1:], ref.prompt_logprobs[1:]):
        assert entry is not None and list(got) == [str(t) for t in entry]
        for t, lp in entry.items():
            record = got[str(t)]
            assert record["logprob"] == pytest.approx(lp.logprob, rel=1e-5, abs=1e-6)
            assert record["rank"] == lp.rank and record["decoded_token"] == lp.decoded_token


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": 0}, "max_tokens"),  # max_tokens=0 needs echo
    ({"extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
    ({"echo": True, "logprobs": 2, "extra_body": {"prompt_logprobs": -1}}, "prompt_logprobs"),
    ({"echo": True, "max_tokens": 0, "logprobs": 21}, "logprobs"),
])
def test_bad_prompt_logprobs_requests(client: openai.OpenAI, server: LiveServer, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, **{"max_tokens": 2, **body})
    assert caught.value.body["param"] == param
    assert server.wait_until_idle() == 0
