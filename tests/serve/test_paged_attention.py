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
    ([21], [1]),  # one decode
    ([1], [1]), ([16], [1]),  # one decode over one position, over whole blocks
    ([11, 6], [4, 6]),  # speculative verification of 3 drafts + a prompt
])
def test_matches_attention_over_contiguous_keys(impl, context_lens, query_lens):
    q, k_cache, v_cache, kwargs, contiguous = build_case(context_lens, query_lens)
    out = impl(q, k_cache, v_cache, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = expected(q, contiguous, context_lens, query_lens)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_decode_reads_only_its_context_whatever_the_bounds(dtype):
    """One decode on the CPU: a block table padded past the context and `max_context_len`
    a loose bound (as the static path passes) change nothing; the pool's other slots are
    poisoned."""
    q, k_cache, v_cache, kwargs, contiguous = build_case([19], [1])
    owned = kwargs["block_tables"][0].tolist()
    poison = next(b for b in range(k_cache.shape[0]) if b not in owned)  # holds 1e4
    kwargs["block_tables"] = torch.cat(
        [kwargs["block_tables"], torch.full((1, 11), poison, dtype=torch.int32)], dim=1)
    kwargs["max_context_len"] = 64  # the table covers it: 16 blocks of 4
    out = paged_attention_sdpa(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), **kwargs)
    assert out.shape == q.shape and out.dtype == dtype
    want = expected(q.to(dtype).float(), [(k.to(dtype).float(), v.to(dtype).float())
                                          for k, v in contiguous], [19], [1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_a_lone_decode_over_its_exact_context_takes_the_unmasked_path():
    """The cases above run both CPU branches; this pins which one each takes."""
    from tessera.serve.paged_attention import _lone_cpu_decode

    q, _, _, kwargs, _ = build_case([19], [1])
    tables, lens = kwargs["block_tables"], kwargs["context_lens"]
    assert _lone_cpu_decode(q, tables, lens, 1, 19)
    assert not _lone_cpu_decode(q, tables, lens, 1, 64)  # a loose bound: masked path
    q2, _, _, kwargs2, _ = build_case([7, 30], [1, 1])
    assert not _lone_cpu_decode(q2, kwargs2["block_tables"], kwargs2["context_lens"], 1, 30)


def check_sdpa_in_dtype(device: str, dtype: torch.dtype) -> None:
    """Chunks and decodes in `dtype` against fp32 attention over the rounded inputs."""
    context_lens, query_lens = [37, 130, 9], [37, 61, 1]
    q, k_cache, v_cache, kwargs, contiguous = build_case(context_lens, query_lens,
                                                         num_blocks=64)
    moved = {name: t.to(device) if isinstance(t, torch.Tensor) else t
             for name, t in kwargs.items()}
    out = paged_attention_sdpa(q.to(device, dtype), k_cache.to(device, dtype),
                               v_cache.to(device, dtype), **moved)
    assert out.dtype == dtype
    want = expected(q.to(dtype).float(), [(k.to(dtype).float(), v.to(dtype).float())
                                          for k, v in contiguous], context_lens, query_lens)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_on_cpu_in_low_precision(dtype):
    """The CPU branch attends in fp32 whatever the pool's dtype."""
    check_sdpa_in_dtype("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_on_cuda_matches_attention_over_contiguous_keys(dtype):
    """The CUDA branch (kv heads repeated, memory-efficient kernel) on chunks and decodes."""
    check_sdpa_in_dtype("cuda", dtype)


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


def test_fresh_prefill_of_packed_sequences_matches_each_full_forward(model):
    """Sequences starting at 0 attend over the call's own keys (varlen), never each other's;
    their keys land in the pool for the decodes that follow."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
               for n in (9, 1, 14)]
    runner = ModelRunner(model, num_blocks=16, block_size=BS)
    tables = [[7, 1, 12], [4], [0, 15, 3, 8]]
    items = [ForwardItem(t, 0, p, len(p)) for t, p in zip(tables, prompts, strict=True)]
    groups = runner.prepare(items).metadata.groups
    assert len(groups) == 1 and groups[0].fresh_prefill
    logits = runner.forward(items)
    decode = runner.forward([ForwardItem(t, len(p), [5], 1)
                             for t, p in zip(tables, prompts, strict=True)])
    start = 0
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            full = model(torch.tensor([p + [5]]))[0]
        torch.testing.assert_close(logits[start:start + len(p)], full[:-1], atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(decode[i], full[-1], atol=1e-4, rtol=1e-4)
        start += len(p)
    chunk = runner.prepare([ForwardItem(tables[0], 3, prompts[0][3:], 1)]).metadata
    assert not chunk.groups[0].fresh_prefill


def test_fallback_ranks_below_the_given_backend():
    assert registry.fallback("paged_attention", "sdpa", "cpu") is paged_attention_reference
    if "triton" in registry.available()["paged_attention"]:
        assert registry.fallback("paged_attention", "triton", "cuda") is paged_attention_sdpa


def test_mixed_step_groups_rows_and_returns_logits_in_item_order(model):
    """Decodes, fresh prefills and continued chunks in one call, interleaved: each item's
    logits equal its own full forward's, and each kind forms one attention group."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
               for n in (20, 6, 17, 11, 26)]
    tables = [[0, 1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13], [14, 15, 16], [17, 18, 19,
                                                                                 20, 21, 22, 23]]
    runner = ModelRunner(model, num_blocks=24, block_size=BS)
    cached = {0: 19, 2: 5, 4: 12}  # tokens already in the cache (written by a first call)
    runner.forward([ForwardItem(tables[i], 0, prompts[i][:n], 1) for i, n in cached.items()])
    items = [ForwardItem(tables[0], 19, prompts[0][19:], 1),  # decode
             ForwardItem(tables[1], 0, prompts[1], 2),  # fresh prefill
             ForwardItem(tables[2], 5, prompts[2][5:], 3),  # continued chunk of 12
             ForwardItem(tables[3], 0, prompts[3], 1),  # fresh prefill
             ForwardItem(tables[4], 12, prompts[4][12:], 0)]  # continued chunk, no logits
    groups = runner.prepare(items).metadata.groups
    assert [(g.fresh_prefill, g.end - g.start) for g in groups] == [(False, 1), (True, 17),
                                                                    (False, 26)]
    logits = runner.forward(items)
    assert logits.shape[0] == 1 + 2 + 3 + 1
    rows = iter(logits)
    for item, prompt in zip(items, prompts, strict=True):
        with torch.inference_mode():
            full = model(torch.tensor([prompt]))[0]
        for position in range(len(prompt) - item.num_logits, len(prompt)):
            torch.testing.assert_close(next(rows), full[position], atol=1e-4, rtol=1e-4)
