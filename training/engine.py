"""Training and evaluation loops shared by the three stages of the recipe.

The pieces here know nothing about the stages: a stage hands `train_one_epoch` a loss
function that maps (model, batch) to a `StepResult`, and the loop does the optimisation,
the non-finite check, gradient clipping and progress reporting. `evaluate` runs a
`Predictor` over a loader and returns the split's metrics and the per-image FLOPs.

Distributed training uses `torch.distributed` as set up by `torchrun`: gloo on CPU, NCCL on
CUDA. Only rank 0 writes files and logs progress.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model_core.predictor import Predictor
from training.metrics import MultiTaskEvaluator

__all__ = [
    "DistributedContext",
    "EvaluationResult",
    "LossFunction",
    "NonFiniteLossError",
    "ProgressReporter",
    "StepResult",
    "evaluate",
    "git_commit",
    "setup_distributed",
    "train_one_epoch",
    "unwrap",
    "wrap_model",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite during training."""


@dataclass
class DistributedContext:
    """Process layout of a run; a single process has rank 0 and world size 1."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group that `torchrun` describes in the environment, if any.

    Args:
        device: "cpu", "cuda" or "auto" (CUDA when available). Under torchrun with CUDA,
            each process takes GPU LOCAL_RANK.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        resolved = torch.device("cuda", local_rank)
    else:
        resolved = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, device=resolved)


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Wrap `model` in DistributedDataParallel when the run has several processes.

    Call it again whenever the set of trainable parameters changes, because DDP registers
    the parameters that require gradients at construction. `find_unused_parameters` is on
    because images at budget 1 skip the policies and a task request skips the other heads.
    """
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a DistributedDataParallel wrapper (or `model` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def git_commit(directory: str | Path | None = None) -> str:
    """Return `git rev-parse HEAD` of `directory` (default: this file's checkout) or "unknown"."""
    directory = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressReporter:
    """Log training progress with an ETA and append per-epoch records to a JSON lines file.

    One instance serves a whole stage. Human-readable lines go to `logging` every
    `log_every` steps; `log_epoch` appends one JSON object per epoch to `metrics_path`.
    Every method is a no-op on ranks other than 0.

    Args:
        stage: stage name, written into every line and record.
        total_epochs: epochs of the stage, for the stage ETA.
        steps_per_epoch: optimisation steps per epoch.
        metrics_path: JSON lines file; None writes no file.
        log_every: steps between two progress lines.
        is_main: whether this process is rank 0.
    """

    def __init__(
        self,
        stage: str,
        total_epochs: int,
        steps_per_epoch: int,
        metrics_path: Path | None,
        log_every: int = 10,
        is_main: bool = True,
    ) -> None:
        self.stage = stage
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch
        self.metrics_path = metrics_path
        self.log_every = max(1, log_every)
        self.is_main = is_main
        self._epoch = 0
        self._epoch_start = time.perf_counter()
        self._images = 0

    def start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._epoch_start = time.perf_counter()
        self._images = 0

    def step(self, step: int, images: int, values: Mapping[str, float]) -> None:
        """Record step `step` (0-based) of the current epoch, which processed `images`."""
        self._images += images
        done = step + 1
        if not self.is_main or (done % self.log_every and done != self.steps_per_epoch):
            return
        elapsed = time.perf_counter() - self._epoch_start
        per_step = elapsed / done
        epoch_eta = per_step * (self.steps_per_epoch - done)
        remaining_epochs = self.total_epochs - self._epoch - 1
        stage_eta = epoch_eta + remaining_epochs * per_step * self.steps_per_epoch
        terms = " ".join(f"{name} {value:.4f}" for name, value in values.items())
        logger.info(
            "%s epoch %d/%d step %d/%d | %s | %.1f img/s | ETA epoch %s, stage %s",
            self.stage, self._epoch + 1, self.total_epochs, done, self.steps_per_epoch, terms,
            self._images / max(elapsed, 1e-9), _format_duration(epoch_eta),
            _format_duration(stage_eta),
        )  # fmt: skip

    def log_epoch(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Log and append the epoch's summary; return the record as written."""
        elapsed = time.perf_counter() - self._epoch_start
        full = {
            "stage": self.stage,
            "epoch": self._epoch,
            "seconds": round(elapsed, 3),
            "images_per_second": round(self._images / max(elapsed, 1e-9), 3),
            **record,
        }
        if self.is_main:
            logger.info("%s epoch %d done: %s", self.stage, self._epoch + 1, json.dumps(full))
            if self.metrics_path is not None:
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with self.metrics_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(full) + "\n")
        return full


@dataclass
class StepResult:
    """Output of a stage's loss function for one batch.

    Attributes:
        loss: scalar to minimise.
        terms: named scalar tensors checked for finiteness and reported (the total is added
            as "loss"), e.g. one per task and "efficiency".
        stats: extra numbers to report, e.g. "kept_tokens" (mean executed token ratio).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


LossFunction = Callable[[nn.Module, dict[str, Any]], StepResult]


def check_finite(result: StepResult, epoch: int, step: int, global_step: int) -> None:
    """Raise `NonFiniteLossError` naming the step and every term when a term is not finite."""
    terms = {"loss": result.loss, **result.terms}
    values = {name: float(value.detach()) for name, value in terms.items()}
    if all(math.isfinite(value) for value in values.values()):
        return
    listed = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch + 1}, step {step + 1} (global step {global_step}): "
        f"{listed}. Lower the learning rate or check the batch's inputs and targets."
    )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_function: LossFunction,
    reporter: ProgressReporter,
    epoch: int,
    *,
    device: torch.device,
    grad_clip: float | None = None,
    max_steps: int | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Run one epoch of optimisation and return the mean of every reported value.

    Args:
        model: the model to call (possibly DDP-wrapped); it must already be in the wanted
            train/eval mode.
        loader: yields collated batches (`training.datasets.common.collate_samples`).
        optimizer: steps once per batch.
        scheduler: steps once per batch, after the optimizer.
        loss_function: maps (model, batch on `device`) to a `StepResult`.
        reporter: progress reporter of the stage.
        epoch: 0-based epoch index, for messages and the global step.
        device: where batches go.
        grad_clip: clip the gradient norm of the trainable parameters to this value.
        max_steps: stop after this many batches.
        after_step: called after each optimizer step (e.g. to restore frozen slices).

    Raises:
        NonFiniteLossError: when the loss or a term is NaN or infinite; nothing is stepped.
    """
    sums: dict[str, float] = {}
    steps = 0
    parameters = [p for p in model.parameters() if p.requires_grad]
    reporter.start_epoch(epoch)
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        batch = _to_device(batch, device)
        result = loss_function(model, batch)
        check_finite(result, epoch, step, epoch * reporter.steps_per_epoch + step)

        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        if grad_clip is not None and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()

        values = {"loss": float(result.loss.detach())}
        values.update({name: float(term.detach()) for name, term in result.terms.items()})
        values.update(result.stats)
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        steps += 1
        values["lr"] = optimizer.param_groups[0]["lr"]
        reporter.step(step, batch["image"].shape[0], values)
    return {name: total / max(steps, 1) for name, total in sums.items()} | {"steps": steps}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


@dataclass
class EvaluationResult:
    """Metrics of one model configuration on a split, with per-image execution statistics.

    Attributes:
        metrics: {task: {metric: value}} from `MultiTaskEvaluator`.
        flops: per image, executed multiply-accumulates.
        flops_ratio: per image, executed over static multiply-accumulates.
        complexity: per image, the dataset's complexity score (None where it has none).
        ids: per image, the dataset id.
    """

    metrics: dict[str, dict[str, float]]
    flops: list[float]
    flops_ratio: list[float]
    complexity: list[float | None]
    ids: list[str]

    @property
    def mean_flops(self) -> float:
        return sum(self.flops) / max(len(self.flops), 1)

    @property
    def mean_flops_ratio(self) -> float:
        return sum(self.flops_ratio) / max(len(self.flops_ratio), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "mean_flops": self.mean_flops,
            "mean_flops_ratio": self.mean_flops_ratio,
            "flops": self.flops,
            "flops_ratio": self.flops_ratio,
            "complexity": self.complexity,
            "ids": self.ids,
        }


@torch.no_grad()
def evaluate(
    predictor: Predictor,
    loader: Iterable[dict[str, Any]],
    budget: float = 1.0,
    *,
    tasks: list[str] | None = None,
    random_keep: float | None = None,
    seed: int = 0,
) -> EvaluationResult:
    """Evaluate `predictor`'s model on every batch of `loader` at one budget.

    Args:
        predictor: wraps the model; its `run` is the one evaluation entry point.
        loader: yields collated batches with targets for every evaluated task.
        budget: requested budget for every image.
        tasks: tasks to run and score; all of the model's tasks when None.
        random_keep: replace the policy by random masks keeping this share (ablation).
        seed: seed of the random masks.
    """
    config = predictor.config
    tasks = list(tasks) if tasks is not None else list(config.tasks)
    evaluator = MultiTaskEvaluator(
        tasks, {t: len(config.classes[t]) for t in tasks if t in ("human_parts", "semseg")}
    )
    generator = torch.Generator().manual_seed(seed) if random_keep is not None else None
    flops, ratios, complexity, ids = [], [], [], []
    for batch in loader:
        output = predictor.run(
            batch["image"], budget, tasks, random_keep=random_keep, generator=generator
        )
        outputs = {task: value.cpu() for task, value in output.outputs.items()}
        evaluator.update(outputs, batch)
        flops.extend(float(v) for v in output.stats.flops)
        ratios.extend(float(v) for v in output.stats.flops_ratio)
        for meta in batch["meta"]:
            complexity.append(meta.get("complexity"))
            ids.append(str(meta.get("id")))
    return EvaluationResult(
        metrics=evaluator.compute(), flops=flops, flops_ratio=ratios, complexity=complexity, ids=ids
    )
