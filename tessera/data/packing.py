"""Packing: the shard token stream cut into fixed-length training sequences, and `Batch`.

Sequence i is the `seq_len + 1` tokens starting at token `i * seq_len` of the stream
(consecutive sequences share one token), giving `seq_len` inputs and the `seq_len` targets
one place to the right; every token after the first is a target exactly once. The last
sequence may be short: it is padded (inputs with EOS, labels with -100) and `loss_mask` is
False on the padding.

Documents end in EOS (see `tessera.data.shards`), so a new document starts at the token
after each EOS. With `is_document_masked` (the default) positions restart at 0 there and
`cu_seqlens` marks the boundaries so attention can stay inside each document; the padding of
a short sequence is a segment of its own. A document cut by a sequence boundary continues
at position 0 in the next sequence. The target of an EOS input (the next document's first
token) is kept in the loss.

`Batch` is the one batch type of the pipeline, the same on one process or many. This module
knows nothing about shuffling or ranks (`tessera.data.sampler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tessera.data.shards import TokenShards
from tessera.errors import DataError

IGNORE_INDEX = -100  # the label of padding; the same value as cross-entropy's ignore_index


@dataclass
class Batch:
    """B packed sequences of T tokens."""

    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64; IGNORE_INDEX where loss_mask is False
    loss_mask: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [B, T] int64; restart at 0 at each document
    # int32 [S + 1]: document boundaries over the flattened B * T tokens (every row start is
    # one), for attention over `input_ids.view(1, -1)`; None without document masking.
    cu_seqlens: torch.Tensor | None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.input_ids), move(self.labels), move(self.loss_mask),
                     move(self.positions), move(self.cu_seqlens))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


@dataclass
class _Row:
    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    starts: np.ndarray  # offsets in the row where a segment starts (0 first)


def _pack_row(tokens: np.ndarray, seq_len: int, eos_token_id: int,
              is_document_masked: bool) -> _Row:
    num_targets = len(tokens) - 1
    if not 1 <= num_targets <= seq_len:
        raise DataError(f"a packed row needs 2..{seq_len + 1} tokens, got {len(tokens)}")
    index = np.arange(seq_len)
    input_ids = np.full(seq_len, eos_token_id, dtype=np.int64)
    input_ids[:num_targets] = tokens[:-1]
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    labels[:num_targets] = tokens[1:]
    is_start = np.zeros(seq_len, dtype=bool)
    is_start[0] = True
    if is_document_masked:
        is_start[1:num_targets] = input_ids[:num_targets - 1] == eos_token_id
        if num_targets < seq_len:
            is_start[num_targets] = True  # the padding is a segment of its own
    segment_start = np.maximum.accumulate(np.where(is_start, index, 0))
    return _Row(input_ids, labels, index < num_targets, index - segment_start,
                np.flatnonzero(is_start))


def pack_rows(rows: Sequence[np.ndarray], seq_len: int, eos_token_id: int, *,
              is_document_masked: bool = True) -> Batch:
    """A `Batch` from rows of 2..seq_len+1 tokens each (see the module doc)."""
    if not rows:
        raise DataError("cannot build a batch from zero sequences")
    packed = [_pack_row(np.asarray(r), seq_len, eos_token_id, is_document_masked)
              for r in rows]
    cu_seqlens = None
    if is_document_masked:
        starts = [row.starts + i * seq_len for i, row in enumerate(packed)]
        bounds = np.concatenate([*starts, [len(rows) * seq_len]])
        cu_seqlens = torch.from_numpy(bounds.astype(np.int32))

    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(row, name) for row in packed]))

    return Batch(stack("input_ids"), stack("labels"), stack("loss_mask"), stack("positions"),
                 cu_seqlens)


class PackedSequences:
    """The sequences of `shards` packed to `seq_len`; index them, batch them."""

    def __init__(self, shards: TokenShards, seq_len: int, *, is_document_masked: bool = True):
        if not isinstance(seq_len, int) or seq_len <= 0:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.shards = shards
        self.seq_len = seq_len
        self.is_document_masked = is_document_masked
        self.eos_token_id = shards.eos_token_id
        self.num_sequences = -(-(shards.num_tokens - 1) // seq_len)  # ceil
        if self.num_sequences <= 0:
            raise DataError(f"the shards hold {shards.num_tokens} tokens; packing needs at "
                            "least 2")

    def __len__(self) -> int:
        return self.num_sequences

    def tokens(self, index: int) -> np.ndarray:
        """The seq_len + 1 tokens of sequence `index` (fewer for the last one)."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} outside [0, {self.num_sequences})")
        start = index * self.seq_len
        return self.shards.read(start, min(start + self.seq_len + 1, self.shards.num_tokens))

    def batch(self, indices: Sequence[int]) -> Batch:
        return pack_rows([self.tokens(int(i)) for i in indices], self.seq_len,
                         self.eos_token_id, is_document_masked=self.is_document_masked)
