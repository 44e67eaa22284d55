"""Rotary embedding of a step's queries and keys and the KV-pool write, in one launch.

Op "rope_kv_write": `rope_kv_write(q, k, v, cos, sin, key_cache, value_cache, slot_mapping)
-> (q_rotated, k_rotated)` with q `[N, H, D]`, k and v `[N, KVH, D]`, cos and sin `[N, D]`
(as "rope" takes them), key_cache and value_cache `[num_blocks, block_size, KVH, D]` (one
layer of the pool, contiguous) and slot_mapping int64 `[N]`: token i's rotated keys and its
values are stored at slot `slot_mapping[i]`, and the rotated q and k are returned as new
tensors (a prefill attends to the call's own keys). It is the ops "rope" and then
"kv_write" (`tessera/kernels/rope.py`, `kv_write.py`; their conventions and restrictions:
each token's values contiguous, distinct slots inside the pool, not checked).

The torch reference is exactly that pair. The Triton kernel is one program per token: it
loads the token's cos and sin, rotates its query and key heads in fp32 (rounding once, at
each store, as the "rope" kernel does), writes the rotated keys both to the returned tensor
and to the pool, and copies the values to the pool. In a decode step that is one launch a
layer instead of two. There is no backward (inference only).
"""

from __future__ import annotations

import torch

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, tl, triton, use_pdl
from tessera.kernels.kv_write import check_pool_write, kv_write_reference
from tessera.kernels.rope import rope_reference, rotate_heads


def rope_kv_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, slot_mapping: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    q_rotated, k_rotated = rope_reference(q, k, cos, sin)
    kv_write_reference(k_rotated, v, key_cache, value_cache, slot_mapping)
    return q_rotated, k_rotated


# ---------------------------------------------------------------------------- kernel


@triton.jit
def _rope_kv_write_kernel(Q, K, V, QO, KO, COS, SIN, KEY_CACHE, VALUE_CACHE, SLOTS,
                          num_q_heads, num_k_heads, sq_t, sq_h, sk_t, sk_h, sv_t, sqo_t,
                          sqo_h, sko_t, sko_h, sc_t, head_dim, width, HALF: tl.constexpr,
                          BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                          BLOCK_HALF: tl.constexpr, BLOCK_KV: tl.constexpr,
                          USE_PDL: tl.constexpr):
    if USE_PDL:  # a programmatic dependent launch: every input may be the previous output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    c = tl.load(COS + token * sc_t + offs_d, mask=offs_d < HALF, other=0.0)
    s = tl.load(SIN + token * sc_t + offs_d, mask=offs_d < HALF, other=0.0)
    c, s = c.to(tl.float32)[None, :], s.to(tl.float32)[None, :]
    rotate_heads(Q, QO, token * sq_t, token * sqo_t, sq_h, sqo_h, num_q_heads, c, s, HALF,
                 BLOCK_HQ, BLOCK_HALF)
    rotate_heads(K, KO, token * sk_t, token * sko_t, sk_h, sko_h, num_k_heads, c, s, HALF,
                 BLOCK_HK, BLOCK_HALF)
    rotate_heads(K, KEY_CACHE, token * sk_t, slot * width, sk_h, head_dim, num_k_heads, c, s,
                 HALF, BLOCK_HK, BLOCK_HALF)
    cols = tl.arange(0, BLOCK_KV)
    values = tl.load(V + token * sv_t + cols, mask=cols < width)
    tl.store(VALUE_CACHE + slot * width + cols, values, mask=cols < width)


# ---------------------------------------------------------------------------- launcher


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op in one launch (see above); q and k may be strided views (unit stride on D)."""
    num_tokens, num_q, head_dim = q.shape
    num_k = k.shape[1]
    width = num_k * head_dim
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim, \
        f"q {tuple(q.shape)}, k {tuple(k.shape)}"
    check_pool_write(k, v, key_cache, value_cache, slot_mapping)
    assert q.dtype == k.dtype, "q, k, v and the caches must share a dtype"
    assert head_dim % 2 == 0, "head_dim must be even"
    assert cos.shape == sin.shape == (num_tokens, head_dim) and cos.stride() == sin.stride(), \
        f"cos and sin: ({num_tokens}, {head_dim}) with the same strides"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        assert t.stride(-1) == 1, f"{name}'s last dim must be contiguous"
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens == 0:
        return q_out, k_out
    pdl = use_pdl(q.device)
    _rope_kv_write_kernel[(num_tokens,)](
        q, k, v, q_out, k_out, cos, sin, key_cache, value_cache, slot_mapping, num_q, num_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), q_out.stride(0),
        q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0), head_dim, width,
        HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_q),
        BLOCK_HK=triton.next_power_of_2(num_k),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        BLOCK_KV=triton.next_power_of_2(width), USE_PDL=pdl, launch_pdl=pdl)
    return q_out, k_out


registry.register("rope_kv_write", "torch", rope_kv_write_reference, reference=True)
if HAS_TRITON:
    registry.register("rope_kv_write", "triton", rope_kv_write, supports=registry.on_cuda)
