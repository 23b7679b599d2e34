"""Prometheus metrics of the serving path, through Ray Serve's metrics API (`ray.serve.metrics`).

Each node's Ray metrics agent exports them on the node's metrics export port (`ray start
--metrics-export-port`, `jointgen serve --metrics-port`), with Ray's `ray_` prefix, `_total` on counters,
and the `deployment`, `replica` and `application` tags Serve adds. README, "Reading the serving metrics",
says what each one means. Outside a Ray worker recording is a no-op, so the plain `Engine` runs anywhere.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IngressMetrics:
    """HTTP answers, recorded by the ingress (one instance per replica process: `ingress_metrics()`)."""

    def __init__(self) -> None:
        self.requests = Counter("jointgen_requests", description="HTTP requests answered, by endpoint "
                                "(the route's path) and status code", tag_keys=("endpoint", "status"))
        self.errors = Counter("jointgen_errors", description="Errors answered, by endpoint, status and "
                              "OpenAI error code; includes errors sent inside a stream that had started",
                              tag_keys=("endpoint", "status", "code"))

    def error(self, endpoint: str, status: int, code: str | None) -> None:
        self.errors.inc(tags={"endpoint": endpoint, "status": str(status), "code": code or "none"})


_ingress: IngressMetrics | None = None


def ingress_metrics() -> IngressMetrics:
    """Created on first use, inside the replica, so that Serve's tags name it."""
    global _ingress
    if _ingress is None:
        _ingress = IngressMetrics()
    return _ingress


class GeneratorMetrics:
    """Decoding work, recorded by a generator replica's `Engine`."""

    def __init__(self) -> None:
        self.prompt_tokens = Counter("jointgen_prompt_tokens", description="Prompt tokens of finished "
                                     "requests (each prompt once, whatever n)")
        self.completion_tokens = Counter("jointgen_completion_tokens", description="Completion tokens of "
                                         "finished requests, up to EOS or the stop-string cut")
        self.full_passes = Counter("jointgen_full_passes", description="Full backbone passes, by decoding "
                                   "mode (one pass serves every row of its batch)", tag_keys=("mode",))
        self.sampler_passes = Counter("jointgen_sampler_passes", description="Joint-sampler passes, by "
                                      "decoding mode", tag_keys=("mode",))
        self.batch_rows = Histogram("jointgen_batch_rows", description="Rows (sequences) in the batch of "
                                    "each full pass", boundaries=ROWS, tag_keys=("mode",))
        self.queue_s = Histogram("jointgen_queue_seconds", description="Seconds from a request's arrival at "
                                 "the replica to its first full pass", boundaries=SECONDS)
        self.first_token_s = Histogram("jointgen_time_to_first_token_seconds", description="Seconds from a "
                                       "streamed request's arrival at the replica to its first text delta",
                                       boundaries=SECONDS)
        self.decode_s = Histogram("jointgen_decode_seconds", description="Seconds from a request's first "
                                  "full pass to its answer", boundaries=SECONDS, tag_keys=("mode",))
        self.step_failures = Counter("jointgen_step_failures", description="Decoding steps that failed "
                                     "(their requests got an error), by the status answered",
                                     tag_keys=("status",))
        self.waiting = Gauge("jointgen_waiting_requests", description="Requests waiting to join a batch")
        self.running = Gauge("jointgen_running_rows", description="Rows being decoded")
