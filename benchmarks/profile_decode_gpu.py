"""Kernel-by-kernel device time of single-stream decode on CUDA graphs (torch.profiler).

    python benchmarks/profile_decode_gpu.py                  # SmolLM2-135M shape
    python benchmarks/profile_decode_gpu.py llama-3.2-1b

For each preset: a random-weight bf16 model on `LLMEngine` (CUDA graphs, fused
projections), one warm-up request, then one request of 128 random prompt tokens -> 32
generated tokens under the profiler (its prefill and 31 decode steps). Prints the kernels
sorted by their device time; divide by the step count for a token's share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu_serving as serving  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", default=["smollm2-135m"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_gpu.py needs a CUDA device")
    engine_args = argparse.Namespace(enforce_eager=False, fuse_projections=True,
                                     async_scheduling=None)
    for preset in args.presets:
        model = serving.build(preset)
        engine = serving.make_engine(model, engine_args, max_num_seqs=4, max_model_len=1024)
        prompt = serving.random_prompts([128], model.config.vocab_size, 1)
        serving.run_engine(engine, prompt, [64])
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            serving.run_engine(engine, prompt, [32])
        print(f"== {preset}: 32 tokens (the prefill and 31 decode steps)")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                        max_name_column_width=70))
        del engine, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
