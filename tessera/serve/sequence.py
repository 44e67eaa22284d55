"""Per-request state: `Sequence` (one completion) and `Request` (a prompt's n completions).

A sequence holds its prompt and output ids, its status, its block table (which blocks of
the KV pool hold its keys and values, in order), how many of its tokens have keys and
values in the cache (`num_computed_tokens`), its text, logprobs, finish reason, random
generator and timings. Other parts change it only through its methods: the block manager
through the block-table methods, the scheduler through `start_running` / `mark_computed` /
`preempt`, the engine through `append_token` / `finish`.

Invariant between steps: a running sequence that has sampled has keys and values for every
token but its newest one (`num_computed_tokens == num_tokens - 1`); a prompt being
prefilled in chunks has fewer.

With overlapped steps (see `engine.py`) a token is known on the device one step before the
host reads it: it enters the ids as a *placeholder*, a negative number (`-1 - row`: the
row of the sampling step's token tensor that holds it), and counts as generated; the
engine later resolves it (`resolve_placeholder`, oldest first) or, when an earlier token
ended the sequence, drops it. Text, logprobs, timings and stop checks see only resolved
tokens.

It knows nothing about devices or models; its detokenizer (if any) turns ids into text.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from tessera.serve.detokenizer import IncrementalDetokenizer
from tessera.serve.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one generated position (see `sampler.py` for which logits)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the `logprobs` most likely (token id, logprob)


@dataclass
class SequenceTimings:
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                 max_tokens: int, arrival_time: float, index: int = 0,
                 detokenizer: IncrementalDetokenizer | None = None):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.params = params
        self.max_tokens = max_tokens  # params.max_tokens capped by the model's context
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.token_ids = list(prompt_ids)  # prompt + output
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache, first admission
        self.num_preemptions = 0
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.detokenizer = detokenizer  # None: no tokenizer, no text
        self.finish_reason: str | None = None  # "stop", "length", "abort", "error"
        self.stop_reason: int | str | None = None  # the stop token id or stop string hit
        self.error: str | None = None
        self.generator = make_generator(params.seed, index)
        self.timings = SequenceTimings(arrival=arrival_time)
        self.is_fork_pending = params.n > 1  # an n > 1 parent forks its siblings once
        self.num_placeholders = 0  # trailing output ids sampled but not read yet

    # ------------------------------------------------------------------ derived state
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_resolved_output_tokens(self) -> int:
        return len(self.output_ids) - self.num_placeholders

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the newest token lacks keys and values: the next step samples."""
        return self.num_uncomputed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_remaining_tokens(self) -> int:
        return self.max_tokens - self.num_output_tokens

    # ------------------------------------------------------------------ block table
    def append_block(self, block_id: int) -> None:
        self.block_table.append(block_id)

    def replace_block(self, position: int, block_id: int) -> None:
        self.block_table[position] = block_id

    def clear_blocks(self) -> list[int]:
        table, self.block_table = self.block_table, []
        return table

    # ------------------------------------------------------------------ scheduling
    def start_running(self, num_cached_tokens: int, now: float) -> None:
        """Admitted with its first `num_cached_tokens` tokens found in the prefix cache."""
        self.status = SequenceStatus.RUNNING
        self.num_computed_tokens = num_cached_tokens
        if self.timings.first_scheduled is None:
            self.timings.first_scheduled = now
            self.num_cached_tokens = num_cached_tokens

    def mark_computed(self, num_tokens: int) -> None:
        self.num_computed_tokens += num_tokens
        assert self.num_computed_tokens <= self.num_tokens, "computed past the last token"

    def preempt(self) -> None:
        """Back to waiting; its blocks were freed, so it recomputes every token later."""
        assert not self.block_table, "free the blocks before preempting"
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions += 1

    # ------------------------------------------------------------------ outputs
    def append_token(self, token_id: int, logprobs: TokenLogprobs | None, now: float) -> str:
        """Record a generated token; returns the text it completes."""
        assert not self.num_placeholders, "resolve the placeholders first"
        self.output_ids.append(token_id)
        self.token_ids.append(token_id)
        return self._record(token_id, logprobs, now)

    def append_placeholder(self, placeholder: int) -> None:
        """A token sampled on the device, not read yet: `placeholder` (< 0) stands for it."""
        assert placeholder < 0, "placeholders are negative"
        self.output_ids.append(placeholder)
        self.token_ids.append(placeholder)
        self.num_placeholders += 1

    def resolve_placeholder(self, token_id: int, now: float) -> str:
        """The oldest placeholder becomes `token_id`; returns the text it completes."""
        assert self.num_placeholders, "no placeholder to resolve"
        position = len(self.output_ids) - self.num_placeholders
        self.output_ids[position] = token_id
        self.token_ids[self.num_prompt_tokens + position] = token_id
        self.num_placeholders -= 1
        return self._record(token_id, None, now)

    def drop_placeholders(self) -> None:
        """Forget the unread tokens (an earlier one ended the sequence). Their keys and
        values were never computed: each was the newest token when it was sampled."""
        if self.num_placeholders:
            del self.output_ids[-self.num_placeholders:]
            del self.token_ids[-self.num_placeholders:]
            self.num_placeholders = 0
        assert self.num_computed_tokens <= self.num_tokens, "a dropped token was computed"

    def _record(self, token_id: int, logprobs: TokenLogprobs | None, now: float) -> str:
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if self.timings.first_token is None:
            self.timings.first_token = now
        else:
            self.timings.inter_token_latencies.append(now - self.timings.last_token)
        self.timings.last_token = now
        new_text = self.detokenizer.step(token_id) if self.detokenizer is not None else ""
        self.text += new_text
        return new_text

    def finish(self, reason: str, now: float, *, stop_reason: int | str | None = None,
               text_end: int | None = None, error: str | None = None) -> None:
        """Mark finished; `text_end` cuts the text (a stop string and what follows)."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.stop_reason, self.error = reason, stop_reason, error
        if text_end is not None:
            self.text = self.text[:text_end]
        self.timings.finished = now

    def mark_forked(self) -> None:
        self.is_fork_pending = False

    def fork(self, index: int) -> Sequence:
        """A sibling sharing everything computed so far (its blocks are shared by the block
        manager's `fork`); it has not sampled yet, so it must have no output."""
        assert not self.output_ids, "siblings fork before the first token"
        child = Sequence(self.request_id, self.prompt_ids, self.params,
                         max_tokens=self.max_tokens, arrival_time=self.timings.arrival,
                         index=index, detokenizer=self.detokenizer and self.detokenizer.fresh())
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.timings.first_scheduled = self.timings.first_scheduled
        child.is_fork_pending = False
        return child


def make_generator(seed: int | None, index: int) -> torch.Generator | None:
    """The per-sequence random stream: `seed` for completion 0, a derived seed for the
    others; None (the global generator) when unseeded."""
    if seed is None:
        return None
    derived = seed if index == 0 else hash((seed, index)) & (2**63 - 1)
    return torch.Generator().manual_seed(derived)


class Request:
    """A prompt and its n sequences (one until the first token, then n siblings)."""

    def __init__(self, request_id: str, seq: Sequence):
        self.request_id = request_id
        self.prompt_ids = seq.prompt_ids
        self.params = seq.params
        self.seqs = [seq]

    def add_sibling(self, seq: Sequence) -> None:
        self.seqs.append(seq)
        self.seqs.sort(key=lambda s: s.index)

    @property
    def is_finished(self) -> bool:
        # A parent that finished before forking (aborted, rejected) has no siblings coming.
        is_complete = len(self.seqs) == self.params.n or self.seqs[0].is_fork_pending
        return is_complete and all(s.is_finished for s in self.seqs)
