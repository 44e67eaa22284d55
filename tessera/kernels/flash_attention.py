"""Flash attention (FlashAttention-2 style) forward and backward in Triton.

Implements the "attention" op contract of `tessera.model.attention`:

    flash_attention(q, k, v, *, causal, q_offset=0, cu_seqlens=None) -> out

q `[B, Tq, H, D]`, k and v `[B, Tk, KVH, D]`, out `[B, Tq, H, D]`. With `causal`, query i
sits at position `q_offset + i` and sees keys `0 .. q_offset + i`. `cu_seqlens` (int32
`[S + 1]`, B == 1, Tq == Tk, q_offset == 0) packs S documents along T; no token attends
across a document boundary. NOTE: `cu_seqlens[0] == 0` and `cu_seqlens[-1] == T` are the
caller's to guarantee; checking them would cost a device-to-host sync.

Query head h reads key/value head `h // (H // KVH)` (GQA, MQA) without repeating K/V in
memory. fp16, bf16 and fp32 inputs (fp32 dots run as TF32 on GPUs); any head dim up to
128, padded with zeros to a power of two >= 16 where it is not one.

Forward: one program per (block of queries, sequence, head) streams key blocks with an
online softmax and saves the base-2 logsumexp of each query's scaled scores. Backward: a
small kernel computes `delta = rowsum(out * dout)`; one kernel per (block of keys, sequence,
kv head) accumulates dk and dv over every query head of its group (no atomics); another
per (block of queries, sequence, head) accumulates dq. Key/query ranges a block cannot see
under the causal mask are skipped, and masks are applied only on blocks that need them.

Tile sizes are autotuned per (head dim, causal, varlen, length bucket, dtypes); under
Triton's CPU interpreter (`TRITON_INTERPRET=1`) one small fixed tile is used instead.
This module knows nothing about KV caches or paging: callers pass dense K/V.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, interpreting, tl, triton

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535  # CUDA's limit on grid dim 1, which holds (sequence, head) pairs


def _configs(tiles: list[tuple[int, int, int, int]], interpreted: tuple[int, int]) -> list:
    """Autotune candidates `(BLOCK_M, BLOCK_N, num_warps, num_stages)`, or one small tile
    under the interpreter, where benchmarking would take minutes."""
    if interpreting():
        tiles = [(*interpreted, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


# Forward and dq hold BLOCK_M queries and stream BLOCK_N keys; dk/dv hold BLOCK_N keys and
# stream BLOCK_M queries. The interpreter's tiles differ so that tests cover BLOCK_M != BLOCK_N.
_FWD_CONFIGS = _configs([(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                         (128, 64, 8, 4)], interpreted=(32, 16))
_DKDV_CONFIGS = _configs([(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3),
                          (64, 128, 8, 2)], interpreted=(16, 32))
_DQ_CONFIGS = _configs([(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3),
                        (128, 128, 8, 2)], interpreted=(32, 16))
# The autotuner appends every tensor argument's dtype to this key by itself.
_TUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "VARLEN"]


# ---------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lo, hi, len_k,
               q_offset, qk_scale, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               MASKED: tl.constexpr):
    """Online softmax over key blocks [lo, hi); scores are kept in the base-2 domain."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[:, None] < len_k, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            visible = cols[None, :] < len_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= q_offset + offs_m[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vt, mask=cols[:, None] < len_k, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vt)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, OUT, LSE, CU_SEQLENS,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                num_heads, group, Tq, Tk, q_offset, qk_scale, T_BUCKET,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Last query blocks first: under the causal mask they see the most keys, so the grid's
    # tail is made of short programs.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    zh = tl.program_id(1)
    z = zh // num_heads  # a batch row, or a document of the packed row when VARLEN
    h = zh % num_heads
    if VARLEN:
        batch = 0
        seq_start = tl.load(CU_SEQLENS + z).to(tl.int64)
        len_q = (tl.load(CU_SEQLENS + z + 1) - seq_start).to(tl.int32)
        len_k = len_q
    else:
        batch = z.to(tl.int64)
        seq_start = 0
        len_q = Tq
        len_k = Tk
    if start_m >= len_q:
        return
    q_base = Q + batch * stride_qb + seq_start * stride_qt + h * stride_qh
    k_base = K + batch * stride_kb + seq_start * stride_kt + (h // group) * stride_kh
    v_base = V + batch * stride_vb + seq_start * stride_vt + (h // group) * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=offs_m[:, None] < len_q, other=0.0)
    k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]

    # Keys [0, full_end) are visible to every query of the block; [full_end, hi) need masks.
    if CAUSAL:
        hi = tl.minimum(q_offset + start_m + BLOCK_M, len_k)
        full_end = tl.minimum(q_offset + start_m + 1, len_k) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_end = len_k // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                               0, full_end, len_k, q_offset, qk_scale,
                               BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, MASKED=False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                               full_end, hi, len_k, q_offset, qk_scale,
                               BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, MASKED=True)

    row_ok = offs_m < len_q
    o_base = OUT + batch * stride_ob + seq_start * stride_ot + h * stride_oh
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    lse_base = LSE + (batch * num_heads + h) * Tq + seq_start
    tl.store(lse_base + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(OUT, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot,
                      stride_doh, num_heads, Tq,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, t] = sum_d out * dout, the softmax-gradient correction of each query."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    zh = tl.program_id(1).to(tl.int64)
    z = zh // num_heads
    h = zh % num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    o = tl.load(OUT + z * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot
                + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)
    do = tl.load(DO + z * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=rows, other=0.0).to(tl.float32)
    tl.store(DELTA + zh * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                offs_n, lo, hi, len_q, q_offset, qk_scale, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate one query head's contribution to dk, dv over query blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m < len_q
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=rows[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=rows[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rows, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
        if MASKED:
            visible = rows[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= q_offset + offs_m[None, :])
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                     num_heads, num_kv_heads, group, Tq, Tk, q_offset, qk_scale, sm_scale,
                     T_BUCKET, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    zh = tl.program_id(1)
    z = zh // num_kv_heads
    kv_h = zh % num_kv_heads
    if VARLEN:
        batch = 0
        seq_start = tl.load(CU_SEQLENS + z).to(tl.int64)
        len_q = (tl.load(CU_SEQLENS + z + 1) - seq_start).to(tl.int32)
        len_k = len_q
    else:
        batch = z.to(tl.int64)
        seq_start = 0
        len_q = Tq
        len_k = Tk
    if start_n >= len_k:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n[:, None] < len_k
    k_base = K + batch * stride_kb + seq_start * stride_kt + kv_h * stride_kh
    v_base = V + batch * stride_vb + seq_start * stride_vt + kv_h * stride_vh
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=cols, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=cols, other=0.0)

    # Query blocks [lo, full_start) straddle the causal diagonal, [full_start, full_end) see
    # this whole key block, [full_end, end) hold the ragged last rows; all need masks but
    # the middle range.
    end = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(start_n - q_offset, 0) // BLOCK_M * BLOCK_M
        last_col = tl.minimum(start_n + BLOCK_N, len_k) - 1
        full_start = tl.cdiv(tl.maximum(last_col - q_offset, 0), BLOCK_M) * BLOCK_M
        full_start = tl.maximum(full_start, lo)
    else:
        lo = 0
        full_start = 0
    full_end = tl.maximum(full_start, len_q // BLOCK_M * BLOCK_M)
    diag_end = tl.minimum(full_start, end)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(group):
        h = kv_h * group + g
        q_base = Q + batch * stride_qb + seq_start * stride_qt + h * stride_qh
        do_base = DO + batch * stride_dob + seq_start * stride_dot + h * stride_doh
        lse_base = LSE + (batch * num_heads + h) * Tq + seq_start
        delta_base = DELTA + (batch * num_heads + h) * Tq + seq_start
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_dot, offs_n, lo, diag_end, len_q, q_offset, qk_scale,
                             HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL, MASKED=True)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_dot, offs_n, full_start, full_end, len_q, q_offset,
                             qk_scale, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL,
                             MASKED=False)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_dot, offs_n, full_end, end, len_q, q_offset, qk_scale,
                             HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL, MASKED=True)

    dk_base = DK + batch * stride_dkb + seq_start * stride_dkt + kv_h * stride_dkh
    dv_base = DV + batch * stride_dvb + seq_start * stride_dvt + kv_h * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=cols)
    tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=cols)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lo, hi,
              len_k, q_offset, qk_scale, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr):
    """Accumulate dq over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[:, None] < len_k, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=cols[:, None] < len_k, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            visible = cols[None, :] < len_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= q_offset + offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dqb, stride_dqt, stride_dqh,
                   num_heads, group, Tq, Tk, q_offset, qk_scale, sm_scale, T_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Last query blocks first: under the causal mask they see the most keys, so the grid's
    # tail is made of short programs.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    zh = tl.program_id(1)
    z = zh // num_heads
    h = zh % num_heads
    if VARLEN:
        batch = 0
        seq_start = tl.load(CU_SEQLENS + z).to(tl.int64)
        len_q = (tl.load(CU_SEQLENS + z + 1) - seq_start).to(tl.int32)
        len_k = len_q
    else:
        batch = z.to(tl.int64)
        seq_start = 0
        len_q = Tq
        len_k = Tk
    if start_m >= len_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < len_q
    q_base = Q + batch * stride_qb + seq_start * stride_qt + h * stride_qh
    do_base = DO + batch * stride_dob + seq_start * stride_dot + h * stride_doh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None],
                other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows[:, None],
                 other=0.0)
    row_base = (batch * num_heads + h) * Tq + seq_start
    lse = tl.load(LSE + row_base + offs_m, mask=rows, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=rows, other=0.0)
    k_base = K + batch * stride_kb + seq_start * stride_kt + (h // group) * stride_kh
    v_base = V + batch * stride_vb + seq_start * stride_vt + (h // group) * stride_vh
    k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]

    # The same key ranges as the forward.
    if CAUSAL:
        hi = tl.minimum(q_offset + start_m + BLOCK_M, len_k)
        full_end = tl.minimum(q_offset + start_m + 1, len_k) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_end = len_k // BLOCK_N * BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, 0,
                   full_end, len_k, q_offset, qk_scale, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL,
                   MASKED=False)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                   full_end, hi, len_k, q_offset, qk_scale, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL,
                   MASKED=True)
    dq_base = DQ + batch * stride_dqb + seq_start * stride_dqt + h * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None])


# ---------------------------------------------------------------------------- launchers

_DELTA_BLOCK = 16 if interpreting() else 64
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _length_bucket(length: int) -> int:
    """Autotune key for a length: rounded up to a power of two, at least 64."""
    return max(64, triton.next_power_of_2(length))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                  cu_seqlens: torch.Tensor | None) -> None:
    assert q.dim() == 4 and k.dim() == 4, f"q, k must be 4-d, got {q.shape}, {k.shape}"
    assert v.shape == k.shape, f"v {tuple(v.shape)} must match k {tuple(k.shape)}"
    batch, _, num_heads, head_dim = q.shape
    assert k.shape[0] == batch and k.shape[3] == head_dim, f"q {q.shape} vs k {k.shape}"
    assert k.shape[1] >= 1, "need at least one key"
    assert num_heads % k.shape[2] == 0, f"{num_heads} query heads, {k.shape[2]} kv heads"
    assert q.dtype == k.dtype == v.dtype and q.dtype in _DTYPES, f"dtypes {q.dtype}, " \
        f"{k.dtype}, {v.dtype}: need one of {_DTYPES}"
    assert head_dim in (16, 32, 64, 128), f"head dim {head_dim}: pad to a power of 2 in " \
        "[16, 128] (flash_attention does)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(3) == 1, f"{name}: head dim must be contiguous, strides {t.stride()}"
        assert t.device == q.device, f"{name} on {t.device}, q on {q.device}"
        assert t.shape[1] * max(t.stride(1), 1) < 2**31, f"{name}: too long for int32 offsets"
    assert q_offset >= 0, f"q_offset {q_offset} < 0"
    if cu_seqlens is not None:
        assert batch == 1 and q.shape[1] == k.shape[1] and q_offset == 0, \
            "cu_seqlens needs B == 1, Tq == Tk and q_offset == 0"
        assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1, "cu_seqlens: int32 [S+1]"
        assert cu_seqlens.is_contiguous() and cu_seqlens.device == q.device, \
            "cu_seqlens must be contiguous and on q's device"
    assert _num_seqs(q, cu_seqlens) * num_heads <= _MAX_GRID_Y, "too many sequences x heads"


def _num_seqs(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def _check_like(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    assert t.shape == like.shape and t.dtype == like.dtype, \
        f"{name}: {t.dtype}{tuple(t.shape)}, expected {like.dtype}{tuple(like.shape)}"
    assert t.stride(3) == 1 and t.device == like.device, f"{name}: bad layout or device"


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      q_offset: int = 0, cu_seqlens: torch.Tensor | None = None,
                      sm_scale: float | None = None, out: torch.Tensor | None = None,
                      lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; returns `(out [B, Tq, H, D], lse [B, H, Tq] fp32)`, where lse is
    the base-2 logsumexp of each query's scores times `sm_scale * log2(e)`. `out` and `lse`
    are optional preallocated outputs."""
    _check_inputs(q, k, v, q_offset, cu_seqlens)
    batch, num_q, num_heads, head_dim = q.shape
    num_k, num_kv_heads = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    out = torch.empty_like(q) if out is None else out
    _check_like("out", out, q)
    if lse is None:
        lse = torch.empty(batch, num_heads, num_q, dtype=torch.float32, device=q.device)
    assert lse.shape == (batch, num_heads, num_q) and lse.dtype == torch.float32, "lse"
    assert lse.is_contiguous() and lse.device == q.device, "lse: contiguous, on q's device"
    varlen = cu_seqlens is not None
    grid = lambda meta: (triton.cdiv(num_q, meta["BLOCK_M"]),
                         _num_seqs(q, cu_seqlens) * num_heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens if varlen else q,  # q: a placeholder, never read
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        num_heads, num_heads // num_kv_heads, num_q, num_k, q_offset, sm_scale * _LOG2E,
        _length_bucket(max(num_q, num_k)), HEAD_DIM=head_dim, CAUSAL=causal, VARLEN=varlen)
    return out, lse


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, *, causal: bool,
                       q_offset: int = 0, cu_seqlens: torch.Tensor | None = None,
                       sm_scale: float | None = None, dq: torch.Tensor | None = None,
                       dk: torch.Tensor | None = None, dv: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward from the forward's `out` and `lse`; returns `(dq, dk, dv)`, dk and
    dv summed over the query heads that share each kv head."""
    _check_inputs(q, k, v, q_offset, cu_seqlens)
    _check_like("dout", dout, q)
    _check_like("out", out, q)
    batch, num_q, num_heads, head_dim = q.shape
    num_k, num_kv_heads = k.shape[1], k.shape[2]
    assert lse.shape == (batch, num_heads, num_q) and lse.dtype == torch.float32, "lse"
    assert lse.is_contiguous(), "lse must be contiguous"
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    dq, dk, dv = (torch.empty_like(t) if g is None else g for t, g in ((q, dq), (k, dk), (v, dv)))
    for name, g, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_like(name, g, t)
    delta = torch.empty_like(lse)
    _bwd_delta_kernel[(triton.cdiv(num_q, _DELTA_BLOCK), batch * num_heads)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], num_heads, num_q,
        HEAD_DIM=head_dim, BLOCK_M=_DELTA_BLOCK)
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else q  # q: a placeholder, never read
    num_seqs, group = _num_seqs(q, cu_seqlens), num_heads // num_kv_heads
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, VARLEN=varlen)
    tune = (q_offset, sm_scale * _LOG2E, sm_scale, _length_bucket(max(num_q, num_k)))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    dkdv_grid = lambda meta: (triton.cdiv(num_k, meta["BLOCK_N"]),
                              num_seqs * num_kv_heads)
    _bwd_dkdv_kernel[dkdv_grid](
        q, k, v, dout, lse, delta, dk, dv, cu, *strides, *dk.stride()[:3], *dv.stride()[:3],
        num_heads, num_kv_heads, group, num_q, num_k, *tune, **common)
    dq_grid = lambda meta: (triton.cdiv(num_q, meta["BLOCK_M"]), num_seqs * num_heads)
    _bwd_dq_kernel[dq_grid](
        q, k, v, dout, lse, delta, dq, cu, *strides, *dq.stride()[:3],
        num_heads, group, num_q, num_k, *tune, **common)
    return dq, dk, dv


# ---------------------------------------------------------------------------- autograd


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, q_offset, cu_seqlens, sm_scale):
        out, lse = attention_forward(q, k, v, causal=causal, q_offset=q_offset,
                                     cu_seqlens=cu_seqlens, sm_scale=sm_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.causal, ctx.q_offset, ctx.sm_scale = causal, q_offset, sm_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if dout.stride(3) != 1:
            dout = dout.contiguous()
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=ctx.causal,
                                        q_offset=ctx.q_offset, cu_seqlens=cu_seqlens,
                                        sm_scale=ctx.sm_scale)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    q_offset: int = 0, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The "attention" op (see the module docstring), differentiable in q, k and v."""
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention supports head dims up to {MAX_HEAD_DIM}, "
                         f"got {head_dim}; use the 'sdpa' or 'torch' attention backend")
    padded = max(16, triton.next_power_of_2(head_dim))
    if padded != head_dim:  # zero columns change neither q.k nor the softmax
        q, k, v = (F.pad(t, (0, padded - head_dim)) for t in (q, k, v))
    out = _FlashAttention.apply(q, k, v, causal, q_offset, cu_seqlens,
                                1.0 / math.sqrt(head_dim))
    return out[..., :head_dim] if padded != head_dim else out


if HAS_TRITON:
    registry.register("attention", "triton", flash_attention, supports=registry.on_cuda,
                      priority=2)
