"""The attention dispatch point.

The model computes q, k, v and hands them to `ctx.attend(layer_idx, q, k, v)`, where `ctx`
is a small per-call context object set by the caller. It decides where keys and values live
and which kernel runs:

- `CausalContext`: plain causal self-attention over the tokens of this call, optionally with
  packed documents (`cu_seqlens`) so that no token attends across a document boundary;
- `tessera.model.kv_cache.CacheContext`: incremental decoding against a contiguous KV cache;
- the serving engine's paged context (in `tessera.serve`), against the block-table KV pool.

Contexts call the registered op "attention" (see `tessera.kernels.registry`), whose
signature is

    attention(q, k, v, *, causal, q_offset=0, cu_seqlens=None) -> out

with q `[B, Tq, H, D]`, k and v `[B, Tk, KVH, D]`, out `[B, Tq, H, D]`. With `causal`, query
i sits at absolute position `q_offset + i` and sees keys `0 .. q_offset + i`. `cu_seqlens`
(int32 `[S + 1]`, B must be 1) gives document boundaries along T for packed sequences.
The model itself knows nothing about caches, kernels or devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from tessera.kernels import registry


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class CausalContext:
    """Causal self-attention over this call's tokens; no cache."""

    cu_seqlens: torch.Tensor | None = None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        attention = registry.get("attention", q.device)
        return attention(q, k, v, causal=True, cu_seqlens=self.cu_seqlens)


def causal_mask(num_queries: int, num_keys: int, q_offset: int,
                device: torch.device) -> torch.Tensor:
    """Bool `[Tq, Tk]`, True where query i (at position q_offset + i) may see key j."""
    rows = torch.arange(num_queries, device=device)[:, None] + q_offset
    cols = torch.arange(num_keys, device=device)[None, :]
    return cols <= rows


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of each of `total` packed tokens, from `[S + 1]` boundaries."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.long), positions, right=True)


def _full_mask(q: torch.Tensor, k: torch.Tensor, causal: bool, q_offset: int,
               cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
    num_q, num_k = q.shape[1], k.shape[1]
    mask = causal_mask(num_q, num_k, q_offset, q.device) if causal else None
    if cu_seqlens is not None:
        if q.shape[0] != 1 or num_q != num_k:
            raise ValueError("cu_seqlens needs B == 1 and self-attention (Tq == Tk)")
        seg = segment_ids(cu_seqlens, num_q)
        same_doc = seg[:, None] == seg[None, :]
        mask = same_doc if mask is None else mask & same_doc
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                        q_offset: int = 0, cu_seqlens: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Plain softmax attention in fp32 math; the reference every kernel is tested against."""
    group = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)  # [B, Tk, H, D]
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) / math.sqrt(q.shape[-1])
    mask = _full_mask(q, k, causal, q_offset, cu_seqlens)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   q_offset: int = 0, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """`scaled_dot_product_attention`, GQA without materialising repeated K/V."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    gqa = q.shape[2] != k.shape[2]
    plain_causal = causal and q_offset == 0 and q.shape[1] == k.shape[1]
    if cu_seqlens is not None and (plain_causal or not causal) and q.shape[0] == 1:
        out = _sdpa_by_document(qt, kt, vt, cu_seqlens, causal=causal, gqa=gqa)
    elif cu_seqlens is None and (plain_causal or not causal):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=plain_causal, enable_gqa=gqa)
    elif cu_seqlens is None and q.shape[1] == 1 and q_offset == k.shape[1] - 1:
        # One decode query at the newest position sees every cached key: no mask needed.
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
    else:
        mask = _full_mask(q, k, causal, q_offset, cu_seqlens)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def _sdpa_by_document(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor,
                      cu_seqlens: torch.Tensor, *, causal: bool, gqa: bool) -> torch.Tensor:
    """Packed documents `[1, heads, T, D]` attended one by one: the sum of their squared
    lengths instead of T^2 under a block-diagonal mask. Reads the boundaries on the host
    (a device sync on GPUs, where the Triton kernel takes this case instead)."""
    bounds = cu_seqlens.tolist()
    outs = [F.scaled_dot_product_attention(qt[:, :, a:b], kt[:, :, a:b], vt[:, :, a:b],
                                           is_causal=causal, enable_gqa=gqa)
            for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return torch.cat(outs, dim=2)


registry.register("attention", "torch", attention_reference, reference=True)
registry.register("attention", "sdpa", attention_sdpa, priority=1)
