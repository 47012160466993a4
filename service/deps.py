"""Service state shared by the lifespan and the routes, and the dependencies that hand it out."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from service.errors import ServiceError
from service.settings import Settings

if TYPE_CHECKING:
    from PIL import Image

    from model_core.predictor import HeadOutputs, Predictor
    from service.batching import Batcher
    from service.metrics import ServiceMetrics

logger = logging.getLogger("service")

# Retry-After value of 503 responses, in seconds.
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class PredictJob:
    """One image of a batch: what the predictor needs for it."""

    image: Image.Image
    budget: float
    tasks: list[str]


@dataclass
class ServiceState:
    """Everything the routes need, filled in by the lifespan; stored as `app.state.service`."""

    settings: Settings
    registry: CollectorRegistry
    predictor: Predictor | None = None
    batcher: Batcher[PredictJob, HeadOutputs] | None = None
    metrics: ServiceMetrics | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    # Bounds the threads that decode uploads and post-process and encode the maps
    # (see Settings.image_threads).
    image_limiter: anyio.CapacityLimiter | None = None
    # One extra thread that compresses the second half of large output maps when it is idle
    # (see imaging.png_bytes).
    png_helper: ThreadPoolExecutor | None = None
    ready: bool = False
    draining: bool = False

    def begin_drain(self) -> None:
        """Turn readiness off and reject new predictions; admitted ones still finish."""
        if not self.draining:
            logger.info("draining: readiness is off and new predictions get 503")
        self.draining = True
        self.ready = False


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_ready_state(request: Request) -> ServiceState:
    """Return the service state, or raise 503 while the model loads or the service drains."""
    state: ServiceState = request.app.state.service
    if not state.ready:
        reason = "shutting down" if state.draining else "still loading the model"
        raise ServiceError(
            503,
            "not_ready",
            f"the service is {reason}: retry after {RETRY_AFTER_S} s, or send the request to "
            "another replica",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
ReadyStateDep = Annotated[ServiceState, Depends(get_ready_state)]
