"""The Llama-family decoder, its attention dispatch point and the contiguous KV cache."""

from tessera.model.attention import AttentionContext, CausalContext
from tessera.model.kv_cache import CacheContext, KVCache
from tessera.model.transformer import ModelOutput, TesseraForCausalLM, build_model, init_weights

__all__ = [
    "AttentionContext", "CacheContext", "CausalContext", "KVCache", "ModelOutput",
    "TesseraForCausalLM", "build_model", "init_weights",
]
