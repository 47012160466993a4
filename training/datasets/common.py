"""The sample contract shared by every dataset of the project.

A raw sample, as a loader reads it from disk, is a dict of numpy arrays in HWC layout:

    "image":       uint8 (H, W, 3), RGB
    "saliency":    float32 (H, W), 0 or 1, IGNORE_INDEX where unlabelled
    "human_parts": float32 (H, W), 0 (background) to 6, IGNORE_INDEX where unlabelled;
                   all IGNORE_INDEX for images without annotated people
    "semseg":      float32 (H, W), class index, IGNORE_INDEX where unlabelled
    "normals":     float32 (H, W, 3), unit vectors (channel 0 points right, 1 up, 2 towards
                   the camera), IGNORE_INDEX in all three channels where invalid
    "meta":        {"id": str, "size": (H, W), "has_people": bool, "complexity": float | None}

Only the tasks a dataset provides are present. Transforms (training.datasets.transforms) work
on raw samples; `to_tensor_sample` then turns one into the tensors the model and losses take:

    "image":       float32 (3, S, S), normalised with IMAGENET_MEAN and IMAGENET_STD
    "saliency":    float32 (1, S, S)
    "human_parts": int64 (S, S)
    "semseg":      int64 (S, S)
    "normals":     float32 (3, S, S)
    "meta":        unchanged
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model_core.presets import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, TASKS

__all__ = ["IGNORE_INDEX", "TASKS", "collate_samples", "normalize_image", "to_tensor_sample"]


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """Convert an RGB uint8 (H, W, 3) array to a normalised float32 (3, H, W) tensor."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def to_tensor_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Convert a raw numpy sample (HWC) to the tensor sample (CHW) documented above."""
    sample: dict[str, Any] = {"image": normalize_image(raw["image"]), "meta": raw["meta"]}
    if "saliency" in raw:
        sample["saliency"] = torch.from_numpy(np.ascontiguousarray(raw["saliency"], np.float32))[
            None
        ]
    for task in ("human_parts", "semseg"):
        if task in raw:
            sample[task] = torch.from_numpy(np.ascontiguousarray(raw[task])).round().long()
    if "normals" in raw:
        normals = np.ascontiguousarray(raw["normals"], np.float32)
        sample["normals"] = torch.from_numpy(normals).permute(2, 0, 1).contiguous()
    return sample


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensor samples into a batch; "meta" becomes a list of dicts."""
    batch: dict[str, Any] = {"meta": [s["meta"] for s in samples]}
    for key in samples[0]:
        if key != "meta":
            batch[key] = torch.stack([s[key] for s in samples])
    return batch
