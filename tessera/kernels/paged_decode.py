"""Paged decode attention: a few queries per sequence against the block-table KV pool.

A Triton implementation of the op "paged_attention" (the contract and its torch reference
live in `tessera.serve.paged_attention`):

    paged_attention(q [N, H, D], k_cache, v_cache [num_blocks, block_size, KVH, D], *,
                    block_tables int32 [S, max_blocks], context_lens int32 [S],
                    cu_seqlens_q int32 [S + 1], max_query_len, max_context_len) -> [N, H, D]

Query i of sequence s sits at position `context_lens[s] - q_len_s + i` and attends causally;
scale 1/sqrt(D); query head h reads kv head `h // (H // KVH)`.

The kernel is for decoding: `max_query_len <= MAX_QUERY_LEN` (one query per sequence, or a
few for speculative verification). Longer queries (prefill chunks) go to the next registered
implementation (SDPA) instead. Keys and values are read straight from the pool through the
block table, one gathered row per token, so any block size works.

One launch: one program per (sequence, kv head, split). It holds every query row of the kv
head's group (`q_len * H / KVH` rows, padded to a power of two >= 16) so that each key and
value is read once per group, and streams the split's range of context positions with an
online softmax (base 2). Where a sequence's context fits in one split, that split writes the
normalised output. Otherwise each split writes its normalised partial output and logsumexp
(fp32) and takes a ticket from an atomic counter per (sequence, kv head); the split that
draws the last ticket merges the partials by their logsumexps, writes the output and resets
the counter (`split_counters`). No second launch, so a decode step has one attention
kernel per layer.

The number of splits is chosen from the host ints S, KVH and `max_context_len` so that the
grid fills the GPU (see `choose_num_splits`); it does not depend on the contents of
`context_lens`. Splits past a sequence's context return at once. The tile (positions per
loop step) and launch settings are autotuned once per (group size, block size, query rows,
head dim, split or not, dtypes); NOTE: so the first call of each such shape benchmarks, and
must not be the one captured in a CUDA graph, and it should see contexts of a realistic
length (the best tile for one-token contexts is not the best for a thousand).

NOTE: positions at or past a sequence's context are never loaded (masked loads, and
`tl.where` on scores, never multiplication by a mask), so unused pool slots may hold
anything, NaN included. This module knows nothing about how blocks are allocated.
"""

from __future__ import annotations

import math

import torch

from tessera.kernels import registry
from tessera.kernels._triton import HAS_TRITON, interpreting, tl, triton, use_pdl

MAX_QUERY_LEN = 8  # longest query per sequence the kernel handles; longer -> reference
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535
_SPLIT_ALIGN = 128  # on GPUs, split boundaries fall on multiples of every tile size below
# (and splits are at least this long)


def _configs() -> list:
    """Autotune candidates `(BLOCK_N, num_warps, num_stages)`: positions per loop step and
    launch settings. Under the interpreter one small tile, so that tests cross tiles."""
    tiles = [(16, 4, 1)] if interpreting() else \
        [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 4)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in tiles]


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _with_dim_mask(rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """`[R, BLOCK_D]` mask from a row mask, masking the head dim only where it is padded
    (a mask constant along D keeps the loads vectorised)."""
    if HEAD_DIM == BLOCK_D:
        mask = rows_ok[:, None] & (offs_d < BLOCK_D)[None, :]
    else:
        mask = rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _attend_split(Q, K, V, BLOCK_TABLES, q_start, q_len, context_len, seq, kv_h, lo, hi,
                  stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                  stride_vh, stride_bt, qk_scale, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of one kv group's query rows over context positions [lo, hi).
    Returns (unnormalised acc [BLOCK_M, BLOCK_D], running max m, running sum l), base 2."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = offs_m // GROUP  # query of the sequence held by this row
    head = kv_h * GROUP + offs_m % GROUP
    row_ok = q_idx < q_len
    q_ptrs = Q + (q_start + q_idx).to(tl.int64)[:, None] * stride_qn \
        + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=_with_dim_mask(row_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    last_visible = context_len - q_len + q_idx  # causal: the row's own position

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        in_range = pos < hi
        block = tl.load(table + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kv_mask = _with_dim_mask(in_range, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(K + block[:, None] * stride_kb + slot[:, None] * stride_kt
                    + kv_h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + block[:, None] * stride_vb + slot[:, None] * stride_vt
                    + kv_h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = in_range[None, :] & (pos[None, :] <= last_visible[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row that has seen nothing yet keeps m = -inf; shift it by 0 to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(scores - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_configs(), key=["GROUP", "BLOCK_SIZE", "BLOCK_M", "HEAD_DIM",
                                          "SPLIT"])
@triton.jit
def _paged_decode_kernel(Q, K, V, OUT, O_PART, LSE_PART, COUNTERS, BLOCK_TABLES,
                         CONTEXT_LENS, CU_SEQLENS_Q, stride_qn, stride_qh, stride_kb,
                         stride_kt, stride_kh,
                         stride_vb, stride_vt, stride_vh, stride_on, stride_oh, stride_bt,
                         num_heads, tokens_per_split, qk_scale, GROUP: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
                         PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # a programmatic dependent launch: every input may be the previous output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    seq = tl.program_id(0)
    kv_h = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_start
    context_len = tl.load(CONTEXT_LENS + seq)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, context_len)
    if (q_len <= 0) | (lo >= hi):
        return
    acc, m_i, l_i = _attend_split(
        Q, K, V, BLOCK_TABLES, q_start, q_len, context_len, seq, kv_h, lo, hi, stride_qn,
        stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        qk_scale, GROUP=GROUP, BLOCK_SIZE=BLOCK_SIZE, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=PRECISION)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row = (q_start + offs_m // GROUP).to(tl.int64)
    head = kv_h * GROUP + offs_m % GROUP
    row_ok = offs_m // GROUP < q_len
    out_mask = _with_dim_mask(row_ok, offs_d, HEAD_DIM, BLOCK_D)
    # A row may see no position of this split (causal, speculative queries): l = 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out_ptrs = OUT + row[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :]
    if SPLIT:
        used = tl.cdiv(context_len, tokens_per_split)  # splits with positions to read
        if used > 1:
            _store_partial_or_merge(O_PART, LSE_PART, COUNTERS, out_ptrs, out, m_i, l_i,
                                    l_safe, row, head, row_ok, out_mask, offs_d, seq, kv_h,
                                    split, used, num_heads, HEAD_DIM, BLOCK_M, BLOCK_D)
        else:
            tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _store_partial_or_merge(O_PART, LSE_PART, COUNTERS, out_ptrs, out, m_i, l_i, l_safe, row,
                            head, row_ok, out_mask, offs_d, seq, kv_h, split, used, num_heads,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """Store this split's partial output and logsumexp, and take a ticket; the split that
    draws the last one merges every split's partials into the output and resets the
    counter for the next launch. acq_rel: the other splits' stores are visible to it."""
    part = (row * num_heads + head) * tl.num_programs(2) + split
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(LSE_PART + part, lse, mask=row_ok)
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)
    counter = COUNTERS + seq * tl.num_programs(1) + kv_h
    tl.debug_barrier()  # every thread's stores above precede the ticket (its release)
    if tl.atomic_add(counter, 1, sem="acq_rel") == used - 1:
        tl.atomic_xchg(counter, 0)
        tl.debug_barrier()  # every thread reads the partials after the ticket (acquire)
        first = (row * num_heads + head) * tl.num_programs(2)
        merged = _merge_splits(O_PART, LSE_PART, first, used, row_ok, out_mask, offs_d,
                               HEAD_DIM, BLOCK_M, BLOCK_D)
        tl.store(out_ptrs, merged.to(out_ptrs.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits(O_PART, LSE_PART, first, used, row_ok, out_mask, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows' outputs from their `used` partial outputs at parts `first + s`, weighted by
    their logsumexps (online, base 2). Split 0 always sees position 0, so the running
    max is finite from the first split on (rows past the query: lse 0, never stored)."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, used):
        lse = tl.load(LSE_PART + first + s, mask=row_ok, other=0.0, cache_modifier=".cg")
        o = tl.load(O_PART + (first + s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=out_mask, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        weight = tl.exp2(lse - m_new)
        total = total * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * o
        m = m_new
    return acc / total[:, None]


# ---------------------------------------------------------------------------- launchers


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int,
                      device: torch.device) -> int:
    """Splits per (sequence, kv head) so that about four programs per SM run, each over at
    least 128 positions; one where the grid is already full or the context is short.
    (Measured on an H200 inside CUDA graphs, one sequence of 128-384 tokens: 6.0-6.1 us a
    launch with 128-position splits against 7.1-7.5 with 256.)"""
    if device.type != "cuda":
        return max(1, min(4, -(-max_context_len // 256)))
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-4 * num_sms // max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, -(-max_context_len // _SPLIT_ALIGN), _MAX_GRID_YZ))


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MIN_COUNTERS = 1 << 14


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counters on `device`, one per (sequence, kv head): how
    many splits have finished. Every launch leaves them at zero again (the last split
    resets its counter), so one buffer per device serves every launch and every CUDA graph.
    NOTE: launches must not overlap (one stream), and the buffer can grow only outside
    graph capture: run each shape eagerly once before capturing it."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged decode: split counters must grow while capturing a "
                               "CUDA graph; run this shape once eagerly first")
        counters = torch.zeros(max(count, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, max_query_len: int) -> None:
    assert q.dim() == 3 and k_cache.dim() == 4, f"q {tuple(q.shape)}, k_cache {k_cache.shape}"
    assert v_cache.shape == k_cache.shape, f"v_cache {v_cache.shape} vs k_cache {k_cache.shape}"
    num_heads, head_dim = q.shape[1:]
    assert k_cache.shape[3] == head_dim, f"head dims: q {head_dim}, cache {k_cache.shape[3]}"
    assert num_heads % k_cache.shape[2] == 0, f"{num_heads} heads, {k_cache.shape[2]} kv heads"
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in _DTYPES, \
        f"dtypes q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}: one of {_DTYPES}"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name}: head dim must be contiguous, strides {t.stride()}"
        assert t.device == q.device, f"{name} on {t.device}, q on {q.device}"
    num_seqs = context_lens.shape[0]
    for name, t, shape in (("block_tables", block_tables, (num_seqs, block_tables.shape[-1])),
                           ("context_lens", context_lens, (num_seqs,)),
                           ("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,))):
        assert t.dtype == torch.int32 and tuple(t.shape) == shape, \
            f"{name}: {t.dtype}{tuple(t.shape)}, expected int32{shape}"
        assert t.device == q.device and t.stride(-1) == 1, f"{name}: layout or device"
    assert cu_seqlens_q.is_contiguous() and context_lens.is_contiguous()
    assert 1 <= max_query_len <= MAX_QUERY_LEN, \
        f"max_query_len {max_query_len}: the decode kernel handles 1..{MAX_QUERY_LEN}"
    assert num_heads <= _MAX_GRID_YZ and max_query_len <= _MAX_GRID_YZ


def paged_decode_forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, max_query_len: int, max_context_len: int,
                         num_splits: int | None = None, out: torch.Tensor | None = None,
                         tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Launch the decode kernel(s); returns `out [N, H, D]` (optionally preallocated).

    `num_splits` (default: `choose_num_splits`) bounds the number of context ranges each
    (sequence, kv head) is cut into; each range covers `ceil(max_context_len / num_splits)`
    positions (with the default, rounded up to a multiple of 128 on GPUs). `tile`
    `(BLOCK_N, num_warps, num_stages)` launches that configuration instead of the
    autotuned one (benchmarks compare them).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                  max_query_len)
    num_rows, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out"
    num_seqs = context_lens.shape[0]
    if num_rows == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    max_context_len = max(1, max_context_len)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, q.device)
        tokens_per_split = -(-max_context_len // num_splits)
        if q.device.type == "cuda":
            tokens_per_split = -(-tokens_per_split // _SPLIT_ALIGN) * _SPLIT_ALIGN
    else:
        tokens_per_split = -(-max_context_len // num_splits)
    num_splits = -(-max_context_len // tokens_per_split)
    split = num_splits > 1
    o_part = lse_part = counters = out  # placeholders, never touched with one split
    if split:
        lse_part = torch.empty(num_rows, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
        o_part = torch.empty(num_rows, num_heads, num_splits, head_dim, dtype=torch.float32,
                             device=q.device)
        counters = split_counters(q.device, num_seqs * num_kv_heads)
    kernel, launch, pdl = _paged_decode_kernel, {}, use_pdl(q.device)
    if tile is not None:
        kernel = _paged_decode_kernel.fn  # the JIT function under the autotuner
        launch = dict(BLOCK_N=tile[0], num_warps=tile[1], num_stages=tile[2])
    kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, o_part, lse_part, counters, block_tables, context_lens,
        cu_seqlens_q, *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *out.stride()[:2], block_tables.stride(0), num_heads, tokens_per_split,
        _LOG2E / math.sqrt(head_dim), GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_M=max(16, triton.next_power_of_2(max_query_len * group)), BLOCK_D=block_d,
        SPLIT=split, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_PDL=pdl, launch_pdl=pdl, **launch)
    return out


# ---------------------------------------------------------------------------- the op


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, max_query_len: int,
                           max_context_len: int) -> torch.Tensor:
    """The op "paged_attention": the decode kernel for `max_query_len <= MAX_QUERY_LEN`,
    the next registered implementation (SDPA) for longer queries (prefill chunks)."""
    kwargs = dict(block_tables=block_tables, context_lens=context_lens,
                  cu_seqlens_q=cu_seqlens_q, max_query_len=max_query_len,
                  max_context_len=max_context_len)
    if max_query_len > MAX_QUERY_LEN or q.dtype not in _DTYPES:
        return registry.fallback("paged_attention", "triton", q.device)(q, k_cache, v_cache,
                                                                          **kwargs)
    if q.stride(-1) != 1:
        q = q.contiguous()
    return paged_decode_forward(q, k_cache, v_cache, **kwargs)


if HAS_TRITON:
    registry.register("paged_attention", "triton", paged_attention_triton,
                      supports=registry.on_cuda, priority=2)
