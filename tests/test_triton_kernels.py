"""The Triton kernels must compute what the torch reference specifies.

On a CPU these run under the Triton interpreter (``TRITON_INTERPRET=1``, set
in ``conftest.py``) in float32 and float16; on a CUDA device the same tests
compile the kernels and add bfloat16 (the interpreter mishandles bf16).
Every case scatters sequences over shuffled pages whose unused slots hold
NaN, poisons the output first, and compares with the reference.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from kvpage.ops import AttentionMetadata, copy_pages, paged_attention, triton_attention, triton_cache, write_kv_cache  # noqa: E402  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# Relative error against the float32 reference over the same rounded inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
NUM_KV_HEADS = 2
HEAD_DIM = 32

# (context already cached, new tokens) per sequence.
DECODE = [(40, 1), (0, 1), (17, 1), (300, 1), (63, 1), (64, 1)]
PREFILL = [(0, 70), (0, 5), (0, 2), (0, 129)]
CHUNKED = [(29, 11), (64, 64), (3, 2), (100, 37)]
MIXED = [(12, 1), (0, 23), (130, 1), (19, 9), (0, 1), (5, 1), (47, 80)]


@dataclass
class Batch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    meta: AttentionMetadata


def make_batch(cases: list[tuple[int, int]], block_size: int, gqa: int, dtype: torch.dtype, seed: int,
               backend: str = "auto") -> Batch:
    generator = torch.Generator().manual_seed(seed)
    shuffle = random.Random(seed)
    pages_needed = [math.ceil((context + new) / block_size) for context, new in cases]
    physical = list(range(sum(pages_needed) + 3))
    shuffle.shuffle(physical)
    page_lists = []
    for count in pages_needed:
        page_lists.append(physical[:count])
        physical = physical[count:]
    shape = (sum(pages_needed) + 3, block_size, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    # Slots past each sequence's length (and spare pages) hold NaN: they must never be read.
    for pages, (context, new) in zip(page_lists, cases):
        flat_k = key_cache[pages].flatten(0, 1)
        flat_k[context + new:] = float("nan")
        key_cache[pages] = flat_k.view(-1, block_size, NUM_KV_HEADS, HEAD_DIM)
        flat_v = value_cache[pages].flatten(0, 1)
        flat_v[context + new:] = float("nan")
        value_cache[pages] = flat_v.view(-1, block_size, NUM_KV_HEADS, HEAD_DIM)
    for page in physical:
        key_cache[page] = float("nan")
        value_cache[page] = float("nan")
    num_tokens = sum(new for _, new in cases)
    query = torch.randn(num_tokens, NUM_KV_HEADS * gqa, HEAD_DIM, generator=generator).to(dtype)
    meta = AttentionMetadata.build([new for _, new in cases], [c + n for c, n in cases], page_lists, block_size,
                                   device=DEVICE, backend=backend)
    return Batch(query.to(DEVICE), key_cache.to(DEVICE), value_cache.to(DEVICE), meta)


def reference(batch: Batch, scale: float, window: int | None) -> torch.Tensor:
    """The torch reference in float32 on the CPU, over the very same (rounded) inputs."""
    meta = batch.meta
    cpu_meta = AttentionMetadata(meta.query_lens, meta.seq_lens, meta.page_tables.cpu(), meta.slot_mapping.cpu(),
                                 meta.block_size, backend="torch")
    return paged_attention(batch.query.float().cpu(), batch.key_cache.float().cpu(), batch.value_cache.float().cpu(),
                           cpu_meta, scale, sliding_window=window)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected.double()).norm() / expected.double().norm()).item()


def run_kernels(batch: Batch, scale: float, window: int | None = None, splits: int | None = None) -> torch.Tensor:
    out = triton_attention.paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.meta, scale,
                                           sliding_window=window, num_splits=splits)
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    assert torch.isfinite(out).all(), "a row was left unwritten or read a NaN slot"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("cases", [DECODE, PREFILL, CHUNKED, MIXED], ids=["decode", "prefill", "chunked", "mixed"])
def test_attention_matches_reference(cases: list[tuple[int, int]], gqa: int, block_size: int,
                                     dtype: torch.dtype) -> None:
    batch = make_batch(cases, block_size, gqa, dtype, seed=block_size + gqa)
    scale = HEAD_DIM**-0.5
    assert relative_error(run_kernels(batch, scale), reference(batch, scale, None)) < TOLERANCE[dtype]


@pytest.mark.parametrize("splits", [1, 2, 8, 16])
def test_split_kv_merge_is_exact(splits: int) -> None:
    """Every split count gives the reference's result, including splits left empty by short sequences."""
    batch = make_batch(DECODE, 16, 4, torch.float32, seed=splits)
    scale = 0.2
    assert relative_error(run_kernels(batch, scale, splits=splits), reference(batch, scale, None)) < 1e-5


@pytest.mark.parametrize("block_size", [1, 4, 16, 256])
@pytest.mark.parametrize("window", [None, 1, 7, 70])
def test_sliding_window_and_small_pages(block_size: int, window: int | None) -> None:
    batch = make_batch(MIXED, block_size, 2, torch.float32, seed=3)
    scale = 0.3
    expected = reference(batch, scale, window)
    for splits in (1, 4):
        assert relative_error(run_kernels(batch, scale, window, splits), expected) < 1e-5


def test_dispatch_uses_kernels_when_asked() -> None:
    """``backend="triton"`` routes the public entry points to the kernels, also off a GPU."""
    batch = make_batch(MIXED, 16, 2, torch.float32, seed=5, backend="triton")
    assert batch.meta.uses_kernels(batch.query)
    out = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.meta, 0.25)
    assert relative_error(out, reference(batch, 0.25, None)) < 1e-5
    assert "kernel" in batch.meta.__dict__ and "reference" not in batch.meta.__dict__


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cache_write_matches_reference_and_skips_padding(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    num_pages, block_size = 6, 16
    shape = (num_pages, block_size, NUM_KV_HEADS, HEAD_DIM)
    slots = torch.randperm(num_pages * block_size, generator=generator)[:40]
    slots[[0, 7, 39]] = -1  # padding rows, e.g. a CUDA graph's spare batch entries
    # K/V as views into a fused projection output, the way the model produces them.
    fused = torch.randn(40, 3, NUM_KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    key, value = fused[:, 1], fused[:, 2]
    expected_k = torch.randn(shape, generator=generator).to(dtype)
    expected_v = torch.randn(shape, generator=generator).to(dtype)
    actual_k, actual_v = expected_k.clone().to(DEVICE), expected_v.clone().to(DEVICE)
    write_kv_cache(key, value, expected_k, expected_v, slots, backend="torch")
    write_kv_cache(key.to(DEVICE), value.to(DEVICE), actual_k, actual_v, slots.to(DEVICE), backend="triton")
    assert torch.equal(actual_k.cpu(), expected_k) and torch.equal(actual_v.cpu(), expected_v)


def test_page_copy_reads_every_source_before_writing() -> None:
    generator = torch.Generator().manual_seed(1)
    caches = torch.randn(6, 7, 4 * NUM_KV_HEADS * HEAD_DIM, generator=generator).to(DEVICE)  # 3 layers x (K, V)
    before = caches.clone()
    # Page 1 is both a destination and a source; page 5 is copied to two places.
    copies = [(1, 3), (0, 1), (5, 2), (5, 6)]
    triton_cache.copy_pages(caches, copies)
    for src, dst in copies:
        assert torch.equal(caches[:, dst], before[:, src])
    for page in (0, 4, 5):
        assert torch.equal(caches[:, page], before[:, page])
    # The same result as the reference's per-layer copy.
    layers = [(before[2 * i].view(7, 4, NUM_KV_HEADS, HEAD_DIM).clone(),
               before[2 * i + 1].view(7, 4, NUM_KV_HEADS, HEAD_DIM).clone()) for i in range(3)]
    copy_pages(layers, copies)
    for i, (k, v) in enumerate(layers):
        assert torch.equal(k.flatten(1), caches[2 * i].view(7, -1)) and torch.equal(v.flatten(1), caches[2 * i + 1])


def test_page_copy_rejects_out_of_range_page() -> None:
    caches = torch.zeros(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="page id"):
        triton_cache.copy_pages(caches, [(0, 3)])


@pytest.mark.parametrize("cases", [DECODE, PREFILL, MIXED, MIXED[:3], DECODE[:1]], ids=str)
def test_kernel_arrays_start_16_byte_aligned(cases: list[tuple[int, int]]) -> None:
    """Triton compiles anew per pattern of pointer alignment: the per-step arrays must all be aligned,
    whatever the batch, or serving pays a compilation whenever the batch shape changes."""
    from kvpage.ops.transfer import to_device_segments

    plan = make_batch(cases, 16, 2, torch.float32, seed=1).meta.kernel
    for array in (plan.query_start, plan.seq_lens, plan.decode_seqs, plan.prefill_tiles):
        assert array.data_ptr() % 16 == 0
    segments = [[1, 2, 3], [], [4], list(range(7)), [5, 6]]
    for dtype in (torch.int32, torch.long):
        views = to_device_segments(segments, dtype, DEVICE)
        assert [v.tolist() for v in views] == segments
        assert all(v.data_ptr() % 16 == 0 for v in views)
