import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_block_scaling_json_rows():
    command = [
        sys.executable, "-m", "benchmarks.block_scaling", "--preset", "tiny", "--batch", "1", "2",
        "--keep-ratios", "0.9", "0.3", "--repeats", "2", "--threads", "1", "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["stage"], row["batch"]) for row in rows[::2]] == [
        (stage, batch) for stage in range(4) for batch in (1, 2)
    ]
    for row in rows:
        assert row["preset"] == "tiny"
        assert row["dense_ms"] > 0
        assert row["packed_ms"] > 0
        assert row["time_ratio"] > 0
    # Random masks: the measured share of kept tokens is near the requested probability.
    first_stage = [row["keep_ratio"] for row in rows if row["stage"] == 0]
    assert abs(first_stage[0] - 0.9) < 0.1
    assert abs(first_stage[1] - 0.3) < 0.1
    assert [row["tokens"] for row in rows[::4]] == [256, 64, 16, 4]


def test_block_scaling_rejects_bad_keep_ratio():
    command = [sys.executable, "-m", "benchmarks.block_scaling", "--keep-ratios", "1.0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "each must be in (0, 1)" in result.stderr


def test_block_scaling_rejects_invalid_threads():
    command = [sys.executable, "-m", "benchmarks.block_scaling", "--preset", "tiny", "--threads",
               "-1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert "invalid --threads -1" in result.stderr
