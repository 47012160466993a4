"""Hostile inputs to a real server: lying uploads, overload, odd parameters, bad checkpoints."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from service.batching import Batcher, QueueFullError
from service.settings import Settings, format_settings_error
from tests.model_core.conftest import with_metadata
from tests.service.conftest import make_settings, running_server
from tests.service.test_main import REPO_ROOT, service_env


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def send_raw(url: str, request: bytes, timeout_s: float) -> bytes:
    """Send `request` as is on a fresh connection and return everything the server sends back."""
    host, port = url.removeprefix("http://").split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
        connection.sendall(request)
        while True:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received


def multipart_request(body: bytes, content_length: int) -> bytes:
    head = (
        "POST /predict?tasks=semseg HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    )
    return head.encode() + body


def multipart_body(image: bytes) -> bytes:
    return (
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--XyZ--\r\n"
    )


def test_content_length_lie_gives_408(checkpoint_path):
    body = multipart_body(png_bytes(16, 16))
    settings = make_settings(checkpoint_path, upload_timeout_s=0.5)
    with running_server(settings) as url:
        started = time.monotonic()
        response = send_raw(url, multipart_request(body, len(body) + 1000), timeout_s=10)
        elapsed = time.monotonic() - started
        with httpx.Client(base_url=url) as client:
            assert client.get("/readyz").status_code == 200

    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert b'"upload_timeout"' in response
    assert elapsed < 5


def test_truncated_multipart_gives_400(client):
    body = multipart_body(png_bytes(16, 16))
    truncated = body[: len(body) - 40]
    response = send_raw(
        str(client.base_url).rstrip("/"), multipart_request(truncated, len(truncated)), 30
    )

    assert response.startswith(b"HTTP/1.1 400"), response[:200]
    assert b'"invalid_multipart"' in response


def test_long_parameter_not_echoed_in_full(client):
    image = png_bytes(16, 16)
    for params in ({"budget": "x" * 3000}, {"tasks": "semseg," + "y" * 3000}):
        response = client.post("/predict", params=params, files={"image": ("a.png", image)})
        assert response.status_code == 422
        assert len(response.json()["message"]) < 400


def test_task_named_budget_is_invalid_tasks(client):
    image = png_bytes(16, 16)
    response = client.post(
        "/predict", params={"tasks": "budget"}, files={"image": ("a.png", image)}
    )

    assert response.status_code == 422
    assert response.json()["type"] == "invalid_tasks"
    assert "'budget'" in response.json()["message"]


def queue_depth(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("adamtl_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("adamtl_queue_depth is missing from /metrics")


def test_full_queue_rejects_before_decoding(checkpoint_path):
    """A corrupt upload sent while the only slot is taken gets 503, so it was never decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 4000), (90, 20, 200)).save(buffer, "PNG")
    slow_image = buffer.getvalue()  # small file, but seconds to decode, resize and encode
    settings = make_settings(checkpoint_path, max_batch_size=1, max_queue_size=1)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        results: list[int] = []
        first = threading.Thread(
            target=lambda: results.append(
                client.post("/predict", files={"image": ("a.png", slow_image)}).status_code
            )
        )
        first.start()
        deadline = time.monotonic() + 20
        while queue_depth(client) < 1 and time.monotonic() < deadline and first.is_alive():
            time.sleep(0.005)
        corrupt = client.post("/predict", files={"image": ("b.png", b"\x89PNG broken")})
        first.join(timeout=60)
        depth_after = queue_depth(client)

    assert corrupt.status_code == 503
    assert corrupt.json()["type"] == "queue_full"
    assert corrupt.headers["Retry-After"] == "1"
    assert results == [200]
    assert depth_after == 0


def gauge_value(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is missing from /metrics")


def test_pixel_limit_rejects_second_image(checkpoint_path):
    """While one 16-megapixel image is in flight under a 16-megapixel limit, another gets 503."""
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 4000), (90, 20, 200)).save(buffer, "PNG")
    large = buffer.getvalue()  # small file, but seconds to decode, resize and encode
    small = png_bytes(64, 48)
    settings = make_settings(
        checkpoint_path, max_image_pixels=16_000_000, max_pixels_in_flight=16_000_000
    )
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/predict", files={"image": ("a.png", large)})
            deadline = time.monotonic() + 20
            while gauge_value(client, "adamtl_pixels_in_flight") < 16_000_000:
                assert not first.done(), first.result().text[:300]
                assert time.monotonic() < deadline, "the large image was not decoded within 20 s"
                time.sleep(0.005)
            rejected = client.post("/predict", files={"image": ("b.png", small)})
            first_status = first.result().status_code
        pixels_after = gauge_value(client, "adamtl_pixels_in_flight")
        accepted = client.post("/predict", files={"image": ("b.png", small)})

    assert rejected.status_code == 503, rejected.text
    assert rejected.json()["type"] == "queue_full"
    assert "3072 decoded pixels" in rejected.json()["message"]
    assert "ADAMTL_MAX_PIXELS_IN_FLIGHT" in rejected.json()["message"]
    assert rejected.headers["Retry-After"] == "1"
    assert first_status == 200
    assert pixels_after == 0
    assert accepted.status_code == 200


def test_pixel_limit_below_image_limit_rejected():
    with pytest.raises(ValidationError) as error:
        Settings(max_image_pixels=50_000_000, max_pixels_in_flight=40_000_000)
    message = format_settings_error(error.value)
    assert "set ADAMTL_MAX_PIXELS_IN_FLIGHT to at least ADAMTL_MAX_IMAGE_PIXELS" in message


def test_admission_slot_counts_until_release():
    async def scenario() -> tuple[bool, bool, int]:
        batcher: Batcher[int, int] = Batcher(
            lambda payloads: payloads, max_batch_size=1, max_wait_s=0, max_queue_size=1
        )
        batcher.start()
        try:
            with batcher.admit() as admission:
                full_while_held = batcher.is_full
                with pytest.raises(QueueFullError):
                    batcher.admit()
                result, _ = await batcher.submit(7, 10, admission)
            return full_while_held, batcher.is_full, result
        finally:
            await batcher.stop(1)

    full_while_held, full_after, result = asyncio.run(scenario())

    assert full_while_held
    assert not full_after
    assert result == 7


def rewrite_metadata(source: Path, target: Path, change) -> Path:
    """Copy the checkpoint `source` to `target` with `change` applied to its metadata."""
    target.write_bytes(with_metadata(source.read_bytes(), change))
    return target


def run_service_briefly(checkpoint: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", "--port", "1", "--checkpoint", str(checkpoint)],
        cwd=REPO_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def set_image_size_zero(metadata: dict) -> None:
    metadata["config"]["img_size"] = 0


@pytest.mark.parametrize("damage", ["truncated", "zero image size", "directory"])
def test_bad_checkpoint_exits_cleanly(checkpoint_path, tmp_path, damage):
    target = tmp_path / "bad.safetensors"
    if damage == "truncated":
        target.write_bytes(checkpoint_path.read_bytes()[:5000])
    elif damage == "zero image size":
        rewrite_metadata(checkpoint_path, target, set_image_size_zero)
    else:
        target.mkdir()

    result = run_service_briefly(target)

    assert result.returncode == 1, result.stderr[-2000:]
    assert str(target) in result.stderr
    assert "Traceback" not in result.stderr


def test_provenance_of_wrong_type_still_serves(checkpoint_path, tmp_path):
    target = rewrite_metadata(
        checkpoint_path,
        tmp_path / "odd.safetensors",
        lambda metadata: metadata.update(provenance=[1, 2], metrics="none"),
    )
    with running_server(make_settings(target)) as url, httpx.Client(base_url=url) as client:
        model = client.get("/v1/model").json()

    assert model["provenance"] == {}
    assert model["metrics"] == {}


def requests_with_status(url: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    label = f'adamtl_requests_total{{endpoint="/predict",status_code="{status}"}}'
    for line in text.splitlines():
        if line.startswith(label):
            return float(line.split()[-1])
    return 0.0


def batches_run(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("adamtl_batch_size_count"):
            return float(line.split()[-1])
    raise AssertionError("adamtl_batch_size_count is missing from /metrics")


def test_request_of_departed_client_is_dropped(checkpoint_path, photos):
    # A long batch wait keeps a lone request queued while its client goes away.
    settings = make_settings(checkpoint_path, max_batch_wait_ms=2000.0)
    body = multipart_body(photos["rocket.jpg"])
    with running_server(settings) as url:
        batches_before = batches_run(url)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(multipart_request(body, len(body)))
            time.sleep(0.5)  # the server has read the body and queued the image
        deadline = time.monotonic() + 10
        while requests_with_status(url, 499) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert requests_with_status(url, 499) == 1
        time.sleep(2.0)  # past the batch wait: an abandoned image would have run by now
        assert batches_run(url) == batches_before
        # The admission slot was released, and the server still serves predictions.
        response = httpx.post(
            f"{url}/predict?tasks=semseg",
            files={"image": ("a.jpg", photos["rocket.jpg"])},
            timeout=30,
        )
        assert response.status_code == 200
        assert batches_run(url) == batches_before + 1


def test_client_leaving_during_encoding_gets_499(checkpoint_path):
    # A 4000x4000 upload takes seconds to resize and encode after its fast forward pass.
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 4000), (90, 20, 200)).save(buffer, "PNG")
    body = buffer.getvalue()
    head = (
        "POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with running_server(make_settings(checkpoint_path, max_batch_wait_ms=0.0)) as url:
        batches_before = batches_run(url)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(head + body)
            deadline = time.monotonic() + 30
            while batches_run(url) == batches_before:
                assert time.monotonic() < deadline, "the image's batch did not run within 30 s"
                time.sleep(0.01)
        # The connection is closed while the maps are being encoded.
        deadline = time.monotonic() + 60
        while requests_with_status(url, 499) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests_with_status(url, 499) == 1
        assert requests_with_status(url, 200) == 0
        # The request ends only after its maps already on a thread, so none outlives it.
        assert threads_encoding_maps() == 0


def threads_encoding_maps() -> int:
    """Count the threads now inside the service's map post-processing (`MapEncoder._finish`)."""
    count = 0
    for frame in sys._current_frames().values():
        codes = [seen.f_code for seen, _ in traceback.walk_stack(frame)]
        if any(
            code.co_name == "_finish" and code.co_filename.endswith("routes.py") for code in codes
        ):
            count += 1
    return count
