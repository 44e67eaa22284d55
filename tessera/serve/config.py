"""`EngineConfig`: the serving engine's knobs, validated when built.

The KV pool's size is given as at most one of `num_kv_blocks`, `kv_cache_tokens`,
`kv_cache_memory_bytes`; with none, the engine takes the smaller of 1 GiB and what
`max_num_seqs` sequences of the full context need. Speculative decoding is off unless
`speculative_method` is "draft" (a draft model passed to the engine) or "ngram" (prompt
lookup). On CUDA, decode steps replay CUDA graphs captured per batch-size bucket unless
`enforce_eager`, and so does a step that is one fresh prompt of up to
`max_prefill_graph_len` tokens (per length bucket of 16, 32, ...; 0 turns that off). With
`fuse_projections` (the default) the engine fuses each layer's q/k/v and gate/up
projections of the models it is given, in place
(`tessera/model/fused_projections.py`), and with `cpu_prepack` it gives the linear layers
of float32 and bfloat16 CPU models weights prepacked for oneDNN
(`tessera/model/cpu_prepack.py`); with `gemv_products` the products of CUDA models' layers
go through the few-row GEMV kernel where it beats cuBLAS (`tessera/model/gemv_products.py`),
and with `rope_kv_write` their layers rotate q and k as the KV pool is written, in one launch
(`tessera/model/rotating_attention.py`).
`async_scheduling` overlaps the host's work with the device's: the next step is scheduled
and launched before the tokens of the one running are read back (see `engine.py`); None,
the default, turns it on for CUDA models. It knows nothing about models or devices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tessera.errors import ConfigError

DEFAULT_KV_CACHE_BYTES = 1 << 30
SPECULATIVE_METHODS = ("draft", "ngram")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # tokens computed per step, over all sequences
    max_model_len: int | None = None  # None: the model's context (a smaller cap is allowed)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    speculative_method: str | None = None
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    max_cuda_graph_batch_size: int = 256  # larger decode batches run eagerly
    max_prefill_graph_len: int = 512  # longer lone fresh prompts prefill eagerly; 0: all
    fuse_projections: bool = True  # one product for q/k/v and one for gate/up, in place
    cpu_prepack: bool = True  # CPU models: weights prepacked for oneDNN (cpu_prepack.py)
    gemv_products: bool = True  # CUDA models: few-row products by GEMV (gemv_products.py)
    rope_kv_write: bool = True  # CUDA models: RoPE with the KV write (rotating_attention.py)
    async_scheduling: bool | None = None  # None: on for CUDA models, off elsewhere

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens",
                     "num_speculative_tokens", "ngram_min", "ngram_max",
                     "max_cuda_graph_batch_size"):
            _check_positive(name, getattr(self, name))
        for name in ("num_kv_blocks", "kv_cache_tokens", "kv_cache_memory_bytes",
                     "max_model_len"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        length = self.max_prefill_graph_len
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ConfigError(f"max_prefill_graph_len must be an integer >= 0, got {length!r}")
        sizes = [n for n in ("num_kv_blocks", "kv_cache_tokens", "kv_cache_memory_bytes")
                 if getattr(self, n) is not None]
        if len(sizes) > 1:
            raise ConfigError(f"give the KV cache size one way, not {' and '.join(sizes)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ConfigError(f"kv_cache_tokens ({self.kv_cache_tokens}) is smaller than one "
                              f"block ({self.block_size} tokens)")
        for name in ("enforce_eager", "fuse_projections", "cpu_prepack", "gemv_products",
                     "rope_kv_write"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ConfigError(f"async_scheduling must be true, false or None (automatic), "
                              f"got {self.async_scheduling!r}")
        self._check_speculative()

    def _check_speculative(self) -> None:
        method = self.speculative_method
        if method is not None and method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative_method must be one of {SPECULATIVE_METHODS} or "
                              f"None, got {method!r}")
        if self.ngram_min > self.ngram_max:
            raise ConfigError(f"ngram_min ({self.ngram_min}) must be <= ngram_max "
                              f"({self.ngram_max})")
        if method is not None and self.max_num_batched_tokens <= self.num_speculative_tokens:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must exceed "
                f"num_speculative_tokens ({self.num_speculative_tokens}) to verify a draft"
            )

    @property
    def num_lookahead_tokens(self) -> int:
        """Slots a decoding sequence reserves beyond its next token (0 without drafts)."""
        return self.num_speculative_tokens if self.speculative_method else 0

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
