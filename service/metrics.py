"""Prometheus metrics of the service, all on one registry that the app owns.

Units are base units (seconds, multiply-accumulates), values in [0, 1] end in `_ratio`, and only
counters end in `_total`. Labels take values from small fixed sets (endpoints, status codes,
stages, task names), and every combination known at start-up is created then, so a series
exists at zero before its first event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

ENDPOINTS: tuple[str, ...] = ("/predict", "/v1/model", "/healthz", "/readyz", "/metrics")
# Label value for requests that match no route (404s), so clients cannot create new series.
UNMATCHED_ENDPOINT = "unmatched"
PREDICT_STATUS_CODES: tuple[int, ...] = (200, 400, 408, 413, 415, 422, 499, 500, 503, 504)
STAGES: tuple[str, ...] = ("1", "2", "3", "4")

# Fractions of the static model's FLOPs that the FLOPs histogram resolves.
FLOPS_FRACTIONS: tuple[float, ...] = (
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1,
)  # fmt: skip
RATIO_BUCKETS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def flops_buckets(static_flops: float) -> list[float]:
    """Return histogram bounds in MACs, as FLOPS_FRACTIONS of the static model's FLOPs."""
    if static_flops <= 0:
        raise ValueError(f"static FLOPs must be positive to size buckets, got {static_flops}")
    return [float(f"{fraction * static_flops:.6g}") for fraction in FLOPS_FRACTIONS]


def batch_size_buckets(max_batch_size: int) -> list[float]:
    """Return one bucket bound per possible batch size up to 32, then powers of two."""
    bounds = list(range(1, min(max_batch_size, 32) + 1))
    size = 64
    while bounds[-1] < max_batch_size:
        bounds.append(min(size, max_batch_size))
        size *= 2
    return [float(bound) for bound in bounds]


class ServiceMetrics:
    """The service's metrics, created once the model is loaded.

    Args:
        registry: Registry the metrics are registered on and that /metrics exposes.
        static_flops: MACs per image of the static model with every task; sizes FLOPs buckets.
        tasks: Task names of the served checkpoint, used as label values.
        max_batch_size: Largest batch, used to size the batch-size buckets.
        model_info: Labels of the model info metric (name, version, preset).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        static_flops: float,
        tasks: Sequence[str],
        max_batch_size: int,
        model_info: Mapping[str, str],
    ) -> None:
        self.registry = registry

        # Model.
        self.model_info = Info(
            "adamtl_model", "Checkpoint that this process serves.", registry=registry
        )
        self.model_info.info(dict(model_info))
        self.model_static_flops = Gauge(
            "adamtl_model_static_flops",
            "Multiply-accumulates per image of the static model with every task.",
            registry=registry,
        )
        self.model_static_flops.set(static_flops)

        # Per image: what the policy executed.
        self.image_flops = Histogram(
            "adamtl_image_flops",
            "Multiply-accumulates executed per image.",
            buckets=flops_buckets(static_flops),
            registry=registry,
        )
        self.image_flops_ratio = Histogram(
            "adamtl_image_flops_ratio",
            "Executed FLOPs per image over the static model's FLOPs for the same tasks.",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.image_activated_tokens_ratio = Histogram(
            "adamtl_image_activated_tokens_ratio",
            "Fraction of an encoder stage's tokens that were processed, per image and stage.",
            ["stage"],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.image_encoder_activated_tokens_ratio = Histogram(
            "adamtl_image_encoder_activated_tokens_ratio",
            "Fraction of all encoder tokens that were processed, per image.",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.image_activated_blocks_ratio = Histogram(
            "adamtl_image_activated_blocks_ratio",
            "Fraction of encoder blocks that were executed, per image.",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.request_budget_ratio = Histogram(
            "adamtl_request_budget_ratio",
            "Compute budget of each successful prediction request.",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.task_outputs = Counter(
            "adamtl_task_outputs_total",
            "Output maps computed, by task.",
            ["task"],
            registry=registry,
        )

        # HTTP.
        self.requests = Counter(
            "adamtl_requests_total",
            "HTTP requests completed, by endpoint and status code.",
            ["endpoint", "status_code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "adamtl_request_duration_seconds",
            "Time from receiving a request until its response is ready, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        # Batching.
        self.queue_wait = Histogram(
            "adamtl_queue_wait_seconds",
            "Time a prediction request waited in the queue before its batch started.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "adamtl_inference_duration_seconds",
            "Time of one batched forward pass, including pre-processing; the maps are resized and "
            "encoded afterwards.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "adamtl_batch_size",
            "Images per batched forward pass.",
            buckets=batch_size_buckets(max_batch_size),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "adamtl_queue_depth",
            "Prediction requests admitted and not yet finished (queued or running).",
            registry=registry,
        )
        self.pixels_in_flight = Gauge(
            "adamtl_pixels_in_flight",
            "Decoded pixels that the prediction requests in flight hold together.",
            registry=registry,
        )

        self._initialise_labels(tasks)

    def _initialise_labels(self, tasks: Iterable[str]) -> None:
        for stage in STAGES:
            self.image_activated_tokens_ratio.labels(stage=stage)
        for task in tasks:
            self.task_outputs.labels(task=task)
        for endpoint in ENDPOINTS:
            self.request_duration.labels(endpoint=endpoint)
            codes = PREDICT_STATUS_CODES if endpoint == "/predict" else (200,)
            for code in codes:
                self.requests.labels(endpoint=endpoint, status_code=str(code))
        self.requests.labels(endpoint="/readyz", status_code="503")
        self.requests.labels(endpoint=UNMATCHED_ENDPOINT, status_code="404")

    def observe_image(self, stats: Mapping[str, Any]) -> None:
        """Record the execution statistics of one predicted image (a Prediction.stats dict)."""
        self.image_flops.observe(stats["flops"])
        self.image_flops_ratio.observe(stats["flops_ratio"])
        self.image_encoder_activated_tokens_ratio.observe(stats["tokens_ratio"])
        for stage, ratio in zip(STAGES, stats["tokens_ratio_per_stage"], strict=True):
            self.image_activated_tokens_ratio.labels(stage=stage).observe(ratio)
        blocks_total = stats["blocks_total"]
        if blocks_total:
            self.image_activated_blocks_ratio.observe(stats["blocks_executed"] / blocks_total)
        self.request_budget_ratio.observe(stats["budget"])
        for task in stats["tasks"]:
            self.task_outputs.labels(task=task).inc()

    def observe_batch(self, size: int, duration_s: float) -> None:
        """Record one forward pass of `size` images that took `duration_s` seconds."""
        self.batch_size.observe(size)
        self.inference_duration.observe(duration_s)

    def observe_request(self, endpoint: str, status_code: int, duration_s: float) -> None:
        """Record one HTTP response; `endpoint` is a route path or UNMATCHED_ENDPOINT."""
        self.requests.labels(endpoint=endpoint, status_code=str(status_code)).inc()
        self.request_duration.labels(endpoint=endpoint).observe(duration_s)
