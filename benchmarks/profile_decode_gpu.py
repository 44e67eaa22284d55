"""Where single-stream time goes on CUDA: the decode kernels and the time to first token.

    python benchmarks/profile_decode_gpu.py                  # SmolLM2-135M shape
    python benchmarks/profile_decode_gpu.py llama-3.2-1b --ttft
    python benchmarks/profile_decode_gpu.py --quant int8    # the int8 weight-only model

For each preset: a random-weight bf16 model (or its `--quant` quantized copy) on
`LLMEngine` (CUDA graphs, fused projections), one warm-up request, then one request of 128
random prompt tokens -> 32 generated tokens under torch.profiler (its prefill and 31 decode
steps). Prints the kernels sorted by their device time; divide by the step count for a
token's share.

`--ttft` adds the time to the first token of fresh 128-token prompts (no prefix-cache
hit): the wall time from `add_request` to the first output with a token, the device time
of the prefill step's kernels and their count (torch.profiler), and the host functions of
that step under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu_serving as serving  # noqa: E402

from tessera.serve.engine import LLMEngine  # noqa: E402
from tessera.serve.sampling_params import SamplingParams  # noqa: E402

PROMPT_LEN = 128


def first_token_ms(engine: LLMEngine, prompt: list[int], request_id: str) -> float:
    """Wall ms from `add_request` to the first output that carries a token; the request
    is then run to its end."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=2,
                                                          ignore_eos=True))
    elapsed = None
    while engine.has_unfinished():
        outputs = engine.step()
        if elapsed is None and any(o.outputs[0].token_ids for o in outputs):
            elapsed = time.perf_counter() - start
    return 1e3 * elapsed


def ttft_breakdown(engine: LLMEngine, vocab: int) -> None:
    prompts = serving.random_prompts([PROMPT_LEN] * 8, vocab, 7)
    times = [first_token_ms(engine, p, f"ttft{i}") for i, p in enumerate(prompts[:5])]
    print(f"time to first token, {PROMPT_LEN}-token fresh prompts: "
          + ", ".join(f"{t:.1f}" for t in times) + " ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        first_token_ms(engine, prompts[5], "ttft-prof")
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.time_range.elapsed_us() for e in kernels)
    print(f"one first token under torch.profiler: {len(kernels)} kernels, "
          f"{device_us / 1e3:.2f} ms of device time (prefill, one decode step, sampling)")
    profiler = cProfile.Profile()
    profiler.enable()
    first_token_ms(engine, prompts[6], "ttft-cprofile")
    profiler.disable()
    print("host functions of one first token (cProfile, tottime):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", default=["smollm2-135m"])
    parser.add_argument("--ttft", action="store_true", help="also the time to first token")
    parser.add_argument("--no-gemv", dest="gemv_products", action="store_false",
                        help="decode products by cuBLAS, not the few-row GEMV kernel")
    parser.add_argument("--quant", default=None,
                        choices=["int8", "int4", "awq", "fp8", *serving.QUANT_VARIANTS],
                        help="quantize the model's layers with this method (or variant)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_gpu.py needs a CUDA device")
    engine_args = argparse.Namespace(enforce_eager=False, fuse_projections=True,
                                     gemv_products=args.gemv_products, async_scheduling=None)
    for preset in args.presets:
        model = serving.build(preset, args.quant)
        engine = serving.make_engine(model, engine_args, max_num_seqs=4, max_model_len=1024)
        prompt = serving.random_prompts([PROMPT_LEN], model.config.vocab_size, 1)
        serving.run_engine(engine, prompt, [64])
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            serving.run_engine(engine, prompt, [32])
        print(f"== {preset} ({args.quant or 'bf16'}): 32 tokens (the prefill and 31 decode steps)")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                        max_name_column_width=70))
        if args.ttft:
            ttft_breakdown(engine, model.config.vocab_size)
        del engine, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
