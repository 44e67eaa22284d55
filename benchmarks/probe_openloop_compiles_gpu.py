"""Which Triton kernels compile new variants while the open-loop benchmark runs.

    python benchmarks/probe_openloop_compiles_gpu.py            # 256 requests, twice
    python benchmarks/probe_openloop_compiles_gpu.py --requests 64 --runs 3

Builds the engine of `bench_gpu_serving.py`'s open-loop suite (Qwen3-0.6B shape, random
weights; the engine's warm-up and graph capture included), then runs the open-loop
workload `--runs` times in the same process (fresh random prompts each run). After each
run it prints the output tok/s, the mean time to first token, and every Triton kernel of
`tessera.kernels` whose count of compiled variants grew during that run: a kernel that
compiles under traffic stalls the steps that first need it, which the warm-up should have
prevented.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu_serving as serving  # noqa: E402

import tessera.kernels  # noqa: E402


def jit_functions() -> dict:
    """Every Triton JIT function of `tessera.kernels`, under `module.name`."""
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.iter_modules(tessera.kernels.__path__):
        module = importlib.import_module(f"tessera.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn  # under autotuners and heuristics
            if isinstance(fn, JITFunction):
                found[f"{info.name}.{name}"] = fn
    return found


def compiled_variants(functions: dict) -> dict[str, int]:
    return {name: sum(len(caches[0]) for caches in fn.device_caches.values())
            for name, fn in functions.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_openloop_compiles_gpu.py needs a CUDA device")
    functions = jit_functions()
    prompt_lens, output_lens = serving.openloop_lengths(args.requests)
    start = time.perf_counter()
    engine_args = argparse.Namespace(enforce_eager=False, fuse_projections=True,
                                     gemv_products=True, async_scheduling=None)
    engine = serving.openloop_engine("qwen3-0.6b", engine_args)
    print(f"engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    before = compiled_variants(functions)
    for run in range(args.runs):
        prompts = serving.random_prompts(prompt_lens, engine.model_config.vocab_size,
                                         3 + run)
        result = serving.run_engine(engine, prompts, output_lens)
        after = compiled_variants(functions)
        grown = {name: after[name] - before[name] for name in after
                 if after[name] != before[name]}
        print(f"run {run + 1}: {result['out_tok_per_s']:,.0f} output tok/s, mean TTFT "
              f"{result['mean_ttft_ms']:,.0f} ms; variants compiled during the run: "
              f"{grown or 'none'}", flush=True)
        before = after


if __name__ == "__main__":
    main()
