"""Serving-engine throughput: N random prompts through `LLMEngine` at a fixed concurrency.

    python benchmarks/bench_engine.py
    python benchmarks/bench_engine.py --preset student-tiny --num-prompts 32 --concurrency 8

The first loads the registered `smollm2-135m-instruct` with `tessera.load`; `--preset NAME`
builds that preset with random weights instead. Requests are kept `--concurrency` in flight
(a new one is added as one finishes), each with `--prompt-len` random token ids and exactly
`--max-tokens` generated tokens (EOS ignored). It prints the output throughput, mean time to
first token and inter-token latency, and the share of engine step time spent outside the
model forwards (scheduling, input preparation, sampling, detokenization, bookkeeping).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tessera.serve.config import EngineConfig
from tessera.serve.engine import LLMEngine
from tessera.serve.outputs import RequestOutput
from tessera.serve.sampling_params import SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a source tessera.load accepts (default: %(default)s)")
    parser.add_argument("--preset", default=None, help="a ModelConfig preset, random weights")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_model(args: argparse.Namespace):
    if args.preset is None:
        from tessera.checkpoint.loader import load

        return load(args.model, dtype=args.dtype, device=args.device).model
    from tessera.checkpoint.loader import default_device, parse_dtype
    from tessera.config import get_preset
    from tessera.model.transformer import build_model

    device = torch.device(args.device) if args.device else default_device()
    return build_model(get_preset(args.preset), device=device,
                       dtype=parse_dtype(args.dtype, device)).eval()


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
        concurrency: int) -> list[RequestOutput]:
    """Keep `concurrency` requests in flight until every prompt finished."""
    pending = list(enumerate(prompts))
    finished: list[RequestOutput] = []
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            index, prompt = pending.pop(0)
            engine.add_request(str(index), prompt, params)
            in_flight += 1
        for output in engine.step():
            if output.finished:
                finished.append(output)
                in_flight -= 1
    return finished


def main() -> None:
    args = parse_args()
    model = load_model(args)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, vocab, (args.num_prompts, args.prompt_len), generator=gen)
    config = EngineConfig(max_num_seqs=args.concurrency)
    engine = LLMEngine(model, config=config)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            output_kind="final_only")
    run(engine, [[1, 2, 3]], params.replace(max_tokens=2), 1)  # warm up
    before = engine.stats()
    start = time.perf_counter()
    outputs = run(engine, prompts.tolist(), params, args.concurrency)
    wall = time.perf_counter() - start
    stats = engine.stats()
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    step_seconds = stats.step_seconds - before.step_seconds
    forward_seconds = stats.forward_seconds - before.forward_seconds
    ttft = statistics.mean(o.metrics.time_to_first_token for o in outputs)
    itl = [t for o in outputs for t in o.metrics.inter_token_latencies]
    print(f"model: {args.preset or args.model}  device: {engine.runner.device}  "
          f"dtype: {engine.runner.dtype}  torch threads: {torch.get_num_threads()}")
    print(f"{args.num_prompts} prompts x {args.prompt_len} tokens, {args.max_tokens} "
          f"generated each, concurrency {args.concurrency}")
    print(f"output throughput:      {num_output / wall:10.1f} tok/s ({num_output} tokens "
          f"in {wall:.2f} s)")
    print(f"mean TTFT:              {ttft * 1e3:10.1f} ms")
    print(f"mean inter-token time:  {statistics.mean(itl) * 1e3:10.1f} ms")
    print(f"step time outside the model forward: "
          f"{100 * (1 - forward_seconds / step_seconds):5.1f} % "
          f"({step_seconds - forward_seconds:.2f} s of {step_seconds:.2f} s)")


if __name__ == "__main__":
    main()
