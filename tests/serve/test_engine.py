"""The engine's greedy outputs equal plain generation under every scheduling path (plain,
prefix-cache hits, preemption, chunked prefill, mixed batches, staggered arrivals), refused
and aborted requests, and the idle leak check. Every engine is checked for leaked blocks
when its test ends (`make_engine`)."""

from __future__ import annotations

import pytest
import torch

from tessera.errors import ConfigError, RequestError
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.sequence import Sequence

from .helpers import EOS, GREEDY, drain, random_prompt, reference, run_engine


def greedy(max_tokens: int) -> SamplingParams:
    return GREEDY.replace(max_tokens=max_tokens)


def assert_matches_reference(model, outputs, requests):
    for request_id, (prompt, params) in requests.items():
        got = outputs[request_id].outputs[0].token_ids
        assert got == reference(model, prompt, params.max_tokens), request_id


def spy_on_schedule(engine) -> list:
    """Record every scheduled batch (test-only wrapper around the scheduler)."""
    batches = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        batches.append([(e.seq.request_id, e.num_tokens, e.seq.is_decoding)
                        for e in batch.entries])
        return batch

    engine.scheduler.schedule = recording
    return batches


def test_plain_batch_matches_generate(model, make_engine):
    gen = torch.Generator().manual_seed(1)
    requests = {f"r{i}": (random_prompt(n, gen), greedy(m))
                for i, (n, m) in enumerate([(1, 12), (5, 20), (16, 7), (29, 16), (40, 1)])}
    engine = make_engine(model, block_size=4)
    batches = spy_on_schedule(engine)
    outputs = run_engine(engine, requests)
    engine.step()  # nothing left: an empty step, not counted
    assert_matches_reference(model, outputs, requests)
    stats = engine.stats()
    assert stats.num_steps == sum(1 for batch in batches if batch) > 0
    assert len(batches) > stats.num_steps
    assert stats.num_preemptions == 0
    assert stats.num_prompt_tokens == sum(len(p) for p, _ in requests.values())
    assert stats.num_generation_tokens == sum(len(o.outputs[0].token_ids)
                                              for o in outputs.values())
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outputs.values())


def test_prefix_cache_hits_keep_outputs(model, make_engine):
    gen = torch.Generator().manual_seed(2)
    shared = random_prompt(21, gen)
    first = {f"a{i}": (shared + random_prompt(3 + i, gen), greedy(10)) for i in range(3)}
    second = {f"b{i}": (shared + random_prompt(5 + i, gen), greedy(10)) for i in range(3)}
    second["same"] = first["a1"]
    engine = make_engine(model, block_size=4)
    outputs = run_engine(engine, first)
    hits_first = engine.stats().prefix_cache_hit_tokens
    outputs.update(run_engine(engine, second))
    assert_matches_reference(model, outputs, {**first, **second})
    stats = engine.stats()
    assert stats.prefix_cache_hit_tokens - hits_first >= 3 * 20  # 5 full shared blocks each
    assert outputs["same"].metrics.num_cached_tokens >= 20
    assert 0 < stats.prefix_cache_hit_rate < 1


def test_hash_collisions_do_not_corrupt_outputs(model, make_engine):
    gen = torch.Generator().manual_seed(3)
    requests = {f"r{i}": (random_prompt(n, gen), greedy(12)) for i, n in enumerate([9, 14, 9])}
    engine = make_engine(model, block_size=4)
    engine.block_manager.hash_fn = lambda parent, tokens: 7  # every block collides
    assert_matches_reference(model, run_engine(engine, requests), requests)
    assert_matches_reference(model, run_engine(engine, {"again": requests["r1"]}),
                             {"again": requests["r1"]})


def test_preemption_by_recompute_keeps_outputs(model, make_engine):
    gen = torch.Generator().manual_seed(4)
    requests = {f"r{i}": (random_prompt(n, gen), greedy(24)) for i, n in enumerate([10, 7, 13, 5])}
    engine = make_engine(model, block_size=4, num_kv_blocks=12)  # 48 slots for ~130 tokens
    outputs = run_engine(engine, requests)
    assert_matches_reference(model, outputs, requests)
    assert engine.stats().num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outputs.values()) > 0


def test_preemption_without_prefix_caching(model, make_engine):
    gen = torch.Generator().manual_seed(5)
    requests = {f"r{i}": (random_prompt(n, gen), greedy(20)) for i, n in enumerate([6, 11, 9])}
    engine = make_engine(model, block_size=4, num_kv_blocks=10, enable_prefix_caching=False)
    outputs = run_engine(engine, requests)
    assert_matches_reference(model, outputs, requests)
    assert engine.stats().num_preemptions > 0
    assert engine.stats().prefix_cache_hit_tokens == 0


def test_chunked_prefill_splits_prompts_and_keeps_decoding(model, make_engine):
    gen = torch.Generator().manual_seed(6)
    engine = make_engine(model, block_size=4, max_num_batched_tokens=8)
    batches = spy_on_schedule(engine)
    short = random_prompt(3, gen)
    engine.add_request("short", short, greedy(20))
    outputs = drain_after(engine, steps=2)
    long_prompt = random_prompt(45, gen)
    engine.add_request("long", long_prompt, greedy(8))
    outputs.update(drain(engine))
    assert_matches_reference(model, outputs, {"short": (short, greedy(20)),
                                              "long": (long_prompt, greedy(8))})
    long_chunks = [n for batch in batches for rid, n, decoding in batch
                   if rid == "long" and not decoding]
    assert len(long_chunks) >= 6 and sum(long_chunks) == 45  # split across steps
    assert all(sum(n for _, n, _ in batch) <= 8 for batch in batches)
    # While the long prompt was prefilled, the short request decoded every step.
    prefill_steps = [b for b in batches if any(r == "long" and not d for r, _, d in b)]
    assert all(any(r == "short" for r, _, _ in b) for b in prefill_steps[:5])


def drain_after(engine, steps: int) -> dict:
    final = {}
    for _ in range(steps):
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    return final


def test_without_chunked_prefill_prompts_run_whole(model, make_engine):
    gen = torch.Generator().manual_seed(7)
    requests = {f"r{i}": (random_prompt(n, gen), greedy(6)) for i, n in enumerate([20, 9, 30])}
    engine = make_engine(model, block_size=4, max_num_batched_tokens=40,
                         enable_chunked_prefill=False)
    batches = spy_on_schedule(engine)
    assert_matches_reference(model, run_engine(engine, requests), requests)
    prompt_chunks = {rid: n for batch in batches for rid, n, d in batch if not d}
    assert prompt_chunks == {rid: len(p) for rid, (p, _) in requests.items()}


def test_mixed_batch_with_staggered_arrivals(model, make_engine):
    gen = torch.Generator().manual_seed(8)
    engine = make_engine(model, block_size=8, max_num_seqs=3, max_num_batched_tokens=24,
                         num_kv_blocks=20)
    requests = {f"r{i}": (random_prompt(n, gen), greedy(m))
                for i, (n, m) in enumerate([(2, 30), (37, 5), (11, 17), (25, 9), (4, 1),
                                            (60, 12), (8, 25)])}
    outputs = {}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
        for _ in range(3):
            for output in engine.step():
                assert engine.stats().num_running <= 3
                assert output.outputs[0].token_ids  # prefill chunks report nothing
                if output.finished:
                    outputs[output.request_id] = output
    outputs.update(drain(engine))
    assert_matches_reference(model, outputs, requests)


def test_final_only_requests_report_once_with_everything(model, make_engine):
    gen = torch.Generator().manual_seed(9)
    prompts = [random_prompt(n, gen) for n in (7, 19, 3)]
    engine = make_engine(model, block_size=4)
    for i, prompt in enumerate(prompts):
        kind = "final_only" if i < 2 else "cumulative"
        engine.add_request(f"r{i}", prompt, greedy(6 + 3 * i).replace(output_kind=kind))
    reports: dict[str, list] = {}
    while engine.has_unfinished():
        for output in engine.step():
            reports.setdefault(output.request_id, []).append(output)
    assert [len(reports[f"r{i}"]) for i in range(3)] == [1, 1, 12]  # 12 tokens, 12 steps
    for i, prompt in enumerate(prompts):
        final = reports[f"r{i}"][-1]
        assert final.finished and final.prompt_ids == prompt
        assert final.outputs[0].token_ids == reference(model, prompt, 6 + 3 * i)
        assert len(final.metrics.inter_token_latencies) == 5 + 3 * i


def test_context_limit_caps_generation(model, make_engine):
    gen = torch.Generator().manual_seed(9)
    prompt = random_prompt(250, gen)  # the model's context is 256
    engine = make_engine(model, block_size=16)
    outputs = run_engine(engine, {"r": (prompt, greedy(50))})
    tokens, finish = outputs["r"].outputs[0].token_ids, outputs["r"].outputs[0].finish_reason
    assert tokens == reference(model, prompt, 50)
    assert (finish, len(tokens)) == ("length", 6) or (finish == "stop" and tokens[-1] == EOS)


@pytest.mark.parametrize("length,params,config,match", [
    (256, greedy(4), {}, "context"),  # the prompt fills the whole context
    (30, greedy(40), {"num_kv_blocks": 4, "block_size": 8}, "KV cache"),  # 70 > 32 slots
    (30, greedy(40), {"enable_chunked_prefill": False, "max_num_batched_tokens": 64},
     "max_num_batched_tokens"),
    (5, greedy(4).replace(n=3), {"max_num_seqs": 2}, "max_num_seqs"),
])
def test_requests_that_can_never_fit_finish_at_once(model, make_engine, length, params,
                                                    config, match):
    engine = make_engine(model, **config)
    prompt = [2 + i % 200 for i in range(length)]
    engine.add_request("big", prompt, params)
    engine.add_request("ok", [5, 6, 7], greedy(3))
    first = engine.step()
    refused = [o for o in first if o.request_id == "big"]
    assert len(refused) == 1 and refused[0].finished
    assert refused[0].outputs[0].finish_reason == "error" and match in refused[0].error
    assert refused[0].outputs[0].token_ids == []
    assert engine.refusal_reason(prompt, params) is not None
    assert engine.refusal_reason([5, 6, 7], greedy(3)) is None
    drain(engine)


def test_abort_frees_blocks(model, make_engine):
    gen = torch.Generator().manual_seed(10)
    engine = make_engine(model, block_size=4)
    engine.add_request("a", random_prompt(30, gen), greedy(40))
    engine.add_request("b", random_prompt(12, gen), greedy(40))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request("a")
    engine.abort_request("a")  # twice is harmless
    assert engine.stats().num_running == 1
    engine.abort_request("b")
    assert not engine.has_unfinished()
    assert engine.block_manager.is_idle_clean()
    assert engine.step() == []


def test_abort_of_a_waiting_request(model, make_engine):
    engine = make_engine(model, block_size=4, max_num_seqs=1)
    engine.add_request("a", [3, 4, 5], greedy(5))
    engine.add_request("b", [3, 4, 6], greedy(5))
    engine.step()
    assert engine.stats().num_waiting == 1
    engine.abort_request("b")
    outputs = drain(engine)
    assert set(outputs) == {"a"}


def test_leak_check_raises_when_idle(model, make_engine):
    engine = make_engine(model, block_size=4)
    run_engine(engine, {"r": ([3, 4, 5], greedy(2))})
    stray = Sequence("stray", [3, 4, 5], greedy(2), max_tokens=2, arrival_time=0.0)
    engine.block_manager.allocate(stray)  # simulate a bug: blocks nobody will free
    with pytest.raises(RuntimeError, match="KV block leak"):
        engine.step()
    engine.block_manager.free(stray)  # undo, so the fixture's own leak check passes


def test_bad_requests_raise(model, make_engine):
    engine = make_engine(model)
    engine.add_request("x", [1, 2], greedy(2))
    with pytest.raises(RequestError, match="already"):
        engine.add_request("x", [1, 2], greedy(2))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("y", [], greedy(2))
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("y", [1, 999], greedy(2))
    with pytest.raises(RequestError, match="tokenizer"):
        engine.add_request("y", [1, 2], SamplingParams(stop=["ab"]))
    drain(engine)


def test_bad_engine_configs_raise(model):
    from tessera.serve.config import EngineConfig

    for bad in [dict(block_size=0), dict(num_kv_blocks=4, kv_cache_tokens=64),
                dict(speculative_method="medusa"), dict(max_num_seqs=-1),
                dict(speculative_method="ngram", max_num_batched_tokens=4,
                     num_speculative_tokens=4)]:
        with pytest.raises(ConfigError):
            EngineConfig(**bad)
