"""Budget calibration: the gate offset that makes the mean FLOPs ratio equal the budget.

For each budget on a grid, `calibrate` searches a scalar offset added to every keep logit until
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


@torch.inference_mode()
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


def _solve_offset(
    ratio, budget: float, guess: float, step: float, tolerance: float, max_steps: int
) -> float:
    """Return the offset whose ratio is closest to `budget`, found from `guess`.

    `ratio` rises with the offset. The search first steps away from `guess`, doubling the
    step, until the budget is bracketed, then narrows the bracket by false position with the
    Illinois correction, which needs a few evaluations where bisection needs about ten.
    """
    best = guess
    lo = hi = None  # (offset, ratio - budget), below and above the budget
    offset, error = guess, ratio(guess) - budget
    while True:
        if abs(error) < abs(ratio(best) - budget):
            best = offset
        if abs(error) <= tolerance:
            return best
        if error < 0:
            lo = (offset, error)
        else:
            hi = (offset, error)
        if lo is not None and hi is not None:
            break
        if abs(offset) > 1e4:  # the budget is out of reach: keep the closest offset
            return best
        offset = offset + step if error < 0 else offset - step
        error = ratio(offset) - budget
        step *= 2
    side = 0
    for _ in range(max_steps):
        (x_lo, f_lo), (x_hi, f_hi) = lo, hi
        offset = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        if not x_lo < offset < x_hi:
            offset = 0.5 * (x_lo + x_hi)
        error = ratio(offset) - budget
        if abs(error) < abs(ratio(best) - budget):
            best = offset
        if abs(error) <= tolerance or x_hi - x_lo < 1e-6:
            break
        # Illinois: halve the stale end's error when the same end moves twice in a row, so
        # the bracket shrinks from both sides.
        if error < 0:
            lo = (offset, error)
            if side < 0:
                hi = (x_hi, f_hi / 2)
            side = -1
        else:
            hi = (offset, error)
            if side > 0:
                lo = (x_lo, f_lo / 2)
            side = 1
    return best


def _calibrate_table(
    model: AdaMTL,
    images: torch.Tensor,
    grid: Sequence[float],
    tasks: Sequence[str] | None,
    tolerance: float,
    max_steps: int,
    batch_size: int,
    guesses: Sequence[float] | None = None,
) -> dict[str, list[float]]:
    """Find the gate offset of each budget in `grid` for one task set.

    Each search starts from the previous budget's offset, moved by the step between
    `guesses[i - 1]` and `guesses[i]` when given (the all-task table, for a task subset) and
    otherwise extrapolated along the table so far.
    """
    offsets, achieved = [], []
    for index, budget in enumerate(grid):
        ratio_at: dict[float, float] = {}

        def ratio(offset: float, budget: float = budget, cache: dict = ratio_at) -> float:
            if offset not in cache:
                cache[offset] = mean_flops_ratio(
                    model, images, budget, offset, tasks=tasks, batch_size=batch_size
                )
            return cache[offset]

        if guesses is not None and index > 0:
            # A task subset's offsets follow the all-task table's steps from its own start.
            move = guesses[index] - guesses[index - 1]
            guess, step = offsets[-1] + move, max(abs(move), 0.25)
        elif guesses is not None:
            guess, step = guesses[0], 1.0
        elif index >= 2:
            slope = (offsets[-1] - offsets[-2]) / (grid[index - 1] - grid[index - 2])
            guess = offsets[-1] + slope * (budget - grid[index - 1])
            step = max(abs(guess - offsets[-1]), 0.25)
        elif index == 1:
            guess, step = offsets[-1] + 0.5, 0.5
        else:
            guess, step = 0.0, 1.0
        best = _solve_offset(ratio, budget, guess, step, tolerance, max_steps)
        offsets.append(float(best))
        achieved.append(float(ratio(best)))
        logger.info(
            "calibrated budget %.3f for tasks %s: offset %.4f, mean FLOPs ratio %.4f "
            "(image passes: %d)",
            budget,
            "all" if tasks is None else ",".join(tasks),
            best,
            ratio(best),
            len(ratio_at),
        )
    # Keep offsets non-decreasing in the budget so interpolation never inverts the order.
    offsets = [float(o) for o in np.maximum.accumulate(np.asarray(offsets))]
    return {"budgets": [float(b) for b in grid], "offsets": offsets, "achieved": achieved}


@torch.inference_mode()
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
        budgets: budget grid in [min_budget, 1), sorted and deduplicated here; defaults to
            `default_budget_grid(config.min_budget)`.
        tolerance: stop bisecting once the mean ratio is within this of the budget.
        max_steps: search steps per budget once the budget is bracketed.
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
    if budgets is None:
        grid = default_budget_grid(model.config.min_budget)
    else:
        low, high = model.budget_range
        bad = [b for b in budgets if not low <= float(b) < high]
        if bad or not budgets:
            raise ValueError(
                f"calibration budgets {list(budgets)} must be a non-empty list in "
                f"[{low:g}, {high:g}); budget 1 bypasses the policy and needs no offset"
            )
        # The table is interpolated, so it must be strictly increasing.
        grid = sorted({float(b) for b in budgets})
    table: dict = _calibrate_table(model, images, grid, None, tolerance, max_steps, batch_size)
    table["task_sets"] = {}
    for tasks in task_sets:
        model.task_mask([list(tasks)], 1)  # raises InvalidRequestError for unknown names
        ordered = [t for t in model.config.tasks if t in tasks]
        table["task_sets"][task_set_key(ordered)] = _calibrate_table(
            model, images, grid, ordered, tolerance, max_steps, batch_size, table["offsets"]
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
