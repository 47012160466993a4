"""App factory and lifespan: load the checkpoint, warm up, serve, drain on shutdown."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_core.threads import use_torch_threads
from service.admission import PixelBudget
from service.batching import Batcher
from service.deps import RETRY_AFTER_S, InFlightRequest, PredictJob, ServiceState
from service.errors import error_response, install_error_handlers
from service.memory import MemoryTrimmer, load_malloc_trim
from service.metrics import UNMATCHED_ENDPOINT, ServiceMetrics
from service.priority import lower_thread_priority
from service.routes import router
from service.settings import Settings, missing_checkpoint_message

if TYPE_CHECKING:
    from model_core.predictor import HeadOutputs, Predictor

logger = logging.getLogger("service")

# Endpoints polled by probes and scrapers; their request lines are logged at DEBUG only.
_QUIET_ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics"})
# A client's X-Request-ID is reused only if it is short and plain, since it goes into logs.
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._\-]{1,64}")


class StartupError(RuntimeError):
    """The service cannot start; its message names the cause and the fix."""


def load_predictor(checkpoint: Path) -> Predictor:
    """Load the checkpoint at `checkpoint` into a CPU predictor.

    Raises:
        StartupError: The file is missing or is not a valid AdaMTL checkpoint.
    """
    if checkpoint.is_dir():
        raise StartupError(
            f"checkpoint {checkpoint} is a directory: pass the path of a .safetensors file"
        )
    if not checkpoint.is_file():
        raise StartupError(missing_checkpoint_message(checkpoint))
    from model_core.checkpoint import CheckpointError
    from model_core.predictor import Predictor

    try:
        return Predictor.from_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise StartupError(f"cannot load checkpoint {checkpoint}: {exc}") from exc
    except PermissionError as exc:
        raise StartupError(f"cannot read checkpoint {checkpoint}: {exc}") from exc
    except (ArithmeticError, AttributeError, LookupError, RuntimeError, TypeError) as exc:
        # NOTE: load_checkpoint lets some invalid configurations (a zero or negative size,
        # `classes` of the wrong type) escape as these errors instead of CheckpointError.
        raise StartupError(
            f"cannot load checkpoint {checkpoint}: its model configuration is invalid "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _load_on_one_thread(checkpoint: Path) -> Predictor:
    # anyio's worker threads are also the image threads, so none of them may get an OpenMP
    # team.
    use_torch_threads(1)
    return load_predictor(checkpoint)


def threads_for_batch(max_threads: int, cpus: int, busy_image_threads: int) -> int:
    """Return the torch threads of the next batch: the CPUs that image work leaves, at least 1.

    An OpenMP team waits at each barrier for its slowest thread, so a team thread that shares
    a core with an image thread delays the whole pass. On 2 cores with 2 torch threads at
    concurrency 16, two runs served 35.8 and 38.1 requests/s with this rule, and 34.1 and 34.3
    with a team of 2 for every batch (benchmarks.service_load, development machine).
    """
    return max(1, min(max_threads, cpus - busy_image_threads))


def describe_model(predictor: Predictor, checkpoint: Path) -> dict[str, Any]:
    """Collect the model facts served at /v1/model and logged at start-up."""
    metadata = predictor.metadata or {}
    config = metadata.get("config") or {}
    tasks = list(predictor.tasks)
    return {
        "name": str(metadata.get("name") or checkpoint.stem),
        "version": str(metadata.get("version") or "unversioned"),
        "preset": str(config.get("name", "unknown")),
        "tasks": tasks,
        "classes": {task: list(names) for task, names in predictor.classes.items()},
        "input_size": int(predictor.input_size),
        "static_flops": float(predictor.static_flops(tasks)),
        "static_flops_per_task": {task: float(predictor.static_flops([task])) for task in tasks},
        "budget_range": tuple(float(b) for b in predictor.budget_range),
        "provenance": _metadata_object(metadata, "provenance", checkpoint),
        "metrics": _metadata_object(metadata, "metrics", checkpoint),
    }


def _metadata_object(metadata: dict[str, Any], key: str, checkpoint: Path) -> dict[str, Any]:
    """Return the JSON object `metadata[key]`, or {} with a warning when it is not an object."""
    value = metadata.get(key) or {}
    if isinstance(value, dict):
        return value
    logger.warning(
        "checkpoint %s has %s of type %s instead of a JSON object; serving it as {}",
        checkpoint,
        key,
        type(value).__name__,
    )
    return {}


def _warm_up(predictor: Predictor, max_batch_size: int) -> None:
    """Run one batch at the largest and the smallest budget, so first requests are not slow."""
    from PIL import Image

    side = predictor.input_size
    image = Image.new("RGB", (side, side), (128, 128, 128))
    low, high = predictor.budget_range
    budgets = [high, low] if max_batch_size >= 2 else [high]
    predictor.predict([image] * len(budgets), budgets, None)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model, start the batcher and warm up; on shutdown, drain and stop.

    It also sets torch's thread count to 1 in the thread that runs it, the event loop's
    thread, because only the inference thread computes on several threads (model_core.threads).
    """
    state: ServiceState = app.state.service
    settings = state.settings

    import torch

    cpus = len(os.sched_getaffinity(0))
    inference_threads = min(settings.torch_threads or torch.get_num_threads(), cpus)
    # Only the inference thread runs torch on several threads (model_core.threads), because a
    # second OpenMP team made a batch-1 pass on 2 cores nearly twice as slow. This thread runs the
    # event loop, and anyio's worker threads, started later, inherit its count of 1.
    use_torch_threads(1)
    if settings.reuse_freed_memory:
        from model_core.allocator import reuse_freed_memory

        if not reuse_freed_memory():
            logger.info(
                "malloc's thresholds were not both raised: the C library has no mallopt, or the "
                "environment sets one, which keeps the environment's value"
            )

    started = time.perf_counter()
    predictor = state.predictor
    if predictor is None:
        predictor = await run_in_threadpool(_load_on_one_thread, settings.checkpoint)
    info = describe_model(predictor, settings.checkpoint)
    metrics = ServiceMetrics(
        state.registry,
        static_flops=info["static_flops"],
        tasks=info["tasks"],
        max_batch_size=settings.max_batch_size,
        model_info={key: info[key] for key in ("name", "version", "preset")},
    )

    # The inference thread runs only the forward pass. Each request resizes and encodes its
    # maps on the image threads once the pass has ended, while the next batch runs (see
    # routes.MapEncoder). Starting a lone image's maps while its last heads still ran made
    # the pass about 13 ms slower and the request about 5 ms slower (docs/benchmarks.md).
    def predict_batch(jobs: list[PredictJob]) -> list[HeadOutputs]:
        # The limiter's count changes on the event loop's thread. Reading it here is one len()
        # under the interpreter lock, and a count one batch old only costs speed.
        limiter = state.image_limiter
        busy = limiter.borrowed_tokens if limiter is not None else 0
        use_torch_threads(threads_for_batch(inference_threads, cpus, busy))
        return predictor.infer(
            [job.image for job in jobs],
            [job.budget for job in jobs],
            [job.tasks for job in jobs],
        )

    batcher: Batcher[PredictJob, HeadOutputs] = Batcher(
        predict_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        max_queue_size=settings.max_queue_size,
        on_batch=metrics.observe_batch,
        on_queue_depth=metrics.queue_depth.set,
    )
    batcher.start()
    await batcher.run_in_worker(lambda: use_torch_threads(inference_threads))
    state.predictor, state.batcher, state.metrics, state.model_info = (
        predictor,
        batcher,
        metrics,
        info,
    )
    # A few threads for image work instead of anyio's default of 40. With many requests in
    # flight, dozens of threads only contend for the interpreter lock and the cores. Each may
    # also keep a malloc arena of its own, which makes resident memory creep up under load.
    state.pixel_budget = PixelBudget(
        settings.max_pixels_in_flight, on_change=metrics.pixels_in_flight.set
    )
    state.image_limiter = anyio.CapacityLimiter(
        settings.image_threads or len(os.sched_getaffinity(0))
    )
    state.png_helper = ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="adamtl-png",
        initializer=lower_thread_priority,
        initargs=(settings.image_thread_niceness,),
    )

    if settings.warmup:
        await batcher.run_in_worker(lambda: _warm_up(predictor, settings.max_batch_size))
    if settings.malloc_trim_interval_s > 0:
        state.trimmer = MemoryTrimmer(settings.malloc_trim_interval_s, load_malloc_trim())
        if not state.trimmer.available:
            logger.info("this C library has no malloc_trim, so freed memory is not trimmed")
        state.trimmer.start()
    state.ready = True
    logger.info(
        "serving model %s version %s (preset %s, tasks %s, input %d px, static %.4g MACs per "
        "image, budgets %.2f to %.2f) from %s; inference torch threads: %d; ready after %.1f s",
        info["name"],
        info["version"],
        info["preset"],
        ",".join(info["tasks"]),
        info["input_size"],
        info["static_flops"],
        *info["budget_range"],
        settings.checkpoint,
        inference_threads,
        time.perf_counter() - started,
    )
    logger.info("settings: %s", settings.model_dump_json())

    try:
        yield
    finally:
        # Under `python -m service` the signal handler has drained already, and this returns
        # at once. Without it (tests, other ASGI servers) this is the only drain.
        await state.drain(settings.drain_timeout_s)
        if state.trimmer is not None:
            await state.trimmer.stop()
        state.png_helper.shutdown(wait=False, cancel_futures=True)
        logger.info("shutdown complete")


def _route_path(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # Only FastAPI's own routes record themselves in the scope. Plain Starlette routes, such
    # as /docs and /openapi.json, are found by matching the request again.
    for candidate in request.app.router.routes:
        match, _ = candidate.matches(request.scope)
        candidate_path = getattr(candidate, "path", None)
        if match is Match.FULL and isinstance(candidate_path, str):
            return candidate_path
    return UNMATCHED_ENDPOINT


class RequestObserver:
    """ASGI middleware: assign the request id, then count, time and log every HTTP request.

    It also registers each request in `ServiceState.in_flight`, so that the drain can wait for
    it, and responds with 503 `not_ready` to a request that the drain cancels.

    Written against ASGI directly rather than as Starlette's `BaseHTTPMiddleware`, which runs
    the app in a separate task and copies each response body through a stream. The duration
    runs until the last byte of the body is handed to the server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        incoming_id = request.headers.get("x-request-id", "")
        if _REQUEST_ID_PATTERN.fullmatch(incoming_id):
            request_id = incoming_id
        else:
            request_id = uuid.uuid4().hex
        request.state.request_id = request_id
        request.state.started = time.perf_counter()
        status_code = 500
        state: ServiceState = request.app.state.service
        in_flight = InFlightRequest(anyio.CancelScope())

        async def send_with_id(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                in_flight.response_started = True
                status_code = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        state.in_flight.add(in_flight)
        try:
            with in_flight.cancel_scope:
                await self.app(scope, receive, send_with_id)
            # The drain cancels only requests whose response has not started (ServiceState.drain).
            if in_flight.cancel_scope.cancelled_caught and not in_flight.response_started:
                response = error_response(
                    request,
                    503,
                    "not_ready",
                    "the service shut down before this request finished: retry after "
                    f"{RETRY_AFTER_S} s, or send the request to another replica",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
                await response(scope, receive, send_with_id)
        except Exception as exc:
            logger.exception("request %s failed with an unhandled error", request_id)
            if in_flight.response_started:
                # The status line was already sent, so the log line reports the error instead.
                request.state.error = f"response_failed: {exc}"
                raise
            response = error_response(
                request, 500, "internal_error", "the server failed to process the request; retry"
            )
            await response(scope, receive, send_with_id)
        finally:
            state.in_flight.discard(in_flight)
            duration = time.perf_counter() - request.state.started
            endpoint = _route_path(request)
            if state.metrics is not None:
                state.metrics.observe_request(endpoint, status_code, duration)
            _log_request(request, endpoint, status_code, duration)


# Full queue, not ready, or timed out: the service is overloaded, starting or stopping, not
# failing, so these are logged as warnings.
_LOAD_STATUSES = (503, 504)


def _log_request(request: Request, endpoint: str, status_code: int, duration_s: float) -> None:
    fields = [
        f"request_id={request.state.request_id}",
        f"{request.method} {request.url.path}",
        f"status={status_code}",
    ]
    budget = getattr(request.state, "budget", None)
    if budget is not None:
        fields.append(f"budget={budget:.3g}")
    flops_ratio = getattr(request.state, "flops_ratio", None)
    if flops_ratio is not None:
        fields.append(f"flops_ratio={flops_ratio:.3f}")
    fields.append(f"latency_ms={duration_s * 1000:.1f}")
    error = getattr(request.state, "error", None)
    if error is not None:
        fields.append(f"error={error!r}")

    if status_code >= 500 and status_code not in _LOAD_STATUSES:
        level = logging.ERROR
    elif error is not None and status_code < 400:
        # A request that failed after a success status was sent is an error too.
        level = logging.ERROR
    elif status_code >= 400:
        level = logging.WARNING
    elif endpoint in _QUIET_ENDPOINTS:
        level = logging.DEBUG
    else:
        level = logging.INFO
    logger.log(level, " ".join(fields))


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> FastAPI:
    """Build the service app around `predictor`, or load the checkpoint when the lifespan starts.

    `python -m service` passes a loaded predictor, so that a bad checkpoint fails before the
    server starts, with one clear message instead of uvicorn's start-up traceback.
    """
    settings = settings or Settings()
    app = FastAPI(
        title="AdaMTL inference service",
        summary="Adaptive multi-task dense prediction under a per-request compute budget.",
        description=(
            "Predicts saliency, human parts, semantic segmentation and surface normals for one "
            "image per request. The `budget` parameter sets the fraction of the static model's "
            "FLOPs that the policy network may spend. Every error response has the body "
            "`{code, type, message, request_id}`."
        ),
        version="1",
        lifespan=lifespan,
    )
    app.state.service = ServiceState(
        settings=settings, registry=CollectorRegistry(), predictor=predictor
    )
    install_error_handlers(app)
    app.add_middleware(RequestObserver)
    app.include_router(router)
    return app
