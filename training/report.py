"""Turn evaluation.json (from `training.evaluate`) into report.md and its plots.

    python -m training.report --evaluation REPORT/evaluation.json [--title TEXT]

writes, next to evaluation.json: report.md, accuracy_vs_flops.png, flops_histogram.png and
token_masks.png (the latter from masks.npz).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import zipfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # the report writes image files, so no display is needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training.cli import run_cli  # noqa: E402
from training.metrics import primary_metric  # noqa: E402

__all__ = ["build_parser", "main", "write_report"]

logger = logging.getLogger(__name__)


class MasksFileError(ValueError):
    """masks.npz next to evaluation.json is unreadable or lacks an array of the plot."""


TABLE_BUDGETS: tuple[str, ...] = ("1.00", "0.80", "0.60", "0.40")

# Column label of each task's primary metric, in the column order of the AdaMTL paper's Table 1.
TASK_COLUMNS: dict[str, str] = {
    "saliency": "Sal maxF ↑",
    "human_parts": "Parts mIoU ↑",
    "semseg": "Seg mIoU ↑",
    "normals": "Normals mErr ↓",
}


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _task_cells(metrics: dict[str, dict[str, float]]) -> list[str]:
    cells = []
    for task in TASK_COLUMNS:
        if task not in metrics:
            cells.append("–")
            continue
        cells.append(_number(metrics[task].get(primary_metric(task).name)))
    return cells


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def main_table(evaluation: dict) -> list[str]:
    static = evaluation["static"]
    header = ["model", *TASK_COLUMNS.values(), "Δm vs static (%)", "GFLOPs", "FLOPs ratio"]
    header.append("Params (M)")
    rows = [
        ["static MTL", *_task_cells(static["metrics"]), "0.00", _number(static["gflops"], 3),
         "1.000", _number(static["params_m"])]
    ]  # fmt: skip
    for budget in TABLE_BUDGETS:
        row = evaluation["adaptive"].get(budget)
        if row is None:
            continue
        rows.append(
            [f"AdaMTL, budget {budget}", *_task_cells(row["metrics"]), _signed(row["delta_m"]),
             _number(row["gflops"], 3), _number(row["flops_ratio"], 3), _number(row["params_m"])]
        )  # fmt: skip
    return _table(header, rows)


def tracking_table(evaluation: dict) -> list[str]:
    rows = [
        [
            f"{row['budget']:.2f}",
            f"{row['achieved']:.3f}",
            f"{row['achieved'] - row['budget']:+.3f}",
        ]
        for row in evaluation["tracking"]
    ]
    return _table(["requested budget", "mean achieved FLOPs ratio", "difference"], rows)


def ablation_table(evaluation: dict) -> list[str]:
    rows = []
    for row in evaluation["ablation"]["rows"]:
        name = row["name"]
        if "random_keep" in row:
            name += f" (keep p = {row['random_keep']:.3f})"
        rows.append(
            [name, *_task_cells(row["metrics"]), _signed(row["delta_m"]),
             _number(row["flops_ratio"], 3)]
        )  # fmt: skip
    return _table(["policy", *TASK_COLUMNS.values(), "Δm vs static (%)", "FLOPs ratio"], rows)


def task_selection_table(evaluation: dict) -> list[str]:
    rows = []
    all_rows = {row["budget"]: row for row in evaluation["task_selection"] if len(row["tasks"]) > 1}
    for row in evaluation["task_selection"]:
        reference = all_rows.get(row["budget"], row)
        rows.append(
            [f"{row['budget']:.2f}", " + ".join(row["tasks"]), _number(row["gflops"], 4),
             _number(row["gflops"] / reference["gflops"], 3), _number(row["latency_ms"], 2),
             _number(row["latency_ms"] / reference["latency_ms"], 3)]
        )  # fmt: skip
    header = ["budget", "tasks", "GFLOPs", "vs all tasks", "latency (ms, batch 1)", "vs all tasks"]
    return _table(header, rows)


# ---------------------------------------------------------------------------------------------
# Plots


def plot_accuracy_vs_flops(evaluation: dict, path: Path) -> None:
    tasks = [t for t in TASK_COLUMNS if t in evaluation["static"]["metrics"]]
    figure, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    budgets = sorted(evaluation["adaptive"], key=float)
    for axis, task in zip(axes[0], tasks, strict=True):
        name, higher_is_better = primary_metric(task)
        gflops = [evaluation["adaptive"][b]["gflops"] for b in budgets]
        values = [evaluation["adaptive"][b]["metrics"][task][name] for b in budgets]
        axis.plot(gflops, values, "o-", label="AdaMTL (budgets)")
        static = evaluation["static"]
        axis.plot(static["gflops"], static["metrics"][task][name], "k*", ms=12, label="static")
        for row in evaluation["ablation"]["rows"][1:]:
            axis.plot(row["gflops"], row["metrics"][task][name], "x", label=row["name"])
        axis.set_xlabel("GFLOPs (multiply-accumulates)")
        axis.set_ylabel(f"{task} {name} ({'higher' if higher_is_better else 'lower'} is better)")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_flops_histogram(evaluation: dict, path: Path) -> None:
    adaptivity = evaluation["adaptivity"]
    figure, axis = plt.subplots(figsize=(5, 3.4))
    axis.hist(np.asarray(adaptivity["flops"]) / 1e9, bins=20, color="tab:blue", alpha=0.8)
    axis.axvline(adaptivity["static_gflops"], color="k", linestyle="--", label="static model")
    axis.set_xlabel("GFLOPs per image")
    axis.set_ylabel("val images")
    axis.set_title(f"per-image FLOPs at budget {adaptivity['budget']:.1f}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_token_masks(masks_path: Path, path: Path) -> list[int]:
    """Plot the two images and their token masks at the first block of every stage.

    Returns:
        The plotted block indices.
    """
    data = np.load(masks_path)
    depths = [int(d) for d in data["depths"]]
    blocks = [sum(depths[:stage]) for stage in range(len(depths))]
    labels = ["simplest", "most cluttered"]
    figure, axes = plt.subplots(2, 1 + len(blocks), figsize=(2.2 * (1 + len(blocks)), 4.6))
    for row in range(2):
        axes[row][0].imshow(data["images"][row])
        axes[row][0].set_title(
            f"{labels[row]} ({data['ids'][row]})\nFLOPs ratio {data['flops_ratio'][row]:.2f}",
            fontsize=8,
        )
        for column, block in enumerate(blocks, start=1):
            mask = data[f"mask_{block}"][row]
            axes[row][column].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[row][column].set_title(f"block {block}: {mask.mean():.0%} kept", fontsize=8)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"computed tokens (white) at budget {float(data['budget']):.1f}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return blocks


# ---------------------------------------------------------------------------------------------
# Report


def write_report(evaluation_path: Path, title: str | None = None) -> Path:
    """Write report.md and the plots next to `evaluation_path`; return the report's path.

    Raises:
        ValueError: `evaluation_path` is not JSON or lacks a section or field of the report,
            or masks.npz next to it is unreadable (MasksFileError).
    """
    try:
        evaluation = json.loads(evaluation_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"invalid evaluation file {evaluation_path}: not JSON ({error}); rerun "
            "`python -m training.evaluate` to write it again"
        ) from None
    if not isinstance(evaluation, dict):
        raise ValueError(
            f"invalid evaluation file {evaluation_path}: expected a JSON object, got "
            f"{type(evaluation).__name__}; rerun `python -m training.evaluate` to write it again"
        )
    try:
        return _write_report(evaluation, evaluation_path.parent, title)
    except MasksFileError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as error:
        raise ValueError(
            f"invalid evaluation file {evaluation_path}: missing or malformed content "
            f"({type(error).__name__}: {error}); rerun `python -m training.evaluate` to write "
            "it again"
        ) from None


def _write_report(evaluation: dict, folder: Path, title: str | None) -> Path:
    plot_accuracy_vs_flops(evaluation, folder / "accuracy_vs_flops.png")
    plot_flops_histogram(evaluation, folder / "flops_histogram.png")
    masks_path = folder / "masks.npz"
    mask_blocks = None
    if masks_path.is_file():
        try:
            mask_blocks = plot_token_masks(masks_path, folder / "token_masks.png")
        except (KeyError, IndexError, ValueError, OSError, zipfile.BadZipFile) as error:
            raise MasksFileError(
                f"invalid masks file {masks_path}: {type(error).__name__}: {error}; rerun "
                "`python -m training.evaluate`, or delete it to write the report without "
                "token masks"
            ) from None

    adaptivity = evaluation["adaptivity"]
    ablation = evaluation["ablation"]
    lines = [
        f"# {title or 'AdaMTL report'}",
        "",
        f"Preset `{evaluation['preset']}`, {evaluation['val_images']} val images, "
        f"{evaluation.get('torch_threads', '?')} torch threads. FLOPs are multiply-accumulates "
        "actually executed, policies and heads included; the FLOPs ratio is against the static "
        "model for the same tasks. Δm is the mean relative change of each task's primary "
        "metric against the static model (sign flipped for the normals error), in percent.",
        "",
        "## Accuracy and cost (in the form of the AdaMTL paper's Table 1)",
        "",
        *main_table(evaluation),
        "",
        "![accuracy against FLOPs](accuracy_vs_flops.png)",
        "",
        "## Budget tracking",
        "",
        "Requested budget against the mean executed FLOPs ratio on the val split (the budget "
        "table was calibrated on held-out training images).",
        "",
        *tracking_table(evaluation),
        "",
        "## Adaptivity",
        "",
    ]
    if adaptivity["rho"] is None:
        lines.append(
            f"Spearman correlation at budget {adaptivity['budget']:.1f}: n/a "
            f"({adaptivity['count']} images with a complexity score, or constant values)."
        )
    else:
        lines.append(
            f"Spearman correlation between the dataset's per-image complexity score and the "
            f"per-image FLOPs at budget {adaptivity['budget']:.1f}: ρ = {adaptivity['rho']:.3f} "
            f"(p = {adaptivity['p_value']:.2g}, {adaptivity['count']} images)."
        )
    lines += ["", "![per-image FLOPs](flops_histogram.png)", ""]
    if mask_blocks is not None:
        lines += [
            f"Token masks of the simplest and the most cluttered val image at the first block "
            f"of each stage (blocks {', '.join(map(str, mask_blocks))}):",
            "",
            "![token masks](token_masks.png)",
            "",
        ]
    lines += [
        f"## Ablation at matched FLOPs (≈ {ablation['target_ratio']:.2f} of the static model)",
        "",
        "Random policies keep each block and token with probability p, searched on the "
        "held-out training images so that the mean FLOPs ratio matches.",
        "",
        *ablation_table(evaluation),
        "",
        "## Task selection",
        "",
        "FLOPs and median batch-1 latency when one task is requested against all tasks.",
        "",
        *task_selection_table(evaluation),
        "",
    ]
    report = folder / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.report", description="Write report.md from evaluation.json."
    )
    parser.add_argument("--evaluation", type=Path, required=True, help="evaluation.json")
    parser.add_argument("--title", help="report title")
    return parser


def main(args: argparse.Namespace) -> Path:
    if not args.evaluation.is_file():
        raise ValueError(f"--evaluation file not found: {args.evaluation}")
    report = write_report(args.evaluation, args.title)
    logger.info("wrote %s", report)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_cli("python -m training.report", lambda: main(build_parser().parse_args()))
