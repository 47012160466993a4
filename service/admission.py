"""Admission limit on the decoded pixels of the prediction requests in flight."""

from __future__ import annotations

import threading
from collections.abc import Callable

from service.batching import QueueFullError


class PixelLimitError(QueueFullError):
    """An image whose decoded pixels do not fit under the limit of pixels in flight (HTTP 503)."""


class PixelBudget:
    """The decoded pixels that the requests in flight hold together, and their upper limit.

    Thread-safe, because decoding threads reserve pixels and the event loop releases them.

    Args:
        limit: Pixels that may be reserved at once (ADAMTL_MAX_PIXELS_IN_FLIGHT).
        on_change: Called with the reserved total whenever it changes, on the calling thread.
    """

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._on_change = on_change
        self._reserved = 0
        self._lock = threading.Lock()

    @property
    def reserved(self) -> int:
        """Pixels reserved now."""
        return self._reserved

    def reserve(self, pixels: int) -> None:
        """Reserve `pixels`, or raise PixelLimitError if they do not fit under the limit."""
        with self._lock:
            if self._reserved + pixels > self.limit:
                raise PixelLimitError(
                    f"an image of {pixels} decoded pixels does not fit, because the requests in "
                    f"flight hold {self._reserved} of the {self.limit} allowed by "
                    "ADAMTL_MAX_PIXELS_IN_FLIGHT"
                )
            self._reserved += pixels
            total = self._reserved
        if self._on_change is not None:
            self._on_change(total)

    def release(self, pixels: int) -> None:
        """Give back `pixels` reserved earlier."""
        with self._lock:
            self._reserved -= pixels
            total = self._reserved
        if self._on_change is not None:
            self._on_change(total)


class PixelReservation:
    """The pixels that one request reserves while it decodes, released when the request ends.

    Use as a context manager. `reserve` may run on the decoding thread, and exiting releases
    whatever it reserved.
    """

    def __init__(self, budget: PixelBudget) -> None:
        self._budget = budget
        self.pixels = 0

    def reserve(self, pixels: int) -> None:
        """Reserve `pixels` more for this request; raises PixelLimitError if they do not fit."""
        self._budget.reserve(pixels)
        self.pixels += pixels

    def release(self) -> None:
        """Release this request's pixels; releasing twice is harmless."""
        if self.pixels:
            self._budget.release(self.pixels)
            self.pixels = 0

    def __enter__(self) -> PixelReservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
