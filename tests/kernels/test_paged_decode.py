"""Paged decode attention against a float64 reference over the gathered blocks.

Interpreter tests run the checks below in the Triton-interpreter child process (see
conftest.py) at small fp32 shapes on CPU; `gpu` tests run them here, compiled, in bf16 and
fp16 at larger shapes. Every pool slot that no sequence owns (the rest of each sequence's
last block, unowned blocks, the block the table's padding points to) holds NaN, so a kernel
that reads one, or lets a masked value into its arithmetic, fails; the output is NaN before
the call, so a row it never writes fails too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tessera.kernels import paged_decode as kernels
from tessera.kernels import registry
from tessera.model.attention import attention_reference
from tessera.serve.paged_attention import paged_attention_reference

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    block_size: int
    heads: int
    kv_heads: int
    head_dim: int
    num_splits: int | None  # None: the launcher's own choice
    tile: tuple[int, int, int] | None = None  # forced (BLOCK_N, warps, stages); None: tuned


# The interpreter's tile is 16 positions; splits of ceil(50 / 3) = 17 positions start
# mid-tile and mid-block.
SMALL = {
    "decode-gqa-3splits": Case((1, 17, 50), (1, 1, 1), 16, 4, 2, 32, 3),
    "decode-gqa-1split": Case((1, 17, 50), (1, 1, 1), 16, 4, 2, 32, 1),
    "verify-bs8-d64": Case((5, 23, 41), (1, 3, 3), 8, 4, 2, 64, 4),
    "verify-mqa-odd-d": Case((9, 30, 3), (2, 8, 3), 8, 6, 1, 24, 5),
    "decode-mha-bs5": Case((7, 12, 33, 2), (1, 1, 1, 1), 5, 2, 2, 16, None),
    "decode-forced-tile": Case((1, 17, 50), (1, 2, 1), 16, 4, 2, 32, 3, tile=(32, 4, 1)),
}
LARGE = {
    "decode-gqa": Case((1, 700, 2049, 4096, 33, 1500, 16, 3000), (1,) * 8, 16, 32, 8, 128,
                       None),
    "verify-gqa": Case((5, 777, 2050, 4000), (4, 8, 1, 3), 16, 32, 8, 128, None),
    "decode-odd": Case((3, 999, 1234), (1, 1, 1), 24, 12, 4, 80, 7),
    "decode-forced-tile": Case((3, 999, 1234, 77), (1, 1, 1, 1), 16, 32, 8, 64, 11,
                               tile=(128, 8, 3)),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within `TOL[dtype]` of the float64 `expected`, relative to its largest magnitude."""
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=TOL[dtype])


def make_inputs(case: Case, dtype: torch.dtype, device: str):
    """(q, k_cache, v_cache, op kwargs, per-sequence contiguous (k, v)) with each
    sequence's positions in shuffled blocks and NaN everywhere else in the pool."""
    blocks_needed = [-(-c // case.block_size) for c in case.context_lens]
    num_blocks = sum(blocks_needed) + 3  # spare blocks stay NaN
    shape = (num_blocks, case.block_size, case.kv_heads, case.head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    free = torch.randperm(num_blocks).tolist()
    nan_block = free.pop()  # the table's padding points at a block of NaN
    tables, contiguous = [], []
    for ctx, count in zip(case.context_lens, blocks_needed, strict=True):
        table = torch.tensor([free.pop() for _ in range(count)])
        k, v = (torch.randn(ctx, case.kv_heads, case.head_dim, device=device).to(dtype)
                for _ in range(2))
        pos = torch.arange(ctx)
        k_cache[table[pos // case.block_size], pos % case.block_size] = k
        v_cache[table[pos // case.block_size], pos % case.block_size] = v
        tables.append(table.tolist())
        contiguous.append((k, v))
    width = max(map(len, tables)) + 1
    block_tables = [t + [nan_block] * (width - len(t)) for t in tables]
    cu = [0, *torch.tensor(case.query_lens).cumsum(0).tolist()]
    as_int = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    kwargs = dict(block_tables=as_int(block_tables), context_lens=as_int(case.context_lens),
                  cu_seqlens_q=as_int(cu), max_query_len=max(case.query_lens),
                  max_context_len=max(case.context_lens))
    q = torch.randn(cu[-1], case.heads, case.head_dim, device=device).to(dtype)
    return q, k_cache, v_cache, kwargs, contiguous


def float64_reference(q: torch.Tensor, contiguous, case: Case) -> torch.Tensor:
    """Causal attention of each sequence's queries over its contiguous keys, in float64."""
    outs, start = [], 0
    for (k, v), ctx, num_q in zip(contiguous, case.context_lens, case.query_lens, strict=True):
        q_s = q[start:start + num_q].double()[None]
        out = attention_reference(q_s, k.double()[None], v.double()[None], causal=True,
                                  q_offset=ctx - num_q)
        outs.append(out[0])
        start += num_q
    return torch.cat(outs)


def check_paged_decode(case: Case, dtype: torch.dtype, device: str):
    q, k_cache, v_cache, kwargs, contiguous = make_inputs(case, dtype, device)
    expected = float64_reference(q, contiguous, case)
    out = torch.full_like(q, float("nan"))
    for _ in range(2):  # the second launch relies on the first having reset the counters
        out.fill_(float("nan"))
        returned = kernels.paged_decode_forward(q, k_cache, v_cache, **kwargs,
                                                num_splits=case.num_splits, out=out,
                                                tile=case.tile)
        assert returned is out
        assert_close(out, expected, dtype)
        assert not kernels.split_counters(q.device, 1).any(), "split counters left non-zero"


def check_strided_query_view(case: Case, dtype: torch.dtype, device: str):
    """q as a view with padded rows and heads (as the model's projections may give)."""
    q, k_cache, v_cache, kwargs, contiguous = make_inputs(case, dtype, device)
    wide = torch.full((q.shape[0], q.shape[1] + 1, q.shape[2] + 8), float("nan"),
                      dtype=dtype, device=device)
    wide[:, 1:, 8:] = q
    expected = float64_reference(q, contiguous, case)
    out = kernels.paged_attention_triton(wide[:, 1:, 8:], k_cache, v_cache, **kwargs)
    assert_close(out, expected, dtype)


# ---------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("name", SMALL)
def test_paged_decode_interpreted(interpreter, name):
    interpreter.run(check_paged_decode, SMALL[name], torch.float32, "cpu")


def test_strided_query_interpreted(interpreter):
    interpreter.run(check_strided_query_view, SMALL["verify-bs8-d64"], torch.float32, "cpu")


def test_long_queries_fall_back_to_the_reference():
    """A prefill chunk (more than MAX_QUERY_LEN queries) never reaches the kernel."""
    case = Case((20, 9), (kernels.MAX_QUERY_LEN + 1, 2), 4, 4, 2, 16, None)
    q, k_cache, v_cache, kwargs, contiguous = make_inputs(case, torch.float32, "cpu")
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()  # the reference gathers
    out = kernels.paged_attention_triton(q, k_cache, v_cache, **kwargs)
    torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, **kwargs))
    assert_close(out, float64_reference(q, contiguous, case), torch.float32)


def test_launcher_refuses_long_queries():
    case = Case((20,), (kernels.MAX_QUERY_LEN + 1,), 4, 4, 2, 16, None)
    q, k_cache, v_cache, kwargs, _ = make_inputs(case, torch.float32, "cpu")
    with pytest.raises(AssertionError, match="max_query_len"):
        kernels.paged_decode_forward(q, k_cache, v_cache, **kwargs)


def test_registry_prefers_triton_on_cuda_only():
    pytest.importorskip("triton")
    assert registry.select("paged_attention", "cuda").backend == "triton"
    assert registry.select("paged_attention", "cpu").backend != "triton"
    with registry.force_torch():
        assert registry.select("paged_attention", "cuda").backend == "torch"


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LARGE)
def test_paged_decode_gpu(name, dtype):
    check_paged_decode(LARGE[name], dtype, "cuda")


@pytest.mark.gpu
def test_op_gpu():
    check_strided_query_view(LARGE["verify-gqa"], torch.bfloat16, "cuda")
    assert registry.get("paged_attention", "cuda") is kernels.paged_attention_triton
