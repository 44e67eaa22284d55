"""Serving speed on one GPU, with transformers' `generate` measured in the same run.

    python benchmarks/bench_gpu_serving.py --out results.json
    python benchmarks/bench_gpu_serving.py --suites decode --shapes smollm2-135m

Random-weight bf16 models of real shapes (speed does not depend on the weight values), on
`LLMEngine` (paged KV cache, continuous batching, CUDA-graph decode). Suites:

- `decode`: one request at a time, 128 random prompt tokens, exactly 256 generated (EOS
  ignored), for bf16 and the `--quant` variants: int8 weight-only, FP8 with per-token
  e4m3 activations (W8A8, the `fp8` default) and `fp8-weight` (FP8 weights, activations
  left in bf16). Figures: generated
  tokens over the request's wall time (the definition of the transformers baseline, which
  includes the prefill) and the decode rate alone (1 / mean inter-token time). Roofline:
  the bf16 weights' bytes over the measured device-to-device copy bandwidth.
- `batch`: 64 requests x (128 prompt + 256 generated) tokens submitted at once.
- `openloop`: 256 requests, prompt and output lengths uniform in 100..1024, random tokens,
  EOS ignored, submitted at once (as nano-vllm's bench does); output tokens per second.

Baselines in the same run: transformers' eager `generate` (sdpa, bf16, the same model
shape) at batch 1 and batch 64, 128 + 256 tokens. Each engine row also gives the share of
the engine's step time spent outside the model forwards. A short table prints last; `--out`
writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections.abc import Iterator

import torch

from tessera.config import get_preset
from tessera.model.transformer import build_model
from tessera.serve.config import EngineConfig
from tessera.serve.engine import LLMEngine
from tessera.serve.sampling_params import SamplingParams

DECODE_PROMPT, DECODE_NEW = 128, 256
BATCH, BATCH_PROMPT, BATCH_NEW = 64, 128, 256
# variant name -> (quantize_model method, QuantConfig options); other names are methods
QUANT_VARIANTS = {"fp8-weight": ("fp8", {"activations": "none"})}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="+", default=["decode", "batch", "openloop"],
                        choices=("decode", "batch", "openloop"))
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.2-1b"],
                        help="presets for the decode suite")
    parser.add_argument("--batch-shape", default="llama-3.2-1b")
    parser.add_argument("--openloop-shape", default="qwen3-0.6b")
    parser.add_argument("--openloop-requests", type=int, default=256)
    parser.add_argument("--quant", nargs="*", default=["int8", "fp8", "fp8-weight"],
                        help="quantized variants for the decode suite: a quantize_model "
                        f"method or one of {sorted(QUANT_VARIANTS)}")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--no-fuse-projections", dest="fuse_projections",
                        action="store_false", help="separate q/k/v and gate/up products")
    parser.add_argument("--no-gemv", dest="gemv_products", action="store_false",
                        help="decode products by cuBLAS, not the few-row GEMV kernel")
    parser.add_argument("--no-rope-kv-write", dest="rope_kv_write", action="store_false",
                        help="RoPE and the KV write as two launches a layer, not one")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling",
                        action="store_false", help="steps in order: read each step's "
                        "tokens before the next is launched")
    parser.add_argument("--profile", default=None, metavar="FILE", help="openloop: write "
                        "torch.profiler's kernel and operator tables to FILE")
    parser.add_argument("--out", default=None)
    return parser.parse_args()


# ------------------------------------------------------------------------------ helpers
def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second (median of 20)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() / sorted(times[5:])[len(times[5:]) // 2]


def build(preset: str, quant: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_preset(preset), device="cuda", dtype=torch.bfloat16).eval()
    if quant:
        from tessera.quant import quantize_model

        method, options = QUANT_VARIANTS.get(quant, (quant, {}))
        quantize_model(model, method, **options)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in lengths]


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    """Submit everything, step until done; throughput and latency figures."""
    before = engine.stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=n,
                                                          ignore_eos=True,
                                                          output_kind="final_only"))
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.finished]
    wall = time.perf_counter() - start
    stats = engine.stats()
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    itl = [t for o in outputs for t in o.metrics.inter_token_latencies]
    step = stats.step_seconds - before.step_seconds
    forward = stats.forward_seconds - before.forward_seconds
    return {"requests": len(prompts), "generated": generated, "seconds": wall,
            "out_tok_per_s": generated / wall,
            "decode_tok_per_s": len(itl) / sum(itl) if itl else None,
            "mean_ttft_ms": 1e3 * sum(o.metrics.time_to_first_token for o in outputs)
            / len(outputs),
            "max_ttft_ms": 1e3 * max(o.metrics.time_to_first_token for o in outputs),
            "outside_forward_share": 1 - forward / step if step else None,
            "preemptions": stats.num_preemptions - before.num_preemptions}


def make_engine(model: torch.nn.Module, args: argparse.Namespace, **config) -> LLMEngine:
    engine = LLMEngine(model, config=EngineConfig(enforce_eager=args.enforce_eager,
                                                  fuse_projections=args.fuse_projections,
                                                  gemv_products=args.gemv_products,
                                                  rope_kv_write=args.rope_kv_write,
                                                  async_scheduling=args.async_scheduling,
                                                  **config))
    run_engine(engine, [[11, 12, 13]] * 2, [4, 4])  # warm-up
    return engine


def hf_generate(preset: str, batch: int, prompt_len: int, new: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = get_preset(preset).to_hf_config()
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(10, config.vocab_size - 10, (batch, prompt_len), device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return {"batch": batch, "prompt": prompt_len, "new": new, "seconds": wall,
            "out_tok_per_s": batch * new / wall}


def graph_replay_ms(engine: LLMEngine) -> float | None:
    """Device time of one replay of the batch-1 decode graph (median of 50): the step's
    GPU work alone, without the host's scheduling, input copies and sampling."""
    static = engine.runner.static
    if static is None or (1, 1) not in static.graphs:
        return None
    graph, _ = static.graphs[(1, 1)]
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------ suites
def decode_suite(args: argparse.Namespace, bandwidth: float) -> list[dict]:
    rows = []
    for preset in args.shapes:
        base = None if args.no_baseline else hf_generate(preset, 1, DECODE_PROMPT, DECODE_NEW)
        for quant in [None, *args.quant]:
            model = build(preset, quant)
            if quant is None:
                roofline = bandwidth / weight_bytes(model)
            engine = make_engine(model, args, max_num_seqs=4, max_model_len=1024)
            # A new prompt each run: no prefix-cache hit, the prefill is computed.
            result = [run_engine(engine, random_prompts([DECODE_PROMPT],
                                                        model.config.vocab_size, seed),
                                 [DECODE_NEW]) for seed in (1, 2, 3)][-1]
            result.update(suite="decode", shape=preset, weights=quant or "bf16",
                          weight_bytes=weight_bytes(model), roofline_tok_per_s=roofline,
                          graph_replay_ms=graph_replay_ms(engine), baseline=base)
            rows.append(result)
            print(json.dumps(result), flush=True)
            del engine, model
            torch.cuda.empty_cache()
    return rows


def batch_suite(args: argparse.Namespace) -> list[dict]:
    preset = args.batch_shape
    base = None if args.no_baseline else hf_generate(preset, BATCH, BATCH_PROMPT, BATCH_NEW)
    model = build(preset)
    engine = make_engine(model, args, max_num_seqs=BATCH, max_model_len=1024,
                         max_num_batched_tokens=8192,
                         kv_cache_tokens=BATCH * (BATCH_PROMPT + BATCH_NEW + 64))
    prompts = random_prompts([BATCH_PROMPT] * BATCH, model.config.vocab_size, 2)
    result = run_engine(engine, prompts, [BATCH_NEW] * BATCH)
    result.update(suite="batch", shape=preset, weights="bf16", baseline=base)
    print(json.dumps(result), flush=True)
    del engine, model
    torch.cuda.empty_cache()
    return [result]


def openloop_lengths(num_requests: int) -> tuple[list[int], list[int]]:
    """Prompt and output lengths of the open-loop workload, uniform in 100..1024."""
    rng = random.Random(0)
    prompt_lens = [rng.randint(100, 1024) for _ in range(num_requests)]
    return prompt_lens, [rng.randint(100, 1024) for _ in range(num_requests)]


def openloop_engine(preset: str, args: argparse.Namespace) -> LLMEngine:
    """The open-loop suite's engine: 256 sequences, 2,048-token contexts, 70% of the free
    device memory for the KV cache."""
    model = build(preset)
    free, _ = torch.cuda.mem_get_info()
    return make_engine(model, args, max_num_seqs=256, max_model_len=2048,
                       max_num_batched_tokens=16384, kv_cache_memory_bytes=int(free * 0.7))


def openloop_suite(args: argparse.Namespace) -> list[dict]:
    preset = args.openloop_shape
    prompt_lens, output_lens = openloop_lengths(args.openloop_requests)
    engine = openloop_engine(preset, args)
    prompts = random_prompts(prompt_lens, engine.model_config.vocab_size, 3)
    with profiled(args.profile):
        result = run_engine(engine, prompts, output_lens)
    result.update(suite="openloop", shape=preset, weights="bf16",
                  prompt_tokens=sum(prompt_lens), kv_blocks=engine.block_manager.num_blocks,
                  baseline=None)
    print(json.dumps(result), flush=True)
    return [result]


@contextlib.contextmanager
def profiled(path: str | None) -> Iterator[None]:
    """Under torch.profiler when `path` is given: the top CUDA kernels and CPU operators
    by total time, written to `path`."""
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
    averages = prof.key_averages()
    with open(path, "w", encoding="utf-8") as f:
        f.write(averages.table(sort_by="cuda_time_total", row_limit=40) + "\n")
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40) + "\n")


# ------------------------------------------------------------------------------ report
def table(rows: list[dict]) -> str:
    lines = [f"{'suite':<9}{'shape':<14}{'weights':<8}{'tok/s':>9}{'decode':>9}{'graph ms':>9}"
             f"{'TTFT ms':>9}{'HF tok/s':>10}{'ratio':>8}{'roofline':>10}{'outside fwd':>12}"]
    for r in rows:
        base = r["baseline"]["out_tok_per_s"] if r.get("baseline") else None
        ratio = f"{r['out_tok_per_s'] / base:.1f}x" if base else "-"
        decode = f"{r['decode_tok_per_s']:.0f}" if r.get("decode_tok_per_s") else "-"
        roof = f"{r['roofline_tok_per_s']:.0f}" if r.get("roofline_tok_per_s") else "-"
        share = r.get("outside_forward_share")
        graph = f"{r['graph_replay_ms']:.3f}" if r.get("graph_replay_ms") else "-"
        lines.append(f"{r['suite']:<9}{r['shape']:<14}{r['weights']:<8}"
                     f"{r['out_tok_per_s']:>9.0f}{decode:>9}{graph:>9}{r['mean_ttft_ms']:>9.1f}"
                     f"{(f'{base:.1f}' if base else '-'):>10}{ratio:>8}{roof:>10}"
                     f"{(f'{100 * share:.1f}%' if share is not None else '-'):>12}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"torch {torch.__version__}; CUDA graphs {'off' if args.enforce_eager else 'on'}; "
          f"fused projections {'on' if args.fuse_projections else 'off'}; "
          f"GEMV products {'on' if args.gemv_products else 'off'}; "
          f"RoPE with the KV write {'on' if args.rope_kv_write else 'off'}")
    rows: list[dict] = []
    if "decode" in args.suites:
        rows += decode_suite(args, bandwidth)
    if "batch" in args.suites:
        rows += batch_suite(args)
    if "openloop" in args.suites:
        rows += openloop_suite(args)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "copy_bytes_per_s": bandwidth, "rows": rows}, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
