"""Invalid input to the training command lines ends in a one-line error, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_train_missing_data_folder(tmp_path):
    missing = tmp_path / "absent"
    result = run_module(
        "training.train", "--stage", "static", "--preset", "tiny", "--data", str(missing),
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"--data folder not found: {missing}" in result.stderr


def test_train_data_folder_without_split(tmp_path):
    result = run_module(
        "training.train", "--stage", "static", "--preset", "tiny", "--data", str(tmp_path),
        "--out", str(tmp_path / "run"), "--threads", "1",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "manifest not found" in result.stderr


def test_evaluate_missing_checkpoint(tmp_path):
    result = run_module(
        "training.evaluate", "--adaptive", str(tmp_path / "a.safetensors"), "--static",
        str(tmp_path / "s.safetensors"), "--data", str(tmp_path), "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--adaptive checkpoint not found" in result.stderr


def test_report_malformed_evaluation(tmp_path):
    cases = {
        "missing.json": None,
        "not_json.json": "not json",
        "list.json": "[1, 2]",
        "empty.json": "{}",
        "partial.json": json.dumps({"static": {"metrics": {}}}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        result = run_module("training.report", "--evaluation", str(path))
        assert result.returncode == 2, name
        assert "Traceback" not in result.stderr, name
        assert str(path) in result.stderr, name


def test_scenes_out_is_a_file(tmp_path):
    out = tmp_path / "file"
    out.write_text("")
    result = run_module(
        "training.datasets.scenes", "--out", str(out), "--count", "1", "--size", "64",
        "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Not a directory" in result.stderr
