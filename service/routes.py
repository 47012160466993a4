"""HTTP endpoints: predict, model metadata, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from model_core.threads import use_torch_threads
from service import imaging
from service.admission import PixelLimitError, PixelReservation
from service.batching import (
    BatcherClosedError,
    BatchTiming,
    QueueFullError,
    RequestTimeoutError,
)
from service.deps import RETRY_AFTER_S, PredictJob, ReadyStateDep, StateDep
from service.errors import ServiceError, shorten
from service.priority import lower_thread_priority
from service.schemas import (
    Compute,
    ErrorResponse,
    HealthStatus,
    ImageSize,
    ModelInfo,
    ModelRef,
    PredictResponse,
    TaskOutput,
    Timing,
)

if TYPE_CHECKING:
    import torch

    from model_core.predictor import HeadOutputs, Predictor

logger = logging.getLogger("service")

router = APIRouter()

# Room for multipart boundaries and part headers on top of the image itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024

_IMAGE_MEDIA = {"type": "string", "format": "binary"}
_PREDICT_REQUEST_BODY = {
    "required": True,
    "description": (
        "The image, either as the multipart file field `image` or as the raw request body "
        "with an image content type. JPEG, PNG, GIF (first frame), WebP, BMP and TIFF are "
        "accepted; EXIF orientation is applied."
    ),
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {"image": {**_IMAGE_MEDIA, "description": "The image file."}},
            }
        },
        "image/jpeg": {"schema": _IMAGE_MEDIA},
        "image/png": {"schema": _IMAGE_MEDIA},
        "image/webp": {"schema": _IMAGE_MEDIA},
        "image/*": {"schema": _IMAGE_MEDIA},
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("The image is corrupt or truncated."),
    408: _error("The request body did not arrive within the upload timeout."),
    413: _error("The upload exceeds the byte limit, or the image the pixel limit."),
    415: _error("The content type or the file is not a supported image."),
    422: _error("Invalid budget or tasks, or no image in the request."),
    500: _error("Inference failed."),
    503: _error("The queue is full, or the service is loading or shutting down; see Retry-After."),
    504: _error("The request was not finished within the request timeout."),
}


def _unavailable(exc: QueueFullError | BatcherClosedError) -> ServiceError:
    return ServiceError(
        503,
        "queue_full" if isinstance(exc, QueueFullError) else "not_ready",
        f"{exc}: retry after {RETRY_AFTER_S} s, or send the request to another replica",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def parse_tasks(raw: str | None, available: tuple[str, ...]) -> list[str]:
    """Split the comma-separated `tasks` parameter; None means every task of the checkpoint.

    Duplicates are dropped and the order follows the checkpoint's task order.

    Raises:
        ServiceError: 422 `invalid_tasks` when `raw` names no task or an unknown one.
    """
    if raw is None:
        return list(available)
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if not names:
        raise ServiceError(
            422,
            "invalid_tasks",
            f"tasks {shorten(raw)} names no task: pass a comma-separated subset of "
            f"{','.join(available)}, or leave it out for all tasks",
        )
    unique = list(dict.fromkeys(names))
    unknown = [task for task in unique if task not in available]
    if unknown:
        shown = ", ".join(shorten(task) for task in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ServiceError(
            422,
            "invalid_tasks",
            f"unknown task {shown}{more}: pass a comma-separated subset of {','.join(available)}",
        )
    return [task for task in available if task in unique]


# Query parameters of /predict. FastAPI keeps only the last value of a repeated one.
_PREDICT_PARAMETERS = ("budget", "tasks")


async def reject_repeated_parameters(request: Request) -> None:
    """Raise 422 `invalid_parameter` when a query parameter of /predict is given more than once.

    Without this check `budget=0.5&budget=0.9` would run at 0.9, and `tasks=semseg&tasks=normals`
    would predict only the normals, with no sign that a value was dropped.
    """
    for name in _PREDICT_PARAMETERS:
        count = len(request.query_params.getlist(name))
        if count < 2:
            continue
        fix = "give it once"
        if name == "tasks":
            fix += ", with the tasks as one comma-separated list, e.g. tasks=semseg,normals"
        raise ServiceError(
            422, "invalid_parameter", f"query parameter {name!r} is given {count} times: {fix}"
        )


async def _read_limited(
    request: Request, limit: int, max_upload_bytes: int, timeout_s: float
) -> bytes:
    """Read the request body, raising 413 as soon as it exceeds `limit` bytes.

    `limit` may exceed `max_upload_bytes` by the multipart overhead; messages name the latter.
    A body that is not complete within `timeout_s` seconds raises 408, so a client that
    declares more bytes than it sends, or sends them very slowly, does not hold the request
    open for ever.
    """
    too_large = ServiceError(
        413,
        "payload_too_large",
        f"the upload exceeds the limit of {max_upload_bytes} bytes for the image: send a "
        "smaller or more compressed image",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ServiceError(
            408,
            "upload_timeout",
            f"the request body was not complete within {timeout_s:g} s ({size} bytes "
            "received): check that Content-Length matches the body, or raise "
            "ADAMTL_UPLOAD_TIMEOUT_S for slow links",
        ) from exc
    except ClientDisconnect as exc:
        raise ServiceError(
            400, "client_disconnected", "the client closed the connection during the upload"
        ) from exc
    return b"".join(chunks)


async def read_image_bytes(request: Request, max_upload_bytes: int, timeout_s: float) -> bytes:
    """Return the uploaded image file from a multipart field `image` or a raw image body.

    The whole body must arrive within `timeout_s` seconds, or the request fails with 408.
    """
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    missing = ServiceError(
        422,
        "missing_image",
        "the request has no image: send it as the multipart file field 'image' or as the raw "
        "body with an image/* content type",
    )

    if media_type == "multipart/form-data":
        body = await _read_limited(
            request, max_upload_bytes + MULTIPART_OVERHEAD_BYTES, max_upload_bytes, timeout_s
        )
        data = await _image_from_multipart(request, body)
        if data is None:
            raise missing
    elif media_type.startswith("image/") or media_type in ("", "application/octet-stream"):
        data = await _read_limited(request, max_upload_bytes, max_upload_bytes, timeout_s)
    else:
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"content type {media_type!r} is not supported: send multipart/form-data with a "
            "file field 'image', or the raw image with an image/* content type",
        )

    if not data:
        raise missing
    if len(data) > max_upload_bytes:
        raise ServiceError(
            413,
            "payload_too_large",
            f"the image file has {len(data)} bytes, over the limit of {max_upload_bytes} bytes: "
            "send a smaller or more compressed image",
        )
    return data


async def _image_from_multipart(request: Request, body: bytes) -> bytes | None:
    """Parse an already size-checked multipart body; return the `image` field or None."""
    replayed = False

    async def replay_body() -> dict[str, Any]:
        nonlocal replayed
        if replayed:
            return {"type": "http.disconnect"}
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, receive=replay_body)
    try:
        form = await form_request.form(max_files=1, max_fields=16)
    except Exception as exc:  # noqa: BLE001
        # Starlette raises its own HTTPException or MultiPartException on malformed bodies.
        raise ServiceError(
            400,
            "invalid_multipart",
            f"the multipart body could not be parsed ({exc}): send one file field 'image'",
        ) from exc
    try:
        field = form.get("image")
        if isinstance(field, UploadFile):
            return await field.read()
        # Starlette drops a part that the body ends in, so a truncated body looks like one
        # without an image. The missing closing delimiter distinguishes the two.
        if not _has_closing_delimiter(request.headers.get("content-type", ""), body):
            raise ServiceError(
                400,
                "invalid_multipart",
                "the multipart body ends before its closing boundary: check that the upload "
                "is complete and that Content-Length matches the body",
            )
        if isinstance(field, str) and field:
            raise ServiceError(
                422,
                "missing_image",
                "the field 'image' is text, not a file: upload the image as a file "
                "(curl -F 'image=@photo.jpg')",
            )
        return None
    finally:
        await form.close()


def _has_closing_delimiter(content_type: str, body: bytes) -> bool:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    return bool(boundary) and b"--" + boundary + b"--" in body


def _validate_request(state: Any, budget: float, tasks: list[str]) -> None:
    from model_core.predictor import InvalidRequestError

    if not math.isfinite(budget):
        low, high = state.predictor.budget_range
        raise ServiceError(
            422,
            "invalid_budget",
            f"budget {budget} is not a finite number: pass a value in [{low:g}, {high:g}]",
        )
    # parse_tasks has already checked the task names, so whatever fails here is the budget.
    try:
        state.predictor.validate(budget, tasks)
    except InvalidRequestError as exc:
        raise ServiceError(422, "invalid_budget", str(exc)) from exc


def encode_output(
    task: str,
    value: Any,
    classes: dict[str, tuple[str, ...]],
    helper: Executor | None = None,
) -> TaskOutput:
    """Encode one predicted map as a base64 PNG. `helper` may compress half of a large map."""
    if task == "saliency":
        return TaskOutput(png=imaging.encode_saliency(value, helper))
    if task == "normals":
        return TaskOutput(png=imaging.encode_normals(value, helper))
    names = list(classes[task])
    return TaskOutput(png=imaging.encode_labels(value, names), classes=names)


def _decode_in_image_thread(niceness: int, *args: Any) -> imaging.DecodedImage:
    lower_thread_priority(niceness)
    return imaging.decode_upload(*args)


class MapEncoder:
    """Resize and encode the maps of one request after its forward pass.

    Each map gets its own worker thread. torch, numpy and ISA-L release the interpreter
    lock, so the maps of one request are processed in parallel when cores are idle, and the
    inference thread can run the next batch meanwhile. `limiter` caps the threads of all
    requests together, and `helper` compresses half of each large map when it is idle. Each
    thread's nice value is raised by `niceness` (service.priority).
    """

    def __init__(
        self,
        predictor: Predictor,
        size: tuple[int, int],
        limiter: anyio.CapacityLimiter | None,
        helper: Executor | None,
        niceness: int = 0,
    ) -> None:
        self._predictor = predictor
        self._size = size  # (height, width)
        self._limiter = limiter
        self._helper = helper
        self._niceness = niceness
        self._closed = False
        self._started: dict[str, asyncio.Future[TaskOutput]] = {}

    def _start(self, task: str, output: torch.Tensor) -> None:
        if self._closed:
            return
        work = anyio.to_thread.run_sync(self._finish, task, output, limiter=self._limiter)
        future = asyncio.ensure_future(work)
        # Retrieve the outcome even when the request fails before awaiting it.
        future.add_done_callback(_retrieve_outcome)
        self._started[task] = future

    def _finish(self, task: str, output: torch.Tensor) -> TaskOutput:
        if self._closed:
            # The request failed before this map's thread started.
            raise _MapSkipped(task)
        lower_thread_priority(self._niceness)
        use_torch_threads(1)  # no OpenMP team of its own (model_core.threads)
        value = self._predictor.postprocess(task, output, *self._size)
        if self._closed:
            # The request failed or timed out while this map was resized.
            raise _MapSkipped(task)
        return encode_output(task, value, self._predictor.classes, self._helper)

    async def encode_all(self, heads: HeadOutputs) -> dict[str, TaskOutput]:
        """Return every map of `heads` as a base64 PNG at the image's size, in `heads` order."""
        # The normals map starts first: its resize and encoding take about as long as the
        # three other maps together, so it would otherwise finish last on its own thread.
        for task in sorted(heads.outputs, key=lambda name: name != "normals"):
            self._start(task, heads.outputs[task])
        # Shielded, so that cancelling this request does not abandon a map's thread: the
        # request waits for it in wait_idle.
        return {task: await asyncio.shield(self._started[task]) for task in heads.outputs}

    def close(self) -> None:
        """Skip the maps not started yet, for a failed request."""
        self._closed = True

    async def wait_idle(self) -> None:
        """Wait until no map of this request is on a thread."""
        running = [future for future in self._started.values() if not future.done()]
        if running:
            await asyncio.wait(running)


class _MapSkipped(Exception):
    """A map of a failed request was not computed."""


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection. Call only after the body was read.

    Once the body is read, the server's next message for the request is its disconnect.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _await_prediction(
    request: Request,
    submitted: asyncio.Future[tuple[HeadOutputs, BatchTiming]],
    disconnected: asyncio.Future[None],
    maps: MapEncoder,
    timeout_s: float,
) -> tuple[HeadOutputs, BatchTiming]:
    """Wait for the batcher's result, or raise 499 as soon as the client leaves.

    Maps errors of the batcher to their HTTP errors, and skips the maps of a request that
    fails.
    """
    try:
        await asyncio.wait((submitted, disconnected), return_when=asyncio.FIRST_COMPLETED)
        if not submitted.done():
            raise _client_gone()
        return submitted.result()
    except (QueueFullError, BatcherClosedError) as exc:
        raise _unavailable(exc) from exc
    except RequestTimeoutError as exc:
        # The count leaves out this request, whose admission slot is still held.
        others = request.app.state.service.batcher.queue_depth - 1
        stage = f"in the batch queue or inference, with {others} other requests admitted"
        raise _timed_out(timeout_s, stage) from exc
    except ServiceError:
        raise
    except Exception as exc:
        logger.exception("inference failed for request %s", request.state.request_id)
        raise ServiceError(500, "inference_failed", f"inference failed ({exc}); retry") from exc
    finally:
        if not submitted.done():
            # Marks a queued job as abandoned, so that no batch runs it. The shutdown may
            # still fail the job before the cancellation lands, so its outcome is read here.
            submitted.cancel()
            submitted.add_done_callback(_retrieve_outcome)
            maps.close()
        elif submitted.cancelled() or submitted.exception() is not None:
            maps.close()


def _timed_out(timeout_s: float, stage: str) -> ServiceError:
    return ServiceError(
        504,
        "timeout",
        f"the request was not finished within {timeout_s:g} s of its upload ({stage}): retry "
        "later with a smaller image or budget, or raise ADAMTL_REQUEST_TIMEOUT_S",
    )


def _retrieve_outcome(future: asyncio.Future) -> None:
    # Reading the outcome keeps asyncio from logging "exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _client_gone() -> ServiceError:
    # The client has gone, so the status and type serve only the log line and the metrics.
    return ServiceError(
        499,
        "client_closed_request",
        "the client closed the connection before the response was ready, so the request was "
        "dropped: keep the connection open until the response arrives",
    )


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=_PREDICT_ERRORS,
    openapi_extra={"requestBody": _PREDICT_REQUEST_BODY},
    tags=["inference"],
    dependencies=[Depends(reject_repeated_parameters)],
)
async def predict(
    request: Request,
    state: ReadyStateDep,
    budget: Annotated[
        float,
        Query(
            description=(
                "Fraction of the static model's FLOPs the policy may spend on this image, within "
                "the checkpoint's budget range (see /v1/model)."
            )
        ),
    ] = 1.0,
    tasks: Annotated[
        str | None,
        Query(
            description=(
                "Comma-separated tasks to predict, e.g. `semseg,normals`; all tasks of the "
                "checkpoint when left out."
            ),
            examples=["semseg,normals"],
        ),
    ] = None,
) -> Response:
    """Predict the requested dense maps of one image under a compute budget."""
    settings = state.settings
    predictor, batcher, metrics = state.predictor, state.batcher, state.metrics
    assert predictor is not None
    assert batcher is not None
    assert metrics is not None

    task_list = parse_tasks(tasks, tuple(predictor.tasks))
    _validate_request(state, budget, task_list)
    request.state.budget = budget

    # Reject at once when the queue is full, before reading the body. The slot itself is
    # taken only after the upload, so slow clients cannot hold slots while they send.
    if batcher.is_full:
        raise _unavailable(
            QueueFullError(
                f"the queue is full ({batcher.queue_depth} of {batcher.max_queue_size} requests "
                "admitted)"
            )
        )
    data = await read_image_bytes(request, settings.max_upload_bytes, settings.upload_timeout_s)

    # Decoding and encoding a large image cost hundreds of MB, so both run inside the
    # admission slot: at most ADAMTL_MAX_QUEUE_SIZE requests hold decoded images at once, and
    # their decoded pixels count against ADAMTL_MAX_PIXELS_IN_FLIGHT until the response.
    try:
        # The readiness check let this request in, so it arrived before any drain began,
        # and the drain waits for it even when its upload ends after the drain's start.
        admission = batcher.admit(after_close=True)
    except (QueueFullError, BatcherClosedError) as exc:
        raise _unavailable(exc) from exc
    assert state.pixel_budget is not None
    with admission, PixelReservation(state.pixel_budget) as pixels:
        # ADAMTL_REQUEST_TIMEOUT_S covers decoding, the queue, inference, and resizing and
        # encoding the maps. A step already on a thread runs to its end, so the 504 may come
        # that much later.
        loop = asyncio.get_running_loop()
        timeout_s = settings.request_timeout_s
        deadline = loop.time() + timeout_s
        try:
            image = await anyio.to_thread.run_sync(
                _decode_in_image_thread,
                settings.image_thread_niceness,
                data,
                settings.max_image_pixels,
                predictor.input_size,
                pixels.reserve,
                limiter=state.image_limiter,
            )
        except imaging.ImageError as exc:
            raise ServiceError(exc.status_code, exc.error_type, str(exc)) from exc
        except PixelLimitError as exc:
            raise _unavailable(exc) from exc
        del data
        if loop.time() >= deadline:
            raise _timed_out(timeout_s, "while decoding the image")

        size = (image.height, image.width)
        maps = MapEncoder(
            predictor, size, state.image_limiter, state.png_helper, settings.image_thread_niceness
        )
        job = PredictJob(image.pixels, budget, task_list)
        submitted = asyncio.ensure_future(batcher.submit(job, deadline - loop.time(), admission))
        disconnected = asyncio.ensure_future(wait_for_disconnect(request))
        disconnected.add_done_callback(_retrieve_outcome)
        encoding: asyncio.Future[dict[str, TaskOutput]] | None = None
        try:
            prediction, timing = await _await_prediction(
                request, submitted, disconnected, maps, timeout_s
            )
            # The pixels are not needed after inference, and a 40-megapixel image takes
            # 120 MB while the request waits for its maps.
            del image, job
            encoding = asyncio.ensure_future(maps.encode_all(prediction))
            await asyncio.wait(
                (encoding, disconnected),
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if disconnected.done() and not encoding.done():
                raise _client_gone()
            if not encoding.done():
                # The finally block skips the maps not started yet.
                raise _timed_out(timeout_s, "while resizing and encoding the maps")
            try:
                outputs = encoding.result()
            except Exception as exc:
                logger.exception("post-processing failed for request %s", request.state.request_id)
                raise ServiceError(
                    500, "inference_failed", f"post-processing failed ({exc}); retry"
                ) from exc
        finally:
            disconnected.cancel()
            # Threads cannot be stopped, so the request ends after its maps already on a
            # thread. Its admission slot then covers their memory, and no map runs on during
            # the process's exit. Maps not started yet are skipped. The wait is shielded
            # because the shutdown's deadline may have cancelled this request.
            with anyio.CancelScope(shield=True):
                if encoding is not None and not encoding.done():
                    encoding.cancel()
                    await asyncio.wait((encoding,))
                maps.close()
                await maps.wait_idle()
    stats = prediction.stats
    metrics.observe_image(stats)
    metrics.queue_wait.observe(timing.queue_s)
    request.state.flops_ratio = stats["flops_ratio"]

    info = state.model_info
    body = PredictResponse(
        request_id=request.state.request_id,
        model=ModelRef(name=info["name"], version=info["version"]),
        image=ImageSize(width=size[1], height=size[0]),
        budget=budget,
        tasks=list(stats.get("tasks", task_list)),
        compute=Compute(
            flops=stats["flops"],
            static_flops=stats["static_flops"],
            flops_ratio=stats["flops_ratio"],
            tokens_ratio=stats["tokens_ratio"],
            tokens_ratio_per_stage=list(stats["tokens_ratio_per_stage"]),
            blocks_executed=stats["blocks_executed"],
            blocks_total=stats["blocks_total"],
        ),
        timing_ms=Timing(
            queue=timing.queue_s * 1000.0,
            inference=timing.inference_s * 1000.0,
            total=(time.perf_counter() - request.state.started) * 1000.0,
        ),
        outputs=outputs,
    )
    # Serialised here, once, by pydantic. FastAPI would validate the finished model again and
    # then encode it with the json module, which took 0.7 ms longer for a 400 KB body.
    return Response(body.model_dump_json(exclude_none=True), media_type="application/json")


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={503: _error("The model is still loading, or the service is draining.")},
    tags=["model"],
)
async def read_model(state: ReadyStateDep) -> ModelInfo:
    """Describe the served checkpoint: tasks, classes, input size, FLOPs, budget range, training."""
    return ModelInfo(**state.model_info)


@router.get("/healthz", response_model=HealthStatus, tags=["health"])
async def read_health() -> HealthStatus:
    """Report that the process is alive (liveness)."""
    return HealthStatus(status="ok")


@router.get(
    "/readyz",
    response_model=HealthStatus,
    responses={503: _error("The model is loading or warming up, or the service is draining.")},
    tags=["health"],
)
async def read_readiness(state: ReadyStateDep) -> HealthStatus:
    """Report 200 once the model is loaded and warmed up, 503 before that and while draining."""
    return HealthStatus(status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text."}},
    tags=["health"],
)
async def read_metrics(state: StateDep) -> Response:
    """Expose the service's metrics in the Prometheus text format."""
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
