"""Fresh single-prompt prefills as static-shape forwards, one CUDA graph per length bucket.

A step that computes one fresh prompt and nothing else (the first step of a request on an
idle engine, which sets a lone user's time to first token) would otherwise run eagerly:
a Python launch for each of the model's few hundred kernels, tens of milliseconds for
about a millisecond of device work. Such a step is instead padded to a length bucket
(16, 32, 64, ... up to `max_len`) in preallocated buffers and replayed as a graph captured
once per bucket.

- A prompt of n tokens runs in the smallest bucket L >= n: its tokens at rows 0..n-1 and
  L - n padding tokens (id 0, positions 0..) after them, packed as a second document
  (`cu_seqlens = [0, n, L]`, which keeps the packed row's contract that the documents
  cover it). Causal attention never shows a real row the padding after it, and every other
  op is row-wise, so padding never changes a real row. Padding keys and values go to the
  pool's padding block (the block the block manager never hands out, which the decode
  graphs' padding rows also use).
- The LM head runs on one row, the prompt's last (a device index), so the graph's output
  is `[1, V]`; an item that wants no logits (a chunk of a longer prompt) gets `[0, V]`.
- The attention op must read `cu_seqlens` on the device to be captured: the Triton flash
  kernel and the torch reference do; the SDPA path reads them on the host, so under it
  (`uses_host_boundaries`) the engine leaves these graphs off.

On the CPU (and with `use_graphs=False`) the same padded forward runs eagerly, which is
how it is tested without a GPU. Each bucket runs once eagerly before its capture (Triton
autotuning). The graphs share a memory pool of their own; the output is a view of the
graph's buffer, valid until the next replay of the same bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tessera.kernels import registry
from tessera.serve.paged_attention import AttentionGroup, PagedAttentionMetadata
from tessera.serve.pinned_uploads import PinnedUploads
from tessera.serve.placeholders import fill_placeholders

MIN_BUCKET = 16


def length_buckets(max_len: int) -> list[int]:
    """16, 32, 64, ... up to the largest power of two <= `max_len`; empty below 16."""
    buckets = []
    length = MIN_BUCKET
    while length <= max_len:
        buckets.append(length)
        length *= 2
    return buckets


def uses_host_boundaries(device: torch.device) -> bool:
    """Whether the "attention" op chosen on `device` reads packed-document boundaries on
    the host (the SDPA path), which a CUDA graph cannot capture."""
    return registry.select("attention", device).backend == "sdpa"


@dataclass
class PrefillItem:
    """What a static prefill needs of one sequence (duck-types `ForwardItem`)."""

    block_table: Sequence[int]
    start: int
    token_ids: Sequence[int]
    num_logits: int


@dataclass
class PrefillBuffers:
    input_ids: torch.Tensor  # int64 [max_len]
    positions: torch.Tensor  # int64 [max_len]
    slot_mapping: torch.Tensor  # int64 [max_len]
    cu_seqlens: torch.Tensor  # int32 [3]: 0, n, L
    last_row: torch.Tensor  # int64 [1]: n - 1


class StaticPrefillRunner:
    """Runs a lone fresh prompt of up to `max_len` tokens through padded static buffers,
    replaying a CUDA graph per length bucket when `use_graphs`.

    `body(input_ids [1, L], positions [1, L], metadata, last_row [1]) -> logits [1, V]` is
    the model runner's forward on prepared inputs (it writes the pool, applies the LM head
    to row `last_row`).
    """

    def __init__(self, body: Callable[[torch.Tensor, torch.Tensor, PagedAttentionMetadata,
                                       torch.Tensor], torch.Tensor], *,
                 device: torch.device, block_size: int, padding_block: int, max_len: int,
                 use_graphs: bool = True):
        self.body = body
        self.device, self.block_size = device, block_size
        self.padding_block = padding_block
        self.buckets = length_buckets(max_len)
        if not self.buckets:
            raise ValueError(f"static prefill needs max_len >= {MIN_BUCKET}, got {max_len}")
        self.use_graphs = use_graphs
        rows = self.buckets[-1]

        def zeros(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, device=device)

        self.buffers = PrefillBuffers(
            input_ids=zeros(rows, torch.int64), positions=zeros(rows, torch.int64),
            slot_mapping=zeros(rows, torch.int64), cu_seqlens=zeros(3, torch.int32),
            last_row=zeros(1, torch.int64))
        b = self.buffers
        self.uploads = PinnedUploads({
            "input_ids": b.input_ids, "positions": b.positions,
            "slot_mapping": b.slot_mapping, "cu_seqlens": b.cu_seqlens,
            "last_row": b.last_row})
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def key(self, items: Sequence[PrefillItem]) -> int | None:
        """The bucket that runs `items`, or None when they need another path: exactly one
        item, starting at position 0, wanting at most one row of logits."""
        if len(items) != 1:
            return None
        item = items[0]
        n = len(item.token_ids)
        if item.start != 0 or item.num_logits > 1 or n > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= n)

    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, into one memory pool."""
        if not self.use_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self._fill([0] * bucket, list(range(bucket)), bucket)  # all padding block
            self._run(bucket)  # warm-up: Triton autotuning, lazy inits
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._run(bucket)
            self.graphs[bucket] = (graph, logits)

    def forward(self, items: Sequence[PrefillItem], bucket: int, *,
                pending_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[num_logits, V]` (fp32) of the item's last row, as the eager path gives.
        NOTE: with graphs, a view of the graph's output, valid until its next replay."""
        item = items[0]
        size = self.block_size
        slots = [item.block_table[p // size] * size + p % size
                 for p in range(len(item.token_ids))]
        self._fill(list(item.token_ids), slots, bucket)
        fill_placeholders(self.buffers.input_ids[:bucket], pending_tokens)
        if self.use_graphs:
            graph, logits = self.graphs[bucket]
            graph.replay()
        else:
            logits = self._run(bucket)
        return logits[:item.num_logits]

    # ------------------------------------------------------------------ internals
    def _fill(self, token_ids: list[int], slots: list[int], bucket: int) -> None:
        """Upload a prompt's ids and slots, then padding up to `bucket` in the padding
        block."""
        n, size, pad = len(token_ids), self.block_size, self.padding_block
        num_padding = bucket - n
        with self.uploads.round():
            self.uploads.upload("input_ids", np.s_[:bucket], token_ids + [0] * num_padding)
            self.uploads.upload("positions", np.s_[:bucket],
                                [*range(n), *range(num_padding)])
            self.uploads.upload("slot_mapping", np.s_[:bucket],
                                slots + [pad * size + i % size for i in range(num_padding)])
            self.uploads.upload("cu_seqlens", np.s_[:], [0, n, bucket])
            self.uploads.upload("last_row", np.s_[:], max(n - 1, 0))

    def _run(self, bucket: int) -> torch.Tensor:
        b = self.buffers
        group = AttentionGroup(
            start=0, end=bucket, block_tables=b.cu_seqlens[None, :1],  # never read
            context_lens=b.cu_seqlens[1:2], cu_seqlens_q=b.cu_seqlens, max_query_len=bucket,
            max_context_len=bucket, fresh_prefill=True)
        metadata = PagedAttentionMetadata(slot_mapping=b.slot_mapping[:bucket], groups=[group])
        return self.body(b.input_ids[:bucket][None], b.positions[:bucket][None], metadata,
                         b.last_row)
