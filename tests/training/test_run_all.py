"""End-to-end run of training/run_all.sh with the smoke preset."""

import json
import os
import subprocess
from pathlib import Path

from model_core.checkpoint import load_checkpoint
from training.datasets.scenes import generate_split

REPO = Path(__file__).resolve().parents[2]


def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        ["bash", str(REPO / "training" / "run_all.sh"), "--preset", "smoke", "--out", str(out),
         "--threads", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    model, metadata = load_checkpoint(out / "adamtl-smoke.safetensors")
    assert model.config.name == "tiny"
    assert model.calibration is not None
    provenance = metadata["provenance"]
    assert provenance["preset"] == "tiny"
    assert provenance["seed"] == 0
    assert provenance["command"].startswith("training/run_all.sh --preset smoke")
    assert "scenes:" in provenance["dataset"]
    assert len(provenance["git_commit"]) == 40
    assert set(provenance["schedule"]) == {"static", "policy_init", "cotrain"}
    assert provenance["schedule"]["cotrain"]["att_epochs"] == 4
    metrics = metadata["metrics"]
    assert set(metrics["adaptive"]) >= {"0.40", "0.60", "0.80", "1.00"}
    assert "mIoU" in metrics["static"]["metrics"]["semseg"]

    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["val_images"] == 16
    names = [row["name"] for row in evaluation["ablation"]["rows"]]
    assert names == [
        "task-aware policy",
        "task-agnostic policy",
        "random policy, adaptive model",
        "random policy, static model",
    ]
    for row in evaluation["ablation"]["rows"][2:]:
        assert abs(row["flops_ratio"] - 0.5) < 0.15, row["name"]
    achieved = {row["budget"]: row["achieved"] for row in evaluation["tracking"]}
    assert achieved[1.0] == 1.0
    assert achieved[0.4] < achieved[0.8] < 1.0
    selection = {(r["budget"], len(r["tasks"])): r["gflops"] for r in evaluation["task_selection"]}
    assert selection[(1.0, 1)] < selection[(1.0, 4)]

    report = (out / "report.md").read_text()
    for heading in (
        "| model | Sal maxF ↑ | Parts mIoU ↑ | Seg mIoU ↑ | Normals mErr ↓ | Δm vs static (%)",
        "| static MTL |",
        "| AdaMTL, budget 0.40 |",
        "| requested budget | mean achieved FLOPs ratio |",
        "Spearman correlation",
        "| task-agnostic policy |",
        "| random policy, static model (keep p = ",
        "## Task selection",
    ):
        assert heading in report, heading
    for image in ("accuracy_vs_flops.png", "flops_histogram.png", "token_masks.png"):
        assert (out / image).stat().st_size > 1000, image
        assert f"]({image})" in report


def run_all(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        ["bash", str(REPO / "training" / "run_all.sh"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_run_all_rejects_invalid_options(tmp_path):
    out = str(tmp_path / "run")
    cases = {
        ("--preset",): "error: --preset needs a value",
        ("--preset", "smoke", "--out"): "error: --out needs a value",
        ("--preset", "smoke", "--out", out, "--nproc", "abc"): "invalid --nproc 'abc'",
        ("--preset", "smoke", "--out", out, "--threads", "0"): "invalid --threads '0'",
        ("--preset", "smoke", "--out", out, "--train-count", "-5"): "invalid --train-count '-5'",
        ("--preset", "smoke", "--out", out, "--static-epochs", "1.5"): "invalid --static-epochs",
        ("--preset", "smoke", "--out", out, "--steps-per-epoch", "0"): "invalid --steps-per-epoch",
        ("--preset", "smoke", "--out", out, "--calibration-images", "40"): (
            "--calibration-images 40 leaves no training image out of --train-count 40"
        ),
        ("--preset", "smoke", "--out", out, "--lr", "abc"): "invalid --lr 'abc'",
        ("--preset", "smoke", "--out", out, "--distill", "-1"): "invalid --distill '-1'",
        ("--preset", "smoke", "--out", out, "--precision", "fp16"): "invalid --precision 'fp16'",
        ("--preset", "smoke", "--out", out, "--class-weights", "x"): "invalid --class-weights",
        ("--preset", "nope"): "error: unknown preset 'nope'",
    }
    for args, message in cases.items():
        result = run_all(tmp_path, *args)
        assert result.returncode == 2, args
        assert message in result.stderr, args
        assert "unbound variable" not in result.stderr, args
    assert not (tmp_path / "run").exists(), "invalid options must stop the run before any output"


def test_run_all_keeps_mismatched_data_folder(tmp_path):
    data = tmp_path / "scenes"
    generate_split(data, "train", count=3, size=64, seed=0)
    manifest = (data / "train" / "manifest.json").read_text()
    result = run_all(tmp_path, "--preset", "smoke", "--out", str(tmp_path / "run"), "--data",
                     str(data), "--threads", "1")  # fmt: skip
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert f"the split {data}/train has count 3 (expected 40)" in output
    assert (data / "train" / "manifest.json").read_text() == manifest
    assert not (data / "val").exists()
