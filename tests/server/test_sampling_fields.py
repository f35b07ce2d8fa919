"""Sampling fields of a request reach the engine, and what comes back is right (official ``openai`` client).

The built-in demo model (a small trained model, so its distributions are natural) serves; the offline
engine with the same seeded parameters is the reference for the tokens, and transformers (float32) for
the logprobs: at temperature 1 they must be the sampled token's, not the likeliest one's.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[test]'")
pytest.importorskip("openai", reason="the server tests need the test extra: pip install -e '.[test]'")
import openai
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from kvpage import LLM, SamplingParams
from kvpage.model.demo_model import demo_model_dir
from tests.server.live_server import LiveServer

PROMPT = "And God said"
MODEL = "kvpage-demo"
SEED = 1234


@pytest.fixture(scope="module")
def oracle() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir()), dtype=torch.float32).eval()


def log_softmax_rows(oracle: PreTrainedModel, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities of the next token, at each generated position of the completed text."""
    with torch.no_grad():
        logits = oracle(torch.tensor([prompt_ids + token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(token_ids)]


def check_logprobs(tokenizer: Any, rows: torch.Tensor, token_ids: list[int], chosen: list[float],
                   tops: list[list[tuple[str, float]]], k: int) -> None:
    """The chosen token's logprob; top_logprobs sorted, transformers' top k, and holding the chosen one if it ranks."""
    ranks = []
    for row, token, logprob, top in zip(rows, token_ids, chosen, tops):
        assert logprob == pytest.approx(row[token].item(), abs=1e-3)
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True) and len(top) == k
        assert values == pytest.approx(row.topk(k).values.tolist(), abs=1e-3)
        rank = int((row > row[token]).sum())
        ranks.append(rank)
        if rank < k:
            assert (tokenizer.decode([token]), pytest.approx(logprob, abs=1e-6)) in top
    assert max(ranks) > 0  # some sampled token was not the likeliest: the top logprob would not pass


def test_completion_logprobs_at_temperature_one_are_the_sampled_tokens(
        client: openai.OpenAI, offline: LLM, oracle: PreTrainedModel) -> None:
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=SEED,
                                         logprobs=5, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    expected = offline.generate(PROMPT, SamplingParams(temperature=1.0, seed=SEED, max_tokens=12, ignore_eos=True),
                                use_tqdm=False)[0]
    token_ids = expected.outputs[0].token_ids
    assert choice.text == expected.outputs[0].text
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None and logprobs.token_logprobs is not None
    rows = log_softmax_rows(oracle, expected.prompt_token_ids, token_ids)
    tops = [list(top.items()) for top in logprobs.top_logprobs]
    check_logprobs(offline.get_tokenizer(), rows, token_ids, [float(lp) for lp in logprobs.token_logprobs], tops, 5)


def test_chat_logprobs_at_temperature_one_are_the_sampled_tokens(
        client: openai.OpenAI, offline: LLM, oracle: PreTrainedModel) -> None:
    messages: list[Any] = [{"role": "user", "content": "Who made the light?"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0,
                                              seed=SEED, logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True})
    tokenizer = offline.get_tokenizer()
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    expected = offline.generate({"prompt_token_ids": prompt_ids},
                                SamplingParams(temperature=1.0, seed=SEED, max_tokens=10, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0]
    assert response.choices[0].message.content == expected.text
    content = response.choices[0].logprobs.content
    assert content is not None
    rows = log_softmax_rows(oracle, prompt_ids, expected.token_ids)
    tops = [[(t.token, t.logprob) for t in c.top_logprobs] for c in content]
    check_logprobs(tokenizer, rows, expected.token_ids, [c.logprob for c in content], tops, 3)


def offline_text(offline: LLM, **fields: Any) -> str:
    params = SamplingParams(temperature=1.0, seed=SEED, max_tokens=16, ignore_eos=True, **fields)
    return offline.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text


def test_extra_body_fields_change_the_result_as_offline(client: openai.OpenAI, server: LiveServer,
                                                        offline: LLM) -> None:
    """``top_k``, ``min_p``, ``repetition_penalty`` and ``min_tokens`` through ``extra_body``: the very text the
    offline engine gives with them, which differs from its text without them (so a dropped field shows)."""
    # min_tokens needs a stop to hold back: the token the plain run generates second.
    early = offline.generate(PROMPT, SamplingParams(temperature=1.0, seed=SEED, max_tokens=16, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids[1]
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"top_k": 2}, {}), ({"min_p": 0.3}, {}), ({"repetition_penalty": 1.8}, {}),
        ({"min_tokens": 8}, {"stop_token_ids": [early]})]
    for fields, base in cases:
        expected = offline_text(offline, **fields, **base)
        assert expected != offline_text(offline, **base), fields
        response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=SEED,
                                             extra_body={"ignore_eos": True, **fields, **base})
        assert response.choices[0].text == expected, fields
        if "min_tokens" in fields:
            assert response.usage is not None and response.usage.completion_tokens >= 8
    assert server.wait_until_idle() == 0


@pytest.mark.parametrize("top_k", [-2, 1.5, "5"])
def test_an_invalid_top_k_is_a_400_naming_it(client: openai.OpenAI, server: LiveServer, top_k: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"top_k": top_k})
    assert info.value.status_code == 400
    assert info.value.body["param"] == "top_k" and "top_k" in info.value.body["message"]
    assert server.wait_until_idle() == 0
