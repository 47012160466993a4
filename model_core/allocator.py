"""Let glibc's malloc reuse freed tensor memory instead of returning it to the kernel at once.

By default glibc serves an allocation of 128 KiB or more with a mapping of its own and unmaps
it on `free`, raising that threshold as mapped blocks are freed (mallopt(3)). Each fresh
mapping costs a page fault per 4 KiB page at first touch, which the kernel fills with zeros.
A forward pass and its post-processing allocate many buffers of a few megabytes. A loop that
allocated and freed a 640x480x3 float32 array and three more took 2,596 page faults and 5.0
ms per round with glibc 2.36's defaults, against 52 faults and 0.67 ms with the settings
below (development machine). They keep freed blocks of up to 32 MiB inside the heap,
and return free memory at the heap's top to the kernel only once more than 64 MiB of it has
gathered. A process that calls `malloc_trim` (as the service does periodically) still hands
the rest back.

Environment variables that set these thresholds take precedence: `reuse_freed_memory` then
changes nothing.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "reuse_freed_memory"]

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# The largest threshold glibc accepts on 64-bit systems (half of its 64 MiB heap size).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024

_THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_THRESHOLD_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def _set_by_environment() -> bool:
    if any(name in os.environ for name in _THRESHOLD_VARIABLES):
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in tunables for name in _THRESHOLD_TUNABLES)


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).

    Call it once, early; allocations made before keep their place. Safe to call again.

    Returns:
        True when the thresholds were set. False where the C library has no `mallopt` (musl,
        macOS), where glibc refused a value, or where the environment sets either threshold.
    """
    if _set_by_environment():
        return False
    try:
        # The C library this process has loaded already, without searching the file system.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. Setting either threshold also stops glibc's own
    # adjustment of both (mallopt(3)).
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    trimmed = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return mapped and trimmed
