"""`SamplingParams`: how one request picks its tokens and when it stops.

A keyword-only dataclass validated when built; a bad value raises `RequestError` with a
message naming the field, so the server can answer 400 with that message. The definitions
follow vLLM / the OpenAI API:

- `temperature` 0 is greedy (argmax); `top_k` 0 and `top_p` 1 and `min_p` 0 are off;
- `repetition_penalty` (1 = off) divides positive logits and multiplies negative ones of
  every token seen in the prompt or the output;
- `presence_penalty` / `frequency_penalty` (0 = off) subtract `presence * [count > 0]` and
  `frequency * count`, counted over the output tokens only;
- `seed` makes one request reproducible whatever else is in the batch;
- `stop` strings end generation and are cut from the text; `stop_token_ids` end it and
  stay in `token_ids` (as EOS does); `min_tokens` suppresses EOS and `stop_token_ids` until
  that many tokens were generated; `ignore_eos` keeps going past EOS;
- `logprobs` n returns the n most likely tokens at each step (0: only the sampled one);
- `n` > 1 samples n completions of one prompt; they share the prompt's KV blocks;
- `output_kind` "cumulative" reports the request after every step that gave it tokens
  (everything so far: what streaming needs), "final_only" once, when it finishes (what
  offline generation needs: no per-step copies of long token lists).

It knows nothing about models, tokenizers or the engine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from tessera.errors import RequestError

OUTPUT_KINDS = ("cumulative", "final_only")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._check_numbers()
        self._check_counts()
        self._check_stops()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def _check_numbers(self) -> None:
        _check_real("temperature", self.temperature, low=0.0)
        _check_real("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p <= 0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_real("min_p", self.min_p, low=0.0, high=1.0)
        _check_real("repetition_penalty", self.repetition_penalty, low=0.0)
        if self.repetition_penalty <= 0:
            raise RequestError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        _check_real("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_real("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)

    def _check_counts(self) -> None:
        _check_int("top_k", self.top_k, low=0)
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                               f"({self.max_tokens})")
        _check_int("n", self.n, low=1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise RequestError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got "
                               f"{self.output_kind!r}")

    def _check_stops(self) -> None:
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise RequestError(f"stop strings must be non-empty strings, got {text!r}")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids entries", token, low=0)


def _check_real(name: str, value: Any, *, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be {bounds}, got {value}")


def _check_int(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise RequestError(f"{name} must be >= {low}, got {value}")
