"""Weight-only int8 (and group-wise int4) matmul kernels against a bf16 matmul and a naive
dequantise-then-matmul, at decode-shaped M.

    python benchmarks/bench_int8_matmul.py --out int8_matmul.json
    python benchmarks/bench_int8_matmul.py --m 1,16,512 --shapes 4096x4096 --cuda-graphs

Defaults: M = 1, 4, 16 rows of bf16 activations times weights N x K = 4096 x 4096,
8192 x 8192, 14336 x 4096 and 4096 x 14336, on one CUDA device. Implementations:
`bf16` (`x @ W.T` on a bf16 W), `int8` (Tessera's Triton kernel), `int8-naive` (dequantise
W to bf16, then matmul: the torch reference), `int4` (Triton, groups of 128, zero points).
GB/s counts each implementation's own weight bytes (int8: N*K + 4N; int4: N*K/2 + 5N*K/128;
bf16 and naive: what they read, 2N*K and N*K) and ignores the small activations: decode is
bound by reading weights. `vs bf16` divides the bf16 time of the same run by the row's time.
Timing: `triton.testing.do_bench` (CUDA events, median, L2 flushed between runs), or with
`--cuda-graphs` replayed CUDA graphs, which leave out launch overhead. Each kernel is run
once first, so autotuning happens outside the timed region. Also reported: the largest
error of each quantized kernel against its torch reference, relative to the output's scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tessera
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from tessera.kernels.int4_matmul import int4_matmul, int4_matmul_reference  # noqa: E402
from tessera.kernels.int8_matmul import int8_matmul, int8_matmul_reference  # noqa: E402
from tessera.quant.int4 import pack_int4, quantize_groups  # noqa: E402
from tessera.quant.int8 import quantize_int8  # noqa: E402

DEFAULT_SHAPES = "4096x4096,8192x8192,14336x4096,4096x14336"
GROUP = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", default="1,4,16", help="comma-separated row counts")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxK")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args()


def make_weights(n: int, k: int) -> dict[str, torch.Tensor]:
    w = torch.randn(n, k, device="cuda") / k**0.5
    q8, s8 = quantize_int8(w)
    codes, scales, zeros = quantize_groups(w, GROUP)
    return {"bf16": w.to(torch.bfloat16), "q8": q8, "s8": s8, "q4": pack_int4(codes),
            "s4": scales, "z4": zeros}


def implementations(x: torch.Tensor, w: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """name -> (callable, weight bytes it reads, torch reference or None)."""
    n, k = w["bf16"].shape
    q4 = (w["q4"], w["s4"], w["z4"], GROUP)
    return {
        "bf16": (lambda: x @ w["bf16"].T, 2 * n * k, None),
        "int8": (lambda: int8_matmul(x, w["q8"], w["s8"]), n * k + 4 * n,
                 lambda: int8_matmul_reference(x, w["q8"], w["s8"])),
        "int8-naive": (lambda: int8_matmul_reference(x, w["q8"], w["s8"]), n * k, None),
        "int4": (lambda: int4_matmul(x, *q4), n * k // 2 + 5 * n * k // GROUP,
                 lambda: int4_matmul_reference(x, *q4)),
    }


def relative_error(fn, reference) -> float | None:
    if reference is None:
        return None
    expected = reference().float()
    return ((fn().float() - expected).abs().max() / expected.abs().max()).item()


def time_ms(fn, cuda_graphs: bool) -> float:
    fn()  # autotune and compile outside the timed region
    torch.cuda.synchronize()
    if cuda_graphs:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        weights = make_weights(n, k)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            group = []
            for name, (fn, num_bytes, reference) in implementations(x, weights).items():
                ms = time_ms(fn, args.cuda_graphs)
                group.append({"m": m, "n": n, "k": k, "impl": name, "ms": ms,
                              "weight_bytes": num_bytes, "gbps": num_bytes / ms / 1e6,
                              "max_rel_error": relative_error(fn, reference)})
            bf16_ms = group[0]["ms"]
            for row in group:
                row["speedup_vs_bf16"] = bf16_ms / row["ms"]
            rows += group
            print_rows(group)
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        error = "" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        print(f"{r['m']:>4} {r['n']:>6} {r['k']:>6} {r['impl']:<11} {1e3 * r['ms']:>9.1f} "
              f"{r['gbps']:>8.0f} {r['speedup_vs_bf16']:>8.2f}x {error:>9}", flush=True)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_int8_matmul needs a CUDA device")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{'CUDA graphs' if args.cuda_graphs else 'do_bench'}")
    print(f"{'M':>4} {'N':>6} {'K':>6} {'impl':<11} {'us':>9} {'GB/s':>8} {'vs bf16':>9} "
          f"{'max err':>9}")
    rows = run(args)
    if args.out:
        meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                "cuda_graphs": args.cuda_graphs}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
