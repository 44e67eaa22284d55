"""Continuous batching: which sequences compute which tokens in the next step.

The scheduler owns the waiting and running queues and recomposes the batch every step under
two limits: `max_num_batched_tokens` tokens computed per step and `max_num_seqs` running
sequences. Each step:

1. Running sequences first, decodes before prompts still being prefilled (so a long prompt
   never stalls the decodes): a decode computes 1 token (plus the slots its speculative
   drafts need), a prompt the next chunk that fits the token budget (chunked prefill). A
   decode whose newest token is its last (`max_tokens`), still a placeholder of an
   overlapped step, computes nothing (what it would sample is past the end): the engine
   finishes it once it reads that token.
   When the pool has no block for a running sequence, the most recently admitted running
   sequence not yet scheduled this step is preempted by recompute: its blocks are freed and
   it returns to the front of the waiting queue; later it recomputes prompt + generated
   tokens (hitting the prefix cache where it can) and continues with the same output.
2. Then, if nothing was preempted, waiting sequences in arrival order, while the pool can
   hold all their tokens (admission control) and the budget lasts.
3. A prompt of an n > 1 request whose prefill finishes this step forks its n - 1 siblings:
   they share its blocks (copy-on-write later) and sample from its logits.

Requests that could never fit are rejected by the engine before they get here. The
scheduler knows nothing about models, devices or sampling.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tessera.serve.block_manager import BlockManager
from tessera.serve.config import EngineConfig
from tessera.serve.model_runner import ForwardItem
from tessera.serve.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens whose keys and values this step computes
    is_sampling: bool  # the chunk ends at the sequence's last token: a token is sampled
    num_lookahead: int = 0  # extra slots reserved for speculative draft tokens
    sibling_of: Sequence | None = None  # a sibling forked this step: it uses these logits

    @property
    def start(self) -> int:
        """Position of the first token computed (read it before the step's postprocess)."""
        return self.seq.num_computed_tokens

    @property
    def new_token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start:self.start + self.num_tokens]

    def forward_item(self, draft_ids: list[int] | tuple = (), *,
                     num_logits: int | None = None) -> ForwardItem:
        """The runner's view: the new tokens (and drafts); by default logits for the
        positions that sample."""
        if num_logits is None:
            num_logits = 1 + len(draft_ids) if self.is_sampling else 0
        return ForwardItem(self.seq.block_table, self.start,
                           [*self.new_token_ids, *draft_ids], num_logits)


@dataclass
class ScheduledBatch:
    entries: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write

    @property
    def is_empty(self) -> bool:
        return not self.entries

    @property
    def computed(self) -> list[ScheduledSeq]:
        """Entries the model runs (forked siblings only share their parent's logits)."""
        return [e for e in self.entries if e.sibling_of is None]


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        self.running.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Remove the request's unfinished sequences and free their blocks."""
        seqs = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in seqs:
            self._remove(seq)
        return seqs

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        budget, has_preempted = self._schedule_running(batch, budget)
        if not has_preempted:
            self._schedule_waiting(batch, budget)
        self._fork_siblings(batch)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        num_preemptions = self.num_preemptions
        scheduled: set[int] = set()
        for seq in sorted(self.running, key=lambda s: not s.is_decoding):  # decodes first
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens, num_lookahead = self._num_new_tokens(seq, budget)
            num_slots = num_tokens + num_lookahead
            if num_tokens == 0 or not self._make_room(seq, num_slots, scheduled):
                continue
            batch.block_copies += self.block_manager.append_slots(seq, num_slots)
            batch.entries.append(ScheduledSeq(seq, num_tokens, self._completes(seq, num_tokens),
                                              num_lookahead))
            scheduled.add(seq.seq_id)
            budget -= num_slots
        return budget, self.num_preemptions > num_preemptions

    def _make_room(self, seq: Sequence, num_slots: int, scheduled: set[int]) -> bool:
        """Preempt the most recently admitted unscheduled sequences until `seq` has its
        slots; False if `seq` itself had to go."""
        while not self.block_manager.can_append_slots(seq, num_slots):
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            assert not seq.num_placeholders, "a preempted sequence is admitted once resolved"
            num_new_seqs = seq.params.n if seq.is_fork_pending else 1
            if len(self.running) + num_new_seqs > self.config.max_num_seqs:
                break
            if not self.config.enable_chunked_prefill and seq.num_tokens > budget:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            seq.start_running(self.block_manager.allocate(seq), time.monotonic())
            self.running.append(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            batch.entries.append(ScheduledSeq(seq, num_tokens, self._completes(seq, num_tokens)))
            budget -= num_tokens

    def _num_new_tokens(self, seq: Sequence, budget: int) -> tuple[int, int]:
        """(tokens to compute, draft slots to reserve) for a running sequence."""
        if seq.is_decoding:
            if budget < 1 or seq.num_remaining_tokens <= 0:
                return 0, 0  # no tokens left: its newest one is a placeholder, its last
            wanted = min(self.config.num_lookahead_tokens, seq.num_remaining_tokens - 1)
            return 1, max(0, min(wanted, budget - 1))
        remaining = seq.num_uncomputed_tokens
        if not self.config.enable_chunked_prefill:
            return (remaining, 0) if remaining <= budget else (0, 0)
        return min(remaining, budget), 0

    @staticmethod
    def _completes(seq: Sequence, num_tokens: int) -> bool:
        return seq.num_computed_tokens + num_tokens == seq.num_tokens

    def _fork_siblings(self, batch: ScheduledBatch) -> None:
        for entry in list(batch.entries):
            parent = entry.seq
            if not parent.is_fork_pending or not entry.is_sampling:
                continue
            for index in range(1, parent.params.n):
                child = parent.fork(index)
                self.block_manager.fork(parent, child)
                self.running.append(child)
                batch.entries.append(ScheduledSeq(child, entry.num_tokens, True,
                                                  sibling_of=parent))
            parent.mark_forked()

    # ------------------------------------------------------------------ after a step
    def finish_step(self, batch: ScheduledBatch) -> None:
        """Register newly computed full blocks; release finished sequences."""
        for entry in batch.entries:
            seq = entry.seq
            if seq.block_table:
                self.block_manager.cache_blocks(seq)
            if seq.is_finished:
                self._remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.preempt()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
