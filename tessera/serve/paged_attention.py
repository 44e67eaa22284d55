"""Attention against the paged KV pool: the op "paged_attention" and the model's context.

The op, registered in `tessera.kernels.registry` (a torch reference, an SDPA path; a
Triton decode kernel registers beside them later), has the signature

    paged_attention(q, k_cache, v_cache, *, block_tables, context_lens, cu_seqlens_q,
                    max_query_len, max_context_len) -> out

- q `[N, H, D]`: the queries of S sequences, flattened; sequence s owns rows
  `cu_seqlens_q[s] : cu_seqlens_q[s + 1]` (`cu_seqlens_q` int32 `[S + 1]`);
- k_cache, v_cache `[num_blocks, block_size, KVH, D]`: one layer of the pool, already
  holding this call's keys and values;
- block_tables int32 `[S, max_blocks]`: each sequence's blocks in order (entries past its
  last block are ignored, any valid id will do as padding);
- context_lens int32 `[S]`: each sequence's tokens in the cache, this call's included;
- max_query_len, max_context_len: host ints bounding the two (static shapes; a decode-only
  kernel can specialise on `max_query_len == 1`, or a few for speculative verification);
- out `[N, H, D]`, q's dtype. Query i of sequence s sits at position
  `context_lens[s] - q_len_s + i` and attends causally to positions 0 .. that position: the
  earlier cached tokens plus the earlier tokens of its own chunk. Scale 1/sqrt(D); GQA.

`PagedContext` is what the model runner hands to the model: each layer's `attend` writes the
new keys and values into the pool at `slot_mapping`, then attends each `AttentionGroup` of
the call (the runner groups sequences so that each group suits one kernel): through the op;
or, for a group whose sequences all start at position 0 (`fresh_prefill`: no cached keys to
read), through the model's varlen op "attention" over the group's own keys and values. It
knows nothing about scheduling or which sequence owns which block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tessera.kernels import registry
from tessera.serve.kv_pool import KVPool


@dataclass
class PaddedBatch:
    """Queries, keys and values per sequence, padded: q `[S, Tq, H, D]`, k/v
    `[S, Tk, KVH, D]`, the causal mask `[S, Tq, Tk]` and where each query row came from."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor | None  # [S, Tq] row of q, N (one past the end) for padding;
    # None when every sequence has exactly one query row, in order (decode)


def _gather_blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks `tables [S, nb]` of one layer's pool, `[S, nb * block_size, KVH, D]`.
    `index_select` on a 2-D view of the pool: several times faster on the CPU than
    advanced indexing `cache[tables]`, the same result."""
    num_blocks, block_size, *head_shape = cache.shape
    rows = cache.reshape(num_blocks, -1).index_select(0, tables.flatten())
    return rows.view(tables.shape[0], tables.shape[1] * block_size, *head_shape)


def pad_by_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, max_query_len: int,
                    max_context_len: int) -> PaddedBatch:
    num_blocks = -(-max_context_len // k_cache.shape[1])
    tables = block_tables[:, :num_blocks].long()
    k = _gather_blocks(k_cache, tables)[:, :max_context_len]  # [S, Tk, KVH, D]
    v = _gather_blocks(v_cache, tables)[:, :max_context_len]
    key_positions = torch.arange(max_context_len, device=q.device)
    if max_query_len == 1 and q.shape[0] == block_tables.shape[0]:
        # Decode: one query per sequence, in order; no gather of q and no scatter back.
        mask = key_positions[None, None, :] < context_lens.long()[:, None, None]
        return PaddedBatch(q[:, None], k, v, mask, None)
    starts, q_lens = cu_seqlens_q[:-1].long(), (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    offsets = torch.arange(max_query_len, device=q.device)
    is_real = offsets[None] < q_lens[:, None]  # [S, Tq]
    rows = (starts[:, None] + offsets[None]).masked_fill(~is_real, q.shape[0])
    q_padded = q[rows.clamp(max=q.shape[0] - 1)]  # [S, Tq, H, D]
    q_positions = (context_lens.long() - q_lens)[:, None] + offsets[None]  # [S, Tq]
    mask = key_positions[None, None, :] <= q_positions[:, :, None]  # [S, Tq, Tk]
    return PaddedBatch(q_padded, k, v, mask, rows)


def unpad(out: torch.Tensor, rows: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    """`[S, Tq, H, D]` back to the flattened `[N, H, D]` (padding rows dropped, no sync);
    `rows` None: one row per sequence, in order (decode)."""
    if rows is None:
        return out.reshape(num_rows, *out.shape[2:])
    flat = out.new_empty(num_rows + 1, *out.shape[2:])
    flat.index_copy_(0, rows.flatten(), out.flatten(0, 1))
    return flat[:num_rows]


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              *, block_tables: torch.Tensor, context_lens: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, max_query_len: int,
                              max_context_len: int) -> torch.Tensor:
    """Plain softmax attention in fp32 math over the gathered, padded blocks."""
    b = pad_by_sequence(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                        max_query_len, max_context_len)
    group = q.shape[1] // k_cache.shape[2]
    k = b.k.float().repeat_interleave(group, dim=2)  # [S, Tk, H, D]
    v = b.v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("sqhd,skhd->shqk", b.q.float(), k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~b.mask[:, None], float("-inf"))
    out = torch.einsum("shqk,skhd->sqhd", torch.softmax(scores, dim=-1), v)
    return unpad(out.to(q.dtype), b.rows, q.shape[0])


def _lone_cpu_decode(q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     max_query_len: int, max_context_len: int) -> bool:
    """One sequence, one query, on the CPU, attending to all `max_context_len` keys (read
    from a CPU tensor: no device sync): no mask, padding or unpadding needed."""
    return (not q.is_cuda and q.shape[0] == 1 and max_query_len == 1
            and block_tables.shape[0] == 1 and int(context_lens[0]) == max_context_len)


def _sdpa_lone_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_len: int) -> torch.Tensor:
    """`_lone_cpu_decode`'s case: the sequence's keys gathered, then unmasked SDPA (a
    single-stream decode step spent about half of its attention time on the mask and the
    padding around the general path)."""
    num_blocks = -(-context_len // k_cache.shape[1])
    tables = block_tables[:, :num_blocks]
    k = _gather_blocks(k_cache, tables)[:, :context_len].transpose(1, 2)  # [1, KVH, T, D]
    v = _gather_blocks(v_cache, tables)[:, :context_len].transpose(1, 2)
    qt = q[None].transpose(1, 2)  # [1, H, 1, D]
    group = q.shape[1] // k_cache.shape[2]
    out = F.scaled_dot_product_attention(qt.float(), k.float(), v.float(),
                                         enable_gqa=group > 1)
    return out.transpose(1, 2).reshape(q.shape).to(q.dtype)


def paged_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, max_query_len: int,
                         max_context_len: int) -> torch.Tensor:
    """The same computation through `scaled_dot_product_attention` (GQA without copies)."""
    if _lone_cpu_decode(q, block_tables, context_lens, max_query_len, max_context_len):
        return _sdpa_lone_decode(q, k_cache, v_cache, block_tables, max_context_len)
    b = pad_by_sequence(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                        max_query_len, max_context_len)
    qt, kt, vt = (x.transpose(1, 2) for x in (b.q, b.k, b.v))  # [S, heads, T, D]
    group = q.shape[1] // k_cache.shape[2]
    if q.is_cuda:
        # NOTE: with a mask and GQA, SDPA would pick cuDNN, which builds a new plan for
        # every new shape (tens of ms each; prefill chunks rarely repeat a shape). The
        # memory-efficient kernel takes any shape but not GQA: repeat the kv heads.
        kt, vt = (x.repeat_interleave(group, dim=1) for x in (kt, vt))
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=b.mask[:, None])
    else:
        # NOTE: SDPA's CPU kernel with a mask runs bf16/fp16 several times slower than
        # fp32 (1.7 ms vs 0.4 ms a layer at 16 decodes x 160 keys): attend in fp32.
        qt, kt, vt = (x.float() for x in (qt, kt, vt))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=b.mask[:, None],
                                             enable_gqa=group > 1).to(q.dtype)
    return unpad(out.transpose(1, 2), b.rows, q.shape[0])


registry.register("paged_attention", "torch", paged_attention_reference, reference=True)
registry.register("paged_attention", "sdpa", paged_attention_sdpa, priority=1)


@dataclass
class AttentionGroup:
    """Sequences of one call attended by one kernel: they own rows `start:end` of the
    call's N tokens (`cu_seqlens_q` counts from `start`)."""

    start: int
    end: int
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    context_lens: torch.Tensor  # int32 [S]
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]
    max_query_len: int
    max_context_len: int
    fresh_prefill: bool = False  # every sequence starts at position 0: keys = this call's


@dataclass
class PagedAttentionMetadata:
    """One call's device tensors: where each new token's keys and values go, and the groups
    of sequences attended together (their rows in order, covering N)."""

    slot_mapping: torch.Tensor  # int64 [N]: pool slot of each new token
    groups: list[AttentionGroup]


@dataclass
class PagedContext:
    """Attention context: write new k/v into the pool, then attend group by group.

    `rotate_and_attend` (for `RotatingAttention`, tessera/model/rotating_attention.py) takes
    q and k before their rotary embedding and applies it together with the pool write, one
    "rope_kv_write" launch instead of a "rope" and a "kv_write"."""

    pool: KVPool
    metadata: PagedAttentionMetadata

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        q, k, v = q[0], k[0], v[0]  # batch dim is 1: flattened
        self.pool.write(layer_idx, self.metadata.slot_mapping, k, v)
        return self._attend_groups(layer_idx, q, k, v)

    def rotate_and_attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                          ) -> torch.Tensor:
        """`attend` on q and k rotated by cos, sin (`[1, N, D]` or `[N, D]`)."""
        keys, values = self.pool.layer(layer_idx)
        head_dim = cos.shape[-1]
        q, k = registry.get("rope_kv_write", q.device)(
            q[0], k[0], v[0], cos.reshape(-1, head_dim), sin.reshape(-1, head_dim), keys,
            values, self.metadata.slot_mapping)
        return self._attend_groups(layer_idx, q, k, v[0])

    def _attend_groups(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
        """`[1, N, H, D]`: each group of the call attended (its keys already in the pool)."""
        groups = self.metadata.groups
        if len(groups) == 1:
            return self._attend_group(layer_idx, groups[0], q, k, v)[None]
        outs = [self._attend_group(layer_idx, g, q[g.start:g.end], k[g.start:g.end],
                                   v[g.start:g.end]) for g in groups]
        return torch.cat(outs)[None]  # [1, N, H, D]

    def _attend_group(self, layer_idx: int, g: AttentionGroup, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if g.fresh_prefill:  # no cached keys to read: varlen attention on this call's
            attention = registry.get("attention", q.device)
            return attention(q[None], k[None], v[None], causal=True,
                             cu_seqlens=g.cu_seqlens_q)[0]
        k_cache, v_cache = self.pool.layer(layer_idx)
        attention = registry.get("paged_attention", q.device)
        return attention(q, k_cache, v_cache, block_tables=g.block_tables,
                         context_lens=g.context_lens, cu_seqlens_q=g.cu_seqlens_q,
                         max_query_len=g.max_query_len, max_context_len=g.max_context_len)
