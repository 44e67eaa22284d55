"""Overlapped steps (`async_scheduling`): placeholders filled on the device equal the real
ids on both runner paths, the sequence bookkeeping of placeholders, device sampling equal
to host sampling, tokens reported one step late, and the fallback to steps in order when
a request needs the host's view of its tokens. (Every engine test also runs overlapped:
see `make_engine`.)"""

from __future__ import annotations

import pytest
import torch

from tessera.serve.config import EngineConfig
from tessera.serve.engine import LLMEngine
from tessera.serve.model_runner import ForwardItem, ModelRunner, StaticDecodeSettings
from tessera.serve.outputs import completion_output
from tessera.serve.placeholders import fill_placeholders, placeholder
from tessera.serve.sampler import Sampler, SamplingRow, samples_on_device
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.sequence import Sequence

from .helpers import EOS, GREEDY, VOCAB, FakeTokenizer, random_prompt, run_engine

BLOCK = 4


@pytest.mark.parametrize("num_ids,num_pending", [(1, 1), (7, 3), (33, 20), (5, 0)])
def test_fill_placeholders_swaps_in_the_pending_rows(num_ids, num_pending):
    gen = torch.Generator().manual_seed(num_ids)
    ids = torch.randint(0, VOCAB, (1, num_ids), generator=gen)
    pending = torch.randint(0, VOCAB, (num_pending,), generator=gen)
    expected = ids.clone()
    if num_pending:
        where = torch.rand(num_ids, generator=gen) < 0.5
        rows = torch.randint(0, num_pending, (num_ids,), generator=gen)
        ids[0, where] = -1 - rows[where]
        expected[0, where] = pending[rows[where]]
    fill_placeholders(ids, pending if num_pending else None)
    assert torch.equal(ids, expected)


def _with_placeholders(items: list[ForwardItem], gen: torch.Generator
                       ) -> tuple[list[ForwardItem], torch.Tensor]:
    """The same items with about half their tokens replaced by placeholders of a shuffled
    pending tensor."""
    tokens = [t for item in items for t in item.token_ids]
    order = torch.randperm(len(tokens), generator=gen).tolist()
    pending = torch.tensor([tokens[i] for i in order])
    row_of = {i: row for row, i in enumerate(order)}
    swapped, flat = [], 0
    for item in items:
        ids = []
        for token in item.token_ids:
            ids.append(placeholder(row_of[flat]) if flat % 2 else token)
            flat += 1
        swapped.append(ForwardItem(item.block_table, item.start, ids, item.num_logits))
    return swapped, pending


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_runner_with_placeholders_equals_real_ids(model, static):
    gen = torch.Generator().manual_seed(5)
    settings = StaticDecodeSettings(max_model_len=64, max_batch_size=8, use_graphs=False)
    runners = [ModelRunner(model, 64, BLOCK, static_decode=settings if static else None)
               for _ in range(2)]
    prompts = [random_prompt(n, gen) for n in (3, 9, 6)]
    tables = [[3 * s, 3 * s + 1, 3 * s + 2, 40 + s] for s in range(3)]
    prefill = [ForwardItem(t, 0, p, 1) for t, p in zip(tables, prompts, strict=True)]
    decode = [ForwardItem(t, len(p), random_prompt(1, gen), 1)
              for t, p in zip(tables, prompts, strict=True)]
    for step in (prefill, decode):
        swapped, pending = _with_placeholders(step, gen)
        if step is decode and static:
            assert runners[1].static.key(swapped) is not None
        expected = runners[0].forward(step)
        got = runners[1].forward(swapped, pending_tokens=pending)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(runners[1].pool.keys, runners[0].pool.keys, rtol=0, atol=0)


def test_sequence_placeholders_resolve_oldest_first_and_drop():
    seq = Sequence("r", [5, 6], GREEDY, max_tokens=8, arrival_time=0.0,
                   detokenizer=None)
    seq.append_token(7, None, 1.0)
    seq.append_placeholder(placeholder(0))
    seq.append_placeholder(placeholder(3))
    assert seq.num_output_tokens == 3 and seq.num_resolved_output_tokens == 1
    assert seq.token_ids == [5, 6, 7, -1, -4]
    assert completion_output(seq).token_ids == [7]  # placeholders are never reported
    seq.resolve_placeholder(9, 2.0)
    assert seq.token_ids == [5, 6, 7, 9, -4] and seq.num_resolved_output_tokens == 2
    seq.drop_placeholders()
    assert seq.token_ids == [5, 6, 7, 9] and seq.output_ids == [7, 9]
    assert seq.num_placeholders == 0 and seq.timings.inter_token_latencies == [1.0]


def test_device_sampling_equals_host_sampling():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    params = [GREEDY, SamplingParams(temperature=0.8, seed=11),
              SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=12),
              SamplingParams(min_p=0.1, seed=13, min_tokens=3)]
    assert all(samples_on_device(p) for p in params)
    assert not samples_on_device(SamplingParams(presence_penalty=0.5))
    assert not samples_on_device(SamplingParams(logprobs=2))

    def rows():  # fresh sequences: fresh seeded generators
        return [SamplingRow(Sequence("r", [3], p, max_tokens=8, arrival_time=0.0))
                for p in params]

    on_host = [token for token, _ in Sampler([EOS]).sample(logits, rows())]
    on_device = Sampler([EOS]).sample_on_device(logits, rows())
    assert on_device.dtype == torch.int64 and on_device.tolist() == on_host


def _first_report_steps(engine: LLMEngine, requests) -> dict[str, int]:
    """For each request, the step whose outputs first carry a token."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    first: dict[str, int] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for output in engine.step():
            if output.outputs[0].token_ids:
                first.setdefault(output.request_id, step)
    return first


def test_overlapped_steps_report_one_step_late(model):
    gen = torch.Generator().manual_seed(6)
    requests = {"a": (random_prompt(5, gen), GREEDY), "b": (random_prompt(9, gen), GREEDY)}
    in_order = LLMEngine(model, config=EngineConfig(block_size=BLOCK, async_scheduling=False))
    overlapped = LLMEngine(model, config=EngineConfig(block_size=BLOCK,
                                                      async_scheduling=True))
    assert _first_report_steps(in_order, requests) == {"a": 1, "b": 1}
    assert _first_report_steps(overlapped, requests) == {"a": 2, "b": 2}
    # A request with penalties needs every token on the host: the engine runs in order.
    with_penalty = {**requests, "c": (random_prompt(4, gen),
                                      GREEDY.replace(repetition_penalty=1.3))}
    assert _first_report_steps(overlapped, with_penalty) == {"a": 1, "b": 1, "c": 1}


def test_overlapped_outputs_equal_in_order_outputs_for_every_kind_of_request(model):
    """Stops seen one step late, penalties and logprobs switching the engine to steps in
    order and back, seeds, n > 1 and a tight KV pool (preemption) all give the outputs
    of steps in order."""
    gen = torch.Generator().manual_seed(9)
    sampled = SamplingParams(temperature=0.9, seed=3, max_tokens=14)
    kinds = [GREEDY, GREEDY.replace(stop_token_ids=(7, 11, 19, 23), max_tokens=30),
             GREEDY.replace(stop=["c", "q"], max_tokens=30), sampled,
             sampled.replace(n=3, seed=4), GREEDY.replace(min_tokens=6, max_tokens=9),
             sampled.replace(frequency_penalty=0.4), GREEDY.replace(logprobs=2)]
    requests = {f"r{i}": (random_prompt(3 + 5 * i % 17, gen), kinds[i % len(kinds)])
                for i in range(12)}
    config = dict(block_size=BLOCK, num_kv_blocks=40, max_num_batched_tokens=24)
    engines = [LLMEngine(model, FakeTokenizer(),
                         config=EngineConfig(async_scheduling=mode, **config))
               for mode in (False, True)]
    results = [run_engine(engine, requests) for engine in engines]
    for engine in engines:
        assert engine.block_manager.is_idle_clean()
        assert engine.stats().num_preemptions > 0
    assert results[1].keys() == results[0].keys() == requests.keys()
    for request_id in requests:
        for got, want in zip(results[1][request_id].outputs, results[0][request_id].outputs,
                             strict=True):
            assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
                (want.token_ids, want.text, want.finish_reason, want.stop_reason), request_id


def test_no_step_computes_past_max_tokens(model):
    """The last token is read one step late, yet no step is spent on a sequence whose
    newest token is its last: as many steps as in order, and the same output."""
    gen = torch.Generator().manual_seed(12)
    requests = {"r": (random_prompt(10, gen), GREEDY.replace(max_tokens=14))}
    results, steps = [], []
    for mode in (False, True):
        engine = LLMEngine(model, config=EngineConfig(block_size=BLOCK, async_scheduling=mode))
        results.append(run_engine(engine, requests)["r"].outputs[0])
        steps.append(engine.stats().num_steps)
    assert results[1].token_ids == results[0].token_ids and len(results[1].token_ids) == 14
    assert results[1].finish_reason == "length"
    assert steps[1] == steps[0] == 14  # one prefill, 13 decodes
