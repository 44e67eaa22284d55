"""`AsyncEngine` on its own thread: outputs equal the engine's, and the core thread runs
torch with the intra-op threads it was given while the caller's setting stays."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tessera.errors import ConfigError
from tessera.serve.async_engine import AsyncEngine

from .helpers import GREEDY, reference, tiny_model


def test_the_core_thread_runs_with_its_own_thread_count(make_engine, monkeypatch):
    model = tiny_model(0)
    engine = make_engine(model)
    seen: list[int] = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (seen.append(torch.get_num_threads()),
                                                 step())[1])
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    prompt = [5, 9, 17, 3, 44]

    async def run():
        async_engine = AsyncEngine(engine, num_threads=wanted)
        async_engine.start()
        outputs = [o async for o in async_engine.generate("r", prompt, GREEDY)]
        await async_engine.shutdown()
        return outputs

    outputs = asyncio.run(run())
    assert outputs[-1].finished
    assert outputs[-1].outputs[0].token_ids == reference(model, prompt, GREEDY.max_tokens)
    assert seen and set(seen) == {wanted}
    assert torch.get_num_threads() == before


def test_num_threads_must_be_positive(make_engine):
    with pytest.raises(ConfigError, match="num_threads must be >= 1"):
        AsyncEngine(make_engine(tiny_model(0)), num_threads=0)
