"""What the engine returns: `RequestOutput` per request per step, built from its sequences.

`token_ids`, `text` and `logprobs` are cumulative (everything generated and read back so
far: never a sequence's placeholders, see `sequence.py`); a streaming caller diffs
consecutive outputs. While a request with stop strings is unfinished, the last
`len(longest stop) - 1` characters are held back from `text`, so text that turns out to
start a stop string is never shown. Timings are `time.monotonic()` seconds. This module
knows nothing about scheduling or models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.serve.sequence import Request, Sequence, TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # None while running; "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_preemptions: int
    inter_token_latencies: list[float] = field(default_factory=list)  # of completion 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # why a request was refused (finish_reason "error")


def completion_output(seq: Sequence) -> CompletionOutput:
    text = seq.text
    held_back = max((len(s) for s in seq.params.stop), default=1) - 1
    if not seq.is_finished and held_back:
        text = text[:max(0, len(text) - held_back)]
    logprobs = list(seq.logprobs) if seq.logprobs is not None else None
    token_ids = seq.output_ids[:seq.num_resolved_output_tokens]  # no placeholders
    return CompletionOutput(seq.index, token_ids, text, logprobs,
                            seq.finish_reason, seq.stop_reason)


def request_output(request: Request) -> RequestOutput:
    first = request.seqs[0]
    timings = first.timings
    metrics = RequestMetrics(
        arrival_time=timings.arrival, first_scheduled_time=timings.first_scheduled,
        first_token_time=timings.first_token, finished_time=timings.finished,
        num_cached_tokens=first.num_cached_tokens,
        num_preemptions=sum(s.num_preemptions for s in request.seqs),
        inter_token_latencies=list(timings.inter_token_latencies),
    )
    return RequestOutput(request.request_id, list(request.prompt_ids),
                         [completion_output(s) for s in request.seqs],
                         request.is_finished, metrics, first.error)
