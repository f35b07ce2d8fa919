"""Sampling parameters end to end: seeds, n > 1 sharing, stop conditions, logprobs, penalties."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from kvpage import LLM, SamplingParams
from tests.checkpoints import hf_greedy, hf_logits, make_checkpoint

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("sampling") / "llama", "llama", seed=5, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    # float32 on every device: the test compares logprobs with transformers' float32 ones.
    return LLM(model=str(model_dir), block_size=16, seed=0, dtype="float32")


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM(max_num_seqs=16)


def prompt(seed: int, length: int = 30) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(length)]}


def tokens(llm: LLM, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]


def test_seeded_sampling_reproduces_itself_whatever_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = tokens(llm, [prompt(1)], seeded)[0]
    again = tokens(llm, [prompt(1)], seeded)[0]
    crowd = tokens(llm, [prompt(2), prompt(1), prompt(3)],
                   [SamplingParams(temperature=1.0, max_tokens=25), seeded, SamplingParams(temperature=0.7)])[1]
    assert alone == again == crowd
    other = tokens(llm, [prompt(1)], SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True))[0]
    assert other != alone
    greedy = hf_greedy(Path(llm.engine.model_dir), prompt(1)["prompt_token_ids"], 20)
    assert alone[0] != greedy  # it really sampled


def test_engine_seed_makes_unseeded_sampling_reproducible(model_dir: Path) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = [tokens(LLM(model=str(model_dir), seed=s), [prompt(4), prompt(5)], params) for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_n_samples_share_the_prompt_pages(llm: LLM) -> None:
    engine = llm.engine
    long_prompt = prompt(6, length=200)

    def peak_pages(n: int) -> tuple[int, list[list[int]]]:
        engine.add_request(f"peak-{n}", long_prompt,
                           SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True))
        peak, final = 0, None
        while engine.has_unfinished_requests():
            for out in engine.step():
                final = out
            peak = max(peak, engine.get_metrics()["kv_blocks_used"])
        assert final is not None and final.finished
        return peak, [c.token_ids for c in final.outputs]

    engine.kv.reset_prefix_cache()
    single, _ = peak_pages(1)
    engine.kv.reset_prefix_cache()
    shared, samples = peak_pages(4)
    assert single == -(-(200 + 7) // 16)
    assert shared < 4 * single
    assert shared <= single + 3  # the 12 full prompt pages are shared; each sibling owns its last page
    assert len(samples) == 4 and len({tuple(s) for s in samples}) > 1  # the samples differ


def test_top_k_one_and_tiny_top_p_are_greedy(llm: LLM) -> None:
    greedy = tokens(llm, [prompt(8)], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    top_k = tokens(llm, [prompt(8)], SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True))[0]
    top_p = tokens(llm, [prompt(8)], SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10,
                                                    ignore_eos=True))[0]
    min_p = tokens(llm, [prompt(8)], SamplingParams(temperature=1.0, min_p=1.0, max_tokens=10, ignore_eos=True))[0]
    assert greedy == top_k == top_p == min_p


def test_logprobs_are_the_models_log_softmax(llm: LLM, model_dir: Path) -> None:
    p = prompt(9)["prompt_token_ids"]
    out = llm.generate({"prompt_token_ids": p},
                       SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.logprobs is not None and len(completion.logprobs) == 4
    ref = torch.log_softmax(hf_logits(model_dir, p + completion.token_ids), dim=-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(p) - 1 + step]
        top = row.topk(3)
        assert set(entry) == set(top.indices.tolist()) | {token}
        for tid, lp in entry.items():
            assert lp == pytest.approx(row[tid].item(), abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for t, e in
                                                              zip(completion.token_ids, completion.logprobs)))


def test_repetition_penalty_matches_transformers(llm: LLM, model_dir: Path) -> None:
    p = prompt(10)["prompt_token_ids"]
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=30, repetition_penalty=6.0, eos_token_id=None,
                              pad_token_id=0)
    hf.generation_config = GenerationConfig(pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=config)[0, len(p):].tolist()
    got = tokens(llm, [{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=30,
                                                                 repetition_penalty=6.0, ignore_eos=True))[0][0]
    assert got == expected
    plain = hf_greedy(model_dir, p, 30)
    assert plain != expected  # the penalty changed something


def test_frequency_and_presence_penalties_discourage_repeats(llm: LLM) -> None:
    plain = tokens(llm, [prompt(11)], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0][0]
    penalized = tokens(llm, [prompt(11)], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                        frequency_penalty=2.0, presence_penalty=2.0))[0][0]
    assert len(set(penalized)) >= len(set(plain))
    assert penalized != plain


def test_stop_token_ids_and_min_tokens(llm: LLM, model_dir: Path) -> None:
    p = prompt(12)["prompt_token_ids"]
    free = hf_greedy(model_dir, p, 20)
    stop = free[3]
    first = free.index(stop)
    out = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop],
                                                               ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    held = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop],
                                                                min_tokens=first + 3, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert stop not in held.token_ids[: first + 3]
    assert len(held.token_ids) >= first + 3


def test_stop_strings_cut_the_text(default_llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = default_llm.generate("The paged cache", params, use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 10
    stop = text[6:9]
    cut = text.index(stop)
    out = default_llm.generate("The paged cache", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                                 stop=[stop, "never-seen"]), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.text == text[:cut]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert len(completion.token_ids) < len(full.token_ids)
    kept = default_llm.generate("The paged cache", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                                  stop=stop, include_stop_str_in_output=True),
                                use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: cut + len(stop)]


def test_text_round_trips_through_the_tokenizer(default_llm: LLM) -> None:
    out = default_llm.generate(["Hello", "naïve café ☕"], SamplingParams(temperature=0.8, seed=3, max_tokens=30),
                               use_tqdm=False)
    tok = default_llm.get_tokenizer()
    for o in out:
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_max_tokens_none_runs_to_max_model_len(model_dir: Path) -> None:
    small = LLM(model=str(model_dir), max_model_len=48)
    out = small.generate(prompt(13, length=40), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_diverging_siblings_each_read_their_own_cache(model_dir: Path, block_size: int) -> None:
    """n sampled siblings share the prompt's pages and then diverge: each one's logprobs must be
    what transformers computes for that sibling's own tokens, so no sibling reads another's K/V."""
    llm = LLM(model=str(model_dir), block_size=block_size, seed=0, dtype="float32")
    p = prompt(14, length=37)["prompt_token_ids"]
    out = llm.generate({"prompt_token_ids": p}, SamplingParams(n=4, temperature=1.5, seed=21, max_tokens=12,
                                                               logprobs=0, ignore_eos=True), use_tqdm=False)
    completions = out[0].outputs
    assert len({tuple(c.token_ids) for c in completions}) >= 2  # they diverged (how many depends on the RNG)
    for c in completions:
        ref = torch.log_softmax(hf_logits(model_dir, p + c.token_ids), dim=-1)
        for step, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert entry[token] == pytest.approx(ref[len(p) - 1 + step, token].item(), abs=1e-3)
    assert llm.get_metrics()["kv_blocks_used"] == 0
