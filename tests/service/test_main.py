"""`python -m service` as a real process: settings errors, a missing checkpoint, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.settings import Settings, format_settings_error
from tests.service import samples
from tests.service.conftest import free_port

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


def test_sigterm_drains_and_exits(checkpoint_path, photos):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--port",
            str(port),
            "--checkpoint",
            str(checkpoint_path),
        ],
        cwd=REPO_ROOT,
        env=service_env(ADAMTL_HOST="127.0.0.1", ADAMTL_TORCH_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=30) as client:
            while True:
                assert process.poll() is None, "the service exited during start-up"
                assert time.monotonic() < deadline, "the service did not turn ready within 60 s"
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            response = client.post(
                "/predict?budget=0.6", files={"image": ("cat.png", photos["chelsea.png"])}
            )
            assert response.status_code == 200

            # A slow request in flight when SIGTERM arrives still gets its response.
            large = samples.resized_jpeg(photos["coffee.png"], 2400, 1600)
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(
                    client.post, "/predict", files={"image": ("large.jpg", large)}
                )
                time.sleep(0.3)
                process.send_signal(signal.SIGTERM)
                assert in_flight.result().status_code == 200
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # uvicorn re-raises the signal after a clean shutdown, so the exit reports SIGTERM.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "serving model adamtl-tiny-test version 0.0.1 (preset tiny" in output
    assert "status=200 budget=0.6 flops_ratio=" in output
    assert "draining" in output
    assert "shutdown complete" in output
