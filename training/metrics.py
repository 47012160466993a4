"""Evaluation metrics of PASCAL-Context multi-task dense prediction.

All metrics are accumulated over a whole split and computed once at the end, as the
multi-task literature does (MTI-Net's Multi-Task-Learning-PyTorch evaluators, which AdaMTL
reuses, and ATRC's saliency metric):

* semseg, human_parts: mIoU in percent from a confusion matrix over every valid pixel of the
  split. The mean runs over all classes, so a class absent from both the ground truth and the
  prediction has IoU 0 and lowers the mean, as in the reference evaluators. Human parts count
  only images whose meta["has_people"] is True.
* saliency: "maxF" in percent, the maximum over thresholds 0.05, 0.10, ..., 0.95 of the
  F-measure with beta^2 = 0.3, with true positives, predicted positives and actual positives
  pooled over every valid pixel of the split, as ATRC computes it. A pixel is positive
  where sigmoid(logit) >= threshold. "mIoU" in percent is the MTI-Net variant: for
  each threshold in 0.20, 0.25, ..., 0.90 (positive where the probability > threshold) the IoU
  of every image is averaged over images, and the best threshold is kept. An image whose
  ground truth and prediction are both empty has IoU 1. "maxF_image_mean" is the MTI-Net
  F-measure that the AdaMTL reference code reports under the key maxF: beta^2 = 1, from
  image-averaged precision and recall on the same 15 thresholds. Compare with the saliency
  maxF figures of the AdaMTL paper through this key, not through "maxF".
* normals: angular error in degrees between the L2-normalised prediction and target, pooled
  over every valid pixel of the split: "mean", "median", "rmse", and the percentage of pixels
  within 11.25, 22.5 and 30 degrees.

The reference evaluators threshold stored uint8 PNGs, so their probabilities are quantised
to multiples of 1/255. Here the unquantised probabilities are used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from model_core.presets import IGNORE_INDEX, TASKS

# Thresholds of the pooled beta^2 = 0.3 F-measure (ATRC): 0.05 to 0.95.
SALIENCY_F_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
# Thresholds of the per-image IoU and F-measure of the MTI-Net code: 0.20 to 0.90.
SALIENCY_IMAGE_THRESHOLDS: tuple[float, ...] = tuple(round(0.2 + 0.05 * i, 2) for i in range(15))
SALIENCY_BETA_SQUARED = 0.3

NORMALS_ANGLE_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
# Width in degrees of the histogram bins from which the median angular error is read.
NORMALS_MEDIAN_BIN = 0.01

__all__ = [
    "MultiTaskEvaluator",
    "NormalsMeter",
    "PrimaryMetric",
    "SaliencyMeter",
    "SegmentationMeter",
    "angular_error",
    "confusion_matrix",
    "delta_m",
    "iou_from_confusion",
    "primary_metric",
]


class PrimaryMetric(NamedTuple):
    """The metric of a task that model selection and delta_m use."""

    name: str
    higher_is_better: bool


_PRIMARY_METRICS: dict[str, PrimaryMetric] = {
    "semseg": PrimaryMetric("mIoU", True),
    "human_parts": PrimaryMetric("mIoU", True),
    "saliency": PrimaryMetric("maxF", True),
    "normals": PrimaryMetric("mean", False),
}


def primary_metric(task: str) -> PrimaryMetric:
    """Return the primary metric of `task` (semseg and human_parts mIoU, saliency maxF,
    normals mean error)."""
    if task not in _PRIMARY_METRICS:
        raise KeyError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")
    return _PRIMARY_METRICS[task]


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str] | None = None,
) -> float:
    """Mean relative change in percent of each task's primary metric against a baseline.

    delta_m = 100 / T * sum_t s_t * (M_t - B_t) / B_t, with s_t = +1 where higher is better
    and -1 where lower is better (normals mean error), so a positive value is an improvement.

    Args:
        metrics: Results of the evaluated model, {task: {metric: value}}.
        baseline: Results of the reference, usually the single-task models, same layout.
        tasks: Tasks to average over; all tasks of `metrics` where None.
    """
    tasks = list(metrics) if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("delta_m needs at least one task")
    total = 0.0
    for task in tasks:
        name, higher_is_better = primary_metric(task)
        if task not in metrics or name not in metrics[task]:
            raise KeyError(f"metric {task}/{name} missing from the evaluated results")
        if task not in baseline or name not in baseline[task]:
            raise KeyError(f"metric {task}/{name} missing from the baseline")
        reference = float(baseline[task][name])
        if reference == 0.0:
            raise ValueError(f"baseline {task}/{name} is 0, so the relative change is undefined")
        change = (float(metrics[task][name]) - reference) / reference
        total += change if higher_is_better else -change
    return 100.0 * total / len(tasks)


# Segmentation.


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Count (target, prediction) pairs over pixels whose target is not IGNORE_INDEX.

    Args:
        prediction: Integer class map of any shape.
        target: Same shape, class indices or IGNORE_INDEX.

    Returns:
        int64 (num_classes, num_classes); rows are ground truth, columns prediction.
    """
    valid = target != IGNORE_INDEX
    target = target[valid].long()
    prediction = prediction[valid].long()
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target classes span {int(target.min())}..{int(target.max())}, outside "
            f"0..{num_classes - 1} and not IGNORE_INDEX"
        )
    index = target * num_classes + prediction
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: Tensor) -> Tensor:
    """Compute the IoU per class, TP / max(TP + FP + FN, 1e-8), which is 0 for a class absent
    from both maps."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    return true_positive / union.clamp(min=1e-8)


class SegmentationMeter:
    """Dataset-level mIoU of a classification map, from an accumulated confusion matrix."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"invalid num_classes {num_classes}: need at least 2")
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: logits (B, C, H, W), target (B, H, W) with IGNORE_INDEX."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, expected {self.num_classes}")
        prediction = logits.argmax(dim=1)
        self.confusion += confusion_matrix(prediction.cpu(), target.cpu(), self.num_classes)

    def compute(self) -> dict[str, float]:
        """Return {"mIoU": percent}, NaN if no valid pixel was seen."""
        if int(self.confusion.sum()) == 0:
            return {"mIoU": math.nan}
        return {"mIoU": 100.0 * float(iou_from_confusion(self.confusion).mean())}


# Saliency.


class SaliencyMeter:
    """Saliency maxF (beta^2 = 0.3, pooled), mIoU and maxF_image_mean (MTI-Net, per image).

    See the module docstring for the exact definitions.
    """

    def __init__(self) -> None:
        self.f_thresholds = torch.tensor(SALIENCY_F_THRESHOLDS, dtype=torch.float64)
        self.image_thresholds = torch.tensor(SALIENCY_IMAGE_THRESHOLDS, dtype=torch.float64)
        # Pooled counts per threshold of f_thresholds.
        self.true_positive = torch.zeros(len(SALIENCY_F_THRESHOLDS), dtype=torch.float64)
        self.predicted_positive = torch.zeros_like(self.true_positive)
        self.actual_positive = torch.zeros((), dtype=torch.float64)
        # Sums over images of the per-image IoU, precision and recall per image_threshold.
        self.iou_sum = torch.zeros(len(SALIENCY_IMAGE_THRESHOLDS), dtype=torch.float64)
        self.precision_sum = torch.zeros_like(self.iou_sum)
        self.recall_sum = torch.zeros_like(self.iou_sum)
        self.num_images = 0

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: logits (B, 1, H, W), target (B, 1, H, W) in {0, 1, IGNORE_INDEX}."""
        probability = torch.sigmoid(logits.detach().double().cpu()).flatten(1)  # (B, H*W)
        target = target.cpu().flatten(1)
        valid = target != IGNORE_INDEX
        actual = (target >= 0.5) & valid

        # Pooled statistics, thresholds on the first axis: (T, B, H*W).
        predicted = (probability[None] >= self.f_thresholds[:, None, None]) & valid[None]
        self.true_positive += (predicted & actual[None]).sum(dim=(1, 2)).double()
        self.predicted_positive += predicted.sum(dim=(1, 2)).double()
        self.actual_positive += actual.sum().double()

        # Per-image statistics: (T, B).
        predicted = (probability[None] > self.image_thresholds[:, None, None]) & valid[None]
        true_positive = (predicted & actual[None]).sum(dim=2).double()
        false_positive = (predicted & ~actual[None]).sum(dim=2).double()
        false_negative = (~predicted & actual[None] & valid[None]).sum(dim=2).double()
        union = true_positive + false_positive + false_negative
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), 1.0)
        precision = true_positive / (true_positive + false_positive + 1e-12)
        recall = true_positive / (true_positive + false_negative + 1e-12)
        # Images without a single valid pixel are left out.
        has_pixels = valid.any(dim=1)  # (B,)
        self.iou_sum += (iou * has_pixels).sum(dim=1)
        self.precision_sum += (precision * has_pixels).sum(dim=1)
        self.recall_sum += (recall * has_pixels).sum(dim=1)
        self.num_images += int(has_pixels.sum())

    def compute(self) -> dict[str, float]:
        """Return {"maxF", "mIoU", "maxF_image_mean"} in percent, NaN if nothing was seen."""
        if self.num_images == 0:
            return {"maxF": math.nan, "mIoU": math.nan, "maxF_image_mean": math.nan}
        precision = self.true_positive / self.predicted_positive.clamp(min=1e-12)
        recall = self.true_positive / self.actual_positive.clamp(min=1e-12)
        beta2 = SALIENCY_BETA_SQUARED
        f_measure = (1 + beta2) * precision * recall / (beta2 * precision + recall)
        f_measure = torch.nan_to_num(f_measure, nan=0.0)

        mean_iou = self.iou_sum / self.num_images
        mean_precision = self.precision_sum / self.num_images
        mean_recall = self.recall_sum / self.num_images
        f_image = 2 * mean_precision * mean_recall / (mean_precision + mean_recall + 1e-12)
        return {
            "maxF": 100.0 * float(f_measure.max()),
            "mIoU": 100.0 * float(mean_iou.max()),
            "maxF_image_mean": 100.0 * float(f_image.max()),
        }


# Surface normals.


def angular_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Angle in degrees between the directions of two (N, 3) vector sets.

    Both are L2-normalised (a zero vector stays zero). The angle is computed as
    2 * atan2(|p - g|, |p + g|), which equals arccos(p . g) but stays accurate near 0 and 180.
    """
    prediction = F.normalize(prediction.double(), dim=1, eps=1e-12)
    target = F.normalize(target.double(), dim=1, eps=1e-12)
    difference = (prediction - target).norm(dim=1)
    total = (prediction + target).norm(dim=1)
    return torch.rad2deg(2.0 * torch.atan2(difference, total))


class NormalsMeter:
    """Angular error statistics of predicted normals over every valid pixel.

    The median is read from a histogram with bins of NORMALS_MEDIAN_BIN degrees, so it is exact
    to within half that width, and memory stays constant over a split.
    """

    def __init__(self) -> None:
        self.num_bins = int(round(180.0 / NORMALS_MEDIAN_BIN))
        self.histogram = torch.zeros(self.num_bins, dtype=torch.int64)
        self.count = 0
        self.error_sum = 0.0
        self.squared_error_sum = 0.0
        self.within = torch.zeros(len(NORMALS_ANGLE_THRESHOLDS), dtype=torch.int64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add a batch: prediction and target (B, 3, H, W); target IGNORE_INDEX where invalid.

        A target pixel is valid iff none of its channels is IGNORE_INDEX and it is not zero.
        """
        prediction = prediction.detach().cpu().permute(0, 2, 3, 1).reshape(-1, 3)
        target = target.cpu().permute(0, 2, 3, 1).reshape(-1, 3)
        valid = (target != IGNORE_INDEX).all(dim=1) & (target != 0).any(dim=1)
        errors = angular_error(prediction[valid], target[valid])
        if errors.numel() == 0:
            return
        self.count += errors.numel()
        self.error_sum += float(errors.sum())
        self.squared_error_sum += float((errors**2).sum())
        for i, threshold in enumerate(NORMALS_ANGLE_THRESHOLDS):
            self.within[i] += int((errors < threshold).sum())
        bins = (errors / NORMALS_MEDIAN_BIN).long().clamp(max=self.num_bins - 1)
        self.histogram += torch.bincount(bins, minlength=self.num_bins)

    def compute(self) -> dict[str, float]:
        """Return mean, median and rmse in degrees and the within_* shares in percent."""
        if self.count == 0:
            keys = ["mean", "median", "rmse"] + [f"within_{t:g}" for t in NORMALS_ANGLE_THRESHOLDS]
            return dict.fromkeys(keys, math.nan)
        results = {
            "mean": self.error_sum / self.count,
            "median": self._median(),
            "rmse": math.sqrt(self.squared_error_sum / self.count),
        }
        for i, threshold in enumerate(NORMALS_ANGLE_THRESHOLDS):
            results[f"within_{threshold:g}"] = 100.0 * int(self.within[i]) / self.count
        return results

    def _median(self) -> float:
        """Read the median of the pooled errors from the histogram.

        Each order statistic is taken as the centre of its bin. An even count averages the two
        middle ones, as numpy.median does.
        """
        cumulative = torch.cumsum(self.histogram, dim=0)
        lower_rank, upper_rank = (self.count + 1) // 2, self.count // 2 + 1
        values = []
        for rank in (lower_rank, upper_rank):
            index = int(torch.searchsorted(cumulative, torch.tensor(rank)))
            values.append((index + 0.5) * NORMALS_MEDIAN_BIN)
        return sum(values) / 2.0


# All tasks.


class MultiTaskEvaluator:
    """Accumulate the metrics of every task over a split.

    Args:
        tasks: Task names, a subset of TASKS.
        num_classes: Number of classes of each classification task among `tasks`
            ("semseg", "human_parts").
    """

    def __init__(self, tasks: Sequence[str], num_classes: Mapping[str, int]) -> None:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(
                f"invalid tasks {list(tasks)}: choose a non-empty subset of {list(TASKS)}"
            )
        self.tasks = tuple(tasks)
        self.meters: dict[str, Any] = {}
        for task in self.tasks:
            if task in ("semseg", "human_parts"):
                if task not in num_classes:
                    raise ValueError(f"num_classes has no entry for {task!r}: {dict(num_classes)}")
                self.meters[task] = SegmentationMeter(int(num_classes[task]))
            elif task == "saliency":
                self.meters[task] = SaliencyMeter()
            else:
                self.meters[task] = NormalsMeter()

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> None:
        """Add a batch of model outputs (at the input resolution) and collated targets.

        Human parts use only the images whose batch["meta"][i]["has_people"] is True.
        """
        for task in self.tasks:
            output, target = outputs[task].detach(), batch[task]
            if output.shape[0] != target.shape[0] or output.shape[-2:] != target.shape[-2:]:
                raise ValueError(
                    f"{task} output {tuple(output.shape)} does not match target "
                    f"{tuple(target.shape)}"
                )
            if task == "human_parts":
                keep = torch.tensor([bool(m["has_people"]) for m in batch["meta"]])
                if not bool(keep.any()):
                    continue
                output, target = output[keep.to(output.device)], target[keep.to(target.device)]
            self.meters[task].update(output, target)

    def compute(self) -> dict[str, dict[str, float]]:
        """Return {task: {metric: value}}; a task without any valid pixel gives NaN values."""
        return {task: self.meters[task].compute() for task in self.tasks}
