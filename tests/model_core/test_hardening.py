"""load_checkpoint on damaged files: each must raise CheckpointError naming the file."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.model_core.conftest import make_model, with_metadata


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    save_checkpoint(make_model(), path)
    return path.read_bytes()


def flip_header_byte(raw: bytes) -> bytes:
    return raw[:20] + bytes([raw[20] ^ 0x40]) + raw[21:]


def unsort_calibration(metadata: dict) -> None:
    metadata["calibration"] = {"budgets": [0.9, 0.5], "offsets": [0.0, 0.1]}


DAMAGES = {
    "empty file": lambda raw: b"",
    "truncated header": lambda raw: raw[:100],
    "truncated data": lambda raw: raw[: len(raw) // 2],
    "huge header length": lambda raw: struct.pack("<Q", 2**62) + raw[8:],
    "header length past end": lambda raw: struct.pack("<Q", len(raw)) + raw[8:],
    "bit flip in header": flip_header_byte,
    "config missing": lambda raw: with_metadata(raw, lambda m: m.pop("config")),
    "unknown config field": lambda raw: with_metadata(raw, lambda m: m["config"].update(x=1)),
    "min_budget NaN": lambda raw: with_metadata(
        raw, lambda m: m["config"].update(min_budget=float("nan"))
    ),
    "unsorted calibration": lambda raw: with_metadata(raw, unsort_calibration),
    "wrong format": lambda raw: with_metadata(raw, lambda m: m.update(format="adamtl/0")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_raises(checkpoint_bytes, tmp_path, damage):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(DAMAGES[damage](checkpoint_bytes))

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)

    assert str(path) in str(raised.value)


def test_directory_raises(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.mkdir()

    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "change",
    [
        {"img_size": 0},
        {"embed_dim": -48},
        {"img_size": 10**9},
        {"classes": "x"},
        {"min_budget": "0.3"},
    ],
    ids=["zero size", "negative width", "huge size", "classes not a dict", "budget string"],
)
def test_bad_config_raises_checkpoint_error(checkpoint_bytes, tmp_path, change):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(with_metadata(checkpoint_bytes, lambda m: m["config"].update(change)))
    with pytest.raises(CheckpointError, match="invalid model configuration"):
        load_checkpoint(path)


def test_string_ablation_flag_raises(checkpoint_bytes, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(with_metadata(checkpoint_bytes, lambda m: m.update(adapt_blocks="false")))
    with pytest.raises(CheckpointError, match="adapt_blocks must be true or false"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "budgets", [[float("nan"), 0.5], [0.5, 0.5]], ids=["nan budget", "repeated budget"]
)
def test_bad_calibration_grid_raises(checkpoint_bytes, tmp_path, budgets):
    def change(metadata):
        metadata["calibration"] = {"budgets": budgets, "offsets": [0.0, 1.0]}

    path = tmp_path / "bad.safetensors"
    path.write_bytes(with_metadata(checkpoint_bytes, change))
    with pytest.raises(CheckpointError, match="invalid calibration table"):
        load_checkpoint(path)


def test_nan_weights_raise(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.heads["semseg"].decoder[1].weight[0, 0] = float("nan")
    path = save_checkpoint(model, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite values in"):
        load_checkpoint(path)


# Resizes a (3, 24, 24) map to 1 x 4,000,000 pixels in a fresh interpreter and prints the peak
# and the retained growth of resident memory in MiB. The output itself is 46 MiB.
_WIDE_RESIZE_SCRIPT = """
import torch
from model_core.predictor import bilinear_resize

def status_mib(key):
    with open("/proc/self/status") as status:
        return int(status.read().split(key + ":")[1].split()[0]) // 1024

torch.set_num_threads(1)
maps = torch.randn(3, 24, 24)
bilinear_resize(maps, (2, 2))
before = status_mib("VmRSS")
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # resets VmHWM to the current resident memory
resized = bilinear_resize(maps, (1, 4_000_000))
assert resized.shape == (3, 1, 4_000_000)
peak = status_mib("VmHWM") - before
del resized
print(peak, status_mib("VmRSS") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_bilinear_resize_wide_map_memory():
    # An upload of 1 x N pixels is within the service's default pixel limit up to
    # N = 40,000,000. Its resize should cost about its output, as F.interpolate's does (peak
    # 120 MiB at N = 5e6). A dense (N, 24) weight matrix, built in float64 and cached in
    # float32 after the call, raised the peak by 1.9 GiB at N = 5e6.
    result = subprocess.run(
        [sys.executable, "-c", _WIDE_RESIZE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    peak_mib, retained_mib = (int(value) for value in result.stdout.split())

    assert peak_mib < 400, f"peak resident memory grew by {peak_mib} MiB"
    assert retained_mib < 100, f"{retained_mib} MiB stay resident after the call"
