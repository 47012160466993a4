"""`python -m benchmarks.service_load` end to end: a real service process on a tiny checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import service_load
from benchmarks.model_latency import generated_images
from benchmarks.service_load import trend_growth
from model_core.calibration import calibrate
from model_core.checkpoint import load_checkpoint, save_checkpoint
from model_core.model import AdaMTL
from model_core.presets import get_preset

REPO_ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = {
    "concurrency",
    "throughput_rps",
    "predictor_rps",
    "throughput_ratio",
    "p50_ms",
    "p99_ms",
    "predictor_batch_ms",
    "predictor_single_ms",
    "latency_ratio",
    "rss_warm_mib",
    "rss_after_mib",
    "rss_growth_ratio",
    "rss_trend_growth_ratio",
    "service_pid",
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with random weights, calibrated on generated images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = AdaMTL(get_preset("tiny"))
        images = generated_images(8, model.config.img_size, seed=1)
        calibrate(model, images, budgets=[0.3, 0.6, 0.9], tolerance=0.02)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    return save_checkpoint(model, path, name="adamtl-tiny-bench", version="0.0.1")


def run_benchmark(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.service_load", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_service_load_json_rows(tiny_checkpoint):
    result = run_benchmark(
        [
            "--checkpoint", str(tiny_checkpoint), "--concurrency", "1", "4", "--requests", "8",
            "--rounds", "3", "--soak-requests", "20", "--soak-concurrency", "4", "--threads", "1",
            "--json",
        ]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]

    assert [row["concurrency"] for row in rows] == [1, 4]
    assert [row["batch_size"] for row in rows] == [1, 4]
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["completed"] == 8
        assert row["errors"] == 0
        assert row["soak_completed"] == 20
        assert row["soak_errors"] == 0
        assert row["checkpoint_source"] == "file"
        assert row["preset"] == "tiny"
        assert row["threads"] == 1
        for key in ("throughput_rps", "predictor_rps", "p50_ms", "p99_ms", "rss_after_mib"):
            assert math.isfinite(row[key]), key
            assert row[key] > 0, key
        assert row["p99_ms"] >= row["p50_ms"]
        assert math.isfinite(row["rss_growth_ratio"])
        assert math.isfinite(row["rss_trend_growth_ratio"])
        assert row["service_mean_batch"] >= 1
        assert row["service_batch_ms"] > 0

    assert len({row["service_pid"] for row in rows}) == 1
    assert not process_exists(rows[0]["service_pid"]), "the service outlived the benchmark"
    assert f"checkpoint: {tiny_checkpoint.resolve()}" in result.stderr
    assert "stopped the service" in result.stderr
    # Each level alternates predictor timing and requests. At concurrency 1 the 8 requests go
    # in 3 rounds; at concurrency 4 in 2, so that each round sends at least 4.
    expected_rounds = {1: ((1, 3), (2, 3), (3, 2)), 4: ((1, 4), (2, 4))}
    for concurrency, rounds in expected_rounds.items():
        for round_number, count in rounds:
            line = f"concurrency {concurrency}, round {round_number} of {len(rounds)}"
            assert f"{line}: predictor at batch size {concurrency}, then {count} requests" in (
                result.stderr
            )


def test_service_load_missing_checkpoint(tmp_path):
    missing = tmp_path / "absent.safetensors"
    result = run_benchmark(["--checkpoint", str(missing), "--requests", "1"])
    assert result.returncode == 1
    assert f"checkpoint not found: {missing}" in result.stderr
    assert "started the service" not in result.stderr


def test_service_load_rejects_zero_concurrency():
    result = run_benchmark(["--concurrency", "4", "0"])
    assert result.returncode == 2
    assert "--concurrency must be at least 1, got 0" in result.stderr


def test_trend_growth_follows_drift_not_dips():
    # A flat series with a dip every 10 samples, as a periodic malloc_trim gives, and the
    # dip falling on the last reading: the two end points differ by 10 %, the trend is flat.
    flat = [(0.25 * i, 1000 if i % 10 else 900) for i in range(1, 101)]
    assert flat[-1][1] / flat[0][1] - 1 == pytest.approx(-0.1)
    assert abs(trend_growth(flat)) < 0.01

    rising = [(0.25 * i, 1000 + i) for i in range(101)]  # +10 % from first to last
    assert trend_growth(rising) == pytest.approx(0.1)


def test_trend_growth_uses_reading_times():
    # Three readings close together at 1000, then one 10 s later at 1100. A line fitted over
    # time rises 10.1 %, and one fitted over the readings' index only 9.2 %.
    samples = [(0.0, 1000), (0.1, 1000), (0.2, 1000), (10.0, 1100)]
    assert trend_growth(samples) == pytest.approx(0.1, abs=0.002)


def test_trend_growth_of_too_few_samples():
    assert trend_growth([]) == 0.0
    assert trend_growth([(0.0, 1000)]) == 0.0


def test_service_load_corrupt_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    result = run_benchmark(
        ["--checkpoint", str(junk), "--concurrency", "1", "--requests", "1", "--soak-requests",
         "1", "--threads", "1"]
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"checkpoint {junk} is not a readable safetensors file" in result.stderr


def test_random_demo_checkpoint_without_default(tmp_path, monkeypatch):
    # With no checkpoints/demo.safetensors, the benchmark builds and calibrates a random model.
    monkeypatch.setattr(service_load, "DEFAULT_CHECKPOINT", tmp_path / "absent.safetensors")
    args = argparse.Namespace(checkpoint=None, calibration_images=1, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path, source = service_load.resolve_checkpoint(args, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert path == tmp_path / "demo-random.safetensors"
    assert source.startswith("temporary checkpoint")
    assert load_checkpoint(path)[0].calibration is not None
