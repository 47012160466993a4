"""Let glibc's malloc reuse freed tensor memory instead of returning it to the kernel at once.

By default glibc serves an allocation of 128 KiB or more with a mapping of its own, unmaps it
on `free`, and adjusts that threshold to the program's allocations (glibc manual, "Malloc
Tunable Parameters"). Each fresh mapping costs a page fault per 4 KiB page at first touch,
which the kernel fills with zeros. A forward pass and its post-processing allocate many
buffers of a few megabytes. A loop that allocated and freed a 640x480x3 float32 array and
three more took 2,596 page faults and 5.0 ms per round with glibc 2.36's defaults, against 52
faults and 0.67 ms with the settings below (development machine). They keep freed blocks of
up to 32 MiB inside the heap, and return free memory at the heap's top to the kernel only once
more than 64 MiB of it has gathered. A process that calls `malloc_trim` (as the service does
periodically) still hands the rest back.

A threshold that an environment variable sets (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_` or its name in `GLIBC_TUNABLES`) keeps the environment's value.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "reuse_freed_memory"]

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks up to 32 MiB come from the heap. Larger ones still get a mapping of their own.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024

# Per mallopt parameter: our value, the environment variable and the glibc tunable that set it.
_THRESHOLDS = (
    (
        _M_MMAP_THRESHOLD,
        MMAP_THRESHOLD_BYTES,
        "MALLOC_MMAP_THRESHOLD_",
        "glibc.malloc.mmap_threshold",
    ),
    (
        _M_TRIM_THRESHOLD,
        TRIM_THRESHOLD_BYTES,
        "MALLOC_TRIM_THRESHOLD_",
        "glibc.malloc.trim_threshold",
    ),
)


def _tunable_names(environ: Mapping[str, str]) -> set[str]:
    """Return the names in GLIBC_TUNABLES, a colon-separated list of name=value pairs."""
    pairs = environ.get("GLIBC_TUNABLES", "").split(":")
    return {pair.split("=", 1)[0] for pair in pairs if "=" in pair}


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).

    A threshold that the environment sets keeps its value, and the other one is still raised.
    Setting either one stopped glibc 2.36's own adjustment of the mmap threshold, so leaving
    the other at its default would map every block of 128 KiB or more afresh.

    Call it once, early: allocations made before keep their place. Calling it again is safe.

    Returns:
        True when this call set both thresholds. False where the C library has no `mallopt`
        (musl, macOS), where glibc refused a value, or where the environment sets either one.
    """
    try:
        # The C library this process has loaded already, without searching the file system.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    tunables = _tunable_names(os.environ)
    all_set = True
    for parameter, value, variable, tunable in _THRESHOLDS:
        if variable in os.environ or tunable in tunables:
            all_set = False
        elif mallopt(parameter, value) != 1:  # mallopt returns 1 on success
            all_set = False
    return all_set
