"""Command line of the three training stages.

    python -m training.train --stage static --preset demo --data data/scenes --out runs/demo
    python -m training.train --stage policy_init --init runs/demo/static/model.safetensors ...
    python -m training.train --stage cotrain --init runs/demo/policy_init/model.safetensors ...

Distributed: `torchrun --nproc_per_node=N -m training.train ...` (gloo on CPU, NCCL on CUDA).
A stage resumes from RUN/STAGE/state.pt when that file exists, unless --restart is given.
docs/training.md describes the presets and schedules.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import torch

from model_core.policy import BUDGET_SPLITS
from model_core.presets import preset_names
from training.cli import run_cli
from training.engine import setup_distributed
from training.stages import FIXED_SETTINGS, STAGES, run_stage

__all__ = ["build_parser", "main", "validate_args"]

logger = logging.getLogger(__name__)


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Run one stage of the AdaMTL training recipe.",
    )
    parser.add_argument("--stage", required=True, choices=STAGES, help="recipe stage to run")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--preset",
        choices=preset_names(),
        help="model preset; required for the static stage, later stages read it from --init",
    )
    model.add_argument(
        "--init", type=Path, help="checkpoint of the previous stage (policy_init and cotrain)"
    )
    model.add_argument(
        "--backbone", type=Path, help="ImageNet Swin weights (local .pth or .safetensors file)"
    )
    model.add_argument(
        "--policy-mode",
        choices=("task_aware", "task_agnostic"),
        help="policy variant (default: the preset's, or the --init checkpoint's)",
    )
    model.add_argument(
        "--adapt",
        choices=("both", "blocks", "tokens"),
        default="both",
        help="what the policy may skip: blocks and tokens, blocks only or tokens only",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="dataset root folder")
    data.add_argument(
        "--dataset",
        choices=("scenes", "pascal"),
        default="scenes",
        help="scenes: folders written by training.datasets.scenes; pascal: PASCAL-Context root",
    )
    data.add_argument(
        "--calibration-images",
        type=int,
        default=64,
        help="images at the end of the train split held out from training for calibration",
    )
    data.add_argument("--batch-size", type=int, default=16, help="images per batch and process")
    data.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes (0 loads in-process)"
    )

    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--epochs", type=int, default=1, help="epochs of static or policy_init")
    schedule.add_argument(
        "--att-epochs", type=int, default=4, help="cotrain: Alternating Task Training epochs"
    )
    schedule.add_argument(
        "--finetune-epochs", type=int, default=1, help="cotrain: end-to-end fine-tuning epochs"
    )
    schedule.add_argument(
        "--steps-per-epoch", type=int, help="cap on the batches of an epoch (default: all)"
    )
    schedule.add_argument("--lr", type=float, default=1e-4, help="AdamW rate: encoder and heads")
    schedule.add_argument("--policy-lr", type=float, default=1e-3, help="AdamW rate: policies")
    schedule.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    schedule.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    schedule.add_argument(
        "--class-weights",
        choices=("none", "balanced"),
        default="none",
        help="cross-entropy of human parts and semseg: unweighted as in the AdaMTL recipe, or "
        "with class weights of 1/sqrt(pixel frequency) counted on the training labels",
    )
    schedule.add_argument(
        "--grad-clip", type=float, default=5.0, help="max gradient norm; 0 disables clipping"
    )
    schedule.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="precision of the training forward passes: float32, or bfloat16 autocast (fast on "
        "CPUs with AMX or AVX-512 BF16 and on recent GPUs). Weights, optimiser, policy gates, "
        "losses and calibration stay float32",
    )

    budget = parser.add_argument_group("budget (cotrain)")
    budget.add_argument("--alpha", type=float, default=1.0, help="weight of the efficiency loss")
    budget.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight of a distillation loss towards the static model's maps (the --init "
        "checkpoint at budget 1) in co-training; 0, the AdaMTL recipe, turns it off",
    )
    budget.add_argument(
        "--budget-sampling",
        choices=("uniform", "low"),
        default="uniform",
        help="how co-training draws each batch's budget from [min_budget, 1): uniformly, as in "
        "AdaMTL, or 'low': min_budget + (1 - min_budget) * u^2, half of them in the lowest "
        "quarter",
    )
    budget.add_argument(
        "--budget-split",
        choices=sorted(BUDGET_SPLITS),
        default="uniform",
        help="how co-training splits each budget into block and token targets: 'uniform', "
        "AdaMTL's split, the same in every stage; 'latency': the first stage skips tokens, the "
        "second half tokens and half blocks, the last two mostly whole blocks, where a CPU "
        "saves the most time at batch 1",
    )
    budget.add_argument(
        "--setting",
        choices=sorted(FIXED_SETTINGS),
        help="fixed targets instead of budgets drawn per batch: H = 90 %% blocks and 60 %% "
        "tokens, L = 50 %% and 50 %%",
    )
    budget.add_argument(
        "--per-image-efficiency",
        action="store_true",
        help="compare each image's kept ratios with the targets; by default the batch means "
        "are compared, so images may spend more or less by content",
    )
    budget.add_argument(
        "--calibration-step",
        type=float,
        default=0.05,
        help="spacing of the calibrated budget grid, from the preset's min_budget up to 1",
    )
    budget.add_argument(
        "--calibration-tolerance",
        type=float,
        default=0.003,
        help="stop bisecting a budget's gate offset once the mean FLOPs ratio is this close",
    )
    budget.add_argument(
        "--calibration-task-sets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also calibrate one table per proper subset of the tasks (task-aware policy only), "
        "so that requests for fewer tasks track their budget too",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--out", type=Path, required=True, help="run folder; the stage writes OUT/STAGE"
    )
    run.add_argument(
        "--resume", action="store_true", help="require OUT/STAGE/state.pt and resume from it"
    )
    run.add_argument("--restart", action="store_true", help="ignore OUT/STAGE/state.pt")
    run.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    run.add_argument(
        "--threads", type=int, default=default_threads(), help="torch CPU threads per process"
    )
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device of training: cpu, cuda, or auto (CUDA when available)",
    )
    run.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    run.add_argument(
        "--eval-every", type=int, default=0, help="epochs between val evaluations (0: never)"
    )
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first invalid option; reads nothing but file existence."""
    if args.stage == "static" and args.preset is None and args.init is None:
        raise ValueError("--preset is required for the static stage")
    if args.stage != "static" and args.init is None:
        raise ValueError(f"--init is required for the {args.stage} stage: pass the previous "
                         "stage's model.safetensors")  # fmt: skip
    if args.init is not None and not args.init.is_file():
        raise ValueError(f"--init checkpoint not found: {args.init}")
    if args.backbone is not None and args.init is not None:
        raise ValueError(
            "--backbone applies only to a static stage without --init, whose encoder starts "
            "from the ImageNet weights; leave one of them out"
        )
    if args.backbone is not None and not args.backbone.is_file():
        raise ValueError(f"--backbone weights file not found: {args.backbone}")
    if not args.data.is_dir():
        raise ValueError(f"--data folder not found: {args.data}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; pass --device cpu or auto")
    if args.resume and args.restart:
        raise ValueError("--resume and --restart exclude each other")

    floats = {
        "--lr": args.lr,
        "--policy-lr": args.policy_lr,
        "--weight-decay": args.weight_decay,
        "--grad-clip": args.grad_clip,
        "--alpha": args.alpha,
        "--distill": args.distill,
        "--calibration-step": args.calibration_step,
        "--calibration-tolerance": args.calibration_tolerance,
    }
    for name, value in floats.items():
        if not math.isfinite(value):
            raise ValueError(f"invalid {name} {value}: must be a finite number")

    positive = {"--batch-size": args.batch_size, "--threads": args.threads}
    if args.stage == "cotrain":
        positive["--att-epochs + --finetune-epochs"] = args.att_epochs + args.finetune_epochs
    else:
        positive["--epochs"] = args.epochs
    if args.steps_per_epoch is not None:
        positive["--steps-per-epoch"] = args.steps_per_epoch
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"invalid {name} {value}: must be at least 1")

    non_negative = {
        "--workers": args.workers,
        "--calibration-images": args.calibration_images,
        "--att-epochs": args.att_epochs,
        "--finetune-epochs": args.finetune_epochs,
        "--warmup-steps": args.warmup_steps,
        "--alpha": args.alpha,
        "--distill": args.distill,
        "--weight-decay": args.weight_decay,
        "--eval-every": args.eval_every,
        "--grad-clip": args.grad_clip,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ValueError(f"invalid {name} {value}: must not be negative")

    if args.lr <= 0 or args.policy_lr <= 0:
        raise ValueError(f"invalid learning rates {args.lr}, {args.policy_lr}: must be positive")
    if args.stage == "cotrain" and args.calibration_images < 1:
        raise ValueError("cotrain calibrates the budget table: --calibration-images must be >= 1")
    if not 0.0 < args.calibration_step < 1.0:
        raise ValueError(f"invalid --calibration-step {args.calibration_step}: must be in (0, 1)")
    if args.calibration_tolerance <= 0:
        raise ValueError(
            f"invalid --calibration-tolerance {args.calibration_tolerance}: must be positive"
        )


def main(args: argparse.Namespace) -> Path:
    """Validate `args`, then run the stage; return the exported checkpoint's path."""
    validate_args(args)
    torch.set_num_threads(args.threads)
    context = setup_distributed(args.device)
    try:
        return run_stage(args, context)
    finally:
        if context.distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli("python -m training.train", lambda: main(build_parser().parse_args()))
