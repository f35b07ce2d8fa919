"""Sampled tokens follow their definition: transformers' warpers in vLLM's order (tests/sampling_reference.py).

Two levels, each in mixed batches where neighbouring rows ask for different settings:

* the torch sampler on fixed logits: many draws, so the test has the power to see small errors;
* the engine end to end, on a checkpoint with a mild logit scale, against transformers' warpers
  applied to transformers' own logits.

The one-pass Triton kernel is checked draw by draw instead (tests/test_sampling_kernel.py).

Each comparison of draws with a reference wrongly fails with probability at most ``FALSE_ALARM``
(1e-8; the module docstring of tests/sampling_reference.py proves it). ``test_the_test_has_power``
shows the same draws refused against the distributions a defect would produce.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpage import LLM, SamplingParams
from kvpage.step_io import ScheduledSequence
from kvpage.worker.sampler import Sampler
from tests.checkpoints import hf_logits
from tests.sampling_reference import disagreement, make_mild_checkpoint, reference_probs, scheduled

# One of each kind of row; every batch below mixes them. Setting 7 keeps other tokens if min-p runs
# after top-p (transformers' generate() order) instead of before it (vLLM's); in setting 8 top-k binds, not min-p.
SETTINGS: list[dict[str, Any]] = [
    {"temperature": 1.0},
    {"temperature": 0.5},
    {"temperature": 1.3},
    {"temperature": 1.0, "top_k": 5},
    {"temperature": 1.3, "top_p": 0.6},
    {"temperature": 0.8, "min_p": 0.2},
    {"temperature": 1.3, "top_k": 12, "top_p": 0.8},
    {"temperature": 1.0, "top_p": 0.7, "min_p": 0.2},
    {"temperature": 1.3, "top_k": 20, "top_p": 0.7, "min_p": 0.05},
    {"temperature": 0.0},
]
DRAWS = 20_000  # per setting, on the torch path
CALLS = 40  # sampler calls they are spread over


def interleaved_rows(settings: list[SamplingParams], draws: int, prompt: list[int]) -> list[ScheduledSequence]:
    """``draws`` rows of each setting, round robin; every fourth round seeded (all ``seed + sample_index`` differ).

    The unseeded rows of a setting are one object: they draw from the shared generator, whatever their id.
    """
    seeded = [replace(params, seed=1_000_003 * (s + 1)) for s, params in enumerate(settings)]
    shared = [scheduled(-1 - s, params, 0, prompt) for s, params in enumerate(settings)]
    rows = []
    for round_ in range(draws):
        for s in range(len(settings)):
            rows.append(scheduled(len(rows), seeded[s], round_, prompt) if round_ % 4 == 1 else shared[s])
    return rows


def failures(draws: dict[int, torch.Tensor], references: dict[int, torch.Tensor], logits: torch.Tensor
             ) -> list[str]:
    found = []
    for s, tokens in draws.items():
        reason = disagreement(tokens, references[s], logits)
        if reason is not None:
            found.append(f"setting {s} {SETTINGS[s]}: {reason}")
    return found


@pytest.fixture(scope="module")
def fixed_logits() -> torch.Tensor:
    return 1.5 * torch.randn(64, generator=torch.Generator().manual_seed(12))


@pytest.fixture(scope="module")
def torch_draws(fixed_logits: torch.Tensor) -> dict[int, torch.Tensor]:
    """DRAWS tokens per setting from the torch sampler: the rows of every setting shuffled into CALLS mixed batches.

    Many batches in random orders, so a defect tied to a place in the batch (its first top-p row, say) hits
    many draws of every setting, and one draw outside a setting's support is enough to fail.
    """
    settings = [SamplingParams(**s) for s in SETTINGS]
    rows = interleaved_rows(settings, DRAWS, prompt=[3, 4])
    sampler = Sampler(torch.device("cpu"), seed=0, eos_token_ids=())
    tokens = torch.empty(len(rows), dtype=torch.long)
    for batch in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).chunk(CALLS):
        batch_rows = [rows[i] for i in batch.tolist()]
        sampled = sampler(fixed_logits.expand(len(batch_rows), -1).contiguous(), batch_rows)
        tokens[batch] = torch.tensor([t.token_id for t in sampled])
    return {s: tokens[s:: len(SETTINGS)] for s in range(len(SETTINGS))}


def test_torch_sampler_draws_follow_transformers_warpers(fixed_logits: torch.Tensor,
                                                         torch_draws: dict[int, torch.Tensor]) -> None:
    references = {s: reference_probs(fixed_logits, SamplingParams(**SETTINGS[s])) for s in range(len(SETTINGS))}
    assert failures(torch_draws, references, fixed_logits) == []


def wrong_references(logits: torch.Tensor) -> list[tuple[int, str, torch.Tensor]]:
    """The distributions of defects, per setting: a temperature 15% off, top-k off by one, top-p or min-p
    skipped, min-p after top-p."""
    wrong = []
    for s, setting in enumerate(SETTINGS):
        params = SamplingParams(**setting)
        if params.is_greedy:
            continue
        if not (params.top_k or params.top_p < 1 or params.min_p):
            for factor in (1.15, 1 / 1.15):
                warmer = replace(params, temperature=params.temperature * factor)
                wrong.append((s, f"temperature x{factor:.2f}", reference_probs(logits, warmer)))
        if params.top_k:
            for k in (params.top_k - 1, params.top_k + 1):
                wrong.append((s, f"top_k={k}", reference_probs(logits, replace(params, top_k=k))))
        if params.top_p < 1:
            wrong.append((s, "top-p skipped", reference_probs(logits, replace(params, top_p=1.0))))
        if params.min_p:
            wrong.append((s, "min-p skipped", reference_probs(logits, replace(params, min_p=0.0))))
        if params.min_p and params.top_p < 1:
            wrong.append((s, "min-p after top-p", reference_probs(logits, params, min_p_last=True)))
    return wrong


def test_the_test_has_power(fixed_logits: torch.Tensor, torch_draws: dict[int, torch.Tensor]) -> None:
    """The very draws that pass are refused against each defect's distribution: the test would see it.

    A defect that leaves a setting's distribution as it is (top-k off by one where top-p cuts deeper)
    changes no draw, so those pairs are skipped; every kind of defect keeps at least one setting.
    """
    checked, missed = set(), []
    for s, what, probs in wrong_references(fixed_logits):
        right = reference_probs(fixed_logits, SamplingParams(**SETTINGS[s]))
        if torch.equal(probs, right):
            continue
        checked.add(what.split("=")[0].split(" x")[0])
        if disagreement(torch_draws[s], probs, fixed_logits) is None:
            missed.append(f"setting {s} vs {what}")
    assert missed == []
    assert checked == {"temperature", "top_k", "top-p skipped", "min-p skipped", "min-p after top-p"}


# ----- end to end -----------------------------------------------------------------------------
PROMPT = [279, 10, 70, 86, 13, 356, 99, 301]  # its likeliest next token is in it: the repetition penalty shows
E2E_DRAWS = 1_000  # per setting
SAMPLES_PER_REQUEST = 100


@pytest.fixture(scope="module")
def mild_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A tiny llama whose logits have a standard deviation near 2 (not peaked), with EOS its likeliest next token
    after PROMPT; returns (directory, EOS, a stop token: the second likeliest)."""
    directory = make_mild_checkpoint(tmp_path_factory.mktemp("mild") / "llama")
    eos, stop = hf_logits(directory, PROMPT)[-1].topk(2).indices.tolist()
    for name in ("config.json", "generation_config.json"):
        path = directory / name
        if not path.exists():
            continue
        config = json.loads(path.read_text())
        config["eos_token_id"] = eos
        path.write_text(json.dumps(config))
    return directory, eos, stop


def settings_key(params: SamplingParams) -> tuple[float, ...]:
    return (params.temperature, params.top_k, params.top_p, params.min_p, params.min_tokens,
            params.repetition_penalty)


def test_engine_draws_follow_transformers_on_transformers_logits(mild_model: tuple[Path, int, int],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first token of many samples of one prompt, per setting, against transformers' processors and
    warpers on transformers' logits. Two more rows: ``min_tokens`` with EOS not ignored (EOS is the
    likeliest token; it and the stop token must never come), and a repetition penalty on the prompt."""
    directory, eos, stop = mild_model
    settings = [SamplingParams(**s, max_tokens=1) for s in SETTINGS] + [
        SamplingParams(temperature=1.0, min_tokens=1, max_tokens=1, stop_token_ids=[stop]),
        SamplingParams(temperature=1.0, repetition_penalty=1.6, max_tokens=1)]
    rounds = E2E_DRAWS // SAMPLES_PER_REQUEST
    # Round robin over the settings, so that every step mixes them; odd rounds seeded.
    requests = [replace(p, n=SAMPLES_PER_REQUEST,
                        seed=1_000_000 * s + SAMPLES_PER_REQUEST * r if r % 2 else None)
                for r in range(rounds) for s, p in enumerate(settings)]
    # Room for every sample at once: one page each (the prompt fits in one); waiting queues of thousands are slow.
    total = len(requests) * SAMPLES_PER_REQUEST
    llm = LLM(model=str(directory), seed=0, dtype="float32", max_num_seqs=total, num_kv_blocks=total + 64)
    sampler = llm.engine.runner.sampler
    batches: list[set[tuple[float, ...]]] = []
    real_sample = sampler.sample

    def spy(logits: torch.Tensor, seqs: list[ScheduledSequence]) -> Any:
        batches.append({settings_key(s.sampling_params) for s in seqs})
        return real_sample(logits, seqs)

    monkeypatch.setattr(sampler, "sample", spy)
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * len(requests), requests, use_tqdm=False)
    assert max(len(b) for b in batches) == len(settings)  # one step sampled every setting at once
    assert llm.get_metrics()["kv_blocks_used"] == 0
    draws: dict[int, list[int]] = {s: [] for s in range(len(settings))}
    for j, out in enumerate(outputs):
        assert [len(c.token_ids) for c in out.outputs] == [1] * SAMPLES_PER_REQUEST
        draws[j % len(settings)] += [c.token_ids[0] for c in out.outputs]
    logits = hf_logits(directory, PROMPT)[-1]
    found = []
    for s, params in enumerate(settings):
        reference = reference_probs(logits, params, prompt=PROMPT, eos_token_ids=[eos])
        reason = disagreement(torch.tensor(draws[s]), reference, logits)
        if reason is not None:
            found.append(f"setting {s} {settings_key(params)}: {reason}")
    assert found == []
    # The two extra rows mean something: without them, the draws would be refused.
    plain = reference_probs(logits, SamplingParams(temperature=1.0))
    assert plain[eos] > 0.05 and disagreement(torch.tensor(draws[len(SETTINGS)]), plain, logits) is not None
    assert disagreement(torch.tensor(draws[len(SETTINGS) + 1]), plain, logits) is not None
