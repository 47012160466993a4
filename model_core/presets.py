"""Named model presets and the task and class lists they carry.

A preset is plain data. `get_preset(name, **overrides)` returns a frozen `ModelConfig`, and
`model_core.model.AdaMTL(config)` builds the model from it, so no module reads a global config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

TASKS: tuple[str, ...] = ("saliency", "human_parts", "semseg", "normals")

# ImageNet statistics used by timm's Swin checkpoints; images are normalised with them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Value that marks pixels without a label in every target map, as in PASCAL-Context.
IGNORE_INDEX = 255

# Maximum number of classes per classification task. `Predictor` returns label maps as uint8
# and the service encodes them as 8-bit palette PNGs, so class indices must fit in 0..255.
# NOTE: training targets mark unlabelled pixels with IGNORE_INDEX (255), so the training
# recipe cannot learn a class at index 255. Trained models have at most 255 usable classes.
MAX_CLASSES = 256

# The 20 PASCAL VOC object classes plus background, used for semantic segmentation.
PASCAL_SEMSEG_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# Background and the six PASCAL-Part groups used in the multi-task literature.
HUMAN_PARTS_CLASSES: tuple[str, ...] = (
    "background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg",
)  # fmt: skip

# Semantic classes of the procedural scenes (training.datasets.scenes renders them).
SCENE_SEMSEG_CLASSES: tuple[str, ...] = (
    "floor", "wall", "sphere", "box", "cylinder", "cone", "torus", "ellipsoid", "person",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Every argument needed to build an AdaMTL model; stored in checkpoints as JSON.

    Attributes:
        name: Preset name the configuration came from.
        img_size: Square model input side in pixels, a multiple of 32. Each stage resolution
            (img_size / 4, / 8, / 16, / 32) must be a multiple of the window or smaller than it.
        embed_dim: Channels of stage 1; stage i has embed_dim * 2**i.
        depths: Swin blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Swin window side in tokens.
        tasks: Task names, a subset of TASKS, in output order.
        classes: Class names per classification task (human_parts, semseg).
        decoder_width: Channels of the fusing layers and decoders.
        head_stride: Output stride of the fusing layer (4 or 8) relative to the input.
        policy_hidden: Hidden width of the policy networks.
        policy_mode: "task_aware" (one sub-network per task) or "task_agnostic".
        gumbel_temperature: Temperature of the Gumbel-sigmoid gate during training.
        min_budget: Smallest budget a request may ask for.
        mlp_ratio: Swin MLP expansion.
    """

    name: str
    img_size: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    tasks: tuple[str, ...] = TASKS
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    decoder_width: int = 64
    head_stride: int = 8
    policy_hidden: int = 32
    policy_mode: str = "task_aware"
    gumbel_temperature: float = 5.0
    min_budget: float = 0.3
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("img_size", "embed_dim", "window_size", "decoder_width", "policy_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 4096:
                raise ValueError(f"invalid {name} {value!r}: must be an integer in [1, 4096]")

        for name in ("depths", "num_heads"):
            values = getattr(self, name)
            if not all(isinstance(v, int) and 0 < v <= 64 for v in values):
                raise ValueError(f"invalid {name} {values!r}: must be integers in [1, 64]")
        for name in ("min_budget", "gumbel_temperature", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"invalid {name} {value!r}: must be a positive finite number")

        if not isinstance(self.classes, dict):
            raise ValueError(
                f"invalid classes {self.classes!r}: must map task names to class lists"
            )
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(
                f"invalid tasks {list(self.tasks)}: choose a non-empty subset of {list(TASKS)}"
            )
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} need 4 stages each"
            )
        if self.img_size % 32:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of 32 (patch 4, 3 merges)"
            )
        if self.policy_mode not in ("task_aware", "task_agnostic"):
            raise ValueError(
                f"invalid policy_mode {self.policy_mode!r}: use 'task_aware' or 'task_agnostic'"
            )
        if self.head_stride not in (4, 8):
            raise ValueError(f"invalid head_stride {self.head_stride}: use 4 or 8")
        if not 0.0 < self.min_budget < 1.0:
            raise ValueError(f"invalid min_budget {self.min_budget}: must be in (0, 1)")
        for task in ("human_parts", "semseg"):
            if task in self.tasks and len(self.classes.get(task, ())) < 2:
                raise ValueError(f"task {task!r} needs a class list of at least 2 names")
            if len(self.classes.get(task, ())) > MAX_CLASSES:
                raise ValueError(
                    f"task {task!r} has {len(self.classes[task])} classes, but at most "
                    f"{MAX_CLASSES} are supported because label maps are uint8: merge or drop "
                    "classes"
                )

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(4))

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    def num_outputs(self, task: str) -> int:
        """Return the channels of `task`'s output map."""
        if task == "saliency":
            return 1
        if task == "normals":
            return 3
        return len(self.classes[task])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["classes"] = {k: list(v) for k, v in self.classes.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown model configuration keys {unknown}; known keys: {sorted(known)}"
            )
        data = dict(data)
        for key in ("depths", "num_heads", "tasks"):
            if key in data:
                data[key] = tuple(data[key])
        if "classes" in data:
            data["classes"] = {k: tuple(v) for k, v in data["classes"].items()}
        return cls(**data)


_PASCAL_CLASSES = {"human_parts": HUMAN_PARTS_CLASSES, "semseg": PASCAL_SEMSEG_CLASSES}
_SCENE_CLASSES = {"human_parts": HUMAN_PARTS_CLASSES, "semseg": SCENE_SEMSEG_CLASSES}

_PRESETS: dict[str, dict[str, Any]] = {
    # Sized so that the whole recipe trains on 2 CPU cores in well under an hour.
    # 192 px with window 6 keeps every stage resolution (48, 24, 12, 6) a multiple of the window.
    "demo": dict(
        img_size=192, embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=6,
        classes=_SCENE_CLASSES, decoder_width=32, head_stride=8, policy_hidden=16, min_budget=0.35,
    ),
    # A few thousand parameters per layer; for unit tests only.
    "tiny": dict(
        img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
        classes=_SCENE_CLASSES, decoder_width=16, head_stride=8, policy_hidden=8, min_budget=0.3,
    ),
    # Swin-T, Swin-S and Swin-B of the Swin Transformer release, the backbones AdaMTL reports.
    "swin-t": dict(
        img_size=224, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
        classes=_PASCAL_CLASSES, decoder_width=64, head_stride=8, policy_hidden=32,
    ),
    "swin-s": dict(
        img_size=224, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7,
        classes=_PASCAL_CLASSES, decoder_width=64, head_stride=8, policy_hidden=32,
    ),
    "swin-b": dict(
        img_size=224, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
        window_size=7, classes=_PASCAL_CLASSES, decoder_width=64, head_stride=8, policy_hidden=32,
    ),
    "swin-b-384": dict(
        img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
        window_size=12, classes=_PASCAL_CLASSES, decoder_width=64, head_stride=8, policy_hidden=32,
    ),
}  # fmt: skip


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build the `ModelConfig` of preset `name`, with `overrides` replacing its fields."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; available presets: {preset_names()}")
    args = dict(_PRESETS[name], name=name)
    args.update(overrides)
    if "tasks" in overrides:
        args["tasks"] = tuple(overrides["tasks"])
    return ModelConfig(**args)
