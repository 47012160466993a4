"""Task losses, MultiTaskLoss and the efficiency loss against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from model_core.presets import IGNORE_INDEX
from training.losses import (
    DEFAULT_TASK_WEIGHTS,
    MultiTaskLoss,
    balanced_bce_loss,
    class_balance_weights,
    cross_entropy_loss,
    distillation_loss,
    efficiency_loss,
    normals_l1_loss,
)

LN2 = math.log(2.0)


def _close(value: torch.Tensor, expected: float) -> None:
    assert value.shape == ()
    assert value.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_cross_entropy_ignores_pixels() -> None:
    # Pixels: logits (0, 0) target 0 -> ln 2; (ln 3, 0) target 1 -> ln 4; (5, 0) ignored.
    logits = torch.tensor([[[[0.0, math.log(3.0), 5.0]], [[0.0, 0.0, 0.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 1, IGNORE_INDEX]]])
    _close(cross_entropy_loss(logits, target), (LN2 + 2 * LN2) / 2)


def test_cross_entropy_class_weights_weighted_mean() -> None:
    # Same pixels as above with class weights (1, 3): (1 * ln 2 + 3 * ln 4) / (1 + 3).
    logits = torch.tensor([[[[0.0, math.log(3.0), 5.0]], [[0.0, 0.0, 0.0]]]])
    target = torch.tensor([[[0, 1, IGNORE_INDEX]]])
    loss = cross_entropy_loss(logits, target, torch.tensor([1.0, 3.0]))
    _close(loss, (LN2 + 3 * 2 * LN2) / 4)
    all_ignored = torch.full((1, 1, 3), IGNORE_INDEX)
    assert cross_entropy_loss(logits, all_ignored, torch.tensor([1.0, 3.0])).item() == 0.0


def test_class_balance_weights_inverse_sqrt_frequency() -> None:
    # Frequencies 0.64, 0.16, 0.16, 0.04 and one absent class: raw weights 1/0.8, 1/0.4,
    # 1/0.4, 1/0.2; sum(frequency * raw) = 0.8 + 0.4 + 0.4 + 0.2 = 1.8.
    weights = class_balance_weights(torch.tensor([64, 16, 16, 4, 0]))
    expected = [1.25 / 1.8, 2.5 / 1.8, 2.5 / 1.8, 5 / 1.8, 5 / 1.8]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    frequency = torch.tensor([0.64, 0.16, 0.16, 0.04, 0.0])
    assert float((frequency * weights).sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive total"):
        class_balance_weights(torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        class_balance_weights(torch.tensor([3.0, -1.0]))


def test_cross_entropy_all_ignored_is_zero() -> None:
    logits = torch.randn(2, 7, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE_INDEX)
    loss = cross_entropy_loss(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_balanced_bce_zero_logits() -> None:
    # Three valid pixels (one positive, two negative) and one ignored; every BCE is ln 2.
    # w = 2/3: (2/3 * ln 2 + 1/3 * 2 ln 2) / 3 = 4/9 ln 2.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, IGNORE_INDEX]]]])
    _close(balanced_bce_loss(logits, target), 4.0 / 9.0 * LN2)


def test_balanced_bce_weights_classes() -> None:
    # Positive with logit 2: BCE = ln(1 + e^-2); negatives with logit 1: BCE = ln(1 + e).
    # One positive and three negatives: w = 3/4.
    logits = torch.tensor([[[[2.0, 1.0, 1.0, 1.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    positive = math.log1p(math.exp(-2.0))
    negative = math.log1p(math.e)
    expected = (0.75 * positive + 0.25 * 3 * negative) / 4
    _close(balanced_bce_loss(logits, target), expected)


def test_balanced_bce_all_ignored_is_zero() -> None:
    logits = torch.randn(1, 1, 3, 3, requires_grad=True)
    loss = balanced_bce_loss(logits, torch.full((1, 1, 3, 3), float(IGNORE_INDEX)))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_normals_l1_per_element_mean() -> None:
    # Pixel 0: (2, 0, 0) -> (1, 0, 0) against (0, 1, 0): |1| + |1| + 0 = 2.
    # Pixel 1: ignored. Pixel 2: (0, 0, 3) -> (0, 0, 1) against (0, 0, 1): 0.
    # Two valid pixels, six elements: 2 / 6.
    prediction = torch.tensor([[2.0, 0.0, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 3.0]])
    target = torch.tensor([[0.0, 1.0, 0.0], [IGNORE_INDEX] * 3, [0.0, 0.0, 1.0]])
    prediction = prediction.T.reshape(1, 3, 1, 3)
    target = target.T.reshape(1, 3, 1, 3)
    _close(normals_l1_loss(prediction, target), 2.0 / 6.0)


def test_normals_l1_zero_prediction_is_finite() -> None:
    prediction = torch.zeros(1, 3, 2, 2, requires_grad=True)
    target = torch.zeros(1, 3, 2, 2)
    target[:, 2] = 1.0
    loss = normals_l1_loss(prediction, target)
    loss.backward()
    _close(loss, 1.0 / 3.0)
    assert torch.isfinite(prediction.grad).all()


def test_normals_l1_all_ignored_is_zero() -> None:
    prediction = torch.randn(2, 3, 2, 2)
    _close(normals_l1_loss(prediction, torch.full((2, 3, 2, 2), float(IGNORE_INDEX))), 0.0)


def _batch_and_outputs(size: int = 4) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "saliency": torch.randn(2, 1, size, size, generator=generator),
        "human_parts": torch.randn(2, 7, size, size, generator=generator),
        "semseg": torch.randn(2, 21, size, size, generator=generator),
        "normals": torch.randn(2, 3, size, size, generator=generator),
    }
    normals = torch.nn.functional.normalize(torch.randn(2, 3, size, size, generator=generator))
    batch = {
        "saliency": (torch.rand(2, 1, size, size, generator=generator) > 0.5).float(),
        "human_parts": torch.full((2, size, size), IGNORE_INDEX),  # no people in the batch
        "semseg": torch.randint(0, 21, (2, size, size), generator=generator),
        "normals": normals,
    }
    return outputs, batch


def test_multitask_loss_weighted_sum() -> None:
    outputs, batch = _batch_and_outputs()
    batch["human_parts"][0, 0, :2] = torch.tensor([1, 3])
    total, losses = MultiTaskLoss(list(DEFAULT_TASK_WEIGHTS))(outputs, batch)
    expected = {
        "saliency": balanced_bce_loss(outputs["saliency"], batch["saliency"]),
        "human_parts": cross_entropy_loss(outputs["human_parts"], batch["human_parts"]),
        "semseg": cross_entropy_loss(outputs["semseg"], batch["semseg"]),
        "normals": normals_l1_loss(outputs["normals"], batch["normals"]),
    }
    for task, value in expected.items():
        assert float(losses[task]) == pytest.approx(float(value))
    weighted = 5 * expected["saliency"] + 2 * expected["human_parts"]
    weighted = weighted + expected["semseg"] + 10 * expected["normals"]
    assert total.item() == pytest.approx(float(weighted))


def test_multitask_loss_batch_without_people() -> None:
    outputs, batch = _batch_and_outputs()
    for value in outputs.values():
        value.requires_grad_(True)
    total, losses = MultiTaskLoss(["human_parts", "semseg"])(outputs, batch)
    total.backward()
    assert losses["human_parts"].item() == 0.0
    assert total.item() == pytest.approx(losses["semseg"].item())
    assert torch.isfinite(outputs["human_parts"].grad).all()
    assert float(outputs["human_parts"].grad.abs().sum()) == 0.0


def test_multitask_loss_custom_weights() -> None:
    outputs, batch = _batch_and_outputs()
    total, losses = MultiTaskLoss(["semseg", "normals"], {"semseg": 0.5, "normals": 2.0})(
        outputs, batch
    )
    assert total.item() == pytest.approx(
        0.5 * losses["semseg"].item() + 2 * losses["normals"].item()
    )
    assert set(losses) == {"semseg", "normals"}


def test_multitask_loss_class_weights() -> None:
    outputs, batch = _batch_and_outputs()
    weights = torch.linspace(0.5, 2.5, 21)
    total, losses = MultiTaskLoss(["semseg"], class_weights={"semseg": weights})(outputs, batch)
    expected = cross_entropy_loss(outputs["semseg"], batch["semseg"], weights)
    assert losses["semseg"].item() == pytest.approx(expected.item())
    unweighted = cross_entropy_loss(outputs["semseg"], batch["semseg"])
    assert losses["semseg"].item() != pytest.approx(unweighted.item())
    with pytest.raises(ValueError, match="21 classes but 7 class weights"):
        MultiTaskLoss(["semseg"], class_weights={"semseg": torch.ones(7)})(outputs, batch)
    with pytest.raises(ValueError, match="only human_parts and semseg take"):
        MultiTaskLoss(["normals"], class_weights={"normals": torch.ones(3)})


def test_multitask_loss_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="invalid tasks"):
        MultiTaskLoss(["depth"])
    with pytest.raises(ValueError, match="no loss weight"):
        MultiTaskLoss(["semseg", "normals"], {"semseg": 1.0})
    outputs, batch = _batch_and_outputs()
    outputs["semseg"] = outputs["semseg"][..., :2, :2]
    with pytest.raises(ValueError, match="does not match"):
        MultiTaskLoss(["semseg"])(outputs, batch)


# Efficiency loss. Widths (96, 96, 192, 384) give block weights (1, 1, 2, 4).
WIDTHS = (96, 96, 192, 384)


def test_efficiency_loss_known_masks() -> None:
    block_keep = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    token_ratio = torch.tensor([[0.5, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    loss, parts = efficiency_loss(block_keep, token_ratio, WIDTHS, 0.5, 0.5)
    # Blocks: executed fractions 0.5 and 1.0 against 0.5 -> (0 + 0.25) / 2.
    _close(parts["blocks"], 0.125)
    # Tokens: w * (r - t) = (0, 0, 1, 2) and (0.5, 0.5, 1, 2); squares sum 5 and 5.5 over 8.
    _close(parts["tokens"], 10.5 / 8)
    _close(loss, 0.125 + 10.5 / 8)


def test_efficiency_loss_on_target_is_zero() -> None:
    block_keep = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    token_ratio = torch.full((1, 4), 0.6)
    loss, parts = efficiency_loss(block_keep, token_ratio, WIDTHS, 0.5, 0.6)
    _close(loss, 0.0)
    _close(parts["blocks"], 0.0)


def test_efficiency_loss_per_sample_targets() -> None:
    block_keep = torch.ones(2, 4)
    token_ratio = torch.ones(2, 4)
    loss, parts = efficiency_loss(
        block_keep, token_ratio, WIDTHS, torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5])
    )
    _close(parts["blocks"], (0.0 + 0.25) / 2)
    # Second sample: w * 0.5 = (0.5, 0.5, 1, 2), squares sum 5.5, over 8 entries.
    _close(parts["tokens"], 5.5 / 8)


def test_efficiency_loss_batch_mean() -> None:
    block_keep = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    token_ratio = torch.tensor([[0.5, 0.5, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    loss, parts = efficiency_loss(block_keep, token_ratio, WIDTHS, 0.75, 0.5, batch_mean=True)
    # Blocks: the batch executes 6 of 8 blocks, exactly the target.
    _close(parts["blocks"], 0.0)
    # Tokens: batch means (0.75, 0.75, 0.5, 0.5) against 0.5, weighted (1, 1, 2, 4).
    _close(parts["tokens"], (0.25**2 + 0.25**2 + 0.0 + 0.0) / 4)
    _close(loss, 0.125 / 4)


def test_efficiency_loss_batch_mean_allows_spread() -> None:
    # One image above and one below the target: no penalty when the batch meets it.
    block_keep = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    token_ratio = torch.tensor([[0.8, 0.8, 0.8, 0.8], [0.2, 0.2, 0.2, 0.2]])
    loss, _ = efficiency_loss(block_keep, token_ratio, WIDTHS, 0.5, 0.5, batch_mean=True)
    per_image, _ = efficiency_loss(block_keep, token_ratio, WIDTHS, 0.5, 0.5)
    _close(loss, 0.0)
    assert float(per_image) > 0.1


def test_efficiency_loss_gradient() -> None:
    block_keep = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    token_ratio = torch.tensor([[0.5, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    loss, _ = efficiency_loss(block_keep, token_ratio, WIDTHS, 0.5, 0.5)
    loss.backward()
    # d/dkeep[b, k] = 2 (mean_b - t) / B / K: 0 for sample 0, 2 * 0.5 / 2 / 4 for sample 1.
    expected_keep = torch.tensor([[0.0] * 4, [0.125] * 4])
    torch.testing.assert_close(block_keep.grad, expected_keep)
    # d/dratio[b, k] = 2 w_k^2 (r - t) / (B K): sample 1, block 3: 2 * 16 * 0.5 / 8 = 2.
    assert float(token_ratio.grad[1, 3]) == pytest.approx(2.0)
    assert float(token_ratio.grad[0, 0]) == pytest.approx(0.0)


def test_efficiency_loss_block_groups() -> None:
    # Two stages of two blocks. The batch runs 3 of 4 blocks of stage 0 and 1 of 4 of stage 1.
    block_keep = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    token_ratio = torch.ones(2, 4)
    targets = torch.tensor([[1.0, 1.0, 0.5, 0.5]]).expand(2, 4)
    loss, parts = efficiency_loss(
        block_keep, token_ratio, (1, 1, 1, 1), targets, 1.0, True, block_groups=(0, 0, 1, 1)
    )
    # Gaps: 0.75 - 1 and 0.25 - 0.5, squared and averaged over the two groups.
    _close(parts["blocks"], (0.25**2 + 0.25**2) / 2)
    _close(parts["tokens"], 0.0)
    # Within a group the blocks may trade: running the other block of stage 1 costs nothing.
    swapped = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    same, _ = efficiency_loss(swapped, token_ratio, (1, 1, 1, 1), targets, 1.0, True, (0, 0, 1, 1))
    _close(same, float(loss))
    # Without groups the batch's 4 of 8 blocks are compared with the mean target 0.75.
    _, one_group = efficiency_loss(block_keep, token_ratio, (1, 1, 1, 1), targets, 1.0, True)
    _close(one_group["blocks"], 0.25**2)


def test_efficiency_loss_block_groups_per_image() -> None:
    block_keep = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0, 0.5, 0.5]]).expand(2, 4)
    _, parts = efficiency_loss(
        block_keep, torch.ones(2, 4), (1, 1, 1, 1), targets, 1.0, block_groups=(0, 0, 1, 1)
    )
    # Image 0: gaps 0 and 0; image 1: gaps -0.5 and -0.5; squares averaged over 4 entries.
    _close(parts["blocks"], (0.25 + 0.25) / 4)


def test_efficiency_loss_per_block_token_targets() -> None:
    block_keep = torch.ones(1, 4)
    token_ratio = torch.tensor([[0.4, 0.4, 1.0, 1.0]])
    targets = torch.tensor([[0.4, 0.4, 1.0, 1.0]])
    loss, _ = efficiency_loss(block_keep, token_ratio, (1, 1, 1, 1), 1.0, targets)
    _close(loss, 0.0)
    # Equal weights: each block's gap counts the same, whatever its stage's width.
    _, parts = efficiency_loss(block_keep, torch.ones(1, 4), (1, 1, 1, 1), 1.0, targets)
    _close(parts["tokens"], (0.6**2 + 0.6**2) / 4)


def test_efficiency_loss_invalid_arguments() -> None:
    keep = torch.ones(2, 4)
    with pytest.raises(ValueError, match="one positive weight per block"):
        efficiency_loss(keep, keep, (96, 192), 0.5, 0.5)
    with pytest.raises(ValueError, match="must both be"):
        efficiency_loss(keep, torch.ones(2, 3), WIDTHS, 0.5, 0.5)
    with pytest.raises(ValueError, match="out of range"):
        efficiency_loss(keep, keep, WIDTHS, 1.5, 0.5)
    with pytest.raises(ValueError, match="token_target"):
        efficiency_loss(keep, keep, WIDTHS, 0.5, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="block_target"):
        efficiency_loss(keep, keep, WIDTHS, torch.full((2, 3), 0.5), 0.5)
    with pytest.raises(ValueError, match="block_groups"):
        efficiency_loss(keep, keep, WIDTHS, 0.5, 0.5, block_groups=(0, 0, 2, 2))
    with pytest.raises(ValueError, match="block_groups"):
        efficiency_loss(keep, keep, WIDTHS, 0.5, 0.5, block_groups=(0, 1))


# Distillation towards the static model's maps.


def _teacher_maps(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "saliency": torch.randn(2, 1, 5, 5, generator=generator),
        "human_parts": torch.randn(2, 7, 5, 5, generator=generator),
        "semseg": torch.randn(2, 4, 5, 5, generator=generator),
        "normals": torch.randn(2, 3, 5, 5, generator=generator),
    }


def test_distillation_zero_when_maps_agree() -> None:
    teacher = _teacher_maps(0)
    total, terms = distillation_loss(teacher, teacher, list(teacher))
    assert sorted(terms) == sorted(teacher)
    for task, value in terms.items():
        assert abs(value.item()) < 1e-6, task
    assert abs(total.item()) < 1e-5


def test_distillation_weighs_tasks_and_trains_only_the_student() -> None:
    teacher = {k: v.requires_grad_() for k, v in _teacher_maps(0).items()}
    student = {k: v.requires_grad_() for k, v in _teacher_maps(1).items()}
    total, terms = distillation_loss(student, teacher, list(teacher))
    for task, value in terms.items():
        assert value.item() > 0.01, task
    expected = sum(DEFAULT_TASK_WEIGHTS[t] * terms[t].item() for t in terms)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    for task in teacher:
        assert teacher[task].grad is None, task
        assert student[task].grad.abs().sum() > 0, task

    # The label-map term is the KL divergence: equal to cross-entropy minus entropy.
    p = torch.softmax(teacher["semseg"].detach(), dim=1)
    log_q = torch.log_softmax(student["semseg"].detach(), dim=1)
    kl = (p * (p.log() - log_q)).sum(dim=1).mean()
    _close(terms["semseg"].detach(), kl.item())


def test_distillation_shape_mismatch() -> None:
    teacher = _teacher_maps(0)
    student = dict(teacher, semseg=teacher["semseg"][..., :3, :3])
    with pytest.raises(ValueError, match="same input size"):
        distillation_loss(student, teacher, ["semseg"])
