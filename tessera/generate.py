"""Plain autoregressive generation: one prompt, a contiguous KV cache, greedy or sampled.

This is the reference the serving engine is tested against, and what `tessera generate`
runs. Greedy decoding (temperature 0) is deterministic; sampling with temperature, top-k
and top-p is reproducible for a given seed. Generation stops at a stop token (the model's
EOS ids by default) or after `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tessera.errors import RequestError
from tessera.model.kv_cache import CacheContext, KVCache
from tessera.model.transformer import TesseraForCausalLM


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's EOS ids

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf; rows of `[N, V]`."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, gen: GenerationConfig,
               generator: torch.Generator | None) -> int:
    """Pick the next token from last-position logits `[V]`."""
    if gen.temperature == 0:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits.float()[None] / gen.temperature, gen.top_k, gen.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_stream(model: TesseraForCausalLM, prompt_ids: Sequence[int],
                    gen: GenerationConfig) -> Iterator[int]:
    """Yield generated token ids one at a time (the stop token itself is yielded too)."""
    config = model.config
    if not prompt_ids:
        raise RequestError("the prompt is empty; give at least one token")
    if len(prompt_ids) >= config.max_seq_len:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the model's context "
                           f"is {config.max_seq_len}")
    max_new = min(gen.max_new_tokens, config.max_seq_len - len(prompt_ids))
    device = model.lm_head.weight.device
    stops = set(gen.stop_token_ids if gen.stop_token_ids is not None else config.eos_token_ids)
    generator = None
    if gen.seed is not None:
        generator = torch.Generator(device=device).manual_seed(gen.seed)
    cache = KVCache(config, 1, len(prompt_ids) + max_new, dtype=model.lm_head.weight.dtype,
                    device=device)
    tokens = torch.tensor([list(prompt_ids)], device=device)
    start = 0
    for _ in range(max_new):
        positions = torch.arange(start, start + tokens.shape[1], device=device)
        logits = model(tokens, positions, CacheContext(cache, start))[0, -1]
        start += tokens.shape[1]
        token = next_token(logits, gen, generator)  # NOTE: host sync, one per token
        yield token
        if token in stops:
            return
        tokens = torch.tensor([[token]], device=device)


def generate(model: TesseraForCausalLM, prompt_ids: Sequence[int],
             gen: GenerationConfig | None = None) -> list[int]:
    """Generated token ids (without the prompt)."""
    return list(generate_stream(model, prompt_ids, gen or GenerationConfig()))
