"""Idle and slow connections against a real `python -m service` process on 127.0.0.1."""

from __future__ import annotations

import logging
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from service.server import RepeatedMessageFilter, raise_open_file_limit
from tests.service.conftest import free_port
from tests.service.test_main import REPO_ROOT, finish, service_env, wait_until_ready

HEADER_TIMEOUT_S = 1.0


@contextmanager
def service_process(
    checkpoint: Path, preexec: Callable[[], None] | None = None, **variables: str
) -> Iterator[tuple[subprocess.Popen, tuple[str, int]]]:
    """Run `python -m service` with a 1 s header timeout; yield the process and its address."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--checkpoint", str(checkpoint)],
        cwd=REPO_ROOT,
        env=service_env(
            ADAMTL_HOST="127.0.0.1",
            ADAMTL_TORCH_THREADS="1",
            ADAMTL_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
            **variables,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_until_ready(process, client)
        yield process, ("127.0.0.1", port)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def seconds_until_closed(connection: socket.socket, timeout_s: float, send: bytes = b"") -> float:
    """Send `send` one byte every 0.1 s until the server closes `connection`; return the time.

    Returns infinity when the connection is still open after `timeout_s` seconds.
    """
    started = time.monotonic()
    remaining = iter(send)
    while time.monotonic() - started < timeout_s:
        byte = next(remaining, None)
        try:
            if byte is not None:
                connection.sendall(bytes([byte]))
            readable, _, _ = select.select([connection], [], [], 0.1)
            if readable and connection.recv(4096) == b"":
                return time.monotonic() - started
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return float("inf")


def healthz_status(address: tuple[str, int]) -> int:
    with httpx.Client(base_url=f"http://{address[0]}:{address[1]}", timeout=5) as client:
        return client.get("/healthz").status_code


def test_idle_and_slow_connections_closed(checkpoint_path):
    # One byte every 0.1 s: the head would take about 6 s, far past the 1 s header timeout.
    slow_head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 20 + b"\r\n\r\n"
    with service_process(checkpoint_path) as (process, address), ExitStack() as stack:
        connections = [
            stack.enter_context(socket.create_connection(address, timeout=5)) for _ in range(4)
        ]
        with ThreadPoolExecutor(len(connections)) as pool:
            idle = [pool.submit(seconds_until_closed, c, 6.0) for c in connections[:3]]
            slow = pool.submit(seconds_until_closed, connections[3], 6.0, slow_head)
            idle_closed_after = [future.result() for future in idle]
            slow_closed_after = slow.result()

        assert healthz_status(address) == 200
        assert process.poll() is None

    for seconds in idle_closed_after:
        assert HEADER_TIMEOUT_S - 0.1 <= seconds < HEADER_TIMEOUT_S + 2
    assert HEADER_TIMEOUT_S - 0.1 <= slow_closed_after < HEADER_TIMEOUT_S + 2


def read_response(connection: socket.socket) -> bytes:
    """Read one response to a GET /healthz, whose JSON body ends with a closing brace."""
    received = b""
    while not received.endswith(b"}"):
        chunk = connection.recv(4096)
        assert chunk, f"the server closed the connection after {received!r}"
        received += chunk
    return received


def test_keep_alive_connection_serves_requests(checkpoint_path):
    """The header timeout restarts after each response, so a reused connection keeps working."""
    request = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    with (
        service_process(checkpoint_path) as (_, address),
        socket.create_connection(address, timeout=5) as connection,
    ):
        for _ in range(3):
            # Each pause is shorter than the header timeout, and the three add up to more.
            time.sleep(0.6 * HEADER_TIMEOUT_S)
            connection.sendall(request)
            assert read_response(connection).startswith(b"HTTP/1.1 200")


def limit_open_files(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


def test_file_descriptor_exhaustion_recovers(checkpoint_path):
    """With every file descriptor held by idle connections, the service logs it once and recovers.

    The service uses about 10 descriptors, so 64 run out after about 54 connections. The rest
    wait in the listen backlog until the header timeout closes the first ones.
    """
    with (
        service_process(checkpoint_path, preexec=limit_open_files(64)) as (process, address),
        ExitStack() as stack,
    ):
        for _ in range(120):
            stack.enter_context(socket.create_connection(address, timeout=5))
        time.sleep(0.5)  # accept() fails in this time, with the idle connections still open

        deadline = time.monotonic() + 10
        while True:
            try:
                if healthz_status(address) == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "/healthz did not answer within 10 s"
        process.send_signal(signal.SIGTERM)
        output = finish(process)

    accept_errors = output.count("socket.accept() out of system resource")
    assert accept_errors >= 1, output[-3000:]
    assert accept_errors <= 2, output[-3000:]
    assert "open-file limit (RLIMIT_NOFILE): 64" in output


def test_open_file_limit_raised_to_hard(caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("the hard open-file limit is unlimited here")
    # One below the hard limit, so this process can still open as many files as before.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard - 1, hard))
    try:
        with caplog.at_level(logging.INFO, logger="service"):
            raise_open_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert f"raised from {hard - 1} to the hard limit {hard}" in caplog.text


def make_record(message: str) -> logging.LogRecord:
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)


def test_repeated_message_filter_counts_dropped():
    now = [100.0]
    repeated = RepeatedMessageFilter("socket.accept() out", 10.0, clock=lambda: now[0])

    first = make_record("socket.accept() out of system resource\nsocket: <fd=6>")
    assert repeated.filter(first)
    assert first.getMessage() == "socket.accept() out of system resource\nsocket: <fd=6>"
    for _ in range(2000):
        now[0] += 0.001
        assert not repeated.filter(make_record("socket.accept() out of system resource"))
    assert repeated.filter(make_record("Task was destroyed but it is pending!"))

    now[0] = 110.0
    later = make_record("socket.accept() out of system resource")
    assert repeated.filter(later)
    assert "(2000 more like this in the last 10 s were not logged)" in later.getMessage()
    now[0] = 125.0
    quiet = make_record("socket.accept() out of system resource")
    assert repeated.filter(quiet)
    assert "not logged" not in quiet.getMessage()
