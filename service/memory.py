"""Giving freed heap memory back to the system while the service runs.

Every request allocates and frees megabytes: the decoded image, the head outputs, the maps at
the image's size and their PNGs, on several threads. glibc keeps freed memory inside its
per-thread arenas for reuse, so resident memory stays at its high-water mark after a burst of
load. `malloc_trim(0)` hands the free pages back. `MemoryTrimmer` calls it at a fixed interval
on a worker thread of the event loop's default executor. Under load one call took 2 to 44 ms
(median 16 ms) on a 2-core machine, so the default interval of 10 s costs under 0.5 % of a
core.

Only glibc has `malloc_trim`. Elsewhere (musl, macOS) `MemoryTrimmer.available` is False and
the trimmer does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Callable

__all__ = ["MIN_INTERVAL_S", "MemoryTrimmer", "load_malloc_trim"]

logger = logging.getLogger(__name__)

# Shortest interval the service accepts. Shorter ones would keep a thread in malloc_trim most
# of the time, holding each arena's lock in turn while the image threads allocate.
MIN_INTERVAL_S = 1.0


def load_malloc_trim() -> Callable[[int], int] | None:
    """Return glibc's `malloc_trim`, or None where the C library has none."""
    try:
        # The C library this process has loaded already, without searching the file system.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryTrimmer:
    """Periodic caller of `malloc_trim(0)`, driven by an asyncio task.

    Each call runs on a worker thread, so the event loop keeps serving while glibc walks its
    arenas.

    Attributes:
        interval_s: seconds between trims.
        trims: trims done so far.
        last_duration_s: seconds the last trim took.
    """

    def __init__(self, interval_s: float, trim: Callable[[int], int] | None) -> None:
        """`trim` is `load_malloc_trim()`, or None where the C library has none."""
        if not interval_s > 0:  # also rejects NaN
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._trim = trim
        self._task: asyncio.Task[None] | None = None
        self._in_progress: asyncio.Future[int] | None = None
        self.trims = 0
        self.last_duration_s = 0.0

    @property
    def available(self) -> bool:
        """Whether the C library has `malloc_trim`."""
        return self._trim is not None

    @property
    def running(self) -> bool:
        """Whether the trimming task is scheduled and has not ended."""
        return self._task is not None and not self._task.done()

    def trim_now(self) -> int:
        """Trim once on the calling thread and return malloc_trim's result (0 without it).

        glibc returns 1 whenever it advised the kernel to drop free pages, also pages that an
        earlier trim dropped already, so 1 does not mean that resident memory fell.
        """
        if self._trim is None:
            return 0
        started = time.perf_counter()
        result = self._trim(0)
        self.last_duration_s = time.perf_counter() - started
        self.trims += 1
        logger.debug(
            "malloc_trim(0) took %.1f ms and returned %d", 1000 * self.last_duration_s, result
        )
        return result

    def start(self) -> None:
        """Start trimming in the running event loop. Does nothing without `malloc_trim`."""
        if self._trim is None or self.running:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="adamtl-trim")

    async def stop(self) -> None:
        """Stop the trimming task and wait for a trim in progress to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the caller of stop() is being cancelled, not only the task
        if self._in_progress is not None:
            # A thread cannot be interrupted, so wait for it to finish before the loop closes.
            await asyncio.wait([self._in_progress])

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._in_progress = asyncio.ensure_future(asyncio.to_thread(self.trim_now))
            try:
                await asyncio.shield(self._in_progress)
            except Exception:
                logger.exception("malloc_trim failed, so the service stops trimming")
                return
