"""`AsyncEngine`: the `LLMEngine` on its own thread, fed and read by asyncio code.

One engine-core thread owns the `LLMEngine` (which is not thread-safe: after `start` no
other thread calls it). Callers on the event loop submit `(request_id, prompt_ids,
SamplingParams)` and aborts through a thread-safe queue; the core loop drains that queue,
runs `step()`, and hands the step's outputs to the event loop with one
`loop.call_soon_threadsafe` per step. Each request has a `RequestStream` that keeps its
newest output: outputs are cumulative, so a reader that falls behind skips intermediate
ones and loses nothing. `generate` is the per-request async generator; leaving it early
(the client went away, the task was cancelled) aborts the request, which frees its blocks.

Admission: a request is *waiting* from `submit` until its first output (the step that
first scheduled it); when `max_waiting` requests wait, `submit` raises `QueueFullError`
(the server answers 429). Tokenizing, chat templates and JSON stay with the caller; the
core thread only runs the engine (whose detokenizer produces the text that stop strings
need).

Stats: the core thread publishes an `EngineStats` snapshot after every loop iteration (a
reference swap), so readers never touch the engine. `busy_seconds` is the core loop's
time spent on commands, steps and hand-off; with the engine's `step_seconds` and
`forward_seconds` it splits the loop's time into model forwards, the rest of `step()` and
the loop's own overhead.

Threads: with `num_threads`, the core thread sets torch's intra-op threads to it before
its first step. OpenMP keeps a team of worker threads per thread that runs parallel
regions; a second team (the main thread's, from loading the model) slowed the core
thread's regions down (2-core host: a single-stream decode step 35 ms on the main thread,
57 ms on a second thread after the main one had run parallel work), so `serve` loads the
model single-threaded and leaves the parallelism to the core thread.

Shutdown: `shutdown` stops accepting, aborts what is still in flight and joins the
thread. It knows nothing about HTTP, JSON, tokenizers or chat templates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from tessera.errors import ConfigError, RequestError, TesseraError
from tessera.serve.engine import EngineStats, LLMEngine
from tessera.serve.outputs import RequestOutput
from tessera.serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_WAITING = 128
STATS_INTERVAL_S = 0.05


class QueueFullError(TesseraError):
    """Too many requests are waiting; retry later."""


class EngineNotRunningError(TesseraError):
    """The engine thread is not running (not started yet, stopped, or it failed)."""


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


_STOP = object()


@dataclass(frozen=True)
class AsyncEngineStats:
    engine: EngineStats
    num_waiting: int  # requests submitted that have not produced an output yet
    num_in_flight: int  # requests submitted and not finished
    busy_seconds: float  # core loop time on commands, steps and hand-off


class RequestStream:
    """The newest cumulative output of one request, awaited on the event loop."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.is_started = False  # an output arrived: the engine scheduled it
        self.is_finished = False
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self.is_started = True
        self.is_finished = output.finished
        self._latest = output
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self.is_finished = True
        self._error = error
        self._ready.set()

    async def next(self) -> RequestOutput:
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            raise self._error
        assert self._latest is not None
        return self._latest


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_waiting: int = DEFAULT_MAX_WAITING,
                 num_threads: int | None = None):
        if max_waiting < 1:
            raise ConfigError(f"max_waiting must be >= 1, got {max_waiting}")
        if num_threads is not None and num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.num_threads = num_threads
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._is_accepting = False
        self._error: BaseException | None = None
        self._stats = engine.stats()
        self._stats_time = time.monotonic()
        self._busy_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the core thread; call on the event loop that will read the outputs."""
        assert self._thread is None, "the engine thread was already started"
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tessera-engine", daemon=True)
        self._thread.start()
        self._is_accepting = True

    @property
    def is_running(self) -> bool:
        return self._is_accepting and self._thread is not None and self._thread.is_alive()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, abort what is in flight, stop and join the core thread."""
        self._is_accepting = False
        stopped = EngineNotRunningError("the server is shutting down")
        for stream in list(self._streams.values()):
            self.abort(stream.request_id)
            stream.fail(stopped)
        if self._thread is not None:
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                logger.error("the engine thread did not stop within %.0f s", timeout)

    # ------------------------------------------------------------------ requests
    def submit(self, request_id: str, prompt_ids: Sequence[int],
               params: SamplingParams) -> RequestStream:
        """Queue a request for the core thread; call on the event loop."""
        self._check_accepting()
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in flight")
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"{self.num_waiting} requests are already waiting (the "
                                 f"limit is {self.max_waiting}); retry later")
        stream = RequestStream(request_id)
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, list(prompt_ids), params, time.monotonic()))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (unknown or finished ids are ignored)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.is_finished:
            self._commands.put(_Abort(request_id))

    def generate(self, request_id: str, prompt_ids: Sequence[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit now (so a full queue raises here), then iterate the request's outputs as
        they come, the last one finished. Leaving the iteration early (break, an
        exception, cancellation) aborts the request."""
        return self._outputs(self.submit(request_id, prompt_ids, params))

    async def _outputs(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                output = await stream.next()
                yield output
                if output.finished:
                    return
        finally:
            self.abort(stream.request_id)

    def has_capacity(self, num_requests: int) -> bool:
        return self.num_waiting + num_requests <= self.max_waiting

    @property
    def num_waiting(self) -> int:
        return sum(not s.is_started for s in self._streams.values())

    def stats(self) -> AsyncEngineStats:
        return AsyncEngineStats(self._stats, self.num_waiting, len(self._streams),
                                self._busy_seconds)

    def _check_accepting(self) -> None:
        if self._error is not None:
            raise EngineNotRunningError(f"the engine thread failed: {self._error!r}")
        if not self.is_running:
            raise EngineNotRunningError("the engine is not running (starting up or "
                                        "shutting down); retry later")

    # ------------------------------------------------------------------ event-loop side
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.fail(EngineNotRunningError(f"the engine thread failed: {error!r}"))
        self._streams.clear()

    # ------------------------------------------------------------------ core thread
    def _run(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            while self._apply_commands(block=not self.engine.has_unfinished()):
                start = time.perf_counter()
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                self._publish_stats()
                self._busy_seconds += time.perf_counter() - start
        except BaseException as exc:  # noqa: BLE001  (reported to every waiting request)
            logger.exception("the engine thread failed")
            self._error = exc
            self._is_accepting = False
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _publish_stats(self) -> None:
        # At most every STATS_INTERVAL_S while busy (reading the forward timer may wait for
        # the device), and always when idle, so a scrape sees freed blocks at once.
        now = time.monotonic()
        if self.engine.has_unfinished() and now - self._stats_time < STATS_INTERVAL_S:
            return
        self._stats, self._stats_time = self.engine.stats(), now

    def _apply_commands(self, *, block: bool) -> bool:
        """Apply every queued command (waiting for one when `block`); False on stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        start = time.perf_counter()
        while command is not _STOP:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                self._busy_seconds += time.perf_counter() - start
                return True
        return False

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_ids, command.params,
                                    arrival_time=command.arrival_time)
        except RequestError as exc:
            self._loop.call_soon_threadsafe(self._fail_one, command.request_id, exc)

    def _fail_one(self, request_id: str, error: RequestError) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.fail(error)
