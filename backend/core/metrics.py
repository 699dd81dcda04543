"""Prometheus metrics, one registry per app; one histogram per pipeline stage, as KServe does."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGES = ("fetch", "pre_hook", "predict", "post_hook", "validate")


class BackendMetrics:
    """The backend's counters and histograms, registered on their own registry (no global state)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lsbackend_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r)
        self.errors = Counter("lsbackend_errors", "Errors answered, by error type.", ["type"], registry=r)
        self.predictions = Counter("lsbackend_predictions", "Predictions returned (one per task).", registry=r)
        self.failed_tasks = Counter(
            "lsbackend_failed_tasks", "Tasks answered with no prediction: data missing, of the wrong type or not fetched.",
            registry=r,
        )
        self.partial_answers = Counter(
            "lsbackend_partial_answers", "Answers given at the deadline with part of the tasks left to the background.",
            registry=r,
        )
        self.background_tasks = Gauge(
            "lsbackend_background_tasks", "Tasks of big requests being predicted in the background, by state.", ["state"],
            registry=r,
        )
        self.background_eta_seconds = Gauge(
            "lsbackend_background_eta_seconds", "Estimated seconds until the background queue is done.", registry=r
        )
        self.pushed_predictions = Counter(
            "lsbackend_pushed_predictions", "Background predictions written into Label Studio (stored) or given up (failed).",
            ["result"], registry=r,
        )
        self.push_tasks = Gauge(
            "lsbackend_push_tasks", "Per project, the last day's background predictions stored in Label Studio, left to "
            "store, and failed.", ["project", "state"], registry=r,
        )
        self.cached_predictions = Counter(
            "lsbackend_cached_predictions", "Predictions answered from the background's cache.", registry=r
        )
        self.interactive_repeats = Counter(
            "lsbackend_interactive_repeats", "Interactive clicks sent again (Label Studio does on Submit), answered "
            "with the first answer instead of a new model call.", registry=r
        )
        self.model_process_restarts = Gauge(
            "lsbackend_model_process_restarts", "Times the serving model process was restarted after it ended.", registry=r
        )
        self.webhook_events = Counter("lsbackend_webhook_events", "Webhook events recorded, by action.", ["action"], registry=r)
        self.request_seconds = Histogram(
            "lsbackend_request_seconds", "Request latency by endpoint.", ["endpoint"], buckets=STAGE_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "lsbackend_stage_seconds", "Pipeline stage latency.", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.model_load_seconds = Gauge("lsbackend_model_load_seconds", "How long the current model took to load.", registry=r)
        self.model_loaded = Gauge("lsbackend_model_loaded", "1 when a model is configured and loaded.", registry=r)
        self.training_runs = Counter(
            "lsbackend_training_runs", "Trainings that ended, by result (promoted, candidate, rejected, failed).", ["result"],
            registry=r,
        )
        self.training_seconds = Histogram(
            "lsbackend_training_seconds", "How long trainings ran, start to outcome.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200), registry=r,
        )
        self.training_in_progress = Gauge("lsbackend_training_in_progress", "1 while a training runs.", registry=r)
        self.model_swaps = Counter(
            "lsbackend_model_swaps", "Served model versions replaced by a new registry version, by reason.", ["reason"],
            registry=r,
        )
        self.antenna_images = Counter(
            "lsbackend_antenna_images", "Images of Antenna's /process calls, by result (processed, failed).", ["result"],
            registry=r,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
