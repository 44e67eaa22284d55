"""Fixtures for the serving tests: tiny random models (fp32, one CPU thread) and engines
that are checked for leaked KV blocks when each test ends, with steps in order and
overlapped."""

from __future__ import annotations

import pytest
import torch

from tessera.model.transformer import TesseraForCausalLM
from tessera.serve.config import EngineConfig
from tessera.serve.engine import LLMEngine

from .helpers import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and steadiest on a busy machine) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model() -> TesseraForCausalLM:
    return tiny_model(0)


@pytest.fixture(scope="session")
def draft_model() -> TesseraForCausalLM:
    return tiny_model(1, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64)


@pytest.fixture(params=[False, True], ids=["in_order", "overlapped"])
def make_engine(request):
    """Build engines; when the test ends each must be idle with every block free. Every
    test runs twice: steps in order, and overlapped (`async_scheduling`, which the CPU
    runs too, reading each step's tokens one step late)."""
    engines: list[LLMEngine] = []

    def make(model, tokenizer=None, *, draft_model=None, **config) -> LLMEngine:
        config.setdefault("async_scheduling", request.param)
        engine = LLMEngine(model, tokenizer, config=EngineConfig(**config),
                           draft_model=draft_model)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert not engine.has_unfinished(), "a test left requests in the engine"
        assert engine.block_manager.is_idle_clean(), "KV blocks leaked"
