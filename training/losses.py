"""Task losses, their weighted sum, and the AdaMTL efficiency loss.

Task losses and weights follow the MTI-Net code for PASCAL-Context (Vandenhende et al.,
Multi-Task-Learning-PyTorch), which AdaMTL trains with: semseg 1, human parts 2, saliency 5,
normals 10. Model outputs are a dict task -> tensor at the input resolution S:

    "saliency":    logits (B, 1, S, S)
    "human_parts": logits (B, 7, S, S)
    "semseg":      logits (B, C, S, S)
    "normals":     (B, 3, S, S), unit vectors (normalised here again)

Targets are the collated tensor samples of `training.datasets.common`. Every task loss
averages over its valid (not IGNORE_INDEX) pixels and is 0, with a gradient of zeros, when a
batch has none, as for human parts in a batch without people.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_core.heads import unit_vectors
from model_core.presets import IGNORE_INDEX, TASKS

# Loss weight per task in the MTI-Net PASCAL-Context configuration.
DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "saliency": 5.0,
    "human_parts": 2.0,
    "semseg": 1.0,
    "normals": 10.0,
}

__all__ = [
    "DEFAULT_TASK_WEIGHTS",
    "MultiTaskLoss",
    "balanced_bce_loss",
    "class_balance_weights",
    "cross_entropy_loss",
    "distillation_loss",
    "efficiency_loss",
    "normals_l1_loss",
]


def _check_spatial(task: str, output: Tensor, target: Tensor) -> None:
    if output.shape[0] != target.shape[0] or output.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{task} output {tuple(output.shape)} does not match target {tuple(target.shape)}: "
            "outputs must be at the input resolution"
        )


def cross_entropy_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy averaged over pixels whose target is not IGNORE_INDEX.

    Args:
        logits: (B, C, H, W).
        target: (B, H, W) int64 class indices or IGNORE_INDEX.
        weight: optional (C,) weight per class. The loss is then the weighted mean: the sum of
            weight[target] * loss over valid pixels divided by the sum of weight[target].

    Returns:
        Scalar; 0 if every pixel is ignored.
    """
    total = F.cross_entropy(
        logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    valid = target != IGNORE_INDEX
    if weight is None:
        return total / valid.sum().clamp(min=1)
    denominator = weight[target[valid]].sum()
    return total / denominator.clamp(min=torch.finfo(denominator.dtype).tiny)


def class_balance_weights(pixel_counts: Tensor) -> Tensor:
    """Class weights proportional to 1 / sqrt(frequency), for imbalanced label maps.

    The weights are scaled so that the mean weight over the counted pixels is 1, which keeps
    the loss on the scale of the unweighted one. A class with no pixel gets the largest
    weight of the others. The square root softens plain inverse frequency, which would give a
    class covering 0.3 % of the pixels about 300 times the weight of the background.

    Args:
        pixel_counts: (C,) number of labelled pixels per class; at least one must be positive.

    Returns:
        (C,) float32 weights.
    """
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    if counts.ndim != 1 or bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise ValueError(
            f"pixel counts {counts.tolist()} must be one non-negative count per class with a "
            "positive total; count labels over images that contain them"
        )
    frequency = counts / counts.sum()
    present = frequency > 0
    weights = torch.zeros_like(frequency)
    weights[present] = frequency[present].rsqrt()
    weights = weights / (frequency * weights).sum()
    weights[~present] = weights[present].max()
    return weights.float()


def balanced_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Class-balanced binary cross-entropy of the MTI-Net saliency loss.

    With w = (negative pixels) / (valid pixels) over the whole batch, positive pixels weigh w
    and negative pixels 1 - w, and the weighted sum is divided by the number of valid pixels.
    Without ignored pixels this equals the reference, which divides by all pixels.

    Args:
        logits: (B, 1, H, W).
        target: (B, 1, H, W) float; >= 0.5 is salient, IGNORE_INDEX is ignored.

    Returns:
        Scalar; 0 if every pixel is ignored.
    """
    valid = target != IGNORE_INDEX
    positive = (target >= 0.5) & valid
    num_valid = valid.sum()
    num_negative = num_valid - positive.sum()
    pos_weight = num_negative.float() / num_valid.clamp(min=1).float()

    per_pixel = F.binary_cross_entropy_with_logits(
        logits, positive.to(logits.dtype), reduction="none"
    )
    weights = torch.where(positive, pos_weight, 1.0 - pos_weight) * valid
    return (weights * per_pixel).sum() / num_valid.clamp(min=1)


def normals_l1_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """L1 distance between L2-normalised predicted normals and the target normals.

    Normalisation of the mean: the sum of absolute differences over valid pixels is divided by
    the number of valid elements, three per valid pixel, as in the MTI-Net code that AdaMTL
    uses. ATRC and InvPT divide by valid pixels instead, which gives three times this value.
    A pixel is valid iff none of its target channels is IGNORE_INDEX.

    Args:
        prediction: (B, 3, H, W), any length; normalised here with a floor of 1e-12.
        target: (B, 3, H, W) unit vectors or IGNORE_INDEX.

    Returns:
        Scalar; 0 if every pixel is ignored.
    """
    prediction = unit_vectors(prediction, eps=1e-12)
    valid = (target != IGNORE_INDEX).all(dim=1, keepdim=True)  # (B, 1, H, W)
    # Ignored targets are 255, so mask before subtracting to keep every term finite.
    difference = (prediction - torch.where(valid, target, 0.0)).abs() * valid
    num_elements = valid.sum() * prediction.shape[1]
    return difference.sum() / num_elements.clamp(min=1)


_TASK_LOSSES = {
    "saliency": balanced_bce_loss,
    "human_parts": cross_entropy_loss,
    "semseg": cross_entropy_loss,
    "normals": normals_l1_loss,
}


class MultiTaskLoss(nn.Module):
    """Weighted sum of the task losses.

    Args:
        tasks: Task names, a subset of TASKS.
        weights: Weight per task, DEFAULT_TASK_WEIGHTS where None. A dict must have a weight
            for every task in `tasks`.
        class_weights: Optional (C,) class weights for the cross-entropy of "human_parts"
            and "semseg" (see `class_balance_weights`); tasks without an entry are unweighted.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        weights: Mapping[str, float] | None = None,
        class_weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(
                f"invalid tasks {list(tasks)}: choose a non-empty subset of {list(TASKS)}"
            )
        weights = DEFAULT_TASK_WEIGHTS if weights is None else dict(weights)
        missing = [t for t in tasks if t not in weights]
        if missing:
            raise ValueError(f"no loss weight for tasks {missing}; weights given: {dict(weights)}")
        self.tasks = tuple(tasks)
        self.weights = {t: float(weights[t]) for t in self.tasks}
        class_weights = dict(class_weights or {})
        not_labels = [t for t in class_weights if _TASK_LOSSES.get(t) is not cross_entropy_loss]
        if not_labels:
            raise ValueError(
                f"invalid class weights for {not_labels}: only human_parts and semseg take "
                "class weights, so remove the others"
            )
        self.class_weights = {
            t: torch.as_tensor(w, dtype=torch.float32)
            for t, w in class_weights.items()
            if t in self.tasks
        }

    def forward(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the weighted total and the unweighted loss of each task.

        Args:
            outputs: Model outputs per task (see the module docstring).
            batch: Collated tensor samples with one target per task.

        Returns:
            (total, losses): total = sum of weights[t] * losses[t], a scalar with gradient;
            losses maps each task to its unweighted scalar loss.
        """
        losses: dict[str, Tensor] = {}
        for task in self.tasks:
            if task not in outputs or task not in batch:
                raise KeyError(
                    f"task {task!r} missing from the model outputs {sorted(outputs)} "
                    f"or the batch {sorted(batch)}"
                )
            # Under bfloat16 autocast the heads' outputs are bfloat16, but the losses are
            # computed in float32.
            output, target = outputs[task].float(), batch[task]
            _check_spatial(task, output, target)
            class_weight = self.class_weights.get(task)
            if class_weight is None:
                losses[task] = _TASK_LOSSES[task](output, target)
                continue
            if class_weight.shape != (output.shape[1],):
                raise ValueError(
                    f"{task} has {output.shape[1]} classes but {class_weight.numel()} class "
                    "weights; compute the weights from this dataset's labels"
                )
            class_weight = class_weight.to(device=output.device, dtype=output.dtype)
            losses[task] = cross_entropy_loss(output, target, class_weight)
        total = sum(self.weights[t] * losses[t] for t in self.tasks)
        return total, losses

    def extra_repr(self) -> str:
        weighted = sorted(self.class_weights)
        return f"weights={self.weights}, class_weights={weighted}"


def distillation_loss(
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor],
    tasks: Sequence[str],
    weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Measure how far the adaptive model's maps are from a teacher's, summed with task weights.

    The teacher is the static model. Its maps are targets and get no gradient. Saliency: the
    Bernoulli KL divergence from the teacher's probability to the student's. Human parts and
    semseg: the KL divergence between the class distributions. Normals: the mean absolute
    difference between the normalised vectors. Every term is a mean over all pixels and is 0
    when the maps agree. Pixels without a label count too, on purpose: the teacher gives a
    target everywhere, and the adaptive model should reproduce the static model's maps where
    no label exists as well (for example human parts in images without people).

    Args:
        student: model outputs per task (see the module docstring).
        teacher: outputs of the same shapes.
        tasks: the tasks to compare, a subset of both dicts' keys.
        weights: weight per task, DEFAULT_TASK_WEIGHTS where None.

    Returns:
        (total, terms): the weighted sum and each task's unweighted term.
    """
    weights = DEFAULT_TASK_WEIGHTS if weights is None else weights
    terms: dict[str, Tensor] = {}
    for task in tasks:
        output, target = student[task].float(), teacher[task].detach().float()
        if output.shape != target.shape:
            raise ValueError(
                f"{task}: student map {tuple(output.shape)} and teacher map "
                f"{tuple(target.shape)} differ; run both at the same input size"
            )
        if task == "saliency":
            probability = torch.sigmoid(target)
            terms[task] = F.binary_cross_entropy_with_logits(
                output, probability
            ) - F.binary_cross_entropy_with_logits(target, probability)
        elif task == "normals":
            terms[task] = (
                (unit_vectors(output, eps=1e-12) - unit_vectors(target, eps=1e-12)).abs().mean()
            )
        else:
            divergence = F.kl_div(
                F.log_softmax(output, dim=1),
                F.log_softmax(target, dim=1),
                reduction="none",
                log_target=True,
            )
            terms[task] = divergence.sum(dim=1).mean()
    total = sum(weights[t] * terms[t] for t in tasks)
    return total, terms


def efficiency_loss(
    block_keep: Tensor,
    token_ratio: Tensor,
    token_weights: Sequence[float] | Tensor,
    block_target: float | Tensor,
    token_target: float | Tensor,
    batch_mean: bool = False,
    block_groups: Sequence[int] | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """AdaMTL's compute-budget loss, L_eff = L_blocks + L_tokens.

    L_blocks is the squared difference between the fraction of executed blocks and its
    target, averaged over the batch. With `block_groups`, the fraction and the target are
    taken per group of blocks (a stage, say), and the squares are averaged over the groups.
    L_tokens is the squared difference between w_k * token_ratio[:, k] and w_k * token_target,
    averaged over blocks and the batch, with w_k = token_weights[k] / min(token_weights).
    The AdaMTL paper weighs each block by its stage's embedding width, so that the fewer but
    wider tokens of deep stages, which cost more, count more. Dividing by the smallest width
    (the first stage's) keeps w_k at 1, 2, 4 and 8 for Swin, so the loss stays of order 1
    whatever the embedding width.

    Args:
        block_keep: (B, K) execution mask in [0, 1], 1 = block executed; straight-through
            values during training, so gradients reach the block policy.
        token_ratio: (B, K) fraction of tokens each block kept. The caller decides what a
            skipped block reports (0 counts its tokens as saved).
        token_weights: (K,) positive weight of each block's token gap, such as its stage's
            embedding width.
        block_target: Target probability of running each block in [0, 1]: a float, (B,), or
            (B, K) for a target per block. A 1-D target is always read as one value per
            image, so per-block targets must be expanded to (B, K) first.
        token_target: Target fraction of kept tokens in [0, 1]: a float, (B,), or (B, K).
        batch_mean: compare the batch means of the ratios with the mean targets instead of
            each image's ratios with its targets. Images may then spend more or less than the
            target, by content, as long as the batch meets it on average.
        block_groups: (K,) group index of each block, numbered from 0; None puts all blocks
            in one group.

    Returns:
        (loss, {"blocks": L_blocks, "tokens": L_tokens}), all scalars.
    """
    if block_keep.ndim != 2 or token_ratio.shape != block_keep.shape:
        raise ValueError(
            f"block_keep {tuple(block_keep.shape)} and token_ratio {tuple(token_ratio.shape)} "
            "must both be (batch, blocks)"
        )
    batch_size, num_blocks = block_keep.shape
    weights = torch.as_tensor(token_weights, dtype=block_keep.dtype, device=block_keep.device)
    if weights.shape != (num_blocks,) or bool((weights <= 0).any()):
        raise ValueError(
            f"token_weights {weights.tolist()} must contain one positive weight per block "
            f"({num_blocks} blocks)"
        )
    block_target = _per_sample_target(block_target, "block_target", block_keep)
    token_target = _per_sample_target(token_target, "token_target", block_keep)
    groups = _group_means(block_groups, num_blocks, block_keep)  # (K, G)

    weights = (weights / weights.min()).unsqueeze(0)  # (1, K)
    kept_blocks, target_blocks = block_keep @ groups, block_target @ groups  # (B, G)
    if batch_mean:
        blocks = (kept_blocks.mean(dim=0) - target_blocks.mean(dim=0)).square().mean()
        token_gap = weights[0] * (token_ratio.mean(dim=0) - token_target.mean(dim=0))  # (K,)
        tokens = token_gap.square().mean()
        return blocks + tokens, {"blocks": blocks, "tokens": tokens}

    blocks = F.mse_loss(kept_blocks, target_blocks)
    tokens = F.mse_loss(weights * token_ratio, weights * token_target)
    return blocks + tokens, {"blocks": blocks, "tokens": tokens}


def _group_means(groups: Sequence[int] | Tensor | None, num_blocks: int, like: Tensor) -> Tensor:
    """Return the (K, G) matrix that averages the blocks of each group."""
    if groups is None:
        return torch.full((num_blocks, 1), 1.0 / num_blocks, dtype=like.dtype, device=like.device)
    index = torch.as_tensor(groups, device=like.device)
    count = int(index.max()) + 1 if index.numel() else 0
    if (
        index.shape != (num_blocks,)
        or index.is_floating_point()
        or bool((index < 0).any())
        or set(index.tolist()) != set(range(count))
    ):
        raise ValueError(
            f"block_groups {index.tolist()} must give each of the {num_blocks} blocks a group "
            "index, with groups numbered 0, 1, ... and none empty"
        )
    one_hot = F.one_hot(index, count).to(like.dtype)  # (K, G)
    return one_hot / one_hot.sum(dim=0, keepdim=True)


def _per_sample_target(value: float | Tensor, name: str, like: Tensor) -> Tensor:
    """Broadcast a float, (B,) or (B, K) target to the (B, K) shape of `like` and check that
    it is in [0, 1]."""
    batch_size, num_blocks = like.shape
    target = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if target.ndim == 1 and target.shape == (batch_size,):
        target = target.unsqueeze(1)
    if target.ndim > 0 and target.shape not in ((batch_size, 1), (batch_size, num_blocks)):
        raise ValueError(
            f"{name} must be a float, a ({batch_size},) or a ({batch_size}, {num_blocks}) "
            f"tensor, got {tuple(torch.as_tensor(value).shape)}"
        )
    target = target.expand(batch_size, num_blocks)
    if bool(((target < 0) | (target > 1)).any()):
        raise ValueError(f"{name} {target.tolist()} out of range: targets must be in [0, 1]")
    return target
