"""Prometheus metrics of the server (GET /metrics), with prometheus_client.

The engine's own counters (``CogVLM2Engine.snapshot()``) are read at scrape time by a collector;
the server adds HTTP outcomes and latency histograms. One registry per app, so several apps (tests)
can share a process.
"""
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.snapshot()
        for name, value, doc in (
                ("submitted", stats.submitted, "requests submitted to the engine"),
                ("finished", stats.finished, "requests finished (stop or length)"),
                ("cancelled", stats.cancelled, "requests cancelled (client gone, stop string, shutdown)"),
                ("failed", stats.failed, "requests failed (bad media, context length, ...)")):
            yield CounterMetricFamily(f"cogvlm2_engine_requests_{name}", doc, value=value)
        yield CounterMetricFamily("cogvlm2_prompt_tokens", "prompt tokens prefilled (vision tokens included)",
                                  value=stats.prompt_tokens)
        yield CounterMetricFamily("cogvlm2_generated_tokens", "tokens generated", value=stats.generated_tokens)
        yield CounterMetricFamily("cogvlm2_decode_steps", "batched decode steps", value=stats.decode_steps)
        yield GaugeMetricFamily("cogvlm2_queue_length", "requests waiting (preprocessing or for a batch slot)",
                                value=stats.waiting)
        yield GaugeMetricFamily("cogvlm2_running_sequences", "sequences in the batch now", value=stats.running)
        yield GaugeMetricFamily("cogvlm2_max_batch_size", "batch slots", value=self.engine.max_batch_size)
        occupancy = stats.decode_rows / stats.decode_steps if stats.decode_steps else 0.0
        yield GaugeMetricFamily("cogvlm2_batch_occupancy", "mean sequences per decode step since start",
                                value=occupancy)
        yield GaugeMetricFamily("cogvlm2_vision_cache_entries", "videos in the vision-embedding cache",
                                value=len(self.engine.vision_cache))


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter("cogvlm2_http_requests", "chat completion requests by HTTP status",
                                ["status"], registry=self.registry)
        self.errors = Counter("cogvlm2_errors", "requests answered with an error, by kind",
                              ["kind"], registry=self.registry)
        self.ttft = Histogram("cogvlm2_time_to_first_token_seconds", "request received -> first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("cogvlm2_request_seconds", "request received -> last token",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)

    def count(self, status: int, kind: str = None):
        self.requests.labels(status=str(status)).inc()
        if kind:
            self.errors.labels(kind=kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
