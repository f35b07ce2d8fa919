"""How long a model step takes: the planner's stand-in for the forward pass (pure Python).

A step is summarised by its :class:`StepShape`: sequences, tokens computed,
sequences sampled, K/V tokens read by attention, query-key pairs attended,
and bytes swapped.  Two models turn a shape into seconds:

:class:`PhysicsCostModel`
    From the hardware's peak FLOP/s and memory bandwidth (presets for H100,
    H200, A100 and a CPU) and the model's shape: a step costs the larger of
    its FLOPs over the peak (``2 x parameters`` a token plus attention) and
    its bytes over the bandwidth (the weights once, plus the K/V read, in
    the bytes a token of the KV format takes: ``kv_cache_dtype``),
    each at an achievable fraction of the peak, plus a fixed host overhead
    a step and a sequence, plus swap traffic over the host link.  Under
    tensor parallelism (``tensor_parallel_size``) each rank computes and
    reads its share (its weights, its KV heads) and a step adds its
    collectives over the ranks' :class:`Link`: two all-reduces a layer and
    one for the embedding, of the step's hidden states, and the logits'
    all-gather, each a latency plus a ring's bytes over the bandwidth.

:class:`CalibratedCostModel`
    A linear fit, with non-negative coefficients, of step times measured on
    the real engine (``kvpage bench --calibrate``), saved as a small JSON
    file that ``kvpage plan --cost-model FILE`` loads.  A calibration of a
    tensor-parallel engine has its collectives in its coefficients, and
    stands for that rank count only; its K/V term was measured in one KV
    format (``kv_cache_dtype``), and it times that one only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from kvpage.kv.format import kv_format
from kvpage.modes import KVCacheDtype

FEATURES = ("num_seqs", "num_prefill_seqs", "num_tokens", "num_sampled", "kv_tokens_read", "padded_kv_tokens",
            "attention_pairs")


class StepShape(NamedTuple):  # a tuple: the planner makes one every virtual step, cheaper than a frozen dataclass
    num_seqs: int
    num_prefill_seqs: int  # sequences computing more than one token (prefill chunks)
    num_tokens: int  # every token computed, prefill and decode
    num_sampled: int
    kv_tokens_read: int  # per sequence, its context after the step; summed
    # Decode sequences x the longest decode context: what attention costs when it pads
    # the batch to its longest sequence (the reference CPU path does).
    padded_kv_tokens: int
    attention_pairs: int  # (query, key) pairs the causal attention computes
    swap_bytes: int = 0

    def features(self) -> tuple[float, ...]:
        """1 (the intercept), then the FEATURES, in order: the fields before ``swap_bytes``."""
        return (1.0, *map(float, self[:-1]))


if StepShape._fields[:-1] != FEATURES:
    raise RuntimeError("StepShape's fields must start with FEATURES, in order")  # features() relies on it


# Seconds of one decode step of a fixed batch, given (K/V tokens read, padded K/V tokens): StepCost.decode_step.
DecodeTimer = Callable[[int, int], float]


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a model step depends on, read from a Hugging Face config.json."""

    num_parameters: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    hidden_size: int = 0  # what an all-reduce of tensor parallelism moves a token
    vocab_size: int = 0  # what the logits' all-gather moves a sampled row
    intermediate_size: int = 0

    @property
    def kv_bytes_per_token(self) -> int:
        """K/V bytes a token in the model's dtype, over all KV heads."""
        return self.kv_bytes_per_token_per_rank(1)

    def kv_bytes_per_token_per_rank(self, tensor_parallel_size: int, kv_cache_dtype: KVCacheDtype = "auto") -> int:
        """One rank's K/V bytes a token: its share of the KV heads, one at least (replicated past their count).

        In the format ``kv_cache_dtype`` names, scales included: the engine's sizing formula
        (:meth:`kvpage.kv.format.KVFormat.token_bytes`), so a replay has the engine's pages.
        """
        heads = max(self.num_kv_heads // tensor_parallel_size, 1)
        return kv_format(kv_cache_dtype, self.dtype_bytes).token_bytes(self.num_layers, heads, self.head_dim)

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.dtype_bytes

    @classmethod
    def from_config(cls, config_path: str | Path, dtype_bytes: int = 2) -> ModelShape:
        return cls.from_dict(json.loads(Path(config_path).read_text()), dtype_bytes)

    @classmethod
    def from_dict(cls, config: dict[str, Any], dtype_bytes: int = 2) -> ModelShape:
        """The shape a Hugging Face config dict describes (``config.json``'s, or a GGUF file's metadata)."""
        c = config.get("text_config", config)
        hidden, layers = c["hidden_size"], c["num_hidden_layers"]
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or hidden // heads
        inter, vocab = c["intermediate_size"], c["vocab_size"]
        per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter
        embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
        return cls(layers * per_layer + embeddings, layers, heads, kv_heads, head_dim, dtype_bytes, hidden, vocab,
                   inter)


@dataclass(frozen=True)
class Link:
    """How fast tensor-parallel ranks talk: a collective's fixed latency and the bytes a second of each rank."""

    name: str
    bytes_per_s: float
    latency_s: float

    def all_reduce(self, nbytes: float, ranks: int) -> float:
        """A ring all-reduce: each rank sends and receives 2 (ranks - 1) / ranks of the tensor."""
        return self.latency_s + 2.0 * (ranks - 1) / ranks * nbytes / self.bytes_per_s

    def all_gather(self, nbytes: float, ranks: int) -> float:
        """``nbytes`` in all, gathered: each rank receives the (ranks - 1) / ranks it does not hold."""
        return self.latency_s + (ranks - 1) / ranks * nbytes / self.bytes_per_s


LINKS = {
    # Achievable bus bandwidth of NCCL's ring, not the marketing figure: NVLink 4 (H100/H200), PCIe 5 x16.
    "nvlink": Link("nvlink", 3.6e11, 1.5e-5),
    "pcie": Link("pcie", 2.5e10, 2.5e-5),
    # gloo between processes of one host, over loopback TCP.
    "cpu": Link("cpu", 2e9, 1.5e-4),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense, in the model's dtype
    memory_bytes_per_s: float
    link_bytes_per_s: float  # host <-> device, for swap
    flops_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    step_overhead_s: float = 1e-3  # the engine's host work a step, not hidden behind the device
    seq_overhead_s: float = 3e-6  # and a sequence


HARDWARE = {
    "h100": Hardware("h100", 989e12, 3.35e12, 5.0e10),
    "h200": Hardware("h200", 989e12, 4.8e12, 5.0e10),
    "a100": Hardware("a100", 312e12, 2.0e12, 2.5e10),
    # A few server cores in float32: compute-bound long before memory is.
    "cpu": Hardware("cpu", 2e11, 4e10, 1e10, flops_efficiency=0.5, bandwidth_efficiency=0.5,
                    step_overhead_s=2e-4, seq_overhead_s=5e-6),
}


@dataclass(frozen=True)
class PhysicsCostModel:
    hardware: Hardware
    model: ModelShape
    tensor_parallel_size: int = 1
    link: Link | None = None  # between the ranks; None: the hardware's usual one (NVLink on GPUs)
    kv_cache_dtype: KVCacheDtype = "auto"  # the bytes of each K/V token read (fp8: half of bf16, plus scales)
    async_scheduling = False  # a preset knows no engine: the replay's order is what the settings say

    def for_engine(self, tensor_parallel_size: int, kv_cache_dtype: KVCacheDtype) -> PhysicsCostModel:
        same = (tensor_parallel_size, kv_cache_dtype) == (self.tensor_parallel_size, self.kv_cache_dtype)
        return self if same else replace(self, tensor_parallel_size=tensor_parallel_size,
                                         kv_cache_dtype=kv_cache_dtype)

    @property
    def ranks_link(self) -> Link:
        return self.link or LINKS["cpu" if self.hardware.name == "cpu" else "nvlink"]

    def step_time(self, shape: StepShape) -> float:
        seconds = self._timer(shape.num_seqs, shape.num_tokens)(shape.attention_pairs, shape.kv_tokens_read)
        return seconds + shape.swap_bytes / self.hardware.link_bytes_per_s

    def decode_step(self, batch: int) -> DecodeTimer:
        timer = self._timer(batch, batch)
        return lambda kv_tokens_read, padded_kv_tokens: timer(kv_tokens_read, kv_tokens_read)  # a pair per K/V read

    def _timer(self, num_seqs: int, num_tokens: int) -> Callable[[int, int], float]:
        """Seconds of a step of these sequences and tokens, given (attention pairs, K/V tokens read); no swap."""
        hw, m, tp = self.hardware, self.model, self.tensor_parallel_size
        # Each rank: its share of the weights' FLOPs and bytes, its query heads' attention, its KV heads' bytes.
        weight_flops = 2.0 * m.num_parameters * num_tokens / tp
        attention_flops = 4.0 * m.num_layers * m.num_heads * m.head_dim / tp
        flop_rate = hw.peak_flops * hw.flops_efficiency
        byte_rate = hw.memory_bytes_per_s * hw.bandwidth_efficiency
        weights, kv_bytes = m.weight_bytes / tp, m.kv_bytes_per_token_per_rank(tp, self.kv_cache_dtype)
        host = hw.step_overhead_s + hw.seq_overhead_s * num_seqs + self._collectives(num_tokens, num_seqs)

        def seconds(attention_pairs: int, kv_tokens_read: int) -> float:
            flops = weight_flops + attention_flops * attention_pairs
            memory = weights + kv_bytes * kv_tokens_read
            return host + max(flops / flop_rate, memory / byte_rate)

        return seconds

    def _collectives(self, num_tokens: int, num_sampled: int) -> float:
        """Seconds of a step's collectives: 2 all-reduces a layer and the embedding's, then the logits' gather."""
        tp, m = self.tensor_parallel_size, self.model
        if tp == 1:
            return 0.0
        link = self.ranks_link
        hidden_bytes = float(num_tokens * m.hidden_size * m.dtype_bytes)
        return (2 * m.num_layers + 1) * link.all_reduce(hidden_bytes, tp) \
            + link.all_gather(float(num_sampled * m.vocab_size * m.dtype_bytes), tp)

    def describe(self) -> str:
        ranks = f", {self.tensor_parallel_size} ranks over {self.ranks_link.name}" \
            if self.tensor_parallel_size > 1 else ""
        kv = "" if self.kv_cache_dtype == "auto" else f", {kv_format(self.kv_cache_dtype, 1).name} KV"
        return f"physics, {self.hardware.name} preset{ranks}{kv}"


@dataclass(frozen=True)
class CalibratedCostModel:
    """seconds = intercept + sum(coefficient x feature), fitted on measured steps."""

    coefficients: tuple[float, ...]  # intercept, then one per FEATURES name
    link_bytes_per_s: float = 1e10
    device: str = ""
    model: str = ""
    num_samples: int = 0
    mean_abs_error: float = 0.0  # relative, on the calibration steps
    # The engine measured overlapped its steps (asynchronous scheduling, its default on a GPU): its steps'
    # times are the pipeline's period, and a replay with this model follows that step order by default.
    async_scheduling: bool = False
    tensor_parallel_size: int = 1  # the engine's ranks: its collectives are in the coefficients
    # The engine's KV format ("auto" or an 8-bit format's name): its kernels' cost a K/V token is in the
    # coefficients, and is not the bytes' ratio (on the H200 8-bit decode attention is slower, not 2x faster).
    kv_cache_dtype: str = "auto"

    def for_engine(self, tensor_parallel_size: int, kv_cache_dtype: KVCacheDtype) -> CalibratedCostModel:
        if tensor_parallel_size != self.tensor_parallel_size:
            raise ValueError(f"the cost model was calibrated at tensor_parallel_size={self.tensor_parallel_size} "
                             f"and cannot time {tensor_parallel_size} ranks; calibrate that engine "
                             f"(kvpage bench --calibrate -tp {tensor_parallel_size}) or use a --hardware preset")
        wanted = kv_format(kv_cache_dtype, 1).name
        if wanted != self.kv_cache_dtype:
            raise ValueError(f"the cost model was calibrated with kv_cache_dtype={self.kv_cache_dtype!r} and cannot "
                             f"time kv_cache_dtype={kv_cache_dtype!r}; calibrate that engine (kvpage bench "
                             f"--calibrate --kv-cache-dtype {kv_cache_dtype}) or use a --hardware preset")
        return self

    def step_time(self, shape: StepShape) -> float:
        timer = self._timer(shape.num_seqs, shape.num_prefill_seqs, shape.num_tokens, shape.num_sampled)
        return timer(shape.kv_tokens_read, shape.padded_kv_tokens, shape.attention_pairs) \
            + shape.swap_bytes / self.link_bytes_per_s

    def decode_step(self, batch: int) -> DecodeTimer:
        timer = self._timer(batch, 0, batch, batch)
        return lambda kv_tokens_read, padded_kv_tokens: timer(kv_tokens_read, padded_kv_tokens, kv_tokens_read)

    def _timer(self, *first: int) -> Callable[[int, int, int], float]:
        """Seconds given the features after the first four (K/V read, padded K/V, pairs); no swap.

        The intercept and the first four features' terms are summed once, in
        the order a full sum would add them, so the seconds are the same float.
        """
        c = self.coefficients
        fixed = sum(coefficient * float(x) for coefficient, x in zip(c, (1, *first)))
        kv_c, padded_c, pairs_c = c[5:8]

        def seconds(kv_tokens_read: int, padded_kv_tokens: int, attention_pairs: int) -> float:
            return fixed + kv_c * float(kv_tokens_read) + padded_c * float(padded_kv_tokens) \
                + pairs_c * float(attention_pairs)

        return seconds

    def describe(self) -> str:
        order = ", asynchronous scheduling" if self.async_scheduling else ""
        order += f", {self.tensor_parallel_size} ranks" if self.tensor_parallel_size > 1 else ""
        order += f", {self.kv_cache_dtype} KV" if self.kv_cache_dtype != "auto" else ""
        return (f"calibrated on {self.device}{order} ({self.num_samples} steps, "
                f"mean error {self.mean_abs_error:.1%})")

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        data["features"] = ["intercept", *FEATURES]
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CalibratedCostModel:
        try:
            data = json.loads(Path(path).read_text())
            if data.pop("features") != ["intercept", *FEATURES]:
                raise ValueError("its features are not this version's")
            return cls(**{**data, "coefficients": tuple(data["coefficients"])})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cost model {str(path)!r} is not a kvpage calibration file: {exc}") from None

    @classmethod
    def fit(cls, samples: list[tuple[StepShape, float]], link_bytes_per_s: float = 1e10, device: str = "",
            model: str = "", async_scheduling: bool = False, tensor_parallel_size: int = 1,
            kv_cache_dtype: str = "auto") -> CalibratedCostModel:
        """Least squares, then again without the outliers (a pause of the host, say).

        A step more than three times the median relative error off the
        first fit is dropped from the second.
        """
        if len(samples) < len(FEATURES) + 1:
            raise ValueError(f"calibration needs at least {len(FEATURES) + 1} measured steps, got {len(samples)}")
        first = cls._fit(samples)
        errors = [abs(first.step_time(s) - t) / t for s, t in samples]
        cutoff = 3 * sorted(errors)[len(errors) // 2]
        kept = [sample for sample, error in zip(samples, errors) if error <= cutoff]
        fitted = cls._fit(kept if len(kept) > len(FEATURES) else samples)
        error = sum(abs(fitted.step_time(s) - t) / t for s, t in samples) / len(samples)
        return cls(fitted.coefficients, link_bytes_per_s, device, model, num_samples=len(samples),
                   mean_abs_error=error, async_scheduling=async_scheduling, tensor_parallel_size=tensor_parallel_size,
                   kv_cache_dtype=kv_cache_dtype)

    @classmethod
    def _fit(cls, samples: list[tuple[StepShape, float]]) -> CalibratedCostModel:
        """Weighted least squares, dropping features whose weight comes out negative."""
        rows = [shape.features() for shape, _ in samples]
        times = [t for _, t in samples]
        # Relative errors matter: weight each step by 1 / its time, so short steps count as much as long.
        weights = [1.0 / max(t, 1e-9) for t in times]
        active = list(range(len(rows[0])))
        while True:
            solution = _least_squares([[row[i] for i in active] for row in rows], times, weights)
            if all(c >= 0 for c in solution) or len(active) == 1:
                break
            active.pop(min(range(len(solution)), key=lambda i: solution[i]))  # drop the most negative
        coefficients = [0.0] * len(rows[0])
        for i, c in zip(active, solution):
            coefficients[i] = max(c, 0.0)
        return cls(tuple(coefficients))


def _least_squares(rows: list[list[float]], targets: list[float], weights: list[float]) -> list[float]:
    """Weighted normal equations, solved by Gaussian elimination with a little ridge for stability."""
    k = len(rows[0])
    scale = [max(abs(row[j]) for row in rows) or 1.0 for j in range(k)]
    a = [[0.0] * k for _ in range(k)]
    b = [0.0] * k
    for row, y, w in zip(rows, targets, weights):
        x = [v / s for v, s in zip(row, scale)]
        w2 = w * w
        for i in range(k):
            b[i] += w2 * x[i] * y
            for j in range(k):
                a[i][j] += w2 * x[i] * x[j]
    for i in range(k):
        a[i][i] += 1e-9 * (a[i][i] or 1.0)
    for col in range(k):  # elimination with partial pivoting
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        if abs(a[col][col]) < 1e-300:
            continue
        for r in range(col + 1, k):
            f = a[r][col] / a[col][col]
            for c in range(col, k):
                a[r][c] -= f * a[col][c]
            b[r] -= f * b[col]
    x = [0.0] * k
    for i in reversed(range(k)):
        if abs(a[i][i]) < 1e-300:
            continue
        x[i] = (b[i] - sum(a[i][j] * x[j] for j in range(i + 1, k))) / a[i][i]
    return [v / s for v, s in zip(x, scale)]
