"""Sampling a token per row in one pass over the logits (Gumbel-max), on the GPU.

Drawing from ``softmax(logits / T)`` is the same as taking
``argmax(logits / T + G)`` where the ``G`` are independent standard Gumbel
variables (``-log(-log(U))`` for uniform ``U``). The torch path in
:mod:`kvpage.worker.sampler` normalizes, draws a noise tensor and divides:
about ten passes over a ``[rows, vocab]`` float32 array, which at 256 rows of
a 152k vocabulary is 0.6 ms of an H200's memory bandwidth each step. This
kernel reads the logits once and makes its noise in registers (Philox, keyed
by one 63-bit seed per row), so a row's draw depends only on its seed: a
request with a seed gets the same tokens whatever it is batched with.

It serves plain temperature sampling; top-k, top-p and min-p rows use the
torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gumbel_max_sample", "mix_seed"]

MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby inputs give unrelated Philox keys."""
    x = 0x2545F4914F6CDD1D
    for part in parts:
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & MASK63


@triton.jit
def _gumbel_max_kernel(logits_ptr, stride_row, temperature_ptr, seed_ptr, best_ptr, best_index_ptr, vocab,
                       num_chunks, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Program (row, chunk): the best Gumbel-perturbed score of columns ``chunk * CHUNK ...`` of the row."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inverse_temperature = 1.0 / tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, vocab), BLOCK):
        cols = start + lanes
        mask = cols < vocab
        logits = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        uniform = tl.rand(seed, cols)  # [0, 1): 0 gives -inf, never chosen
        score = logits * inverse_temperature - tl.log(-tl.log(uniform))
        score = tl.where(mask, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_index = tl.where(better, cols, best_index)
    top = tl.max(best, axis=0)
    # Of lanes tied at the top, the smallest vocabulary index (ties have probability ~0 but stay deterministic).
    tl.store(best_ptr + row * num_chunks + chunk, top)
    tl.store(best_index_ptr + row * num_chunks + chunk, tl.min(tl.where(best == top, best_index, vocab), axis=0))


@triton.jit
def _pick_kernel(best_ptr, best_index_ptr, out_ptr, num_chunks, BLOCK: tl.constexpr):
    """The row's winner over its chunks (the first chunk among ties: the smallest index)."""
    row = tl.program_id(0)
    chunks = tl.arange(0, BLOCK)
    mask = chunks < num_chunks
    best = tl.load(best_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
    top = tl.max(best, axis=0)
    first = tl.min(tl.where((best == top) & mask, chunks, BLOCK), axis=0)
    tl.store(out_ptr + row, tl.load(best_index_ptr + row * num_chunks + first).to(tl.int64))


CHUNK = 8192  # vocabulary columns per program: a 152k vocabulary gives 19 programs a row


def gumbel_max_sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token id per row of ``logits [rows, vocab]`` (any float dtype) drawn from ``softmax(logits / T)``.

    ``temperatures`` (float32, > 0) and ``seeds`` (int64, 63-bit) have one entry per row, on the logits' device.
    Each row's vocabulary is cut into chunks scanned by separate programs, so even a small batch keeps
    enough programs in flight to read the logits at memory speed; a second pass picks each row's winner.
    """
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows:
        num_chunks = triton.cdiv(vocab, CHUNK)
        best = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
        best_index = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
        _gumbel_max_kernel[(rows, num_chunks)](logits, logits.stride(0), temperatures, seeds, best, best_index,
                                               vocab, num_chunks, BLOCK=1024, CHUNK=CHUNK, num_warps=4)
        _pick_kernel[(rows,)](best, best_index, out, num_chunks, BLOCK=max(16, triton.next_power_of_2(num_chunks)))
    return out
