"""`python -m service` as a real process: settings errors, a missing checkpoint, SIGTERM drain.

Also the lifespan's own drain, which is the only one when the app runs without the CLI.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from service.__main__ import REPEATED_SIGTERM_S
from service.app import create_app
from service.settings import Settings, format_settings_error
from tests.service.conftest import free_port, make_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def service_env(**variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ADAMTL_")}
    env.update(variables)
    return env


def run_service(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_settings_read_from_environment(monkeypatch):
    monkeypatch.setenv("ADAMTL_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("ADAMTL_MAX_IMAGE_PIXELS", "1000")
    settings = Settings()
    assert settings.max_batch_size == 16
    assert settings.max_image_pixels == 1000
    assert settings.max_upload_bytes == 20_000_000
    assert settings.checkpoint == Path("checkpoints/demo.safetensors")


def test_settings_reject_queue_below_batch():
    with pytest.raises(ValidationError) as error:
        Settings(max_batch_size=8, max_queue_size=4)
    assert "ADAMTL_MAX_QUEUE_SIZE" in format_settings_error(error.value)


def test_bad_setting_fails_start(tmp_path):
    result = run_service([], service_env(ADAMTL_MAX_BATCH_SIZE="many"))
    assert result.returncode == 2
    assert "ADAMTL_MAX_BATCH_SIZE='many'" in result.stderr
    assert "valid integer" in result.stderr


FLOAT_SETTINGS = [
    name for name, field in Settings.model_fields.items() if field.annotation is float
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_float_setting_rejects_non_finite(monkeypatch, name, value):
    monkeypatch.setenv(f"ADAMTL_{name.upper()}", value)
    with pytest.raises(ValidationError) as error:
        Settings()
    message = format_settings_error(error.value)
    assert f"ADAMTL_{name.upper()}='{value}'" in message
    assert "Input should be a finite number" in message


def test_nan_timeout_fails_start():
    result = run_service([], service_env(ADAMTL_REQUEST_TIMEOUT_S="nan"))
    assert result.returncode == 2
    assert "ADAMTL_REQUEST_TIMEOUT_S='nan': Input should be a finite number" in result.stderr


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("reuse_freed_memory", "maybe", "use true or false"),
        ("image_thread_niceness", "abc", "use an integer from 0 to 19"),
        ("image_thread_niceness", "40", "use an integer from 0 to 19"),
        ("torch_threads", "0", "use an integer from 1 to 1024, or leave it unset"),
        ("header_timeout_s", "-1", "use a number above 0 and at most 3600"),
        ("malloc_trim_interval_s", "x", "use 0 to turn trimming off, or a number from 1 to"),
        ("max_queue_size", "0", "from 1 to 100000, and at least ADAMTL_MAX_BATCH_SIZE"),
        ("max_pixels_in_flight", "0", "at least 1, and at least ADAMTL_MAX_IMAGE_PIXELS"),
    ],
)
def test_setting_error_names_accepted_values(monkeypatch, field, value, accepted):
    monkeypatch.setenv(f"ADAMTL_{field.upper()}", value)
    with pytest.raises(ValidationError) as error:
        Settings()
    message = format_settings_error(error.value)
    assert f"ADAMTL_{field.upper()}={value!r}" in message
    assert accepted in message


def test_setting_error_names_the_flag_given():
    with pytest.raises(ValidationError) as error:
        Settings(port=70000)
    message = format_settings_error(error.value, flags={"port"})
    assert "--port=70000: " in message
    assert "ADAMTL_PORT" not in message


def test_unknown_setting_fails_start():
    result = run_service([], service_env(ADAMTL_MAX_BATCH="2"))
    assert result.returncode == 2
    assert "ADAMTL_MAX_BATCH: unknown setting" in result.stderr
    assert "did you mean ADAMTL_MAX_BATCH_SIZE?" in result.stderr


def test_cross_field_error_names_variable():
    result = run_service([], service_env(ADAMTL_MAX_QUEUE_SIZE="2"))
    assert result.returncode == 2
    assert "Value error" not in result.stderr
    assert "  max_queue_size (2) is smaller than max_batch_size (8)" in result.stderr


def test_missing_checkpoint_fails_start(tmp_path):
    missing = tmp_path / "absent.safetensors"
    result = run_service(["--checkpoint", str(missing)], service_env())
    assert result.returncode == 1
    assert f"checkpoint not found: {missing}" in result.stderr
    assert "--checkpoint PATH" in result.stderr


def test_corrupt_checkpoint_fails_start(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    result = run_service(["--checkpoint", str(corrupt), "--port", str(free_port())], service_env())
    assert result.returncode != 0
    assert "cannot load checkpoint" in result.stderr
    assert str(corrupt) in result.stderr


def test_port_in_use_fails_before_ready(checkpoint_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_service(
            ["--port", str(port), "--checkpoint", str(checkpoint_path)],
            service_env(ADAMTL_HOST="127.0.0.1"),
        )

    assert result.returncode == 1, result.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr
    assert "choose another port with --port or ADAMTL_PORT" in result.stderr
    assert "ready after" not in result.stderr
    assert "Traceback" not in result.stderr


@contextmanager
def running_service(checkpoint: Path, **variables: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run `python -m service` on a free port of 127.0.0.1; yield the process and URL.

    The process is killed on exit if it is still running.
    """
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--checkpoint", str(checkpoint)],
        cwd=REPO_ROOT,
        env=service_env(ADAMTL_HOST="127.0.0.1", ADAMTL_TORCH_THREADS="1", **variables),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def wait_until_ready(process: subprocess.Popen, client: httpx.Client) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "the service exited during start-up"
        assert time.monotonic() < deadline, "the service did not turn ready within 60 s"
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def queue_depth(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("adamtl_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("adamtl_queue_depth is missing from /metrics")


def slow_png() -> bytes:
    """A small file that takes seconds to decode, resize and encode: 5000x5000 of one color."""
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000), (90, 20, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def send_while_admitted(
    pool: ThreadPoolExecutor, client: httpx.Client, monitor: httpx.Client, image: bytes
) -> Future:
    """Send `image` to /predict from `pool`, and return once the service has admitted it."""
    in_flight = pool.submit(client.post, "/predict", files={"image": ("slow.png", image)})
    deadline = time.monotonic() + 30
    while queue_depth(monitor) < 1:
        assert not in_flight.done(), f"the request ended before it was seen: {in_flight.result()}"
        assert time.monotonic() < deadline, "the request was not admitted within 30 s"
        time.sleep(0.01)
    return in_flight


@contextmanager
def request_in_flight(
    checkpoint: Path, image: bytes, **variables: str
) -> Iterator[tuple[subprocess.Popen, str, Future]]:
    """Run the service, send `image` to /predict from a thread, and yield once it is admitted.

    Yields the process, its URL and the future of the request's response.
    """
    with running_service(checkpoint, **variables) as (process, url):
        with (
            httpx.Client(base_url=url, timeout=60) as client,
            httpx.Client(base_url=url, timeout=10) as monitor,
            ThreadPoolExecutor(1) as pool,
        ):
            wait_until_ready(process, client)
            yield process, url, send_while_admitted(pool, client, monitor, image)


def wait_until_draining(url: str) -> None:
    """Poll /readyz on new connections until it turns 503. A refused connection fails."""
    deadline = time.monotonic() + 10
    while True:
        with httpx.Client(base_url=url, timeout=10) as fresh:
            if fresh.get("/readyz").status_code == 503:
                return
        assert time.monotonic() < deadline, "/readyz did not turn 503 within 10 s of SIGTERM"
        time.sleep(0.01)


def finish(process: subprocess.Popen, timeout_s: float = 60) -> str:
    """Wait for the process to exit and return its output, or kill it after `timeout_s`."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return output


def assert_shutting_down_error(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["type"] == "not_ready"
    assert response.headers["Retry-After"] == "1"


def test_sigterm_drains_and_exits(checkpoint_path, photos):
    with running_service(checkpoint_path) as (process, url):
        with (
            httpx.Client(base_url=url, timeout=60) as client,
            httpx.Client(base_url=url, timeout=10) as monitor,
            ThreadPoolExecutor(1) as pool,
        ):
            wait_until_ready(process, client)
            response = client.post(
                "/predict?budget=0.6", files={"image": ("cat.png", photos["chelsea.png"])}
            )
            assert response.status_code == 200

            # A slow request in flight when SIGTERM arrives still gets its response, and the
            # listening socket stays open meanwhile, so new connections get the JSON 503.
            in_flight = send_while_admitted(pool, client, monitor, slow_png())
            process.send_signal(signal.SIGTERM)
            wait_until_draining(url)
            # uvicorn looks for an exit request every 0.1 s, so by now it would have closed the
            # listening socket if the signal had gone straight to it.
            time.sleep(0.5)
            with httpx.Client(base_url=url, timeout=10) as fresh:
                rejected = fresh.post(
                    "/predict", files={"image": ("cat.png", photos["chelsea.png"])}
                )
                alive = fresh.get("/healthz")
            assert not in_flight.done(), "the slow request ended before the checks above"
            assert in_flight.result().status_code == 200
        output = finish(process)

    assert_shutting_down_error(rejected)
    assert "shutting down" in rejected.json()["message"]
    assert alive.status_code == 200
    # uvicorn re-raises the signal after a clean shutdown, so the exit reports SIGTERM.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "serving model adamtl-tiny-test version 0.0.1 (preset tiny" in output
    assert "status=200 budget=0.6 flops_ratio=" in output
    assert "draining" in output
    assert "shutdown complete" in output
    assert "Traceback" not in output


def test_upload_in_progress_finishes_during_drain(checkpoint_path, photos):
    body = photos["chelsea.png"]
    head = (
        "POST /predict?tasks=semseg HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with running_service(checkpoint_path) as (process, url):
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_until_ready(process, client)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(head + body[:1000])
            time.sleep(0.5)  # the server has the headers and waits for the rest of the body
            process.send_signal(signal.SIGTERM)
            wait_until_draining(url)
            connection.sendall(body[1000:])
            response = b""
            while chunk := connection.recv(65536):
                response += chunk
        output = finish(process)

    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert process.returncode in (0, -signal.SIGTERM), output


def test_drain_timeout_answers_json_503(checkpoint_path):
    with request_in_flight(checkpoint_path, slow_png(), ADAMTL_DRAIN_TIMEOUT_S="0.2") as (
        process,
        _,
        in_flight,
    ):
        process.send_signal(signal.SIGTERM)
        unfinished = in_flight.result()
        output = finish(process)

    assert_shutting_down_error(unfinished)
    assert "shut down before this request finished" in unfinished.json()["message"]
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "drain deadline reached; requests in flight: 1; cancelling the 1 whose" in output
    assert "Internal Server Error" not in output
    assert "Cancel 1 running task(s)" not in output
    assert "shutdown complete" in output


def test_drain_timeout_fails_queued_request_quietly(checkpoint_path, photos):
    # A long batch wait keeps the request queued until the drain's deadline.
    with request_in_flight(
        checkpoint_path,
        photos["chelsea.png"],
        ADAMTL_DRAIN_TIMEOUT_S="0.3",
        ADAMTL_MAX_BATCH_WAIT_MS="5000",
    ) as (process, _, in_flight):
        process.send_signal(signal.SIGTERM)
        unfinished = in_flight.result()
        output = finish(process)

    assert_shutting_down_error(unfinished)
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "never retrieved" not in output
    assert "Traceback" not in output


def test_sigint_exits_without_traceback(checkpoint_path):
    with running_service(checkpoint_path) as (process, url):
        with httpx.Client(base_url=url, timeout=10) as client:
            wait_until_ready(process, client)
            process.send_signal(signal.SIGINT)
            output = finish(process, timeout_s=30)

    assert process.returncode == 0, output
    assert "shutdown complete" in output
    assert "KeyboardInterrupt" not in output


def test_debug_log_keeps_library_lines_out(checkpoint_path, photos):
    with running_service(
        checkpoint_path, ADAMTL_LOG_LEVEL="debug", ADAMTL_MALLOC_TRIM_INTERVAL_S="1"
    ) as (process, url):
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_until_ready(process, client)
            image = photos["chelsea.png"]
            response = client.post("/predict", files={"image": ("chelsea.png", image)})
            time.sleep(1.5)  # at least one trim
            process.send_signal(signal.SIGTERM)
            output = finish(process, timeout_s=30)

    assert response.status_code == 200, response.text
    assert "DEBUG service.memory: malloc_trim(0) took" in output
    # Pillow logs each PNG chunk it reads at debug level, and asyncio its selector.
    assert "DEBUG PIL" not in output
    assert "DEBUG asyncio" not in output


def test_idle_sigterm_exits_quickly(checkpoint_path):
    with running_service(checkpoint_path) as (process, url):
        # The idle keep-alive connection of this client must not hold the shutdown up.
        with httpx.Client(base_url=url, timeout=10) as client:
            wait_until_ready(process, client)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            output = finish(process, timeout_s=30)
            exit_s = time.monotonic() - signalled

    assert process.returncode in (0, -signal.SIGTERM), output
    assert exit_s < 2.0, output
    assert "shutdown complete" in output


def test_second_sigterm_ends_drain(checkpoint_path):
    # One image thread encodes the four maps one after the other, so the request still runs
    # when the second signal comes more than REPEATED_SIGTERM_S after the first.
    with request_in_flight(
        checkpoint_path, slow_png(), ADAMTL_DRAIN_TIMEOUT_S="120", ADAMTL_IMAGE_THREADS="1"
    ) as (
        process,
        url,
        in_flight,
    ):
        process.send_signal(signal.SIGTERM)
        wait_until_draining(url)
        time.sleep(REPEATED_SIGTERM_S)  # sooner, it would count as the same signal
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        unfinished = in_flight.result()
        output = finish(process)
        exit_s = time.monotonic() - signalled

    assert_shutting_down_error(unfinished)
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "second signal during the drain" in output
    # Far below the drain timeout of 120 s: the longest wait left is one encoding step, the
    # drain's CANCEL_WAIT_S and uvicorn's FLUSH_TIMEOUT_S.
    assert exit_s < 15, output


def test_repeated_sigterm_keeps_draining(checkpoint_path):
    # `kill -TERM -- -PGID` on `make serve` delivers SIGTERM twice: directly and through make.
    with request_in_flight(checkpoint_path, slow_png(), ADAMTL_DRAIN_TIMEOUT_S="120") as (
        process,
        _,
        in_flight,
    ):
        process.send_signal(signal.SIGTERM)
        # Sent at once, the two would merge into one before the handler runs, because Linux
        # keeps at most one pending SIGTERM per process.
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        finished = in_flight.result()
        output = finish(process)

    assert finished.status_code == 200, finished.text
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "SIGTERM again within 1 s of the first" in output
    assert "second signal during the drain" not in output


@pytest.mark.parametrize(("drain_timeout_s", "expected_status"), [(30.0, 200), (0.2, 503)])
def test_lifespan_drain_without_cli(checkpoint_path, drain_timeout_s, expected_status):
    app = create_app(make_settings(checkpoint_path, drain_timeout_s=drain_timeout_s))
    state = app.state.service
    image = slow_png()

    async def scenario() -> tuple[httpx.Response, httpx.Response, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async with app.router.lifespan_context(app):
                pending = asyncio.create_task(
                    client.post("/predict", files={"image": ("slow.png", image)})
                )
                while state.batcher.queue_depth < 1:
                    assert not pending.done(), pending.result()
                    await asyncio.sleep(0.01)
                # Leaving this block runs the lifespan shutdown while the request is admitted.
            response = await pending
            rejected = await client.post("/predict", files={"image": ("slow.png", image)})
            started = time.perf_counter()
            await state.drain(30)  # a second drain returns at once
            return response, rejected, time.perf_counter() - started

    response, rejected, second_drain_s = asyncio.run(asyncio.wait_for(scenario(), 60))

    assert response.status_code == expected_status, response.text
    if expected_status == 503:
        assert_shutting_down_error(response)
    assert_shutting_down_error(rejected)
    assert second_drain_s < 0.1
    assert state.batcher.queue_depth == 0
    assert not state.in_flight
