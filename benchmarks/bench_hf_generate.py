"""Baseline: transformers' `generate` on the same GGUF file, static batches on the CPU.

    python benchmarks/bench_hf_generate.py
    python benchmarks/bench_hf_generate.py --batch-sizes 16 1 --prompt-len 128 --new-tokens 64
    python benchmarks/bench_hf_generate.py --threads 1 --dtype bfloat16

For each batch size it generates exactly `--new-tokens` tokens (greedy, EOS ignored) for a
batch of `--prompt-len` random token ids, after one short warm-up, and prints the output
throughput (batch x new tokens / wall time) as a line of JSON per batch size. The model
is `smollm2-135m-instruct` resolved by Tessera's registry and loaded by transformers with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` in `--dtype` (float32 unless
told).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a registered name or .gguf path (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads "
                        "(default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return parser.parse_args()


def load(source: str, dtype: str):
    from transformers import AutoModelForCausalLM

    from tessera.checkpoint.registry import resolve

    path = resolve(source)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=getattr(torch, dtype)).eval()


@torch.inference_mode()
def generate_seconds(model, input_ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return seconds


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load(args.model, args.dtype)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    generate_seconds(model, torch.randint(0, vocab, (1, 8), generator=gen), 2)  # warm up
    for batch_size in args.batch_sizes:
        ids = torch.randint(0, vocab, (batch_size, args.prompt_len), generator=gen)
        seconds = generate_seconds(model, ids, args.new_tokens)
        print(json.dumps({
            "batch_size": batch_size, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "seconds": round(seconds, 3),
            "output_tok_per_s": round(batch_size * args.new_tokens / seconds, 2),
            "torch_threads": torch.get_num_threads(), "dtype": args.dtype,
        }), flush=True)


if __name__ == "__main__":
    main()
