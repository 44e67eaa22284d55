"""Sampling features through the engine: seeds independent of the batch, logprobs against a
direct forward, EOS / ignore_eos / min_tokens / stop ids / stop strings, and n > 1
siblings sharing (then copying) the prompt's blocks."""

from __future__ import annotations

import torch

from tessera.serve.sampling_params import SamplingParams

from .helpers import (
    GREEDY,
    FakeTokenizer,
    drain,
    random_prompt,
    reference,
    run_engine,
    with_eos,
)


def full_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each generated position: `[len(output), V]`."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output]))[0]
    return torch.log_softmax(logits[len(prompt) - 1:-1].float(), -1)


def test_seed_reproducible_whatever_the_batch(model, make_engine):
    gen = torch.Generator().manual_seed(20)
    prompt = random_prompt(9, gen)
    params = SamplingParams(temperature=1.0, seed=77, max_tokens=15, ignore_eos=True)
    alone = run_engine(make_engine(model, block_size=4), {"s": (prompt, params)})
    others = {f"o{i}": (random_prompt(4 + 5 * i, gen),
                        SamplingParams(temperature=0.8, max_tokens=10 + i,
                                       seed=i if i % 2 else None)) for i in range(4)}
    mixed = run_engine(make_engine(model, block_size=4, max_num_batched_tokens=16),
                       {**others, "s": (prompt, params)})
    tokens = alone["s"].outputs[0].token_ids
    assert mixed["s"].outputs[0].token_ids == tokens
    assert tokens != reference(model, prompt, 15)  # it sampled, not argmax
    other_seed = run_engine(make_engine(model, block_size=4),
                            {"t": (prompt, params.replace(seed=78))})
    assert other_seed["t"].outputs[0].token_ids != tokens


def test_logprobs_match_a_direct_forward(model, make_engine):
    gen = torch.Generator().manual_seed(21)
    prompt = random_prompt(11, gen)
    out = run_engine(make_engine(model, block_size=4),
                     {"r": (prompt, GREEDY.replace(max_tokens=8, logprobs=4))})
    completion = out["r"].outputs[0]
    want = full_logprobs(model, prompt, completion.token_ids)
    assert len(completion.logprobs) == len(completion.token_ids)
    for i, entry in enumerate(completion.logprobs):
        assert entry.token_id == completion.token_ids[i]
        assert abs(entry.logprob - float(want[i, entry.token_id])) < 1e-4
        top = want[i].topk(4)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely


def eos_model_and_prompt(model):
    """A prompt and a copy of `model` whose EOS is the 4th greedy token of that prompt."""
    gen = torch.Generator().manual_seed(22)
    for _ in range(50):
        prompt = random_prompt(7, gen)
        plain = reference(model, prompt, 12)
        if len(plain) == 12 and plain[3] not in plain[:3]:
            return with_eos(model, (plain[3],)), prompt, plain
    raise AssertionError("no suitable prompt")


def test_eos_ignore_eos_and_min_tokens(model, make_engine):
    eos_model, prompt, plain = eos_model_and_prompt(model)
    eos = plain[3]
    engine = make_engine(eos_model, block_size=4)
    outputs = run_engine(engine, {
        "stops": (prompt, GREEDY.replace(max_tokens=12)),
        "ignores": (prompt, GREEDY.replace(max_tokens=12, ignore_eos=True)),
        "min": (prompt, GREEDY.replace(max_tokens=12, min_tokens=6)),
    })
    stops = outputs["stops"].outputs[0]
    assert stops.token_ids == plain[:4] and stops.finish_reason == "stop"
    assert stops.token_ids == reference(eos_model, prompt, 12)  # the reference stops too
    ignores = outputs["ignores"].outputs[0]
    assert ignores.token_ids == plain and ignores.finish_reason == "length"
    at_least = outputs["min"].outputs[0].token_ids
    assert eos not in at_least[:6] and at_least[:3] == plain[:3]
    assert len(at_least) >= 6


def test_stop_token_ids_end_and_stay_in_the_output(model, make_engine):
    gen = torch.Generator().manual_seed(23)
    prompt = random_prompt(6, gen)
    plain = reference(model, prompt, 12)
    stop = plain[5]
    first = plain.index(stop)
    out = run_engine(make_engine(model), {
        "r": (prompt, GREEDY.replace(max_tokens=12, stop_token_ids=[stop]))})
    completion = out["r"].outputs[0]
    assert completion.token_ids == plain[:first + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)


def test_stop_strings_are_cut_from_the_text(model, make_engine):
    tokenizer = FakeTokenizer()
    gen = torch.Generator().manual_seed(24)
    prompt = random_prompt(8, gen)
    plain = reference(model, prompt, 16)
    text = tokenizer.decode(plain, skip_special_tokens=True)
    stop = text[5:7]
    cut = text.index(stop)
    out = run_engine(make_engine(model, tokenizer, block_size=4), {
        "r": (prompt, GREEDY.replace(max_tokens=16, stop=[stop, "not-there"])),
        "free": (prompt, GREEDY.replace(max_tokens=16)),
    })
    completion = out["r"].outputs[0]
    assert completion.text == text[:cut] and stop not in completion.text
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    # Generation stopped at the token that completed the stop string.
    assert completion.token_ids == plain[:cut + len(stop)]
    assert out["free"].outputs[0].text == text


def test_streamed_text_never_shows_a_stop_string(model, make_engine):
    tokenizer = FakeTokenizer()
    gen = torch.Generator().manual_seed(25)
    prompt = random_prompt(8, gen)
    text = tokenizer.decode(reference(model, prompt, 16), skip_special_tokens=True)
    stop = text[6:9]
    engine = make_engine(model, tokenizer, block_size=4)
    engine.add_request("r", prompt, GREEDY.replace(max_tokens=16, stop=[stop]))
    shown = []
    while engine.has_unfinished():
        for output in engine.step():
            shown.append(output.outputs[0].text)
    assert all(stop not in s for s in shown)
    assert all(a == b[:len(a)] for a, b in zip(shown, shown[1:], strict=False))
    assert shown[-1] == text[:text.index(stop)]


def test_n_siblings_share_prompt_blocks_then_copy_on_write(model, make_engine):
    gen = torch.Generator().manual_seed(26)
    prompt = random_prompt(10, gen)  # blocks of 4: two full, one partial
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, logprobs=0,
                            ignore_eos=True)
    engine = make_engine(model, block_size=4)
    engine.add_request("r", prompt, params)
    engine.step()  # prefill: the siblings fork, sharing every prompt block
    seqs = list(engine.scheduler.running)
    assert len(seqs) == 3 and len({tuple(s.block_table) for s in seqs}) == 1
    bm = engine.block_manager
    assert [bm.blocks[b].ref_count for b in seqs[0].block_table] == [3, 3, 3]
    engine.step()  # each writes its first token into the shared partial block: copies
    tables = [s.block_table for s in seqs]
    assert len({t[2] for t in tables}) == 3
    assert [bm.blocks[b].ref_count for b in tables[0][:2]] == [3, 3]
    outputs = drain(engine)
    completions = outputs["r"].outputs
    assert [c.index for c in completions] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in completions}) > 1
    # Each sibling's logprobs equal a fresh forward: no sibling saw another's keys.
    for completion in completions:
        want = full_logprobs(model, prompt, completion.token_ids)
        got = torch.tensor([e.logprob for e in completion.logprobs])
        torch.testing.assert_close(got, want[torch.arange(12), completion.token_ids],
                                   atol=1e-4, rtol=0)


def test_n_greedy_siblings_all_equal_the_reference(model, make_engine):
    gen = torch.Generator().manual_seed(27)
    prompt = random_prompt(13, gen)
    engine = make_engine(model, block_size=4, num_kv_blocks=12)  # too small for all four
    out = run_engine(engine, {"r": (prompt, GREEDY.replace(n=4, max_tokens=10))})
    want = reference(model, prompt, 10)
    assert [c.token_ids for c in out["r"].outputs] == [want] * 4
    assert engine.stats().num_preemptions > 0  # forked siblings recompute on their own
