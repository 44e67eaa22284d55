"""The OpenAI-compatible server, end to end: a real server process on 127.0.0.1 serving
the real SmolLM2-135M-Instruct, driven by the official `openai` client."""

from __future__ import annotations

import httpx
import pytest

from .test_server_helpers import MAX_MODEL_LEN, MODEL, Server, metric_values, shared_server

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def greedy_completion(client):
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20,
                                     temperature=0)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_answers_paris(client):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION,
                                              max_tokens=24, temperature=0)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_length_and_usage(greedy_completion):
    choice = greedy_completion.choices[0]
    assert greedy_completion.object == "text_completion"
    assert choice.text and choice.finish_reason == "length"
    assert greedy_completion.usage.completion_tokens == 20


def test_token_id_prompt_is_accepted(client):
    response = client.completions.create(model=MODEL, prompt=[504, 1692, 2133, 4179],
                                         max_tokens=3, temperature=0)
    assert response.usage.prompt_tokens == 4
    assert response.usage.completion_tokens == 3


def test_several_prompts_get_their_own_choices(client, greedy_completion):
    response = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"],
                                         max_tokens=20, temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text == greedy_completion.choices[0].text
    assert response.choices[1].text != response.choices[0].text


def _streamed_text(chunks, index: int = 0) -> str:
    return "".join(c.text for chunk in chunks for c in chunk.choices if c.index == index)


def test_streamed_completion_equals_the_whole_one(client, greedy_completion):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20,
                                            temperature=0, stream=True))
    assert _streamed_text(chunks) == greedy_completion.choices[0].text
    assert len(chunks) > 2  # it did stream
    reasons = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert reasons == ["length"]


def test_streamed_chat_equals_the_whole_one_and_reports_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_n_completions_with_a_seed(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, n=3,
                                         temperature=1.0, seed=7)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert response.usage.completion_tokens == 36
    assert len({c.text for c in response.choices}) > 1  # independent samples


def test_n_completions_stream(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=2,
                                            temperature=1.0, seed=3, stream=True))
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=2,
                                      temperature=1.0, seed=3)
    by_index = {c.index: c.text for c in whole.choices}
    assert {i: _streamed_text(chunks, i) for i in (0, 1)} == by_index


def test_stop_string_ends_the_text_before_it(client, greedy_completion):
    full = greedy_completion.choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick another stop string from {full!r}"
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20,
                                         temperature=0, stop=[stop, "@@never@@"])
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[:full.index(stop)]
    assert stop not in choice.text


def test_stop_string_in_a_stream(client, greedy_completion):
    full = greedy_completion.choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20,
                                            temperature=0, stop=stop, stream=True))
    assert _streamed_text(chunks) == full[:full.index(stop)]


def test_completion_logprobs(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                         temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                 logprobs.top_logprobs, strict=True):
        assert len(top) == 3
        assert value <= 0 and all(v <= 0 for v in top.values())
        assert top[token] == pytest.approx(max(top.values()))  # greedy took the top token


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5,
                                              temperature=0, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    assert "".join(e.token for e in content) == response.choices[0].message.content


def test_seed_reproduces_and_different_seeds_differ(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                         temperature=1.0, seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_extra_sampling_fields(client):
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.8, seed=5, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                    "min_tokens": 8, "ignore_eos": True})
    assert response.usage.completion_tokens == 8
    assert response.choices[0].finish_reason == "length"


def test_metrics_exposes_the_named_series(server, client):
    for _ in range(2):  # the second finds the first's full prompt blocks in the cache
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_hit_rate", "num_preemptions_total", "prompt_tokens_total",
                 "generation_tokens_total", "spec_decode_acceptance_rate",
                 "spec_decode_mean_accepted_length", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "engine_step_overhead_ratio"):
        assert f"tessera:{name}" in text, name
    values = metric_values(server.url)
    assert values["tessera:generation_tokens_total"] > 0
    assert values["tessera:prompt_tokens_total"] > 0
    assert 0 <= values["tessera:engine_step_overhead_ratio"] < 1
    # two requests of a 2-token output: at least one prefill and one decode step each
    assert values["tessera:engine_steps_total"] >= 4
    assert 0 <= values["tessera:prefix_cache_hit_rate"] <= 1
    assert values["tessera:prefix_cache_hits_total"] > 0
