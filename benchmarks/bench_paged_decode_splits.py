"""Paged decode attention: the default split count against every forced one, at serving shapes.

    python benchmarks/bench_paged_decode_splits.py --out splits.json
    python benchmarks/bench_paged_decode_splits.py --heads 9 --kv-heads 3 --head-dim 64 \\
        --batches 1 4 16 --min-context 1000 --max-context 1000

Each batch of B sequences has contexts drawn uniformly from `--min-context ..
--max-context` (by default 100..2048, like the open-loop serving benchmark), its blocks
shuffled across a paged pool; `max_context_len` is `--max-model-len`, as in the engine's
CUDA graphs, so the default split count is the one a captured decode step uses. Each row
times `paged_decode_forward` with the split count `choose_num_splits` picks ("default")
and with each count of `--splits` forced (medians of `triton.testing.do_bench`), checks its
output against the single-split result, and reports the K/V bytes the contexts hold over
the time. The ratio column is the default's time over the row's (> 1: faster than the
default).

`--tiles 64x4x2 128x8x3 ...` adds rows with each `(BLOCK_N, num_warps, num_stages)` forced
instead of the autotuned one (for each split count). `--graph` times each variant the way
the engine runs it: a CUDA graph of back-to-back launches, each on its own copy of the pool
(as each layer has its own, so the keys are not in L2 from the previous launch, where
memory allows), device time per launch; `do_bench` times small grids mostly by their
launch overhead, which a graph does not pay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tessera
from _common import graph_ms, kernel_bench_main  # noqa: E402  (beside this script)
from triton.testing import do_bench  # noqa: E402

from tessera.kernels.paged_decode import choose_num_splits, paged_decode_forward  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 128, 64, 32, 16, 4, 1])
    parser.add_argument("--min-context", type=int, default=100)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tiles", nargs="*", default=[],
                        help="forced tiles BLOCK_NxWARPSxSTAGES, e.g. 64x4x2")
    parser.add_argument("--graph", action="store_true",
                        help="time launches inside a CUDA graph (see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if not 1 <= args.min_context <= args.max_context <= args.max_model_len:
        parser.error("need 1 <= --min-context <= --max-context <= --max-model-len")
    return args


def make_inputs(args: argparse.Namespace, batch: int, gen: torch.Generator) -> dict:
    """Queries, a bf16 pool holding every sequence's blocks (shuffled), the op's metadata."""
    bs = args.block_size
    lengths = torch.randint(args.min_context, args.max_context + 1, (batch,), generator=gen)
    blocks = [-(-int(n) // bs) for n in lengths]
    order = torch.randperm(sum(blocks), generator=gen)
    tables = torch.zeros(batch, -(-args.max_model_len // bs), dtype=torch.int32)
    start = 0
    for row, count in enumerate(blocks):
        tables[row, :count] = order[start:start + count]
        start += count
    shape = (sum(blocks), bs, args.kv_heads, args.head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
                        for _ in "kv")
    q = torch.randn(batch, args.heads, args.head_dim, generator=gen).to("cuda", torch.bfloat16)
    meta = dict(block_tables=tables.cuda(), context_lens=lengths.to("cuda", torch.int32),
                cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                max_query_len=1, max_context_len=args.max_model_len)
    kv_bytes = 2 * int(lengths.sum()) * args.kv_heads * args.head_dim * 2
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, meta=meta, kv_bytes=kv_bytes)


GRAPH_LAUNCHES, GRAPH_POOL_BYTES = 16, 8 << 30


def parse_tile(text: str) -> tuple[int, int, int]:
    block_n, warps, stages = (int(part) for part in text.split("x"))
    return block_n, warps, stages


def bench_batch(args: argparse.Namespace, batch: int, gen: torch.Generator) -> list[dict]:
    x = make_inputs(args, batch, gen)
    default = choose_num_splits(batch, args.kv_heads, args.max_model_len, x["q"].device)
    pool_bytes = 2 * x["k_cache"].numel() * x["k_cache"].element_size()
    copies = [(x["k_cache"], x["v_cache"])]
    if args.graph:
        count = max(1, min(GRAPH_LAUNCHES, GRAPH_POOL_BYTES // max(pool_bytes, 1)))
        copies += [(x["k_cache"].clone(), x["v_cache"].clone()) for _ in range(count - 1)]

    def launch(splits: int | None, tile, k_cache, v_cache):
        out = torch.empty_like(x["q"])
        return lambda: paged_decode_forward(x["q"], k_cache, v_cache, num_splits=splits,
                                            tile=tile, out=out, **x["meta"])
    expected = launch(1, None, *copies[0])().float()
    rows = []
    for tile in (None, *map(parse_tile, args.tiles)):
        for splits in (None, *args.splits):
            launches = [launch(splits, tile, k, v) for k, v in copies]
            error = ((launches[0]().float() - expected).norm() / expected.norm()).item()
            ms = (graph_ms(launches) if args.graph
                  else do_bench(launches[0], warmup=50, rep=300, return_mode="median"))
            rows.append({"batch": batch, "splits": f"default ({default})" if splits is None
                         else str(splits), "tile": "tuned" if tile is None
                         else "x".join(map(str, tile)), "ms": ms,
                         "tb_per_s": x["kv_bytes"] / ms / 1e9, "rel_err_vs_one_split": error})
    for row in rows:
        row["default_time_ratio"] = rows[0]["ms"] / row["ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'B':>4} {'splits':>12} {'tile':>9} {'us':>9} {'TB/s':>6} {'rel err':>8} "
          f"{'vs default':>10}")
    for r in rows:
        print(f"{r['batch']:4d} {r['splits']:>12} {r['tile']:>9} {r['ms'] * 1e3:9.1f} "
              f"{r['tb_per_s']:6.2f} {r['rel_err_vs_one_split']:8.1e} "
              f"{r['default_time_ratio']:9.2f}x")


def run(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        return [row for batch in args.batches for row in bench_batch(args, batch, gen)]


def main() -> None:
    kernel_bench_main("bench_paged_decode_splits.py", parse_args(), run, print_table)


if __name__ == "__main__":
    main()
