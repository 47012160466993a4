"""Evaluate a trained run on the val split and export the serving checkpoint.

    python -m training.evaluate --adaptive RUN/cotrain/model.safetensors \\
        --static RUN/static/model.safetensors --data DATA --out-dir REPORT \\
        [--task-agnostic RUN_AGNOSTIC/cotrain/model.safetensors] [--export MODEL.safetensors]

writes REPORT/evaluation.json (every number of the report) and REPORT/masks.npz (token masks
of the simplest and the most cluttered val image). Every evaluation runs through
`model_core.predictor.Predictor.run` on the val split. The random-policy keep probability is
searched on the calibration slice of the train split (the same held-out images the budget
table was calibrated on), never on val.

NOTE: metrics are computed at the model's input resolution, on labels resized with the
evaluation transform (nearest sampling for label maps). The AdaMTL paper scores PASCAL-Context
at each image's original size, so figures from the paper presets are close to, but not
exactly, the paper's protocol.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from model_core.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from model_core.model import AdaMTL
from model_core.predictor import Predictor
from model_core.presets import IMAGENET_MEAN, IMAGENET_STD
from training.cli import run_cli
from training.datasets.transforms import test_transform
from training.engine import EvaluationResult, evaluate, git_commit
from training.metrics import delta_m
from training.stages import eval_loader, stack_images

__all__ = ["build_parser", "main", "repo_relative", "search_random_keep"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TRACKING_BUDGETS: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ADAPTIVITY_BUDGET = 0.6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate an AdaMTL run on the val split and write evaluation.json.",
    )
    models = parser.add_argument_group("models")
    models.add_argument("--adaptive", type=Path, required=True, help="co-trained checkpoint")
    models.add_argument("--static", type=Path, required=True, help="static (stage 1) checkpoint")
    models.add_argument(
        "--task-agnostic", type=Path, help="co-trained checkpoint of the task-agnostic ablation"
    )

    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="dataset root folder")
    data.add_argument("--dataset", choices=("scenes", "pascal"), default="scenes")
    data.add_argument(
        "--calibration-images",
        type=int,
        default=64,
        help="size of the held-out train slice used in training; the random-policy search "
        "runs on it",
    )
    data.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    data.add_argument("--val-limit", type=int, help="evaluate on the first N val images only")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=list(TRACKING_BUDGETS),
        help="budgets at which the adaptive model is evaluated",
    )
    evaluation.add_argument(
        "--matched-ratio",
        type=float,
        default=0.5,
        help="FLOPs ratio (of the static model) at which the ablations are compared",
    )
    evaluation.add_argument(
        "--latency-repeats", type=int, default=10, help="timed batch-1 runs per task selection"
    )

    output = parser.add_argument_group("output")
    output.add_argument("--out-dir", type=Path, required=True, help="folder for the results")
    output.add_argument(
        "--export", type=Path, help="write the serving checkpoint (adaptive model + metrics) here"
    )
    output.add_argument(
        "--run-command", help="command that produced the run, recorded in the export's provenance"
    )
    output.add_argument("--seed", type=int, default=0, help="seed of the random-policy masks")
    output.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads"
    )
    return parser


def validate_args(args: argparse.Namespace) -> None:
    for name in ("adaptive", "static", "task_agnostic"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise ValueError(f"--{name.replace('_', '-')} checkpoint not found: {path}")
    if not args.data.is_dir():
        raise ValueError(f"--data folder not found: {args.data}")
    if not 0.0 < args.matched_ratio < 1.0:
        raise ValueError(f"invalid --matched-ratio {args.matched_ratio}: must be in (0, 1)")
    if args.calibration_images < 1:
        raise ValueError("--calibration-images must be at least 1 for the random-policy search")
    if args.batch_size < 1 or args.threads < 1 or args.latency_repeats < 1:
        raise ValueError("--batch-size, --threads and --latency-repeats must be at least 1")
    if args.val_limit is not None and args.val_limit < 1:
        raise ValueError(f"invalid --val-limit {args.val_limit}: must be at least 1")
    # The results are written after minutes of evaluation, so unwritable paths fail first.
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out-dir {args.out_dir} is a file: pass a folder")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(args.out_dir, os.W_OK):
        raise ValueError(f"--out-dir {args.out_dir} is not writable: pass another folder")
    if args.export is not None:
        if args.export.is_dir():
            raise ValueError(f"--export {args.export} is a folder: pass a .safetensors file path")
        export_dir = args.export.parent
        if not export_dir.is_dir() or not os.access(export_dir, os.W_OK):
            raise ValueError(
                f"--export folder {export_dir} does not exist or is not writable: create it or "
                "pass another path"
            )


def _preset_key(config) -> tuple:
    return config.name, config.img_size, config.tasks


def check_models(
    args: argparse.Namespace,
    models: dict[str, AdaMTL],
    train_images: int,
    static_stage: str | None = None,
) -> None:
    """Raise ValueError unless the checkpoints fit their roles and come from one preset.

    The adaptive and task-agnostic models need a budget calibration table, which only the
    cotrain stage writes. `static_stage` is the stage recorded in the --static checkpoint's
    provenance (None for checkpoints without one). The budgets must fit the preset.
    """
    for name in ("adaptive", "task_agnostic"):
        if name in models and models[name].calibration is None:
            raise ValueError(
                f"--{name.replace('_', '-')} {getattr(args, name)} has no budget calibration "
                "table: pass the model.safetensors of a cotrain stage"
            )
    if static_stage not in (None, "static"):
        raise ValueError(
            f"--static {args.static} was written by the {static_stage} stage: pass the "
            "model.safetensors of the static stage"
        )
    config = models["adaptive"].config
    for name, model in models.items():
        other = model.config
        if (other.name, other.img_size, other.tasks) != _preset_key(config):
            raise ValueError(
                f"--{name.replace('_', '-')} {getattr(args, name)} is preset {other.name} "
                f"({other.img_size} px, tasks {list(other.tasks)}), but --adaptive "
                f"{args.adaptive} is preset {config.name} ({config.img_size} px, tasks "
                f"{list(config.tasks)}); pass the checkpoints of one run"
            )
    low = config.min_budget
    invalid = [b for b in args.budgets if not low <= b <= 1.0]
    if invalid:
        raise ValueError(f"invalid --budgets {invalid}: preset {config.name} serves [{low:g}, 1]")
    if args.matched_ratio < low:
        raise ValueError(
            f"invalid --matched-ratio {args.matched_ratio}: preset {config.name} serves budgets "
            f"from {low:g}"
        )
    if args.calibration_images >= train_images:
        raise ValueError(
            f"--calibration-images {args.calibration_images} must be smaller than the "
            f"{train_images} images of the train split: pass the value used in training"
        )


# ---------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def mean_random_ratio(predictor: Predictor, images: torch.Tensor, keep: float, seed: int) -> float:
    """Return the mean FLOPs ratio of random masks that keep blocks and tokens with `keep`."""
    generator = torch.Generator().manual_seed(seed)
    ratios = []
    for chunk in images.split(16):
        output = predictor.run(
            chunk, 1.0, random_keep=keep, generator=generator, compute_outputs=False
        )
        ratios.append(output.stats.flops_ratio)
    return float(torch.cat(ratios).mean())


def search_random_keep(
    predictor: Predictor, images: torch.Tensor, target: float, seed: int, steps: int = 14
) -> tuple[float, float]:
    """Bisect the keep probability whose random masks give mean FLOPs ratio `target`.

    Returns:
        (keep probability, mean FLOPs ratio it gives on `images`).
    """
    low, high = 0.0, 1.0
    best = (1.0, mean_random_ratio(predictor, images, 1.0, seed))
    for _ in range(steps):
        middle = 0.5 * (low + high)
        ratio = mean_random_ratio(predictor, images, middle, seed)
        if abs(ratio - target) < abs(best[1] - target):
            best = (middle, ratio)
        if ratio < target:
            low = middle
        else:
            high = middle
    return best


def measure_latency(
    predictor: Predictor, image: torch.Tensor, budget: float, tasks: list[str], repeats: int
) -> float:
    """Return the median wall time in milliseconds of one batch-1 forward pass."""
    predictor.run(image, budget, tasks)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.run(image, budget, tasks)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def _summary(result: EvaluationResult, model: AdaMTL, extra: dict | None = None) -> dict:
    return {
        "metrics": result.metrics,
        "gflops": result.mean_flops / 1e9,
        "flops_ratio": result.mean_flops_ratio,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        **(extra or {}),
    }


def _safe_delta_m(metrics: dict, baseline: dict) -> float | None:
    tasks = [
        task
        for task in metrics
        if all(math.isfinite(float(v)) for v in metrics[task].values())
        and all(math.isfinite(float(v)) for v in baseline.get(task, {}).values())
    ]
    return delta_m(metrics, baseline, tasks) if tasks else None


def spearman(complexity: list, flops: list) -> dict[str, Any]:
    """Compute the Spearman correlation between per-image complexity scores and FLOPs."""
    from scipy.stats import spearmanr

    pairs = [(c, f) for c, f in zip(complexity, flops, strict=True) if c is not None]
    if len(pairs) < 3:
        return {"rho": None, "p_value": None, "count": len(pairs)}
    scores, values = zip(*pairs, strict=True)
    if len(set(values)) < 2 or len(set(scores)) < 2:
        return {"rho": None, "p_value": None, "count": len(pairs)}
    result = spearmanr(scores, values)
    return {"rho": float(result.statistic), "p_value": float(result.pvalue), "count": len(pairs)}


def _denormalise(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)
    return (pixels.numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def save_masks(
    predictor: Predictor, val: Dataset, result: EvaluationResult, budget: float, path: Path
) -> None:
    """Save the token masks of the simplest and the most cluttered val image at `budget`.

    Images are ranked by the dataset's complexity score, or by the FLOPs they received
    where the dataset has none.
    """
    scores = [
        c if c is not None else f for c, f in zip(result.complexity, result.flops, strict=True)
    ]
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    picks = [order[0], order[-1]]
    images = torch.stack([val[i]["image"] for i in picks])
    output = predictor.run(images, budget, return_masks=True)
    arrays = {
        "images": np.stack([_denormalise(image) for image in images]),
        "ids": np.array([result.ids[i] for i in picks]),
        "scores": np.array([scores[i] for i in picks], dtype=np.float64),
        "flops_ratio": output.stats.flops_ratio.cpu().numpy(),
        "budget": np.array(budget),
        "depths": np.array(predictor.config.depths),
    }
    for index, mask in enumerate(output.stats.keep_masks):
        arrays[f"mask_{index}"] = mask.cpu().numpy()
    np.savez_compressed(path, **arrays)


# ---------------------------------------------------------------------------------------------
# Provenance


def _stage_chain(path: Path) -> dict[str, dict]:
    """Follow the --init links of stage checkpoints back to the first stage."""
    chain: dict[str, dict] = {}
    current: Path | None = path
    while current is not None and current.is_file() and len(chain) < 8:
        provenance = read_metadata(current).get("provenance", {})
        chain[str(provenance.get("stage", current.parent.name))] = provenance
        init = provenance.get("init")
        current = Path(init) if init else None
    return chain


def repo_relative(text: str | None, root: Path = REPO) -> str | None:
    """Write the paths inside the repository `root` in `text` relative to it.

    The exported checkpoint is shipped, so its provenance names the run's data and stage
    checkpoints as `runs/...` rather than by the training machine's absolute paths. Paths
    outside the repository stay as they are.
    """
    if text is None:
        return None
    # Only where a path starts: at the beginning, or after a space, ':' or '='.
    prefix = re.escape(f"{root.resolve()}{os.sep}")
    return re.sub(rf"(?<![^\s:=]){prefix}", "", text)


def export_provenance(args: argparse.Namespace, metadata: dict) -> dict[str, Any]:
    provenance = metadata.get("provenance", {})
    chain = _stage_chain(args.adaptive)
    return {
        "command": args.run_command
        or " ".join(["python", "-m", "training.evaluate", *sys.argv[1:]]),
        "preset": provenance.get("preset") or metadata.get("config", {}).get("name"),
        "seed": provenance.get("seed"),
        "dataset": repo_relative(provenance.get("dataset")),
        "git_commit": git_commit(),
        "training_git_commit": provenance.get("git_commit"),
        "schedule": {stage: info.get("schedule") for stage, info in chain.items()},
        "stage_commands": {
            stage: repo_relative(info.get("command")) for stage, info in chain.items()
        },
    }


# ---------------------------------------------------------------------------------------------
# Main


def _open_split(args: argparse.Namespace, split: str, size: int, tasks) -> Dataset:
    transform = test_transform(size)
    if args.dataset == "scenes":
        from training.datasets.scenes import ScenesDataset

        return ScenesDataset(args.data, split, transform)
    from training.datasets.pascal import PascalContextMT

    return PascalContextMT(args.data, split, tasks, transform)


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement of the report and return them as one JSON-ready dict."""
    adaptive_model, adaptive_meta = load_checkpoint(args.adaptive)
    static_model, static_meta = load_checkpoint(args.static)
    models = {"adaptive": adaptive_model, "static": static_model}
    if args.task_agnostic is not None:
        models["task_agnostic"] = load_checkpoint(args.task_agnostic)[0]
    adaptive, static = Predictor(adaptive_model), Predictor(static_model)
    config = adaptive_model.config

    val = _open_split(args, "val", config.img_size, config.tasks)
    if args.val_limit is not None:
        val = Subset(val, range(min(args.val_limit, len(val))))
    train = _open_split(args, "train", config.img_size, config.tasks)
    count = len(train)
    check_models(args, models, count, static_meta.get("provenance", {}).get("stage"))
    calibration = stack_images(Subset(train, range(count - args.calibration_images, count)))
    loader = eval_loader(val, args.batch_size)
    logger.info("evaluating on %d val images", len(val))

    results: dict[str, Any] = {"val_images": len(val), "preset": config.name}
    static_result = evaluate(static, loader, 1.0)
    results["static"] = _summary(static_result, static_model)
    baseline = static_result.metrics

    per_budget, tracking = {}, []
    budget_results: dict[float, EvaluationResult] = {}
    for budget in sorted(set(args.budgets) | {ADAPTIVITY_BUDGET, args.matched_ratio}):
        result = evaluate(adaptive, loader, budget)
        budget_results[budget] = result
        per_budget[f"{budget:.2f}"] = _summary(
            result, adaptive_model, {"delta_m": _safe_delta_m(result.metrics, baseline)}
        )
        tracking.append({"budget": budget, "achieved": result.mean_flops_ratio})
        logger.info("budget %.2f: mean FLOPs ratio %.3f", budget, result.mean_flops_ratio)
    results["adaptive"] = per_budget
    results["tracking"] = tracking

    at_adaptivity = budget_results[ADAPTIVITY_BUDGET]
    results["adaptivity"] = {
        "budget": ADAPTIVITY_BUDGET,
        **spearman(at_adaptivity.complexity, at_adaptivity.flops),
        "flops": at_adaptivity.flops,
        "flops_ratio": at_adaptivity.flops_ratio,
        "complexity": at_adaptivity.complexity,
        "static_gflops": static_model.static_flops() / 1e9,
    }

    results["ablation"] = _ablation(
        args, adaptive, static, models.get("task_agnostic"), budget_results, loader, calibration,
        baseline,
    )  # fmt: skip
    results["task_selection"] = _task_selection(args, adaptive, val)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_masks(adaptive, val, at_adaptivity, ADAPTIVITY_BUDGET, args.out_dir / "masks.npz")

    if args.export is not None:
        summary = {
            "static": {k: results["static"][k] for k in ("metrics", "gflops")},
            "adaptive": {
                budget: {k: row[k] for k in ("metrics", "gflops", "flops_ratio", "delta_m")}
                for budget, row in per_budget.items()
            },
            "spearman_complexity_flops": results["adaptivity"]["rho"],
            "val_images": len(val),
        }
        save_checkpoint(
            adaptive_model,
            args.export,
            name=f"adamtl-{config.name}",
            provenance=export_provenance(args, adaptive_meta),
            metrics=summary,
        )
        results["export"] = str(args.export)
        logger.info("wrote the serving checkpoint %s", args.export)
    return results


def _ablation(
    args, adaptive, static, agnostic_model, budget_results, loader, calibration, baseline
) -> dict:
    """Compare policies at the matched FLOPs ratio (of the static model)."""
    target = args.matched_ratio
    rows = []
    task_aware = budget_results[target]
    rows.append({"name": "task-aware policy", **_summary(task_aware, adaptive.model)})
    if agnostic_model is not None:
        result = evaluate(Predictor(agnostic_model), loader, target)
        rows.append({"name": "task-agnostic policy", **_summary(result, agnostic_model)})
    for name, predictor in (
        ("random policy, adaptive model", adaptive),
        ("random policy, static model", static),
    ):
        keep, ratio = search_random_keep(predictor, calibration, target, args.seed)
        logger.info("%s: keep probability %.3f gives FLOPs ratio %.3f", name, keep, ratio)
        result = evaluate(predictor, loader, 1.0, random_keep=keep, seed=args.seed)
        rows.append({"name": name, "random_keep": keep, **_summary(result, predictor.model)})
    for row in rows:
        row["delta_m"] = _safe_delta_m(row["metrics"], baseline)
    return {"target_ratio": target, "rows": rows}


def _task_selection(args, adaptive: Predictor, val: Dataset) -> list[dict]:
    """Measure FLOPs and batch-1 latency with one task against all tasks, at budgets 1 and 0.6."""
    image = val[0]["image"][None]
    tasks = list(adaptive.tasks)
    rows = []
    for budget in (1.0, ADAPTIVITY_BUDGET):
        for selection in [[task] for task in tasks] + [tasks]:
            output = adaptive.run(image, budget, selection, compute_outputs=False)
            rows.append(
                {
                    "budget": budget,
                    "tasks": selection,
                    "gflops": float(output.stats.flops[0]) / 1e9,
                    "latency_ms": measure_latency(
                        adaptive, image, budget, selection, args.latency_repeats
                    ),
                }
            )
    return rows


def main(args: argparse.Namespace) -> dict[str, Any]:
    validate_args(args)
    torch.set_num_threads(args.threads)
    results = run_evaluation(args)
    results["torch_threads"] = args.threads
    path = args.out_dir / "evaluation.json"
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_cli("python -m training.evaluate", lambda: main(build_parser().parse_args()))
