"""The paged_attention op against plain attention on contiguous keys, and the model runner's
chunked, paged forward against the model's own full forward."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import registry
from tessera.model.attention import attention_reference
from tessera.serve.model_runner import ForwardItem, ModelRunner
from tessera.serve.paged_attention import paged_attention_reference, paged_attention_sdpa

BS = 4


def build_case(context_lens: list[int], query_lens: list[int], *, heads: int = 6,
               kv_heads: int = 2, dim: int = 12, num_blocks: int = 40):
    """Random pool with each sequence's keys in shuffled blocks; everything else poisoned."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.full((num_blocks, BS, kv_heads, dim), 1e4)  # poison: must never be seen
    v_cache = torch.full((num_blocks, BS, kv_heads, dim), 1e4)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, contiguous = [], []
    for ctx in context_lens:
        table = [free.pop() for _ in range(-(-ctx // BS))]
        k = torch.randn(ctx, kv_heads, dim, generator=gen)
        v = torch.randn(ctx, kv_heads, dim, generator=gen)
        for pos in range(ctx):
            k_cache[table[pos // BS], pos % BS] = k[pos]
            v_cache[table[pos // BS], pos % BS] = v[pos]
        tables.append(table)
        contiguous.append((k, v))
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(sum(query_lens), heads, dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = dict(block_tables=block_tables, context_lens=torch.tensor(context_lens,
                  dtype=torch.int32), cu_seqlens_q=cu, max_query_len=max(query_lens),
                  max_context_len=max(context_lens))
    return q, k_cache, v_cache, kwargs, contiguous


def expected(q, contiguous, context_lens, query_lens):
    outs, start = [], 0
    for (k, v), ctx, num_q in zip(contiguous, context_lens, query_lens, strict=True):
        q_s = q[start:start + num_q].double()[None]
        out = attention_reference(q_s, k.double()[None], v.double()[None], causal=True,
                                  q_offset=ctx - num_q)
        outs.append(out[0])
        start += num_q
    return torch.cat(outs)


@pytest.mark.parametrize("impl", [paged_attention_reference, paged_attention_sdpa])
@pytest.mark.parametrize("context_lens,query_lens", [
    ([5, 13, 1], [5, 3, 1]),  # a whole prompt, a chunk after cached tokens, a decode
    ([7, 30, 9, 17], [1, 1, 1, 1]),  # decodes only
    ([11, 6], [4, 6]),  # speculative verification of 3 drafts + a prompt
])
def test_matches_attention_over_contiguous_keys(impl, context_lens, query_lens):
    q, k_cache, v_cache, kwargs, contiguous = build_case(context_lens, query_lens)
    out = impl(q, k_cache, v_cache, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = expected(q, contiguous, context_lens, query_lens)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_registered_with_a_reference():
    assert registry.reference("paged_attention") is paged_attention_reference
    with registry.force_torch():
        assert registry.get("paged_attention", "cpu") is paged_attention_reference


def test_runner_chunked_prefill_and_decode_match_the_full_forward(model):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (23,), generator=gen).tolist()
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]  # [T, V]
    runner = ModelRunner(model, num_blocks=16, block_size=BS)
    table = [9, 2, 14, 5, 0, 11]  # scattered blocks
    chunks = [(0, 7), (7, 16), (16, 22)]  # chunked prefill of 22 tokens, then a decode
    for start, end in chunks:
        logits = runner.forward([ForwardItem(table, start, ids[start:end], end - start)])
        torch.testing.assert_close(logits, full[start:end], atol=1e-4, rtol=1e-4)
    # A batch: the decode of token 22 next to an unrelated one-block sequence.
    other = ForwardItem([3], 0, ids[:3], 1)
    logits = runner.forward([ForwardItem(table, 22, ids[22:], 1), other])
    torch.testing.assert_close(logits[0], full[22], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], full[2], atol=1e-4, rtol=1e-4)
