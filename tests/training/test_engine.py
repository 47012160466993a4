"""Tests of the training loop, progress reporting, evaluation and the non-finite check.

Everything runs on the tiny preset and a few procedural scenes rendered at 64 px.
"""

import json
import logging
import re

import pytest
import torch

from model_core.model import AdaMTL
from model_core.predictor import Predictor
from model_core.presets import get_preset
from training.datasets.common import collate_samples
from training.datasets.scenes import ScenesDataset, generate_split
from training.datasets.transforms import test_transform
from training.engine import (
    NonFiniteLossError,
    ProgressReporter,
    evaluate,
    git_commit,
    train_one_epoch,
)
from training.losses import MultiTaskLoss
from training.stages import eval_loader, static_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    generate_split(root, "train", count=16, size=64, seed=0)
    return ScenesDataset(root, "train", test_transform(64))


@pytest.fixture(scope="module")
def batches(scenes):
    samples = [scenes[i] for i in range(len(scenes))]
    return [collate_samples(samples[i : i + 4]) for i in range(0, len(samples), 4)]


def make_model(seed: int = 0) -> AdaMTL:
    torch.manual_seed(seed)
    return AdaMTL(get_preset("tiny"))


def test_train_one_epoch_lowers_loss(batches, tmp_path):
    model = make_model().train()
    criterion = MultiTaskLoss(model.config.tasks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    reporter = ProgressReporter("static", 6, len(batches), tmp_path / "metrics.jsonl")
    means = []
    for epoch in range(6):
        summary = train_one_epoch(
            model,
            batches,
            optimizer,
            None,
            static_loss(criterion),
            reporter,
            epoch,
            device=torch.device("cpu"),
        )
        reporter.log_epoch(summary)
        means.append(summary["loss"])
    assert means[-1] < 0.9 * means[0], means
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(6))
    assert {"loss", "saliency", "human_parts", "semseg", "normals", "images_per_second"} <= set(
        records[0]
    )


def test_progress_line_has_eta_and_throughput(batches, caplog):
    model = make_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    reporter = ProgressReporter("static", 2, len(batches), None, log_every=2)
    with caplog.at_level(logging.INFO, logger="training.engine"):
        train_one_epoch(
            model,
            batches,
            optimizer,
            None,
            static_loss(MultiTaskLoss(model.config.tasks)),
            reporter,
            0,
            device=torch.device("cpu"),
        )
    lines = [r.getMessage() for r in caplog.records if "step" in r.getMessage()]
    assert len(lines) == 2
    assert "static epoch 1/2 step 4/4" in lines[-1]
    assert re.search(r"ETA epoch \d+:\d\d, stage \d+:\d\d", lines[-1])
    assert re.search(r"[\d.]+ img/s", lines[-1])
    assert "semseg" in lines[-1]


def test_non_finite_loss_names_step_and_terms(batches):
    model = make_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    poisoned = [dict(batch) for batch in batches]
    image = poisoned[2]["image"].clone()
    image[0, 0, 0, 0] = float("nan")
    poisoned[2]["image"] = image
    reporter = ProgressReporter("static", 1, len(poisoned), None)
    steps_seen = []

    def after_step():
        steps_seen.append(len(steps_seen))

    with pytest.raises(NonFiniteLossError) as error:
        train_one_epoch(
            model,
            poisoned,
            optimizer,
            None,
            static_loss(MultiTaskLoss(model.config.tasks)),
            reporter,
            0,
            device=torch.device("cpu"),
            after_step=after_step,
        )
    message = str(error.value)
    assert "epoch 1, step 3" in message
    assert "loss=nan" in message
    for task in model.config.tasks:
        assert f"{task}=" in message
    assert steps_seen == [0, 1], "the poisoned batch must not be stepped"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluate_counts_every_image(scenes):
    model = make_model().eval()
    predictor = Predictor(model)
    loader = eval_loader(scenes, batch_size=5)
    dense = evaluate(predictor, loader, 1.0)
    assert len(dense.flops) == len(scenes)
    assert dense.ids == [scenes.images[i]["id"] for i in range(len(scenes))]
    assert all(ratio == pytest.approx(1.0) for ratio in dense.flops_ratio)
    assert all(isinstance(c, float) for c in dense.complexity)
    assert set(dense.metrics) == set(model.config.tasks)
    assert "maxF" in dense.metrics["saliency"]

    sparse = evaluate(predictor, loader, 1.0, random_keep=0.3, seed=1)
    assert sparse.mean_flops_ratio < 0.6
    again = evaluate(predictor, loader, 1.0, random_keep=0.3, seed=1)
    assert again.flops == sparse.flops


def test_git_commit_inside_and_outside_checkout(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit())
    assert git_commit(tmp_path) == "unknown"
