"""Decode steps as static-shape forwards, captured once per batch-size bucket as CUDA graphs.

A decode step (every sequence computes the same small number `q` of new tokens: 1 for plain
decoding and for the draft model, k + 1 for a speculative verification) is run on inputs
padded to a bucket of the batch size (1, 2, 4, 8, then multiples of 16 up to the largest)
and written into preallocated buffers, so that one forward per (bucket, q) can be captured
as a CUDA graph and replayed every step after with no Python in the model's path.

- Static buffers, allocated once at their largest size: token ids, positions, slot mapping,
  block tables `[max_batch, blocks_per_seq]`, context lengths; each bucket's graph reads a
  leading slice of them. A step uploads its values (padding rows included) through pinned
  host mirrors (`pinned_uploads.py`): no allocation and no device op besides the copies.
  Only the columns of the block tables that this step's sequences use
  are written; the attention op never reads a table entry past a sequence's context, so
  stale entries beyond it are harmless.
- Padding rows (the bucket's size past the real batch) compute a sequence of `q` tokens at
  positions 0.. that lives in the pool's padding block (`padding_block`, a block the block
  manager never hands out), so their writes land nowhere that matters. Rows are independent
  through the whole model, so padding never changes a real row's output.
- `max_context_len`, the host int the attention op sizes its grid from, is the engine's
  `max_model_len` for every graph, so a captured launch covers every context.
- The graph computes logits for every row; the requested rows are picked after the replay.
  When they are the first rows (a decode step), the result is a view of the graph's output
  buffer, valid until the next replay; otherwise a new tensor.

On the CPU (and with `use_graphs=False`) the same padded forward runs eagerly: that is how
the static path is tested without a GPU. Capture needs the kernels warmed up first (Triton
autotuning benchmarks on its first call), so every bucket is run once eagerly before its
capture, its padding rows attending over `WARM_UP_CONTEXT` positions of the padding block
(the paged kernel's tile is tuned then, and one-token contexts would tune it for nothing).
All graphs share one memory pool; they are replayed one at a time on one stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tessera.serve.paged_attention import AttentionGroup, PagedAttentionMetadata
from tessera.serve.pinned_uploads import PinnedUploads
from tessera.serve.placeholders import fill_placeholders

MAX_GRAPH_QUERY_LEN = 8  # longest per-sequence query captured (the paged kernel's limit)
WARM_UP_CONTEXT = 1024  # context of the padding rows a bucket's warm-up attends over


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, ... up to and including `max_batch_size`."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 16))
    return [*buckets, max_batch_size]


@dataclass
class StaticItem:
    """What a static forward needs of one sequence (duck-types `ForwardItem`)."""

    block_table: Sequence[int]
    start: int
    token_ids: Sequence[int]
    num_logits: int


@dataclass
class StaticBuffers:
    input_ids: torch.Tensor  # int64 [max_batch * max_q]
    positions: torch.Tensor  # int64 [max_batch * max_q]
    slot_mapping: torch.Tensor  # int64 [max_batch * max_q]
    block_tables: torch.Tensor  # int32 [max_batch, blocks_per_seq]
    context_lens: torch.Tensor  # int32 [max_batch]
    cu_seqlens_q: dict[int, torch.Tensor]  # per q: int32 [max_batch + 1] = arange * q
    logits_rows: torch.Tensor  # int64 [max_batch * max_q]: rows of the logits returned


class StaticDecodeRunner:
    """Runs uniform-query decode batches through padded static buffers, replaying a CUDA
    graph per (bucket, q) when `use_graphs`.

    `forward_fn(input_ids [1, N], positions [1, N], metadata) -> logits [N, V]` is the
    model runner's forward on prepared inputs (it writes the pool and applies the LM head).
    """

    def __init__(self, forward_fn: Callable[[torch.Tensor, torch.Tensor,
                                              PagedAttentionMetadata], torch.Tensor], *,
                 device: torch.device, block_size: int, padding_block: int,
                 max_model_len: int, max_batch_size: int, query_lens: Sequence[int] = (1,),
                 use_graphs: bool = True):
        if any(not 1 <= q <= MAX_GRAPH_QUERY_LEN for q in query_lens):
            raise ValueError(f"query lengths must be in 1..{MAX_GRAPH_QUERY_LEN}, "
                             f"got {list(query_lens)}")
        self.forward_fn = forward_fn
        self.device, self.block_size = device, block_size
        self.padding_block = padding_block
        self.max_context_len = max_model_len
        self.blocks_per_seq = -(-max_model_len // block_size)
        self.buckets = batch_buckets(max_batch_size)
        self.query_lens = tuple(sorted(set(query_lens)))
        self.use_graphs = use_graphs
        self.buffers = self._allocate(max_batch_size, max(self.query_lens))
        b = self.buffers
        self.uploads = PinnedUploads({
            "input_ids": b.input_ids, "positions": b.positions, "slot_mapping": b.slot_mapping,
            "block_tables": b.block_tables, "context_lens": b.context_lens,
            "logits_rows": b.logits_rows})
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    # ------------------------------------------------------------------ setup
    def _allocate(self, max_batch: int, max_q: int) -> StaticBuffers:
        rows = max_batch * max_q

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        ones = torch.arange(max_batch + 1, dtype=torch.int32, device=self.device)
        return StaticBuffers(
            input_ids=zeros(rows, dtype=torch.int64),
            positions=zeros(rows, dtype=torch.int64),
            slot_mapping=zeros(rows, dtype=torch.int64),
            block_tables=torch.full((max_batch, self.blocks_per_seq), self.padding_block,
                                    dtype=torch.int32, device=self.device),
            context_lens=zeros(max_batch, dtype=torch.int32),
            cu_seqlens_q={q: ones * q for q in self.query_lens},
            logits_rows=zeros(rows, dtype=torch.int64),
        )

    def capture(self) -> None:
        """Warm up and capture every (bucket, q), largest first, into one memory pool."""
        if not self.use_graphs:
            return
        self._pool = torch.cuda.graph_pool_handle()
        for q in self.query_lens:
            for bucket in reversed(self.buckets):
                # Warm-up: Triton autotuning (on contexts of a realistic length), lazy inits.
                self._fill([], bucket, q, padding_context=min(self.max_context_len,
                                                              WARM_UP_CONTEXT))
                self._run_static(bucket, q)
                self._fill([], bucket, q)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    logits = self._run_static(bucket, q)
                self.graphs[(bucket, q)] = (graph, logits)
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ stepping
    def key(self, items: Sequence[StaticItem]) -> tuple[int, int] | None:
        """The (bucket, q) that runs `items`, or None when they need the eager path."""
        q = len(items[0].token_ids)
        if q not in self.query_lens or len(items) > self.buckets[-1]:
            return None
        if any(len(item.token_ids) != q for item in items):
            return None
        bucket = next(b for b in self.buckets if b >= len(items))
        return bucket, q

    def forward(self, items: Sequence[StaticItem], key: tuple[int, int], *,
                pending_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[R, V]` (fp32) of the rows the items ask for, as the eager path gives;
        placeholders in the token ids are filled from `pending_tokens` (`model_runner.py`).
        NOTE: valid until the next call; the result may be a view of the graph's output
        buffer, which the next replay overwrites."""
        bucket, q = key
        self._fill(items, bucket, q)
        fill_placeholders(self.buffers.input_ids[:bucket * q], pending_tokens)
        if self.use_graphs:
            graph, logits = self.graphs[key]
            graph.replay()
        else:
            logits = self._run_static(bucket, q)
        return self._logits(logits, items, q)

    def _run_static(self, bucket: int, q: int) -> torch.Tensor:
        b, rows = self.buffers, bucket * q
        group = AttentionGroup(
            start=0, end=rows, block_tables=b.block_tables[:bucket],
            context_lens=b.context_lens[:bucket], cu_seqlens_q=b.cu_seqlens_q[q][:bucket + 1],
            max_query_len=q, max_context_len=self.max_context_len)
        metadata = PagedAttentionMetadata(slot_mapping=b.slot_mapping[:rows], groups=[group])
        return self.forward_fn(b.input_ids[:rows][None], b.positions[:rows][None], metadata)

    # ------------------------------------------------------------------ inputs
    def _fill(self, items: Sequence[StaticItem], bucket: int, q: int, *,
              padding_context: int | None = None) -> None:
        """Upload the items' inputs, then padding rows up to `bucket`: q tokens at
        positions 0..q-1 in the padding block, attending over `padding_context` (default
        q) positions of it."""
        size, pad = self.block_size, self.padding_block
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for item in items:
            span = range(item.start, item.start + q)
            input_ids.extend(item.token_ids)
            positions.extend(span)
            slots.extend(item.block_table[p // size] * size + p % size for p in span)
        padding_context = q if padding_context is None else padding_context
        width = max([-(-(item.start + q) // size) for item in items]
                    + [-(-padding_context // size)])
        tables = [list(item.block_table[:width]) for item in items]
        num_padding = bucket - len(items)
        tables = [row + [pad] * (width - len(row)) for row in tables] + \
            [[pad] * width] * num_padding
        input_ids += [0] * (num_padding * q)
        positions += list(range(q)) * num_padding
        slots += [pad * size + offset for offset in range(q)] * num_padding
        context_lens = [item.start + q for item in items] + [padding_context] * num_padding
        rows = bucket * q
        with self.uploads.round():
            self.uploads.upload("input_ids", np.s_[:rows], input_ids)
            self.uploads.upload("positions", np.s_[:rows], positions)
            self.uploads.upload("slot_mapping", np.s_[:rows], slots)
            self.uploads.upload("block_tables", np.s_[:bucket, :width], tables)
            self.uploads.upload("context_lens", np.s_[:bucket], context_lens)
            if not self._is_last_rows(items, q):
                logits_rows = [s * q + q - item.num_logits + i
                               for s, item in enumerate(items) for i in range(item.num_logits)]
                self.uploads.upload("logits_rows", np.s_[:len(logits_rows)], logits_rows)

    @staticmethod
    def _is_last_rows(items: Sequence[StaticItem], q: int) -> bool:
        """Whether the rows wanted are row 0.. of each item's single token."""
        return q == 1 and all(item.num_logits == 1 for item in items)

    def _logits(self, logits: torch.Tensor, items: Sequence[StaticItem],
                q: int) -> torch.Tensor:
        if self._is_last_rows(items, q):
            return logits[:len(items)]  # NOTE: a view of the graph's output (see forward)
        num_rows = sum(item.num_logits for item in items)
        return logits.index_select(0, self.buffers.logits_rows[:num_rows])
