"""Bad requests get OpenAI-shaped errors with the documented status, and the server keeps
serving: a table of malformed requests against a real server, the API key, the waiting
queue's 429, /health before the engine runs, and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from tessera.serve.api import create_app
from tessera.serve.config import EngineConfig
from tessera.serve.engine import LLMEngine

from .helpers import FakeTokenizer, tiny_model
from .test_server_helpers import MAX_MODEL_LEN, MODEL, Server, shared_server, start_server

pytestmark = pytest.mark.slow

KEY = "sk-tessera-test"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
LONG_PROMPT = [100] * (MAX_MODEL_LEN + 10)


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server()


# (path, body, status, param, words in the message)
BAD_REQUESTS = {
    "malformed JSON": (COMPLETIONS, b'{"prompt": "hi", ', 400, None, "not valid JSON"),
    "body not an object": (COMPLETIONS, [1, 2], 400, None, "JSON object"),
    "max_tokens of the wrong type": (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"},
                                     400, "max_tokens", "integer"),
    "negative temperature": (COMPLETIONS, {"prompt": "hi", "temperature": -1}, 400,
                             "temperature", "greater than or equal to 0"),
    "top_p above 1": (COMPLETIONS, {"prompt": "hi", "top_p": 2}, 400, "top_p",
                      "less than or equal to 1"),
    "n of 0": (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    "n above max_num_seqs": (COMPLETIONS, {"prompt": "hi", "n": 100}, 400, "n", "at most"),
    "unknown model": (COMPLETIONS, {"model": "gpt-9", "prompt": "hi"}, 400, "model",
                      "not served here"),
    "prompt longer than the context": (COMPLETIONS, {"prompt": LONG_PROMPT}, 400, "prompt",
                                       f"context of {MAX_MODEL_LEN} tokens"),
    "max_tokens past the context": (COMPLETIONS, {"prompt": "hi", "max_tokens": 5000}, 400,
                                    "max_tokens", "Lower max_tokens"),
    "token id outside the vocabulary": (COMPLETIONS, {"prompt": [1, 10**7]}, 400, "prompt",
                                        "outside"),
    "empty prompt list": (COMPLETIONS, {"prompt": []}, 400, "prompt", "must be a string"),
    "stop of the wrong type": (COMPLETIONS, {"prompt": "hi", "stop": 5}, 400, "stop",
                               "must be a non-empty string"),
    "completion logprobs out of range": (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400,
                                         "logprobs", "less than or equal to 20"),
    "unknown field": (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of",
                      "unknown field"),
    "missing prompt": (COMPLETIONS, {"max_tokens": 3}, 400, "prompt", "prompt is required"),
    "missing messages": (CHAT, {"max_tokens": 3}, 400, "messages", "messages is required"),
    "empty messages": (CHAT, {"messages": []}, 400, "messages", "at least 1"),
    "unknown role": (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400,
                     "messages[0].role", "'user'"),
    "image content": (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
        "messages[0].content", "text only"),
    "stream_options without stream": (CHAT, {"messages": USER, "stream_options": {
        "include_usage": True}}, 400, "stream_options", "stream: true"),
    "top_logprobs out of range": (CHAT, {"messages": USER, "logprobs": True,
                                         "top_logprobs": 30}, 400, "top_logprobs",
                                  "less than or equal to 20"),
    "top_logprobs without logprobs": (CHAT, {"messages": USER, "top_logprobs": 2}, 400,
                                      "top_logprobs", "logprobs: true"),
    "chat prompt longer than the context": (
        CHAT, {"messages": [{"role": "user", "content": "word " * 1200}]}, 400, "prompt",
        "context"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error(server, case):
    path, body, status, param, words = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


def test_server_keeps_serving_after_bad_requests(server):
    for path, body, *_ in BAD_REQUESTS.values():
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(server.url + path, content=content, timeout=60)
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    with server.client() as client:
        response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert response.usage.completion_tokens == 3


def test_openai_client_raises_bad_request(server):
    with server.client() as client, pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert "temperature" in str(info.value)


def test_unknown_route_is_404_in_openai_shape(server):
    response = httpx.get(f"{server.url}/v1/nothing-here", timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------- a second server
@pytest.fixture(scope="module")
def keyed_server():
    """With an API key, one running sequence and one waiting request at most."""
    server = start_server("--max-num-seqs", "1", "--max-waiting", "1", api_key=KEY)
    yield server
    server.stop()


def test_missing_or_wrong_api_key_is_401(keyed_server):
    url = keyed_server.url
    missing = httpx.get(f"{url}/v1/models", timeout=30)
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"},
                      timeout=30)
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    with keyed_server.client() as client:  # the right key
        assert client.completions.create(model=MODEL, prompt="hi",
                                         max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # no key needed
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200


def test_full_waiting_queue_is_429(keyed_server):
    async def burst() -> list[int | str]:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"prompt": "Count to one hundred:", "max_tokens": 24, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=keyed_server.url, headers=headers,
                                     timeout=120) as client:
            responses = await asyncio.gather(
                *(client.post(COMPLETIONS, json=body) for _ in range(5)))
        return [(r.status_code, r.json()) for r in responses]

    results = asyncio.run(burst())
    statuses = [status for status, _ in results]
    # One runs, one waits: of five sent at once, at least three are refused.
    assert statuses.count(429) >= 3 and statuses.count(200) >= 1, statuses
    for status, body in results:
        if status == 429:
            assert body["error"]["code"] == "rate_limit_exceeded"
        else:
            assert body["usage"]["completion_tokens"] == 24
    with keyed_server.client() as client:  # and afterwards it serves again
        assert client.completions.create(model=MODEL, prompt="hi",
                                         max_tokens=2).usage.completion_tokens == 2


def test_sigterm_finishes_the_open_stream_and_exits_0(keyed_server):
    """Last in this module: it stops the keyed server."""
    texts: list[str] = []
    reasons: list[str | None] = []

    def read_stream() -> None:
        with keyed_server.client() as client:
            stream = client.completions.create(model=MODEL, prompt="Once upon a time",
                                               max_tokens=24, stream=True,
                                               extra_body={"ignore_eos": True})
            for chunk in stream:
                texts.append(chunk.choices[0].text)
                reasons.append(chunk.choices[0].finish_reason)

    reader = threading.Thread(target=read_stream)
    reader.start()
    deadline = time.monotonic() + 60
    while not any(texts) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(texts), "the stream never started"
    keyed_server.process.send_signal(signal.SIGTERM)
    assert keyed_server.process.wait(timeout=90) == 0, keyed_server.log()
    reader.join(timeout=30)
    assert reasons[-1] == "length"  # the open request finished before the exit
    assert "Traceback" not in keyed_server.log()


# ---------------------------------------------------------------------- in process
def test_health_is_503_until_the_engine_runs_and_after_it_stops():
    engine = LLMEngine(tiny_model(0), FakeTokenizer(), config=EngineConfig(block_size=4))
    app = create_app(engine, served_model_name="tiny")

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as client:
            statuses = [(await client.get("/health")).status_code]
            statuses.append((await client.post(COMPLETIONS, json={"prompt": [5, 6]}))
                            .status_code)
            async with app.router.lifespan_context(app):
                statuses.append((await client.get("/health")).status_code)
                response = await client.post(COMPLETIONS, json={"prompt": [5, 6],
                                                                "max_tokens": 3})
                statuses.append(response.json()["usage"]["completion_tokens"])
            statuses.append((await client.get("/health")).status_code)
        return statuses

    assert asyncio.run(scenario()) == [503, 503, 200, 3, 503]
    assert not engine.has_unfinished() and engine.block_manager.is_idle_clean()
