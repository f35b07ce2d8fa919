"""Preemption: whom to preempt, and whether to recompute its K/V later or swap it to host memory (pure Python).

**The victim** is the running sequence that ranks last: the lowest
priority, then the request admitted last (requests keep their first
admission rank through preemptions, so the oldest always progresses);
within a beam search request, a *parked* beam (one that has given its
next-token candidates and waits for its siblings') goes first.

**Recompute or swap.** Recompute frees the victim's pages and later runs its whole context through
the model again. That costs compute: about ``2 x parameters`` FLOPs a token
for the weights, plus attention, which grows with the square of the context.
Swap copies the victim's pages to host memory and back. That costs transfer
time, ``2 x pages x bytes per page`` over the host link plus a fixed latency
per copy, and host memory.

``preemption_mode="auto"`` picks, victim by victim, whichever this model says
is cheaper: short contexts are cheap to recompute, long ones (and big
models) favour swap.  The rates are rough defaults for the device
(:meth:`SwapCostModel.for_device`); the choice only needs the right order of
magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvpage.kv import KVManager
from kvpage.modes import PreemptionMode
from kvpage.sched.sequence import Request, Sequence


def ranks_before(request: Request, other: Request) -> bool:
    """Whether ``request`` was admitted before ``other`` (both admitted), priority first."""
    if request.admit_rank is None or other.admit_rank is None:
        return False
    return (request.priority, request.admit_rank) < (other.priority, other.admit_rank)


def is_parked(seq: Sequence) -> bool:
    """A beam that has given its next-token candidates and waits for its siblings'.

    It needs no pages until its group advances, so it is not resumed before
    that, and it is the first to yield pages within its request.
    """
    beam = seq.request.beam
    return beam is not None and seq.seq_id in beam.candidates


def choose_victim(running: list[Sequence]) -> Sequence:
    """The running sequence to preempt next: from the request that ranks last, a parked beam if it has one."""
    last = running[-1]
    if last.request.beam is not None:
        for seq in reversed(running):
            if seq.request is not last.request:
                break
            if is_parked(seq):
                return seq
    return last


class SwapPreference(Protocol):
    """Answers ``preemption_mode="auto"``: is swapping this victim cheaper than recomputing it?"""

    def prefer_swap(self, num_tokens: int, num_pages: int) -> bool: ...


def should_swap(mode: PreemptionMode, seq: Sequence, kv: KVManager, cost: SwapPreference | None) -> bool:
    """Whether to try swapping ``seq`` out (a layout that cannot swap answers so, and it recomputes)."""
    if mode == "recompute" or seq.num_computed_tokens == 0:
        return False
    if mode == "swap" or cost is None:
        return True
    return cost.prefer_swap(seq.num_computed_tokens, kv.pages_for_tokens(seq.num_computed_tokens))


@dataclass(frozen=True)
class SwapCostModel:
    flops_per_s: float
    link_bytes_per_s: float
    num_parameters: int
    attention_flops_per_token_pair: float  # 4 x layers x heads x head_dim: QK^T and PV, per (query, key)
    bytes_per_page: int
    swap_latency_s: float = 5e-5  # per direction: launching the copies, a host sync

    @classmethod
    def for_device(cls, device_type: str, num_parameters: int, bytes_per_page: int, num_layers: int,
                   num_heads: int, head_dim: int) -> SwapCostModel:
        # Effective rates, not peaks: bf16 GEMMs at ~40% of an H100 against pinned PCIe copies;
        # a CPU's float32 matmuls against a host memcpy.
        flops, link = (4e14, 2e10) if device_type == "cuda" else (1e11, 5e9)
        return cls(flops, link, num_parameters, 4.0 * num_layers * num_heads * head_dim, bytes_per_page)

    def recompute_s(self, num_tokens: int) -> float:
        causal_pairs = num_tokens * (num_tokens + 1) / 2
        return (2.0 * self.num_parameters * num_tokens + self.attention_flops_per_token_pair * causal_pairs) \
            / self.flops_per_s

    def swap_s(self, num_pages: int) -> float:
        """Out and back in."""
        return 2 * (self.swap_latency_s + num_pages * self.bytes_per_page / self.link_bytes_per_s)

    def prefer_swap(self, num_tokens: int, num_pages: int) -> bool:
        return self.swap_s(num_pages) < self.recompute_s(num_tokens)
