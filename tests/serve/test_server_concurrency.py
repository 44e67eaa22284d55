"""Many concurrent streams against one real server: the finished ones are right, the ones
whose clients disconnect are aborted and give their KV blocks back, and the server stays
healthy."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .test_server_helpers import MODEL, Server, shared_server, wait_until_idle

pytestmark = pytest.mark.slow

NUM_CLIENTS = 50
MAX_TOKENS = 8
LONG_MAX_TOKENS = 400  # a disconnecting client's request would run for minutes
PROMPTS = ["The sky is", "My favourite food is", "def fibonacci(n):", "Dear diary,",
           "The best way to learn is"]
BURST_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server()


async def _stream(client, prompt: str, *, disconnect: bool) -> tuple[str, str | None]:
    """The streamed text and finish reason; a disconnecting client closes the stream after
    its first text chunk."""
    max_tokens = LONG_MAX_TOKENS if disconnect else MAX_TOKENS
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    text, reason = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            reason = choice.finish_reason or reason
        if disconnect and text:
            await stream.close()
            return text, "disconnected"
    return text, reason


async def _burst(server: Server) -> list[tuple[str, str | None]]:
    async with server.async_client() as client:
        tasks = [_stream(client, PROMPTS[i % len(PROMPTS)], disconnect=i % 5 == 4)
                 for i in range(NUM_CLIENTS)]
        return await asyncio.wait_for(asyncio.gather(*tasks), BURST_TIMEOUT_S)


def test_fifty_streams_with_disconnects(server):
    with server.client() as client:
        expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS,
                                                 temperature=0, extra_body={"ignore_eos": True})
                    .choices[0].text for p in PROMPTS}
    before = wait_until_idle(server.url)["tessera:generation_tokens_total"]
    results = asyncio.run(_burst(server))
    for i, (text, reason) in enumerate(results):
        if i % 5 == 4:
            assert reason == "disconnected" and text
        else:
            assert reason == "length", (i, text)
            assert text == expected[PROMPTS[i % len(PROMPTS)]], i
    values = wait_until_idle(server.url, timeout=60)
    assert values["tessera:kv_cache_usage_perc"] == 0, values
    assert values["tessera:num_requests_running"] == 0, values
    assert values["tessera:num_requests_waiting"] == 0, values
    # The aborted requests stopped early: far fewer than LONG_MAX_TOKENS tokens each.
    num_aborted = NUM_CLIENTS // 5
    num_generated = values["tessera:generation_tokens_total"] - before
    assert num_generated < (NUM_CLIENTS - num_aborted) * MAX_TOKENS + num_aborted * 50
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    with server.client() as client:
        again = client.completions.create(model=MODEL, prompt=PROMPTS[0],
                                          max_tokens=MAX_TOKENS, temperature=0)
    assert again.choices[0].text == expected[PROMPTS[0]]


def test_non_streaming_disconnect_aborts_the_request(server):
    async def give_up() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=1.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={
                    "prompt": "Tell me a long story.", "max_tokens": LONG_MAX_TOKENS,
                    "ignore_eos": True})

    before = wait_until_idle(server.url)["tessera:generation_tokens_total"]
    asyncio.run(give_up())
    values = wait_until_idle(server.url, timeout=60)
    assert values["tessera:kv_cache_usage_perc"] == 0, values
    assert values["tessera:num_requests_running"] == 0, values
    assert values["tessera:generation_tokens_total"] - before < LONG_MAX_TOKENS
