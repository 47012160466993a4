"""Budget calibration: the gate offset that makes the mean FLOPs ratio equal the budget.

For each budget on a grid, `calibrate` bisects a scalar offset added to every keep logit until
the mean executed FLOPs ratio over the calibration images equals the budget. Each image still
gets more or less work than the mean by its content. Works for any weights, trained or not.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from model_core.model import AdaMTL, task_set_key

__all__ = ["all_task_subsets", "calibrate", "default_budget_grid", "mean_flops_ratio"]

logger = logging.getLogger(__name__)


def default_budget_grid(min_budget: float, step: float = 0.05) -> list[float]:
    """Return budgets from `min_budget` to just below 1 in steps of `step`."""
    grid = list(np.arange(min_budget, 1.0 - 1e-9, step))
    return [round(float(b), 4) for b in grid]


@torch.no_grad()
def mean_flops_ratio(
    model: AdaMTL,
    images: torch.Tensor,
    budget: float,
    offset: float | None = None,
    tasks: Sequence[str] | None = None,
    batch_size: int = 16,
) -> float:
    """Return the mean executed FLOPs ratio over `images` at `budget`.

    With `offset` given, that gate offset replaces the calibration table for this call.
    """
    saved = model.calibration
    if offset is not None:
        model.calibration = {"budgets": [0.0, 1.0], "offsets": [offset, offset]}
    try:
        ratios = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size]
            out = model(chunk, budget, tasks, compute_outputs=False)
            ratios.append(out.stats.flops_ratio)
        return float(torch.cat(ratios).mean())
    finally:
        model.calibration = saved


def _calibrate_table(
    model: AdaMTL,
    images: torch.Tensor,
    grid: Sequence[float],
    tasks: Sequence[str] | None,
    tolerance: float,
    max_steps: int,
    batch_size: int,
) -> dict[str, list[float]]:
    """Bisect the gate offset of each budget in `grid` for one task set."""
    offsets, achieved = [], []
    low, high = -16.0, 16.0
    for budget in grid:
        ratio_at = {}

        def ratio(offset: float, budget: float = budget, cache: dict = ratio_at) -> float:
            if offset not in cache:
                cache[offset] = mean_flops_ratio(
                    model, images, budget, offset, tasks=tasks, batch_size=batch_size
                )
            return cache[offset]

        lo, hi = low, high
        # Widen the bracket until it contains the budget (the ratio rises with the offset).
        while ratio(lo) > budget and lo > -1e4:
            lo *= 2
        while ratio(hi) < budget and hi < 1e4:
            hi *= 2
        best = min((lo, hi), key=lambda o: abs(ratio(o) - budget))
        for _ in range(max_steps):
            middle = 0.5 * (lo + hi)
            value = ratio(middle)
            if abs(value - budget) < abs(ratio(best) - budget):
                best = middle
            if abs(value - budget) <= tolerance:
                break
            if value < budget:
                lo = middle
            else:
                hi = middle
        offsets.append(float(best))
        achieved.append(float(ratio(best)))
        logger.info(
            "calibrated budget %.3f for tasks %s: offset %.4f, mean FLOPs ratio %.4f",
            budget,
            "all" if tasks is None else ",".join(tasks),
            best,
            ratio(best),
        )
    # Keep offsets non-decreasing in the budget so interpolation never inverts the order.
    offsets = [float(o) for o in np.maximum.accumulate(np.asarray(offsets))]
    return {"budgets": [float(b) for b in grid], "offsets": offsets, "achieved": achieved}


@torch.no_grad()
def calibrate(
    model: AdaMTL,
    images: torch.Tensor,
    budgets: Sequence[float] | None = None,
    tolerance: float = 0.003,
    max_steps: int = 24,
    batch_size: int = 16,
    task_sets: Sequence[Sequence[str]] = (),
) -> dict:
    """Fill `model.calibration` so the mean FLOPs ratio on `images` matches each budget.

    Args:
        model: the model; put in eval mode for the duration of the call.
        images: (N, 3, S, S) normalised calibration images, never the evaluation images.
        budgets: budget grid; defaults to `default_budget_grid(config.min_budget)`.
        tolerance: stop bisecting once the mean ratio is within this of the budget.
        max_steps: bisection steps per budget.
        batch_size: images per forward pass.
        task_sets: subsets of the tasks that get a table of their own. A request for fewer
            tasks keeps fewer tokens at the same offset, so without its own table its FLOPs
            ratio falls below the budget. Other subsets use the all-task table.

    Returns:
        The table, {"budgets", "offsets", "achieved", "task_sets"}, also stored in
        `model.calibration`. Budget 1 is not in it: at budget 1 the policy is bypassed.
    """
    was_training = model.training
    model.eval()
    grid = list(budgets) if budgets is not None else default_budget_grid(model.config.min_budget)
    table: dict = _calibrate_table(model, images, grid, None, tolerance, max_steps, batch_size)
    table["task_sets"] = {}
    for tasks in task_sets:
        model.task_mask([list(tasks)], 1)  # raises InvalidRequestError for unknown names
        ordered = [t for t in model.config.tasks if t in tasks]
        table["task_sets"][task_set_key(ordered)] = _calibrate_table(
            model, images, grid, ordered, tolerance, max_steps, batch_size
        )
    model.calibration = table
    model.train(was_training)
    return table


def all_task_subsets(tasks: Sequence[str]) -> list[list[str]]:
    """Return every non-empty proper subset of `tasks`, in task order."""
    subsets = []
    for size in range(1, len(tasks)):
        subsets.extend(list(c) for c in itertools.combinations(tasks, size))
    return subsets
