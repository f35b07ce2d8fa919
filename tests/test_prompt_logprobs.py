"""Prompt logprobs (``SamplingParams.prompt_logprobs``) against transformers' ``log_softmax``, on the real model.

The oracle is SmolLM2-135M-Instruct in float32 (``real_model``): for each
prompt, ``log_softmax(hf_model(ids).logits.float())`` row ``p`` scores prompt
token ``p + 1``.  Compared at every position: the prompt token's logprob
(relative error < 1e-4), its rank, the top-k alternatives and their ranks,
and the decoded tokens, for a batch of chat-templated and plain prompts, a
request that shares a cached prefix (the prefix-cache rule: it reads none),
and a long prompt prefilled in chunks of 32 tokens beside a decoding
request under asynchronous scheduling, whose perplexity must equal
transformers'.  A scheduler-only test drives recompute preemptions in the
middle of a scored prompt, where no position may be lost or scored twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kvpage import LLM, SamplingParams
from kvpage.config import SchedulerConfig
from kvpage.kv import KVCacheManager
from kvpage.model import demo_model_dir
from kvpage.outputs import Logprob
from kvpage.sched import Request, Scheduler, StepLoop
from kvpage.step_io import PromptLogprobs, SampledToken, SchedulerOutput

# A public-domain-style paragraph written for this test: held-out English prose, about 300 tokens.
PROSE = (
    "The lighthouse keeper kept a ledger of every ship that passed the point, and by the end of his thirtieth "
    "year the ledger filled a shelf. He wrote the names in a careful hand, with the hour, the weather and the "
    "direction of the wind, because his father had done the same and because, as he told the few visitors who "
    "climbed the stairs, a record that nobody reads is still a promise that somebody could. In the winter the "
    "storms came in from the west, and for days the sea was a grey wall that hid the horizon. On those nights "
    "he trimmed the wick every hour and wiped the salt from the glass, and he listened for the horn of any "
    "vessel that had lost its way. Most of the time there was nothing but the wind. Once, when he was young, a "
    "fishing boat ran onto the rocks below the tower, and he went down with a rope and a lantern and brought "
    "three men up the cliff before the tide turned. He never wrote that in the ledger. It was not a ship that "
    "had passed, he said, but one that had stopped, and the book was only for the ones that kept going. When "
    "the light was finally automated, the men from the ministry offered to take the ledgers to a museum in the "
    "city. He agreed, on the condition that they be kept in order and that someone, once a year, would open "
    "the last one and read the final page aloud."
)
SYSTEM = ("You are a patient assistant for a small public library. Answer questions about opening hours, "
          "membership, borrowing rules and events in two sentences or fewer, and say so when you do not know.")


def relative_error_ok(ours: float, reference: float) -> bool:
    """Relative error below 1e-4; below |logprob| 0.05 (a probability near 1) the bound is 5e-6 absolute.

    There a logprob is the small difference of a logit and the log-sum-exp, both about 10 in size, and
    their float32 rounding (an ulp is 1e-6 there) is what differs between two correct implementations.
    """
    return abs(ours - reference) <= 1e-4 * max(abs(reference), 0.05)


@dataclass
class Oracle:
    """transformers' float32 model on the CPU, and its tokenizer."""

    hf_model: Any
    tokenizer: Any


def hf_logprobs(oracle: Any, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log_softmax over the prompt: row p scores token p + 1."""
    with torch.no_grad():
        logits = oracle.hf_model(torch.tensor([ids])).logits.float()
    return torch.log_softmax(logits, dim=-1)[0]


def check_prompt_logprobs(oracle: Any, ids: list[int], prompt_logprobs: Any,
                          k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entry of vLLM's shape equals transformers' at its position.

    Returns the prompt tokens' logprobs, kvpage's and transformers'.

    ``oracle``: the ``real_model`` fixture, or an :class:`Oracle`.
    """
    reference = hf_logprobs(oracle, ids)
    decode = oracle.tokenizer.decode
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    chosen = []
    for i in range(1, len(ids)):
        entry, row, token = prompt_logprobs[i], reference[i - 1], ids[i]
        assert next(iter(entry)) == token, f"position {i}: the prompt token comes first"
        for tid, lp in entry.items():
            assert isinstance(lp, Logprob) and lp.logprob == float(lp)
            assert relative_error_ok(lp.logprob, row[tid].item()), (i, tid, lp.logprob, row[tid].item())
            assert lp.decoded_token == decode([tid])
        # The prompt token's rank: 1 + the tokens more likely (a near-tie with it may go either way).
        value, others = row[token].item(), torch.cat([row[:token], row[token + 1:]])
        tie = 5e-5
        lowest, highest = 1 + int((others > value + tie).sum()), 1 + int((others > value - tie).sum())
        assert lowest <= entry[token].rank <= highest, (i, entry[token].rank, lowest, highest)
        # The k alternatives: ranks 1..k, best first, each among transformers' k most likely.
        top = sorted((lp.rank, tid) for tid, lp in entry.items() if lp.rank <= k)
        assert [rank for rank, _ in top] == list(range(1, k + 1)), (i, top)
        assert len(entry) == k + (token not in {tid for _, tid in top})
        if k:
            kth_best = row.topk(k).values[-1].item()
            assert all(row[tid].item() >= kth_best - tie for _, tid in top), (i, top)
        chosen.append(entry[token].logprob)
    expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].double()
    return torch.tensor(chosen, dtype=torch.float64), expected


@pytest.fixture(scope="module")
def llm(real_model: Any) -> LLM:
    return LLM(model=str(real_model.hf_dir), device="cpu", max_model_len=1024, seed=0)


def chat_ids(real_model: Any, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    text = real_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(real_model.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_batched_prompts_equal_transformers(real_model: Any, llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seven rows per LM-head slice, so that the step's rows are projected in several slices.
    monkeypatch.setattr("kvpage.worker.prompt_logprobs.MAX_LOGITS_ELEMENTS", 7 * real_model.hf_model.config.vocab_size)
    tokenizer = real_model.tokenizer
    prompts = [chat_ids(real_model, "When does the library open on Sundays?"),
               list(tokenizer("The capital of France is Paris, and the capital of Spain is")["input_ids"]),
               chat_ids(real_model, "Can I renew a book online?"),
               list(tokenizer("Water boils at one hundred degrees")["input_ids"])]
    ks = [0, 1, 4, 2]
    params = [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k) for k in ks]
    params[2] = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=2, prompt_logprobs=4)  # one list, not two
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    for ids, k, output in zip(prompts, ks, outputs):
        check_prompt_logprobs(real_model, ids, output.prompt_logprobs, k)
    assert len(outputs[2].outputs) == 2
    unasked = llm.generate({"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert unasked.prompt_logprobs is None
    assert llm.engine.kv.usage().num_pages_used == 0


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(real_model: Any, llm: LLM) -> None:
    first = chat_ids(real_model, "Is there a fee for a library card?")
    second = chat_ids(real_model, "How many books may I borrow at once?")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 32  # the system prompt: two cached pages of 16 tokens at least
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=1)
    llm.generate({"prompt_token_ids": first}, greedy, use_tqdm=False)  # fills the cache with the prefix
    before = engine.get_metrics()
    scored = llm.generate({"prompt_token_ids": second}, SamplingParams(temperature=0, max_tokens=1,
                                                                       prompt_logprobs=3), use_tqdm=False)[0]
    after = engine.get_metrics()
    # The rule: a request with prompt positions to score neither reads nor queries the prefix cache.
    assert scored.num_cached_tokens == 0
    assert after["prefix_cache_hits"] == before["prefix_cache_hits"]
    assert after["prefix_cache_queries"] == before["prefix_cache_queries"]
    assert after["num_prompt_tokens_computed"] - before["num_prompt_tokens_computed"] == len(second)
    check_prompt_logprobs(real_model, second, scored.prompt_logprobs, 3)
    # The prefix was there to read: the same prompt without prompt logprobs hits it.
    plain = llm.generate({"prompt_token_ids": second}, greedy, use_tqdm=False)[0]
    assert plain.num_cached_tokens >= 32
    assert engine.get_metrics()["prefix_cache_hits"] - after["prefix_cache_hits"] >= 32


def test_chunked_prefill_and_perplexity_equal_transformers(real_model: Any) -> None:
    ids = list(real_model.tokenizer(PROSE)["input_ids"])
    assert 250 <= len(ids) <= 400
    llm = LLM(model=str(real_model.hf_dir), device="cpu", max_model_len=1024, seed=0, max_num_batched_tokens=32,
              async_scheduling=True)
    # A short request decodes beside the long prompt's chunks, so they sit at varying rows of the batch.
    short = {"prompt_token_ids": ids[:9]}
    outputs = llm.generate([short, {"prompt_token_ids": ids}],
                           [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                            SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)], use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 12
    ours, reference = check_prompt_logprobs(real_model, ids, outputs[1].prompt_logprobs, 2)
    perplexity, hf_perplexity = torch.exp(-ours.mean()).item(), torch.exp(-reference.mean()).item()
    assert abs(perplexity - hf_perplexity) <= 1e-4 * hf_perplexity, (perplexity, hf_perplexity)
    assert llm.engine.kv.usage().num_pages_used == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_one_token_chunks_beside_decodes_on_each_device(device: str) -> None:
    """The demo model in float32, four decodes plus one prompt token a step: decode-shaped steps with a scored row.

    On CUDA these steps replay the decode CUDA graphs, with the Triton kernels and asynchronous scheduling
    (the engine's defaults there); on the CPU they run eagerly, asynchronous scheduling forced on.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    oracle = Oracle(AutoModelForCausalLM.from_pretrained(str(demo_model_dir()), dtype=torch.float32).eval(),
                    AutoTokenizer.from_pretrained(str(demo_model_dir())))
    llm = LLM(device=device, dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=5,
              async_scheduling=True, seed=0)
    ids = list(oracle.tokenizer(PROSE)["input_ids"])[:70]
    decoders = [{"prompt_token_ids": ids[i: i + 3]} for i in range(0, 12, 3)]
    outputs = llm.generate(decoders + [{"prompt_token_ids": ids}, {"prompt_token_ids": ids[20:50]}],
                           [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 4
                           + [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3),
                              SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=3, prompt_logprobs=0)],
                           use_tqdm=False)
    check_prompt_logprobs(oracle, ids, outputs[4].prompt_logprobs, 3)
    check_prompt_logprobs(oracle, ids[20:50], outputs[5].prompt_logprobs, 0)
    assert llm.engine.kv.usage().num_pages_used == 0


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "2"])
def test_prompt_logprobs_is_validated(value: Any) -> None:
    with pytest.raises(ValueError, match=r"prompt_logprobs must be None or an integer in \[0, 20\], got "):
        SamplingParams(prompt_logprobs=value)


class ScoringExecutor:
    """A fake device that logs each launched step, scores prompt position p as logprob -p and samples token 7."""

    def __init__(self) -> None:
        self.launched: list[SchedulerOutput] = []

    def launch(self, out: SchedulerOutput, previous: SchedulerOutput | None) -> SchedulerOutput:
        self.launched.append(out)
        return out

    def wait(self, out: SchedulerOutput) -> list[SampledToken]:
        for seq in out.sequences:
            positions = seq.prompt_logprob_positions
            if positions:
                seq.prompt_logprobs = PromptLogprobs(positions, [-float(p) for p in positions], [1] * len(positions),
                                                     [[7]] * len(positions), [[-0.5]] * len(positions))
        return [SampledToken(7) for seq in out.sequences if seq.sample]


@pytest.mark.parametrize("overlap", [False, True])
def test_recompute_after_preemption_scores_every_position_once(overlap: bool) -> None:
    """A scored prompt is preempted mid-prefill (its full pages stay cached): it recomputes from position 0,
    and each prompt position is scored once, in order, in the synchronous and the asynchronous step orders."""
    kv = KVCacheManager(12, 4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8, preemption_mode="recompute"), kv, 256,
                      eos_token_ids=(2,))
    sched.add_request(Request("decoder", None, list(range(100, 120)), SamplingParams(max_tokens=24, ignore_eos=True),
                              arrival_time=0.0))
    scored = Request("scored", None, list(range(10, 40)), SamplingParams(max_tokens=2, prompt_logprobs=1),
                     arrival_time=1.0)
    sched.add_request(scored)
    executor = ScoringExecutor()
    loop: StepLoop[SchedulerOutput, None] = StepLoop(sched, executor, overlap, lambda out, touched: [])
    while loop.has_unfinished() and len(executor.launched) < 500:
        loop.step()
    assert scored.is_finished and kv.usage().num_pages_used == 0
    seq_id = scored.sequences[0].seq_id
    scored_so_far, restarts, restarting = 0, [], False
    for out in executor.launched:
        for s in out.sequences:
            if s.seq_id != seq_id:
                continue
            if restarting:  # the first chunk after a preemption: no prefix-cache hit, though its pages are cached
                assert s.start_position == 0
                restarting = False
            if s.prompt_logprob_positions:
                # Each chunk scores the positions right after those already scored.
                assert s.prompt_logprob_positions.start == scored_so_far
                scored_so_far = s.prompt_logprob_positions.stop
        if seq_id in out.preempted_seq_ids and scored_so_far < 29:
            restarts.append(scored_so_far)
            restarting = True
    assert restarts and 0 < restarts[0] < 29  # it really was preempted with positions left to score
    assert scored.prompt_scores is not None and scored.prompt_scores.positions == range(29)
    assert scored.prompt_scores.token_logprobs == [-float(p) for p in range(29)]
