"""A contiguous KV cache for plain (non-paged) incremental decoding.

The caller allocates a `KVCache` for a batch and a maximum length, then runs the model with
`CacheContext(cache, start)`: every layer writes its new keys and values at positions
`start .. start + T - 1` and attends to everything cached up to there. The caller advances
`start` itself. All rows of the batch share one length (plain generation runs one prompt, or
equal-length prompts, at a time); the serving engine's paged cache handles the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.config import ModelConfig
from tessera.kernels import registry


class KVCache:
    """Per-layer key and value tensors `[B, max_len, KVH, D]`."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (config.num_layers, batch_size, max_len, config.num_kv_heads,
                 config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write to {end}")
        self.keys[layer_idx, :, start:end] = k
        self.values[layer_idx, :, start:end] = v

    def read(self, layer_idx: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer_idx, :, :end], self.values[layer_idx, :, :end]


@dataclass
class CacheContext:
    """Attention context that appends to a `KVCache` and attends causally to its prefix."""

    cache: KVCache
    start: int  # absolute position of this call's first token

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer_idx, self.start, k, v)
        keys, values = self.cache.read(layer_idx, self.start + q.shape[1])
        attention = registry.get("attention", q.device)
        return attention(q, keys, values, causal=True, q_offset=self.start)
