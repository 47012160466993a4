"""Checkpoints: one `.safetensors` file with the weights and JSON metadata.

The metadata entry "adamtl" contains a JSON object with the format version, the model
configuration, the ablation flags, the calibration table, the provenance (dataset, recipe,
command, seed, git commit) and the evaluation metrics. Loading never unpickles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model_core.model import AdaMTL
from model_core.presets import ModelConfig

__all__ = ["FORMAT", "CheckpointError", "load_checkpoint", "read_metadata", "save_checkpoint"]

FORMAT = "adamtl/1"
_METADATA_KEY = "adamtl"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match its configuration."""


def save_checkpoint(
    model: AdaMTL,
    path: str | Path,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write `model` and its metadata to `path` (a `.safetensors` file) atomically."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "name": name or f"adamtl-{model.config.name}",
        "version": version,
        "config": model.config.to_dict(),
        "adapt_blocks": model.adapt_blocks,
        "adapt_tokens": model.adapt_tokens,
        "calibration": model.calibration,
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    save_file(tensors, str(temporary), metadata={_METADATA_KEY: json.dumps(metadata)})
    temporary.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read and validate the metadata of checkpoint `path` without loading the weights."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as reader:
            raw = (reader.metadata() or {}).get(_METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({error}); it may be truncated "
            "or corrupt: copy it again or re-export it"
        ) from error
    if raw is None:
        raise CheckpointError(
            f"checkpoint {path} has no '{_METADATA_KEY}' metadata; export it with save_checkpoint"
        )
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path} has invalid metadata JSON: {error}") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointError(
            f"checkpoint {path} has format {found!r}; this version reads {FORMAT!r}"
        )
    return metadata


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[AdaMTL, dict[str, Any]]:
    """Rebuild the model stored in `path`; return it in eval mode with its metadata.

    Raises:
        CheckpointError: naming the file and the problem (missing, truncated, corrupt,
            unknown format, invalid configuration, missing, unexpected or mismatched tensors).
    """
    path = Path(path)
    metadata = read_metadata(path)
    try:
        for flag in ("adapt_blocks", "adapt_tokens"):
            if not isinstance(metadata.get(flag, True), bool):
                raise ValueError(f"{flag} must be true or false, got {metadata[flag]!r}")
        config = ModelConfig.from_dict(metadata["config"])
        model = AdaMTL(
            config,
            adapt_blocks=bool(metadata.get("adapt_blocks", True)),
            adapt_tokens=bool(metadata.get("adapt_tokens", True)),
        )
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path} has an invalid model configuration: {error}"
        ) from error

    expected = model.state_dict()
    state = {}
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as reader:
            names = set(reader.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"checkpoint {path} does not match its configuration: missing tensors "
                    f"{missing[:8]}, unexpected tensors {unexpected[:8]}"
                )
            for name in expected:
                state[name] = reader.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path} could not be read ({error}); it may be truncated"
        ) from error
    mismatched = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"checkpoint {path} has tensors of the wrong shape: {mismatched[:8]}")
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if not_finite:
        raise CheckpointError(f"checkpoint {path} has NaN or infinite values in {not_finite[:8]}")
    model.load_state_dict(state)
    calibration = metadata.get("calibration")
    if calibration is not None:
        if not _valid_calibration(calibration):
            raise CheckpointError(
                f"checkpoint {path} has an invalid calibration table: {calibration!r}"
            )
        model.calibration = calibration
    model.to(map_location).eval()
    return model, metadata


def _valid_table(table: Any) -> bool:
    if not isinstance(table, dict):
        return False
    budgets, offsets = table.get("budgets"), table.get("offsets")
    if not isinstance(budgets, list) or not isinstance(offsets, list):
        return False
    if len(budgets) == 0 or len(budgets) != len(offsets):
        return False
    numbers = budgets + offsets
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers):
        return False
    return all(a < b for a, b in zip(budgets, budgets[1:], strict=False))


def _valid_calibration(table: Any) -> bool:
    if not _valid_table(table):
        return False
    task_sets = table.get("task_sets") or {}
    return isinstance(task_sets, dict) and all(_valid_table(t) for t in task_sets.values())
