"""Paged attention, the reference and the SDPA path alike, must equal dense causal attention.

Every test scatters sequences over randomly shuffled physical pages, writes
their K/V through ``write_kv_cache`` and compares ``paged_attention`` with a
dense softmax over the same keys and values. The attention tests run once
per CPU backend: ``"torch"`` (the reference) and ``"sdpa"`` (the fast path).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpage.ops import AttentionMetadata, copy_pages, paged_attention, sdpa_attention, write_kv_cache
from kvpage.ops.metadata import resolve_backend

HEAD_DIM = 16
NUM_KV_HEADS = 2
CPU_BACKENDS = ["torch", "sdpa"]


@dataclass
class SequenceCase:
    """One sequence of a batch: ``context_len`` cached tokens, then ``query_len`` new ones."""

    context_len: int
    query_len: int

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len


@dataclass
class PagedBatch:
    """Dense per-sequence K/V/Q plus a paged cache holding the same K/V."""

    cases: list[SequenceCase]
    keys: list[torch.Tensor]  # [seq_len, Hkv, D] each
    values: list[torch.Tensor]
    queries: list[torch.Tensor]  # [query_len, Hq, D] each
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    meta: AttentionMetadata
    spare_pages: list[int]  # pages no sequence owns; they hold NaN


def _make_batch(
    cases: list[SequenceCase],
    block_size: int,
    num_q_heads: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    backend: str = "torch",
) -> PagedBatch:
    generator = torch.Generator().manual_seed(seed)
    shuffler = random.Random(seed)
    pages_needed = [math.ceil(case.seq_len / block_size) for case in cases]
    num_pages = sum(pages_needed) + 3  # spare pages stay NaN to prove they are never read
    physical = list(range(num_pages))
    shuffler.shuffle(physical)
    page_lists = []
    for count in pages_needed:
        page_lists.append(physical[:count])
        physical = physical[count:]

    shape = (num_pages, block_size, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(dtype)

    keys = [randn(case.seq_len, NUM_KV_HEADS, HEAD_DIM) for case in cases]
    values = [randn(case.seq_len, NUM_KV_HEADS, HEAD_DIM) for case in cases]
    queries = [randn(case.query_len, num_q_heads, HEAD_DIM) for case in cases]

    # The cached prefixes were written by earlier steps.
    prefix_meta = [(case, pages) for case, pages in zip(cases, page_lists) if case.context_len > 0]
    if prefix_meta:
        earlier = AttentionMetadata.build(
            [case.context_len for case, _ in prefix_meta],
            [case.context_len for case, _ in prefix_meta],
            [pages for _, pages in prefix_meta],
            block_size,
        )
        write_kv_cache(
            torch.cat([k[: case.context_len] for case, k in zip(cases, keys) if case.context_len]),
            torch.cat([v[: case.context_len] for case, v in zip(cases, values) if case.context_len]),
            key_cache,
            value_cache,
            earlier.slot_mapping,
        )

    meta = AttentionMetadata.build(
        [case.query_len for case in cases], [case.seq_len for case in cases], page_lists, block_size,
        backend=backend,
    )
    write_kv_cache(
        torch.cat([k[case.context_len :] for case, k in zip(cases, keys)]),
        torch.cat([v[case.context_len :] for case, v in zip(cases, values)]),
        key_cache,
        value_cache,
        meta.slot_mapping,
    )
    return PagedBatch(cases, keys, values, queries, key_cache, value_cache, meta, physical)


def _dense_reference(batch: PagedBatch, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    outputs = []
    for case, keys, values, query in zip(batch.cases, batch.keys, batch.values, batch.queries):
        num_q_heads = query.shape[1]
        group = num_q_heads // NUM_KV_HEADS
        q = query.double().transpose(0, 1)  # [Hq, Q, D]
        k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)
        v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
        q_pos = torch.arange(case.context_len, case.seq_len)[:, None]
        k_pos = torch.arange(case.seq_len)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


PREFILL = [SequenceCase(0, 37), SequenceCase(0, 5), SequenceCase(0, 1)]
CHUNKED = [SequenceCase(29, 11), SequenceCase(16, 16), SequenceCase(3, 2)]
DECODE = [SequenceCase(40, 1), SequenceCase(1, 1), SequenceCase(17, 1), SequenceCase(256, 1)]
MIXED = [
    SequenceCase(12, 1),
    SequenceCase(0, 23),
    SequenceCase(30, 1),
    SequenceCase(19, 9),
    SequenceCase(0, 1),
    SequenceCase(5, 1),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize("gqa_ratio", [1, 2, 4])
@pytest.mark.parametrize(
    "cases", [PREFILL, CHUNKED, DECODE, MIXED], ids=["prefill", "chunked", "decode", "mixed"]
)
def test_paged_matches_dense(cases: list[SequenceCase], block_size: int, gqa_ratio: int, backend: str) -> None:
    batch = _make_batch(cases, block_size, NUM_KV_HEADS * gqa_ratio, backend=backend)
    scale = HEAD_DIM**-0.5
    query = torch.cat(batch.queries)
    actual = paged_attention(query, batch.key_cache, batch.value_cache, batch.meta, scale)
    assert actual.shape == query.shape and actual.dtype == query.dtype
    assert _relative_error(actual, _dense_reference(batch, scale)) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("sliding_window", [1, 4, 20])
def test_sliding_window_matches_dense(block_size: int, sliding_window: int, backend: str) -> None:
    batch = _make_batch(MIXED, block_size, NUM_KV_HEADS * 2, backend=backend)
    scale = 0.3
    query = torch.cat(batch.queries)
    actual = paged_attention(
        query, batch.key_cache, batch.value_cache, batch.meta, scale, sliding_window=sliding_window
    )
    expected = _dense_reference(batch, scale, sliding_window)
    assert _relative_error(actual, expected) < 1e-5


def _with_padding_row(batch: PagedBatch, query: torch.Tensor, at: int,
                      backend: str) -> tuple[torch.Tensor, AttentionMetadata]:
    """The batch with one padding sequence inserted at ``at``: one token over a NaN page, written nowhere."""
    meta = batch.meta
    row = meta.token_starts[at]
    pad_table = torch.zeros(1, meta.page_tables.shape[1], dtype=torch.int32)
    pad_table[0, 0] = batch.spare_pages[0]
    padded = AttentionMetadata(
        query_lens=meta.query_lens[:at] + [1] + meta.query_lens[at:],
        seq_lens=meta.seq_lens[:at] + [1] + meta.seq_lens[at:],
        page_tables=torch.cat([meta.page_tables[:at], pad_table, meta.page_tables[at:]]),
        slot_mapping=torch.cat([meta.slot_mapping[:row], torch.tensor([-1]), meta.slot_mapping[row:]]),
        block_size=meta.block_size, backend=backend)
    return torch.cat([query[:row], torch.randn(1, *query.shape[1:]), query[row:]]), padded


@settings(max_examples=80, deadline=None)
@given(
    contexts=st.lists(st.tuples(st.integers(0, 600), st.one_of(st.just(1), st.integers(1, 40))), min_size=1,
                      max_size=7),
    block_size=st.sampled_from([1, 3, 16]),
    gqa_ratio=st.sampled_from([1, 2, 4]),
    sliding_window=st.one_of(st.none(), st.integers(1, 60)),
    padding_at=st.one_of(st.none(), st.integers(0, 7)),
    seed=st.integers(0, 2**16),
)
def test_sdpa_path_equals_reference(contexts: list[tuple[int, int]], block_size: int, gqa_ratio: int,
                                    sliding_window: int | None, padding_at: int | None, seed: int) -> None:
    """Random ragged batches (prefill, cached prefix, chunks, decode of any length, windows, padding rows)."""
    cases = [SequenceCase(context, new) for context, new in contexts]
    batch = _make_batch(cases, block_size, NUM_KV_HEADS * gqa_ratio, seed=seed)
    query = torch.cat(batch.queries)
    outputs = {}
    for backend in CPU_BACKENDS:
        step_query, meta = query, AttentionMetadata(batch.meta.query_lens, batch.meta.seq_lens,
                                                    batch.meta.page_tables, batch.meta.slot_mapping,
                                                    block_size, backend)
        if padding_at is not None:
            torch.manual_seed(seed)
            step_query, meta = _with_padding_row(batch, query, min(padding_at, len(cases)), backend)
        out = paged_attention(step_query, batch.key_cache, batch.value_cache, meta, 0.25, sliding_window)
        if padding_at is not None:  # the padding row reads NaN and is dropped, the rest must not notice
            row = meta.token_starts[min(padding_at, len(cases))]
            out = torch.cat([out[:row], out[row + 1:]])
        outputs[backend] = out
    assert torch.isfinite(outputs["sdpa"]).all()
    assert _relative_error(outputs["sdpa"], outputs["torch"]) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32(dtype: torch.dtype, backend: str) -> None:
    low = _make_batch(MIXED, 16, NUM_KV_HEADS * 2, dtype=dtype, backend=backend)
    # The float32 side is the reference, so a 16-bit path is held to float32 attention of its own inputs.
    high = _make_batch(MIXED, 16, NUM_KV_HEADS * 2, dtype=torch.float32)
    scale = HEAD_DIM**-0.5
    low_out = paged_attention(torch.cat(low.queries), low.key_cache, low.value_cache, low.meta, scale)
    # Compare against float32 attention over the very same rounded inputs.
    high.key_cache.copy_(low.key_cache.float())
    high.value_cache.copy_(low.value_cache.float())
    high_query = torch.cat(low.queries).float()
    high_out = paged_attention(high_query, high.key_cache, high.value_cache, high.meta, scale)
    assert low_out.dtype == dtype
    assert torch.isfinite(low_out).all()
    assert _relative_error(low_out, high_out) < 1e-2


def test_write_kv_cache_skips_negative_slots() -> None:
    key_cache = torch.zeros(4, 2, 1, 3)
    value_cache = torch.zeros(4, 2, 1, 3)
    key = torch.arange(1, 10, dtype=torch.float32).view(3, 1, 3)
    value = -key
    write_kv_cache(key, value, key_cache, value_cache, torch.tensor([5, -1, 0]))
    flat_keys = key_cache.view(-1, 1, 3)
    flat_values = value_cache.view(-1, 1, 3)
    assert torch.equal(flat_keys[5], key[0]) and torch.equal(flat_values[5], value[0])
    assert torch.equal(flat_keys[0], key[2]) and torch.equal(flat_values[0], value[2])
    untouched = [slot for slot in range(8) if slot not in (0, 5)]
    assert not flat_keys[untouched].any() and not flat_values[untouched].any()


def test_write_kv_cache_rejects_bad_shapes() -> None:
    cache = torch.zeros(2, 4, 2, 8)
    with pytest.raises(ValueError, match="key and value"):
        write_kv_cache(torch.zeros(3, 1, 8), torch.zeros(3, 1, 8), cache, cache.clone(), torch.arange(3))


def test_copy_pages_copies_every_layer() -> None:
    layers = [(torch.randn(5, 4, 2, 8), torch.randn(5, 4, 2, 8)) for _ in range(3)]
    before = [(k.clone(), v.clone()) for k, v in layers]
    # Page 1 is both a destination and a source: sources are read first.
    copy_pages(layers, [(1, 3), (0, 1)])
    for (key_cache, value_cache), (old_keys, old_values) in zip(layers, before):
        assert torch.equal(key_cache[3], old_keys[1]) and torch.equal(value_cache[3], old_values[1])
        assert torch.equal(key_cache[1], old_keys[0]) and torch.equal(value_cache[1], old_values[0])
        for page in (0, 2, 4):
            assert torch.equal(key_cache[page], old_keys[page])
            assert torch.equal(value_cache[page], old_values[page])


def test_copy_pages_rejects_out_of_range_page() -> None:
    layers = [(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8))]
    with pytest.raises(ValueError, match="page id"):
        copy_pages(layers, [(0, 2)])


def test_metadata_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="query_lens\\[0\\]=3"):
        AttentionMetadata.build([3], [2], [[0]], 4)
    with pytest.raises(ValueError, match="page_lists\\[0\\]"):
        AttentionMetadata.build([1], [9], [[0, 1]], 4)
    with pytest.raises(ValueError, match="slot_mapping"):
        AttentionMetadata(
            query_lens=[2],
            seq_lens=[2],
            page_tables=torch.zeros(1, 1, dtype=torch.int32),
            slot_mapping=torch.zeros(3, dtype=torch.long),
            block_size=4,
        )


def test_metadata_positions_and_slots() -> None:
    meta = AttentionMetadata.build([2, 1], [5, 3], [[7, 2], [4]], block_size=4)
    assert meta.positions().tolist() == [3, 4, 2]
    assert meta.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 4 * 4 + 2]
    assert meta.page_tables.tolist() == [[7, 2], [4, 0]]
    assert meta.page_tables.dtype == torch.int32


def test_auto_runs_the_sdpa_path_on_cpu_and_torch_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fast = sdpa_attention.paged_attention

    def spy(*args: object) -> torch.Tensor:
        calls.append("sdpa")
        return fast(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sdpa_attention, "paged_attention", spy)
    for backend, expected in (("auto", ["sdpa"]), ("torch", []), ("sdpa", ["sdpa"])):
        calls.clear()
        batch = _make_batch(MIXED, 16, NUM_KV_HEADS * 2, backend=backend)
        query = torch.cat(batch.queries)
        out = paged_attention(query, batch.key_cache, batch.value_cache, batch.meta, HEAD_DIM**-0.5)
        assert calls == expected, backend
        assert _relative_error(out, _dense_reference(batch, HEAD_DIM**-0.5)) < 1e-5
    cpu = torch.device("cpu")
    assert [resolve_backend(b, cpu) for b in ("auto", "torch", "sdpa", "triton")] == ["sdpa", "torch", "sdpa", "triton"]
    with pytest.raises(ValueError, match="attention backend must be one of"):
        resolve_backend("flash", cpu)
