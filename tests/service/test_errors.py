"""Bad and awkward inputs: each gets its documented status and a JSON error body."""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.service import samples
from tests.service.conftest import make_settings, running_server
from tests.service.test_api import predict
from tests.service.test_hardening import threads_encoding_maps

MB = 1_000_000


def post_raw(
    client: httpx.Client, data: bytes, content_type: str, query: str = ""
) -> httpx.Response:
    return client.post(f"/predict{query}", content=data, headers={"content-type": content_type})


def assert_error_body(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "type", "message", "request_id"}
    assert body["code"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    assert len(body["message"]) > 20
    return body


# (case id, how to build the request from the photos, expected status, expected error type,
#  a fragment that the message must contain)
BAD_INPUTS = [
    (
        "oversized upload",
        lambda c, p: post_raw(c, b"\xff" * (20 * MB + 1), "image/jpeg"),
        413,
        "payload_too_large",
        "20000000 bytes",
    ),
    (
        "oversized multipart upload",
        lambda c, p: c.post("/predict", files={"image": ("big.jpg", b"\xff" * (21 * MB))}),
        413,
        "payload_too_large",
        "20000000 bytes",
    ),
    (
        "pixel bomb png header",
        lambda c, p: post_raw(c, samples.png_header(8000, 8000), "image/png"),
        413,
        "image_too_large",
        "40000000 pixels",
    ),
    (
        "giant declared png",
        lambda c, p: post_raw(c, samples.png_header(100_000, 100_000), "image/png"),
        413,
        "image_too_large",
        "too large",
    ),
    (
        "truncated jpeg",
        lambda c, p: post_raw(c, samples.truncated_jpeg(p["rocket.jpg"]), "image/jpeg"),
        400,
        "invalid_image",
        "JPEG",
    ),
    (
        "png cut before idat",
        lambda c, p: post_raw(c, samples.png_cut_before_idat(p["chelsea.png"]), "image/png"),
        400,
        "invalid_image",
        "PNG image header could not be read",
    ),
    (
        "png with bad chunk crc",
        lambda c, p: post_raw(c, samples.png_bad_text_crc(p["chelsea.png"]), "image/png"),
        400,
        "invalid_image",
        "bad header checksum",
    ),
    (
        "text file as image",
        lambda c, p: c.post("/predict", files={"image": ("notes.txt", b"just some text\n")}),
        415,
        "unsupported_image",
        "JPEG, PNG",
    ),
    (
        "text content type",
        lambda c, p: post_raw(c, b"just some text\n", "text/plain"),
        415,
        "unsupported_media_type",
        "text/plain",
    ),
    (
        "empty body",
        lambda c, p: post_raw(c, b"", "image/png"),
        422,
        "missing_image",
        "no image",
    ),
    (
        "missing image field",
        lambda c, p: c.post("/predict", files={"picture": ("a.png", p["chelsea.png"])}),
        422,
        "missing_image",
        "'image'",
    ),
    (
        "image field as text",
        lambda c, p: c.post("/predict", files={"image": (None, "chelsea.png")}),
        422,
        "missing_image",
        "as a file",
    ),
    (
        "budget above range",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?budget=1.5"),
        422,
        "invalid_budget",
        "1.5",
    ),
    (
        "budget below range",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?budget=0.1"),
        422,
        "invalid_budget",
        "0.3",
    ),
    (
        "budget not a number",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?budget=half"),
        422,
        "invalid_parameter",
        "'half'",
    ),
    (
        "budget nan",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?budget=nan"),
        422,
        "invalid_budget",
        "finite",
    ),
    (
        "repeated budget",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?budget=0.5&budget=0.9"),
        422,
        "invalid_parameter",
        "'budget' is given 2 times: give it once",
    ),
    (
        "repeated tasks",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?tasks=semseg&tasks=normals"),
        422,
        "invalid_parameter",
        "'tasks' is given 2 times: give it once, with the tasks as one comma-separated list",
    ),
    (
        "repeated invalid budget",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?budget=half&budget=0.5"),
        422,
        "invalid_parameter",
        "'budget' is given 2 times",
    ),
    (
        "unknown task",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?tasks=semseg,depth"),
        422,
        "invalid_tasks",
        "depth",
    ),
    (
        "empty task list",
        lambda c, p: post_raw(c, p["chelsea.png"], "image/png", "?tasks=,"),
        422,
        "invalid_tasks",
        "saliency",
    ),
    (
        "unknown route",
        lambda c, p: c.get("/v2/predict"),
        404,
        "not_found",
        "/docs",
    ),
    (
        "wrong method",
        lambda c, p: c.get("/predict"),
        405,
        "method_not_allowed",
        "GET",
    ),
]


@pytest.mark.parametrize(
    ("build", "status", "error_type", "fragment"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_status(client, photos, build, status, error_type, fragment):
    body = assert_error_body(build(client, photos), status)
    assert body["type"] == error_type
    assert fragment in body["message"]


# Awkward but valid inputs: (case id, encoder, content type, expected width and height).
CONVERTED_INPUTS = [
    ("16-bit png", samples.gray16_png, "image/png", (451, 300)),
    ("cmyk jpeg", samples.cmyk_jpeg, "image/jpeg", (451, 300)),
    ("animated gif", samples.animated_gif, "image/gif", (451, 300)),
    ("palette png with transparency", samples.palette_alpha_png, "image/png", (451, 300)),
    ("rgba png", samples.rgba_png, "image/png", (451, 300)),
    ("exif-rotated jpeg", samples.exif_rotated_jpeg, "image/jpeg", (300, 451)),
]


@pytest.mark.parametrize(
    ("encode", "content_type", "size"),
    [case[1:] for case in CONVERTED_INPUTS],
    ids=[case[0] for case in CONVERTED_INPUTS],
)
def test_converted_input_served(client, photos, encode, content_type, size):
    response = post_raw(client, encode(photos["chelsea.png"]), content_type, "?tasks=semseg")
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": size[0], "height": size[1]}


def test_server_answers_after_bad_inputs(client, photos):
    for _, build, *_ in BAD_INPUTS:
        build(client, photos)
    assert client.get("/healthz").status_code == 200
    response = predict(client, photos["coffee.png"], 0.6, ["saliency"])
    assert response.status_code == 200, response.text


def test_queue_full_gives_503(checkpoint_path, photos):
    # One request at a time and a large image, so concurrent requests find the queue full.
    settings = make_settings(checkpoint_path, max_batch_size=1, max_queue_size=1)
    large = samples.resized_jpeg(photos["coffee.png"], 1500, 1000)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: predict(client, large), range(6)))
        statuses = sorted(response.status_code for response in responses)
        assert set(statuses) <= {200, 503}, statuses
        assert 200 in statuses
        assert 503 in statuses
        for response in responses:
            if response.status_code == 503:
                body = assert_error_body(response, 503)
                assert body["type"] == "queue_full"
                assert response.headers["retry-after"] == "1"
        assert predict(client, photos["chelsea.png"]).status_code == 200


def test_timeout_gives_504(checkpoint_path, photos):
    # One batch at a time and 1 ms to finish: the requests queued behind the first wait longer.
    settings = make_settings(checkpoint_path, max_batch_size=1, request_timeout_s=0.001)
    large = samples.resized_jpeg(photos["coffee.png"], 2400, 1600)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: predict(client, large), range(4)))
        timed_out = [response for response in responses if response.status_code == 504]
        assert timed_out, [response.status_code for response in responses]
        body = assert_error_body(timed_out[0], 504)
        assert body["type"] == "timeout"
        assert "0.001 s" in body["message"]
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert 'adamtl_requests_total{endpoint="/predict",status_code="504"}' in metrics


def test_timeout_covers_map_encoding(checkpoint_path, caplog):
    # A JPEG decodes at 1/8 scale and the tiny model takes milliseconds, but on one image
    # thread the four 6000x4000 maps took 1.3 to 1.7 s to resize and encode on 2 cores.
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 4000), (90, 20, 200)).save(buffer, "JPEG", quality=80)
    settings = make_settings(checkpoint_path, request_timeout_s=0.7, image_threads=1)
    with (
        running_server(settings) as url,
        httpx.Client(base_url=url, timeout=60) as client,
        caplog.at_level(logging.INFO, logger="service"),
    ):
        response = client.post("/predict", files={"image": ("large.jpg", buffer.getvalue())})
        assert response.status_code == 504, response.text[:300]
        # The request ends after its map steps already on a thread, none of which outlive it.
        assert threads_encoding_maps() == 0
        body = assert_error_body(response, 504)
        assert client.get("/readyz").status_code == 200

    assert body["type"] == "timeout"
    assert "within 0.7 s of its upload (while resizing and encoding the maps)" in body["message"]
    lines = [
        record.getMessage()
        for record in caplog.records
        if record.name == "service" and body["request_id"] in record.getMessage()
    ]
    assert len(lines) == 1, lines
    assert "status=504" in lines[0]


def test_unhandled_error_gets_json_500(checkpoint_path):
    """An exception no handler catches still gets the error body, a request id and a metric."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(make_settings(checkpoint_path))

    @app.get("/fails")
    async def fails() -> None:
        raise RuntimeError("a bug in a handler")

    with TestClient(app, raise_server_exceptions=False) as http:
        body = assert_error_body(http.get("/fails"), 500)
        assert body["type"] == "internal_error"
        assert http.get("/healthz").status_code == 200
        metrics = http.get("/metrics").text
    assert 'adamtl_requests_total{endpoint="/fails",status_code="500"} 1.0' in metrics


def test_failed_stream_logged_as_error(checkpoint_path, caplog):
    """A response that fails after its status line went out is logged at ERROR."""
    import logging

    from fastapi.responses import StreamingResponse
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(make_settings(checkpoint_path))

    @app.get("/stream-fails")
    async def stream_fails() -> StreamingResponse:
        async def chunks():
            yield b"partial"
            raise RuntimeError("a bug while streaming")

        return StreamingResponse(chunks())

    with TestClient(app, raise_server_exceptions=False) as http, caplog.at_level(logging.INFO):
        try:
            http.get("/stream-fails")
        except Exception:  # noqa: BLE001  # the client may see a cut-off body
            pass
    lines = [
        r for r in caplog.records if r.name == "service" and "GET /stream-fails" in r.getMessage()
    ]
    assert len(lines) == 1
    assert lines[0].levelno == logging.ERROR
    assert "error='response_failed: a bug while streaming'" in lines[0].getMessage()


def test_overload_statuses_logged_as_warning(checkpoint_path, caplog):
    import logging

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.errors import ServiceError

    app = create_app(make_settings(checkpoint_path))

    @app.get("/busy")
    async def busy() -> None:
        raise ServiceError(503, "queue_full", "the queue is full: retry later")

    with TestClient(app, raise_server_exceptions=False) as http, caplog.at_level(logging.INFO):
        assert http.get("/busy").status_code == 503
    lines = [r for r in caplog.records if r.name == "service" and "GET /busy" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
