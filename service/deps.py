"""Service state shared by the lifespan and the routes, and the dependencies that hand it out."""

from __future__ import annotations

import asyncio
import logging
import math
import time
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
    from service.admission import PixelBudget
    from service.batching import Batcher
    from service.memory import MemoryTrimmer
    from service.metrics import ServiceMetrics

logger = logging.getLogger("service")

# Retry-After value of 503 responses, in seconds.
RETRY_AFTER_S = 1
# Seconds that requests cancelled at the drain deadline get to send their 503. A cancelled
# request waits for the decoding or encoding step it is in, because threads cannot be stopped.
CANCEL_WAIT_S = 2.0
_DRAIN_POLL_S = 0.01


@dataclass(frozen=True)
class PredictJob:
    """One image of a batch: what the predictor needs for it."""

    image: Image.Image
    budget: float
    tasks: list[str]


@dataclass(eq=False)
class InFlightRequest:
    """One HTTP request from its arrival until the app returns, as RequestObserver tracks it."""

    # The drain cancels it at its deadline, and RequestObserver then responds with 503.
    cancel_scope: anyio.CancelScope
    response_started: bool = False


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
    # Decoded pixels of the prediction requests in flight (Settings.max_pixels_in_flight).
    pixel_budget: PixelBudget | None = None
    # Periodic malloc_trim caller, or None when ADAMTL_MALLOC_TRIM_INTERVAL_S is 0.
    trimmer: MemoryTrimmer | None = None
    ready: bool = False
    draining: bool = False
    # HTTP requests that the app is processing, added and removed by RequestObserver.
    in_flight: set[InFlightRequest] = field(default_factory=set)
    _drain_task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _drain_deadline: float = field(default=math.inf, init=False, repr=False)  # time.monotonic()

    def begin_drain(self) -> None:
        """Turn readiness off and stop admitting predictions. Admitted ones still finish."""
        if not self.draining:
            logger.info("draining: readiness is off and new predictions get 503")
        self.draining = True
        self.ready = False
        if self.batcher is not None:
            self.batcher.close()

    async def drain(self, timeout_s: float) -> None:
        """Give the requests in flight `timeout_s` seconds to finish, then stop the batcher.

        Turns readiness off and stops admission first. At the deadline, requests whose response
        has not started are cancelled and get a 503 `not_ready` response. That includes those
        queued or in the running batch, and those still uploading, decoding or encoding.

        Safe to call again, also while a drain runs: every call waits for the same drain, and a
        call with an earlier deadline moves the deadline, e.g. drain(0) on a second SIGTERM.
        """
        self.begin_drain()
        self._drain_deadline = min(self._drain_deadline, time.monotonic() + timeout_s)
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="adamtl-drain")
        # Shielded, so that a caller that is cancelled does not stop the drain for the others.
        await asyncio.shield(self._drain_task)

    def _busy(self, waiting_for: set[InFlightRequest]) -> bool:
        admitted = self.batcher.queue_depth if self.batcher is not None else 0
        return admitted > 0 or not waiting_for.isdisjoint(self.in_flight)

    async def _drain(self) -> None:
        # Only the requests that arrived before the drain count. Later ones get a 503 at once,
        # and under steady traffic some are always in flight, which would hold the drain until
        # its deadline.
        waiting_for = set(self.in_flight)
        if self._busy(waiting_for):
            logger.info(
                "draining: waiting up to %.3g s for the requests in flight (%d)",
                max(0.0, self._drain_deadline - time.monotonic()),
                len(waiting_for),
            )
        while self._busy(waiting_for) and time.monotonic() < self._drain_deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        timed_out = self._busy(waiting_for)

        if self.batcher is not None:
            await self.batcher.stop(0)
        if not timed_out:
            return
        # Collected after stop() returned and cancelled with no await in between, so no request
        # can start its response after this check. Cancelling a started one would cut its body.
        unanswered = [request for request in self.in_flight if not request.response_started]
        # The deadline is ADAMTL_DRAIN_TIMEOUT_S after the first signal, or now after a second.
        logger.warning(
            "drain deadline reached; requests in flight: %d; cancelling the %d whose response "
            "has not started",
            len(self.in_flight),
            len(unanswered),
        )
        for request in unanswered:
            request.cancel_scope.cancel()
        give_up_at = time.monotonic() + CANCEL_WAIT_S
        while any(request in self.in_flight for request in unanswered):
            if time.monotonic() >= give_up_at:
                logger.warning(
                    "%d cancelled requests did not end within %g s; shutting down without them",
                    sum(request in self.in_flight for request in unanswered),
                    CANCEL_WAIT_S,
                )
                break
            await asyncio.sleep(_DRAIN_POLL_S)


# The dependencies are coroutines although they never wait, because FastAPI runs plain
# functions on anyio's worker threads. Those threads decode and encode images at a raised nice
# value (service.priority), and a test checks that every dependency is a coroutine.


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_ready_state(request: Request) -> ServiceState:
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
