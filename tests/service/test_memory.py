"""Returning freed heap memory to the system: glibc's malloc_trim, alone and in the service."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from pydantic import ValidationError

from service.app import create_app
from service.memory import MemoryTrimmer, load_malloc_trim
from service.settings import Settings, format_settings_error
from tests.service.conftest import make_settings

needs_glibc = pytest.mark.skipif(
    load_malloc_trim() is None, reason="malloc_trim is glibc's; this C library has none"
)

# Runs in a fresh interpreter, so that the heap state of the test process does not matter.
# 1,000 blocks of 64 KiB stay below glibc's mmap threshold (128 KiB), so they come from the
# heap. One block allocated after them and kept stops free() from shrinking the heap's top.
_FRAGMENTED_HEAP = textwrap.dedent(
    """
    import ctypes, ctypes.util
    from service.memory import load_malloc_trim

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    size = 64 * 1024
    blocks = [libc.malloc(size) for _ in range(1000)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    guard = libc.malloc(size)
    ctypes.memset(guard, 1, size)
    for block in blocks:
        libc.free(block)
    before = rss_kib()
    load_malloc_trim()(0)
    print(before, rss_kib())
    """
)


@needs_glibc
def test_malloc_trim_returns_freed_pages():
    result = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    before_kib, after_kib = map(int, result.stdout.split())
    freed_kib = 1000 * 64
    # free() leaves the blocks resident, and the trim returns most of them.
    assert before_kib - after_kib > freed_kib // 2, (before_kib, after_kib)


@needs_glibc
def test_trimmer_runs_on_schedule_and_stops():
    trimmer = MemoryTrimmer(0.02, load_malloc_trim())

    async def scenario() -> tuple[int, int]:
        trimmer.start()
        await asyncio.sleep(0.5)
        await trimmer.stop()
        stopped_at = trimmer.trims
        await asyncio.sleep(0.1)
        return stopped_at, trimmer.trims

    stopped_at, later = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert stopped_at >= 3
    assert later == stopped_at  # nothing trims after stop()
    assert trimmer.last_duration_s > 0


def test_trimmer_without_malloc_trim_does_nothing():
    trimmer = MemoryTrimmer(0.01, None)  # a C library without malloc_trim, as musl or macOS
    assert not trimmer.available
    assert trimmer.trim_now() == 0

    async def start_and_stop() -> bool:
        trimmer.start()
        running = trimmer.running
        await trimmer.stop()
        return running

    assert asyncio.run(start_and_stop()) is False
    assert trimmer.trims == 0


def test_trimmer_stop_waits_for_trim_in_progress():
    entered, release = threading.Event(), threading.Event()
    finished = []

    def slow_trim(pad: int) -> int:  # a malloc_trim call that takes until release is set
        entered.set()
        release.wait(10)
        finished.append(pad)
        return 1

    trimmer = MemoryTrimmer(0.01, slow_trim)

    async def scenario() -> bool:
        trimmer.start()
        while not entered.is_set():
            await asyncio.sleep(0.005)
        stopping = asyncio.create_task(trimmer.stop())
        await asyncio.sleep(0.2)
        waited = not stopping.done()
        release.set()
        await stopping
        return waited

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) is True
    assert finished == [0]
    assert not trimmer.running


def test_trimmer_failure_stops_trimming(caplog):
    def failing_trim(pad: int) -> int:
        raise OSError("simulated failure")

    trimmer = MemoryTrimmer(0.01, failing_trim)

    async def scenario() -> None:
        trimmer.start()
        await asyncio.sleep(0.3)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert not trimmer.running
    assert "malloc_trim failed, so the service stops trimming" in caplog.text


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_trimmer_rejects_non_positive_interval(interval):
    with pytest.raises(ValueError, match="interval_s must be positive"):
        MemoryTrimmer(interval, load_malloc_trim())


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-5, "must be 0 (trimming off) or at least 1 s"),
        (0.5, "must be 0 (trimming off) or at least 1 s"),
        (float("nan"), "finite number"),
        (1e9, "less than or equal to 86400"),
        ("often", "valid number"),
    ],
)
def test_bad_trim_interval_names_the_variable(value, reason):
    with pytest.raises(ValidationError) as error:
        Settings(malloc_trim_interval_s=value)
    message = format_settings_error(error.value)
    assert f"ADAMTL_MALLOC_TRIM_INTERVAL_S={value!r}" in message
    assert reason in message


@pytest.mark.parametrize("interval_s", [1.0, 0.0])
def test_service_trims_while_serving(checkpoint_path, interval_s):
    app = create_app(make_settings(checkpoint_path, malloc_trim_interval_s=interval_s))
    state = app.state.service

    async def scenario() -> tuple[int, int, bool]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async with app.router.lifespan_context(app):
                ready = await client.get("/readyz")
                running = state.trimmer is not None and state.trimmer.running
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline and not (state.trimmer and state.trimmer.trims):
                    await asyncio.sleep(0.05)
                trims = state.trimmer.trims if state.trimmer is not None else 0
        return ready.status_code, trims, running

    status, trims, running = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert status == 200
    if interval_s == 0:
        assert state.trimmer is None
        assert trims == 0
    elif load_malloc_trim() is not None:
        assert running
        assert trims >= 1
        assert not state.trimmer.running  # stopped with the lifespan
    else:
        assert not running
        assert not state.trimmer.available
