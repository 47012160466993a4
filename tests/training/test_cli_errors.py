"""Invalid input to the training command lines ends in a one-line error, with a traceback only
under Python's development mode."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_core.calibration import calibrate
from model_core.checkpoint import save_checkpoint
from model_core.model import AdaMTL
from model_core.presets import get_preset
from training import evaluate, report
from training.datasets.scenes import generate_split

REPO = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str, python_options=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *python_options, "-m", module, *args],
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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Scenes of 64 px and untrained tiny checkpoints, enough for the checks before evaluating."""
    root = tmp_path_factory.mktemp("evaluate")
    generate_split(root / "data", "train", count=6, size=64, seed=0)
    generate_split(root / "data", "val", count=2, size=64, seed=1)
    torch.manual_seed(0)
    model = AdaMTL(get_preset("tiny"))
    uncalibrated = save_checkpoint(
        model, root / "static.safetensors", provenance={"stage": "static"}
    )
    calibrate(model, torch.rand(4, 3, 64, 64), budgets=[0.5], tolerance=0.05, max_steps=6)
    tiny = save_checkpoint(model, root / "tiny.safetensors", provenance={"stage": "cotrain"})
    return root, tiny, uncalibrated


def evaluate_args(root: Path, checkpoint: Path, *extra: str):
    return evaluate.build_parser().parse_args(
        ["--adaptive", str(checkpoint), "--static", str(checkpoint), "--data", str(root / "data"),
         "--out-dir", str(root / "report"), "--calibration-images", "2", "--threads", "1",
         *extra]
    )  # fmt: skip


def test_evaluate_rejects_invalid_options(tiny_run, one_torch_thread):
    root, tiny, uncalibrated = tiny_run
    file = root / "file"
    file.write_text("")
    cases = {
        ("--calibration-images", "6"): "--calibration-images 6 must be smaller than the 6 images",
        ("--calibration-images", "9"): "--calibration-images 9 must be smaller",
        ("--budgets", "2.0"): "invalid --budgets [2.0]: preset tiny serves [0.3, 1]",
        ("--matched-ratio", "0.1"): "invalid --matched-ratio 0.1",
        ("--val-limit", "0"): "invalid --val-limit 0",
        ("--out-dir", str(file)): f"--out-dir {file} is a file",
        ("--export", str(root / "absent" / "m.safetensors")): "--export folder",
        ("--static", str(REPO / "checkpoints" / "demo.safetensors")): "is preset demo (192 px",
        ("--static", str(tiny)): f"--static {tiny} was written by the cotrain stage",
        ("--adaptive", str(uncalibrated)): f"--adaptive {uncalibrated} has no budget calibration",
    }
    for extra, message in cases.items():
        args = evaluate_args(root, tiny, *extra)
        if "--static" not in extra:
            args.static = uncalibrated
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate.main(args)
    assert not (root / "report" / "evaluation.json").exists()


def test_report_corrupt_masks_file(tmp_path):
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text((REPO / "docs" / "demo-evaluation.json").read_text())
    masks = tmp_path / "masks.npz"
    masks.write_text("not an npz archive")
    with pytest.raises(ValueError, match=re.escape(f"invalid masks file {masks}")):
        report.write_report(evaluation)

    # Without masks.npz the report is written without the token mask figure.
    masks.unlink()
    assert "token masks" not in report.write_report(evaluation).read_text()


def test_train_invalid_device(tmp_path):
    common = ["--stage", "static", "--preset", "tiny", "--data", str(tmp_path), "--out",
              str(tmp_path / "run")]  # fmt: skip
    result = run_module("training.train", *common, "--device", "gpu")
    assert result.returncode == 2
    assert "invalid choice: 'gpu'" in result.stderr
    if not torch.cuda.is_available():
        result = run_module("training.train", *common, "--device", "cuda")
        assert result.returncode == 2
        assert "--device cuda: no CUDA device is available" in result.stderr
        assert "Traceback" not in result.stderr


def test_dev_mode_prints_traceback(tmp_path):
    missing = tmp_path / "absent.json"
    result = run_module(
        "training.report", "--evaluation", str(missing), python_options=["-X", "dev"]
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert f"--evaluation file not found: {missing}" in result.stderr.splitlines()[-1]
