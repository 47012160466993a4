"""Scheduling priority of the threads that decode uploads and encode maps.

Under load every request waits for the one inference thread, while the image threads decode,
resize and encode on the remaining cores. When they outnumber the free cores, the kernel
shares a core between an image thread and the inference thread, and every batch takes
longer. A higher nice value for the image threads lets the inference thread run first.

On Linux each thread has its own nice value, set through `setpriority` with the thread's id.
Elsewhere that call would change the whole process, so `lower_thread_priority` does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["lower_thread_priority"]

logger = logging.getLogger(__name__)

_MAX_NICE = 19
_lowered = threading.local()


def lower_thread_priority(niceness: int) -> None:
    """Set the calling thread's nice value to the process's plus `niceness`, capped at 19.

    A thread inherits the nice value of the thread that started it, so a thread started by an
    image thread may have it already: the value is never lowered. Runs once per thread.
    Failures are logged and otherwise ignored: the thread then runs at its old priority.
    """
    if niceness <= 0 or sys.platform != "linux" or getattr(_lowered, "done", False):
        return
    _lowered.done = True
    thread_id = threading.get_native_id()
    try:
        # The main thread's id is the process id, and its nice value the process's.
        target = min(_MAX_NICE, os.getpriority(os.PRIO_PROCESS, os.getpid()) + niceness)
        if os.getpriority(os.PRIO_PROCESS, thread_id) < target:
            os.setpriority(os.PRIO_PROCESS, thread_id, target)
    except OSError as exc:
        logger.warning("could not raise the nice value of thread %d: %s", thread_id, exc)
