"""Prometheus metrics of one app: requests, latency, images scored, errors, queue depth, undelivered verdicts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Telemetry:
    """The app's own registry, so two apps in one process (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("defectscope_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("defectscope_request_seconds", "Request latency", ["route"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.images = Counter("defectscope_images_scored", "Images scored", ["model", "verdict"], registry=self.registry)
        self.errors = Counter("defectscope_errors", "Requests answered with an error", ["status"], registry=self.registry)
        self.queue = Gauge("defectscope_queue_depth", "Images waiting or being scored", ["model"], registry=self.registry)
        self.batches = Gauge("defectscope_batches", "Model calls made", ["model"], registry=self.registry)
        self.undelivered = Gauge("defectscope_verdicts_undelivered", "Verdicts not every dispatch target has taken "
                                 "yet (refused after retries, or pushed out of a full queue; sent again)",
                                 registry=self.registry)
        self.drift = Gauge("defectscope_drift", "1 while the parts a model passed lately score higher than its training "
                           "goods (the drift check on the audit trail), else 0", ["model"], registry=self.registry)
