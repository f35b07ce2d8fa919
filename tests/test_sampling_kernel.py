"""The one-pass kernel draws exactly ``argmax(logits / T + Gumbel noise)`` of its own uniforms.

By the Gumbel-max theorem that token follows ``softmax(logits / T)`` whenever the uniforms are
i.i.d. U(0, 1) (Triton's Philox). Counting draws would need thousands of rows, and Triton's CPU
interpreter runs a row in about 25 ms; so these tests recompute every draw instead: a test kernel
reads the very uniforms ``tl.rand(seed, column)`` that the sampling kernel draws, and torch takes
the argmax. No false alarm is possible, and an error in a row's temperature or seed, in the
columns read or in the reduction over chunks changes some token. Then the kernel through the
sampler, in a batch that mixes its rows with greedy and filtered (torch path) rows: each row
follows its own rule, and a seeded row draws the same token in any batch.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from kvpage import SamplingParams
from kvpage.ops.triton_sampling import CHUNK, gumbel_max_sample, mix_seed
from kvpage.worker.sampler import Sampler
from tests.sampling_reference import scheduled

# Compiled kernels on a GPU, Triton's interpreter on a CPU (conftest sets TRITON_INTERPRET there).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _uniforms_kernel(seed_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * vocab + cols, tl.rand(tl.load(seed_ptr + row), cols), mask=cols < vocab)


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The kernel's draw recomputed: its uniforms per (seed, column), its float32 score, the argmax."""
    rows, vocab = logits.shape
    uniforms = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    _uniforms_kernel[(rows,)](seeds, uniforms, vocab, BLOCK=triton.next_power_of_2(vocab))
    scores = logits.float() * (1.0 / temperatures.float()).unsqueeze(1) - torch.log(-torch.log(uniforms))
    return scores.argmax(dim=-1)


def test_kernel_draws_are_the_gumbel_argmax_of_its_uniforms() -> None:
    """Every row its own temperature, seed and logits; one row spans two chunks of the vocabulary."""
    generator = torch.Generator().manual_seed(2)
    rows, vocab = 40, 16
    logits = (1.5 * torch.randn(rows, vocab, generator=generator)).to(DEVICE)
    temperatures = torch.linspace(0.25, 2.0, rows, device=DEVICE)
    seeds = torch.tensor([mix_seed(17, row) for row in range(rows)], device=DEVICE)
    tokens = gumbel_max_sample(logits, temperatures, seeds)
    assert tokens.tolist() == gumbel_argmax(logits, temperatures, seeds).tolist()
    assert len(set(tokens.tolist())) > 5  # the noise matters: not the argmax of every row
    # Two chunks: the winner of the whole row, not of its first chunk.
    wide = (4.0 + 0.01 * torch.randn(2, CHUNK + 40, generator=generator)).to(DEVICE)
    wide_temperatures = torch.tensor([0.5, 1.5], device=DEVICE)
    wide_seeds = torch.tensor([mix_seed(3), mix_seed(4)], device=DEVICE)
    assert (gumbel_max_sample(wide, wide_temperatures, wide_seeds).tolist()
            == gumbel_argmax(wide, wide_temperatures, wide_seeds).tolist())


def test_the_sampler_gives_each_row_its_own_rule_on_kernels() -> None:
    """Plain temperature rows (each its own temperature) draw on the kernel, keyed by seed, sample index and
    position; greedy rows take the argmax; top-k and min-p rows take the torch path beside them. A seeded
    row alone, or in a batch of another mix, draws the same token."""
    logits = (1.5 * torch.randn(16, generator=torch.Generator().manual_seed(5))).to(DEVICE)
    prompt = [3, 4, 5]
    plain = [SamplingParams(temperature=t, seed=100 + i) for i, t in enumerate((0.3, 0.6, 0.9, 1.2, 1.5, 1.8))]
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=3, seed=7),
              SamplingParams(temperature=0.7, min_p=0.3, seed=8), SamplingParams(temperature=1.0)]
    settings = plain + others
    rows = [scheduled(i, params, sample_index=i % 3, prompt=prompt) for i, params in enumerate(settings * 2)]
    rows = [replace(row, sampling_params=replace(row.sampling_params, seed=row.sampling_params.seed + 1000))
            if i >= len(settings) and row.sampling_params.seed is not None else row for i, row in enumerate(rows)]
    sampler = Sampler(DEVICE, seed=0, eos_token_ids=(), use_kernels=True)
    assert [sampler.rule(p) for p in settings] == ["one_pass"] * 6 + ["greedy", "filtered", "filtered", "one_pass"]
    batch = logits.expand(len(rows), -1).contiguous()
    tokens = [t.token_id for t in sampler(batch, rows)]

    kernel_rows = [i for i, row in enumerate(rows) if sampler.rule(row.sampling_params) == "one_pass"
                   and row.sampling_params.seed is not None]
    position = len(prompt)  # the position of the token sampled
    seeds = torch.tensor([mix_seed(rows[i].sampling_params.seed, rows[i].sample_index, position)
                          for i in kernel_rows], device=DEVICE)
    temperatures = torch.tensor([rows[i].sampling_params.temperature for i in kernel_rows], device=DEVICE)
    expected = gumbel_argmax(logits.expand(len(kernel_rows), -1), temperatures, seeds).tolist()
    assert [tokens[i] for i in kernel_rows] == expected
    for i, row in enumerate(rows):
        params = row.sampling_params
        if params.is_greedy:
            assert tokens[i] == int(logits.argmax())
        elif params.top_k:
            assert tokens[i] in logits.topk(params.top_k).indices.tolist()
        elif params.min_p:
            assert logits[tokens[i]] / params.temperature >= logits.max() / params.temperature + torch.log(
                torch.tensor(params.min_p, device=DEVICE))
    for i, row in enumerate(rows):
        if row.sampling_params.seed is not None:
            alone = Sampler(DEVICE, seed=1, eos_token_ids=(), use_kernels=True)
            assert alone(logits.reshape(1, -1), [row])[0].token_id == tokens[i], row.sampling_params
    assert sampler._num_kernel_draws == 1  # one kernel launch for the plain rows of the mixed batch
