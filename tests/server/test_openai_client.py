"""The server through the official ``openai`` client, running the built-in model on CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[test]'")
pytest.importorskip("openai", reason="the server tests need the test extra: pip install -e '.[test]'")
import httpx
import openai

from kvpage import LLM, SamplingParams
from tests.server.live_server import LiveServer, live_server

PROMPT = "And God said"
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server({"max_model_len": 256}, api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(device="cpu", max_model_len=256)


def greedy_text(llm: LLM, prompt: str | dict, max_tokens: int, **extra: object) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **extra)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def test_models_lists_the_served_model(client: openai.OpenAI, server: LiveServer) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_name]


def test_completion_matches_the_offline_engine(client: openai.OpenAI, offline: LLM) -> None:
    response = client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=24, temperature=0)
    choice = response.choices[0]
    assert choice.text == greedy_text(offline, PROMPT, 24)
    assert choice.finish_reason == "length" and response.object == "text_completion"
    assert response.id.startswith("cmpl-") and response.created > 0
    prompt_tokens = len(offline.get_tokenizer()(PROMPT)["input_ids"])
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == 24 and response.usage.total_tokens == prompt_tokens + 24


def test_streamed_completion_equals_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 5  # it really streamed, token by token
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_plain_and_streamed(client: openai.OpenAI, server: LiveServer, offline: LLM) -> None:
    messages = [{"role": "system", "content": "Speak as the King James Bible."},
                {"role": "user", "content": "Who made the light?"}]
    whole = client.chat.completions.create(model="kvpage-demo", messages=messages, max_tokens=20, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    rendered = offline.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = offline.get_tokenizer()(rendered, add_special_tokens=False)["input_ids"]
    assert whole.usage.prompt_tokens == len(ids)
    assert choice.message.content == greedy_text(offline, {"prompt_token_ids": ids}, 20)
    tokenized = httpx.post(server.root + "/tokenize", json={"messages": messages}).json()
    assert tokenized["tokens"] == ids

    stream = list(client.chat.completions.create(model="kvpage-demo", messages=messages, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == choice.finish_reason
    assert stream[-1].usage.total_tokens == whole.usage.total_tokens


def test_n_samples_and_several_prompts(client: openai.OpenAI) -> None:
    response = client.completions.create(model="kvpage-demo", prompt=[PROMPT, "In the beginning"], n=2,
                                         max_tokens=12, temperature=1.0, seed=11)
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 4 * 12
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1] and texts[2] != texts[3]  # siblings sample independently
    again = client.completions.create(model="kvpage-demo", prompt=[PROMPT, "In the beginning"], n=2,
                                      max_tokens=12, temperature=1.0, seed=11)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts  # seeded: reproducible
    chat = client.chat.completions.create(model="kvpage-demo", messages=[{"role": "user", "content": "Hi"}],
                                          n=2, max_tokens=8, temperature=1.0, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_stop_strings_plain_and_streamed(client: openai.OpenAI) -> None:
    full = client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[12:17]
    expected = full[:full.index(stop)]
    cut = client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=40, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == expected and cut.finish_reason == "stop"
    streamed = list(client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=40, temperature=0,
                                              stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == expected  # nothing of the stop string leaked
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(model="kvpage-demo", prompt=PROMPT, max_tokens=6, temperature=0,
                                         logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == response.choices[0].text
    for _token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])

    chat = client.chat.completions.create(model="kvpage-demo", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_token_id_prompts_and_extra_fields(client: openai.OpenAI, offline: LLM) -> None:
    ids = offline.get_tokenizer()(PROMPT)["input_ids"]
    response = client.completions.create(model="kvpage-demo", prompt=ids, max_tokens=10, temperature=0,
                                         extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.0,
                                                     "min_tokens": 10, "ignore_eos": True})
    assert response.choices[0].text == greedy_text(offline, PROMPT, 10)


def test_api_key_is_required_on_v1(server: LiveServer) -> None:
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.base_url, api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model="kvpage-demo", prompt="x", max_tokens=1)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/models").status_code == 401
    assert httpx.get(server.root + "/health").status_code == 200  # outside /v1: open, as in vLLM


def test_tokenize_detokenize_round_trip(server: LiveServer) -> None:
    tokens = httpx.post(server.root + "/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 256
    text = httpx.post(server.root + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith(PROMPT)
    assert server.wait_until_idle() == 0


VLLM_NAMES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries",
              "prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens",
              "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_success")
KVPAGE_NAMES = ("kv_pages_free", "kv_pages_in_use", "kv_pages_cached_free", "kv_pages_total",
                "kv_internal_fragmentation", "kv_cache_evictions", "recomputed_tokens", "goodput_tokens_per_second",
                "model_tokens_per_second", "kv_stored_fraction", "kv_reservation_waste", "kv_external_fragmentation",
                "kv_waste_mean", "kv_sharing_saving_mean", "recompute_fraction", "is_thrashing",
                "preemptions_per_second", "requests_delayed_admission_cap", "requests_delayed_headroom")


def scrape(server: LiveServer) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.root + "/metrics").text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("kvpage:")
        samples[family.name] = 0.0  # the family exists, even with no sample yet
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_metrics_follow_the_requests(client: openai.OpenAI, server: LiveServer) -> None:
    before = scrape(server)
    for name in VLLM_NAMES + KVPAGE_NAMES:
        assert "kvpage:" + name in before, name
    prompt = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    for _ in range(2):  # the second one finds the first one's full pages in the prefix cache
        client.completions.create(model="kvpage-demo", prompt=prompt, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = scrape(server)

    def delta(name: str) -> float:
        return after["kvpage:" + name] - before.get("kvpage:" + name, 0.0)

    prompt_tokens = client.completions.create(model="kvpage-demo", prompt=prompt, max_tokens=1).usage.prompt_tokens
    assert delta("generation_tokens_total") == 14
    assert delta("prefix_cache_queries_total") == 2 * prompt_tokens
    assert delta("prefix_cache_hits_total") >= 16  # at least one page of 16 tokens reused
    assert delta("prompt_tokens_total") == 2 * prompt_tokens - delta("prefix_cache_hits_total")
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(histogram + "_count") == 2
    assert delta("inter_token_latency_seconds_count") == 12  # 6 gaps between 7 tokens, twice
    assert delta("request_success_total{finished_reason=length}") == 2
    assert after["kvpage:goodput_tokens_per_second"] > 0
    assert after["kvpage:kv_pages_in_use"] == 0 and after["kvpage:num_requests_running"] == 0
    assert (after["kvpage:kv_pages_free"] + after["kvpage:kv_pages_cached_free"] + after["kvpage:kv_pages_in_use"]
            == after["kvpage:kv_pages_total"])
