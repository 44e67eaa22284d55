"""Serving: a paged-KV continuous-batching engine and the offline `LLM` API.

Reading order: `sampling_params` (what a request asks for), `sequence` (per-request state),
`block_manager` (KV blocks, ref counts, prefix cache), `scheduler` (who runs each step),
`kv_pool` + `paged_attention` + `model_runner` (device tensors and the forward), `sampler`,
`speculative`, `engine` (schedule -> run -> postprocess), `llm` (offline batches).
Names are imported on first use, so `import tessera.serve.sampling_params` stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "EngineConfig": "tessera.serve.config",
    "LLMEngine": "tessera.serve.engine",
    "EngineStats": "tessera.serve.engine",
    "LLM": "tessera.serve.llm",
    "CompletionResult": "tessera.serve.llm",
    "RequestOutput": "tessera.serve.outputs",
    "CompletionOutput": "tessera.serve.outputs",
    "SamplingParams": "tessera.serve.sampling_params",
    "TokenLogprobs": "tessera.serve.sequence",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tessera.serve' has no attribute {name!r}")


__all__ = list(_LAZY)
