"""Micro-batching: one admission-limited queue and one batcher that runs a batch function in a
worker thread, so inference never blocks the event loop.

Requests with different parameters share a batch: the batch function receives one payload per
request and must return one result per payload, in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

PayloadT = TypeVar("PayloadT")
ResultT = TypeVar("ResultT")


class QueueFullError(RuntimeError):
    """The admission limit is reached; the client should retry later (HTTP 503)."""


class BatcherClosedError(RuntimeError):
    """The batcher is not running, or is draining for shutdown (HTTP 503)."""


class RequestTimeoutError(TimeoutError):
    """A request was not finished within its timeout (HTTP 504)."""


@dataclass(frozen=True)
class BatchTiming:
    """Time spent on one request, in seconds."""

    queue_s: float  # from admission to the start of its batch
    inference_s: float  # the whole batch function call
    batch_size: int


@dataclass(eq=False)
class _Job(Generic[PayloadT]):
    payload: PayloadT
    future: asyncio.Future
    admitted_at: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # the caller timed out or went away; skip it if still queued


class Admission:
    """One admission slot of a Batcher, held from admit() until release().

    Usable as a context manager that releases the slot on exit; releasing twice is harmless.
    """

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._batcher._set_admitted(self._batcher._admitted - 1)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Batcher(Generic[PayloadT, ResultT]):
    """Collect concurrent requests into batches and run them one batch at a time.

    A batch starts when `max_batch_size` requests are queued, or `max_wait_s` after its oldest
    request was admitted, whichever comes first. Requests that queue while a batch runs form the
    next one.

    Args:
        predict_batch: Called in the worker thread with up to `max_batch_size` payloads; returns
            one result per payload, in order.
        max_batch_size: Payloads per call of `predict_batch`, at most.
        max_wait_s: Seconds a batch waits to fill after its oldest request was admitted.
        max_queue_size: Requests admitted at once (queued or running); more raise QueueFullError.
        on_batch: Called on the event loop after each batch with (batch size, duration in s).
        on_queue_depth: Called with the number of admitted requests whenever it changes.
    """

    def __init__(
        self,
        predict_batch: Callable[[list[PayloadT]], Sequence[ResultT]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue_size < max_batch_size:
            raise ValueError(
                f"max_queue_size {max_queue_size} must be at least max_batch_size "
                f"{max_batch_size}, or batches could never fill"
            )
        self._predict_batch = predict_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth

        self._queue: deque[_Job[PayloadT]] = deque()
        self._admitted = 0
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._accepting = False
        # Jobs of the batch now in the inference thread, which stop() fails on a timeout.
        self._running: list[_Job[PayloadT]] = []

    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet finished."""
        return self._admitted

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="adamtl-inference"
        )
        self._task = asyncio.create_task(self._run(), name="adamtl-batcher")
        self._accepting = True

    def close(self) -> None:
        """Stop admitting new requests. Admitted ones still run until stop() ends the loop."""
        self._accepting = False

    async def run_in_worker(self, function: Callable[[], Any]) -> Any:
        """Run `function` in the inference thread, e.g. a warm-up batch before serving."""
        if self._executor is None:
            raise BatcherClosedError("the batcher is not running: call start() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def admit(self, after_close: bool = False) -> Admission:
        """Reserve one of the `max_queue_size` admission slots before any costly work.

        Hold the slot while the request decodes its input and waits for its result, then
        release it, e.g. `with batcher.admit() as admission: ...`.

        Args:
            after_close: admit even after close(), as long as the loop runs: for a request
                that arrived before the drain began and has only now finished its upload.

        Raises:
            QueueFullError: `max_queue_size` requests are already admitted.
            BatcherClosedError: The batcher is stopped, or closed for draining.
        """
        if not self._accepting and not (after_close and self._task is not None):
            raise BatcherClosedError("the service is shutting down and accepts no new requests")
        if self._admitted >= self.max_queue_size:
            raise QueueFullError(
                f"the queue is full ({self._admitted} of {self.max_queue_size} requests admitted)"
            )
        self._set_admitted(self._admitted + 1)
        return Admission(self)

    @property
    def is_full(self) -> bool:
        """Whether admit() would raise QueueFullError now."""
        return self._admitted >= self.max_queue_size

    async def submit(
        self, payload: PayloadT, timeout_s: float, admission: Admission | None = None
    ) -> tuple[ResultT, BatchTiming]:
        """Queue one payload and wait for its result.

        Args:
            payload: Passed to `predict_batch`.
            timeout_s: Seconds from this call until RequestTimeoutError.
            admission: A slot from admit() that the caller holds and releases; without one,
                submit admits the payload itself and releases the slot when it returns. A
                request admitted before close() may still submit until stop() ends the loop.

        Raises:
            QueueFullError: `max_queue_size` requests are already admitted.
            BatcherClosedError: The batcher is stopped, or closed and `admission` is None.
                Also raised for a request that was queued or running when stop() timed out.
            RequestTimeoutError: No result within `timeout_s` seconds.
            Exception: Whatever `predict_batch` raised for this payload.
        """
        if admission is None:
            with self.admit() as own_admission:
                return await self.submit(payload, timeout_s, own_admission)
        if admission.released:
            raise RuntimeError("submit() got an admission that was already released")
        if self._task is None:
            raise BatcherClosedError("the service is shutting down and accepts no new requests")

        job: _Job[PayloadT] = _Job(payload, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except TimeoutError as exc:
            raise RequestTimeoutError(
                f"the request was not finished within {timeout_s:g} s "
                f"({self._admitted - 1} other requests admitted)"
            ) from exc
        finally:
            if not job.future.done():
                job.abandoned = True

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop admitting, finish what is queued within `drain_timeout_s`, then stop the loop.

        Requests still queued or in the running batch after the timeout fail with
        BatcherClosedError. The thread of the running batch cannot be interrupted, so it runs
        to its end in the background and its results are dropped. Calling stop() again after
        it returned does nothing.
        """
        self.close()
        if self._task is None:
            return
        if not self._is_drained():
            try:
                await asyncio.wait_for(self._wait_drained(), drain_timeout_s)
            except TimeoutError:
                queued = self._live_jobs()
                running_count = sum(not job.abandoned for job in self._running)
                if queued or running_count:
                    # The service's drain waits itself and then calls stop(0), so the
                    # timeout here is not the one a user set.
                    logger.warning(
                        "stopping the batcher with %d requests queued and %d in the running "
                        "batch; failing them",
                        queued,
                        running_count,
                    )
        running = self._running
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        for job in running:
            if not job.future.done():
                job.future.set_exception(
                    BatcherClosedError("the service shut down before this request finished")
                )
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(
                    BatcherClosedError("the service shut down before this request ran")
                )
        assert self._executor is not None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _is_drained(self) -> bool:
        assert self._idle is not None
        return not self._queue and self._idle.is_set()

    async def _wait_drained(self) -> None:
        while not self._is_drained():
            await asyncio.sleep(0.01)

    def _set_admitted(self, count: int) -> None:
        self._admitted = count
        if self._on_queue_depth is not None:
            self._on_queue_depth(count)

    def _drop_abandoned(self) -> None:
        while self._queue and self._queue[0].abandoned:
            self._queue.popleft()

    def _live_jobs(self) -> int:
        return sum(not job.abandoned for job in self._queue)

    async def _run(self) -> None:
        assert self._wakeup is not None and self._idle is not None
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue

            # Wait for the batch to fill, counting from its oldest request's admission.
            deadline = self._queue[0].admitted_at + self.max_wait_s
            while self._live_jobs() < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break

            batch: list[_Job[PayloadT]] = []
            while self._queue and len(batch) < self.max_batch_size:
                job = self._queue.popleft()
                if not job.abandoned:
                    batch.append(job)
            if not batch:
                continue

            self._idle.clear()
            self._running = batch
            started = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_batch, batch)
            finally:
                self._idle.set()
            self._running = []
            duration = time.perf_counter() - started
            if self._on_batch is not None:
                self._on_batch(len(batch), duration)
            self._deliver(batch, outcomes, started, duration)
            # Release the batch's payloads now rather than when the next batch forms, because
            # a payload may be large, such as a decoded image.
            del batch, outcomes, job

    def _deliver(
        self,
        batch: list[_Job[PayloadT]],
        outcomes: list[ResultT | BaseException],
        started: float,
        duration: float,
    ) -> None:
        """Hand each waiting job its result or exception."""
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done() or job.abandoned:
                continue
            timing = BatchTiming(started - job.admitted_at, duration, len(batch))
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result((outcome, timing))

    def _run_batch(self, batch: list[_Job[PayloadT]]) -> list[ResultT | BaseException]:
        """Run one batch in the worker thread; return a result or an exception per job."""
        payloads = [job.payload for job in batch]
        try:
            results = list(self._predict_batch(payloads))
            if len(results) != len(payloads):
                raise RuntimeError(
                    f"the batch function returned {len(results)} results for "
                    f"{len(payloads)} payloads"
                )
            return results
        except Exception as exc:
            if len(batch) == 1:
                logger.exception("inference failed for a batch of 1")
                return [exc]
            # One bad payload should not fail its neighbours: run each alone to isolate it.
            logger.exception("inference failed for a batch of %d; retrying one by one", len(batch))
        outcomes: list[ResultT | BaseException] = []
        for payload in payloads:
            try:
                outcomes.append(self._predict_batch([payload])[0])
            except Exception as exc:
                logger.exception("inference failed for a single request")
                outcomes.append(exc)
        return outcomes
