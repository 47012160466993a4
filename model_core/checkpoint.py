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
from model_core.presets import MAX_CLASSES, TASKS, ModelConfig

__all__ = [
    "FORMAT",
    "MAX_CLASSES",
    "CheckpointError",
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
]

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
            unknown format, invalid configuration or metadata field, more than MAX_CLASSES
            classes in a task, missing or unexpected tensors, tensors of the wrong shape or
            dtype, NaN or infinite values).
    """
    path = Path(path)
    metadata = read_metadata(path)
    _validate_config_metadata(path, metadata)
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
    _match_dtypes(path, state, expected)
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


def _match_dtypes(
    path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Cast floating-point tensors of `state` to the model's dtype and reject other mismatches.

    Float16, bfloat16 and float64 are cast to the model's float32, as `load_state_dict` does.
    The 16-bit types widen exactly, which allows half-size exports. A float64 value too large
    for float32 becomes infinite, which the finite check after this one rejects. Integer
    values in a float weight mean a quantised or corrupt export, and integer buffers (such as
    BatchNorm's `num_batches_tracked`) are counts, so any mismatch involving an integer or bool
    dtype is rejected. `save_checkpoint` writes the model's own dtypes.
    """
    wrong = []
    for name, tensor in state.items():
        dtype = expected[name].dtype
        if tensor.dtype == dtype:
            continue
        if tensor.is_floating_point() and dtype.is_floating_point:
            state[name] = tensor.to(dtype)
        else:
            wrong.append(f"{name} {tensor.dtype} != {dtype}")
    if wrong:
        raise CheckpointError(
            f"checkpoint {path} has tensors of the wrong dtype: {wrong[:8]}. An integer tensor "
            "must have the model's dtype exactly, and a floating-point parameter must be stored "
            "as a floating-point dtype (float16, bfloat16, float32 or float64), which is then "
            "cast to the model's"
        )


def _validate_config_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Raise CheckpointError unless the JSON types of the metadata field "config" are valid.

    Checks what `ModelConfig.from_dict` would convert silently or fail on with a bare Python
    error: "config" must be an object, "tasks" a list of distinct names, and "classes" an
    object that maps each task to a list of 2 to MAX_CLASSES distinct, non-empty strings.
    `ModelConfig` checks the values themselves (known tasks, sizes, class lists per task).
    The error names the file and the field.
    """
    if "config" not in metadata:
        raise _field_error(
            path,
            "config",
            "is missing, but it must contain the model configuration as an object, as "
            "save_checkpoint writes it",
        )
    config = metadata["config"]
    if not isinstance(config, dict):
        raise _field_error(
            path,
            "config",
            "must be an object with the model configuration, as save_checkpoint writes it, "
            f"got {_describe(config)}",
        )

    if "tasks" in config:
        _validate_names(path, "config.tasks", config["tasks"], f"task names from {list(TASKS)}")

    if "classes" not in config:
        return
    classes = config["classes"]
    if not isinstance(classes, dict):
        raise _field_error(
            path,
            "config.classes",
            "must be an object that maps task names to class lists, such as "
            f'{{"semseg": ["floor", "wall"]}}, got {_describe(classes)}',
        )
    for task, names in classes.items():
        field = f"config.classes.{task}"
        _validate_names(path, field, names, "class names")
        if len(names) < 2:
            raise _field_error(
                path, field, f"must list at least 2 class names for task {task!r}, got 1"
            )
        if len(names) > MAX_CLASSES:
            raise _field_error(
                path,
                field,
                f"lists {len(names)} classes for task {task!r}, but at most {MAX_CLASSES} "
                "classes are supported because label maps are uint8 and the service writes "
                "8-bit palette PNGs",
            )


def _validate_names(path: Path, field: str, names: Any, kind: str) -> None:
    """Raise CheckpointError unless `names` is a non-empty list of distinct, non-empty strings.

    `kind` names the items in the message, such as "class names".
    """
    requirement = f"must be a non-empty list of distinct {kind} (non-empty strings)"
    if not isinstance(names, list):
        raise _field_error(path, field, f"{requirement}, got {_describe(names)}")
    if not names:
        raise _field_error(path, field, f"{requirement}, got an empty list")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise _field_error(path, field, f"{requirement}, but item {index} is {_describe(name)}")
    seen = set()
    for name in names:
        if name in seen:
            raise _field_error(path, field, f"{requirement}, but {name!r} appears more than once")
        seen.add(name)


def _field_error(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} has an invalid model configuration: metadata field '{field}' {problem}"
    )


def _describe(value: Any) -> str:
    """Describe a JSON value for an error message, such as "the string 'abc'" or "null"."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value!r}"
    text = json.dumps(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"the {type(value).__name__} {text}"
