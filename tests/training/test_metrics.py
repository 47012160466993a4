"""Metrics against small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from model_core.presets import IGNORE_INDEX
from training.metrics import (
    MultiTaskEvaluator,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    angular_error,
    confusion_matrix,
    delta_m,
    iou_from_confusion,
    primary_metric,
)


def _one_hot_logits(prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits (B, C, H, W) whose argmax is `prediction` (B, H, W)."""
    return torch.nn.functional.one_hot(prediction, num_classes).permute(0, 3, 1, 2).float()


def _logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))


def test_confusion_matrix_counts() -> None:
    target = torch.tensor([[0, 1], [1, IGNORE_INDEX]])
    prediction = torch.tensor([[0, 1], [0, 2]])
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert torch.equal(confusion_matrix(prediction, target, 3), expected)


def test_iou_absent_class_counts_zero() -> None:
    confusion = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    # Class 0: TP 1, FP 1 -> 1/2. Class 1: TP 1, FN 1 -> 1/2. Class 2: absent -> 0.
    torch.testing.assert_close(
        iou_from_confusion(confusion), torch.tensor([0.5, 0.5, 0.0]).double()
    )


def test_confusion_matrix_rejects_bad_class() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)


def test_segmentation_meter_pools_over_images() -> None:
    meter = SegmentationMeter(2)
    # Image 1: 4 pixels of class 0, all right. Image 2: 1 pixel of class 1 predicted as 0.
    meter.update(
        _one_hot_logits(torch.zeros(1, 2, 2, dtype=torch.long), 2),
        torch.zeros(1, 2, 2, dtype=torch.long),
    )
    meter.update(_one_hot_logits(torch.tensor([[[0]]]), 2), torch.tensor([[[1]]]))
    # Pooled: class 0 TP 4, FP 1 -> 4/5; class 1 TP 0, FN 1 -> 0. mIoU 40 %.
    # (Averaging per-image mIoUs would give a different value.)
    assert meter.compute()["mIoU"] == pytest.approx(40.0)


def test_segmentation_meter_perfect_with_absent_classes() -> None:
    meter = SegmentationMeter(21)
    target = torch.tensor([[[0, 0, 15, 15], [0, 3, 3, IGNORE_INDEX]]])
    meter.update(_one_hot_logits(target.clamp(max=20), 21), target)
    assert meter.compute()["mIoU"] == pytest.approx(100.0 * 3 / 21)


def test_segmentation_meter_empty_is_nan() -> None:
    assert math.isnan(SegmentationMeter(7).compute()["mIoU"])


def _saliency_batch(probabilities: list[list[float]], targets: list[list[float]]):
    logits = torch.tensor([[_logit(p) for p in row] for row in probabilities])
    return logits.reshape(len(probabilities), 1, 1, -1), torch.tensor(targets).reshape(
        len(targets), 1, 1, -1
    )


def test_saliency_one_image() -> None:
    # Target (1, 1, 0, 0), probabilities (0.9, 0.42, 0.62, 0.02).
    # Pooled, beta^2 = 0.3: t <= 0.40 -> P 2/3, R 1, F 0.7222; 0.45-0.60 -> P = R = 0.5,
    # F 0.5; 0.65-0.90 -> P 1, R 0.5, F 1.3 * 0.5 / 0.8 = 0.8125; 0.95 -> nothing, F 0.
    # Per image: IoU 2/3, 1/3, 1/2; F (beta^2 = 1) 0.8, 0.5, 2/3.
    meter = SaliencyMeter()
    meter.update(*_saliency_batch([[0.9, 0.42, 0.62, 0.02]], [[1, 1, 0, 0]]))
    results = meter.compute()
    assert results["maxF"] == pytest.approx(81.25)
    assert results["mIoU"] == pytest.approx(100 * 2 / 3)
    assert results["maxF_image_mean"] == pytest.approx(80.0)


def test_saliency_empty_image_and_ignore() -> None:
    # The second image has an empty target and an empty prediction: IoU 1, P = R = 0.
    # Its ignored pixel would be a false positive if it counted.
    meter = SaliencyMeter()
    meter.update(
        *_saliency_batch(
            [[0.9, 0.42, 0.62, 0.02], [0.01, 0.01, 0.01, 0.99]],
            [[1, 1, 0, 0], [0, 0, 0, IGNORE_INDEX]],
        )
    )
    results = meter.compute()
    # Pooled counts are unchanged by the second image.
    assert results["maxF"] == pytest.approx(81.25)
    # Mean IoU at t <= 0.40: (2/3 + 1) / 2.
    assert results["mIoU"] == pytest.approx(100 * 5 / 6)
    # Image means at t <= 0.40: P 1/3, R 1/2 -> F 0.4; lower at the other thresholds.
    assert results["maxF_image_mean"] == pytest.approx(40.0)


def test_saliency_perfect_prediction() -> None:
    meter = SaliencyMeter()
    meter.update(*_saliency_batch([[0.999, 0.001, 0.999]], [[1, 0, 1]]))
    results = meter.compute()
    assert results["maxF"] == pytest.approx(100.0)
    assert results["mIoU"] == pytest.approx(100.0)
    assert results["maxF_image_mean"] == pytest.approx(100.0)


def test_angular_error_known_angles() -> None:
    target = torch.tensor([[0.0, 0.0, 1.0]] * 4)
    prediction = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    torch.testing.assert_close(
        angular_error(prediction, target), torch.tensor([0.0, 90.0, 45.0, 180.0]).double()
    )


def test_angular_error_small_angle_accuracy() -> None:
    angle = 1e-4  # radians; arccos of the float32 dot product would return 0 here
    prediction = torch.tensor([[math.sin(angle), 0.0, math.cos(angle)]])
    error = angular_error(prediction, torch.tensor([[0.0, 0.0, 1.0]]))
    assert float(error) == pytest.approx(math.degrees(angle), rel=1e-3)


def _normals_map(vectors: list[list[float]]) -> torch.Tensor:
    return torch.tensor(vectors).T.reshape(1, 3, 1, len(vectors))


def test_normals_meter_statistics() -> None:
    target = [[0.0, 0.0, 1.0]] * 6
    target[4] = [IGNORE_INDEX] * 3  # ignored
    target[5] = [0.0, 0.0, 0.0]  # no normal: invalid
    ten = math.radians(10.0)
    prediction = [
        [0.0, 0.0, 1.0],  # 0 degrees
        [0.0, 1.0, 0.0],  # 90 degrees
        [1.0, 0.0, 1.0],  # 45 degrees
        [math.sin(ten), 0.0, math.cos(ten)],  # 10 degrees
        [1.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
    ]
    meter = NormalsMeter()
    meter.update(_normals_map(prediction), _normals_map(target))
    results = meter.compute()
    assert results["mean"] == pytest.approx((0 + 90 + 45 + 10) / 4)
    assert results["median"] == pytest.approx((10 + 45) / 2, abs=0.01)
    assert results["rmse"] == pytest.approx(math.sqrt((0 + 8100 + 2025 + 100) / 4))
    assert results["within_11.25"] == pytest.approx(50.0)
    assert results["within_22.5"] == pytest.approx(50.0)
    assert results["within_30"] == pytest.approx(50.0)


def test_normals_meter_median_odd_count() -> None:
    meter = NormalsMeter()
    target = _normals_map([[0.0, 0.0, 1.0]] * 3)
    angles = [math.radians(a) for a in (5.0, 20.0, 70.0)]
    meter.update(_normals_map([[math.sin(a), 0.0, math.cos(a)] for a in angles]), target)
    results = meter.compute()
    assert results["median"] == pytest.approx(20.0, abs=0.01)
    assert results["within_22.5"] == pytest.approx(200 / 3)


def test_delta_m_hand_case() -> None:
    metrics = {"semseg": {"mIoU": 55.0}, "normals": {"mean": 20.0}}
    baseline = {"semseg": {"mIoU": 60.0}, "normals": {"mean": 18.0}}
    # ((55 - 60) / 60 - (20 - 18) / 18) / 2 * 100
    assert delta_m(metrics, baseline) == pytest.approx(-9.7222222, rel=1e-6)


def test_delta_m_adamtl_swin_t_static() -> None:
    # Swin-T static MTL against the four single-task models, AdaMTL paper table.
    metrics = {
        "saliency": {"maxF": 74.15},
        "human_parts": {"mIoU": 47.62},
        "semseg": {"mIoU": 59.08},
        "normals": {"mean": 19.20},
    }
    baseline = {
        "saliency": {"maxF": 71.93},
        "human_parts": {"mIoU": 48.63},
        "semseg": {"mIoU": 60.35},
        "normals": {"mean": 18.45},
    }
    expected = (
        (74.15 - 71.93) / 71.93
        + (47.62 - 48.63) / 48.63
        + (59.08 - 60.35) / 60.35
        - (19.20 - 18.45) / 18.45
    ) * 25
    assert delta_m(metrics, baseline) == pytest.approx(expected)
    assert delta_m(metrics, baseline) == pytest.approx(-1.29, abs=0.01)
    assert delta_m(baseline, baseline) == 0.0


def test_delta_m_missing_metric() -> None:
    with pytest.raises(KeyError, match="baseline"):
        delta_m({"semseg": {"mIoU": 50.0}}, {"normals": {"mean": 20.0}})


def test_primary_metric_mapping() -> None:
    assert primary_metric("semseg") == ("mIoU", True)
    assert primary_metric("human_parts") == ("mIoU", True)
    assert primary_metric("saliency") == ("maxF", True)
    assert primary_metric("normals") == ("mean", False)
    assert primary_metric("normals").higher_is_better is False
    with pytest.raises(KeyError, match="valid tasks"):
        primary_metric("depth")


def test_evaluator_parts_only_with_people() -> None:
    evaluator = MultiTaskEvaluator(["human_parts", "semseg"], {"human_parts": 7, "semseg": 21})
    parts_target = torch.tensor([[[0, 1], [2, 2]], [[3, 3], [3, 3]]])
    # Image 0 is predicted perfectly; image 1 is all wrong but has no people flag.
    parts_prediction = torch.tensor([[[0, 1], [2, 2]], [[0, 0], [0, 0]]])
    semseg_target = torch.tensor([[[0, 0], [15, 15]], [[0, 0], [0, 0]]])
    outputs = {
        "human_parts": _one_hot_logits(parts_prediction, 7),
        "semseg": _one_hot_logits(semseg_target, 21),
    }
    batch = {
        "human_parts": parts_target,
        "semseg": semseg_target,
        "meta": [{"has_people": True}, {"has_people": False}],
    }
    evaluator.update(outputs, batch)
    results = evaluator.compute()
    assert results["human_parts"]["mIoU"] == pytest.approx(100 * 3 / 7)
    assert results["semseg"]["mIoU"] == pytest.approx(100 * 2 / 21)


def test_evaluator_batch_without_people() -> None:
    evaluator = MultiTaskEvaluator(["human_parts"], {"human_parts": 7})
    target = torch.full((1, 2, 2), IGNORE_INDEX)
    outputs = {"human_parts": torch.zeros(1, 7, 2, 2)}
    evaluator.update(outputs, {"human_parts": target, "meta": [{"has_people": False}]})
    assert math.isnan(evaluator.compute()["human_parts"]["mIoU"])


def test_evaluator_all_tasks_perfect() -> None:
    evaluator = MultiTaskEvaluator(
        ["saliency", "human_parts", "semseg", "normals"], {"human_parts": 7, "semseg": 21}
    )

    normals = torch.nn.functional.normalize(
        torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    )
    saliency = torch.zeros(2, 1, 4, 4)
    saliency[:, :, :2] = 1.0
    parts = torch.randint(0, 7, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    semseg = torch.randint(0, 21, (2, 4, 4), generator=torch.Generator().manual_seed(2))

    # Perfect predictions: saliency logits of +-20, one-hot logits, scaled true normals.
    outputs = {
        "saliency": (saliency * 2 - 1) * 20,
        "human_parts": _one_hot_logits(parts, 7),
        "semseg": _one_hot_logits(semseg, 21),
        "normals": normals * 3,
    }
    batch = {
        "saliency": saliency,
        "human_parts": parts,
        "semseg": semseg,
        "normals": normals,
        "meta": [{"has_people": True}, {"has_people": True}],
    }
    evaluator.update(outputs, batch)

    results = evaluator.compute()
    assert results["saliency"]["maxF"] == pytest.approx(100.0)
    assert results["semseg"]["mIoU"] == pytest.approx(100 * len(semseg.unique()) / 21)
    assert results["human_parts"]["mIoU"] == pytest.approx(100 * len(parts.unique()) / 7)
    assert results["normals"]["mean"] == pytest.approx(0.0, abs=1e-3)
    assert results["normals"]["within_11.25"] == pytest.approx(100.0)


def test_evaluator_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="invalid tasks"):
        MultiTaskEvaluator(["depth"], {})
    with pytest.raises(ValueError, match="num_classes"):
        MultiTaskEvaluator(["semseg"], {})
    evaluator = MultiTaskEvaluator(["semseg"], {"semseg": 21})
    with pytest.raises(ValueError, match="does not match"):
        evaluator.update({"semseg": torch.zeros(1, 21, 2, 2)}, {"semseg": torch.zeros(1, 4, 4)})
