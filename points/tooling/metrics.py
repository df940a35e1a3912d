"""What `points serve` tells its operator: one log line per request and Prometheus metrics (`GET /metrics`,
through `prometheus-client`, in the serve extra).

    metrics = Metrics(scheduler)       # a registry of its own (several servers in one process stay apart)
    metrics.observe(request)           # a request that ended: its tokens, times and finish reason counted
    body, content_type = metrics.render()

The metrics (names as vLLM's, prefixed `points_`; times in seconds, `time.perf_counter` on the serving host):
- `points_requests_waiting`, `points_rows_busy`: the scheduler's queue and its busy rows, read at the scrape;
- `points_requests_total{finish_reason}`: requests ended ("stop", "length", "cancelled", "error");
- `points_prompt_tokens_total`, `points_generation_tokens_total`, `points_prefix_cache_hit_tokens_total`
  (prompt tokens restored from the prefix cache instead of prefilled), `points_vision_cache_hits_total` (images
  whose features the vision cache held);
- histograms `points_time_to_first_token_seconds` (queued to first token), `points_time_per_output_token_seconds`
  (first to last token over the tokens after the first), `points_request_seconds` (queued to end) and
  `points_vision_encoder_seconds` (the encoder's time for a request's images not in the prefix cache).
"""

from __future__ import annotations

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        Gauge("points_requests_waiting", "Requests waiting for a row.", registry=r).set_function(
            lambda: scheduler.load()[1])
        Gauge("points_rows_busy", "Rows generating now.", registry=r).set_function(lambda: scheduler.load()[0])
        self.requests = Counter("points_requests", "Requests ended, by finish reason.", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("points_prompt_tokens", "Prompt tokens of ended requests.", registry=r)
        self.generation_tokens = Counter("points_generation_tokens", "Tokens generated.", registry=r)
        self.cached_tokens = Counter("points_prefix_cache_hit_tokens",
                                     "Prompt tokens restored from the prefix cache, not prefilled.", registry=r)
        self.ttft = Histogram("points_time_to_first_token_seconds", "From queued to the first token.",
                              buckets=SECONDS, registry=r)
        self.tpot = Histogram("points_time_per_output_token_seconds", "Per token after the first.",
                              buckets=PER_TOKEN, registry=r)
        self.e2e = Histogram("points_request_seconds", "From queued to the end.", buckets=SECONDS, registry=r)
        self.vision_hits = Counter("points_vision_cache_hits", "Images whose features came from the vision cache.",
                                   registry=r)
        self.vision = Histogram("points_vision_encoder_seconds", "The vision encoder's time for a request's images.",
                                buckets=SECONDS, registry=r)

    def observe(self, request) -> None:
        """Count a request that ended (points.runtime.scheduler.Request)."""
        self.requests.labels(request.finish_reason).inc()
        self.prompt_tokens.inc(request.prompt_tokens)
        self.generation_tokens.inc(request.completion_tokens)
        self.cached_tokens.inc(request.cached_tokens)
        self.vision_hits.inc(request.images_cached)
        if request.images_encoded:
            self.vision.observe(request.vision_seconds)
        if request.finished_at is not None:
            self.e2e.observe(request.finished_at - request.submitted_at)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted_at)
            if request.completion_tokens > 1 and request.finished_at is not None:
                self.tpot.observe((request.finished_at - request.first_token_at) / (request.completion_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def log_line(ident: str, route: str, request) -> str:
    """The one line a served request leaves on stderr."""
    first = ("-" if request.first_token_at is None else f"{request.first_token_at - request.submitted_at:.3f}s")
    total = ("-" if request.finished_at is None else f"{request.finished_at - request.submitted_at:.3f}s")
    return (f"points serve: {ident} {route} {request.finish_reason} prompt={request.prompt_tokens} "
            f"cached={request.cached_tokens} completion={request.completion_tokens} first_token={first} "
            f"total={total}")
