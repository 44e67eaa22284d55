"""Speculative decoding: propose k tokens cheaply, verify them with one target forward.

Proposers:
- `DraftModelProposer`: a small model sharing the target's tokenizer (its vocabulary size
  must match). Its KV cache is a second paged pool with the same block tables, so prefix
  hits, copy-on-write and preemption apply to it unchanged. Every step it computes the same
  prompt chunks as the target, so its cache always covers what the target's covers; a
  decoding sequence then drafts k tokens autoregressively (sampled from the draft's
  distribution under the request's sampling params). When all k are accepted, one extra
  forward writes the last draft's keys and values, keeping the two caches level. Rejected
  positions need no rollback: they lie past `num_computed_tokens` and are overwritten.
- `NgramProposer`: prompt lookup. The most recent earlier occurrence of the sequence's last
  n tokens (n from `ngram_max` down to `ngram_min`) proposes the tokens that followed it.

Verification scores the k + 1 positions (the last token and the k drafts) in one target
forward, then applies the standard rule (Leviathan et al. 2023, Chen et al. 2023): draft
token d is accepted with probability min(1, p(d) / q(d)); on rejection a token is sampled
from norm(max(0, p - q)) and the step ends; if all k are accepted, a bonus token is sampled
from p. The emitted tokens then follow the target distribution p exactly (p and q being
the processed distributions of `sampler.py`; an n-gram draft has q = one-hot). Greedy
requests accept while the draft equals the target's argmax.

It knows nothing about requests, stop conditions or text.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tessera.errors import ConfigError
from tessera.model.transformer import TesseraForCausalLM
from tessera.serve.config import EngineConfig
from tessera.serve.model_runner import ForwardItem, ModelRunner
from tessera.serve.sampler import Sampler, SamplingRow, exponential_noise
from tessera.serve.scheduler import ScheduledBatch, ScheduledSeq
from tessera.serve.sequence import Sequence, TokenLogprobs

SampledTokens = dict[int, list[tuple[int, TokenLogprobs | None]]]  # seq id -> new tokens


@dataclass
class Proposal:
    draft_ids: list[int]
    draft_probs: torch.Tensor | None  # [k, V] the draft's distributions; None: one-hot


@dataclass
class SpeculativeStats:
    num_drafts: int = 0  # verifications with at least one draft token
    num_draft_tokens: int = 0  # proposed
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification: accepted drafts plus the one sampled token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


# ---------------------------------------------------------------------- the accept rule
def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    noise = (exponential_noise(probs.shape[-1], generator, probs.device)
             if generator is not None else torch.empty_like(probs).exponential_())
    return int((probs / noise).argmax())


def verify_drafts(target_probs: torch.Tensor, draft_ids: Seq[int],
                  draft_probs: torch.Tensor | None,
                  generator: torch.Generator | None) -> list[int]:
    """Tokens emitted for one sequence: accepted drafts, then one sampled token.

    target_probs `[m + 1, V]`: p at each draft position and after the last; draft_probs
    `[m, V]`: q that drafted each token (None: deterministic drafts, q = one-hot).
    NOTE: reads probabilities one at a time (host syncs); k is small.
    """
    emitted: list[int] = []
    for j, token in enumerate(draft_ids):
        p = float(target_probs[j, token])
        q = 1.0 if draft_probs is None else float(draft_probs[j, token])
        uniform = float(torch.rand(1, generator=generator))
        if uniform * q < p:  # accept with probability min(1, p / q)
            emitted.append(token)
            continue
        if draft_probs is None:
            residual = target_probs[j].clone()
            residual[token] = 0.0
        else:
            residual = (target_probs[j] - draft_probs[j]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: p itself is the residual
            residual = target_probs[j]
        return [*emitted, sample_from(residual, generator)]
    return [*emitted, sample_from(target_probs[len(draft_ids)], generator)]


def verify_greedy(target_argmax: Seq[int], draft_ids: Seq[int]) -> list[int]:
    """Accept drafts while they equal the target's argmax; then the target's token."""
    emitted: list[int] = []
    for token, best in zip(draft_ids, target_argmax, strict=False):
        if token != best:
            break
        emitted.append(token)
    return [*emitted, target_argmax[len(emitted)]]


# ---------------------------------------------------------------------- proposers
class NgramProposer:
    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens; [] when the last n tokens never occurred before.
        NOTE: a plain backwards scan, O(len) per n: fine for the lengths served here."""
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            suffix = token_ids[-n:]
            for end in range(len(token_ids) - 2, n - 2, -1):  # end: the match's last index
                if token_ids[end] == suffix[-1] and token_ids[end - n + 1:end + 1] == suffix:
                    return token_ids[end + 1:end + 1 + k]
        return []


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, sampler: Sampler):
        self.runner, self.sampler = runner, sampler

    def propose(self, batch: ScheduledBatch) -> dict[int, Proposal]:
        """Keep the draft cache level with this step's chunks; draft for decodes."""
        drafting = [e for e in batch.computed if e.num_lookahead > 0]
        wanted = {e.seq.seq_id for e in drafting}
        logits = self.runner.forward([
            e.forward_item(num_logits=int(e.seq.seq_id in wanted)) for e in batch.computed])
        proposals = {e.seq.seq_id: Proposal([], None) for e in drafting}
        probs: dict[int, list[torch.Tensor]] = {e.seq.seq_id: [] for e in drafting}
        while drafting:
            rows = [SamplingRow(e.seq, proposals[e.seq.seq_id].draft_ids) for e in drafting]
            q = self.sampler.distribution(self.sampler.process(logits, rows), rows)
            tokens = self.sampler.draw(q, rows).tolist()
            for i, (entry, token) in enumerate(zip(drafting, tokens, strict=True)):
                proposals[entry.seq.seq_id].draft_ids.append(token)
                probs[entry.seq.seq_id].append(q[i])
            drafting = [e for e in drafting
                        if len(proposals[e.seq.seq_id].draft_ids) < e.num_lookahead]
            if drafting:
                logits = self.runner.forward([self._draft_item(e, proposals) for e in drafting])
        for seq_id, proposal in proposals.items():
            proposal.draft_probs = torch.stack(probs[seq_id])
        return proposals

    @staticmethod
    def _draft_item(entry: ScheduledSeq, proposals: dict[int, Proposal]) -> ForwardItem:
        drafted = proposals[entry.seq.seq_id].draft_ids
        return ForwardItem(entry.seq.block_table, entry.start + len(drafted), drafted[-1:], 1)

    def catch_up(self, batch: ScheduledBatch, proposals: dict[int, Proposal],
                 sampled: SampledTokens) -> None:
        """Write the draft cache at the last draft of sequences that accepted all k."""
        items = []
        for entry in batch.computed:
            proposal = proposals.get(entry.seq.seq_id)
            if proposal and len(sampled[entry.seq.seq_id]) > len(proposal.draft_ids):
                drafted = proposal.draft_ids
                items.append(ForwardItem(entry.seq.block_table, entry.start + len(drafted),
                                         drafted[-1:], 0))
        if items:
            self.runner.forward(items)


# ---------------------------------------------------------------------- the decoder
class SpeculativeDecoder:
    """One engine step with drafts: propose, verify in one target forward, accept."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, sampler: Sampler,
                 draft_runner: ModelRunner | None):
        self.runner, self.sampler = runner, sampler
        self.draft = DraftModelProposer(draft_runner, sampler) if draft_runner else None
        self.ngram = NgramProposer(config.ngram_min, config.ngram_max)
        self.stats = SpeculativeStats()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if self.draft is not None:
            self.draft.runner.copy_blocks(copies)

    def run(self, batch: ScheduledBatch) -> SampledTokens:
        proposals = self._propose(batch)
        drafts = {seq_id: p.draft_ids for seq_id, p in proposals.items()}
        logits = self.runner.forward([e.forward_item(drafts.get(e.seq.seq_id, ()))
                                      for e in batch.computed])
        sampled = self._verify(batch, logits, proposals)
        if self.draft is not None:
            self.draft.catch_up(batch, proposals, sampled)
        return sampled

    def _propose(self, batch: ScheduledBatch) -> dict[int, Proposal]:
        if self.draft is not None:
            return self.draft.propose(batch)
        return {e.seq.seq_id: Proposal(self.ngram.propose(e.seq.token_ids, e.num_lookahead),
                                       None)
                for e in batch.computed if e.num_lookahead > 0}

    def _verify(self, batch: ScheduledBatch, logits: torch.Tensor,
                proposals: dict[int, Proposal]) -> SampledTokens:
        """Score every sampling entry's positions in one batch, then accept per sequence."""
        first_row, num_rows = {}, 0
        for entry in batch.computed:
            if entry.is_sampling:
                first_row[entry.seq.seq_id] = num_rows
                num_rows += 1 + len(_drafts(proposals, entry.seq))
        sampling = [e for e in batch.entries if e.is_sampling]
        index, rows = [], []
        for entry in sampling:
            owner = entry.sibling_of or entry.seq
            draft_ids = _drafts(proposals, entry.seq)
            index += range(first_row[owner.seq_id], first_row[owner.seq_id] + 1 + len(draft_ids))
            rows += [SamplingRow(entry.seq, draft_ids[:j]) for j in range(len(draft_ids) + 1)]
        processed = self.sampler.process(logits[index], rows)
        target_probs = self.sampler.distribution(processed, rows)
        sampled, start = {}, 0
        for entry in sampling:
            proposal = proposals.get(entry.seq.seq_id, Proposal([], None))
            end = start + 1 + len(proposal.draft_ids)
            tokens = self._accept(entry.seq, target_probs[start:end], proposal)
            logprobs = self.sampler.logprobs(processed[start:start + len(tokens)],
                                             rows[start:start + len(tokens)], tokens)
            sampled[entry.seq.seq_id] = list(zip(tokens, logprobs, strict=True))
            start = end
        return sampled

    def _accept(self, seq: Sequence, target_probs: torch.Tensor, proposal: Proposal
                ) -> list[int]:
        draft_ids = proposal.draft_ids
        if seq.params.is_greedy:
            tokens = verify_greedy(target_probs.argmax(-1).tolist(), draft_ids)
        else:
            tokens = verify_drafts(target_probs, draft_ids, proposal.draft_probs, seq.generator)
        if draft_ids:
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += len(draft_ids)
            self.stats.num_accepted_tokens += len(tokens) - 1
        return tokens


def _drafts(proposals: dict[int, Proposal], seq: Sequence) -> list[int]:
    proposal = proposals.get(seq.seq_id)
    return proposal.draft_ids if proposal is not None else []


def check_draft_model(target: TesseraForCausalLM, draft: TesseraForCausalLM) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from "
            f"the target's ({target.config.vocab_size}); a draft model must share the "
            "target's tokenizer"
        )
