"""`LLMEngine`: requests in, tokens out, one `step()` at a time.

`step()` reads as schedule -> run -> postprocess: the scheduler picks which sequences compute
which tokens, the model runner computes them (with drafts and verification when speculative
decoding is on) and the sampler picks the new tokens, then the engine appends them, checks
the stop conditions, frees what finished and reports a `RequestOutput` for every request
that progressed (a "final_only" request only once it finished). A request that could never
run (a prompt that fills the model's context, or more tokens than the whole KV pool holds)
is refused with finish reason "error" and a message, reported by the next step, instead of
waiting forever. Whenever the engine goes idle it checks that every KV block is back in
the free pool and raises if not. On CUDA, the engine runs one prefill per length bucket at
startup (kernels compile and autotune then, not under the first requests) and decode steps
replay CUDA graphs (see `cuda_graphs.py`; `EngineConfig.enforce_eager` turns them off), as
does a step that is one fresh prompt alone (`prefill_graphs.py`).

With `async_scheduling` (on by default for CUDA models) steps overlap: a step schedules
and launches its batch, with the device-sampled tokens of the step still running as
placeholders in the inputs (`placeholders.py`), and only then reads back that earlier
step's tokens and postprocesses them while the device computes. Stop conditions are thus
seen one step late; a sequence that stopped computes one token that is dropped, and
outputs are reported one step later. A step overlaps only when no unfinished request
needs the host's view of its tokens while sampling (penalties, logprobs) and speculative
decoding is off; otherwise the engine first reads back what is in flight and runs the
step in order. Outputs are the same either way.

The engine knows nothing about HTTP, asyncio or chat templates; a tokenizer (anything with
`decode(ids, skip_special_tokens=...)`) is needed only for text and stop strings. It is not
thread-safe: one thread calls `add_request`, `abort_request` and `step`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from tessera.errors import ConfigError, RequestError
from tessera.model.cpu_prepack import prepack_linears
from tessera.model.fused_projections import fuse_projections
from tessera.model.gemv_products import use_gemv_products
from tessera.model.rotating_attention import use_rotating_attention
from tessera.model.transformer import TesseraForCausalLM
from tessera.serve.block_manager import BlockManager
from tessera.serve.config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from tessera.serve.cuda_graphs import MAX_GRAPH_QUERY_LEN
from tessera.serve.detokenizer import IncrementalDetokenizer, find_stop
from tessera.serve.kv_pool import blocks_for_budget, bytes_per_block
from tessera.serve.model_runner import ModelRunner, StaticDecodeSettings
from tessera.serve.outputs import RequestOutput, request_output
from tessera.serve.pinned_uploads import host_to_device
from tessera.serve.placeholders import placeholder
from tessera.serve.prefill_graphs import uses_host_boundaries
from tessera.serve.sampler import Sampler, SamplingRow, samples_on_device
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.scheduler import ScheduledBatch, ScheduledSeq, Scheduler
from tessera.serve.sequence import Request, Sequence, TokenLogprobs
from tessera.serve.speculative import SampledTokens, SpeculativeDecoder, check_draft_model


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges for the server's metrics (totals since the engine started)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by sequences
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    spec_num_drafts: int
    spec_num_draft_tokens: int
    spec_num_accepted_tokens: int
    spec_acceptance_rate: float
    spec_mean_accepted_length: float
    num_steps: int  # calls of step() that ran a batch
    step_seconds: float  # wall time inside step()
    forward_seconds: float  # of which model forwards (target and draft)

    @property
    def prefix_cache_hit_rate(self) -> float:
        queried = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / queried if queried else 0.0


def static_decode_settings(config: EngineConfig, model: TesseraForCausalLM,
                           max_model_len: int, query_lens: Seq[int]
                           ) -> StaticDecodeSettings | None:
    """CUDA-graph decode (and lone fresh prefills) on CUDA unless `enforce_eager`; None
    (all eager) elsewhere. Prefill graphs stay off where the attention op reads packed
    boundaries on the host (see `prefill_graphs.py`)."""
    device = model.lm_head.weight.device
    if config.enforce_eager or device.type != "cuda":
        return None
    lens = tuple(sorted({q for q in query_lens if q <= MAX_GRAPH_QUERY_LEN}))
    prefill_len = 0 if uses_host_boundaries(device) else min(
        config.max_prefill_graph_len, config.max_num_batched_tokens, max_model_len)
    return StaticDecodeSettings(max_model_len=max_model_len, query_lens=lens,
                                max_batch_size=min(config.max_num_seqs,
                                                   config.max_cuda_graph_batch_size),
                                max_prefill_graph_len=prefill_len)


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens the host has not read yet."""

    batch: ScheduledBatch
    sampling: list[ScheduledSeq]  # the entries that sample, in the order of `tokens`
    tokens: torch.Tensor  # [R] int64 on the device: what the next step's placeholders mean
    host_tokens: torch.Tensor  # [R] its host copy, complete once `copied` has passed
    copied: torch.cuda.Event | None  # None on the CPU, where the copy is already done

    def read(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()  # NOTE: waits for the device to finish this step
        return self.host_tokens.tolist()


def copy_to_host(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying device `tokens` to pinned host memory; (the copy, its event)."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


class StopCheck(NamedTuple):
    reason: str
    stop_reason: int | str | None = None
    text_end: int | None = None


class LLMEngine:
    def __init__(self, model: TesseraForCausalLM, tokenizer: Any = None, *,
                 config: EngineConfig | None = None,
                 draft_model: TesseraForCausalLM | None = None):
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.max_model_len = min(config.max_model_len or model.config.max_seq_len,
                                 model.config.max_seq_len)
        self._check_speculative(model, draft_model)
        for each in (m for m in (model, draft_model) if m is not None):
            if config.fuse_projections:
                fuse_projections(each)
            if config.gemv_products:
                use_gemv_products(each)  # no-op but on CUDA
            if config.rope_kv_write:
                use_rotating_attention(each)  # no-op but on CUDA
            if config.cpu_prepack:
                prepack_linears(each)  # no-op but on CPU
        num_blocks = self._num_kv_blocks(model, draft_model)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        target_query_lens = (1, config.num_lookahead_tokens + 1)
        self.runner = ModelRunner(model, num_blocks, config.block_size,
                                  static_decode=static_decode_settings(
                                      config, model, self.max_model_len, target_query_lens))
        self.sampler = Sampler(model.config.eos_token_ids)
        self.speculator = None
        draft_runner = None
        if config.speculative_method is not None:
            draft_runner = (ModelRunner(draft_model, num_blocks, config.block_size,
                                        static_decode=static_decode_settings(
                                            config, draft_model, self.max_model_len, (1,)))
                            if draft_model is not None else None)
            self.speculator = SpeculativeDecoder(config, self.runner, self.sampler, draft_runner)
        for runner in (self.runner, draft_runner):
            if runner is not None and runner.device.type == "cuda":
                runner.warm_up(config.max_num_batched_tokens)
                runner.capture_graphs()
        self._requests: dict[str, Request] = {}
        self._refused: list[RequestOutput] = []  # reported by the next step
        is_cuda = self.runner.device.type == "cuda"
        self._overlaps = (config.async_scheduling if config.async_scheduling is not None
                          else is_cuda) and self.speculator is None
        self._in_flight: InFlightStep | None = None
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._step_seconds = 0.0
        self._num_steps = 0

    # ------------------------------------------------------------------ construction
    def _check_speculative(self, model: TesseraForCausalLM,
                           draft_model: TesseraForCausalLM | None) -> None:
        wants_draft = self.config.speculative_method == "draft"
        if wants_draft and draft_model is None:
            raise ConfigError('speculative_method "draft" needs a draft_model')
        if draft_model is not None and not wants_draft:
            raise ConfigError('a draft_model was given; set speculative_method="draft" to use it')
        if draft_model is not None:
            check_draft_model(model, draft_model)

    def _num_kv_blocks(self, model: TesseraForCausalLM,
                       draft_model: TesseraForCausalLM | None) -> int:
        c = self.config
        per_block = sum(bytes_per_block(m.config, c.block_size, m.lm_head.weight.dtype)
                        for m in (model, draft_model) if m is not None)
        num_bytes = c.kv_cache_memory_bytes
        if c.num_kv_blocks is None and c.kv_cache_tokens is None and num_bytes is None:
            blocks_per_seq = -(-self.max_model_len // c.block_size)
            num_bytes = min(DEFAULT_KV_CACHE_BYTES, c.max_num_seqs * blocks_per_seq * per_block)
        return blocks_for_budget(block_size=c.block_size, num_blocks=c.num_kv_blocks,
                                 num_tokens=c.kv_cache_tokens, num_bytes=num_bytes,
                                 bytes_per_block_total=per_block)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: Seq[int],
                    params: SamplingParams | None = None, *,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Invalid input raises `RequestError`; a request that can never
        fit is accepted and finishes at the next step with finish reason "error"."""
        params = params or SamplingParams()
        prompt_ids = self._check_request(request_id, prompt_ids, params)
        now = time.monotonic() if arrival_time is None else arrival_time
        detokenizer = (IncrementalDetokenizer(self.tokenizer,
                                              skip_special_tokens=params.skip_special_tokens)
                       if self.tokenizer is not None else None)
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        seq = Sequence(request_id, prompt_ids, params, max_tokens=max(max_tokens, 0),
                       arrival_time=now, detokenizer=detokenizer)
        request = Request(request_id, seq)
        refusal = self.refusal_reason(prompt_ids, params)
        if refusal is not None:
            seq.finish("error", now, error=refusal)
            self._refused.append(request_output(request))
            return
        self._requests[request_id] = request
        self.num_prompt_tokens += len(prompt_ids)
        self.scheduler.add(seq)

    def _check_request(self, request_id: str, prompt_ids: Seq[int],
                       params: SamplingParams) -> list[int]:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = list(prompt_ids)
        if not ids:
            raise RequestError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids must be integers in [0, {vocab}); "
                               f"got {bad[:5]}")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; pass one to the engine")
        return ids

    def refusal_reason(self, prompt_ids: Seq[int], params: SamplingParams) -> str | None:
        """Why this request could never run here (None: it can)."""
        num_prompt = len(prompt_ids)
        if num_prompt >= self.max_model_len:
            return (f"prompt too long: {num_prompt} tokens leave no room to generate within "
                    f"the model's context of {self.max_model_len} tokens")
        num_total = num_prompt + min(params.max_tokens, self.max_model_len - num_prompt)
        capacity = self.block_manager.num_blocks * self.config.block_size
        if num_total > capacity:
            return (f"prompt too long for the KV cache: {num_prompt} prompt tokens plus "
                    f"max_tokens need {num_total} slots; the pool holds {capacity} "
                    "(lower max_tokens or enlarge the KV cache)")
        if params.n > self.config.max_num_seqs:
            return (f"n={params.n} completions exceed max_num_seqs "
                    f"({self.config.max_num_seqs}) sequences running at once")
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and num_total > budget:
            return (f"prompt too long: {num_total} tokens (prompt plus max_tokens) exceed "
                    f"max_num_batched_tokens ({budget}) with chunked prefill off")
        return None

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        now = time.monotonic()
        for seq in self.scheduler.abort(request_id):
            seq.finish("abort", now)
        if not self.scheduler.has_unfinished():
            self._in_flight = None  # what it computed is aborted or already reported
        self._check_idle()

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self._refused)
                or self._in_flight is not None)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One engine iteration; an output for every request that got tokens (those whose
        `output_kind` is "final_only": only when they finish), finished or was refused
        since the last step. An overlapped step reports the previous step's tokens."""
        start = time.perf_counter()
        outputs, self._refused = self._refused, []
        overlaps = self._can_overlap()
        if not overlaps:
            outputs += self._finish_in_flight()  # this step samples with every token known
        batch = self.scheduler.schedule()
        if batch.is_empty:
            outputs += self._finish_in_flight()
        elif overlaps:
            launched = self._launch(batch)
            outputs += self._finish_in_flight()  # the previous step, while this one runs
            self._in_flight = launched
        else:
            sampled = self._run(batch)
            outputs += self._postprocess(batch, sampled)
        self._num_steps += not batch.is_empty
        self._check_idle()
        self._step_seconds += time.perf_counter() - start
        return outputs

    def _can_overlap(self) -> bool:
        return self._overlaps and all(samples_on_device(r.params)
                                      for r in self._requests.values())

    # ------------------------------------------------------------------ overlapped steps
    def _launch(self, batch: ScheduledBatch) -> InFlightStep:
        """Queue the batch's forward and sampling; its tokens enter as placeholders."""
        self.runner.copy_blocks(batch.block_copies)
        pending = self._in_flight.tokens if self._in_flight is not None else None
        logits = self.runner.forward([e.forward_item() for e in batch.computed],
                                     pending_tokens=pending)
        sampling, logits = self._sampling_logits(batch, logits)
        tokens = self.sampler.sample_on_device(logits, [SamplingRow(e.seq) for e in sampling])
        for entry in batch.entries:
            entry.seq.mark_computed(entry.num_tokens)
        for row, entry in enumerate(sampling):
            entry.seq.append_placeholder(placeholder(row))
        return InFlightStep(batch, sampling, tokens, *copy_to_host(tokens))

    def _finish_in_flight(self) -> list[RequestOutput]:
        """Read back the step in flight (if any): resolve its placeholders, check stops."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            return []
        token_ids = step.read()
        now = time.monotonic()
        for entry, token_id in zip(step.sampling, token_ids, strict=True):
            seq = entry.seq
            self._register_sibling(entry)
            if seq.is_finished:
                continue  # aborted, or an earlier token ended it: this one is dropped
            new_text = seq.resolve_placeholder(token_id, now)
            self.num_generation_tokens += 1
            stop = self._check_stop(seq, token_id, new_text)
            if stop is not None:
                seq.finish(stop.reason, now, stop_reason=stop.stop_reason,
                           text_end=stop.text_end)
                seq.drop_placeholders()
        self.scheduler.finish_step(step.batch)
        return self._step_outputs(step.batch)

    # ------------------------------------------------------------------ steps in order
    def _run(self, batch: ScheduledBatch) -> SampledTokens:
        """Model forward(s) and sampling: the new tokens of every sampling sequence."""
        self.runner.copy_blocks(batch.block_copies)
        if self.speculator is not None:
            self.speculator.copy_blocks(batch.block_copies)
            return self.speculator.run(batch)
        logits = self.runner.forward([e.forward_item() for e in batch.computed])
        sampling, logits = self._sampling_logits(batch, logits)
        tokens = self.sampler.sample(logits, [SamplingRow(e.seq) for e in sampling])
        return {e.seq.seq_id: [token] for e, token in zip(sampling, tokens, strict=True)}

    @staticmethod
    def _sampling_logits(batch: ScheduledBatch, logits: torch.Tensor
                         ) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """The entries that sample and their logits rows (forked siblings share their
        parent's row)."""
        row_of = {e.seq.seq_id: i for i, e in enumerate(e for e in batch.computed
                                                        if e.is_sampling)}
        sampling = [e for e in batch.entries if e.is_sampling]
        rows = [row_of[(e.sibling_of or e.seq).seq_id] for e in sampling]
        if rows != list(range(logits.shape[0])):
            logits = logits[host_to_device(rows, torch.int64, logits.device)]
        return sampling, logits

    def _postprocess(self, batch: ScheduledBatch, sampled: SampledTokens
                     ) -> list[RequestOutput]:
        now = time.monotonic()
        for entry in batch.entries:
            seq = entry.seq
            self._register_sibling(entry)
            num_appended = self._append_tokens(seq, sampled.get(seq.seq_id, []), now)
            # Every token but the newest now has keys and values (accepted drafts included).
            seq.mark_computed(entry.num_tokens + max(num_appended - 1, 0))
        self.scheduler.finish_step(batch)
        return self._step_outputs(batch)

    def _register_sibling(self, entry: ScheduledSeq) -> None:
        request = self._requests.get(entry.seq.request_id)  # None: aborted meanwhile
        if entry.sibling_of is not None and request is not None:
            request.add_sibling(entry.seq)

    def _step_outputs(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Outputs of the batch's requests that report now. Requests still prefilling have
        nothing new; "final_only" ones report when they finish; aborted ones are gone."""
        request_ids = dict.fromkeys(e.seq.request_id for e in batch.entries if e.is_sampling)
        return [self._request_output(request_id) for request_id in request_ids
                if request_id in self._requests
                and self._reports_now(self._requests[request_id])]

    @staticmethod
    def _reports_now(request: Request) -> bool:
        return request.params.output_kind == "cumulative" or request.is_finished

    def _append_tokens(self, seq: Sequence, tokens: list[tuple[int, TokenLogprobs | None]],
                       now: float) -> int:
        """Append until a stop condition; returns how many were appended."""
        for num_appended, (token_id, logprobs) in enumerate(tokens, start=1):
            new_text = seq.append_token(token_id, logprobs, now)
            self.num_generation_tokens += 1
            stop = self._check_stop(seq, token_id, new_text)
            if stop is not None:
                seq.finish(stop.reason, now, stop_reason=stop.stop_reason,
                           text_end=stop.text_end)
                return num_appended
        return len(tokens)

    def _check_stop(self, seq: Sequence, token_id: int, new_text: str) -> StopCheck | None:
        params = seq.params
        num_output = seq.num_resolved_output_tokens  # up to and including `token_id`
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in self.model_config.eos_token_ids:
                return StopCheck("stop")
            if token_id in params.stop_token_ids:
                return StopCheck("stop", token_id)
            found = find_stop(seq.text, len(new_text), params.stop)
            if found is not None:
                return StopCheck("stop", found[1], found[0])
        if num_output >= seq.max_tokens:
            return StopCheck("length")
        return None

    def _request_output(self, request_id: str) -> RequestOutput:
        request = self._requests[request_id]
        if request.is_finished:
            del self._requests[request_id]
        return request_output(request)

    def _check_idle(self) -> None:
        if not self.scheduler.has_unfinished():
            self.block_manager.assert_no_leaks()  # NOTE: raises: a leak is an engine bug

    # ------------------------------------------------------------------ metrics
    def stats(self) -> EngineStats:
        spec = self.speculator.stats if self.speculator is not None else None
        forward_seconds = self.runner.timer.seconds
        if self.speculator is not None and self.speculator.draft is not None:
            forward_seconds += self.speculator.draft.runner.timer.seconds
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=bm.usage, prefix_cache_queried_tokens=bm.num_queried_tokens,
            prefix_cache_hit_tokens=bm.num_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            spec_num_drafts=spec.num_drafts if spec else 0,
            spec_num_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            spec_acceptance_rate=spec.acceptance_rate if spec else 0.0,
            spec_mean_accepted_length=spec.mean_accepted_length if spec else 0.0,
            num_steps=self._num_steps, step_seconds=self._step_seconds,
            forward_seconds=forward_seconds,
        )
