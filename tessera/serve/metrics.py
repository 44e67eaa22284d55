"""Prometheus metrics for the server, every name prefixed `tessera:`.

Two sources. Engine-wide totals and gauges (running and waiting requests, KV-cache usage,
prefix-cache hits, preemptions, token counters, speculative acceptance, step and forward
time) are read at scrape time from the `AsyncEngine`'s published snapshot by a custom
collector, so the engine thread never does metrics work. Per-request latencies (time to
first token, inter-token, end to end) are histograms observed on the event loop when a
request finishes. Each app gets its own `CollectorRegistry`, so several apps can live in
one process. This module knows nothing about HTTP routes or the OpenAI format.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tessera.serve.async_engine import AsyncEngine
from tessera.serve.outputs import RequestOutput

PREFIX = "tessera:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class EngineCollector(Collector):
    """Gauges and counters from the engine's latest stats snapshot."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        metric = GaugeMetricFamily(PREFIX + name, doc, labels=list(self.labels))
        metric.add_metric(list(self.labels.values()), value)
        return metric

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        metric = CounterMetricFamily(PREFIX + name, doc, labels=list(self.labels))
        metric.add_metric(list(self.labels.values()), value)
        return metric

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        e = stats.engine
        gauge, counter = self._gauge, self._counter
        yield gauge("num_requests_running", "Sequences running in the engine.", e.num_running)
        yield gauge("num_requests_waiting", "Requests admitted but not yet scheduled.",
                    stats.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                    e.kv_cache_usage)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / "
                    "prompt tokens looked up, since start.", e.prefix_cache_hit_rate)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      e.prefix_cache_queried_tokens)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      e.prefix_cache_hit_tokens)
        yield counter("num_preemptions", "Sequences preempted (recomputed later).",
                      e.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens admitted.", e.num_prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", e.num_generation_tokens)
        yield from self._speculative(e)
        yield from self._engine_time(stats)

    def _speculative(self, e) -> Iterator[Metric]:
        yield self._gauge("spec_decode_acceptance_rate", "Accepted / proposed draft tokens.",
                          e.spec_acceptance_rate)
        yield self._gauge("spec_decode_mean_accepted_length", "Mean tokens emitted per "
                          "verification (accepted drafts + 1).", e.spec_mean_accepted_length)
        yield self._counter("spec_decode_num_drafts", "Draft proposals verified.",
                            e.spec_num_drafts)
        yield self._counter("spec_decode_num_draft_tokens", "Draft tokens proposed.",
                            e.spec_num_draft_tokens)
        yield self._counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                            e.spec_num_accepted_tokens)

    def _engine_time(self, stats) -> Iterator[Metric]:
        e = stats.engine
        yield self._counter("engine_busy_seconds", "Engine thread time on commands, steps "
                            "and hand-off.", stats.busy_seconds)
        yield self._counter("engine_steps", "Engine steps that ran a batch.", e.num_steps)
        yield self._counter("engine_step_seconds", "Time inside LLMEngine.step().",
                            e.step_seconds)
        yield self._counter("engine_forward_seconds", "Time in model forwards (of the step "
                            "time).", e.forward_seconds)
        outside = 1 - e.forward_seconds / e.step_seconds if e.step_seconds else 0.0
        yield self._gauge("engine_step_overhead_ratio", "Share of step time outside the "
                          "model forwards, since start.", outside)


class ServerMetrics:
    """The app's registry: the engine collector plus per-request histograms."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(engine, model_name))
        labels = {"model_name": model_name}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(PREFIX + name, doc, list(labels), buckets=buckets,
                             registry=self.registry).labels(**labels)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.",
                             E2E_BUCKETS)
        self._finished = Counter(PREFIX + "request_success", "Finished requests by finish "
                                 "reason.", ["model_name", "finished_reason"],
                                 registry=self.registry)
        self._rejected = Counter(PREFIX + "request_rejected", "Requests refused because "
                                 "the waiting queue was full (HTTP 429).", list(labels),
                                 registry=self.registry).labels(**labels)
        self.model_name = model_name

    def observe_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        for latency in m.inter_token_latencies:
            self.itl.observe(latency)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        reason = output.outputs[0].finish_reason or "unknown"
        self._finished.labels(model_name=self.model_name, finished_reason=reason).inc()

    def observe_rejected(self) -> None:
        self._rejected.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
