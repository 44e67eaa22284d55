"""Batched sampling: logits `[R, V]` of R positions -> one token (and logprobs) per row.

Each row belongs to a sequence and carries its `SamplingParams`; a row of a speculative
verification also carries the draft tokens before its position, which count as generated.
The pipeline, per row:

1. `process`: min_tokens (EOS, unless ignore_eos, and `stop_token_ids` get -inf while
   fewer than `min_tokens` tokens were generated), then the penalties (repetition over
   prompt + output, presence and frequency over the output, as vLLM defines them), then
   the temperature (greedy rows are not scaled). These are the *processed logits*.
2. `distribution`: min-p (relative to the most likely token), then top-k, then top-p on
   what is left, then softmax. Greedy rows get the one-hot of the argmax.
3. `draw`: greedy rows take the argmax; others race exponential noise (argmax of
   probs / E with E ~ Exp(1), which samples probs exactly). A seeded sequence draws its
   noise from its own generator, so its tokens do not depend on the rest of the batch.

Logprobs are `log_softmax` of the processed logits (step 1: after penalties and
temperature, before min-p / top-k / top-p truncation), for the sampled token and the
`logprobs` most likely ones.

`sample` returns host values (and waits for the device); `sample_on_device` returns the
token ids as a device tensor and never waits, for overlapped steps: it takes no rows with
penalties or logprobs, which need the host's view of the tokens. Every host value the
pipeline needs on the device goes up without waiting (`pinned_uploads.py`). The sampler
knows nothing about models or scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tessera.serve.argmax import first_argmax
from tessera.serve.pinned_uploads import host_to_device
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.sequence import Sequence, TokenLogprobs


@dataclass
class SamplingRow:
    seq: Sequence
    draft_ids: Seq[int] = ()  # draft tokens before this position, counted as generated

    @property
    def num_generated(self) -> int:
        return self.seq.num_output_tokens + len(self.draft_ids)


class Sampler:
    def __init__(self, eos_token_ids: Seq[int]):
        self.eos_token_ids = tuple(eos_token_ids)

    def sample(self, logits: torch.Tensor, rows: Seq[SamplingRow]
               ) -> list[tuple[int, TokenLogprobs | None]]:
        processed = self.process(logits, rows)
        token_ids = self._draw_ids(processed, rows).tolist()  # NOTE: the step's host sync
        return list(zip(token_ids, self.logprobs(processed, rows, token_ids), strict=True))

    def sample_on_device(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> torch.Tensor:
        """Token ids `[R]` (int64, on the logits' device), queued without a host sync."""
        assert all(samples_on_device(r.seq.params) for r in rows), \
            "rows with penalties or logprobs need sample()"
        return self._draw_ids(self.process(logits, rows), rows)

    def _draw_ids(self, processed: torch.Tensor, rows: Seq[SamplingRow]) -> torch.Tensor:
        if all(r.seq.params.is_greedy for r in rows):
            return first_argmax(processed)
        return self.draw(self.distribution(processed, rows), rows)

    # ------------------------------------------------------------------ 1. process
    def process(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> torch.Tensor:
        """The processed logits; `logits` itself is never modified (it may be a view of a
        CUDA graph's output), and is returned as is when no row changes it."""
        logits = logits.float()
        edited = [i for i, row in enumerate(rows) if row.seq.params.has_penalties
                  or row.num_generated < row.seq.params.min_tokens]
        if edited:
            logits = logits.clone()
        for i in edited:
            row, params = rows[i], rows[i].seq.params
            if row.num_generated < params.min_tokens:
                logits[i, list(self.suppressed_ids(row))] = float("-inf")
            if params.has_penalties:
                logits[i] = apply_penalties(logits[i], row.seq.prompt_ids,
                                            [*row.seq.output_ids, *row.draft_ids], params)
        temperatures = [r.seq.params.temperature or 1.0 for r in rows]
        if any(t != 1.0 for t in temperatures):
            scale = host_to_device(temperatures, logits.dtype, logits.device)
            logits = logits / scale[:, None]
        return logits

    def suppressed_ids(self, row: SamplingRow) -> set[int]:
        params = row.seq.params
        eos = () if params.ignore_eos else self.eos_token_ids
        return {*eos, *params.stop_token_ids}

    # ------------------------------------------------------------------ 2. distribution
    def distribution(self, processed: torch.Tensor, rows: Seq[SamplingRow]) -> torch.Tensor:
        """Probabilities `[R, V]` each row samples from (one-hot for greedy rows)."""
        params = [r.seq.params for r in rows]
        vocab = processed.shape[-1]
        if any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params):
            processed = truncate(
                processed,
                top_k=self._row_tensor([p.top_k or vocab for p in params], processed),
                top_p=self._row_tensor([p.top_p for p in params], processed),
                min_p=self._row_tensor([p.min_p for p in params], processed),
            )
        probs = torch.softmax(processed, dim=-1)
        if any(p.is_greedy for p in params):
            is_greedy = self._row_tensor([p.is_greedy for p in params], processed).bool()
            one_hot = torch.zeros_like(probs).scatter_(-1, processed.argmax(-1, True), 1.0)
            probs = torch.where(is_greedy[:, None], one_hot, probs)
        return probs

    @staticmethod
    def _row_tensor(values: list, like: torch.Tensor) -> torch.Tensor:
        return host_to_device(values, like.dtype, like.device)

    # ------------------------------------------------------------------ 3. draw
    def draw(self, probs: torch.Tensor, rows: Seq[SamplingRow]) -> torch.Tensor:
        """Token ids `[R]` (int64, on the device)."""
        token_ids = probs.argmax(dim=-1)  # greedy rows: their probs are one-hot
        sampled = [i for i, r in enumerate(rows) if not r.seq.params.is_greedy]
        if sampled:
            index = host_to_device(sampled, torch.int64, probs.device)
            noise = torch.empty_like(probs[index]).exponential_()
            for j, i in enumerate(sampled):
                if rows[i].seq.generator is not None:
                    noise[j] = exponential_noise(probs.shape[-1], rows[i].seq.generator,
                                                 probs.device)
            token_ids[index] = (probs[index] / noise).argmax(dim=-1)
        return token_ids

    # ------------------------------------------------------------------ logprobs
    def logprobs(self, processed: torch.Tensor, rows: Seq[SamplingRow],
                 token_ids: Seq[int]) -> list[TokenLogprobs | None]:
        wanted = [i for i, r in enumerate(rows) if r.seq.params.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(rows)
        if not wanted:
            return out
        logprobs = torch.log_softmax(processed[wanted], dim=-1)
        for j, i in enumerate(wanted):
            num_top = rows[i].seq.params.logprobs
            top = torch.topk(logprobs[j], num_top) if num_top else None
            top_pairs = () if top is None else tuple(
                zip(top.indices.tolist(), top.values.tolist(), strict=True))
            out[i] = TokenLogprobs(token_ids[i], float(logprobs[j, token_ids[i]]), top_pairs)
        return out


def samples_on_device(params: SamplingParams) -> bool:
    """Whether rows with `params` sample without the host's view of their tokens (no
    penalties, no logprobs): what `sample_on_device` takes."""
    return not params.has_penalties and params.logprobs is None


def exponential_noise(size: int, generator: torch.Generator,
                      device: torch.device) -> torch.Tensor:
    """Exp(1) noise from a (CPU) per-sequence generator, moved to `device`."""
    noise = torch.empty(size, pin_memory=device.type == "cuda")
    return noise.exponential_(generator=generator).to(device, non_blocking=True)


def apply_penalties(logits: torch.Tensor, prompt_ids: Seq[int], output_ids: Seq[int],
                    params) -> torch.Tensor:
    """One row `[V]`: repetition over prompt + output, presence/frequency over output."""
    vocab = logits.shape[-1]
    device = logits.device
    output_counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long, device=device),
                                   minlength=vocab).to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = output_counts > 0
        seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        penalty = params.repetition_penalty
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    logits = logits - params.frequency_penalty * output_counts
    return logits - params.presence_penalty * (output_counts > 0).to(logits.dtype)


def truncate(logits: torch.Tensor, *, top_k: torch.Tensor, top_p: torch.Tensor,
             min_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's min-p, then top-k, then top-p (nucleus) set; always keeps
    the most likely token. top_k `[R]` (V = off), top_p `[R]`, min_p `[R]`."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None] >= top_k[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    drop |= probs < min_p[:, None] * probs[:, :1]
    kept = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token when the kept mass strictly before it already reaches top_p.
    drop |= (kept.cumsum(-1) - kept) >= top_p[:, None]
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
