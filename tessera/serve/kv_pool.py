"""The paged KV pool's tensors: keys and values `[num_layers, num_blocks, block_size, KVH, D]`.

Allocated once, up front, by the model runner that owns it; sized by a block count
(`blocks_for_budget` turns a token or byte budget into one). `write` stores one layer's new
keys and values at their slots (slot = block id * block_size + offset in the block; op
"kv_write"); `copy_blocks` performs the block manager's copy-on-write copies. Which block belongs to
which sequence is the block manager's business, not this module's.
"""

from __future__ import annotations

import torch

from tessera.config import ModelConfig
from tessera.errors import ConfigError
from tessera.kernels import registry
from tessera.serve.pinned_uploads import host_to_device


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of keys plus values that one block takes over all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads \
        * config.head_dim * elem


def blocks_for_budget(*, block_size: int, num_blocks: int | None = None,
                      num_tokens: int | None = None, num_bytes: int | None = None,
                      bytes_per_block_total: int) -> int:
    """The block count from exactly one of: blocks, tokens, bytes (shared by every pool
    whose per-block size is summed into `bytes_per_block_total`)."""
    if num_blocks is not None:
        count = num_blocks
    elif num_tokens is not None:
        count = num_tokens // block_size
    elif num_bytes is not None:
        count = num_bytes // bytes_per_block_total
    else:
        raise ConfigError("give the KV pool's size as blocks, tokens or bytes")
    if count < 1:
        raise ConfigError(
            f"the KV cache budget holds no block of {block_size} tokens "
            f"({bytes_per_block_total} bytes each); raise the budget"
        )
    return count


class KVPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads,
                 config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, `[num_blocks, block_size, KVH, D]` each."""
        return self.keys[layer_idx], self.values[layer_idx]

    def write(self, layer_idx: int, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v `[N, KVH, D]` at slots `[N]` (int64) of layer `layer_idx`."""
        keys, values = self.layer(layer_idx)
        registry.get("kv_write", k.device)(k, v, keys, values, slot_mapping)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks, every layer: `(source, destination)` pairs."""
        if not copies:
            return
        device = self.keys.device
        src = host_to_device([s for s, _ in copies], torch.int64, device)
        dst = host_to_device([d for _, d in copies], torch.int64, device)
        self.keys[:, dst] = self.keys[:, src]
        self.values[:, dst] = self.values[:, src]

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
