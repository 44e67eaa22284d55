"""Shared fixtures: the real SmolLM2-135M-Instruct teacher, loaded once per test session by
Tessera and by transformers (the parity oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from tessera.checkpoint.registry import resolve

    return resolve(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    import tessera

    return tessera.load(str(smollm2_gguf), dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """(transformers model, transformers tokenizer) loaded from the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    kwargs = {"gguf_file": smollm2_gguf.name}
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, dtype=torch.float32, **kwargs
    ).eval()
    return model, tok


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
