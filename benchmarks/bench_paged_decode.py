"""Paged decode attention (Tessera's Triton kernel) against SDPA on a contiguous KV cache.

    python benchmarks/bench_paged_decode.py --out paged_decode.json
    python benchmarks/bench_paged_decode.py --query-len 4 --block-size 32

Shapes (B sequences x L cached positions): B=32 L=4096, B=8 L=16384, B=1 L=32768, each
with H=32 query heads, KVH=8 kv heads, D=128, bf16, one query per sequence (`--query-len`
for speculative verification). The Triton kernel reads K/V from a paged pool of
`--block-size` positions per block, each sequence's blocks shuffled across the pool; the
baseline `F.scaled_dot_product_attention(..., enable_gqa=True)` reads the same K/V laid out
contiguously as `[B, KVH, L, D]` (with a causal mask for more than one query).

Times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed between calls).
TB/s counts the K and V bytes each implementation must read, `2 * B * L * KVH * D * 2`,
divided by its time. The ratio column is SDPA's time over a row's time (> 1: faster than
SDPA). Outputs are compared with SDPA's before timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tessera
from _common import kernel_bench_main  # noqa: E402  (beside this script)
from triton.testing import do_bench  # noqa: E402

from tessera.kernels.paged_decode import paged_attention_triton  # noqa: E402

SHAPES = ((32, 4096), (8, 16384), (1, 32768))  # (batch, context length)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--query-len", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args()


def make_inputs(args: argparse.Namespace, batch: int, length: int) -> dict:
    """Contiguous K/V, the same K/V in a shuffled paged pool, queries and the op's metadata."""
    dtype, bs = DTYPES[args.dtype], args.block_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv_shape = (batch, length, args.kv_heads, args.head_dim)
    k, v = (torch.randn(kv_shape, device="cuda", dtype=dtype, generator=gen) for _ in "kv")
    blocks_per_seq = -(-length // bs)
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(batch, -1)
    pool_shape = (num_blocks, bs, args.kv_heads, args.head_dim)
    padded = blocks_per_seq * bs
    k_cache, v_cache = (torch.zeros(pool_shape, device="cuda", dtype=dtype) for _ in "kv")
    for cache, src in ((k_cache, k), (v_cache, v)):
        src = F.pad(src, (0, 0, 0, 0, 0, padded - length))  # [B, whole blocks, KVH, D]
        cache[tables] = src.view(batch, blocks_per_seq, *pool_shape[1:])
    num_q = args.query_len
    q = torch.randn(batch * num_q, args.heads, args.head_dim, device="cuda", dtype=dtype,
                    generator=gen)
    as_int = lambda x: x.to(device="cuda", dtype=torch.int32)
    meta = dict(block_tables=as_int(tables), context_lens=as_int(torch.full((batch,), length)),
                cu_seqlens_q=as_int(torch.arange(batch + 1) * num_q), max_query_len=num_q,
                max_context_len=length)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, meta=meta)


def sdpa_fn(args: argparse.Namespace, inputs: dict, batch: int, length: int):
    """SDPA on `[B, heads, T, D]` tensors contiguous in that layout; returns `[N, H, D]`."""
    num_q = args.query_len
    q = inputs["q"].view(batch, num_q, args.heads, -1).transpose(1, 2).contiguous()
    k, v = (inputs[n].transpose(1, 2).contiguous() for n in "kv")
    mask = None
    if num_q > 1:  # query i sits at position length - num_q + i
        rows = torch.arange(num_q, device="cuda")[:, None] + length - num_q
        mask = torch.arange(length, device="cuda")[None, :] <= rows
    gqa = args.heads != args.kv_heads

    def run():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(batch * num_q, args.heads, -1)
    return run


def bench_shape(args: argparse.Namespace, batch: int, length: int) -> list[dict]:
    inputs = make_inputs(args, batch, length)
    impls = {
        "sdpa-contiguous": sdpa_fn(args, inputs, batch, length),
        "tessera-paged": lambda: paged_attention_triton(
            inputs["q"], inputs["k_cache"], inputs["v_cache"], **inputs["meta"]),
    }
    kv_bytes = 2 * batch * length * args.kv_heads * args.head_dim * inputs["k"].element_size()
    with torch.no_grad():
        expected = impls["sdpa-contiguous"]().float()
        rows = []
        for name, fn in impls.items():
            error = (fn().float() - expected).abs().max().item()
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            rows.append({"batch": batch, "context": length, "impl": name, "ms": ms,
                         "tb_per_s": kv_bytes / ms / 1e9, "max_abs_err_vs_sdpa": error})
    base = rows[0]["ms"]
    for row in rows:
        row["speedup_vs_sdpa"] = base / row["ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'B':>3} {'L':>6} {'impl':16} {'ms':>8} {'TB/s':>6} {'max err':>8} {'vs sdpa':>8}")
    for r in rows:
        print(f"{r['batch']:3d} {r['context']:6d} {r['impl']:16} {r['ms']:8.4f} "
              f"{r['tb_per_s']:6.2f} {r['max_abs_err_vs_sdpa']:8.1e} "
              f"{r['speedup_vs_sdpa']:7.2f}x")


def run(args: argparse.Namespace) -> list[dict]:
    return [row for batch, length in SHAPES for row in bench_shape(args, batch, length)]


def main() -> None:
    kernel_bench_main("bench_paged_decode.py", parse_args(), run, print_table)


if __name__ == "__main__":
    main()
