"""The static decode path (padded buckets, the body of the CUDA graphs) against the eager
path: equal logits, equal pool writes, and equal engine outputs. On CUDA, graph replay
against eager execution."""

from __future__ import annotations

import pytest
import torch

import tessera.serve.engine as engine_module
from tessera.serve.cuda_graphs import batch_buckets
from tessera.serve.model_runner import ForwardItem, ModelRunner, StaticDecodeSettings
from tessera.serve.sampling_params import SamplingParams

from .helpers import GREEDY, random_prompt, reference, run_engine, tiny_model

BLOCK = 4


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def _runners(model, num_blocks: int) -> tuple[ModelRunner, ModelRunner]:
    settings = StaticDecodeSettings(max_model_len=64, max_batch_size=20,
                                    query_lens=(1, 3), use_graphs=False)
    return (ModelRunner(model, num_blocks, BLOCK),
            ModelRunner(model, num_blocks, BLOCK, static_decode=settings))


def _prefill_items(num_seqs: int, generator: torch.Generator) -> list[ForwardItem]:
    """Sequences of odd lengths, each in its own shuffled blocks (room for 12 more tokens)."""
    blocks = torch.randperm(num_seqs * 8, generator=generator).tolist()
    items = []
    for s in range(num_seqs):
        length = int(torch.randint(3, 20, (1,), generator=generator))
        table = blocks[s * 8:(s + 1) * 8][:-(-(length + 12) // BLOCK)]
        items.append(ForwardItem(table, 0, random_prompt(length, generator), 1))
    return items


@pytest.mark.parametrize("num_seqs,q", [(1, 1), (3, 1), (5, 3), (17, 1), (20, 3)])
def test_static_path_equals_eager(num_seqs, q):
    generator = torch.Generator().manual_seed(num_seqs * 10 + q)
    model = tiny_model(0)
    eager, static = _runners(model, num_blocks=20 * 8)
    prefill = _prefill_items(num_seqs, generator)
    for runner in (eager, static):
        runner.forward(prefill)
    # Steps of q new tokens; the rows asking for logits vary (none, the last, all q).
    for step in range(3):
        items = [ForwardItem(p.block_table, len(p.token_ids) + step * q,
                             random_prompt(q, generator), (s + step) % 3 and q or 0)
                 for s, p in enumerate(prefill)]
        if q == 1:
            items = [ForwardItem(i.block_table, i.start, i.token_ids, min(i.num_logits, 1))
                     for i in items]
        assert static.static.key(items) is not None
        expected, got = eager.forward(items), static.forward(items)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    real = slice(0, static.padding_block)  # the padding block may differ; nothing else
    torch.testing.assert_close(static.pool.keys[:, real], eager.pool.keys[:, real])
    torch.testing.assert_close(static.pool.values[:, real], eager.pool.values[:, real])


def test_non_uniform_batches_take_the_eager_path():
    model = tiny_model(0)
    _, static = _runners(model, num_blocks=16)
    mixed = [ForwardItem([0], 0, [5], 1), ForwardItem([1], 0, [5, 6], 1)]
    too_long = [ForwardItem([0, 1], 0, list(range(2, 7)), 1)]
    too_many = [ForwardItem([b], 0, [5], 1) for b in range(21)]
    for items in (mixed, too_long, too_many):
        assert static.static.key(items) is None


@pytest.fixture
def static_engines(monkeypatch):
    """Engines whose decode steps take the static path eagerly, as graphs would on CUDA."""
    def settings(config, model, max_model_len, query_lens):
        return StaticDecodeSettings(max_model_len=max_model_len, query_lens=tuple(query_lens),
                                    max_batch_size=min(config.max_num_seqs, 8),
                                    use_graphs=False)

    monkeypatch.setattr(engine_module, "static_decode_settings", settings)


def test_engine_on_the_static_path_matches_generate(model, make_engine, static_engines):
    generator = torch.Generator().manual_seed(3)
    prompts = {f"r{i}": random_prompt(n, generator) for i, n in enumerate((3, 9, 17, 5, 30,
                                                                          12, 7, 21, 4, 11))}
    engine = make_engine(model, block_size=BLOCK, max_num_seqs=10, max_model_len=96)
    assert engine.runner.static is not None
    outputs = run_engine(engine, {r: (p, GREEDY) for r, p in prompts.items()})
    for request_id, prompt in prompts.items():
        assert outputs[request_id].outputs[0].token_ids == reference(model, prompt, 16)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_speculation_on_the_static_path_matches_generate(model, draft_model, make_engine,
                                                         static_engines, method):
    generator = torch.Generator().manual_seed(4)
    base = random_prompt(6, generator)
    prompts = {f"r{i}": base * 3 + random_prompt(i + 1, generator) for i in range(5)}
    engine = make_engine(model, block_size=BLOCK, max_num_seqs=5, max_model_len=96,
                         speculative_method=method, num_speculative_tokens=3,
                         draft_model=draft_model if method == "draft" else None)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    outputs = run_engine(engine, {r: (p, params) for r, p in prompts.items()})
    for request_id, prompt in prompts.items():
        assert outputs[request_id].outputs[0].token_ids == reference(model, prompt, 20)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    generator = torch.Generator().manual_seed(7)
    model = tiny_model(0).to("cuda", torch.bfloat16)
    settings = dict(max_model_len=64, max_batch_size=20, query_lens=(1, 3))
    graphs = ModelRunner(model, 160, BLOCK,
                         static_decode=StaticDecodeSettings(**settings, use_graphs=True))
    eager = ModelRunner(model, 160, BLOCK,
                        static_decode=StaticDecodeSettings(**settings, use_graphs=False))
    graphs.capture_graphs()
    assert len(graphs.static.graphs) == 2 * len(batch_buckets(20))
    for num_seqs, q in ((1, 1), (7, 1), (20, 1), (5, 3)):
        prefill = _prefill_items(num_seqs, generator)
        for runner in (eager, graphs):
            runner.forward(prefill)
        items = [ForwardItem(p.block_table, len(p.token_ids), random_prompt(q, generator), q)
                 for p in prefill]
        torch.testing.assert_close(graphs.forward(items), eager.forward(items),
                                   rtol=0, atol=0)


@pytest.mark.gpu
def test_engine_with_cuda_graphs_matches_eager_engine(make_engine):
    generator = torch.Generator().manual_seed(8)
    model = tiny_model(0).to("cuda", torch.bfloat16)
    prompts = {f"r{i}": random_prompt(n, generator) for i, n in enumerate((3, 9, 17, 5, 30))}
    requests = {r: (p, SamplingParams(temperature=0.0, max_tokens=24))
                for r, p in prompts.items()}
    graphs = make_engine(model, max_num_seqs=8, max_model_len=128)
    eager = make_engine(model, max_num_seqs=8, max_model_len=128, enforce_eager=True)
    assert graphs.runner.static.graphs and eager.runner.static is None
    got, expected = run_engine(graphs, requests), run_engine(eager, requests)
    for request_id in prompts:
        assert got[request_id].outputs[0].token_ids == expected[request_id].outputs[0].token_ids


def test_warm_up_touches_no_block_past_the_budget(model):
    """Warm-up prefills write only the first blocks of the pool, and never the padding
    block; afterwards the runner still computes the same logits."""
    runner = ModelRunner(model, 12, BLOCK)
    before = runner.pool.keys.clone()
    runner.warm_up(max_num_tokens=40)  # 40 tokens: blocks 0..9 at most
    changed = (runner.pool.keys != before).flatten(2).any(-1).any(0)  # [blocks]
    assert changed[:10].all() and not changed[10:].any()
    assert runner.timer.seconds == 0.0  # warm-up is not counted as serving time
    item = ForwardItem([3, 7], 0, [5, 9, 11, 2, 8], 1)
    fresh = ModelRunner(model, 12, BLOCK)
    torch.testing.assert_close(runner.forward([item]), fresh.forward([item]))


def test_capture_warm_up_attends_long_padding_contexts_inside_the_padding_block(model):
    """The warm-up before a capture (which tunes the paged kernel) has its padding rows
    attend over many positions: it reads and writes the padding block only."""
    _, static = _runners(model, num_blocks=20)
    before = static.pool.keys.clone(), static.pool.values.clone()
    static.static._fill([], 4, 3, padding_context=40)
    assert static.static.buffers.context_lens[:4].tolist() == [40] * 4
    logits = static.static._run_static(4, 3)
    assert torch.isfinite(logits).all()
    real = slice(0, static.padding_block)
    assert torch.equal(static.pool.keys[:, real], before[0][:, real])
    assert torch.equal(static.pool.values[:, real], before[1][:, real])
