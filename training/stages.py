"""The three stages of the AdaMTL recipe, sharing one skeleton.

1. `static`: the multi-task model at budget 1 (policies bypassed), loss = weighted sum of the
   task losses; encoder and heads train.
2. `policy_init`: encoder and heads frozen (batch norm in eval mode), only the policies train,
   with loss = sum over blocks of (1 - mean block mask) + sum over blocks of (1 - mean token
   mask), at budgets drawn below 1 so that the policy path runs. The adaptive model then
   starts out executing everything, like the static one.
3. `cotrain`: Alternating Task Training first. Epoch i trains task tasks[i mod T] alone,
   which updates its head, its policy sub-network, the shared encoder and the shared policy
   layers. End-to-end fine-tuning of everything follows. Both use task loss + alpha *
   efficiency loss at a budget drawn per batch. The budget table is calibrated on held-out
   training images at the end.

Each stage writes into RUN/STAGE: `state.pt` (weights, optimizer, scheduler, epoch, RNG
state; rewritten after every epoch and read back to resume), `metrics.jsonl` (one record per
epoch), `config.json` (the resolved configuration), `train.log` and, when done,
`model.safetensors`, the input of the next stage. All randomness of an epoch (shuffling,
augmentation, budgets, Gumbel noise) is drawn from generators seeded with (seed, epoch,
rank), so a resumed run repeats the epochs an uninterrupted run would have run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from model_core.calibration import all_task_subsets, calibrate, default_budget_grid
from model_core.checkpoint import load_checkpoint, save_checkpoint
from model_core.encoder import load_backbone_weights
from model_core.model import AdaMTL
from model_core.policy import BUDGET_SPLITS, budget_targets
from model_core.predictor import Predictor
from model_core.presets import IGNORE_INDEX, ModelConfig, get_preset
from training.datasets.common import collate_samples
from training.datasets.transforms import test_transform, train_transform
from training.engine import (
    DistributedContext,
    LossFunction,
    ProgressReporter,
    StepResult,
    evaluate,
    git_commit,
    train_one_epoch,
    unwrap,
    wrap_model,
)
from training.losses import (
    MultiTaskLoss,
    class_balance_weights,
    distillation_loss,
    efficiency_loss,
)

__all__ = [
    "FIXED_SETTINGS",
    "STAGES",
    "EpochPlan",
    "StageData",
    "build_data",
    "build_model",
    "prepare_epoch",
    "run_stage",
]

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("static", "policy_init", "cotrain")

# The AdaMTL paper's fixed budget settings as (block target, token target): H keeps 90 % of
# the blocks and 60 % of the tokens, L keeps 50 % of each.
FIXED_SETTINGS: dict[str, tuple[float, float]] = {"H": (0.9, 0.6), "L": (0.5, 0.5)}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class StageData:
    """Datasets of a run.

    Attributes:
        train: training images (augmented), without the calibration slice.
        calibration: the last `calibration_images` images of the train split, not augmented,
            never trained on and never used for evaluation.
        val: the evaluation split, not augmented.
        name: dataset description for provenance.
    """

    train: Dataset
    calibration: Dataset
    val: Dataset
    name: str


def _open_split(args: argparse.Namespace, split: str, transform: Any, tasks: Sequence[str]):
    if args.dataset == "scenes":
        from training.datasets.scenes import ScenesDataset

        return ScenesDataset(args.data, split, transform)
    from training.datasets.pascal import PascalContextMT

    return PascalContextMT(args.data, split, tasks, transform)


def build_data(args: argparse.Namespace, config: ModelConfig) -> StageData:
    """Open the train split (minus the calibration slice), the calibration slice and val."""
    size = config.img_size
    # The transform's generator is replaced at the start of every epoch (see `_epoch_loader`).
    train_full = _open_split(args, "train", train_transform(size, args.seed), config.tasks)
    plain_train = _open_split(args, "train", test_transform(size), config.tasks)
    val = _open_split(args, "val", test_transform(size), config.tasks)
    count = len(train_full)
    held_out = args.calibration_images
    if held_out >= count:
        raise ValueError(
            f"--calibration-images {held_out} leaves no training image out of {count}; "
            "lower it or generate more training images"
        )
    train = Subset(train_full, range(count - held_out))
    calibration = Subset(plain_train, range(count - held_out, count))
    return StageData(
        train=train, calibration=calibration, val=val, name=f"{args.dataset}:{args.data}"
    )


def label_class_weights(
    dataset: Dataset, config: ModelConfig, max_images: int = 256
) -> dict[str, torch.Tensor]:
    """Class-balanced weights for each label-map task, from the pixel counts of `dataset`.

    Counts the labels of up to `max_images` samples spread evenly over the dataset, after
    its transform (for the training split, the seeded augmentation), and turns the counts
    into weights with `class_balance_weights`. Tasks whose labels never occur in those
    samples stay unweighted.
    """
    tasks = [t for t in ("human_parts", "semseg") if t in config.tasks]
    counts = {t: torch.zeros(len(config.classes[t]), dtype=torch.float64) for t in tasks}
    step = max(1, len(dataset) // max_images)
    for index in range(0, len(dataset), step)[:max_images]:
        sample = dataset[index]
        for task in tasks:
            labels = sample[task].reshape(-1)
            labels = labels[labels != IGNORE_INDEX]
            if labels.numel() and int(labels.max()) >= len(counts[task]):
                raise ValueError(
                    f"{task} label {int(labels.max())} in training image {index} is outside "
                    f"the {len(counts[task])} classes of preset {config.name!r}"
                )
            counts[task] += torch.bincount(labels, minlength=len(counts[task])).double()
    return {t: class_balance_weights(c) for t, c in counts.items() if c.sum() > 0}


def _epoch_loader(
    dataset: Subset, args: argparse.Namespace, context: DistributedContext, epoch: int
) -> DataLoader:
    """Build the training loader of `epoch`, with shuffling and augmentation seeded by it."""
    sampler = DistributedSampler(
        dataset,
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    transform = dataset.dataset.transform
    seed = (args.seed, epoch, context.rank)

    def reseed_worker(worker_id: int) -> None:
        transform.reseed((*seed, worker_id + 1))

    transform.reseed((*seed, 0))
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate_samples,
        worker_init_fn=reseed_worker,
        drop_last=True,
    )


def eval_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Build an ordered loader for evaluation."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_samples,
    )


def stack_images(dataset: Dataset) -> torch.Tensor:
    """Stack every image of `dataset` into one (N, 3, S, S) tensor."""
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


# ---------------------------------------------------------------------------------------------
# Model


def _adapt_flags(adapt: str) -> tuple[bool, bool]:
    return {"both": (True, True), "blocks": (True, False), "tokens": (False, True)}[adapt]


def build_model(args: argparse.Namespace) -> tuple[AdaMTL, dict[str, Any]]:
    """Build the stage's model: from the preset (static) or from the previous stage (--init).

    With --init, the encoder and heads come from that checkpoint. Its policies are loaded too
    when their shapes match the requested policy mode and adaptation flags; otherwise the
    policies keep their fresh initialisation (e.g. the task-agnostic ablation starting from
    the static model, whose policies were never trained anyway).

    Returns:
        (model, metadata of the --init checkpoint or {}).
    """
    adapt_blocks, adapt_tokens = _adapt_flags(args.adapt)
    if args.init is None:
        overrides = {}
        if args.policy_mode is not None:
            overrides["policy_mode"] = args.policy_mode
        config = get_preset(args.preset, **overrides)
        torch.manual_seed(args.seed)
        model = AdaMTL(config, adapt_blocks=adapt_blocks, adapt_tokens=adapt_tokens)
        if args.backbone is not None:
            load_backbone_weights(model.encoder, args.backbone)
            logger.info("loaded ImageNet backbone weights from %s", args.backbone)
        return model, {}

    source, metadata = load_checkpoint(args.init)
    if args.preset is not None and args.preset != source.config.name:
        raise ValueError(
            f"--preset {args.preset} differs from preset {source.config.name} of --init "
            f"{args.init}: leave --preset out, the stage continues the --init model"
        )
    data = source.config.to_dict()
    if args.policy_mode is not None:
        data["policy_mode"] = args.policy_mode
    config = ModelConfig.from_dict(data)
    torch.manual_seed(args.seed)
    model = AdaMTL(config, adapt_blocks=adapt_blocks, adapt_tokens=adapt_tokens)
    target = model.state_dict()
    loaded, fresh = {}, []
    for name, tensor in source.state_dict().items():
        if name in target and target[name].shape == tensor.shape:
            loaded[name] = tensor
        elif name.startswith("policies."):
            fresh.append(name)
        else:
            raise ValueError(f"--init {args.init}: tensor {name} does not fit the requested model")
    missing = [name for name in target if name not in loaded and not name.startswith("policies.")]
    if missing:
        raise ValueError(f"--init {args.init} lacks tensors {missing[:8]}")
    model.load_state_dict(loaded, strict=False)
    if fresh or any(name not in loaded for name in target):
        logger.info("policies not taken from %s keep their initialisation", args.init)
    return model, metadata


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


class FrozenPolicySlices:
    """Keep the output rows of every task sub-network except one fixed across optimizer steps.

    The policy output layers `block_out` and `token_out` have weight rows laid out as
    (depth, num_tasks) over the hidden units, so row d * T + t belongs to task t. The other
    tasks' rows already receive zero gradient when only the focus task is requested, but
    Adam's moment estimates and weight decay would still move them, so `restore` writes their
    values back after each step.
    """

    def __init__(self, model: AdaMTL, focus: int) -> None:
        self.saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        num_tasks = len(model.config.tasks)
        for policy in model.policies:
            for name in ("block_out", "token_out"):
                layer = getattr(policy, name, None)
                if layer is None:
                    continue
                frozen = torch.arange(layer.out_features, device=layer.weight.device) % num_tasks
                frozen = frozen != focus
                for tensor in (layer.weight, layer.bias):
                    self.saved.append((tensor, frozen, tensor.detach()[frozen].clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, rows, values in self.saved:
            tensor[rows] = values


# ---------------------------------------------------------------------------------------------
# Loss functions of the stages


def _budget_generator(args: argparse.Namespace, epoch: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash_seed(args.seed, epoch, rank, 17))


def hash_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (deterministic across processes and runs)."""
    value = 1469598103934665603
    for part in parts:
        value = ((value ^ (part & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return value


def draw_budget(
    args: argparse.Namespace, config: ModelConfig, generator: torch.Generator
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Return (budget passed to the model, block targets, token targets) for one batch.

    The targets are (K,) tensors, one per block. Without --setting the budget is uniform in
    [min_budget, 1) and the targets follow from `budget_targets` with --budget-split. With
    --setting H or L the targets are fixed and the same for every block, and the model
    receives their product, the FLOPs ratio they imply, clamped to [min_budget, 0.99].
    """
    if args.setting is not None:
        block_target, token_target = FIXED_SETTINGS[args.setting]
        budget = min(max(block_target * token_target, config.min_budget), 0.99)
        blocks = sum(config.depths)
        return budget, torch.full((blocks,), block_target), torch.full((blocks,), token_target)
    budget = sample_budget(config, generator, args.budget_sampling)
    block_targets, token_targets = budget_targets(budget, config.depths, args.budget_split)
    return budget, block_targets, token_targets


def efficiency_terms(
    args: argparse.Namespace, model: AdaMTL
) -> tuple[list[float], list[int] | None]:
    """Return the token weights and block groups of the efficiency loss for --budget-split.

    AdaMTL's split weighs each block's token gap by its stage's width and compares all
    blocks with one target. The latency split weighs every block the same. It compares each
    stage's blocks with that stage's target. --setting always uses AdaMTL's.
    """
    widths = [float(cost["dim"]) for cost in model._static_costs["blocks"]]
    split = BUDGET_SPLITS["uniform" if args.setting is not None else args.budget_split]
    weights = widths if split.width_weights else [1.0] * len(widths)
    groups = None
    if split.per_stage_blocks:
        groups = [stage for stage, depth in enumerate(model.config.depths) for _ in range(depth)]
    return weights, groups


def sample_budget(
    config: ModelConfig, generator: torch.Generator, sampling: str = "uniform"
) -> float:
    """Draw a budget from [min_budget, 1).

    "uniform" draws uniformly. "low" maps a uniform u to min_budget + (1 - min_budget) * u^2,
    so half of the budgets fall in the lowest quarter of the range.
    """
    if sampling not in ("uniform", "low"):
        raise ValueError(f"invalid budget sampling {sampling!r}: use 'uniform' or 'low'")
    low = config.min_budget
    fraction = float(torch.rand((), generator=generator))
    if sampling == "low":
        fraction = fraction * fraction
    return low + (1.0 - low) * fraction


def _model_noise(args: argparse.Namespace, epoch: int, rank: int, device: torch.device):
    return torch.Generator(device=device).manual_seed(hash_seed(args.seed, epoch, rank, 29))


def static_loss(criterion: MultiTaskLoss):
    def compute(model: nn.Module, batch: dict[str, Any]) -> StepResult:
        output = model(batch["image"], 1.0)
        total, losses = criterion(output.outputs, batch)
        return StepResult(loss=total, terms=dict(losses))

    return compute


def policy_init_loss(config: ModelConfig, budget_rng: torch.Generator, noise: torch.Generator):
    def compute(model: nn.Module, batch: dict[str, Any]) -> StepResult:
        budget = sample_budget(config, budget_rng)
        output = model(batch["image"], budget, generator=noise, compute_outputs=False)
        stats = output.stats
        block_term = (1.0 - stats.block_keep.mean(dim=0)).sum()
        token_term = (1.0 - stats.token_keep.mean(dim=0)).sum()
        return StepResult(
            loss=block_term + token_term,
            terms={"block_masks": block_term, "token_masks": token_term},
            stats={
                "kept_blocks": float(stats.block_keep.detach().mean()),
                "kept_tokens": float(stats.tokens_ratio.mean()),
            },
        )

    return compute


def cotrain_loss(args, config, criterion, tasks, efficiency, budget_rng, noise, teacher=None):
    """Task loss + alpha * efficiency loss, plus args.distill * the distillation loss towards
    `teacher`'s maps when a teacher is given. `efficiency` is the (token weights, block
    groups) pair of `efficiency_terms`."""
    token_weights, block_groups = efficiency

    def compute(model: nn.Module, batch: dict[str, Any]) -> StepResult:
        budget, block_target, token_target = draw_budget(args, config, budget_rng)
        output = model(batch["image"], budget, tasks, generator=noise)
        task_total, losses = criterion(output.outputs, batch)
        if teacher is not None:
            with torch.no_grad():
                targets = teacher(batch["image"], 1.0, tasks).outputs
            distill_total, distill_terms = distillation_loss(
                output.outputs, targets, criterion.tasks, criterion.weights
            )
            task_total = task_total + args.distill * distill_total
            losses = {**losses, **{f"distill_{t}": v for t, v in distill_terms.items()}}
        stats = output.stats
        batch_size = stats.block_keep.shape[0]
        efficiency_value, _ = efficiency_loss(
            stats.block_keep,
            stats.token_keep,
            token_weights,
            block_target.expand(batch_size, -1),
            token_target.expand(batch_size, -1),
            batch_mean=not args.per_image_efficiency,
            block_groups=block_groups,
        )
        return StepResult(
            loss=task_total + args.alpha * efficiency_value,
            terms={**losses, "efficiency": efficiency_value},
            stats={
                "budget": budget,
                "flops_ratio": float(stats.flops_ratio.mean()),
                "kept_blocks": float(stats.block_keep.detach().mean()),
                "kept_tokens": float(stats.tokens_ratio.mean()),
            },
        )

    return compute


# ---------------------------------------------------------------------------------------------
# Optimisation


def build_optimizer(model: AdaMTL, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW with --lr for encoder and heads, --policy-lr for the policies, and weight decay
    on matrices only."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        lr = args.policy_lr if name.startswith("policies.") else args.lr
        decay = args.weight_decay if parameter.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(parameter)
    return torch.optim.AdamW(
        [
            {"params": params, "lr": lr, "weight_decay": decay}
            for (lr, decay), params in groups.items()
        ]
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base rates, then cosine decay to 1 % of them."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochPlan:
    """Training plan of one epoch: its loss function, a hook run after each optimizer step,
    and the focus task of a co-training epoch (a task name in Alternating Task Training,
    "all" when fine-tuning, None in the other stages)."""

    loss_function: LossFunction
    after_step: Callable[[], None] | None = None
    focus_task: str | None = None


def prepare_epoch(
    model: AdaMTL,
    args: argparse.Namespace,
    epoch: int,
    context: DistributedContext,
    class_weights: dict[str, torch.Tensor] | None = None,
    teacher: AdaMTL | None = None,
) -> EpochPlan:
    """Set train/eval modes and trainable parameters for `epoch` and return its plan.

    Static: everything but the policies trains. Policy initialisation: only the policies
    train, and encoder and heads stay in eval mode, so batch norm statistics do not move.
    Co-training epochs below --att-epochs are Alternating Task Training epochs: only the focus
    task is requested, so only its head runs, the other heads are frozen, and the other
    tasks' output rows of the policies are restored after every step. The shared encoder and
    the policies' shared first layers train with the focus task. `class_weights` weigh the
    cross-entropy of the label-map tasks (see `label_class_weights`). A co-training epoch
    with a `teacher` (the frozen static model) also distils its maps (see --distill).
    """
    budget_rng = _budget_generator(args, epoch, context.rank)
    noise = _model_noise(args, epoch, context.rank, context.device)
    tasks = list(model.config.tasks)
    efficiency = efficiency_terms(args, model)
    model.train()
    if args.stage == "static":
        _set_trainable(model, True)
        _set_trainable(model.policies, False)
        return EpochPlan(static_loss(MultiTaskLoss(tasks, class_weights=class_weights)))
    if args.stage == "policy_init":
        _set_trainable(model, False)
        _set_trainable(model.policies, True)
        model.encoder.eval()
        model.heads.eval()
        return EpochPlan(policy_init_loss(model.config, budget_rng, noise))

    _set_trainable(model, True)
    if epoch >= args.att_epochs:
        loss_function = cotrain_loss(
            args,
            model.config,
            MultiTaskLoss(tasks, class_weights=class_weights),
            None,
            efficiency,
            budget_rng,
            noise,
            teacher,
        )
        return EpochPlan(loss_function, focus_task="all")
    focus = epoch % len(tasks)
    for index, name in enumerate(tasks):
        _set_trainable(model.heads[name], index == focus)
    after_step = None
    if model.config.policy_mode == "task_aware":
        after_step = FrozenPolicySlices(model, focus).restore
    focus_tasks = [tasks[focus]]
    loss_function = cotrain_loss(
        args,
        model.config,
        MultiTaskLoss(focus_tasks, class_weights=class_weights),
        focus_tasks,
        efficiency,
        budget_rng,
        noise,
        teacher,
    )
    return EpochPlan(loss_function, after_step, tasks[focus])


def with_precision(
    loss_function: LossFunction, precision: str, device: torch.device
) -> LossFunction:
    """Run `loss_function`, the model's forward pass included, under bfloat16 autocast when
    `precision` is "bf16" (see --precision). The backward pass follows the same casts."""
    if precision == "fp32":
        return loss_function

    def compute(model: nn.Module, batch: dict[str, Any]) -> StepResult:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return loss_function(model, batch)

    return compute


# ---------------------------------------------------------------------------------------------
# The stage skeleton


def _stage_epochs(args: argparse.Namespace) -> int:
    if args.stage == "cotrain":
        return args.att_epochs + args.finetune_epochs
    return args.epochs


def _steps_per_epoch(args: argparse.Namespace, train_size: int, world_size: int) -> int:
    steps = (train_size // world_size) // args.batch_size
    if args.steps_per_epoch is not None:
        steps = min(steps, args.steps_per_epoch)
    return steps


# Options that change what a stage trains. A stage resumes only with the values it was started
# with, because its state.pt (learning-rate schedule, data order, epoch count) depends on them.
# Threads, device, workers, logging and the calibration after training may change between runs.
_RESUME_OPTIONS: tuple[str, ...] = (
    "dataset", "calibration_images", "batch_size", "steps_per_epoch", "lr", "policy_lr",
    "weight_decay", "warmup_steps", "class_weights", "grad_clip", "precision", "alpha", "distill",
    "budget_sampling", "budget_split", "setting", "per_image_efficiency", "policy_mode", "adapt",
    "seed",
)  # fmt: skip


def _resume_options(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """Return the options (as command-line flags) that a resumed stage must repeat."""
    names = list(_RESUME_OPTIONS)
    names += ["att_epochs", "finetune_epochs"] if args.stage == "cotrain" else ["epochs"]
    options = {"--" + name.replace("_", "-"): getattr(args, name) for name in names}
    options["processes (torchrun --nproc_per_node)"] = world_size
    return options


def _save_state(
    path: Path, model: AdaMTL, optimizer, scheduler, epoch: int, args, world_size: int
) -> None:
    state = {
        "stage": args.stage,
        "options": _resume_options(args, world_size),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "config": model.config.to_dict(),
    }
    temporary = path.with_name(path.name + ".partial")
    torch.save(state, temporary)
    temporary.replace(path)


def _load_state(path: Path, model: AdaMTL, optimizer, scheduler, args, world_size: int) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("stage") != args.stage:
        raise ValueError(f"{path} belongs to stage {state.get('stage')!r}, not {args.stage!r}")
    if state["config"] != model.config.to_dict():
        raise ValueError(
            f"{path} was written for another model configuration; use a new --out or --restart"
        )
    # NOTE: state files written before the options were stored resume without this check.
    saved = state.get("options")
    if saved is not None:
        current = _resume_options(args, world_size)
        changed = [
            f"{name} {saved.get(name)!r} (now {value!r})"
            for name, value in current.items()
            if saved.get(name) != value
        ]
        if changed:
            raise ValueError(
                f"{path} was written with other options: {', '.join(changed)}. Resume with "
                "the earlier values, or pass --restart (or a new --out) to train again"
            )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])


_stage_log_handler: logging.Handler | None = None


def _configure_logging(stage_dir: Path, is_main: bool) -> None:
    """Log INFO to stderr and to STAGE/train.log on rank 0, WARNING only on other ranks."""
    global _stage_log_handler
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    if _stage_log_handler is not None:
        # A second stage in the same process logs to its own file only.
        root.removeHandler(_stage_log_handler)
        _stage_log_handler.close()
        _stage_log_handler = None
    if is_main:
        handler = logging.FileHandler(stage_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        _stage_log_handler = handler


def provenance(args: argparse.Namespace, data_name: str, commit: str) -> dict[str, Any]:
    """Describe how a checkpoint was produced: command, preset, seed, data, commit, schedule."""
    return {
        "command": " ".join([Path(sys.executable).name, "-m", "training.train", *sys.argv[1:]]),
        "stage": args.stage,
        "preset": args.preset,
        "seed": args.seed,
        "dataset": data_name,
        "git_commit": commit,
        "init": None if args.init is None else str(args.init),
        "schedule": {
            "epochs": _stage_epochs(args),
            "att_epochs": args.att_epochs if args.stage == "cotrain" else None,
            "finetune_epochs": args.finetune_epochs if args.stage == "cotrain" else None,
            "steps_per_epoch": args.steps_per_epoch,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "policy_lr": args.policy_lr,
            "alpha": args.alpha,
            "distill": args.distill,
            "budget_sampling": args.budget_sampling,
            "budget_split": args.budget_split,
            "class_weights": args.class_weights,
            "precision": args.precision,
            "setting": args.setting,
            "policy_mode": args.policy_mode,
            "adapt": args.adapt,
        },
    }


def _static_teacher(args: argparse.Namespace, device: torch.device) -> AdaMTL:
    """Load the frozen static model that co-training distils: the --init checkpoint.

    The teacher runs at budget 1, which bypasses its policies. Policy initialisation trains
    only the policies, so the checkpoint's encoder and heads are the static stage's, and a
    resumed run distils the same teacher.
    """
    teacher, _ = load_checkpoint(args.init)
    teacher.to(device).eval()
    _set_trainable(teacher, False)
    logger.info("distilling the static model of %s with weight %g", args.init, args.distill)
    return teacher


def run_stage(args: argparse.Namespace, context: DistributedContext) -> Path:
    """Run (or resume) one stage and return the path of its exported checkpoint."""
    stage_dir = Path(args.out) / args.stage
    if context.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    context.barrier()
    _configure_logging(stage_dir, context.is_main)

    model, _ = build_model(args)
    model.to(context.device)
    data = build_data(args, model.config)
    class_weights = None
    if args.class_weights == "balanced" and args.stage != "policy_init":
        class_weights = label_class_weights(data.train, model.config)
    teacher = None
    if args.stage == "cotrain" and args.distill > 0:
        teacher = _static_teacher(args, context.device)
    commit = git_commit()
    resolved = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": model.config.to_dict(),
        "adapt_blocks": model.adapt_blocks,
        "adapt_tokens": model.adapt_tokens,
        "world_size": context.world_size,
        "device": str(context.device),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "train_images": len(data.train),
        "calibration_images": len(data.calibration),
        "val_images": len(data.val),
        "class_weights": None
        if class_weights is None
        else {t: [round(float(w), 4) for w in weights] for t, weights in class_weights.items()},
    }

    total_epochs = _stage_epochs(args)
    steps = _steps_per_epoch(args, len(data.train), context.world_size)
    if steps < 1:
        raise ValueError(
            f"{len(data.train)} training images over {context.world_size} processes give no "
            f"batch of {args.batch_size}; lower --batch-size"
        )
    optimizer = build_optimizer(model, args)
    warmup = min(args.warmup_steps, total_epochs * steps // 2)
    scheduler = build_scheduler(optimizer, total_epochs * steps, warmup)

    state_path = stage_dir / "state.pt"
    start_epoch = 0
    if state_path.is_file() and not args.restart:
        start_epoch = _load_state(state_path, model, optimizer, scheduler, args, context.world_size)
        logger.info("resumed %s from %s after epoch %d", args.stage, state_path, start_epoch)
    elif args.resume:
        raise FileNotFoundError(f"--resume given but {state_path} does not exist")
    # Written after the resume check, so a rejected resume leaves the stage's files as they were.
    if context.is_main:
        logger.info("resolved configuration: %s", json.dumps(resolved))
        logger.info("git commit: %s", commit)
        (stage_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")

    reporter = ProgressReporter(
        args.stage,
        total_epochs,
        steps,
        stage_dir / "metrics.jsonl" if context.is_main else None,
        log_every=args.log_every,
        is_main=context.is_main,
    )
    for epoch in range(start_epoch, total_epochs):
        plan = prepare_epoch(model, args, epoch, context, class_weights, teacher)
        wrapped = wrap_model(model, context)
        loader = _epoch_loader(data.train, args, context, epoch)
        summary = train_one_epoch(
            wrapped,
            loader,
            optimizer,
            scheduler,
            with_precision(plan.loss_function, args.precision, context.device),
            reporter,
            epoch,
            device=context.device,
            grad_clip=args.grad_clip,
            max_steps=steps,
            after_step=plan.after_step,
        )
        record = {"focus_task": plan.focus_task} if plan.focus_task else {}
        record.update(summary)
        record["lr"] = optimizer.param_groups[0]["lr"]
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and context.is_main:
            record["val"] = _quick_eval(model, data, args)
        reporter.log_epoch(record)
        if context.is_main:
            _save_state(
                state_path,
                unwrap(wrapped),
                optimizer,
                scheduler,
                epoch + 1,
                args,
                context.world_size,
            )
        context.barrier()

    model.eval()
    if args.stage == "cotrain" and context.is_main:
        # Only rank 0 writes the checkpoint, so only it needs the table.
        _calibrate(model, data, args)
    checkpoint_path = stage_dir / "model.safetensors"
    if context.is_main:
        save_checkpoint(
            model,
            checkpoint_path,
            name=f"adamtl-{model.config.name}-{args.stage}",
            provenance=provenance(args, data.name, commit),
            metrics={"final_epoch": _last_record(stage_dir / "metrics.jsonl")},
        )
        logger.info("wrote %s", checkpoint_path)
    context.barrier()
    return checkpoint_path


def _last_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def _quick_eval(model: AdaMTL, data: StageData, args: argparse.Namespace) -> dict[str, Any]:
    budget = 1.0 if args.stage == "static" else max(0.6, model.config.min_budget)
    # The model's own device: a GPU run must not move the model to the CPU mid-training.
    predictor = Predictor(model, device=next(model.parameters()).device)
    result = evaluate(predictor, eval_loader(data.val, args.batch_size), budget)
    model.train()
    return {"budget": budget, "metrics": result.metrics, "flops_ratio": result.mean_flops_ratio}


def _calibrate(model: AdaMTL, data: StageData, args: argparse.Namespace) -> None:
    """Fill the budget table on the held-out calibration slice of the train split."""
    start = time.perf_counter()
    images = stack_images(data.calibration).to(next(model.parameters()).device)
    grid = default_budget_grid(model.config.min_budget, args.calibration_step)
    task_sets = []
    if args.calibration_task_sets and model.config.policy_mode == "task_aware":
        task_sets = all_task_subsets(model.config.tasks)
    table = calibrate(
        model,
        images,
        budgets=grid,
        tolerance=args.calibration_tolerance,
        batch_size=args.batch_size,
        task_sets=task_sets,
    )
    logger.info(
        "calibrated %d budgets on %d held-out training images in %.1f s: achieved %s",
        len(grid), images.shape[0], time.perf_counter() - start,
        [round(value, 3) for value in table["achieved"]],
    )  # fmt: skip
