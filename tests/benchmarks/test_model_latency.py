import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_model_latency_json_rows():
    command = [
        sys.executable, "-m", "benchmarks.model_latency", "--preset", "tiny", "--batch", "1", "2",
        "--budgets", "1.0", "0.5", "--repeats", "2", "--calibration-images", "4", "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["batch"], row["budget"]) for row in rows] == [
        (1, 1.0),
        (1, 0.5),
        (2, 1.0),
        (2, 0.5),
    ]
    for row in rows:
        assert {
            "preset",
            "batch",
            "budget",
            "flops_ratio",
            "latency_ratio",
            "policy_overhead_ratio",
        } <= set(row)
        assert row["preset"] == "tiny"
        assert row["latency_ratio"] > 0
        assert 0 < row["policy_overhead_ratio"] < 0.03
    assert rows[0]["flops_ratio"] == 1.0
    assert rows[1]["flops_ratio"] < 0.6


def test_model_latency_rejects_bad_batch():
    command = [sys.executable, "-m", "benchmarks.model_latency", "--batch", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--batch values and --repeats must be positive" in result.stderr


def test_model_latency_on_demo_scenes():
    # The shipped checkpoint on procedural scenes, the inputs its policy was trained for.
    command = [
        sys.executable, "-m", "benchmarks.model_latency", "--preset", "demo", "--checkpoint",
        "checkpoints/demo.safetensors", "--images", "scenes", "--batch", "2", "--budgets", "1.0",
        "0.4", "--repeats", "1", "--json",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=True, cwd=REPO
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["images"] for row in rows] == ["scenes", "scenes"]
    assert rows[0]["flops_ratio"] == 1.0
    # The stored calibration holds on two new scenes to within 0.1.
    assert abs(rows[1]["flops_ratio"] - 0.4) < 0.1


def run_model_latency(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.model_latency", "--preset", "tiny", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_model_latency_rejects_invalid_options(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    cases = {
        ("--budgets", "2.0"): "invalid --budgets [2.0]: model tiny serves budgets in [0.3, 1]",
        ("--budgets", "0.1"): "invalid --budgets [0.1]",
        ("--budgets", "nan"): "invalid --budgets [nan]",
        ("--threads", "0"): "invalid --threads 0",
        ("--calibration-images", "0"): "invalid --calibration-images 0",
        ("--checkpoint", str(tmp_path / "absent.safetensors")): "--checkpoint file not found",
        ("--checkpoint", str(junk)): "is not a readable safetensors file",
    }
    for args, message in cases.items():
        result = run_model_latency(*args, "--batch", "1", "--repeats", "1")
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr, args
        assert message in result.stderr, args
