"""The static prefill path (a lone fresh prompt padded to a length bucket, the body of the
prefill CUDA graphs) against the eager path: equal logits, equal pool writes, no write
outside the prompt's blocks and the padding block, and equal engine outputs. On CUDA,
graph replay against the same padded forward run eagerly, and a graph engine against an
eager one."""

from __future__ import annotations

import pytest
import torch

import tessera.serve.engine as engine_module
from tessera.errors import ConfigError
from tessera.serve.config import EngineConfig
from tessera.serve.model_runner import ForwardItem, ModelRunner, StaticDecodeSettings
from tessera.serve.prefill_graphs import length_buckets
from tessera.serve.sampling_params import SamplingParams

from .helpers import GREEDY, random_prompt, reference, run_engine, tiny_model

BLOCK = 4
NUM_BLOCKS = 40


def test_length_buckets():
    assert length_buckets(15) == []
    assert length_buckets(16) == [16]
    assert length_buckets(100) == [16, 32, 64]
    assert length_buckets(512) == [16, 32, 64, 128, 256, 512]


def test_max_prefill_graph_len_is_validated():
    assert EngineConfig(max_prefill_graph_len=0).max_prefill_graph_len == 0
    for bad in (-1, 1.5, "64", True):
        with pytest.raises(ConfigError, match="max_prefill_graph_len"):
            EngineConfig(max_prefill_graph_len=bad)


def _runners(model, *, use_graphs: bool = False, max_len: int = 32
             ) -> tuple[ModelRunner, ModelRunner]:
    """(eager runner, runner with the static prefill path), pools poisoned alike."""
    settings = StaticDecodeSettings(max_model_len=64, max_batch_size=4, use_graphs=use_graphs,
                                    max_prefill_graph_len=max_len)
    eager = ModelRunner(model, NUM_BLOCKS, BLOCK)
    static = ModelRunner(model, NUM_BLOCKS, BLOCK, static_decode=settings)
    for runner in (eager, static):
        for cache in (runner.pool.keys, runner.pool.values):
            cache.copy_(torch.randn(cache.shape, generator=torch.Generator().manual_seed(5)))
    return eager, static


def _blocks_written(runner: ModelRunner, before: torch.Tensor) -> set[int]:
    changed = (runner.pool.keys != before).flatten(2).any(-1).any(0)  # [blocks]
    return set(torch.nonzero(changed).flatten().tolist())


@pytest.mark.parametrize("length", [1, 5, 15, 16, 17, 31, 32])
def test_static_prefill_equals_eager(length):
    generator = torch.Generator().manual_seed(length)
    model = tiny_model(0)
    eager, static = _runners(model)
    blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()[:-(-length // BLOCK)]
    item = ForwardItem(blocks, 0, random_prompt(length, generator), 1)
    assert static.prefill.key([item]) is not None or length <= 1  # 1 token: decode path
    before = static.pool.keys.clone()
    expected, got = eager.forward([item]), static.forward([item])
    assert got.shape == expected.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    written = _blocks_written(static, before)
    assert written - {static.padding_block} == set(blocks)
    real = slice(0, static.padding_block)  # the padding block may differ; nothing else
    torch.testing.assert_close(static.pool.keys[:, real], eager.pool.keys[:, real])
    torch.testing.assert_close(static.pool.values[:, real], eager.pool.values[:, real])
    # A decode step on top reads what the prefill wrote: still equal.
    step = ForwardItem(blocks + [blocks[-1]] * 2, length, random_prompt(1, generator), 1)
    torch.testing.assert_close(static.forward([step]), eager.forward([step]),
                               rtol=1e-5, atol=1e-5)


def test_a_chunk_without_logits_returns_none():
    model = tiny_model(0)
    eager, static = _runners(model)
    item = ForwardItem([3, 9, 4, 0, 7], 0, random_prompt(20, torch.Generator()), 0)
    assert static.prefill.key([item]) is not None
    got = static.forward([item])
    assert got.shape == eager.forward([item]).shape == (0, model.config.vocab_size)


def test_other_prefills_take_the_eager_path():
    model = tiny_model(0)
    _, static = _runners(model)
    prompt = list(range(2, 14))
    two = [ForwardItem([0, 1, 2], 0, prompt, 1), ForwardItem([3, 4, 5], 0, prompt, 1)]
    continued = [ForwardItem([0, 1, 2, 3, 4], 4, prompt, 1)]
    too_long = [ForwardItem(list(range(9)), 0, list(range(2, 35)), 1)]
    every_row = [ForwardItem([0, 1, 2], 0, prompt, len(prompt))]
    for items in (two, continued, too_long, every_row):
        assert static.prefill.key(items) is None


@pytest.fixture
def static_prefill_engines(monkeypatch):
    """Engines whose lone fresh prefills (and decode steps) take the static paths eagerly,
    as graphs would on CUDA."""
    def settings(config, model, max_model_len, query_lens):
        return StaticDecodeSettings(max_model_len=max_model_len, query_lens=tuple(query_lens),
                                    max_batch_size=4, use_graphs=False,
                                    max_prefill_graph_len=32)

    monkeypatch.setattr(engine_module, "static_decode_settings", settings)


@pytest.mark.parametrize("chunk", [None, 8])
def test_engine_with_static_prefills_matches_generate(model, make_engine,
                                                      static_prefill_engines, chunk):
    """Requests one at a time (each prefill alone in its step), prompts short and long
    (past the largest bucket), fresh and with a cached prefix, whole or in chunks."""
    generator = torch.Generator().manual_seed(11)
    shared = random_prompt(12, generator)
    prompts = [random_prompt(n, generator) for n in (2, 9, 16, 23, 32, 45)]
    prompts += [shared + random_prompt(5, generator), shared + random_prompt(7, generator)]
    config = dict(block_size=BLOCK, max_num_seqs=4, max_model_len=96)
    if chunk is not None:
        config.update(max_num_batched_tokens=chunk)
    engine = make_engine(model, **config)
    assert engine.runner.prefill is not None
    for i, prompt in enumerate(prompts):
        output = run_engine(engine, {f"r{i}": (prompt, GREEDY)})[f"r{i}"]
        assert output.outputs[0].token_ids == reference(model, prompt, GREEDY.max_tokens)


@pytest.mark.gpu
def test_prefill_graph_replay_equals_the_padded_forward():
    generator = torch.Generator().manual_seed(12)
    model = tiny_model(0).to("cuda", torch.bfloat16)
    _, graphs = _runners(model, use_graphs=True, max_len=64)
    _, padded = _runners(model, use_graphs=False, max_len=64)
    eager = ModelRunner(model, NUM_BLOCKS, BLOCK)
    graphs.capture_graphs()
    assert sorted(graphs.prefill.graphs) == [16, 32, 64]
    for length in (2, 13, 16, 40, 64):
        blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()[:-(-length // BLOCK)]
        item = ForwardItem(blocks, 0, random_prompt(length, generator), 1)
        got = graphs.forward([item]).clone()
        torch.testing.assert_close(got, padded.forward([item]), rtol=0, atol=0)
        torch.testing.assert_close(got, eager.forward([item]), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_engine_with_prefill_graphs_matches_eager_engine(make_engine):
    generator = torch.Generator().manual_seed(13)
    model = tiny_model(0).to("cuda")  # float32: greedy ties cannot flip between the two
    graphs = make_engine(model, max_num_seqs=4, max_model_len=128)
    eager = make_engine(model, max_num_seqs=4, max_model_len=128, enforce_eager=True)
    assert graphs.runner.prefill.graphs and eager.runner.prefill is None
    params = SamplingParams(temperature=0.0, max_tokens=12)
    for i, n in enumerate((3, 17, 40, 100)):
        prompt = random_prompt(n, generator)
        got = run_engine(graphs, {f"g{i}": (prompt, params)})[f"g{i}"]
        expected = run_engine(eager, {f"e{i}": (prompt, params)})[f"e{i}"]
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids
