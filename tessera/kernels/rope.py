"""Rotary position embedding of queries and keys in one launch.

Op "rope": `rope(q, k, cos, sin) -> (q_rotated, k_rotated)` with q `[B, T, H, D]`, k
`[B, T, KVH, D]` and cos, sin `[B, T, D]`, `[1, T, D]` or `[T, D]` (the halves of the last
dim repeated, as `tessera.model.rope.rope_cos_sin` makes them). The rotation is the
"rotate half" convention: with x = (x1, x2) split at D/2,
`out = (x1 cos - x2 sin, x2 cos + x1 sin)`.

The torch reference is `tessera.model.rope.apply_rope` applied to q and to k (several
elementwise kernels each). The Triton kernel does both in one launch, one program per
token, computing in fp32 from the inputs' dtype and rounding once at the store. Its
backward is the inverse rotation (the same kernel with -sin). cos and sin get no gradient.
The last dim of q, k, cos and sin must be contiguous; other strides are free.
"""

from __future__ import annotations

import torch

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, tl, triton, use_pdl
from tessera.model.rope import apply_rope


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


# ---------------------------------------------------------------------------- kernel


@triton.jit
def rotate_heads(X, OUT, x_off, o_off, stride_xh, stride_oh, num_heads, c, s,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's `num_heads` heads of X (from `x_off`, heads `stride_xh` apart) rotated by
    the fp32 halves `c`, `s` `[1, BLOCK_HALF]`, stored to OUT (from `o_off`, `stride_oh`)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    x_ptr = X + x_off + offs_h[:, None] * stride_xh + offs_d[None, :]
    o_ptr = OUT + o_off + offs_h[:, None] * stride_oh + offs_d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, T, num_q_heads, num_k_heads,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h,
                 sc_b, sc_t, sign,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # a programmatic dependent launch: every input may be the previous output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    offs_d = tl.arange(0, BLOCK_HALF)
    c_off = b * sc_b + t * sc_t + offs_d
    c = tl.load(COS + c_off, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    s = sign * tl.load(SIN + c_off, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    rotate_heads(Q, QO, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, sq_h, sqo_h, num_q_heads,
                 c, s, HALF, BLOCK_HQ, BLOCK_HALF)
    rotate_heads(K, KO, b * sk_b + t * sk_t, b * sko_b + t * sko_t, sk_h, sko_h, num_k_heads,
                 c, s, HALF, BLOCK_HK, BLOCK_HALF)


# ---------------------------------------------------------------------------- launcher


def _as_btd(table: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """cos/sin as `[b, T, D]` and its batch stride (0 when shared by every row)."""
    if table.dim() == 2:
        table = table[None]
    return table, (table.stride(0) if table.shape[0] == batch and batch > 1 else 0)


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 inverse: bool = False, q_out: torch.Tensor | None = None,
                 k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (by -angle with `inverse`) into new (or the given) tensors."""
    batch, seq, num_q, head_dim = q.shape
    assert k.shape[:2] == (batch, seq) and k.shape[3] == head_dim, "q and k shapes differ"
    assert head_dim % 2 == 0, "head_dim must be even"
    cos, stride_cb = _as_btd(cos, batch)
    sin, _ = _as_btd(sin, batch)
    assert cos.shape[1:] == (seq, head_dim) and sin.shape == cos.shape, "bad cos/sin shape"
    assert sin.stride() == cos.stride(), "cos and sin must share strides"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        assert t.stride(-1) == 1, f"{name}'s last dim must be contiguous"
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    if q.numel() == 0:
        return q_out, k_out
    num_k = k.shape[2]
    pdl = use_pdl(q.device)
    _rope_kernel[(batch * seq,)](
        q, k, q_out, k_out, cos, sin, seq, num_q, num_k,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
        stride_cb, cos.stride(1), -1.0 if inverse else 1.0,
        HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_q),
        BLOCK_HK=triton.next_power_of_2(num_k),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), USE_PDL=pdl, launch_pdl=pdl)
    return q_out, k_out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = rope_forward(dq.contiguous(), dk.contiguous(), cos, sin, inverse=True)
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rotary embedding of q and k (differentiable in q and k)."""
    return _Rope.apply(q, k, cos, sin)


registry.register("rope", "torch", rope_reference, reference=True)
if HAS_TRITON:
    registry.register("rope", "triton", rope, supports=registry.on_cuda)
