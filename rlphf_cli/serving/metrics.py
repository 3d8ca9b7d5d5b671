"""GET /metrics: the server's figures in Prometheus' text format, named after vLLM's server's.

Each server has its own registry (several servers may live in one process: tests, benchmarks).
Backends count soup cache hits and misses and time merges; the HTTP layer counts requests by
status, tokens and time to first token; queue depth and running rows are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

# Seconds: from a token's time on a CPU to a long queue wait.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServeMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rlphf_requests", "HTTP requests to /v1 routes by status code", ["status"], registry=r)
        self.prompt_tokens = Counter("rlphf_prompt_tokens", "Prompt tokens of accepted chat completions", registry=r)
        self.generation_tokens = Counter("rlphf_generation_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter("rlphf_cancelled_choices", "Choices dropped because their client went away",
                                 registry=r)
        self.soup_hits = Counter("rlphf_soup_cache_hits", "Requests whose soup was merged already", registry=r)
        self.soup_misses = Counter("rlphf_soup_cache_misses", "Requests whose soup had to be merged", registry=r)
        self.merge_seconds = Histogram("rlphf_soup_merge_seconds", "Time to merge a new soup (off the decode thread)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("rlphf_time_to_first_token_seconds", "From the request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("rlphf_e2e_request_latency_seconds", "From the request's arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("rlphf_requests_waiting", "Requests accepted and not yet decoding (the queue)",
                             registry=r)
        self.running = Gauge("rlphf_running_rows", "Rows (choices) in the decoding batch", registry=r)

    def watch(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Gauges read from the backend when scraped."""
        self.waiting.set_function(waiting)
        self.running.set_function(running)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
