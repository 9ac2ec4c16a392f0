"""Prometheus metrics, named as vLLM names them with the prefix `spillover:`.

Engine-side totals (tokens, prefix cache, preemptions) are read from the engine's latest stats
snapshot at scrape time by a custom collector, so the engine thread never touches prometheus
objects; latency histograms are observed by the HTTP layer, which sees the tokens arrive.
Each server gets its own registry so that several can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

P = "spillover:"
# Include the common SLO thresholds (0.1, 0.5, 1, 2 s ...) so dashboards can read them directly.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], Any], model_name: str) -> None:
        self._stats, self._model = stats, model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:
            return
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + name, doc, labels=labels)
            g.add_metric([self._model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + name, doc, labels=labels)
            c.add_metric([self._model], value)
            return c

        yield gauge("num_requests_running", "Requests in execution batches.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "KV-cache usage, 0 to 1.", s.kv_usage)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks_total)
        yield gauge("kv_cache_blocks_free", "KV-cache blocks not held by any request.",
                    s.kv_blocks_free)
        yield gauge("state_slots_total", "Recurrent-state slots in the pool.", s.state_slots_total)
        yield gauge("state_slots_free", "Recurrent-state slots free.", s.state_slots_free)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_queries_tokens)
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                      s.prefix_hit_tokens)
        yield counter("num_preemptions", "Preemptions.", s.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Generated tokens.", s.generation_tokens_total)


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        self.model = model_name
        kw: dict[str, Any] = {"labelnames": ["model_name"], "registry": self.registry}
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Inter-token latency.",
                             buckets=ITL_BUCKETS, **kw).labels(model_name)
        self.tpot = Histogram(P + "request_time_per_output_token_seconds",
                              "Time per output token, per request.",
                              buckets=ITL_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=E2E_BUCKETS, **kw).labels(model_name)
        self.req_prompt = Histogram(P + "request_prompt_tokens", "Prompt tokens per request.",
                                    buckets=TOKEN_BUCKETS, **kw).labels(model_name)
        self.req_gen = Histogram(P + "request_generation_tokens", "Generated tokens per request.",
                                 buckets=TOKEN_BUCKETS, **kw).labels(model_name)
        self._success = Counter(P + "request_success", "Finished requests by finish reason.",
                                labelnames=["model_name", "finished_reason"],
                                registry=self.registry)
        self.disconnected = Counter(P + "http_requests_client_disconnected",
                                    "Requests the client abandoned.", **kw).labels(model_name)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Per-request latency bookkeeping: TTFT, inter-token gaps, E2E, TPOT."""

    def __init__(self, metrics: ServerMetrics, start: float) -> None:
        self.m, self.start = metrics, start
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def tokens_arrived(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.start)
        elif self.last is not None:
            gap = (now - self.last) / count  # one step may bring several tokens (n > 1)
            for _ in range(count):
                self.m.itl.observe(gap)
        self.tokens += count
        self.last = now

    def done(self, now: float, prompt_tokens: int, reason: str) -> None:
        self.m.e2e.observe(now - self.start)
        self.m.req_prompt.observe(prompt_tokens)
        self.m.req_gen.observe(self.tokens)
        if self.first is not None and self.tokens > 1:
            self.m.tpot.observe((now - self.first) / (self.tokens - 1))
        self.m.finished(reason)
