"""Inference wrapper: images of any size in, task maps at the original size out.

`Predictor` owns the one preprocessing path of the project (resize to the model input,
normalise), device placement, eval mode and post-processing back to each image's size
(nearest for label maps, bilinear for saliency and normals). The service, the evaluation code
and the benchmarks all call it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model_core.checkpoint import load_checkpoint
from model_core.model import AdaMTL, InvalidRequestError, ModelOutput, TaskRequest
from model_core.presets import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["HeadOutputs", "InvalidRequestError", "Prediction", "Predictor"]

ImageInput = Image.Image | np.ndarray

# Order of the heads when `infer` hands each output over as it arrives. The normals map
# takes about as long to post-process as the three others together, so it goes first.
POSTPROCESS_FIRST = ("normals", "semseg", "human_parts", "saliency")


@dataclass
class Prediction:
    """Maps and execution statistics of one image.

    Attributes:
        maps: per requested task, at the image's size: "saliency" float32 (H, W) in [0, 1],
            "human_parts" and "semseg" uint8 (H, W) class indices, "normals" float32 (H, W, 3)
            unit vectors (x right, y up, z towards the camera).
        stats: flops, static_flops, flops_ratio, policy_flops, tokens_ratio,
            tokens_ratio_per_stage, blocks_executed, blocks_total, budget and tasks.
    """

    maps: dict[str, np.ndarray]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadOutputs:
    """The heads' outputs and execution statistics of one image, before post-processing.

    Attributes:
        outputs: per requested task, the (C, h, w) head output at the heads' resolution.
            `Predictor.postprocess` turns each into the map of `Prediction.maps`.
        stats: as `Prediction.stats`.
    """

    outputs: dict[str, torch.Tensor]
    stats: dict[str, Any] = field(default_factory=dict)


class Predictor:
    """Run an `AdaMTL` model on raw images.

    `run`, `predict`, `infer`, `postprocess` and `resize_output` run under
    `torch.inference_mode`, so the tensors they return are inference tensors. These cannot
    enter autograd or be changed in place outside inference mode (clone them first). For
    training, call the model itself.

    Args:
        model: the model; moved to `device` and put in eval mode.
        device: torch device.
        metadata: checkpoint metadata (name, version, provenance, metrics), if any.
    """

    def __init__(
        self, model: AdaMTL, device: str | torch.device = "cpu", metadata: dict | None = None
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata or {
            "name": f"adamtl-{model.config.name}",
            "version": "untrained",
            "config": model.config.to_dict(),
            "calibration": model.calibration,
            "provenance": {},
            "metrics": {},
        }
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Load checkpoint `path` (raises `CheckpointError` naming the problem)."""
        model, metadata = load_checkpoint(path, map_location=device)
        return cls(model, device=device, metadata=metadata)

    @property
    def config(self):
        return self.model.config

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.config.tasks

    @property
    def classes(self) -> dict[str, tuple[str, ...]]:
        return {
            t: self.model.config.classes[t] for t in ("human_parts", "semseg") if t in self.tasks
        }

    @property
    def budget_range(self) -> tuple[float, float]:
        return self.model.budget_range

    @property
    def input_size(self) -> int:
        return self.model.config.img_size

    def static_flops(self, tasks: Sequence[str] | None = None) -> float:
        """Return the multiply-accumulates of the static model for `tasks` (default: all)."""
        return self.model.static_flops(tasks)

    def validate(self, budget: float, tasks: Sequence[str] | None) -> None:
        """Raise `InvalidRequestError` unless `budget` and `tasks` can be served."""
        self.model.budget_tensor(budget, 1)
        self.model.task_mask(None if tasks is None else [list(tasks)], 1)

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Resize and normalise RGB images into a (B, 3, S, S) batch on the device."""
        size = self.input_size
        batch = []
        for image in images:
            array = _as_rgb_array(image)
            with warnings.catch_warnings():
                # A read-only array, such as np.asarray of a PIL image, makes torch warn that
                # writing to the tensor is undefined. Nothing writes to it: .float() copies.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                pixels = torch.from_numpy(array)
            tensor = pixels.to(self.device).permute(2, 0, 1)[None].float()
            batch.append(_resize_square(tensor, size))
        pixels = torch.cat(batch).div_(255.0)
        return (pixels - self._mean) / self._std

    @torch.inference_mode()
    def run(
        self,
        images: torch.Tensor,
        budgets: float | Sequence[float] | torch.Tensor = 1.0,
        tasks: TaskRequest = None,
        **kwargs: Any,
    ) -> ModelOutput:
        """Run the model on an already preprocessed (B, 3, S, S) batch, in eval mode."""
        if self.model.training:
            # eval() walks every submodule (nearly 300 in the demo model): only when needed.
            self.model.eval()
        return self.model(images.to(self.device), budgets, tasks, **kwargs)

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[ImageInput],
        budgets: float | Sequence[float] = 1.0,
        tasks: TaskRequest = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Prediction]:
        """Predict the requested maps for each image in one batched forward pass.

        Args:
            images: RGB PIL images or uint8 (H, W, 3) arrays of any sizes.
            budgets: one budget, or one per image.
            tasks: None (all), names for all images, or one list of names per image.
            sizes: (height, width) of each image's output maps; by default the image's own
                size. A caller that decoded an image at a reduced scale passes the full size.

        Raises:
            InvalidRequestError: for a budget out of range or an unknown task.
            ValueError: for `sizes` of the wrong length or with a side below 1.
        """
        if sizes is None:
            sizes = [_image_size(image) for image in images]
        _check_sizes(sizes, len(images))
        results = []
        for raw, (height, width) in zip(self.infer(images, budgets, tasks), sizes, strict=True):
            maps = {
                task: self.postprocess(task, output, height, width)
                for task, output in raw.outputs.items()
            }
            results.append(Prediction(maps=maps, stats=raw.stats))
        return results

    @torch.inference_mode()
    def infer(
        self,
        images: Sequence[ImageInput],
        budgets: float | Sequence[float] = 1.0,
        tasks: TaskRequest = None,
        on_output: Callable[[int, str, torch.Tensor], None] | None = None,
    ) -> list[HeadOutputs]:
        """Run the batched forward pass of `predict`, without the post-processing.

        A server can then post-process each image's outputs on other threads (see
        `postprocess`) while the next batch runs. The other arguments are those of `predict`.

        Args:
            on_output: called in this thread with (image index, task, (C, h, w) output) for
                each requested map as soon as its head has run, while the other heads still
                run. The same tensors are in the returned `HeadOutputs`. The heads then run
                in the order of `POSTPROCESS_FIRST`. The bundled service does not use it: on
                2 cores, maps started this way slowed the rest of the pass by more than
                they gained.
        """
        if len(images) == 0:
            return []
        pixels = self.preprocess(images)
        if on_output is None:
            output = self.run(pixels, budgets, tasks, full_resolution=False)
        else:
            requested = self.model.task_mask(tasks, len(images)).tolist()
            names = self.tasks

            def deliver(task: str, batch_output: torch.Tensor) -> None:
                column = names.index(task)
                for index, row in enumerate(requested):
                    if row[column]:
                        on_output(index, task, batch_output[index])

            output = self.run(
                pixels,
                budgets,
                tasks,
                full_resolution=False,
                head_order=POSTPROCESS_FIRST,
                on_output=deliver,
            )
        names = self.tasks
        results = []
        for index in range(len(images)):
            requested = [
                t
                for t, wanted in zip(names, output.task_mask[index].tolist(), strict=True)
                if wanted
            ]
            stats = output.stats.image(index)
            stats["tasks"] = requested
            outputs = {task: output.outputs[task][index] for task in requested}
            results.append(HeadOutputs(outputs=outputs, stats=stats))
        return results

    @torch.inference_mode()
    def postprocess(self, task: str, output: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Turn one (C, h, w) head output into the task's map of size (height, width).

        Returns a float32 (height, width) saliency probability, float32 (height, width, 3)
        unit normals, or a uint8 (height, width) label map: `resize_output` as numpy arrays.
        Safe to call from several threads at once.
        """
        resized = self.resize_output(task, output, height, width).cpu()
        if task in ("saliency", "normals"):
            # Float32 maps come back without a copy, which took 0.6 ms for 640x480 normals
            # (one core of the development machine). Other float types are converted.
            return resized.numpy().astype(np.float32, copy=False)
        return resized.numpy()

    @torch.inference_mode()
    def resize_output(
        self, task: str, output: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """Resize one (C, h, w) head output to the task's map of size (height, width), in torch.

        Saliency logits and normals are resized bilinearly, straight to the image's size, and
        give a (height, width) probability and contiguous (height, width, 3) unit normals.
        Class logits are resized bilinearly to the model's input size and the argmax is taken
        there. The labels then go to the image's size by nearest neighbour, a (height, width)
        uint8 map. A large image thus costs one label map at its size, not one logit map per
        class. Safe to call from several threads at once.
        """
        size = (height, width)
        if task == "saliency":
            return torch.sigmoid(bilinear_resize(output, size))[0]
        if task == "normals":
            normals = bilinear_resize(output, size, channels_last=True)  # (H, W, 3)
            squares = normals.square()
            # Three slices added took 1.1 ms against 1.3 ms for `squares.sum(-1)` on a 640x480
            # map (one core of the development machine).
            length = (squares[..., 0] + squares[..., 1] + squares[..., 2]).clamp_min_(1e-12)
            return normals.mul_(length.rsqrt_().unsqueeze(-1))
        side = self.input_size
        # Channels last, argmax reduces over each pixel's contiguous class scores. For 9
        # classes at 192x192 the resize and argmax took 0.67 ms, and argmax over the first
        # dimension of (C, H, W) scores alone 3.6 ms (one core of the development machine).
        logits = bilinear_resize(output, (side, side), channels_last=True)
        labels = logits.argmax(-1)[None, None].float()  # class indices, below MAX_CLASSES
        labels = F.interpolate(labels, size=size, mode="nearest")
        return labels[0, 0].to(torch.uint8)


def bilinear_resize(
    maps: torch.Tensor, size: tuple[int, int], channels_last: bool = False
) -> torch.Tensor:
    """Resize (C, h, w) maps to (C, H, W) as `F.interpolate(mode="bilinear",
    align_corners=False)` does, with two matrix products.

    Bilinear resizing is separable: each output row mixes two input rows, and each output
    column two input columns, with fixed weights. Written as (H, h) and (W, w) weight
    matrices, it is two small matrix products. For a (3, 24, 24) map resized to 480x640 on
    one core they took 0.56 ms against 7.2 ms for `F.interpolate` (medians of 50 calls on
    the development machine). The weights are computed in float64, and the sums run in
    another order, so values differ from `F.interpolate`'s by rounding only (up to about
    3e-6 of the largest value). Where a weight matrix would exceed `_MAX_WEIGHT_ENTRIES`
    entries, such as for a very long side, or for integer maps, it calls `F.interpolate`.

    With `channels_last`, the result is a contiguous (H, W, C) tensor with the same values.
    The second product then writes the channels of each pixel side by side, as an RGB image
    stores them, which saves a transposing copy of the result (about 1 ms for a 640x480
    normals map).
    """
    _, in_height, in_width = maps.shape
    too_large = max(size[0] * in_height, size[1] * in_width) > _MAX_WEIGHT_ENTRIES
    if too_large or not maps.is_floating_point():
        # A weight matrix would cost far more memory than the output, for example for an
        # upload of 1 x 4,000,000 pixels: F.interpolate needs only the output. Integer maps
        # would round the weights to 0 or 1.
        resized = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
        return resized.permute(1, 2, 0).contiguous() if channels_last else resized
    rows = _bilinear_weights(size[0], in_height, maps.dtype, maps.device)  # (H, h)
    columns = _bilinear_weights(size[1], in_width, maps.dtype, maps.device)  # (W, w)
    widened = torch.matmul(maps, columns.T)  # (C, h, W)
    if not channels_last:
        return torch.matmul(rows, widened)  # (C, H, W)
    interleaved = widened.permute(1, 2, 0).reshape(in_height, -1)  # (h, W * C)
    return torch.matmul(rows, interleaved).view(size[0], size[1], -1)  # (H, W, C)


# The largest weight matrix bilinear_resize builds, in entries: 1 MiB in float32, which covers
# a 24-pixel head output resized to 10,000 pixels on either side. The cache then keeps at most
# 32 MiB.
_MAX_WEIGHT_ENTRIES = 256 * 1024


@functools.lru_cache(maxsize=32)
def _bilinear_weights(
    out_size: int, in_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Return the (out_size, in_size) weights of bilinear resizing along one axis.

    The source position of output pixel i is (i + 0.5) * in_size / out_size - 0.5, clamped
    at 0, and its two neighbours get the linear weights: torch's rule without corner
    alignment.
    """
    # A normal tensor even when the first call comes from inference mode, so that the cached
    # weights also serve callers outside it.
    with torch.inference_mode(False):
        return _weights_matrix(out_size, in_size).to(dtype=dtype, device=device)


def _weights_matrix(out_size: int, in_size: int) -> torch.Tensor:
    scale = in_size / out_size
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    low = source.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    upper_weight = source - low
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1.0 - upper_weight, accumulate=True)
    weights.index_put_((rows, high), upper_weight, accumulate=True)
    return weights


def _resize_square(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (1, 3, H, W) float image to (1, 3, size, size), bilinear with antialiasing.

    When one side shrinks and the other grows, the shrinking side is resized first, in its
    own call. A single call first widened a 1 x 1,000,000 image to the target width, which
    took over 2 GB. Resized one side at a time, the intermediate stays small.
    """
    height, width = tensor.shape[-2:]
    if (height, width) == (size, size):
        return tensor
    if height > size > width:
        tensor = _bilinear(tensor, (size, width))
    elif width > size > height:
        tensor = _bilinear(tensor, (height, size))
    return _bilinear(tensor, (size, size))


def _bilinear(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)


def _check_sizes(sizes: Sequence[tuple[int, int]], count: int) -> None:
    if len(sizes) != count or any(min(size) < 1 for size in sizes):
        raise ValueError(
            f"sizes must hold one (height, width) of positive sides per image: got "
            f"{list(sizes)} for {count} images"
        )


def _image_size(image: ImageInput) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


def _as_rgb_array(image: ImageInput) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        described = (
            f"{image.dtype} {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"expected an RGB PIL image or a uint8 (H, W, 3) array, got {described}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels: shape {image.shape}")
    return np.ascontiguousarray(image)
