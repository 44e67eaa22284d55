"""Speculative decoding: greedy outputs equal plain decoding (draft model and n-gram), the
accept/reject rule samples the target distribution (chi-square), the draft cache stays
level with the target's, and bad draft setups are refused."""

from __future__ import annotations

import pytest
import torch

from tessera.errors import ConfigError
from tessera.serve.config import EngineConfig
from tessera.serve.engine import LLMEngine
from tessera.serve.sampling_params import SamplingParams
from tessera.serve.speculative import NgramProposer, verify_drafts, verify_greedy

from .helpers import GREEDY, random_prompt, reference, run_engine, tiny_model

V = 8


def greedy_requests(seed: int, lengths: list[int], max_tokens: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {f"r{i}": (random_prompt(n, gen), GREEDY.replace(max_tokens=max_tokens))
            for i, n in enumerate(lengths)}


def assert_matches_reference(model, outputs, requests):
    for request_id, (prompt, params) in requests.items():
        assert outputs[request_id].outputs[0].token_ids == \
            reference(model, prompt, params.max_tokens), request_id


# ---------------------------------------------------------------------- engine parity
@pytest.mark.parametrize("config", [
    dict(block_size=4),
    dict(block_size=4, num_kv_blocks=14, max_num_batched_tokens=12),  # preempts, chunks
])
def test_greedy_with_a_draft_model_equals_plain_decoding(model, draft_model, make_engine,
                                                         config):
    requests = greedy_requests(30, [3, 12, 21, 8], 20)
    engine = make_engine(model, draft_model=draft_model, speculative_method="draft",
                         num_speculative_tokens=3, **config)
    assert_matches_reference(model, run_engine(engine, requests), requests)
    stats = engine.stats()
    assert stats.spec_num_draft_tokens > 0
    assert stats.spec_num_accepted_tokens <= stats.spec_num_draft_tokens
    if "num_kv_blocks" in config:
        assert stats.num_preemptions > 0


def test_greedy_with_ngram_drafts_equals_plain_decoding(model, make_engine):
    requests = greedy_requests(31, [5, 16, 30], 40)
    engine = make_engine(model, block_size=4, speculative_method="ngram",
                         num_speculative_tokens=4, ngram_min=1, ngram_max=3)
    assert_matches_reference(model, run_engine(engine, requests), requests)
    stats = engine.stats()
    assert stats.spec_num_accepted_tokens > 0
    assert stats.spec_mean_accepted_length > 1.0


def test_target_as_its_own_draft_accepts_everything(model, make_engine):
    """Any stale entry in the draft's cache (a missed catch-up, a wrong slot, a lost copy)
    would make the draft disagree with the target somewhere."""
    engine = make_engine(model, draft_model=model, speculative_method="draft",
                         num_speculative_tokens=3, block_size=4, num_kv_blocks=20,
                         max_num_batched_tokens=10)
    first = greedy_requests(32, [9, 14, 6], 24)
    run_engine(engine, first)
    second = {f"again{i}": (prompt + [7], params)
              for i, (prompt, params) in enumerate(first.values())}  # prefix-cache hits
    outputs = run_engine(engine, second)
    assert_matches_reference(model, outputs, second)
    stats = engine.stats()
    assert stats.prefix_cache_hit_tokens > 0 and stats.num_preemptions > 0
    assert stats.spec_acceptance_rate == 1.0
    assert stats.spec_mean_accepted_length == pytest.approx(
        1 + stats.spec_num_accepted_tokens / stats.spec_num_drafts)


def test_fully_accepted_drafts_advance_k_plus_one_tokens_per_step(model, make_engine):
    engine = make_engine(model, draft_model=model, speculative_method="draft",
                         num_speculative_tokens=3, block_size=4)
    prompt, params = greedy_requests(35, [6], 21)["r0"]
    engine.add_request("r", prompt, params.replace(ignore_eos=True))
    num_steps = 0
    while engine.has_unfinished():
        engine.step()
        num_steps += 1
    assert num_steps == 1 + 20 // 4  # the prefill's token, then 4 per verification


def test_sampled_verification_scores_the_right_positions(model, draft_model, make_engine):
    gen = torch.Generator().manual_seed(33)
    prompt = random_prompt(10, gen)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=20, logprobs=0,
                            ignore_eos=True)
    engine = make_engine(model, draft_model=draft_model, speculative_method="draft",
                         num_speculative_tokens=4, block_size=4)
    out = run_engine(engine, {"r": (prompt, params)})["r"].outputs[0]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + out.token_ids]))[0, len(prompt) - 1:-1]
    want = torch.log_softmax(logits.float() / 0.8, -1)[torch.arange(20), out.token_ids]
    torch.testing.assert_close(torch.tensor([e.logprob for e in out.logprobs]), want,
                               atol=1e-4, rtol=0)
    assert engine.stats().spec_num_drafts > 0
    # The same seeded request next to others gives the same tokens.
    others = greedy_requests(34, [7, 15], 12)
    mixed = run_engine(engine, {**others, "r": (prompt, params)})
    assert mixed["r"].outputs[0].token_ids == out.token_ids


def test_bad_draft_setups_are_refused(model):
    other_vocab = tiny_model(2, vocab_size=300)
    with pytest.raises(ConfigError, match="vocabulary"):
        LLMEngine(model, config=EngineConfig(speculative_method="draft"),
                  draft_model=other_vocab)
    with pytest.raises(ConfigError, match="draft_model"):
        LLMEngine(model, config=EngineConfig(speculative_method="draft"))
    with pytest.raises(ConfigError, match="speculative_method"):
        LLMEngine(model, draft_model=model)


# ---------------------------------------------------------------------- proposers
def test_ngram_proposes_what_followed_the_latest_match():
    proposer = NgramProposer(1, 3)
    tokens = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    assert proposer.propose(tokens, 3) == [9, 2, 6]  # "6 7" last seen before "9 2 6"
    assert proposer.propose([1, 2, 3, 4], 3) == []
    assert proposer.propose([4, 4], 5) == [4]


def test_greedy_verification_accepts_the_matching_prefix():
    assert verify_greedy([3, 4, 5, 6], [3, 4, 9]) == [3, 4, 5]
    assert verify_greedy([3, 4, 5, 6], [3, 4, 5]) == [3, 4, 5, 6]
    assert verify_greedy([2, 0], [7]) == [2]


# ---------------------------------------------------------------------- the accept rule
def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    assert expected.min() >= 5, "too few samples per cell for the chi-square test"
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic.double() / 2))


def distributions(seed: int, num: int) -> torch.Tensor:
    logits = torch.randn(num, V, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(0.6 * logits, -1)  # no cell too rare for the test


def sample_pairs(target: torch.Tensor, draft: torch.Tensor | None, num_samples: int, *,
                 k: int = 2, fixed_drafts: list[int] | None = None) -> torch.Tensor:
    """Counts `[V, V]` of the first two tokens emitted by repeated verification, where
    position j's target distribution is target[j] and drafts come from draft[j]."""
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(V, V)
    for _ in range(num_samples):
        tokens: list[int] = []
        while len(tokens) < 2:
            j = len(tokens)
            if fixed_drafts is not None:
                drafts, draft_probs = fixed_drafts, None
            else:
                drafts = [int(torch.multinomial(draft[j + i], 1, generator=gen))
                          for i in range(k)]
                draft_probs = draft[j:j + k]
            tokens += verify_drafts(target[j:j + k + 1], drafts, draft_probs, gen)
        counts[tokens[0], tokens[1]] += 1
    return counts


def test_accepted_tokens_follow_the_target_distribution():
    target = distributions(0, 4)  # position-dependent p, far from the drafts' q
    draft = distributions(1, 4)
    counts = sample_pairs(target, draft, 6000)
    joint = target[0][:, None] * target[1][None, :]
    assert chi_square_p_value(counts.flatten(), joint.flatten()) > 1e-3
    # The test has power: accepting every draft samples q, which it rejects.
    wrong = draft[0][:, None] * draft[1][None, :]
    assert chi_square_p_value(counts.flatten(), wrong.flatten()) < 1e-6


def test_deterministic_drafts_also_follow_the_target():
    target = distributions(2, 4)
    counts = sample_pairs(target, None, 6000, fixed_drafts=[3, 5])
    joint = target[0][:, None] * target[1][None, :]
    assert chi_square_p_value(counts.flatten(), joint.flatten()) > 1e-3
