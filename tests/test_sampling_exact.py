"""Penalties and ``min_tokens`` give exactly their documented logits, and the engine decodes by them.

vLLM's formulas (docs/sampling.md), written out here token by token in float64:

* repetition ``r``, on every token of the prompt or the output: ``logit / r`` if ``logit > 0``,
  else ``logit * r``;
* then frequency ``f`` and presence ``p``, on output tokens only:
  ``logit - f * count_in_output - p * (count_in_output > 0)``;
* while fewer than ``min_tokens`` tokens were generated, EOS and ``stop_token_ids`` are -inf.

The repetition penalty is checked against transformers' ``RepetitionPenaltyLogitsProcessor`` too,
and ``min_tokens`` against transformers' generate() with ``min_new_tokens``, EOS not ignored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from kvpage import LLM, SamplingParams
from kvpage.worker.sampler import Sampler
from tests.checkpoints import _config_stamp, _load_hf_model, hf_greedy, hf_logits, make_checkpoint
from tests.sampling_reference import make_mild_checkpoint, scheduled

VOCAB = 64
PROMPT = [5, 9, 9, 12, 40, 3]
OUTPUT = [9, 40, 40, 7, 7, 7, 21]  # 9 and 40 also in the prompt; 7 three times; 5, 12, 3 in the prompt only

PENALTIES = [
    {"presence_penalty": 1.2},
    {"frequency_penalty": 0.7},
    {"presence_penalty": 0.5, "frequency_penalty": 0.3},
    {"repetition_penalty": 1.8},
    {"repetition_penalty": 1.3, "presence_penalty": -0.8, "frequency_penalty": 1.1},
    {},
]


def documented_logits(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]
                      ) -> torch.Tensor:
    """The formulas of the module docstring, one token at a time, in float64."""
    result = logits.double().clone()
    seen = set(prompt) | set(output)
    for token in range(result.numel()):
        value = float(result[token])
        if token in seen:
            r = params.repetition_penalty
            value = value / r if value > 0 else value * r
        count = output.count(token)
        value -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
        result[token] = value
    return result


def test_penalties_give_the_documented_logits() -> None:
    """One mixed batch, a row per combination (presence alone, frequency alone, both, repetition, all three
    with a negative presence, none): every processed logit is the formula's; repetition is transformers'."""
    logits = (2 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))).clamp(-4.0, 2.4)
    # Penalized tokens of both signs, one exactly 0; token 5 (prompt only) leads token 30 (never seen) narrowly,
    # so a frequency or presence penalty that reached prompt tokens would change the greedy token too.
    logits[[5, 30, 9, 40, 7, 12, 21, 3]] = torch.tensor([3.0, 2.6, 2.5, -1.5, 1.0, -2.0, 0.0, 0.5])
    params = [SamplingParams(temperature=0, **penalty) for penalty in PENALTIES]
    rows = [scheduled(i, p, 0, PROMPT, OUTPUT) for i, p in enumerate(params)]
    sampler = Sampler(torch.device("cpu"), seed=0, eos_token_ids=())
    batch = logits.expand(len(rows), -1).contiguous()
    processed = sampler.processed_logits(batch, rows)
    for row, p in enumerate(params):
        expected = documented_logits(logits, p, PROMPT, OUTPUT)
        torch.testing.assert_close(processed[row].double(), expected, rtol=0, atol=1e-5,  # float32 rounding
                                   msg=lambda m, penalty=PENALTIES[row]: f"{penalty}: {m}")
    repetition = RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([PROMPT + OUTPUT]), logits.reshape(1, -1))
    assert torch.equal(processed[3], repetition[0])
    assert torch.equal(processed[5], logits)  # no penalty: untouched
    # Greedy rows pick from exactly these logits.
    picked = [t.token_id for t in sampler(batch, rows)]
    assert picked == [int(documented_logits(logits, p, PROMPT, OUTPUT).argmax()) for p in params]
    assert picked[0] == picked[1] == picked[2] == picked[5] == 5  # presence, frequency: not on the prompt


@pytest.fixture(scope="module")
def mild_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mild_checkpoint(tmp_path_factory.mktemp("mild-penalties") / "llama")


def test_penalized_greedy_decoding_follows_the_formula_end_to_end(mild_dir: Path) -> None:
    """Greedy decoding with each penalty, all in one batch, against a decoding loop written here from
    transformers' logits and the formula; on a model with mild logits, where penalties change tokens."""
    prompt = [71, 294, 436, 413, 394, 35, 133, 63]
    combos: list[dict[str, float]] = [
        {"presence_penalty": 1.5}, {"frequency_penalty": 0.9}, {"presence_penalty": 0.6, "frequency_penalty": 0.6},
        {"repetition_penalty": 1.7}, {"repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.4}]
    steps = 16  # enough for output tokens to repeat, so presence and frequency matter
    params = [SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, **c) for c in combos]
    llm = LLM(model=str(mild_dir), seed=0, dtype="float32")
    outputs = llm.generate([{"prompt_token_ids": prompt}] * len(params), params, use_tqdm=False)
    plain = hf_greedy(mild_dir, prompt, steps)
    for combo, p, out in zip(combos, params, outputs):
        output: list[int] = []
        for _ in range(steps):
            scores = documented_logits(hf_logits(mild_dir, prompt + output)[-1], p, prompt, output)
            output.append(int(scores.argmax()))
        assert out.outputs[0].token_ids == output, combo
        assert output != plain, combo  # the penalty changed the decoding
    assert llm.get_metrics()["kv_blocks_used"] == 0


def test_min_tokens_holds_back_eos_and_stop_tokens_with_eos_not_ignored(tmp_path: Path) -> None:
    """An EOS-rich model: EOS is the token it generates first (and often), the stop token the first one it
    generates with EOS held back. Under ``min_tokens`` neither comes before then, and the tokens are
    transformers' generate() with ``min_new_tokens``; a request beside it without ``min_tokens`` stops at once."""
    prompt = [17, 250, 33, 401, 96, 8]
    free = hf_greedy(make_checkpoint(tmp_path / "free", "llama-tied", seed=4), prompt, 40)
    eos = free[0]
    model_dir = make_checkpoint(tmp_path / "eos-rich", "llama-tied", seed=4, eos_token_id=eos)  # same weights
    stop = transformers_generate(model_dir, prompt, 1, 1, [eos])[0]
    assert free.count(eos) >= 5 and stop != eos
    min_tokens, max_tokens = 8, 30
    held = SamplingParams(temperature=0, min_tokens=min_tokens, max_tokens=max_tokens, stop_token_ids=[stop])
    sampled = SamplingParams(n=4, temperature=1.0, seed=5, min_tokens=min_tokens, max_tokens=min_tokens + 2,
                             stop_token_ids=[stop])
    free_params = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=[stop])
    llm = LLM(model=str(model_dir), seed=0, dtype="float32")  # float32 on a GPU too: compared with transformers
    outs = llm.generate([{"prompt_token_ids": prompt}] * 3, [held, sampled, free_params], use_tqdm=False)
    tokens = outs[0].outputs[0].token_ids
    assert eos not in tokens[:min_tokens] and stop not in tokens[:min_tokens]
    assert tokens == transformers_generate(model_dir, prompt, min_tokens, max_tokens, [eos, stop])
    for sample in outs[1].outputs:
        assert len(sample.token_ids) >= min_tokens and not {eos, stop} & set(sample.token_ids[:min_tokens])
    assert outs[2].outputs[0].token_ids == [eos] and outs[2].outputs[0].finish_reason == "stop"  # unmasked
    assert llm.get_metrics()["kv_blocks_used"] == 0


def transformers_generate(model_dir: Path, prompt: list[int], min_new_tokens: int, max_new_tokens: int,
                          eos_token_ids: list[int]) -> list[int]:
    model = _load_hf_model(*_config_stamp(model_dir))
    config = GenerationConfig(do_sample=False, min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_ids, pad_token_id=0)
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),  # type: ignore[operator]
                                generation_config=config)
    return output[0, len(prompt):].tolist()
