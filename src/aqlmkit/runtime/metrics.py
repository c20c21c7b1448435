"""Prometheus metrics of one server (its own registry, so several servers in a process never clash)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    """Requests, tokens in/out, queue depth, time to first token and per-token latency."""

    def __init__(self, engine) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("aqlmkit_requests", "HTTP requests to the API, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("aqlmkit_prompt_tokens", "prompt tokens of accepted requests",
                                     registry=r)
        self.generation_tokens = Counter("aqlmkit_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("aqlmkit_time_to_first_token_seconds",
                              "from request arrival to its first generated token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("aqlmkit_time_per_output_token_seconds",
                              "gap between consecutive generated tokens of a request", buckets=_LATENCY,
                              registry=r)
        queue = Gauge("aqlmkit_queue_depth", "requests waiting for a cache slot", registry=r)
        queue.set_function(lambda: engine.queue_depth)
        running = Gauge("aqlmkit_running_requests", "requests holding a cache slot", registry=r)
        running.set_function(lambda: engine.running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
