"""8-bit KV pages: the scale rule, the round trip, and every kernel against the torch specification.

The specification is :mod:`kvpage.ops.fp8` (quantize on store, dequantize
on read) and the reference attention over the dequantized cache. The Triton
kernels run under the interpreter here (``TRITON_INTERPRET=1``, conftest)
and compiled on a GPU: the cache-store kernels must write the very bytes the
specification writes, and the attention kernels, the SDPA path and the
reference must all compute attention over the dequantized cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpage.kv.format import EXPONENT_BIAS, FP8_FORMATS, kv_format
from kvpage.ops import AttentionMetadata, CacheScales, paged_attention, write_kv_cache
from kvpage.ops.fp8 import FP8_DTYPES, as_bytes, check_device, dequantize, format_of, quantize
from kvpage.ops.fused import qkv_norm_rope_cache
from kvpage.ops.triton_attention import DecodeTuning
from kvpage.ops.triton_attention import paged_attention as triton_paged_attention
from kvpage.worker import KVCache, KVCacheShape, page_bytes
from tests.test_triton_kernels import CHUNKED, DECODE, DEVICE, HEAD_DIM, MIXED, PREFILL, Batch, make_batch, reference

FORMATS = list(FP8_DTYPES.values())
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


# ----- the format ----------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(amax=st.floats(min_value=2.0 ** -100, max_value=2.0 ** 100, width=32),
       name=st.sampled_from(sorted(FP8_FORMATS)))
def test_the_scale_is_the_smallest_power_of_two_that_fits_the_largest_value(amax: float, name: str) -> None:
    kv = FP8_FORMATS[name]
    x = torch.tensor([[amax, -amax / 3, 0.0]])
    _, exponents = quantize(x, FP8_DTYPES[name])
    e = int(exponents[0])
    scale = 2.0 ** (e - EXPONENT_BIAS)
    assert amax <= kv.max_value * scale  # fits: never clipped
    assert e == 1 or amax > kv.max_value * scale / 2  # and the next smaller power of two would not fit


@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_round_trip_is_within_half_a_step_of_the_format_even_with_outliers(dtype: torch.dtype) -> None:
    """Store then read gives each value back within half a float8 step at its scale; a few values 100x the
    rest only coarsen their own head vector. One fixed scale of 1.0 (no calibration) clips them instead."""
    kv = format_of(dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, 64, generator=generator) * 8
    outliers = torch.rand(x.shape, generator=generator) < 0.001
    x = torch.where(outliers, x * 100, x)
    values, exponents = quantize(x, dtype)
    back = dequantize(values, exponents)
    scale = torch.pow(2.0, exponents.double() - EXPONENT_BIAS)[..., None]
    # Half a step: 2**-(mantissa+1) of the value in the normal range, half the subnormal step below it.
    bound = 2.0 ** -(kv.mantissa_bits + 1) * x.abs().double() + 2.0 ** (
        kv.min_normal_exponent - kv.mantissa_bits - 1) * scale
    assert ((back.double() - x.double()).abs() <= bound).all()
    # The same data through one fixed scale of 1.0: every value past the format's largest one is clipped to it.
    fixed = x.clamp(-kv.max_value, kv.max_value).to(dtype).float()
    clipped = x.abs() > kv.max_value
    if dtype == torch.float8_e4m3fn:  # E5M2's range (57344) holds these outliers even at scale 1.0
        assert clipped.sum() > 10 and (fixed[clipped].abs() == kv.max_value).all()
        assert (fixed - x)[clipped].abs().max() > 10 * (back - x)[clipped].abs().max()


def test_the_sizes_count_the_scale_bytes() -> None:
    # SmolLM2's shape: 30 layers, 3 KV heads of 64. bf16: 2 bytes a value; fp8: 1, plus 1 a head vector.
    auto, fp8 = kv_format("auto", 2), kv_format("fp8", 2)
    assert auto.token_bytes(30, 3, 64) == 2 * 30 * 3 * 64 * 2
    assert fp8.token_bytes(30, 3, 64) == 2 * 30 * 3 * 65
    assert kv_format("fp8_e4m3", 2) == fp8 != kv_format("fp8_e5m2", 2)
    assert page_bytes(30, 16, 3, 64, torch.float8_e4m3fn) == 16 * fp8.token_bytes(30, 3, 64)
    assert auto.token_bytes(30, 3, 64) / fp8.token_bytes(30, 3, 64) >= 1.9
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        kv_format("int8", 2)  # type: ignore[arg-type]


def test_a_gpu_without_float8_conversions_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9.*got 8.0"):
        check_device("fp8", torch.float8_e4m3fn, torch.device("cuda"), uses_kernels=True)
    check_device("auto", torch.bfloat16, torch.device("cuda"), uses_kernels=True)  # 16-bit pages: fine
    check_device("fp8", torch.float8_e4m3fn, torch.device("cuda"), uses_kernels=False)  # the torch paths: fine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device("fp8", torch.float8_e4m3fn, torch.device("cuda"), uses_kernels=True)


# ----- the store kernels write the specification's bytes -------------------------------------------------------

def empty_fp8_cache(dtype: torch.dtype, pages: int = 6, block: int = 4, heads: int = 2,
                    dim: int = 40) -> tuple[torch.Tensor, torch.Tensor, CacheScales]:
    shape = (pages, block, heads, dim)
    scales = CacheScales(torch.ones(shape[:3], dtype=torch.uint8, device=DEVICE),
                         torch.ones(shape[:3], dtype=torch.uint8, device=DEVICE))
    return torch.zeros(shape, dtype=dtype, device=DEVICE), torch.zeros(shape, dtype=dtype, device=DEVICE), scales


def cache_bytes(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [as_bytes(t).cpu() for t in tensors]


@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_the_cache_write_kernel_stores_the_specifications_bytes(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    key = torch.randn(7, 2, 40, generator=generator) * 3
    value = torch.randn(7, 2, 40, generator=generator)
    key[2, 1, 5] = 900.0  # an outlier: its head vector gets a larger scale
    value[4, 0] = 0.0  # an all-zero head vector: the smallest scale
    slots = torch.tensor([0, 5, 9, -1, 13, 22, 23])
    stored = []
    for backend in ("torch", "triton"):
        key_cache, value_cache, scales = empty_fp8_cache(dtype)
        write_kv_cache(key.to(DEVICE), value.to(DEVICE), key_cache, value_cache, slots.to(DEVICE), backend=backend,
                       scales=scales)
        stored.append(cache_bytes(key_cache, value_cache, scales.key, scales.value))
    for spec, kernel in zip(*stored):
        assert torch.equal(spec, kernel)
    assert stored[0][2].view(-1, 2)[1].tolist() == [1, 1]  # a slot no token maps to keeps its initial scale
    assert int(stored[0][2].view(-1, 2)[9, 1]) > int(stored[0][2].view(-1, 2)[9, 0])  # the outlier's scale


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_the_fused_rope_store_kernel_stores_the_specifications_bytes(dtype: torch.dtype,
                                                                    model_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, tokens = 4, 2, 32, 7
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator) * 3).to(model_dtype)
    qkv[1, 5] = 400.0
    cos, sin = (torch.randn(64, dim, generator=generator).to(model_dtype) for _ in range(2))
    norms = [torch.rand(dim, generator=generator).to(model_dtype) for _ in range(2)]
    slots = torch.tensor([0, 5, 9, -1, 13, 22, 23])
    stored = []
    for backend in ("torch", "triton"):
        key_cache, value_cache, scales = empty_fp8_cache(dtype, dim=dim)
        qkv_norm_rope_cache(qkv.to(DEVICE), torch.arange(tokens, device=DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                            norms[0].to(DEVICE), norms[1].to(DEVICE), 1e-6, key_cache, value_cache,
                            slots.to(DEVICE), heads, backend=backend, scales=scales)
        stored.append(cache_bytes(key_cache, value_cache, scales.key, scales.value))
    for spec, kernel in zip(*stored):
        if DEVICE.type == "cuda" and model_dtype == torch.float16:
            # Compiled, the kernel's float16 norm and rotation round in another order than torch's, so a value
            # may land one float8 step away (its byte off by one); the interpreter computes as the specification.
            assert (spec.int() - kernel.int()).abs().max() <= 1 and (spec == kernel).float().mean() > 0.97
        else:
            assert torch.equal(spec, kernel)


# ----- attention over 8-bit pages ------------------------------------------------------------------------------

def quantized(batch: Batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, CacheScales, Batch]:
    """The batch's caches stored as 8-bit pages (NaN slots stay NaN), and the batch over their dequantization."""
    key, key_exponents = quantize(batch.key_cache, dtype)
    value, value_exponents = quantize(batch.value_cache, dtype)
    scales = CacheScales(key_exponents, value_exponents)
    dequantized = Batch(batch.query, dequantize(key, key_exponents).to(batch.query.dtype),
                        dequantize(value, value_exponents).to(batch.query.dtype), batch.meta)
    return key, value, scales, dequantized


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected.double()).norm() / expected.double().norm()).item()


# The interpreter is slow, so not the full product: the mixed batch (ragged decodes, whole prompts, chunks and
# prompts over cached prefixes in one step) in both formats at block sizes 16 and 64 and GQA groups 1, 4 and 8;
# the pure batches in E4M3 at one shape.
ATTENTION_CASES = [
    *[pytest.param(MIXED, block, gqa, dtype, id=f"mixed-{block}-gqa{gqa}-{str(dtype)[6:]}")
      for block, gqa in [(16, 1), (64, 4), (16, 8)] for dtype in FORMATS],
    *[pytest.param(cases, 64, 4, torch.float8_e4m3fn, id=f"{name}-64-gqa4")
      for name, cases in [("decode", DECODE), ("prefill", PREFILL), ("chunked", CHUNKED)]],
]


@pytest.mark.parametrize(("cases", "block_size", "gqa", "dtype"), ATTENTION_CASES)
def test_every_attention_path_reads_8_bit_pages_as_their_dequantization(
        cases: list[tuple[int, int]], block_size: int, gqa: int, dtype: torch.dtype) -> None:
    query_dtype = torch.float16 if gqa == 4 else torch.float32  # the interpreter's half precision, and float32
    batch = make_batch(cases, block_size, gqa, query_dtype, seed=block_size + gqa)
    key, value, scales, dequantized = quantized(batch, dtype)
    scale = HEAD_DIM ** -0.5
    expected = reference(dequantized, scale, None)
    meta = batch.meta
    for backend in ("triton", "torch", "sdpa"):
        step = AttentionMetadata(meta.query_lens, meta.seq_lens, meta.page_tables, meta.slot_mapping,
                                 meta.block_size, backend=backend)
        out = paged_attention(batch.query, key, value, step, scale, scales=scales)
        assert out.dtype == batch.query.dtype and torch.isfinite(out).all(), backend
        assert relative_error(out, expected) < TOLERANCE[query_dtype], backend


TUNINGS = [DecodeTuning(16), DecodeTuning(128, 8), DecodeTuning(32, 2, 2), DecodeTuning(16, 2, carry_pages=True),
           DecodeTuning(64, 4, waves=4, carry_pages=True)]


@pytest.mark.parametrize("tuning", TUNINGS, ids=lambda t: f"n{t.block_n}-w{t.num_warps}" + "-carry" * t.carry_pages)
@pytest.mark.parametrize("pages", ["16-bit", "e4m3"])
def test_every_decode_tuning_computes_the_same_attention(tuning: DecodeTuning, pages: str) -> None:
    """The decode kernel's tile sizes, warps, stages and page loads a tile ahead (benchmarks sweep them) change
    no result; the 8-bit pages' scale bytes are always loaded a tile ahead (tiles of 16 keys: pages of 16 cross
    tiles, so a scale taken from the wrong tile shows)."""
    for gqa, query_dtype in ((4, torch.float16), (1, torch.float32)):
        batch = make_batch(DECODE, 16, gqa, query_dtype, seed=gqa)
        key, value, scales = batch.key_cache, batch.value_cache, None
        if pages == "e4m3":
            key, value, scales, batch = quantized(batch, torch.float8_e4m3fn)
        expected = reference(batch, 0.2, None)
        for splits in (1, 4):
            out = triton_paged_attention(batch.query, key, value, batch.meta, 0.2, num_splits=splits, scales=scales,
                                         tuning=tuning)
            assert relative_error(out, expected) < TOLERANCE[query_dtype], (gqa, splits)
    with pytest.raises(ValueError, match="DecodeTuning.block_n must be a power of two >= 16, got 48"):
        DecodeTuning(48)


def test_8_bit_pages_need_their_scales_and_16_bit_pages_refuse_them() -> None:
    batch = make_batch(MIXED, 16, 2, torch.float32, seed=4)
    key, value, scales, _ = quantized(batch, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scales must be given exactly when the cache is 8-bit"):
        paged_attention(batch.query, key, value, batch.meta, 0.2)
    with pytest.raises(ValueError, match="scales must be given exactly when the cache is 8-bit"):
        paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.meta, 0.2, scales=scales)


# ----- page moves carry the scales -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_copy_and_swap_move_the_scale_bytes_with_the_values(backend: str) -> None:
    shape = KVCacheShape(num_layers=2, num_pages=5, block_size=4, num_kv_heads=2, head_dim=8,
                         dtype=torch.float8_e4m3fn)
    cache = KVCache(shape, DEVICE, num_host_pages=3, backend=backend)
    assert cache.scale_storage is not None
    generator = torch.Generator().manual_seed(5)
    for layer in cache.layers:
        for page in range(5):
            assert layer.scales is not None
            key = torch.randn(1, 4, 2, 8, generator=generator) * 10 ** page
            values, exponents = quantize(key, shape.dtype)
            as_bytes(layer.key)[page] = as_bytes(values[0]).to(DEVICE)
            layer.scales.key[page] = exponents[0].to(DEVICE)
    tensors = [as_bytes(cache.storage), cache.scale_storage]  # the values and the scale bytes
    before = [t.clone() for t in tensors]
    assert len(set(before[1][0, :, 0, 0].tolist())) == 5  # each page of a layer its own key scales
    cache.copy([(4, 0)])
    for tensor, old in zip(tensors, before):
        assert torch.equal(tensor[:, 0], old[:, 4]) and torch.equal(tensor[:, 1:], old[:, 1:])
    cache.swap_out([(0, 2), (3, 1)])
    cache.swap_in([(2, 1), (1, 2)])  # page 0's bytes come back as page 1, page 3's as page 2
    for tensor, old in zip(tensors, before):
        assert torch.equal(tensor[:, 1], old[:, 4]) and torch.equal(tensor[:, 2], old[:, 3])
    assert math.isclose(shape.bytes_per_page, 2 * 2 * 4 * 2 * (8 + 1))
