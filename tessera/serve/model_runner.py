"""The model runner: owns the KV pool and one step's device tensors, runs the model.

A forward takes `ForwardItem`s (per sequence: its block table, the position of its first new
token, the new token ids, and how many trailing positions need logits), flattens them into
one row `[1, N]` with positions and slot mapping, laid out in attention groups (decodes,
fresh prefills, continued chunks: `group_items`), each with its block tables, context
lengths and query offsets (`cu_seqlens_q`), runs the model under a `PagedContext`, and
applies the LM head only to the positions that need logits (the last token of a sequence
being sampled, or the k + 1 positions a speculative verification scores), returning fp32
logits `[R, V]` in the order of the items.

A batch in which every sequence computes the same few tokens (a decode step, a draft step,
a speculative verification) goes instead through `StaticDecodeRunner` (`cuda_graphs.py`):
padded to a batch-size bucket in static buffers and, on CUDA, replayed as a captured CUDA
graph. A step that is one fresh prompt of up to `max_prefill_graph_len` tokens and nothing
else goes through `StaticPrefillRunner` (`prefill_graphs.py`) the same way, padded to a
length bucket. Other batches (longer or continued prefill chunks, mixed steps) build their
tensors from Python lists with data-dependent shapes and run eagerly. The pool holds one
block more than the block manager hands out: the padding block that padded rows of a
static batch write into.

Token ids may hold placeholders (see `sequence.py`): `-1 - j` stands for row j of
`pending_tokens`, the device tensor of tokens the previous step sampled; they are replaced
on the device (`fill_placeholders`) before the model runs, so a step can start before the
host has read the previous step's tokens. Inputs go up without waiting for the device
(`pinned_uploads.py`).

It knows nothing about scheduling, sampling or requests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tessera.kernels.paged_decode import MAX_QUERY_LEN
from tessera.model.transformer import TesseraForCausalLM
from tessera.serve.cuda_graphs import StaticDecodeRunner
from tessera.serve.kv_pool import KVPool
from tessera.serve.paged_attention import AttentionGroup, PagedAttentionMetadata, PagedContext
from tessera.serve.pinned_uploads import host_to_device
from tessera.serve.placeholders import fill_placeholders
from tessera.serve.prefill_graphs import MIN_BUCKET, StaticPrefillRunner


def group_items(items: Sequence[ForwardItem]) -> list[tuple[bool, list[int]]]:
    """Item indices in attention groups, each `(fresh_prefill, indices)`, in this order:
    decodes (at most `MAX_QUERY_LEN` tokens after a cached context: the paged decode
    kernel), fresh prefills (starting at position 0: varlen attention on their own keys),
    and chunks continuing a cached context (the paged op's general path). Empty groups are
    left out; a mixed step thus never pads a decode to a prefill's length."""
    decodes, fresh, chunks = [], [], []
    for index, item in enumerate(items):
        if item.start == 0:
            fresh.append(index)
        elif len(item.token_ids) <= MAX_QUERY_LEN:
            decodes.append(index)
        else:
            chunks.append(index)
    return [(is_fresh, members) for is_fresh, members in
            ((False, decodes), (True, fresh), (False, chunks)) if members]


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


@dataclass(frozen=True)
class StaticDecodeSettings:
    """Which decode batches take the static path, and whether it replays CUDA graphs."""

    max_model_len: int
    max_batch_size: int
    query_lens: tuple[int, ...] = (1,)
    use_graphs: bool = True
    max_prefill_graph_len: int = 0  # lone fresh prompts up to this long go static too


class ModelRunner:
    def __init__(self, model: TesseraForCausalLM, num_blocks: int, block_size: int, *,
                 static_decode: StaticDecodeSettings | None = None):
        self.model = model
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.block_size = block_size
        self.padding_block = num_blocks  # the extra block no sequence ever owns
        self.pool = KVPool(model.config, num_blocks + 1, block_size, dtype=self.dtype,
                           device=self.device)
        self.timer = ForwardTimer(self.device)
        self.static = None
        if static_decode is not None:
            s = static_decode
            self.static = StaticDecodeRunner(
                self._forward_all_rows, device=self.device, block_size=block_size,
                padding_block=self.padding_block, max_model_len=s.max_model_len,
                max_batch_size=s.max_batch_size, query_lens=s.query_lens,
                use_graphs=s.use_graphs)
        self.prefill = None
        if static_decode is not None and static_decode.max_prefill_graph_len >= MIN_BUCKET:
            self.prefill = StaticPrefillRunner(
                self._forward_one_row, device=self.device, block_size=block_size,
                padding_block=self.padding_block,
                max_len=static_decode.max_prefill_graph_len,
                use_graphs=static_decode.use_graphs)

    @torch.inference_mode()
    def warm_up(self, max_num_tokens: int) -> None:
        """Run fresh prefills of 64, 128, ... up to `max_num_tokens` tokens, and of one
        token fewer each, then an eager decode step over an odd context, so that kernels
        compile and autotune now rather than under the first requests: per length
        bucket, and for the integer specialisations Triton compiles separately (a length
        divisible by 16 or not; CUDA graphs, whose decode contexts are sized by the model
        length, never run the odd one). Call it before any sequence holds a block: it
        writes the pool's first blocks, whose contents nobody reads until they are
        handed out. The forward timer starts afresh afterwards: warm-up is not serving
        time."""
        capacity = self.padding_block * self.block_size
        num_tokens = 64
        while True:
            n = min(num_tokens, max_num_tokens, capacity)
            for length in dict.fromkeys((n, max(n - 1, 1))):
                table = list(range(-(-length // self.block_size)))
                self._forward_eager([ForwardItem(table, 0, [0] * length, 1)], None)
            if n >= min(max_num_tokens, capacity):
                break
            num_tokens *= 2
        context = min(17, capacity)  # one split of an odd number of positions
        table = list(range(-(-context // self.block_size)))
        decode = ForwardItem(table, context - 1, [0], 1)
        self._forward_eager([decode, decode], None)
        self.timer = ForwardTimer(self.device)

    def capture_graphs(self) -> None:
        """Capture the static paths' CUDA graphs (no-op without graphs)."""
        with torch.inference_mode():
            for static in (self.static, self.prefill):
                if static is not None:
                    static.capture()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.pool.copy_blocks(copies)

    @torch.inference_mode()
    def forward(self, items: Sequence[ForwardItem], *,
                pending_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Write the items' keys and values into the pool; logits `[R, V]` (fp32).
        `pending_tokens` fills the items' placeholders (see the module docstring).
        NOTE: read them before the next forward: from the static path they may be a view
        of a CUDA graph's output buffer, which the next replay overwrites."""
        key = self.static.key(items) if self.static is not None else None
        if key is not None:
            with self.timer.measure():
                return self.static.forward(items, key, pending_tokens=pending_tokens)
        bucket = self.prefill.key(items) if self.prefill is not None else None
        if bucket is not None:
            with self.timer.measure():
                return self.prefill.forward(items, bucket, pending_tokens=pending_tokens)
        return self._forward_eager(items, pending_tokens)

    def _forward_eager(self, items: Sequence[ForwardItem],
                       pending_tokens: torch.Tensor | None) -> torch.Tensor:
        inputs = self.prepare(items)
        fill_placeholders(inputs.input_ids, pending_tokens)
        ctx = PagedContext(self.pool, inputs.metadata)
        with self.timer.measure():
            out = self.model.run(inputs.input_ids, inputs.positions, ctx, compute_logits=False)
            hidden = out.last_hidden[0, inputs.logits_indices]  # [R, d]
            return self.model.lm_head(hidden).float()

    def _forward_all_rows(self, input_ids: torch.Tensor, positions: torch.Tensor,
                          metadata: PagedAttentionMetadata) -> torch.Tensor:
        """The static path's body: logits `[N, V]` (fp32) for every row."""
        out = self.model.run(input_ids, positions, PagedContext(self.pool, metadata),
                             compute_logits=False)
        return self.model.lm_head(out.last_hidden[0]).float()

    def _forward_one_row(self, input_ids: torch.Tensor, positions: torch.Tensor,
                         metadata: PagedAttentionMetadata, row: torch.Tensor) -> torch.Tensor:
        """The static prefill's body: logits `[1, V]` (fp32) of row `row` (int64 `[1]`)."""
        out = self.model.run(input_ids, positions, PagedContext(self.pool, metadata),
                             compute_logits=False)
        return self.model.lm_head(out.last_hidden[0].index_select(0, row)).float()

    def prepare(self, items: Sequence[ForwardItem]) -> StepInputs:
        """The step's tensors, its tokens laid out group by group (see `group_items`);
        the logits rows come back in the order of `items`."""
        size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: dict[int, list[int]] = {}
        groups = []
        for fresh, members in group_items(items):
            group_start = len(input_ids)
            for index in members:
                item = items[index]
                span = range(item.start, item.start + len(item.token_ids))
                input_ids.extend(item.token_ids)
                positions.extend(span)
                slots.extend(item.block_table[p // size] * size + p % size for p in span)
                logits_rows[index] = list(range(len(input_ids) - item.num_logits,
                                                len(input_ids)))
            groups.append(self._group([items[i] for i in members], group_start,
                                      len(input_ids), fresh))
        metadata = PagedAttentionMetadata(slot_mapping=self._tensor(slots, torch.int64),
                                          groups=groups)
        logits_indices = [row for index in range(len(items)) for row in logits_rows[index]]
        return StepInputs(input_ids=self._tensor([input_ids], torch.int64),
                          positions=self._tensor([positions], torch.int64),
                          metadata=metadata,
                          logits_indices=self._tensor(logits_indices, torch.int64))

    def _group(self, items: Sequence[ForwardItem], start: int, end: int,
               fresh: bool) -> AttentionGroup:
        cu_seqlens = [0]
        for item in items:
            cu_seqlens.append(cu_seqlens[-1] + len(item.token_ids))
        context_lens = [item.start + len(item.token_ids) for item in items]
        return AttentionGroup(
            start=start, end=end, block_tables=self._block_tables(items),
            context_lens=self._tensor(context_lens, torch.int32),
            cu_seqlens_q=self._tensor(cu_seqlens, torch.int32),
            max_query_len=max(len(item.token_ids) for item in items),
            max_context_len=max(context_lens), fresh_prefill=fresh)

    def _block_tables(self, items: Sequence[ForwardItem]) -> torch.Tensor:
        """`[S, max_blocks]`, padded with block 0 (the op ignores entries past the end)."""
        width = max(len(item.block_table) for item in items)
        rows = [list(item.block_table) + [0] * (width - len(item.block_table)) for item in items]
        return self._tensor(rows, torch.int32)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return host_to_device(data, dtype, self.device)
