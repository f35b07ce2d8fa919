"""Beam search on shared pages equals transformers' ``generate(num_beams=...)``, and frees what it prunes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvpage import LLM, SamplingParams
from tests.checkpoints import hf_greedy, make_checkpoint

VOCAB = 512
MAX_NEW = 10


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A random checkpoint whose EOS is a token it readily produces, so beams finish at different lengths."""
    root = tmp_path_factory.mktemp("beam")
    probe = make_checkpoint(root / "probe", "llama", seed=11, vocab_size=VOCAB)
    eos = hf_greedy(probe, prompts()[0], 12)[2]
    return make_checkpoint(root / "eos", "llama", seed=11, vocab_size=VOCAB, eos_token_id=eos), eos


def prompts() -> list[list[int]]:
    rng = random.Random(8)
    base = [rng.randrange(3, VOCAB) for _ in range(40)]
    return [base, base[:17], base[5:33], [rng.randrange(3, VOCAB) for _ in range(23)]]


def hf_beams(model_dir: Path, eos: int, prompt: list[int], width: int, n: int, length_penalty: float,
             early_stopping: bool | str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             num_beams=width, num_return_sequences=n, length_penalty=length_penalty,
                             early_stopping=early_stopping, max_new_tokens=MAX_NEW, do_sample=False)
    beams = []
    for row in out.tolist():
        generated = row[len(prompt):]
        beams.append(generated[: generated.index(eos) + 1] if eos in generated else generated)
    return beams


@pytest.mark.parametrize(("width", "n", "length_penalty", "early_stopping"), [
    (2, 1, 1.0, False), (4, 2, 1.0, False), (4, 4, 0.5, True), (3, 2, 2.0, "never"), (6, 3, -1.0, False)])
def test_beam_search_matches_transformers(eos_model: tuple[Path, int], width: int, n: int,
                                          length_penalty: float, early_stopping: bool | str) -> None:
    model_dir, eos = eos_model
    llm = LLM(model=str(model_dir), block_size=4)
    params = SamplingParams(n=n, use_beam_search=True, beam_width=width, length_penalty=length_penalty,
                            early_stopping=early_stopping, max_tokens=MAX_NEW, temperature=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)  # all at once
    for prompt, out in zip(prompts(), outputs):
        ours = [c.token_ids for c in out.outputs]
        assert ours == hf_beams(model_dir, eos, prompt, width, n, length_penalty, early_stopping)
        for c in out.outputs:
            assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
    assert llm.engine.kv.num_pages_in_use == 0


def test_beams_of_different_lengths_occur(eos_model: tuple[Path, int]) -> None:
    """The case above only means something if beams end by EOS at various lengths and by length."""
    model_dir, _ = eos_model
    llm = LLM(model=str(model_dir), block_size=4)
    params = SamplingParams(n=4, use_beam_search=True, beam_width=4, max_tokens=MAX_NEW, temperature=0,
                            length_penalty=0.5, early_stopping=True)
    reasons = {(len(c.token_ids), c.finish_reason) for out in llm.generate(
        [{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False) for c in out.outputs}
    assert {r for _, r in reasons} == {"stop", "length"} and len({n for n, _ in reasons}) >= 2


@pytest.mark.parametrize(("mode", "num_kv_blocks", "swap_space"), [
    ("recompute", 40, 0.0), ("swap", 40, 0.01),
    # Extreme pressure: the longest beam alone needs 13 of the 13 pages, four searches compete,
    # and swap space holds a few pages only. Searches must still all finish, and equal transformers'.
    ("recompute", 13, 0.0), ("swap", 13, 0.0002)])
def test_beam_search_under_preemption_and_swap(eos_model: tuple[Path, int], mode: str, num_kv_blocks: int,
                                               swap_space: float) -> None:
    model_dir, eos = eos_model
    expected = [hf_beams(model_dir, eos, p, 4, 2, 1.0, False) for p in prompts()]
    llm = LLM(model=str(model_dir), block_size=4, num_kv_blocks=num_kv_blocks, headroom_policy="none",
              preemption_mode=mode, swap_space=swap_space)
    params = SamplingParams(n=2, use_beam_search=True, beam_width=4, max_tokens=MAX_NEW, temperature=0)
    engine = llm.engine
    for i, prompt in enumerate(prompts()):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    finished = {}
    for _ in range(2000):  # bounded: a livelock fails here instead of hanging
        finished.update({out.request_id: out for out in engine.step() if out.finished})
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), "beam searches preempt each other without end"
    assert [[c.token_ids for c in finished[str(i)].outputs] for i in range(len(expected))] == expected
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > 0
    assert (metrics["num_swapped_out"] > 0) == (mode == "swap")
    assert llm.engine.kv.num_pages_in_use == 0


def test_beams_share_pages_and_pruned_beams_free_theirs(eos_model: tuple[Path, int]) -> None:
    model_dir, _ = eos_model
    llm = LLM(model=str(model_dir), block_size=4)
    engine = llm.engine
    params = SamplingParams(use_beam_search=True, beam_width=4, max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    engine.add_request("b", {"prompt_token_ids": prompts()[0]}, params)
    while engine.has_unfinished_requests():
        engine.step()
        live = [s for s in engine.scheduler.running if s.request.request_id == "b"]
        assert len(live) <= 4  # pruned beams leave at once
        waste = engine.scheduler.kv_waste()
        if len(live) == 4:  # four beams over a shared 40-token prompt: far fewer pages than four copies
            assert waste.pages_in_use < waste.pages_without_sharing
    assert engine.kv.num_pages_in_use == 0 and engine.get_metrics()["kv_sharing_saving_mean"] > 0.3


def test_beam_search_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="beam_width must be an integer >= n"):
        SamplingParams(n=3, use_beam_search=True, beam_width=2, max_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="temperature must be 0.0 with use_beam_search"):
        SamplingParams(use_beam_search=True, max_tokens=4)
    with pytest.raises(ValueError, match="stop must be None with use_beam_search"):
        SamplingParams(use_beam_search=True, max_tokens=4, temperature=0, stop=["x"])
    with pytest.raises(ValueError, match="early_stopping"):
        SamplingParams(use_beam_search=True, max_tokens=4, temperature=0, early_stopping="sometimes")
    with pytest.raises(ValueError, match="beam_width must be None unless use_beam_search"):
        SamplingParams(beam_width=3)
