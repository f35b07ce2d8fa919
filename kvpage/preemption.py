"""How to preempt: recompute the victim's K/V later, or swap it out to host memory (pure Python).

Recompute frees the victim's pages and later runs its whole context through
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
