"""Sampler: each penalty against a direct computation, min_tokens, the truncation masks,
greedy, seeded draws independent of the batch, and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.errors import RequestError
from tessera.serve.sampler import Sampler, SamplingRow, truncate
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.sequence import Sequence

V = 16
EOS = 1


def row(params: SamplingParams, prompt=(3, 4, 4, 9), output=(), drafts=()) -> SamplingRow:
    seq = Sequence("r", list(prompt), params, max_tokens=params.max_tokens, arrival_time=0.0)
    for token in output:
        seq.append_token(token, None, 0.0)
    return SamplingRow(seq, tuple(drafts))


def random_logits(num_rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_definition():
    logits = random_logits()
    r = row(SamplingParams(repetition_penalty=1.7), output=(5, 5, 11))
    got = Sampler([EOS]).process(logits, [r])[0]
    want = logits[0].clone()
    for token in {3, 4, 9, 5, 11}:  # prompt and output tokens, each once
        want[token] = want[token] / 1.7 if want[token] > 0 else want[token] * 1.7
    torch.testing.assert_close(got, want)


def test_presence_and_frequency_penalties_count_output_only():
    logits = random_logits()
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    r = row(params, output=(5, 5, 11), drafts=(5,))  # drafts count as generated
    got = Sampler([EOS]).process(logits, [r])[0]
    want = logits[0].clone()
    for token, count in {5: 3, 11: 1}.items():
        want[token] -= 0.5 + 0.25 * count
    torch.testing.assert_close(got, want)  # prompt tokens 3, 4, 9 untouched


def test_temperature_divides_logits_and_greedy_does_not():
    logits = random_logits(2)
    rows = [row(SamplingParams(temperature=0.5)), row(SamplingParams(temperature=0.0))]
    got = Sampler([EOS]).process(logits, rows)
    torch.testing.assert_close(got, torch.stack([logits[0] / 0.5, logits[1]]))


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached():
    logits = random_logits()
    params = SamplingParams(min_tokens=3, stop_token_ids=[7], max_tokens=8)
    before = Sampler([EOS]).process(logits, [row(params, output=(2, 2))])[0]
    assert before[EOS] == -math.inf and before[7] == -math.inf
    assert torch.isfinite(before[[i for i in range(V) if i not in (EOS, 7)]]).all()
    after = Sampler([EOS]).process(logits, [row(params, output=(2, 2, 2))])[0]
    assert torch.isfinite(after).all()
    ignoring = Sampler([EOS]).process(logits, [row(params.replace(ignore_eos=True))])[0]
    assert ignoring[EOS] != -math.inf and ignoring[7] == -math.inf


def test_top_k_top_p_min_p_masks():
    logits = random_logits(4, seed=1)
    probs = torch.softmax(logits, -1)
    out = truncate(logits, top_k=torch.tensor([3.0, V, V, 5.0]),
                   top_p=torch.tensor([1.0, 0.6, 1.0, 0.6]),
                   min_p=torch.tensor([0.0, 0.0, 0.2, 0.0]))
    kept = torch.isfinite(out)
    assert set(kept[0].nonzero().flatten().tolist()) == set(logits[0].topk(3).indices.tolist())
    # top-p: the smallest most-likely set whose mass reaches p.
    order = probs[1].argsort(descending=True).tolist()
    mass, nucleus = 0.0, set()
    for token in order:
        nucleus.add(token)
        mass += float(probs[1, token])
        if mass >= 0.6:
            break
    assert set(kept[1].nonzero().flatten().tolist()) == nucleus
    assert kept[2].tolist() == (probs[2] >= 0.2 * probs[2].max()).tolist()
    # top-k then top-p over the renormalised top 5.
    top5 = probs[3].topk(5)
    renorm = top5.values / top5.values.sum()
    num_kept = int((renorm.cumsum(0) - renorm < 0.6).sum())
    assert set(kept[3].nonzero().flatten().tolist()) == set(top5.indices[:num_kept].tolist())
    torch.testing.assert_close(out[kept], logits[kept])


def test_distribution_is_one_hot_for_greedy_rows():
    logits = random_logits(2)
    rows = [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=1.0))]
    probs = Sampler([EOS]).distribution(Sampler([EOS]).process(logits, rows), rows)
    assert probs[0].tolist() == torch.nn.functional.one_hot(logits[0].argmax(), V).float().tolist()
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], -1))


def test_greedy_sample_is_argmax_of_penalised_logits():
    logits = random_logits()
    best = int(logits[0].argmax())
    params = SamplingParams(temperature=0.0, repetition_penalty=100.0)
    [(token, _)] = Sampler([EOS]).sample(logits, [row(params, prompt=(best,))])
    assert token != best and token == int(logits[0].masked_fill(
        torch.arange(V) == best, -math.inf).argmax())


def test_seeded_draws_do_not_depend_on_the_batch():
    logits = random_logits(3, seed=2)
    params = SamplingParams(temperature=1.0, seed=1234)
    sampler = Sampler([EOS])

    def draws(batch_rows, logits_rows, index):
        return [sampler.sample(logits_rows, batch_rows)[index][0] for _ in range(20)]

    alone = draws([row(params)], logits[:1], 0)
    others = [row(SamplingParams(temperature=1.0)), row(SamplingParams(temperature=0.7, seed=9))]
    batched = draws([others[0], row(params), others[1]], logits[[1, 0, 2]], 1)
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    r = row(SamplingParams(temperature=1.0, seed=5))
    sampler = Sampler([EOS])
    counts = torch.zeros(V)
    for _ in range(4000):
        counts[sampler.sample(logits, [r])[0][0]] += 1
    torch.testing.assert_close(counts / 4000, torch.softmax(logits[0], -1), atol=0.03, rtol=0)


def test_logprobs_are_log_softmax_of_processed_logits():
    logits = random_logits(2, seed=4)
    params = SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.3)
    rows = [row(params), row(SamplingParams(temperature=0.5))]
    sampler = Sampler([EOS])
    (token, lp), (_, none) = sampler.sample(logits, rows)
    want = torch.log_softmax(sampler.process(logits, rows)[0], -1)
    assert none is None and lp.token_id == token
    assert lp.logprob == pytest.approx(float(want[token]), abs=1e-5)
    top = want.topk(3)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("top_k", 2.5), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("max_tokens", 0),
    ("min_tokens", -1), ("n", 0), ("logprobs", -1), ("seed", -5), ("stop", [""]),
    ("stop_token_ids", [-1]), ("ignore_eos", "yes"), ("output_kind", "delta"),
])
def test_bad_sampling_params_are_refused_by_name(field, value):
    with pytest.raises(RequestError, match=field.split("_ids")[0]):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(stop="x").stop == ("x",)
