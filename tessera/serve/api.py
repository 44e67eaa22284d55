"""The OpenAI-compatible HTTP server: a FastAPI app around an `AsyncEngine`, and `serve`.

    python -m tessera.serve.api smollm2-135m-instruct --port 8000
    curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both stream as SSE with
`"stream": true`), `GET /v1/models`, `GET /health` (503 until the engine thread runs, and
again once shutdown starts), `GET /metrics` (Prometheus, `tessera:` prefix). With an API
key, the `/v1` routes need `Authorization: Bearer <key>`.

The request path: parse and validate (`protocol`), tokenize or apply the chat template
here on the event loop, submit to the engine thread (`async_engine`), then turn its
cumulative outputs into one JSON response or SSE chunks. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (malformed JSON,
wrong types, out-of-range values, an unknown model, a prompt that does not fit the
context), 401 for a missing or wrong API key, 429 when `max_waiting` requests already
wait, 503 while the engine is not running. A client that disconnects has its requests
aborted, which frees their KV blocks.

`serve` loads the model with `tessera.load` (for a CPU model it first tells glibc to keep
freed blocks: `cpu_allocator.py`), builds the engine and runs uvicorn bound to 127.0.0.1
unless told otherwise. On SIGTERM uvicorn stops accepting, waits up to
`GRACEFUL_SHUTDOWN_S` for open requests, then the app aborts what is left and stops the
engine thread; `serve` then returns normally (exit status 0). This module knows nothing
about scheduling or models beyond their tokenizer and limits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import logging
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.errors import ConfigError, RequestError, TesseraError, TokenizerError
from tessera.serve.async_engine import (
    DEFAULT_MAX_WAITING,
    AsyncEngine,
    EngineNotRunningError,
    QueueFullError,
)
from tessera.serve.cli_args import add_serve_arguments
from tessera.serve.config import EngineConfig
from tessera.serve.cpu_allocator import keep_freed_memory
from tessera.serve.engine import LLMEngine
from tessera.serve.metrics import ServerMetrics
from tessera.serve.outputs import RequestOutput
from tessera.serve.protocol import (
    ChatCompletionRequest,
    ChatStreamer,
    CompletionRequest,
    CompletionStreamer,
    ErrorInfo,
    ErrorResponse,
    Limits,
    ModelCard,
    ModelList,
    ProtocolError,
    chat_response,
    check_n,
    check_prompt,
    completion_response,
    parse_request,
    resolve_max_tokens,
)
from tessera.serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An HTTP error answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Any
    model_name: str
    limits: Limits
    metrics: ServerMetrics
    api_key: str | None
    token_text: Callable[[int], str]

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(400, f"model {model!r} is not served here; this server serves "
                           f"{self.model_name!r} (see /v1/models)", param="model",
                           code="model_not_found")

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


# ---------------------------------------------------------------------- app factory
def create_app(model: Any, *, served_model_name: str, tokenizer: Any = None,
               api_key: str | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
               engine_config: EngineConfig | None = None,
               num_threads: int | None = None) -> FastAPI:
    """The app serving `model`: an `LLMEngine`, or a `LoadedModel` (from `tessera.load`)
    for which an engine is built with `engine_config`. The tokenizer defaults to the
    engine's or the loaded model's. The engine thread starts with the app's lifespan and
    sets torch's intra-op threads to `num_threads` (see `async_engine.py`)."""
    engine = model if isinstance(model, LLMEngine) else LLMEngine(
        model.model, model.tokenizer, config=engine_config)
    tokenizer = tokenizer or engine.tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("the server needs a tokenizer (for text prompts and chat); load "
                          "a model directory or GGUF file that has one")
    async_engine = AsyncEngine(engine, max_waiting=max_waiting, num_threads=num_threads)
    state = ServerState(
        engine=async_engine, tokenizer=tokenizer, model_name=served_model_name,
        limits=Limits(max_model_len=engine.max_model_len,
                      vocab_size=engine.model_config.vocab_size,
                      max_n=engine.config.max_num_seqs),
        metrics=ServerMetrics(async_engine, served_model_name), api_key=api_key,
        token_text=functools.lru_cache(maxsize=1 << 16)(
            lambda token_id: tokenizer.decode([token_id])),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()

    app = FastAPI(title="Tessera", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.include_router(_public)
    app.include_router(_v1)
    _add_error_handlers(app)
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _check_api_key(request: Request) -> None:
    expected = _state(request).api_key
    if expected is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(),
                                                               expected.encode()):
        raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


_public = APIRouter()
_v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])


# ---------------------------------------------------------------------- errors
def _error_response(status: int, message: str, *, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"),
                     param=param, code=code)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return _error_response(400, str(exc), param=getattr(exc, "param", None))

    @app.exception_handler(TokenizerError)
    async def bad_messages(request: Request, exc: TokenizerError) -> JSONResponse:
        return _error_response(400, str(exc), param="messages")

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        _state(request).metrics.observe_rejected()
        return _error_response(429, str(exc), code="rate_limit_exceeded")

    @app.exception_handler(EngineNotRunningError)
    async def not_running(request: Request, exc: EngineNotRunningError) -> JSONResponse:
        return _error_response(503, str(exc), code="engine_not_running")

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))


# ---------------------------------------------------------------------- routes
@_public.get("/health")
async def health(request: Request) -> Response:
    if not _state(request).engine.is_running:
        return _error_response(503, "the engine is not running (starting up, shutting "
                               "down, or failed)", code="engine_not_running")
    return Response(status_code=200)


@_public.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@_v1.get("/models")
async def models(request: Request) -> JSONResponse:
    state = _state(request)
    card = ModelCard(id=state.model_name, created=0, max_model_len=state.limits.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump())


@_v1.post("/completions")
async def completions(request: Request) -> Response:
    state = _state(request)
    body = parse_request(CompletionRequest, await request.body())
    state.check_model(body.model)
    check_n(body.n, state.limits)
    prompts = [state.encode(p) for p in body.prompt]
    params = []
    for i, ids in enumerate(prompts):
        check_prompt(ids, state.limits, index=i if len(prompts) > 1 else None)
        max_tokens = resolve_max_tokens(body.max_tokens, len(ids), state.limits,
                                        default=COMPLETIONS_DEFAULT_MAX_TOKENS)
        params.append(body.sampling_params(max_tokens=max_tokens, logprobs=body.logprobs))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    iterators = _submit(state, request_id, prompts, params)
    if body.is_stream:
        streamer = CompletionStreamer(request_id, state.model_name, state.token_text,
                                      include_usage=body.include_usage)
        return _sse_response(state, streamer, request_id, iterators)
    outputs = await _collect(request, state, request_id, iterators)
    return JSONResponse(completion_response(request_id, state.model_name, outputs,
                                            state.token_text).model_dump())


@_v1.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    body = parse_request(ChatCompletionRequest, await request.body())
    state.check_model(body.model)
    check_n(body.n, state.limits)
    messages = [m.for_template() for m in body.messages]
    text = state.tokenizer.apply_chat_template(
        messages, add_generation_prompt=body.add_generation_prompt)
    prompt_ids = state.encode(text)
    check_prompt(prompt_ids, state.limits)
    max_tokens = resolve_max_tokens(body.requested_max_tokens, len(prompt_ids),
                                    state.limits, default=None)
    params = body.sampling_params(max_tokens=max_tokens, logprobs=body.num_logprobs)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    iterators = _submit(state, request_id, [prompt_ids], [params])
    if body.is_stream:
        streamer = ChatStreamer(request_id, state.model_name, state.token_text,
                                include_usage=body.include_usage)
        return _sse_response(state, streamer, request_id, iterators)
    (output,) = await _collect(request, state, request_id, iterators)
    return JSONResponse(chat_response(request_id, state.model_name, output,
                                      state.token_text).model_dump())


# ---------------------------------------------------------------------- engine hand-off
def _submit(state: ServerState, request_id: str, prompts: Sequence[list[int]],
            params: Sequence[SamplingParams]) -> list[AsyncIterator[RequestOutput]]:
    """Submit every prompt (all or none) and return their output iterators."""
    engine = state.engine
    for ids, p in zip(prompts, params, strict=True):
        refusal = engine.engine.refusal_reason(ids, p)  # NOTE: reads only fixed limits
        if refusal is not None:
            raise ProtocolError(refusal, "prompt")
    if not engine.has_capacity(len(prompts)):
        raise QueueFullError(f"{engine.num_waiting} requests are already waiting (the "
                             f"limit is {engine.max_waiting}); retry later")
    iterators = []
    try:
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            iterators.append(engine.generate(f"{request_id}-{i}", ids, p))
    except TesseraError:
        _abort(state, request_id, len(iterators))
        raise
    return iterators


def _abort(state: ServerState, request_id: str, num_prompts: int) -> None:
    for i in range(num_prompts):
        state.engine.abort(f"{request_id}-{i}")


def _check_output(output: RequestOutput) -> RequestOutput:
    if output.error is not None:
        raise ApiError(400, output.error, param="prompt")
    return output


async def _collect(request: Request, state: ServerState, request_id: str,
                   iterators: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The final output of each prompt; aborts them all if the client goes away."""
    async def last(iterator: AsyncIterator[RequestOutput]) -> RequestOutput:
        async for output in iterator:
            if output.finished:
                state.metrics.observe_finished(output)
                return _check_output(output)
        raise EngineNotRunningError("the request ended without a final output")

    work = asyncio.ensure_future(asyncio.gather(*(last(it) for it in iterators)))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientDisconnected
        return work.result()
    finally:
        watcher.cancel()
        work.cancel()
        _abort(state, request_id, len(iterators))  # no-op for the finished ones


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read already: the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------- streaming
class _AbortingStream(StreamingResponse):
    """A streaming response that aborts its requests however it ends (finished,
    disconnected, cancelled before it started)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse_response(state: ServerState, streamer: CompletionStreamer | ChatStreamer,
                  request_id: str, iterators: list[AsyncIterator[RequestOutput]]
                  ) -> StreamingResponse:
    events = _sse_events(state, streamer, iterators)
    return _AbortingStream(events, lambda: _abort(state, request_id, len(iterators)))


async def _sse_events(state: ServerState, streamer: CompletionStreamer | ChatStreamer,
                      iterators: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
    finals: list[RequestOutput] = []
    try:
        async for prompt_index, output in _merge(iterators):
            if output.finished:
                state.metrics.observe_finished(output)
                finals.append(_check_output(output))
            yield "".join(f"data: {c}\n\n" for c in streamer.chunks(prompt_index, output))
        if streamer.include_usage:
            yield f"data: {streamer.usage_chunk(finals)}\n\n"
    except (ApiError, TesseraError) as exc:
        status = exc.status if isinstance(exc, ApiError) else 503
        info = ErrorInfo(message=str(exc), type=ERROR_TYPES[status])
        yield f"data: {ErrorResponse(error=info).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


async def _merge(iterators: list[AsyncIterator[RequestOutput]]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several iterators as they come."""
    if len(iterators) == 1:
        async for output in iterators[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, iterator: AsyncIterator[RequestOutput]) -> None:
        error = None
        try:
            async for output in iterator:
                queue.put_nowait((index, output, None))
        except Exception as exc:  # noqa: BLE001  (re-raised by the reader)
            error = exc
        queue.put_nowait((index, None, error))  # this iterator's end

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get())[1] is not None:
                yield item[0], item[1]
            if item[2] is not None:
                raise item[2]
    finally:
        for task in tasks:
            task.cancel()


# ---------------------------------------------------------------------- serve
def serve(model_source: str, *, host: str = "127.0.0.1", port: int = 8000,
          draft: str | None = None, served_model_name: str | None = None,
          api_key: str | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
          dtype: str | None = None, device: str | None = None, threads: int | None = None,
          log_level: str = "info", **engine_args: Any) -> None:
    """Load `model_source` (and a `draft` model for speculative decoding), build the
    engine from `engine_args` (`EngineConfig` fields) and serve until SIGTERM/SIGINT.
    `threads` sets torch's intra-op threads of the engine thread (default: torch's
    choice, one per core); this thread loads the model single-threaded, so that only the
    engine thread has an OpenMP team (see `async_engine.py`)."""
    import torch

    from tessera.checkpoint.loader import load  # lazy: loading pulls in checkpoint code

    num_threads = threads if threads is not None else torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load(model_source, dtype=dtype, device=device)
    if next(loaded.model.parameters()).device.type == "cpu":
        keep_freed_memory()  # activations reused from the heap, not faulted in again
    draft_model = load(draft, dtype=dtype, device=device).model if draft else None
    if draft_model is not None:
        engine_args.setdefault("speculative_method", "draft")
    engine = LLMEngine(loaded.model, loaded.tokenizer, config=EngineConfig(**engine_args),
                       draft_model=draft_model)
    app = create_app(engine, served_model_name=served_model_name or model_source,
                     tokenizer=loaded.tokenizer, api_key=api_key, max_waiting=max_waiting,
                     num_threads=num_threads)
    _run_uvicorn(app, host=host, port=port, log_level=log_level)


def _run_uvicorn(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM once its graceful shutdown is done; this handler takes it,
    # so a SIGTERM ends `serve` normally instead of killing the process.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise ConfigError(f"the server could not start on {host}:{port} (is the port in "
                          "use?); see the log above")


# ---------------------------------------------------------------------- command line
ENGINE_ARGS = ("speculative_method", "num_speculative_tokens", "max_num_seqs",
               "max_num_batched_tokens", "max_model_len", "block_size", "kv_cache_tokens",
               "enforce_eager", "max_prefill_graph_len", "async_scheduling",
               "fuse_projections", "cpu_prepack")


def serve_from_args(args: argparse.Namespace) -> None:
    """Run `serve` with the options of `add_serve_arguments`; those left out (None) keep
    `serve`'s and `EngineConfig`'s defaults."""
    engine_args = {name: getattr(args, name) for name in ENGINE_ARGS
                   if getattr(args, name) is not None}
    max_waiting = args.max_waiting if args.max_waiting is not None else DEFAULT_MAX_WAITING
    serve(args.model, host=args.host, port=args.port, draft=args.draft,
          served_model_name=args.served_model_name, api_key=args.api_key or None,
          max_waiting=max_waiting, dtype=args.dtype, device=args.device,
          threads=args.threads, log_level=args.log_level, **engine_args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.serve.api",
                                     description="Serve a model over an OpenAI-compatible API")
    add_serve_arguments(parser)
    try:
        serve_from_args(parser.parse_args(argv))
    except TesseraError as exc:
        print(f"tessera: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
