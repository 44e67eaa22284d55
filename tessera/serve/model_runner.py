"""The model runner: owns the KV pool and one step's device tensors, runs the model.

A forward takes `ForwardItem`s (per sequence: its block table, the position of its first new
token, the new token ids, and how many trailing positions need logits), flattens them into
one row `[1, N]` with positions, slot mapping, block tables, context lengths and query
offsets (`cu_seqlens_q`), runs the model under a `PagedContext`, and applies the LM head
only to the positions that need logits (the last token of a sequence being sampled, or the
k + 1 positions a speculative verification scores), returning fp32 logits `[R, V]`.

NOTE: the tensors are built from Python lists each step and keep data-dependent shapes;
padding N and S to buckets (for CUDA graphs) belongs here when it comes.

It knows nothing about scheduling, sampling or requests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tessera.model.transformer import TesseraForCausalLM
from tessera.serve.kv_pool import KVPool
from tessera.serve.paged_attention import PagedAttentionMetadata, PagedContext


@dataclass
class ForwardItem:
    """One sequence's share of a forward: `token_ids` at positions `start ...`."""

    block_table: Sequence[int]
    start: int
    token_ids: Sequence[int]
    num_logits: int  # logits for this many trailing tokens (0: none)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, N]
    positions: torch.Tensor  # [1, N]
    metadata: PagedAttentionMetadata
    logits_indices: torch.Tensor  # [R] positions along N whose logits are returned


class ForwardTimer:
    """Seconds spent in model forwards. On CUDA, events timed on the device and read
    lazily, so the step loop never waits for the GPU to measure it."""

    def __init__(self, device: torch.device):
        self.is_cuda = device.type == "cuda"
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if not self.is_cuda:
            start = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - start
            return
        start_event, end_event = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start_event.record()
        yield
        end_event.record()
        self._events.append((start_event, end_event))
        if len(self._events) > 1024:
            self._resolve()  # NOTE: waits for the GPU, once every 1024 forwards

    @property
    def seconds(self) -> float:
        self._resolve()
        return self._seconds

    def _resolve(self) -> None:
        for start_event, end_event in self._events:
            end_event.synchronize()
            self._seconds += start_event.elapsed_time(end_event) / 1e3
        self._events.clear()


class ModelRunner:
    def __init__(self, model: TesseraForCausalLM, num_blocks: int, block_size: int):
        self.model = model
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.block_size = block_size
        self.pool = KVPool(model.config, num_blocks, block_size, dtype=self.dtype,
                           device=self.device)
        self.timer = ForwardTimer(self.device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.pool.copy_blocks(copies)

    @torch.inference_mode()
    def forward(self, items: Sequence[ForwardItem]) -> torch.Tensor:
        """Write the items' keys and values into the pool; logits `[R, V]` (fp32)."""
        inputs = self.prepare(items)
        ctx = PagedContext(self.pool, inputs.metadata)
        with self.timer.measure():
            out = self.model.run(inputs.input_ids, inputs.positions, ctx, compute_logits=False)
            hidden = out.last_hidden[0, inputs.logits_indices]  # [R, d]
            return self.model.lm_head(hidden).float()

    def prepare(self, items: Sequence[ForwardItem]) -> StepInputs:
        size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        cu_seqlens = [0]
        for item in items:
            span = range(item.start, item.start + len(item.token_ids))
            input_ids.extend(item.token_ids)
            positions.extend(span)
            slots.extend(item.block_table[p // size] * size + p % size for p in span)
            end = cu_seqlens[-1] + len(span)
            logits_indices.extend(range(end - item.num_logits, end))
            cu_seqlens.append(end)
        context_lens = [item.start + len(item.token_ids) for item in items]
        metadata = PagedAttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._block_tables(items),
            context_lens=self._tensor(context_lens, torch.int32),
            cu_seqlens_q=self._tensor(cu_seqlens, torch.int32),
            max_query_len=max(len(item.token_ids) for item in items),
            max_context_len=max(context_lens),
        )
        return StepInputs(input_ids=self._tensor([input_ids], torch.int64),
                          positions=self._tensor([positions], torch.int64),
                          metadata=metadata,
                          logits_indices=self._tensor(logits_indices, torch.int64))

    def _block_tables(self, items: Sequence[ForwardItem]) -> torch.Tensor:
        """`[S, max_blocks]`, padded with block 0 (the op ignores entries past the end)."""
        width = max(len(item.block_table) for item in items)
        rows = [list(item.block_table) + [0] * (width - len(item.block_table)) for item in items]
        return self._tensor(rows, torch.int32)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
