"""The fused Triton kernels compute what their torch references in ``kvpage.ops.fused`` specify.

Under the Triton interpreter on a CPU (float32 and float16) and compiled on a
GPU (bfloat16 too). Half-precision results follow the reference's rounding
chain: nearly always equal. Where they are not, they are within two units in
the last place of the row's magnitude: a transcendental (``exp``, ``rsqrt``)
may differ in its last float32 bit, and the GPU compiler may keep a product in
float32 where the reference rounds it to half precision first, so the result
is then the more exact one. Outputs are poisoned first, padding slots must
stay untouched.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvpage.ops import fused  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: to rounding of a sum; half precision: within 2 ulps of each row's largest value, mostly equal."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6)
        return
    scale = expected.float().abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(actual.dtype).tiny)
    diff = (actual.float() - expected.float()).abs()
    assert bool((diff <= 2 * torch.finfo(actual.dtype).eps * scale).all()), f"max diff {diff.max().item()}"
    # Most elements equal: over 95% under the interpreter; 83-88% compiled on an H200 (2026-12-01), where
    # RoPE's products stay in float32. A wrong pairing of channels or heads would leave almost none equal.
    assert (diff == 0).float().mean().item() > 0.75


def random(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [64, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype: torch.dtype, size: int, with_residual: bool) -> None:
    x = random(9, size, dtype=dtype, seed=1, scale=3.0)
    residual = random(9, size, dtype=dtype, seed=2) if with_residual else None
    weight = random(size, dtype=dtype, seed=3)
    expected, expected_sum = fused.add_rms_norm(x, residual, weight, 1e-6, backend="torch")
    to = (lambda t: t.to(DEVICE) if t is not None else None)
    out, total = fused.add_rms_norm(to(x), to(residual), to(weight), 1e-6, backend="triton")
    assert_close(out, expected)
    assert torch.equal(total.cpu(), expected_sum)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
def test_qkv_norm_rope_cache(dtype: torch.dtype, qk_norm: bool, heads: tuple[int, int]) -> None:
    num_q, num_kv = heads
    head_dim, tokens, num_pages, block_size = 32, 11, 5, 4
    qkv = random(tokens, (num_q + 2 * num_kv) * head_dim, dtype=dtype, seed=4, scale=2.0)
    positions = torch.tensor([0, 1, 2, 7, 8, 9, 30, 31, 63, 5, 5])
    angles = torch.arange(64).float()[:, None] * (1e4 ** (-torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.cat((angles, angles), dim=-1)
    cos_table, sin_table = angles.cos().to(dtype), angles.sin().to(dtype)
    q_norm = random(head_dim, dtype=dtype, seed=5) if qk_norm else None
    k_norm = random(head_dim, dtype=dtype, seed=6) if qk_norm else None
    slots = torch.randperm(num_pages * block_size, generator=torch.Generator().manual_seed(7))[:tokens]
    slots[[3, 10]] = -1  # padding rows store nothing
    cache_shape = (num_pages, block_size, num_kv, head_dim)
    expected_k, expected_v = random(*cache_shape, dtype=dtype, seed=8), random(*cache_shape, dtype=dtype, seed=9)
    actual_k, actual_v = expected_k.clone().to(DEVICE), expected_v.clone().to(DEVICE)
    expected_q = fused.qkv_norm_rope_cache(qkv, positions, cos_table, sin_table, q_norm, k_norm, 1e-6,
                                           expected_k, expected_v, slots, num_q, backend="torch")
    to = (lambda t: t.to(DEVICE) if t is not None else None)
    actual_q = fused.qkv_norm_rope_cache(to(qkv), to(positions), to(cos_table), to(sin_table), to(q_norm),
                                         to(k_norm), 1e-6, actual_k, actual_v, to(slots), num_q, backend="triton")
    assert_close(actual_q, expected_q)
    assert_close(actual_k, expected_k)
    assert torch.equal(actual_v.cpu(), expected_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [48, 1500])
def test_silu_and_mul(dtype: torch.dtype, size: int) -> None:
    gate_up = random(7, 2 * size, dtype=dtype, seed=10, scale=4.0)
    expected = fused.silu_and_mul(gate_up, backend="torch")
    assert_close(fused.silu_and_mul(gate_up.to(DEVICE), backend="triton"), expected)


def test_gumbel_max_sampling_draws_from_the_softmax() -> None:
    """Empirical frequencies of the one-pass sampler match softmax(logits / T) (chi-square)."""
    from kvpage.ops.triton_sampling import gumbel_max_sample, mix_seed

    vocab, rows, temperature = 6, 1500, 0.7
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0]).repeat(rows, 1).to(DEVICE)
    seeds = torch.tensor([mix_seed(7, row) for row in range(rows)], device=DEVICE)
    tokens = gumbel_max_sample(logits, torch.full((rows,), temperature, device=DEVICE), seeds).cpu()
    expected = torch.softmax(logits[0].cpu() / temperature, dim=-1) * rows
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[5] == 0  # probability ~1e-18
    chi2 = (((counts[:5] - expected[:5]) ** 2) / expected[:5]).sum().item()
    assert chi2 < 20.5, chi2  # 4 degrees of freedom: p < 0.0005 if the sampler were right
    # A row's draw depends only on its seed: the same seeds give the same tokens, in a batch of another
    # size too, and other seeds differ. (A fifth of the rows: the interpreter runs every row in Python.)
    few = rows // 5
    again = gumbel_max_sample(logits[:few], torch.full((few,), temperature, device=DEVICE), seeds[:few]).cpu()
    assert torch.equal(again, tokens[:few])
    other = gumbel_max_sample(logits[:few], torch.full((few,), temperature, device=DEVICE), seeds[:few] + 1).cpu()
    assert (other != tokens[:few]).float().mean() > 0.3


def test_gumbel_max_across_blocks_and_chunks_at_a_cold_temperature() -> None:
    from kvpage.ops.triton_sampling import gumbel_max_sample

    generator = torch.Generator().manual_seed(3)
    winners = [0, 1023, 1024, 8191, 8192, 16383, 19999]  # block and chunk edges (chunks of 8192 columns)
    logits = torch.randn(len(winners), 20000, generator=generator)
    logits[torch.arange(len(winners)), torch.tensor(winners)] = 50.0  # one clear winner per row
    for dtype in (torch.float32, torch.float16):
        tokens = gumbel_max_sample(logits.to(dtype).to(DEVICE), torch.full((len(winners),), 0.05, device=DEVICE),
                                   torch.arange(len(winners), device=DEVICE) * 977).cpu()
        assert tokens.tolist() == winners
