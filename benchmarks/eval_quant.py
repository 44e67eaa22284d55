"""Held-out perplexity of a model and of its quantized variants (the table in
docs/quantization.md).

    python benchmarks/eval_quant.py --out eval_quant.json
    python benchmarks/eval_quant.py --model DIR --tokens 2048 --variants fp32,int8,awq-int4

Protocol: the first `--tokens` tokens of the `python-stdlib` validation split
(val_fraction 0.02, documents in path order, EOS after each), cut into windows of
`--seq-len` tokens, each scored on its own; perplexity = exp(mean next-token cross-entropy)
(see `tessera.quant.calibration`). The model is loaded once in fp32; every variant
quantizes a fresh copy. AWQ calibrates on the train split (4096 tokens, default options), so
it never sees an evaluated document. Runs on whatever device `--device` names (CPU by
default, where every quantized op runs its torch reference).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import tessera
from tessera.quant import QuantizedLinear, quantize_model
from tessera.quant.calibration import perplexity, token_windows

VARIANTS: dict[str, tuple[str, dict] | None] = {
    "fp32": None,
    "int8": ("int8", {}),
    "int4-g128": ("int4", {"group_size": 128}),
    "awq-int4-g128": ("awq", {"bits": 4, "group_size": 128}),
    "awq-int8": ("awq", {"bits": 8}),
    "fp8-tensor": ("fp8", {"per_channel": False}),
    "fp8-channel": ("fp8", {"per_channel": True}),
    "fp8-channel-weight-only": ("fp8", {"per_channel": True, "activations": "none"}),
}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the Linear weights as stored (codes and scales for quantized Linears), the
    tied LM head counted once with the embedding it shares; norms are left out."""
    sizes = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            names = ("weight",)
        elif isinstance(module, QuantizedLinear):
            names = module.STORAGE
        else:
            continue
        for name in names:
            tensor = getattr(module, name)
            sizes[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(sizes.values())


def evaluate_variant(name: str, base: torch.nn.Module, tokenizer, windows: torch.Tensor,
                     batch_size: int) -> dict:
    model = copy.deepcopy(base)
    spec = VARIANTS[name]
    start = time.perf_counter()
    if spec is not None:
        method, options = spec
        quantize_model(model, method, tokenizer=tokenizer, **options)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=batch_size)
    return {"variant": name, "ppl": ppl, "weight_bytes": weight_bytes(model),
            "quantize_s": quantize_s, "eval_s": time.perf_counter() - start}


def machine() -> str:
    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {threads} torch threads, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_row(row: dict, baseline: float | None) -> None:
    change = "" if baseline is None else f"{100 * (row['ppl'] / baseline - 1):+.2f}%"
    print(f"{row['variant']:<26} {row['ppl']:>9.4f} {change:>9} "
          f"{row['weight_bytes'] / 2**20:>11.1f} {row['quantize_s']:>9.1f} "
          f"{row['eval_s']:>8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    loaded = tessera.load(args.model, dtype=torch.float32, device=args.device)
    windows = token_windows(loaded.tokenizer, split="val", num_tokens=args.tokens,
                            seq_len=args.seq_len)
    print(f"{args.model}: {windows.numel()} tokens of python-stdlib val, seq_len "
          f"{args.seq_len}, on {args.device}")
    print(f"{'variant':<26} {'ppl':>9} {'vs fp32':>9} {'weights MiB':>11} {'quant s':>9} "
          f"{'eval s':>8}")
    rows, baseline = [], None
    for name in names:
        row = evaluate_variant(name, loaded.model, loaded.tokenizer, windows, args.batch_size)
        baseline = row["ppl"] if name == "fp32" else baseline
        if baseline is not None:
            row["change_vs_fp32"] = row["ppl"] / baseline - 1
        print_row(row, baseline if name != "fp32" else None)
        rows.append(row)
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "machine": machine(),
                "commit": commit(), "model": args.model, "tokens": windows.numel(),
                "seq_len": args.seq_len, "device": args.device}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
