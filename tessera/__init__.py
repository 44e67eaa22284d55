"""Tessera: distill a large teacher LLM into a small student, then serve the student fast.

The top-level names are the Python API: `load` / `save` for models (HF directories, GGUF
files, registered names), `ModelConfig`, plain `generate`, and the serving engine's
offline `LLM` and `SamplingParams`. They are imported on first use, so importing one
submodule (say `tessera.config`) does not pull in the rest.
"""

from __future__ import annotations

import importlib

from tessera.errors import TesseraError

__version__ = "0.1.0"

_LAZY = {
    "load": "tessera.checkpoint.loader",
    "save": "tessera.checkpoint.loader",
    "LoadedModel": "tessera.checkpoint.loader",
    "ModelConfig": "tessera.config",
    "generate": "tessera.generate",
    "GenerationConfig": "tessera.generate",
    "LLM": "tessera.serve.llm",
    "SamplingParams": "tessera.serve.sampling_params",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")


__all__ = ["TesseraError", *_LAZY]
