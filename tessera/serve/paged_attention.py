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
new keys and values into the pool at `slot_mapping`, then calls the op. It knows nothing
about scheduling or which sequence owns which block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    rows: torch.Tensor  # [S, Tq] row of q; N (one past the end) for padding


def pad_by_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, max_query_len: int,
                    max_context_len: int) -> PaddedBatch:
    num_blocks = -(-max_context_len // k_cache.shape[1])
    tables = block_tables[:, :num_blocks].long()
    k = k_cache[tables].flatten(1, 2)[:, :max_context_len]  # [S, Tk, KVH, D]
    v = v_cache[tables].flatten(1, 2)[:, :max_context_len]
    starts, q_lens = cu_seqlens_q[:-1].long(), (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    offsets = torch.arange(max_query_len, device=q.device)
    is_real = offsets[None] < q_lens[:, None]  # [S, Tq]
    rows = (starts[:, None] + offsets[None]).masked_fill(~is_real, q.shape[0])
    q_padded = q[rows.clamp(max=q.shape[0] - 1)]  # [S, Tq, H, D]
    q_positions = (context_lens.long() - q_lens)[:, None] + offsets[None]  # [S, Tq]
    key_positions = torch.arange(max_context_len, device=q.device)
    mask = key_positions[None, None, :] <= q_positions[:, :, None]  # [S, Tq, Tk]
    return PaddedBatch(q_padded, k, v, mask, rows)


def unpad(out: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[S, Tq, H, D]` back to the flattened `[N, H, D]` (padding rows dropped, no sync)."""
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


def paged_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, max_query_len: int,
                         max_context_len: int) -> torch.Tensor:
    """The same computation through `scaled_dot_product_attention` (GQA without copies)."""
    b = pad_by_sequence(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                        max_query_len, max_context_len)
    qt, kt, vt = (x.transpose(1, 2) for x in (b.q, b.k, b.v))  # [S, heads, T, D]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=b.mask[:, None],
                                         enable_gqa=q.shape[1] != k_cache.shape[2])
    return unpad(out.transpose(1, 2), b.rows, q.shape[0])


registry.register("paged_attention", "torch", paged_attention_reference, reference=True)
registry.register("paged_attention", "sdpa", paged_attention_sdpa, priority=1)


@dataclass
class PagedAttentionMetadata:
    """One step's device tensors describing where each token's keys and values go."""

    slot_mapping: torch.Tensor  # int64 [N]: pool slot of each new token
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    context_lens: torch.Tensor  # int32 [S]
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]
    max_query_len: int
    max_context_len: int


@dataclass
class PagedContext:
    """Attention context: write new k/v into the pool, then attend through the op."""

    pool: KVPool
    metadata: PagedAttentionMetadata

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        self.pool.write(layer_idx, m.slot_mapping, k[0], v[0])  # batch dim is 1: flattened
        k_cache, v_cache = self.pool.layer(layer_idx)
        attention = registry.get("paged_attention", q.device)
        out = attention(q[0], k_cache, v_cache, block_tables=m.block_tables,
                        context_lens=m.context_lens, cu_seqlens_q=m.cu_seqlens_q,
                        max_query_len=m.max_query_len, max_context_len=m.max_context_len)
        return out[None]  # [1, N, H, D]
