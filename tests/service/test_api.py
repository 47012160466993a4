"""The real app, served by uvicorn with a real tiny checkpoint, on the test photographs."""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model_core.presets import TASKS
from service.app import create_app
from tests.service import samples
from tests.service.conftest import make_settings, running_server

PHOTO_SIZES = {"chelsea.png": (451, 300), "coffee.png": (600, 400), "rocket.jpg": (640, 427)}
TASK_SUBSETS = [
    None,
    ["saliency"],
    ["human_parts"],
    ["semseg"],
    ["normals"],
    ["semseg", "normals"],
    ["saliency", "human_parts"],
]


def predict(
    client: httpx.Client,
    data: bytes,
    budget: float | None = None,
    tasks: list[str] | None = None,
    raw_type: str | None = None,
) -> httpx.Response:
    """POST one image as multipart, or as the raw body when `raw_type` is given."""
    params = {}
    if budget is not None:
        params["budget"] = str(budget)
    if tasks is not None:
        params["tasks"] = ",".join(tasks)
    if raw_type is not None:
        return client.post(
            "/predict", params=params, content=data, headers={"content-type": raw_type}
        )
    return client.post("/predict", params=params, files={"image": ("photo", data)})


def decode_output(body: dict, task: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["outputs"][task]["png"]))))


def metric_samples(client: httpx.Client, name: str) -> dict[tuple, float]:
    """Return the samples of metric family `name` keyed by (sample name, sorted labels)."""
    text = client.get("/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


@pytest.mark.parametrize("tasks", TASK_SUBSETS, ids=lambda t: ",".join(t) if t else "all")
@pytest.mark.parametrize("budget", [1.0, 0.6, 0.3])
def test_predict_task_subsets(client, photos, tasks, budget):
    name = "coffee.png"
    response = predict(client, photos[name], budget, tasks)
    assert response.status_code == 200, response.text
    body = response.json()
    expected_tasks = list(TASKS) if tasks is None else [t for t in TASKS if t in tasks]
    width, height = PHOTO_SIZES[name]

    assert body["tasks"] == expected_tasks
    assert sorted(body["outputs"]) == sorted(expected_tasks)
    assert body["budget"] == budget
    assert body["image"] == {"width": width, "height": height}
    assert body["model"] == {"name": "adamtl-tiny-test", "version": "0.0.1"}
    assert response.headers["x-request-id"] == body["request_id"]
    for task in expected_tasks:
        array = decode_output(body, task)
        assert array.shape[:2] == (height, width), task
    if "normals" in expected_tasks:
        assert decode_output(body, "normals").shape == (height, width, 3)
    for task in ("human_parts", "semseg"):
        if task in expected_tasks:
            classes = body["outputs"][task]["classes"]
            assert decode_output(body, task).max() < len(classes)
    compute = body["compute"]
    assert 0 < compute["flops"]
    assert compute["flops_ratio"] == pytest.approx(compute["flops"] / compute["static_flops"])
    assert len(compute["tokens_ratio_per_stage"]) == 4
    assert 0 <= compute["blocks_executed"] <= compute["blocks_total"]
    timing = body["timing_ms"]
    assert 0 <= timing["queue"] <= timing["total"]
    assert 0 < timing["inference"] <= timing["total"]


@pytest.mark.parametrize("name", sorted(PHOTO_SIZES))
def test_flops_fall_with_budget(client, photos, name):
    flops = []
    for budget in (1.0, 0.9, 0.6, 0.3):
        response = predict(client, photos[name], budget)
        assert response.status_code == 200, response.text
        flops.append(response.json()["compute"]["flops"])
    assert flops == sorted(flops, reverse=True)
    assert flops[-1] < 0.5 * flops[0]


def test_raw_body_equals_multipart(client, photos):
    data = photos["rocket.jpg"]
    multipart = predict(client, data, 0.6, ["semseg"]).json()
    raw = predict(client, data, 0.6, ["semseg"], raw_type="image/jpeg").json()
    assert raw["image"] == {"width": 640, "height": 427}
    assert raw["outputs"]["semseg"]["png"] == multipart["outputs"]["semseg"]["png"]
    assert raw["compute"] == multipart["compute"]


def test_defaults_are_full_budget_all_tasks(client, photos):
    body = predict(client, photos["chelsea.png"]).json()
    assert body["budget"] == 1.0
    assert body["tasks"] == list(TASKS)
    assert body["compute"]["flops_ratio"] == pytest.approx(1.0)


def test_batched_equals_single(checkpoint_path, client, photos):
    requests = [
        ("chelsea.png", 1.0, None),
        ("coffee.png", 0.7, ["semseg"]),
        ("rocket.jpg", 0.45, ["normals", "saliency"]),
        ("chelsea.png", 0.3, ["human_parts"]),
        ("coffee.png", 0.9, None),
        ("rocket.jpg", 0.6, ["semseg", "normals"]),
    ]
    alone = [
        predict(client, photos[name], budget, tasks).json() for name, budget, tasks in requests
    ]

    # A batch closes when full, so a long wait only guarantees that all six share it.
    settings = make_settings(
        checkpoint_path, max_batch_size=len(requests), max_batch_wait_ms=3000.0
    )
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as batch_client:
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [
                pool.submit(predict, batch_client, photos[name], budget, tasks)
                for name, budget, tasks in requests
            ]
            together = [future.result().json() for future in futures]
        batch_sizes = metric_samples(batch_client, "adamtl_batch_size")

    assert batch_sizes[("adamtl_batch_size_count", ())] == 1
    assert batch_sizes[("adamtl_batch_size_sum", ())] == len(requests)
    for single, batched in zip(alone, together, strict=True):
        assert batched["compute"] == single["compute"]
        assert batched["tasks"] == single["tasks"]
        for task in single["tasks"]:
            a = decode_output(single, task).astype(int)
            b = decode_output(batched, task).astype(int)
            if task in ("human_parts", "semseg"):
                assert np.array_equal(a, b), task
            else:
                # Batched float kernels may round differently in the last bit, which can move
                # a value across an 8-bit level boundary.
                assert np.abs(a - b).max() <= 1, task


def test_model_endpoint(client, checkpoint_path):
    response = client.get("/v1/model")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "adamtl-tiny-test"
    assert body["version"] == "0.0.1"
    assert body["preset"] == "tiny"
    assert body["tasks"] == list(TASKS)
    assert body["input_size"] == 64
    assert body["budget_range"] == [0.3, 1.0]
    assert body["static_flops"] > max(body["static_flops_per_task"].values())
    assert body["classes"]["semseg"][0] == "floor"
    assert body["provenance"] == {"recipe": "random weights, calibrated on the test photos"}
    assert body["metrics"] == {"semseg_miou": 0.0}


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_openapi_documents_predict(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/predict"]["post"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert set(parameters) == {"budget", "tasks"}
    assert all(p.get("description") for p in parameters.values())
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert {"200", "400", "408", "413", "415", "422", "503", "504"} <= set(operation["responses"])
    assert client.get("/docs").status_code == 200


def test_docs_routes_counted_by_path(client):
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/no-such-page").status_code == 404
    metrics = client.get("/metrics").text
    assert 'adamtl_requests_total{endpoint="/openapi.json",status_code="200"}' in metrics
    assert 'adamtl_requests_total{endpoint="unmatched",status_code="404"}' in metrics


def test_request_id_header_reused(client, photos):
    response = predict(client, photos["chelsea.png"], 0.6, ["semseg"])
    assert len(response.headers["x-request-id"]) == 32
    echoed = client.get("/healthz", headers={"x-request-id": "client-id.42"})
    assert echoed.headers["x-request-id"] == "client-id.42"
    unsafe = client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


def test_metrics_follow_conventions(client, photos):
    assert predict(client, photos["rocket.jpg"], 0.6).status_code == 200
    text = client.get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    required = [
        "adamtl_image_flops",
        "adamtl_image_flops_ratio",
        "adamtl_image_activated_tokens_ratio",
        "adamtl_image_activated_blocks_ratio",
        "adamtl_request_budget_ratio",
        "adamtl_requests",
        "adamtl_request_duration_seconds",
        "adamtl_queue_wait_seconds",
        "adamtl_inference_duration_seconds",
        "adamtl_batch_size",
        "adamtl_queue_depth",
        "adamtl_model_info",
    ]
    assert set(required) <= set(families)

    for name, family in families.items():
        if not name.startswith("adamtl_"):
            continue
        assert family.documentation, name
        if family.type != "counter":
            assert not name.endswith("_total"), name
        for sample in family.samples:
            assert "request_id" not in sample.labels
    assert "# TYPE adamtl_requests_total counter" in text

    stages = {
        sample.labels["stage"] for sample in families["adamtl_image_activated_tokens_ratio"].samples
    }
    assert stages == {"1", "2", "3", "4"}
    info = families["adamtl_model_info"].samples[0].labels
    assert info == {"name": "adamtl-tiny-test", "version": "0.0.1", "preset": "tiny"}

    flops = metric_samples(client, "adamtl_image_flops")
    assert flops[("adamtl_image_flops_count", ())] >= 1
    ok = metric_samples(client, "adamtl_requests")
    assert ok[("adamtl_requests_total", (("endpoint", "/predict"), ("status_code", "200")))] >= 1


def test_exif_rotated_photo_swaps_size(client, photos):
    data = samples.exif_rotated_jpeg(photos["rocket.jpg"])
    response = predict(client, data, 0.6, ["semseg", "normals"], raw_type="image/jpeg")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": 427, "height": 640}
    assert decode_output(body, "semseg").shape == (640, 427)


def test_request_series_exist_before_first_event(checkpoint_path):
    app = create_app(make_settings(checkpoint_path))

    async def scrape() -> str:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return (await client.get("/metrics")).text

    text = asyncio.run(scrape())
    for code in (200, 400, 408, 413, 415, 422, 499, 500, 503, 504):
        assert f'adamtl_requests_total{{endpoint="/predict",status_code="{code}"}} 0.0' in text
    assert 'adamtl_requests_total{endpoint="unmatched",status_code="404"} 0.0' in text
    assert 'adamtl_requests_total{endpoint="/readyz",status_code="503"} 0.0' in text
