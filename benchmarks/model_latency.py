"""Latency of the adaptive model against the static model, measured side by side.

For each budget the static model (budget 1) and the adaptive model run alternately on the same
batch, and the medians give `latency_ratio`. `flops_ratio` is the mean executed FLOPs ratio
of that batch, and `policy_overhead_ratio` the FLOPs of all policy networks over the static
model's, the most a pass spends on the policy.

    python -m benchmarks.model_latency --preset demo --batch 1 8 --json

Without `--checkpoint`, the preset is built with random weights and calibrated on generated
images, which is enough to measure how wall-clock time follows FLOPs. A trained policy
decides by content, so a checkpoint is best timed on the images it was trained for:
`--images scenes` renders procedural scenes, as the demo model saw in training, from seeds
that its training and validation splits do not use.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from model_core.allocator import reuse_freed_memory
from model_core.calibration import calibrate
from model_core.checkpoint import load_checkpoint
from model_core.model import AdaMTL
from model_core.predictor import Predictor
from model_core.presets import get_preset, preset_names
from training.cli import run_cli

DEFAULT_BUDGETS = (1.0, 0.8, 0.6, 0.5, 0.4)


def generated_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Return (count, 3, size, size) normalised images of smooth random structure and edges."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for index in range(count):
        coarse = 2 + index % 12  # from a few large blobs to many small ones
        low = torch.rand(1, 3, coarse, coarse, generator=generator)
        image = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        image = image + 0.1 * torch.randn(1, 3, size, size, generator=generator)
        images.append(image)
    pixels = torch.cat(images).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def scene_images(predictor: Predictor, count: int, seed: int) -> torch.Tensor:
    """Return (count, 3, size, size) model inputs of procedural validation scenes."""
    from training.datasets.scenes import render_image

    size = predictor.input_size
    return predictor.preprocess(
        [render_image(seed, "val", index, size)[0].image for index in range(count)]
    )


def build_predictor(
    preset: str,
    checkpoint: Path | None,
    calibration_images: int,
    seed: int,
    budgets: Sequence[float] = (),
) -> Predictor:
    """Load `checkpoint`, or build `preset` with random weights calibrated at `budgets`.

    Without budgets below 1, a random-weight model is calibrated on the default grid.

    Raises:
        ValueError: a budget is outside the model's [min_budget, 1], or `checkpoint` is
            missing or unreadable (model_core.checkpoint.CheckpointError).
    """
    if checkpoint is not None:
        model, metadata = load_checkpoint(checkpoint)
    else:
        torch.manual_seed(seed)
        model, metadata = AdaMTL(get_preset(preset)).eval(), None
    # Checked before the calibration, which runs hundreds of forward passes.
    min_budget = model.config.min_budget
    invalid = [b for b in budgets if not min_budget <= b <= 1.0]
    if invalid:
        raise ValueError(
            f"invalid --budgets {invalid}: model {model.config.name} serves budgets in "
            f"[{min_budget:g}, 1]"
        )
    if model.calibration is None:
        images = generated_images(calibration_images, model.config.img_size, seed + 1)
        grid = sorted(b for b in budgets if b < 1.0) or None
        calibrate(model, images, budgets=grid, tolerance=0.01, max_steps=14, batch_size=8)
    return Predictor(model, metadata=metadata)


def time_alternately(
    predictor: Predictor, images: torch.Tensor, budget: float, repeats: int
) -> tuple[float, float]:
    """Return median seconds of (static, adaptive) forward passes, run alternately.

    Each pass is the forward that `Predictor.predict` runs: outputs at the heads' resolution,
    which the predictor then resizes once, to each image's size.
    """
    for _ in range(2):  # warm-up of both paths
        predictor.run(images, 1.0, full_resolution=False)
        predictor.run(images, budget, full_resolution=False)
    static, adaptive = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.run(images, 1.0, full_resolution=False)
        static.append(time.perf_counter() - start)
        start = time.perf_counter()
        predictor.run(images, budget, full_resolution=False)
        adaptive.append(time.perf_counter() - start)
    return statistics.median(static), statistics.median(adaptive)


def measure(args: argparse.Namespace) -> list[dict]:
    predictor = build_predictor(
        args.preset, args.checkpoint, args.calibration_images, args.seed, args.budgets
    )
    model = predictor.model
    size = model.config.img_size
    policy_overhead = model.policy_flops() / model.static_flops()
    rows = []
    for batch in args.batch:
        if args.images == "scenes":
            images = scene_images(predictor, batch, args.seed + 100 + batch)
        else:
            images = generated_images(batch, size, args.seed + 100 + batch)
        for budget in args.budgets:
            output = predictor.run(images, budget)
            flops_ratio = float(output.stats.flops_ratio.mean())
            static_s, adaptive_s = time_alternately(predictor, images, budget, args.repeats)
            rows.append(
                {
                    "preset": model.config.name,
                    "batch": batch,
                    "budget": budget,
                    "flops_ratio": round(flops_ratio, 4),
                    "latency_ratio": round(adaptive_s / static_s, 4),
                    "static_ms": round(1000 * static_s, 2),
                    "adaptive_ms": round(1000 * adaptive_s, 2),
                    "policy_overhead_ratio": round(policy_overhead, 4),
                    "threads": torch.get_num_threads(),
                    "images": args.images,
                }
            )
            logging.info("measured %s", rows[-1])
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| preset | images | batch | budget | flops_ratio | latency_ratio | static ms "
        "| adaptive ms | policy overhead |"
    )
    print("|" + "---|" * 9)
    for row in rows:
        print(
            f"| {row['preset']} | {row['images']} | {row['batch']} | {row['budget']:.2f} "
            f"| {row['flops_ratio']:.3f} | "
            f"{row['latency_ratio']:.3f} | {row['static_ms']:.1f} | {row['adaptive_ms']:.1f} | "
            f"{100 * row['policy_overhead_ratio']:.2f} % |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=preset_names(), help="model preset")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint to load instead of random weights"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS), help="budgets to time"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per path and budget")
    parser.add_argument(
        "--images",
        choices=("generated", "scenes"),
        default="generated",
        help="timed inputs: smooth random images, or procedural scenes (what the demo model "
        "was trained on; the scene seeds are the run's --seed + 100 + batch size)",
    )
    parser.add_argument(
        "--calibration-images", type=int, default=16, help="generated images for calibration"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and generated images")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per row instead of a table"
    )
    args = parser.parse_args(argv)
    if any(b <= 0 for b in args.batch) or args.repeats < 1:
        parser.error("--batch values and --repeats must be positive")
    if args.calibration_images < 1:
        parser.error(f"invalid --calibration-images {args.calibration_images}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"invalid --threads {args.threads}: must be at least 1, or leave it out")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint file not found: {args.checkpoint}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s"
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the service does
    rows = measure(args)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("python -m benchmarks.model_latency", main))
