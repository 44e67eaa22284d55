"""Decode-sized products (a few rows) inside CUDA graphs: Tessera's GEMV kernel against
cuBLAS (`F.linear`), and the SwiGLU-input GEMV against the `swiglu` kernel then `F.linear`.

    python benchmarks/bench_gemv.py                        # SmolLM2 and Llama-3.2-1B layers
    python benchmarks/bench_gemv.py --rows 1 --tiles 8x128x4 16x64x4 --out gemv.json
    python benchmarks/bench_gemv.py --weights int8 fp8 fp8-w8a8 --tiles 4x2048x4

Each shape is one decoder layer's product (N x K of the weight; `down` takes the gate/up
output and, for the fused op, applies SwiGLU itself). Timing: a CUDA graph of back-to-back
launches, each over its own copy of the weight, with at least 256 MiB of weights in the
graph so that none is read from L2 (a decode step streams every layer's weights once); us
a launch. The GEMV runs with the default tile and each `--tiles` entry (BLOCK_N x BLOCK_K x
num_warps), as an ordinary launch and, on Hopper, as a programmatic dependent launch
(`pdl`: each launch loads its first weight tile while the one before it finishes). GB/s
counts the weight bytes. `vs cuBLAS` divides the cuBLAS time of the same shape and rows by
the row's time.

`--weights` picks the GEMV's weights: bf16, int8 or float8_e4m3fn codes with a scale per
output channel (`fp8-w8a8` also rounds each input row to e4m3, as FP8 layers with dynamic
activations do). cuBLAS multiplies the bf16 weight of the same shape in every case, so
`vs cuBLAS` for codes is the gain over serving that layer in bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tessera
from _common import add_speedups, graph_ms, kernel_bench_main  # noqa: E402  (beside this script)

from tessera.kernels._triton import use_pdl  # noqa: E402
from tessera.kernels.gemv import dequantized, gemv_forward, gemv_tile  # noqa: E402
from tessera.kernels.swiglu import swiglu  # noqa: E402
from tessera.quant.fp8 import quantize_fp8  # noqa: E402
from tessera.quant.int8 import quantize_int8  # noqa: E402

# name -> (N, K) per preset: one layer's fused qkv, o, fused gate/up and down products
LAYERS = {
    "smollm2": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576),
                "down": (576, 1536)},
    "llama-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
                 "down": (2048, 8192)},
}
WEIGHT_BYTES_IN_GRAPH = 256 << 20
# --weights name -> (code dtype or None for bf16, whether the input rows are rounded to e4m3)
WEIGHTS = {"bf16": (None, False), "int8": (torch.int8, False),
           "fp8": (torch.float8_e4m3fn, False), "fp8-w8a8": (torch.float8_e4m3fn, True)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tiles", nargs="*", default=[],
                        help="extra GEMV tiles BLOCK_NxBLOCK_KxWARPS")
    parser.add_argument("--weights", nargs="+", default=["bf16"], choices=list(WEIGHTS))
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def parse_tile(text: str) -> tuple[int, int, int]:
    block_n, block_k, warps = (int(part) for part in text.split("x"))
    return block_n, block_k, warps


def variants(name: str, weights: str, tiles: list, pdl_modes: list[bool]) -> dict:
    """impl name -> fn(x, w, w_bf16, scale) for one shape; `down` gets the [M, 2K] gate/up
    input. cuBLAS multiplies the bf16 weight, the GEMV the `weights` kind."""
    swiglu_input = name == "down"
    quantize_input = WEIGHTS[weights][1]
    if swiglu_input:
        found = {"cuBLAS": lambda x, w, w16, s: F.linear(swiglu(*x.chunk(2, dim=-1)), w16)}
    else:
        found = {"cuBLAS": lambda x, w, w16, s: F.linear(x, w16)}
    for tile in tiles:
        for pdl in pdl_modes:
            label = f"gemv {'x'.join(map(str, tile))}{' pdl' if pdl else ''}"
            found[label] = lambda x, w, w16, s, t=tile, p=pdl: gemv_forward(
                x, w, weight_scale=s, quantize_input=quantize_input,
                swiglu_input=swiglu_input, tile=t, pdl=p)
    return found


def weight_copies(n: int, k: int, weights: str) -> list[tuple]:
    """(GEMV weight, bf16 weight, scale or None) copies, at least 256 MiB of GEMV weights."""
    code_dtype = WEIGHTS[weights][0]
    weight_bytes = n * k * (2 if code_dtype is None else 1)
    copies = max(16, -(-WEIGHT_BYTES_IN_GRAPH // weight_bytes))
    found = []
    for _ in range(copies):
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        if code_dtype is None:
            found.append((w16, w16, None))
            continue
        codes, scale = (quantize_int8(w16) if code_dtype == torch.int8
                        else quantize_fp8(w16, per_channel=True))
        found.append((codes, dequantized(codes, scale, torch.bfloat16), scale))
    return found


def shape_rows(preset: str, name: str, n: int, k: int, rows: int, weights: str,
               tiles: list) -> list[dict]:
    copies = weight_copies(n, k, weights)
    weight_bytes = copies[0][0].numel() * copies[0][0].element_size()
    x = torch.randn(rows, 2 * k if name == "down" else k, device="cuda",
                    dtype=torch.bfloat16)
    found = []
    reference = None
    pdl_modes = [False, True] if use_pdl(x.device) else [False]
    for impl, fn in variants(name, weights, [gemv_tile(n, k, rows), *tiles],
                             pdl_modes).items():
        out = fn(x, *copies[0]).float()
        reference = out if reference is None else reference
        error = ((out - reference).abs().max() / reference.abs().max()).item()
        ms = graph_ms([lambda c=c, fn=fn: fn(x, *c) for c in copies])
        found.append({"preset": preset, "product": name, "N": n, "K": k, "rows": rows,
                      "weights": weights, "impl": impl, "ms": ms,
                      "gb_per_s": weight_bytes / ms / 1e6, "max_rel_error": error})
    return found


def collect(args: argparse.Namespace) -> list[dict]:
    tiles = [parse_tile(t) for t in args.tiles]
    rows = [r for weights in args.weights for preset in args.presets
            for name, (n, k) in LAYERS[preset].items() for m in args.rows
            for r in shape_rows(preset, name, n, k, m, weights, tiles)]
    return add_speedups(rows, ("cuBLAS",), group=lambda r: (
        r["weights"], r["preset"], r["product"], r["rows"]))


def print_table(rows: list[dict]) -> None:
    print(f"{'weights':8} {'preset':9} {'product':8} {'N x K':12} {'rows':>4} {'impl':20} "
          f"{'us':>7} {'GB/s':>7} {'vs cuBLAS':>9} {'rel err':>8}")
    for r in rows:
        print(f"{r['weights']:8} {r['preset']:9} {r['product']:8} {r['N']}x{r['K']:<7} "
              f"{r['rows']:>4} {r['impl']:20} {r['ms'] * 1e3:7.2f} {r['gb_per_s']:7.0f} "
              f"{r['speedup_vs']['cuBLAS']:8.2f}x {r['max_rel_error']:8.1e}")


def main() -> None:
    kernel_bench_main("bench_gemv.py", parse_args(), collect, print_table)


if __name__ == "__main__":
    main()
