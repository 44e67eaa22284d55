"""The two-stage greedy argmax against `torch.argmax`: random rows of odd vocabulary
sizes, ties inside a chunk and across chunks (the first index wins), -inf entries."""

from __future__ import annotations

import pytest
import torch

from tessera.serve.argmax import chunked_argmax, first_argmax


@pytest.mark.parametrize("rows,vocab,chunk", [(1, 49152, 512), (3, 1000, 64), (2, 7, 4),
                                              (5, 513, 512), (1, 128256, 512)])
def test_chunked_argmax_equals_argmax(rows, vocab, chunk):
    generator = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=generator)
    assert torch.equal(chunked_argmax(logits, chunk), logits.argmax(-1))
    # The maximum twice in one chunk, and again in a later chunk: the first index wins.
    top = logits.max() + 1
    logits[:, [vocab - 1, vocab // 2, 1, 0][:min(vocab, 4)]] = top
    assert torch.equal(chunked_argmax(logits, chunk), logits.argmax(-1))
    assert (chunked_argmax(logits, chunk) == 0).all()
    # Masked rows: -inf everywhere but one place in the padded last chunk.
    logits = torch.full((rows, vocab), float("-inf"))
    logits[:, vocab - 1] = 0.0
    assert torch.equal(chunked_argmax(logits, chunk), logits.argmax(-1))


def test_first_argmax_equals_argmax_for_any_batch():
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 4, 5, 64):
        logits = torch.randn(rows, 20000, generator=generator)
        assert torch.equal(first_argmax(logits), logits.argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (4, 49152), (3, 151937)])
def test_first_argmax_on_cuda(rows, vocab):
    logits = torch.randn(rows, vocab, device="cuda")
    logits[:, [vocab - 3, 17]] = logits.max() + 1
    assert torch.equal(first_argmax(logits), logits.argmax(-1))
    assert (first_argmax(logits) == 17).all()
