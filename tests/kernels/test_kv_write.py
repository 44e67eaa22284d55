"""KV-pool write kernel against the reference (two `index_copy_`), in the interpreter and on
the GPU. The pool is poisoned with NaN, so a slot written where it should not be, or a
value not written, fails; slots are a random permutation, so a kernel that ignored the
mapping would too."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import kv_write as kernels
from tessera.kernels import registry
from tessera.kernels.kv_write import kv_write_reference

# (tokens, blocks, block size, kv heads, head dim)
SMALL = [(5, 3, 4, 2, 16), (7, 4, 3, 3, 10), (1, 2, 16, 1, 64)]
LARGE = [(4096, 300, 16, 8, 128), (333, 60, 16, 3, 64), (1, 10, 16, 5, 96)]


def make_inputs(shape, dtype, device):
    tokens, blocks, block_size, kv_heads, head_dim = shape
    cache_shape = (blocks, block_size, kv_heads, head_dim)
    caches = [torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
              for _ in range(2)]
    # k and v as views of one fused row per token, as a fused q/k/v product gives
    fused = torch.randn(tokens, 3 * kv_heads, head_dim, device=device).to(dtype)
    k, v = fused[:, kv_heads:2 * kv_heads], fused[:, 2 * kv_heads:]
    slots = torch.randperm(blocks * block_size, device=device)[:tokens]
    return k, v, caches, slots


def check_write(shape, dtype, device):
    k, v, (key_cache, value_cache), slots = make_inputs(shape, dtype, device)
    expected = [key_cache.clone(), value_cache.clone()]
    kv_write_reference(k.contiguous(), v.contiguous(), *expected, slots)
    kernels.kv_write(k, v, key_cache, value_cache, slots)
    for got, want in zip((key_cache, value_cache), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    written = torch.zeros(key_cache.numel() // k[0].numel(), dtype=torch.bool, device=device)
    written[slots] = True
    rows = key_cache.view(written.shape[0], -1)
    assert not rows[written].isnan().any() and rows[~written].isnan().all()


@pytest.mark.parametrize("shape", SMALL)
def test_kv_write_interpreted(interpreter, shape):
    interpreter.run(check_write, shape, torch.float32, "cpu")


def test_reference_writes_each_token_at_its_slot():
    k, v, (key_cache, value_cache), slots = make_inputs(SMALL[1], torch.float32, "cpu")
    kv_write_reference(k, v, key_cache, value_cache, slots)
    size = key_cache.shape[1]
    for i, slot in enumerate(slots.tolist()):
        torch.testing.assert_close(key_cache[slot // size, slot % size], k[i])
        torch.testing.assert_close(value_cache[slot // size, slot % size], v[i])


def test_registry_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    assert registry.select("kv_write", "cuda").backend == "triton"
    assert registry.select("kv_write", "cpu").backend == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", LARGE)
def test_kv_write_gpu(shape, dtype):
    check_write(shape, dtype, "cuda")
