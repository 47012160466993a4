"""Two-process training with torchrun on CPU (gloo), rendezvous on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_core.checkpoint import load_checkpoint, save_checkpoint
from model_core.model import AdaMTL
from model_core.presets import get_preset
from training.datasets.scenes import generate_split

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*arguments: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "training.train",
        *arguments,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    generate_split(root, "train", count=20, size=64, seed=0)
    generate_split(root, "val", count=4, size=64, seed=1)
    return root


def test_two_process_static_and_cotrain(data_root, tmp_path):
    torch.manual_seed(0)
    init = save_checkpoint(AdaMTL(get_preset("tiny")), tmp_path / "init.safetensors")
    common = [
        "--data", str(data_root), "--out", str(tmp_path / "run"), "--calibration-images", "4",
        "--batch-size", "4", "--threads", "1", "--warmup-steps", "1",
    ]  # fmt: skip

    static = torchrun("--stage", "static", "--preset", "tiny", "--epochs", "2", *common)
    assert static.returncode == 0, static.stderr[-4000:]
    # Each process gets 8 of the 16 training images, so an epoch has 2 batches of 4.
    cotrain = torchrun(
        "--stage", "cotrain", "--init", str(init), "--att-epochs", "2", "--finetune-epochs", "1",
        "--calibration-step", "0.3", "--calibration-tolerance", "0.05", *common,
    )  # fmt: skip
    assert cotrain.returncode == 0, cotrain.stderr[-4000:]

    for stage, epochs in (("static", 2), ("cotrain", 3)):
        stage_dir = tmp_path / "run" / stage
        records = [
            json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["epoch"] for r in records] == list(range(epochs)), "only rank 0 writes"
        assert all(r["steps"] == 2 for r in records)
        model, metadata = load_checkpoint(stage_dir / "model.safetensors")
        assert metadata["format"] == "adamtl/1"
        assert metadata["provenance"]["stage"] == stage
        assert set(model.state_dict()) == set(AdaMTL(get_preset("tiny")).state_dict())
        resolved = json.loads((stage_dir / "config.json").read_text())
        assert resolved["world_size"] == 2

    model, metadata = load_checkpoint(tmp_path / "run" / "cotrain" / "model.safetensors")
    assert metadata["calibration"]["budgets"] == pytest.approx([0.3, 0.6, 0.9])
    focus = [json.loads(line)["focus_task"] for line in
             (tmp_path / "run" / "cotrain" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert focus == ["saliency", "human_parts", "all"]
