"""AdaMTL model library: adaptive Swin encoder, policy, task heads, FLOPs, checkpoints."""

from model_core.presets import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TASKS,
    ModelConfig,
    get_preset,
    preset_names,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TASKS",
    "ModelConfig",
    "get_preset",
    "preset_names",
]
