"""Time of one packed Swin block against the share of tokens it computes.

For the second block of every stage (the shifted one where the stage has more than one
window), the benchmark times the dense block and `run_block_packed` with random keep masks,
alternately, on the same features. A `time_ratio` close to `keep_ratio` means that skipping
tokens saves time in proportion to the FLOPs it saves. Deep stages of a small model at batch 1
stay well above it. Their matrix products have a few dozen rows, so reading the weights costs
as much as the arithmetic, and the fixed work of packing is a larger share.

    python -m benchmarks.block_scaling --preset demo --batch 1 8

The weights are random (the timing does not depend on their values).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from model_core.allocator import reuse_freed_memory
from model_core.model import AdaMTL
from model_core.presets import get_preset, preset_names
from model_core.skipping import run_block_packed

DEFAULT_KEEP_RATIOS = (0.8, 0.6, 0.4, 0.2)


def time_pair(dense, packed, repeats: int) -> tuple[float, float]:
    """Return the median seconds of `dense()` and `packed()`, run alternately."""
    for _ in range(2):
        dense()
        packed()
    dense_s, packed_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        dense()
        dense_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        packed()
        packed_s.append(time.perf_counter() - start)
    return statistics.median(dense_s), statistics.median(packed_s)


@torch.no_grad()
def measure(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    model = AdaMTL(get_preset(args.preset)).eval()
    config = model.config
    encoder = model.encoder
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for stage_index, stage in enumerate(encoder.layers):
        block = stage.blocks[min(1, len(stage.blocks) - 1)]
        size = encoder.stage_sizes[stage_index][0]
        dim = config.stage_dims[stage_index]
        for batch in args.batch:
            x = torch.randn(batch, size, size, dim, generator=generator)
            for keep_ratio in args.keep_ratios:
                keep = torch.rand(batch, size, size, generator=generator) < keep_ratio
                dense_s, packed_s = time_pair(
                    functools.partial(block, x),
                    functools.partial(run_block_packed, block, x, keep),
                    args.repeats,
                )
                rows.append(
                    {
                        "preset": config.name,
                        "stage": stage_index,
                        "tokens": size * size,
                        "dim": dim,
                        "batch": batch,
                        "keep_ratio": round(float(keep.float().mean()), 3),
                        "time_ratio": round(packed_s / dense_s, 3),
                        "dense_ms": round(1000 * dense_s, 3),
                        "packed_ms": round(1000 * packed_s, 3),
                        "threads": torch.get_num_threads(),
                    }
                )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| preset | stage | tokens x dim | batch | keep ratio | time ratio | dense ms | packed ms |"
    )
    print("|" + "---|" * 8)
    for row in rows:
        print(
            f"| {row['preset']} | {row['stage']} | {row['tokens']} x {row['dim']} "
            f"| {row['batch']} | {row['keep_ratio']:.2f} | {row['time_ratio']:.3f} "
            f"| {row['dense_ms']:.2f} | {row['packed_ms']:.2f} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=preset_names(), help="model preset")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument(
        "--keep-ratios",
        type=float,
        nargs="+",
        default=list(DEFAULT_KEEP_RATIOS),
        help="probability that a token is kept, each in (0, 1)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per path")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, features and masks")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per row instead of a table"
    )
    args = parser.parse_args(argv)
    if any(b <= 0 for b in args.batch) or args.repeats < 1:
        parser.error("--batch values and --repeats must be positive")
    if any(not 0.0 < r < 1.0 for r in args.keep_ratios):
        parser.error(f"--keep-ratios {args.keep_ratios}: each must be in (0, 1)")
    if args.threads is not None and args.threads < 1:
        parser.error(f"invalid --threads {args.threads}: must be at least 1, or leave it out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    raise SystemExit(main())
