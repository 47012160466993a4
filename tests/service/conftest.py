"""Fixtures for the service tests: a real calibrated tiny checkpoint and real uvicorn servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from PIL import Image

from model_core.calibration import calibrate
from model_core.checkpoint import save_checkpoint
from model_core.model import AdaMTL
from model_core.predictor import Predictor
from model_core.presets import get_preset
from service.app import create_app
from service.settings import Settings

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(settings: Settings, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `create_app(settings)` with uvicorn on 127.0.0.1 in a thread; yield its base URL."""
    port = free_port()
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server exited during start-up; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the test server did not start within {start_timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def photo_bytes(name: str) -> bytes:
    return (DATA_DIR / name).read_bytes()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """The encoded test photographs by file name."""
    return {name: photo_bytes(name) for name in PHOTOS}


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AdaMTL checkpoint with random weights and a budget calibration on the photos.

    Calibration makes the executed FLOPs follow the budget, which an untrained policy does not.
    """
    # One intra-op thread: with two, torch's OpenMP workers spin against each other and against
    # the server threads on a 2-core machine, which made this fixture 30 times slower.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AdaMTL(get_preset("tiny"))
    predictor = Predictor(model)
    images = [Image.open(DATA_DIR / name).convert("RGB") for name in PHOTOS]
    halves = [image.crop((0, 0, image.width // 2, image.height)) for image in images]
    halves += [image.crop((image.width // 2, 0, image.width, image.height)) for image in images]
    calibrate(model, predictor.preprocess(halves), budgets=[0.3, 0.6, 0.9], tolerance=0.02)

    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    save_checkpoint(
        model,
        path,
        name="adamtl-tiny-test",
        version="0.0.1",
        provenance={"recipe": "random weights, calibrated on the test photos"},
        metrics={"semseg_miou": 0.0},
    )
    return path


def make_settings(checkpoint: Path, **overrides) -> Settings:
    values = dict(checkpoint=checkpoint, max_batch_size=8, max_batch_wait_ms=20.0, torch_threads=1)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def server(checkpoint_path: Path) -> Iterator[str]:
    """Base URL of a server with the default limits."""
    with running_server(make_settings(checkpoint_path)) as url:
        yield url


@pytest.fixture()
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60.0) as http:
        yield http
