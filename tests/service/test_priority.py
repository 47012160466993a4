"""Image threads: nice values raised once per thread, and torch kept to one OpenMP team."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import httpx
import pytest
import torch
from fastapi.routing import APIRoute

from service.app import create_app, threads_for_batch
from service.priority import lower_thread_priority
from service.routes import router
from tests.service.conftest import make_settings

T = TypeVar("T")

needs_linux = pytest.mark.skipif(
    sys.platform != "linux", reason="only Linux gives each thread its own nice value"
)


def _nice(thread_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread_id)


def _in_new_thread(function) -> list[int]:
    """Run `function(record)` in a fresh thread; `record()` notes the thread's nice value."""
    values: list[int] = []

    def run() -> None:
        function(lambda: values.append(_nice(threading.get_native_id())))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return values


@needs_linux
def test_niceness_is_added_once_per_thread():
    def steps(record) -> None:
        record()
        lower_thread_priority(3)
        record()
        lower_thread_priority(3)
        record()

    base = _nice(os.getpid())
    start, once, twice = _in_new_thread(steps)
    assert start == base
    assert once == min(19, base + 3)
    assert twice == once
    assert _nice(os.getpid()) == base


@needs_linux
def test_inherited_niceness_is_not_added_again():
    values: list[int] = []

    def child() -> None:
        lower_thread_priority(3)
        values.append(_nice(threading.get_native_id()))

    def parent() -> None:
        lower_thread_priority(3)
        values.append(_nice(threading.get_native_id()))
        # The child inherits the raised value, and lowering it again adds nothing.
        thread = threading.Thread(target=child)
        thread.start()
        thread.join()

    thread = threading.Thread(target=parent)
    thread.start()
    thread.join()
    assert values == [min(19, _nice(os.getpid()) + 3)] * 2


@needs_linux
def test_niceness_is_capped_at_19():
    assert _in_new_thread(lambda record: (lower_thread_priority(25), record())) == [19]


@needs_linux
def test_higher_nice_value_is_kept():
    def steps(record) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 18)
        lower_thread_priority(3)
        record()

    assert _in_new_thread(steps) == [max(18, min(19, _nice(os.getpid()) + 3))]


@needs_linux
def test_zero_niceness_changes_nothing():
    def steps(record) -> None:
        record()
        lower_thread_priority(0)
        record()

    before, after = _in_new_thread(steps)
    assert after == before


def _predict_then_read(app, jpeg: bytes, read_state: Callable[[], T]) -> tuple[int, T]:
    """Serve one /predict of `jpeg` in-process, and return its status and `read_state()`.

    `read_state` runs after the response and before the lifespan ends, while the service's
    threads still exist.
    """

    async def scenario() -> tuple[int, T]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async with app.router.lifespan_context(app):
                response = await client.post(
                    "/predict",
                    params={"budget": 0.6},
                    content=jpeg,
                    headers={"content-type": "image/jpeg"},
                )
                return response.status_code, read_state()

    return asyncio.run(asyncio.wait_for(scenario(), 120))


@needs_linux
def test_service_lowers_image_threads_only(checkpoint_path, photos):
    app = create_app(make_settings(checkpoint_path, image_thread_niceness=4))
    base = _nice(os.getpid())

    def read_nice_values() -> dict[str, int]:
        return {
            thread.name: _nice(thread.native_id)
            for thread in threading.enumerate()
            if thread.native_id is not None
        }

    status, nice = _predict_then_read(app, photos["rocket.jpg"], read_nice_values)
    assert status == 200
    inference = [value for name, value in nice.items() if name.startswith("adamtl-inference")]
    assert inference == [base]
    helper = [value for name, value in nice.items() if name.startswith("adamtl-png")]
    assert helper == [min(19, base + 4)]
    # The four maps and the upload were decoded and encoded on anyio's worker threads.
    workers = [value for name, value in nice.items() if name.startswith("AnyIO worker")]
    assert workers
    assert all(value == min(19, base + 4) for value in workers)


def test_request_dependencies_stay_off_image_threads():
    # FastAPI runs a plain-function dependency on anyio's worker threads, the threads whose
    # nice value image work raises, so every dependency must be a coroutine function.
    calls = []

    def collect(dependant) -> None:
        for dependency in dependant.dependencies:
            calls.append(dependency.call)
            collect(dependency)

    for route in router.routes:
        if isinstance(route, APIRoute):
            collect(route.dependant)
    assert calls
    assert [call.__name__ for call in calls if not inspect.iscoroutinefunction(call)] == []


def _native_threads() -> set[int]:
    """Ids of the process's threads that Python did not start, such as OpenMP's workers."""
    started_by_python = {thread.native_id for thread in threading.enumerate()}
    return {int(name) for name in os.listdir("/proc/self/task")} - started_by_python


@needs_linux
def test_service_starts_one_openmp_team(checkpoint_path, photos):
    # With 2 torch threads, the inference thread's team adds one OpenMP worker (none on a
    # single CPU, where the service caps the count at 1). The loading thread and the four map
    # threads run torch on one thread each and add none.
    app = create_app(make_settings(checkpoint_path, torch_threads=2))
    before = _native_threads()
    try:
        status, new_workers = _predict_then_read(
            app, photos["rocket.jpg"], lambda: len(_native_threads() - before)
        )
    finally:
        # The lifespan set the count that threads started later inherit: restore the tests' 1.
        torch.set_num_threads(1)
    assert status == 200
    assert new_workers == min(2, len(os.sched_getaffinity(0))) - 1


@pytest.mark.parametrize(
    ("max_threads", "cpus", "busy", "expected"),
    [
        (2, 2, 0, 2),  # a lone request gets every core
        (2, 2, 1, 1),
        (2, 2, 5, 1),  # never fewer than 1
        (1, 2, 0, 1),  # never more than the setting
        (4, 2, 0, 2),  # nor more than the CPUs
        (8, 16, 4, 8),
        (8, 16, 12, 4),
    ],
)
def test_batch_threads_leave_busy_cores(max_threads, cpus, busy, expected):
    assert threads_for_batch(max_threads, cpus, busy) == expected
