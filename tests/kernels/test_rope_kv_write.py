"""RoPE + KV-pool write kernel against a float64 rotation and the reference pair ("rope",
then "kv_write"), in the interpreter and on the GPU. The rotated outputs and the pool are
poisoned with NaN, so an element never written, or a slot written where it should not be,
fails; slots are a random permutation, so a kernel that ignored the mapping would too."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import registry
from tessera.kernels import rope_kv_write as kernels
from tessera.kernels.rope_kv_write import rope_kv_write_reference
from tessera.model.rope import inverse_frequencies, rope_cos_sin

# (tokens, q heads, kv heads, head dim, blocks, block size): odd head counts and dims, one
# token (a decode step), a pool with more slots than tokens
SMALL = [(5, 4, 2, 16, 3, 4), (7, 3, 1, 10, 4, 3), (1, 9, 3, 64, 2, 16)]
LARGE = [(1, 9, 3, 64, 40, 16), (16, 32, 8, 64, 40, 16), (333, 16, 8, 128, 60, 16)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(shape, dtype, device):
    """q, k, v as views of one fused q/k/v row per token (as the model's fused product
    gives them), cos/sin of random positions, NaN-filled caches and permuted slots."""
    tokens, hq, hk, d, blocks, block_size = shape
    fused = torch.randn(tokens, hq + 2 * hk, d, device=device).to(dtype)
    q, k, v = fused[:, :hq], fused[:, hq:hq + hk], fused[:, hq + hk:]
    positions = torch.randint(0, 4096, (tokens,), device=device)
    cos, sin = rope_cos_sin(positions, inverse_frequencies(d, 10000.0), dtype)
    caches = [torch.full((blocks, block_size, hk, d), float("nan"), dtype=dtype,
                         device=device) for _ in range(2)]
    slots = torch.randperm(blocks * block_size, device=device)[:tokens]
    return q, k, v, cos, sin, caches, slots


def rotated_float64(x, cos, sin):
    """The rotate-half rotation of x `[N, heads, D]` in float64."""
    half = x.shape[-1] // 2
    x, c, s = x.double(), cos.double()[:, None, :half], sin.double()[:, None, :half]
    return torch.cat((x[..., :half] * c - x[..., half:] * s,
                      x[..., half:] * c + x[..., :half] * s), dim=-1)


def assert_close(actual, expected, dtype):
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def check_rope_kv_write(shape, dtype, device):
    q, k, v, cos, sin, (key_cache, value_cache), slots = make_inputs(shape, dtype, device)
    q_out, k_out = kernels.rope_kv_write(q, k, v, cos, sin, key_cache, value_cache, slots)
    assert_close(q_out, rotated_float64(q, cos, sin), dtype)
    assert_close(k_out, rotated_float64(k, cos, sin), dtype)
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    assert torch.equal(key_cache[blocks, offsets], k_out)  # the same rounding, stored twice
    assert torch.equal(value_cache[blocks, offsets], v)
    written = torch.zeros(key_cache.shape[:2], dtype=torch.bool, device=device)
    written[blocks, offsets] = True
    for cache in (key_cache, value_cache):
        assert cache[~written].isnan().all(), "a slot outside the mapping was written"


def check_reference_pair(shape, dtype, device):
    """The reference is "rope" then "kv_write": the kernel's rounding of the rotation may
    differ from it by the order of fp32 operations only."""
    q, k, v, cos, sin, caches, slots = make_inputs(shape, dtype, device)
    expected_caches = [c.clone() for c in caches]
    q_ref, k_ref = rope_kv_write_reference(q, k, v, cos, sin, *expected_caches, slots)
    q_out, k_out = kernels.rope_kv_write(q, k, v, cos, sin, *caches, slots)
    for got, want in ((q_out, q_ref), (k_out, k_ref), *zip(caches, expected_caches,
                                                            strict=True)):
        assert torch.equal(got.isnan(), want.isnan())
        assert_close(got.nan_to_num(), want.nan_to_num().double(), dtype)


@pytest.mark.parametrize("shape", SMALL)
def test_rope_kv_write_interpreted(interpreter, shape):
    interpreter.run(check_rope_kv_write, shape, torch.float32, "cpu")


def test_matches_the_reference_pair_interpreted(interpreter):
    interpreter.run(check_reference_pair, SMALL[0], torch.float32, "cpu")


def test_reference_rotates_and_writes_each_token_at_its_slot():
    q, k, v, cos, sin, (key_cache, value_cache), slots = make_inputs(SMALL[1],
                                                                      torch.float32, "cpu")
    q_out, k_out = rope_kv_write_reference(q, k, v, cos, sin, key_cache, value_cache, slots)
    assert_close(q_out, rotated_float64(q, cos, sin), torch.float32)
    assert_close(k_out, rotated_float64(k, cos, sin), torch.float32)
    size = key_cache.shape[1]
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(key_cache[slot // size, slot % size], k_out[i])
        assert torch.equal(value_cache[slot // size, slot % size], v[i])


def test_launcher_refuses_mismatched_operands():
    q, k, v, cos, sin, caches, slots = make_inputs(SMALL[0], torch.float32, "cpu")
    with pytest.raises(AssertionError, match="cos and sin"):
        kernels.rope_kv_write(q, k, v, cos[:-1], sin[:-1], *caches, slots)
    with pytest.raises(AssertionError, match="share a dtype"):
        kernels.rope_kv_write(q, k, v.double(), cos, sin, *caches, slots)


def test_registry_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    assert registry.select("rope_kv_write", "cuda").backend == "triton"
    assert registry.select("rope_kv_write", "cpu").backend == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", LARGE)
def test_rope_kv_write_gpu(shape, dtype):
    check_rope_kv_write(shape, dtype, "cuda")
    check_reference_pair(shape, dtype, "cuda")
