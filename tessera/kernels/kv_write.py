"""Store one layer's new keys and values in the paged KV pool, both in one launch.

Op "kv_write": `kv_write(k, v, key_cache, value_cache, slot_mapping) -> None` with k, v
`[N, KVH, D]` (each token's `KVH * D` values contiguous; the token stride is free, so views
of a fused q/k/v product need no copy), key_cache, value_cache
`[num_blocks, block_size, KVH, D]` (one layer of the pool, contiguous) and slot_mapping
int64 `[N]`: token i goes to slot `slot_mapping[i]` = block id * block_size + offset.
Slots must be distinct and inside the pool; the op does not check them (a device-side
check would cost a sync).

The torch reference is two `index_copy_` calls (two launches). The Triton kernel is one
program per token copying its keys and its values; the engine calls it once per layer, so
in a decode step it takes one launch per layer off the graph.
"""

from __future__ import annotations

import torch

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, tl, triton, use_pdl


def kv_write_reference(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slot_mapping, v)


# ---------------------------------------------------------------------------- kernel


@triton.jit
def _kv_write_kernel(K, V, KEY_CACHE, VALUE_CACHE, SLOTS, stride_k, stride_v, width,
                     BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # a programmatic dependent launch: every input may be the previous output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + token).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    k = tl.load(K + token * stride_k + cols, mask=mask)
    v = tl.load(V + token * stride_v + cols, mask=mask)
    tl.store(KEY_CACHE + slot * width + cols, k, mask=mask)
    tl.store(VALUE_CACHE + slot * width + cols, v, mask=mask)


def check_pool_write(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """What storing k, v `[N, KVH, D]` in one layer of the pool needs (see above): shapes
    and dtypes that match, contiguous caches, int64 slots, each token's values contiguous
    (k's are checked by the caller: a kernel may read them strided)."""
    assert v.shape == k.shape, f"k {tuple(k.shape)} vs v {tuple(v.shape)}"
    assert key_cache.shape == value_cache.shape and key_cache.shape[2:] == k.shape[1:], \
        f"cache {tuple(key_cache.shape)} for k {tuple(k.shape)}"
    assert key_cache.is_contiguous() and value_cache.is_contiguous(), "caches: contiguous"
    assert k.dtype == v.dtype == key_cache.dtype == value_cache.dtype, \
        "k, v and the caches must share a dtype"
    assert slot_mapping.shape == (k.shape[0],) and slot_mapping.dtype == torch.int64
    check_token_rows("v", v)


def check_token_rows(name: str, t: torch.Tensor) -> None:
    """Each token's heads of t `[N, heads, D]` contiguous (the token stride is free)."""
    assert t.stride(2) == 1 and t.stride(1) == t.shape[2], \
        f"{name}: each token's heads must be contiguous, strides {t.stride()}"


def kv_write(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    width = num_kv_heads * head_dim
    check_pool_write(k, v, key_cache, value_cache, slot_mapping)
    check_token_rows("k", k)
    if num_tokens == 0:
        return
    pdl = use_pdl(k.device)
    _kv_write_kernel[(num_tokens,)](k, v, key_cache, value_cache, slot_mapping,
                                    k.stride(0), v.stride(0), width,
                                    BLOCK=triton.next_power_of_2(width), USE_PDL=pdl,
                                    launch_pdl=pdl)


registry.register("kv_write", "torch", kv_write_reference, reference=True)
if HAS_TRITON:
    registry.register("kv_write", "triton", kv_write, supports=registry.on_cuda)
