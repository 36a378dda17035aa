"""What the server tells its operators: Prometheus metrics, structured (JSON) logs, one access-log line
per request.

Metrics live in a registry of their own per app (the global one would refuse a second app in the same
process: "Duplicated timeseries"). The access log and the request metrics come from one pure ASGI
middleware that sees every response, also those that never reach a route (404, 413 from the body limit).
"""

from __future__ import annotations

import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from pythonjsonlogger.json import JsonFormatter

access_log = logging.getLogger("deploy.access")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DRIFT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("serving_requests", "HTTP requests by route template, method and status code",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("serving_request_duration_seconds", "HTTP request latency by route template",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("serving_batch_size", "images per model call (micro-batches when batching is on)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("serving_images", "images run through the model", registry=r)
        self.model_info = Gauge("serving_model_info", "1 for the model version being served",
                                ["model", "version", "sha256"], registry=r)
        self.swaps = Counter("serving_model_swaps", "hot swaps by result (ok, failed)", ["result"], registry=r)
        # drift monitoring (deploy/monitor.py; docs/serving.md "Drift monitoring")
        self.drift_pvalue = Gauge("drift_pvalue", "p-value of the last drift test, by detector (embedding: KS per "
                                  "principal component, softmax: KS per class, image: KS per input image statistic, "
                                  "combined; Bonferroni-adjusted)",
                                  ["detector"], registry=r)
        self.drift_detected = Gauge("drift_detected", "1 while drift is detected (alarm raised, not yet cleared)",
                                    registry=r)
        self.drift_alarms = Counter("drift_alarms", "drift alarms raised (episodes)", registry=r)
        self.drift_window = Gauge("drift_window_size", "rows (images) in the drift window now", registry=r)
        self.drift_tests = Counter("drift_tests", "drift tests run", registry=r)
        self.drift_test_seconds = Histogram("drift_test_duration_seconds", "time one drift test takes (its own "
                                            "thread, off the request path)", buckets=DRIFT_BUCKETS, registry=r)
        self.drift_retrains = Counter("drift_retrain_requests", "retraining runs requested by drift alarms, by "
                                      "result (ok, cooldown, failed)", ["result"], registry=r)

    def observe_batch(self, n: int) -> None:
        self.batch_size.observe(n)
        self.images.inc(n)

    def served(self, model) -> None:
        """The model now served (its labels replace the previous model's)."""
        self.model_info.clear()
        self.model_info.labels(model.name, model.version, model.sha256[:12]).set(1)

    def swapped(self, old, new, error: str | None) -> None:
        self.swaps.labels("failed" if error else "ok").inc()
        if new is not None:
            self.served(new)

    def drift_reset(self) -> None:
        """A new model (or none) is monitored: no test yet, nothing detected."""
        self.drift_detected.set(0)
        self.drift_window.set(0)
        for detector in ("embedding", "softmax", "image", "combined"):
            self.drift_pvalue.labels(detector).set(float("nan"))  # NaN: no test of this model yet

    def drift_tested(self, outcome) -> None:
        self.drift_tests.inc()
        self.drift_test_seconds.observe(outcome.result.seconds)
        for detector, p in outcome.result.pvalues.items():
            self.drift_pvalue.labels(detector).set(p)
        self.drift_detected.set(1 if outcome.detected else 0)
        if outcome.alarm:
            self.drift_alarms.inc()

    def render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class AccessLog:
    """Pure ASGI middleware: one JSON log line and the request metrics for every HTTP response."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status, sent = 500, 0

        async def observed_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # the template: bounded cardinality
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            headers = dict(scope.get("headers") or ())
            client = scope.get("client")
            access_log.info("request", extra={
                "event": "request", "method": scope["method"], "path": scope["path"], "route": route,
                "status": status, "ms": round(seconds * 1000, 2), "bytes_in": int(headers.get(b"content-length", 0) or 0),
                "bytes_out": sent, "client": f"{client[0]}:{client[1]}" if client else None,
                "request_id": headers.get(b"x-request-id", b"").decode("latin-1") or None})


class _DropColor(logging.Filter):
    """uvicorn adds `color_message` (ANSI codes) to its records; not for JSON logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def configure_logging(level: str = "info", fmt: str = "json", access: bool = True) -> None:
    """Root logging to stderr: one JSON object per line (`fmt='json'`) or plain text; uvicorn's own loggers
    propagate here. `access=False` silences the per-request lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropColor())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    access_log.setLevel(logging.INFO if access else logging.WARNING)
