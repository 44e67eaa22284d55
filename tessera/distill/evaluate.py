"""Held-out evaluation of a student (and its teacher), and the data plumbing both use.

`evaluate(model, batches, teacher=...)` returns, over the masked target tokens of the
batches: the model's perplexity (`ppl`), and with a teacher the teacher's perplexity
(`teacher_ppl`), the mean per-token KL(teacher || model) at temperature 1 (`kl`) and the
fraction of tokens whose arg-max prediction matches the teacher's (`agreement`). Sums are
added over ranks, so every rank returns the same numbers.

`run_batch` is the one place a `Batch` meets a model: with document masking the batch's
B rows are flattened into one row of B*T tokens that attends inside `cu_seqlens`
boundaries (per-document positions restart at 0), so packed documents never see each
other. `open_split` tokenizes a corpus split into cached shards and packs it.

`evaluate_sources` backs `tessera eval`: load a model (and a teacher), read the corpus's
held-out split with the model's tokenizer, evaluate. The module knows nothing about
optimisation or checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.data import Batch, PackedSequences, build_shards
from tessera.errors import ConfigError, DataError
from tessera.model.attention import CausalContext
from tessera.model.transformer import ModelOutput
from tessera.parallel.fsdp import all_reduce_sum, barrier

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- batches
def flat_view(batch: Batch) -> tuple[torch.Tensor, ...]:
    """(input_ids, positions, labels, loss_mask) as the model sees them: `[1, B*T]` when the
    batch carries document boundaries, else `[B, T]`."""
    tensors = (batch.input_ids, batch.positions, batch.labels, batch.loss_mask)
    if batch.cu_seqlens is None:
        return tensors
    return tuple(t.reshape(1, -1) for t in tensors)


def run_batch(model: nn.Module, batch: Batch, **options: Any) -> ModelOutput:
    """`model.run` on a packed batch (see the module doc); options go to `run`."""
    input_ids, positions, _labels, _mask = flat_view(batch)
    ctx = CausalContext(cu_seqlens=batch.cu_seqlens)
    return model.run(input_ids, positions, ctx, **options)


# --------------------------------------------------------------------------- metrics
def _token_sums(logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 `[6]`: CE, teacher CE, KL, agreements, masked tokens, labelled tokens."""
    vocab = logits.shape[-1]
    s = logits.reshape(-1, vocab).float()
    y = labels.reshape(-1)
    m = mask.reshape(-1).bool()
    valid = m & (y != IGNORE_INDEX)
    safe_y = torch.where(valid, y, 0)
    ce = (F.cross_entropy(s, safe_y, reduction="none") * valid).sum()
    out = torch.zeros(6, dtype=torch.float64, device=s.device)
    out[0], out[4], out[5] = ce, m.sum(), valid.sum()
    if teacher_logits is not None:
        t = teacher_logits.reshape(-1, vocab).float()
        log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        out[1] = (F.cross_entropy(t, safe_y, reduction="none") * valid).sum()
        out[2] = (kl * m).sum()
        out[3] = ((s.argmax(-1) == t.argmax(-1)) & m).sum()
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], *, teacher: nn.Module | None = None,
             device: torch.device | str = "cpu", chunk_size: int = 1024,
             autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    """Perplexity (and teacher metrics) over `batches` (see the module doc)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        with autocast() if autocast else nullcontext():
            logits = run_batch(model, batch).logits
            teacher_logits = run_batch(teacher, batch).logits if teacher is not None else None
        _ids, _pos, labels, mask = flat_view(batch)
        sums += _chunked_sums(logits, teacher_logits, labels, mask, chunk_size)
    model.train(was_training)
    return _metrics(all_reduce_sum(sums).tolist(), teacher is not None)


def _chunked_sums(logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                  labels: torch.Tensor, mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
    vocab = logits.shape[-1]
    s = logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab) if teacher_logits is not None else None
    y, m = labels.reshape(-1), mask.reshape(-1)
    total = torch.zeros(6, dtype=torch.float64, device=s.device)
    for start in range(0, s.shape[0], chunk_size):
        end = start + chunk_size
        total += _token_sums(s[start:end], None if t is None else t[start:end], y[start:end],
                             m[start:end])
    return total


def _metrics(sums: Sequence[float], has_teacher: bool) -> dict[str, float]:
    ce, teacher_ce, kl, agree, tokens, labelled = sums
    if labelled == 0:
        raise DataError("the evaluation batches hold no target tokens")
    out = {"ppl": math.exp(ce / labelled), "loss": ce / labelled, "tokens": int(labelled)}
    if has_teacher:
        out.update({"teacher_ppl": math.exp(teacher_ce / labelled), "kl": kl / tokens,
                    "agreement": agree / tokens})
    return out


# --------------------------------------------------------------------------- data
def shard_directory(corpus: Sequence[str], text_field: str, val_fraction: float,
                    tokenizer_fingerprint: str, shard_dir: str | None) -> Path:
    """`shard_dir`, or a cache directory keyed by everything the shards depend on."""
    if shard_dir is not None:
        return Path(shard_dir)
    from tessera.checkpoint.registry import cache_dir

    key = json.dumps([list(corpus), text_field, val_fraction, tokenizer_fingerprint])
    return cache_dir() / "shards" / hashlib.sha256(key.encode()).hexdigest()[:16]


def open_split(corpus: Sequence[str], tokenizer: Any, split: str, *, seq_len: int,
               val_fraction: float, text_field: str = "text", shard_dir: str | None = None,
               document_masking: bool = True, num_workers: int = 1,
               is_main: bool = True) -> PackedSequences:
    """Packed sequences of one corpus split, tokenized once into cached shards. With
    several ranks, rank 0 builds the shards while the others wait, then all open them."""
    directory = shard_directory(corpus, text_field, val_fraction, tokenizer.fingerprint,
                                shard_dir)

    def build():
        return build_shards(list(corpus), tokenizer, directory, split=split,
                            val_fraction=val_fraction, text_field=text_field,
                            num_workers=num_workers)

    shards = build() if is_main else None
    barrier()
    if shards is None:
        shards = build()  # finds them up to date and reuses them
    return PackedSequences(shards, seq_len, is_document_masked=document_masking)


def eval_batches(data: PackedSequences, num_sequences: int, micro_batch_size: int, *,
                 rank: int = 0, world_size: int = 1) -> list[Batch]:
    """This rank's batches of the first `num_sequences` sequences (every rank gets the same
    number of batches, so sharded models stay in step)."""
    total = min(num_sequences, len(data))
    per_rank = total // world_size
    if per_rank == 0:
        raise DataError(f"the held-out split has {len(data)} sequences, fewer than the "
                        f"{world_size} ranks; lower data.seq_len or raise data.val_fraction")
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    return [data.batch(mine[i:i + micro_batch_size])
            for i in range(0, per_rank, micro_batch_size)]


# --------------------------------------------------------------------------- tessera eval
def evaluate_sources(model_source: str, corpus: Sequence[str], *, teacher_source: str | None,
                     seq_len: int = 256, num_sequences: int = 32, val_fraction: float = 0.02,
                     split: str = "val", micro_batch_size: int = 2,
                     device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Load `model_source` (and `teacher_source`) and evaluate on `split` of `corpus`."""
    import tessera

    loaded = tessera.load(model_source, dtype=dtype, device=device)
    if loaded.tokenizer is None:
        raise ConfigError(f"{model_source} has no tokenizer; evaluation needs one to read "
                          "the corpus")
    teacher = None
    if teacher_source is not None:
        teacher = tessera.load(teacher_source, dtype=dtype, device=device)
        _check_same_tokenizer(loaded, teacher)
    data = open_split(corpus, loaded.tokenizer, split, seq_len=seq_len,
                      val_fraction=val_fraction)
    batches = eval_batches(data, num_sequences, micro_batch_size)
    metrics = evaluate(loaded.model, batches, teacher=teacher.model if teacher else None,
                       device=next(loaded.model.parameters()).device)
    return {"model": model_source, "teacher": teacher_source, "corpus": list(corpus),
            "split": split, "sequences": sum(b.shape[0] for b in batches), **metrics}


def _check_same_tokenizer(model: Any, teacher: Any) -> None:
    if model.config.vocab_size != teacher.config.vocab_size:
        raise ConfigError(f"the model's vocabulary ({model.config.vocab_size}) differs from "
                          f"the teacher's ({teacher.config.vocab_size}); agreement needs one "
                          "shared tokenizer")
    if teacher.tokenizer is not None and \
            teacher.tokenizer.fingerprint != model.tokenizer.fingerprint:
        raise ConfigError("the model's and the teacher's tokenizers map text to different ids; "
                          "agreement needs one shared tokenizer")
