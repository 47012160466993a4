"""The AdaMTL module: adaptive Swin encoder, policies and task heads.

`AdaMTL.forward(images, budgets, tasks)` returns a `ModelOutput`: one map per requested task
and an `ExecutionStats` record of the work executed for each image. FLOPs are
multiply-accumulates (one FLOP per MAC, the convention of the Swin and AdaMTL papers) of the
convolutions, linear layers and attention matrix products actually run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_core.encoder import SwinEncoder
from model_core.heads import TaskHead, project_stages, unit_vectors
from model_core.policy import (
    StagePolicy,
    any_task_keeps,
    gumbel_sigmoid_gate,
    union_over_tasks,
)
from model_core.presets import ModelConfig
from model_core.skipping import run_block_masked, run_block_packed, window_layout

__all__ = ["AdaMTL", "ExecutionStats", "InvalidRequestError", "ModelOutput", "TaskRequest"]

# At inference, an image that keeps at least this share of a block's tokens computes all of
# them. Packing cost 1.03 to 1.14 times the dense block at shares of 0.95 to 0.99
# (docs/benchmarks.md), while the last 2 % of the tokens hold 2 % of the block's FLOPs.
FULL_BLOCK_SHARE = 0.98

# A request for tasks: None (all), names for the whole batch, or one list of names per image.
TaskRequest = Sequence[str] | Sequence[Sequence[str]] | None


def task_set_key(tasks: Sequence[str]) -> str:
    """Return the calibration-table key of a task set: the names joined by commas."""
    return ",".join(tasks)


class InvalidRequestError(ValueError):
    """A budget or task list that the model cannot serve; the message names the valid values."""


@dataclass
class ExecutionStats:
    """Work executed for each image of a batch; every tensor has a leading batch dimension.

    Attributes:
        flops: (B,) executed multiply-accumulates, policy and heads included.
        static_flops: (B,) multiply-accumulates of the static model for the requested tasks.
        policy_flops: (B,) executed multiply-accumulates of the policy networks.
        budgets: (B,) requested budgets.
        block_keep: (B, L) 1 where block l ran. Straight-through gate values in training.
        token_keep: (B, L) share of block l's tokens the token policy kept (ignoring the block
            decision). Differentiable in training. At inference with the learned policy, 0
            in the stages where the image runs no block, since its token policy is skipped.
        executed_token_ratio: (B, L) share of block l's tokens computed (0 if skipped).
        stage_token_ratio: (B, 4) executed token ratio averaged over each stage's blocks.
        tokens_ratio: (B,) executed token ratio weighted by each block's embedding width.
        blocks_executed: (B,) blocks that ran.
        keep_masks: per block, the (B, H, W) bool mask of computed tokens (`return_masks=True`).
    """

    flops: torch.Tensor
    static_flops: torch.Tensor
    policy_flops: torch.Tensor
    budgets: torch.Tensor
    block_keep: torch.Tensor
    token_keep: torch.Tensor
    executed_token_ratio: torch.Tensor
    stage_token_ratio: torch.Tensor
    tokens_ratio: torch.Tensor
    blocks_executed: torch.Tensor
    keep_masks: list[torch.Tensor] = field(default_factory=list)

    @property
    def flops_ratio(self) -> torch.Tensor:
        return self.flops / self.static_flops

    def image(self, index: int) -> dict:
        """Return image `index`'s statistics as plain Python numbers."""
        return {
            "flops": float(self.flops[index]),
            "static_flops": float(self.static_flops[index]),
            "flops_ratio": float(self.flops_ratio[index]),
            "policy_flops": float(self.policy_flops[index]),
            "tokens_ratio": float(self.tokens_ratio[index]),
            "tokens_ratio_per_stage": [float(v) for v in self.stage_token_ratio[index]],
            "blocks_executed": int(self.blocks_executed[index]),
            "blocks_total": int(self.block_keep.shape[1]),
            "budget": float(self.budgets[index]),
        }


@dataclass
class ModelOutput:
    """Task maps and execution statistics.

    Attributes:
        outputs: per requested task, a (B, C, S, S) map at the input resolution: "saliency"
            logits (C=1), "human_parts" and "semseg" class logits, "normals" unit vectors
            (C=3). Rows of images that did not request the task are zeros. With
            `full_resolution=False` the maps are the heads' raw outputs at the head resolution
            (input / head_stride), and normals are not normalised.
        stats: the work executed per image.
        task_mask: (B, T) bool, the tasks each image requested, in `config.tasks` order.
    """

    outputs: dict[str, torch.Tensor]
    stats: ExecutionStats
    task_mask: torch.Tensor


class AdaMTL(nn.Module):
    """Multi-task Swin model whose policy skips blocks and tokens per image.

    Args:
        config: model configuration (see `model_core.presets.get_preset`).
        adapt_blocks: let the policy skip whole blocks (blocks-only / tokens-only ablations).
        adapt_tokens: let the policy skip tokens inside blocks.
    """

    def __init__(self, config: ModelConfig, adapt_blocks: bool = True, adapt_tokens: bool = True):
        super().__init__()
        if not (adapt_blocks or adapt_tokens):
            raise ValueError("at least one of adapt_blocks and adapt_tokens must be True")
        self.config = config
        self.adapt_blocks = adapt_blocks
        self.adapt_tokens = adapt_tokens
        self.encoder = SwinEncoder(config)
        num_subnets = len(config.tasks) if config.policy_mode == "task_aware" else 1
        self.policies = nn.ModuleList(
            StagePolicy(dim, depth, num_subnets, config.policy_hidden, adapt_blocks, adapt_tokens)
            for dim, depth in zip(config.stage_dims, config.depths, strict=True)
        )
        self.heads = nn.ModuleDict(
            {
                task: TaskHead(config.stage_dims, config.decoder_width, config.num_outputs(task))
                for task in config.tasks
            }
        )
        self.head_size = (config.img_size // config.head_stride,) * 2
        # Budget to gate offset tables, filled by model_core.calibration.calibrate: "budgets"
        # and "offsets" for all tasks, and optionally "task_sets" with one table per subset.
        self.calibration: dict | None = None
        # At inference, an image whose token policy keeps at least this share of a running
        # block's tokens computes all of them (see `forward`).
        self.full_block_share = FULL_BLOCK_SHARE
        self._static_costs = self._compute_static_costs()

    # ----------------------------------------------------------------------------------------
    # Requests

    @property
    def budget_range(self) -> tuple[float, float]:
        return (self.config.min_budget, 1.0)

    def task_mask(self, tasks: TaskRequest, batch: int) -> torch.Tensor:
        """Validate a task request and return it as a (B, T) bool mask."""
        names = self.config.tasks
        if tasks is None:
            return torch.ones(batch, len(names), dtype=torch.bool)
        if isinstance(tasks, str):
            raise InvalidRequestError(f"tasks must be a list of names, got the string {tasks!r}")
        per_image = len(tasks) > 0 and not isinstance(tasks[0], str)
        requests = list(tasks) if per_image else [tasks] * batch
        if len(requests) != batch:
            raise InvalidRequestError(
                f"got {len(requests)} task lists for a batch of {batch} images"
            )
        mask = torch.zeros(batch, len(names), dtype=torch.bool)
        for row, request in enumerate(requests):
            if isinstance(request, str) or len(request) == 0:
                raise InvalidRequestError(
                    f"invalid task list {request!r}: name at least one of {list(names)}"
                )
            for name in request:
                if name not in names:
                    raise InvalidRequestError(f"unknown task {name!r}; valid tasks: {list(names)}")
                mask[row, names.index(name)] = True
        return mask

    def budget_tensor(
        self, budgets: float | Sequence[float] | torch.Tensor, batch: int
    ) -> torch.Tensor:
        """Validate budgets and return them as a (B,) float tensor."""
        low, high = self.budget_range
        if isinstance(budgets, float | int) and math.isfinite(budgets):
            # One number for the whole batch is checked in Python, which saves the several
            # small tensor operations of the checks below.
            if not low - 1e-6 <= budgets <= high + 1e-6:
                raise InvalidRequestError(
                    f"invalid budget {budgets:g}: choose a value in [{low:g}, {high:g}]"
                )
            return torch.full((batch,), min(max(float(budgets), low), high), dtype=torch.float32)
        values = torch.as_tensor(budgets, dtype=torch.float64).flatten()
        if values.numel() == 1:
            values = values.expand(batch).clone()
        if values.numel() != batch:
            raise InvalidRequestError(f"got {values.numel()} budgets for a batch of {batch} images")
        bad = ~torch.isfinite(values) | (values < low - 1e-6) | (values > high + 1e-6)
        if bool(bad.any()):
            value = float(values[bad][0])
            raise InvalidRequestError(
                f"invalid budget {value:g}: choose a value in [{low:g}, {high:g}]"
            )
        return values.clamp(low, high).float()

    def gate_offsets(
        self, budgets: torch.Tensor, task_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the calibrated gate offset for each image (0 without a calibration table).

        Args:
            budgets: (B,) requested budgets.
            task_mask: (B, T) requested tasks. An image whose task set has its own table in
                `calibration["task_sets"]` uses it, the others use the all-task table.
        """
        if self.calibration is None or self.training:
            return torch.zeros_like(budgets)
        values = budgets.detach().cpu().double().numpy()
        offsets = np.interp(values, self.calibration["budgets"], self.calibration["offsets"])
        task_tables = self.calibration.get("task_sets") or {}
        if task_mask is not None and task_tables:
            for row, mask in enumerate(task_mask.tolist()):
                key = task_set_key(
                    [t for t, wanted in zip(self.config.tasks, mask, strict=True) if wanted]
                )
                table = task_tables.get(key)
                if table is not None:
                    offsets[row] = np.interp(values[row], table["budgets"], table["offsets"])
        return torch.from_numpy(offsets).to(budgets.device, torch.float32)

    # ----------------------------------------------------------------------------------------
    # Costs

    def _compute_static_costs(self) -> dict:
        config = self.config
        encoder = self.encoder
        grid = config.img_size // 4
        costs = {"patch_embed": grid * grid * config.embed_dim * 3 * 16, "blocks": [], "merges": []}
        for stage_index, stage in enumerate(encoder.layers):
            height, width = encoder.stage_sizes[stage_index]
            dim = config.stage_dims[stage_index]
            if stage_index > 0:
                costs["merges"].append(height * width * (2 * dim) * dim)
            for block in stage.blocks:
                hidden = block.mlp.fc1.out_features
                per_token = 4 * dim * dim + 2 * dim * hidden  # qkv, projection, MLP
                area = block.window_size[0] * block.window_size[1]
                per_window = 2 * area * area * dim  # q @ k^T and attention @ v over all heads
                num_windows = (height * width) // area
                costs["blocks"].append(
                    {"tokens": height * width, "per_token": per_token, "per_window": per_window,
                     "windows": num_windows, "dim": dim}
                )  # fmt: skip
        costs["heads"] = {
            task: head.flops_per_image(encoder.stage_sizes, self.head_size)
            for task, head in self.heads.items()
        }
        costs["encoder"] = (
            costs["patch_embed"]
            + sum(costs["merges"])
            + sum(
                b["tokens"] * b["per_token"] + b["windows"] * b["per_window"]
                for b in costs["blocks"]
            )
        )
        costs["policy_parts"] = [
            (policy.block_flops_per_image(), policy.token_flops_per_image(*size))
            for policy, size in zip(self.policies, encoder.stage_sizes, strict=True)
        ]
        costs["policy"] = [block + token for block, token in costs["policy_parts"]]
        # The same numbers as tensors, built once rather than in every forward pass: a (3, L)
        # table of per-token cost, per-window cost and tokens of each block.
        costs["block_table"] = torch.tensor(
            [[c["per_token"], c["per_window"], c["tokens"]] for c in costs["blocks"]],
            dtype=torch.float64,
        ).T.contiguous()
        costs["block_dims"] = torch.tensor([b["dim"] for b in costs["blocks"]], dtype=torch.float32)
        costs["head_table"] = torch.tensor(
            [costs["heads"][t] for t in config.tasks], dtype=torch.float64
        )
        return costs

    def static_flops(self, tasks: Sequence[str] | None = None) -> float:
        """Return the multiply-accumulates of the static model for `tasks` (default: all)."""
        tasks = self.config.tasks if tasks is None else tasks
        return float(
            self._static_costs["encoder"] + sum(self._static_costs["heads"][t] for t in tasks)
        )

    def policy_flops(self) -> float:
        """Return the multiply-accumulates of all policy networks for one image.

        This is the most the policy costs. At inference a stage's token policy runs only for
        the images that run one of its blocks, so `ExecutionStats.policy_flops` can be lower.
        """
        return float(sum(self._static_costs["policy"]))

    # ----------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        images: torch.Tensor,
        budgets: float | Sequence[float] | torch.Tensor = 1.0,
        tasks: TaskRequest = None,
        *,
        random_keep: float | None = None,
        generator: torch.Generator | None = None,
        return_masks: bool = False,
        compute_outputs: bool = True,
        full_resolution: bool = True,
        head_order: Sequence[str] | None = None,
        on_output: Callable[[str, torch.Tensor], None] | None = None,
    ) -> ModelOutput:
        """Run the model.

        Args:
            images: (B, 3, S, S) normalised images, S = config.img_size.
            budgets: target fraction of the static model's FLOPs for the requested tasks, one
                value or one per image, in [config.min_budget, 1]. Images at budget 1 bypass
                the policy and run the static model.
            tasks: None (all tasks), names for the whole batch, or one list per image.
            random_keep: ablation: replace the policy with masks that keep each block and
                token with this probability (every image is then adaptive).
            generator: random generator for the Gumbel noise or the random masks.
            return_masks: fill `stats.keep_masks`.
            compute_outputs: run the heads. When False, `outputs` is empty but `stats` still
                counts the heads' FLOPs as if they ran (used by calibration).
            full_resolution: resize the outputs to the input resolution (and normalise the
                normals). False returns the heads' outputs as they are, for a caller that
                resizes them once, to its own size (as `Predictor.predict` does).
            head_order: tasks in the order their heads run, the others after them in the
                config's order. Outputs and FLOPs do not depend on it.
            on_output: called with (task, its (B, ...) output) as soon as that task's head has
                run, before the next head runs, so a caller can post-process a map on another
                thread while the remaining heads run. Rows of images that did not request the
                task are zeros.
        """
        size = self.config.img_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(
                f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}"
            )
        batch = images.shape[0]
        device = images.device
        budgets = self.budget_tensor(budgets, batch).to(device)
        task_mask = self.task_mask(tasks, batch).to(device)
        if random_keep is not None:
            adaptive = torch.ones(batch, dtype=torch.bool, device=device)
        else:
            adaptive = budgets < 1.0
        any_adaptive = bool(adaptive.any())

        costs = self._static_costs
        flops = torch.full(
            (batch,), float(costs["patch_embed"]), dtype=torch.float64, device=device
        )
        policy_flops = torch.zeros(batch, dtype=torch.float64, device=device)
        block_keep, token_keep, executed, keep_masks = [], [], [], []
        # Per block, the (B,) kept tokens and attended windows of the adaptive path. Their FLOPs
        # are added once after the last stage: per-stage arithmetic costs more than it computes
        # at batch 1.
        kept_tokens, attended_windows = [], []
        offsets = None  # (B,) gate offsets, computed at the first adaptive stage
        features = []

        x = self.encoder.patch_embed(images)  # (B, H/4, W/4, C)
        block_index = 0
        for stage_index, stage in enumerate(self.encoder.layers):
            x = stage.downsample(x)
            if stage_index > 0:
                flops += costs["merges"][stage_index - 1]
            height, width = x.shape[1:3]
            depth = len(stage.blocks)
            stage_costs = costs["blocks"][block_index : block_index + depth]
            block_index += depth
            if not any_adaptive:
                x = stage.blocks(x)
                ones = torch.ones(batch, depth, device=device)
                block_keep.append(ones)
                token_keep.append(ones)
                executed.append(ones)
                flops += sum(c["tokens"] * c["per_token"] + c["windows"] * c["per_window"]
                             for c in stage_costs)  # fmt: skip
                if return_masks:
                    all_kept = torch.ones(batch, height, width, dtype=torch.bool, device=device)
                    keep_masks.extend([all_kept] * depth)
                features.append(self.encoder.output_norm(stage_index, x))  # (B, H, W, C)
                continue

            if offsets is None:
                # Interpolated once per forward, not per stage.
                offsets = self.gate_offsets(budgets, task_mask)
            stage_blocks, stage_tokens = self._stage_masks(
                stage_index,
                x,
                budgets,
                offsets,
                task_mask,
                adaptive,
                random_keep,
                generator,
                policy_flops,
            )  # (B, depth), (B, depth, H, W)
            # All of the stage's masks at once: per-block tensor operations cost more than
            # their arithmetic at batch 1.
            stage_keep = stage_blocks.view(batch, depth, 1, 1) * stage_tokens
            stage_keep_bool = stage_keep.detach() > 0.5
            if not self.training and self.full_block_share <= 1.0:
                # Packing costs more than the dense block when it drops only a few tokens, so
                # a block that keeps nearly all of an image's tokens computes them all. The
                # masks, statistics and FLOPs then describe the full block.
                full_count = math.ceil(self.full_block_share * height * width)
                full = stage_keep_bool.sum(dim=(2, 3)) >= full_count  # (B, depth)
                stage_keep_bool = stage_keep_bool | full.view(batch, depth, 1, 1)
            # Blocks that no image of the batch runs are not entered at all.
            block_runs = [True] * depth if self.training else (stage_blocks.amax(0) > 0.5).tolist()
            for depth_index, block in enumerate(stage.blocks):
                keep_bool = stage_keep_bool[:, depth_index]
                if not block_runs[depth_index]:
                    nothing = torch.zeros(batch, dtype=torch.long, device=device)
                    kept_tokens.append(nothing)
                    attended_windows.append(nothing)
                elif self.training:
                    x = run_block_masked(block, x, stage_keep[:, depth_index])
                    kept_tokens.append(keep_bool.reshape(batch, -1).sum(1))
                    attended_windows.append(_attended_windows(block, keep_bool))
                else:
                    # Without autograd the block may write into its input: nothing reads it
                    # afterwards, and it is never the caller's tensor (patch embedding and
                    # downsampling return new ones).
                    x, packed = run_block_packed(
                        block, x, keep_bool, inplace=not torch.is_grad_enabled()
                    )
                    kept_tokens.append(packed.kept_tokens)
                    attended_windows.append(packed.attended_windows)
                if return_masks:
                    keep_masks.append(keep_bool)
            block_keep.append(stage_blocks)
            token_keep.append(stage_tokens.mean(dim=(2, 3)))
            features.append(self.encoder.output_norm(stage_index, x))  # (B, H, W, C)

        if any_adaptive:
            kept_count = torch.stack(kept_tokens, dim=1).double()  # (B, L)
            window_count = torch.stack(attended_windows, dim=1).double()
            per_token, per_window, tokens = costs["block_table"].to(device)
            flops += (kept_count * per_token + window_count * per_window).sum(1)
            executed_ratio = (kept_count / tokens).float()
        else:
            executed_ratio = torch.cat(executed, dim=1)  # (B, L)
        head_flops = task_mask.double() @ costs["head_table"].to(device)  # (B,)
        flops += head_flops

        outputs = {}
        # Heads that every image requested share one projection pass. The others run on their
        # own rows.
        shared, own_rows = [], []
        requested_by_any = task_mask.any(0).tolist()
        requested_by_all = task_mask.all(0).tolist()
        for task_index, task in enumerate(self.config.tasks):
            if not compute_outputs or not requested_by_any[task_index]:
                continue
            rows = task_mask[:, task_index]
            (shared if requested_by_all[task_index] else own_rows).append((task, rows))
        if head_order is not None:
            rank = {task: position for position, task in enumerate(head_order)}
            shared.sort(key=lambda item: rank.get(item[0], len(rank)))
            own_rows.sort(key=lambda item: rank.get(item[0], len(rank)))
        if shared:
            heads = [self.heads[task] for task, _ in shared]
            for (task, _), projected in zip(
                shared, project_stages(heads, features, self.head_size), strict=True
            ):
                out = self.heads[task].decode(projected)
                if full_resolution:
                    out = self._finish_head(task, out)
                outputs[task] = out
                if on_output is not None:
                    on_output(task, out)
        for task, rows in own_rows:
            index = rows.nonzero().squeeze(1)
            inputs = [f.index_select(0, index) for f in features]
            [projected] = project_stages([self.heads[task]], inputs, self.head_size)
            out = self.heads[task].decode(projected)
            if full_resolution:
                out = self._finish_head(task, out)
            full = out.new_zeros((rows.shape[0],) + tuple(out.shape[1:]))
            outputs[task] = full.index_copy(0, index, out)
            if on_output is not None:
                on_output(task, outputs[task])
        outputs = {task: outputs[task] for task in self.config.tasks if task in outputs}
        flops += policy_flops

        widths = costs["block_dims"].to(device)
        stage_ratio = torch.stack(
            [part.mean(1) for part in executed_ratio.split(list(self.config.depths), dim=1)], dim=1
        )
        block_keep_t = torch.cat(block_keep, dim=1)
        static = costs["encoder"] + head_flops
        stats = ExecutionStats(
            flops=flops,
            static_flops=static,
            policy_flops=policy_flops,
            budgets=budgets,
            block_keep=block_keep_t,
            token_keep=torch.cat(token_keep, dim=1),
            executed_token_ratio=executed_ratio,
            stage_token_ratio=stage_ratio,
            tokens_ratio=(executed_ratio * widths).sum(1) / widths.sum(),
            blocks_executed=(block_keep_t.detach() > 0.5).sum(1),
            keep_masks=keep_masks,
        )
        return ModelOutput(outputs=outputs, stats=stats, task_mask=task_mask)

    def _stage_masks(
        self,
        stage_index: int,
        x: torch.Tensor,
        budgets: torch.Tensor,
        offsets: torch.Tensor,
        task_mask: torch.Tensor,
        adaptive: torch.Tensor,
        random_keep: float | None,
        generator: torch.Generator | None,
        policy_flops: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (B, depth) block masks and (B, depth, H, W) token masks for one stage.

        Images that are not adaptive keep everything, and the policy runs only on the others,
        whose policy FLOPs are added to `policy_flops` in place. `offsets` are the (B,) gate
        offsets of `gate_offsets`.
        """
        batch, height, width, _ = x.shape
        depth = self.config.depths[stage_index]
        device, dtype = x.device, x.dtype
        if random_keep is not None:
            blocks = torch.ones(batch, depth, device=device, dtype=dtype)
            tokens = torch.ones(batch, depth, height, width, device=device, dtype=dtype)
            if self.adapt_blocks:
                blocks = (torch.rand(batch, depth, generator=generator) < random_keep).to(
                    device, dtype
                )
            if self.adapt_tokens:
                draw = torch.rand(batch, depth, height, width, generator=generator)
                tokens = (draw < random_keep).to(device, dtype)
            return blocks, tokens

        all_adaptive = bool(adaptive.all())
        rows = None if all_adaptive else adaptive.nonzero().squeeze(1)
        policy_input = x if all_adaptive else x.index_select(0, rows)
        row_budgets = budgets if all_adaptive else budgets.index_select(0, rows)
        row_tasks = task_mask if all_adaptive else task_mask.index_select(0, rows)
        offset = (offsets if all_adaptive else offsets.index_select(0, rows)).to(dtype)
        if self.config.policy_mode == "task_agnostic":
            row_tasks = torch.ones(row_tasks.shape[0], 1, dtype=torch.bool, device=device)

        policy = self.policies[stage_index]
        condition = policy.condition(row_budgets, dtype)
        rows_count = policy_input.shape[0]
        block_cost, token_cost = self._static_costs["policy_parts"][stage_index]
        row_cost = torch.full((rows_count,), float(block_cost), dtype=torch.float64, device=device)
        if policy.adapt_blocks:
            logits = policy.block_logits(policy_input, condition) + offset.view(-1, 1, 1)
            row_blocks = self._gate_union(logits, row_tasks, generator)  # (R, depth)
        else:
            row_blocks = torch.ones(rows_count, depth, device=device, dtype=dtype)
        if policy.adapt_tokens:
            # At inference an image's token masks matter only in the blocks it runs. Where its
            # block policy skips the whole stage, its token policy is not run, nor counted,
            # and its token masks are zeros.
            token_rows = None
            if not self.training and policy.adapt_blocks:
                runs = row_blocks.amax(dim=1) > 0.5  # (R,)
                if not bool(runs.all()):
                    token_rows = runs.nonzero().squeeze(1)
            if token_rows is None:
                logits = policy.token_logits(policy_input, condition) + offset.view(-1, 1, 1, 1, 1)
                row_tokens = self._gate_union(logits, row_tasks, generator).permute(0, 3, 1, 2)
                row_cost += token_cost
            else:
                row_tokens = torch.zeros(
                    rows_count, depth, height, width, device=device, dtype=dtype
                )
                if token_rows.numel() > 0:
                    logits = policy.token_logits(
                        policy_input.index_select(0, token_rows),
                        condition.index_select(0, token_rows),
                    ) + offset.index_select(0, token_rows).view(-1, 1, 1, 1, 1)
                    selected = self._gate_union(
                        logits, row_tasks.index_select(0, token_rows), generator
                    )
                    row_tokens.index_copy_(0, token_rows, selected.permute(0, 3, 1, 2))
                    row_cost[token_rows] += float(token_cost)
        else:
            row_tokens = torch.ones(rows_count, depth, height, width, device=device, dtype=dtype)

        if all_adaptive:
            policy_flops += row_cost
            return row_blocks, row_tokens
        policy_flops.index_add_(0, rows, row_cost)
        blocks = torch.ones(batch, depth, device=device, dtype=dtype).index_put((rows,), row_blocks)
        tokens = torch.ones(batch, depth, height, width, device=device, dtype=dtype).index_put(
            (rows,), row_tokens
        )
        return blocks, tokens

    def _gate_union(
        self, logits: torch.Tensor, tasks: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Turn (R, ..., T) per-task keep logits into the (R, ...) mask of the requested tasks.

        Training uses the straight-through Gumbel gate and the differentiable union, and
        inference the deterministic gate. Both give values 0 or 1, in float32 in training (also
        under bfloat16 autocast) and in the logits' dtype at inference.
        """
        if self.training:
            # float32 even under bfloat16 autocast, because bfloat16 would coarsen the noise
            # and the soft gate that the efficiency loss measures.
            gates = gumbel_sigmoid_gate(
                logits.float(), self.config.gumbel_temperature, True, generator
            )
            return union_over_tasks(gates, tasks)
        return any_task_keeps(logits, tasks).to(logits.dtype)

    def _finish_head(self, task: str, out: torch.Tensor) -> torch.Tensor:
        """Resize a head's output to the input resolution, as float32. Normals become unit
        vectors.

        Under bfloat16 autocast (training with --precision bf16) the low-resolution output is
        cast before the resize, not the 64 times larger map after it.
        """
        out = F.interpolate(
            out.float(), size=(self.config.img_size,) * 2, mode="bilinear", align_corners=False
        )
        if task == "normals":
            out = unit_vectors(out, eps=1e-6)
        return out


def _attended_windows(block: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """Count, per image, the windows of `block` that hold at least one kept token."""
    batch, height, width = keep.shape
    layout = window_layout(
        height, width, tuple(block.window_size), tuple(block.shift_size), keep.device
    )
    occupied = torch.zeros(batch, layout.num_windows, dtype=torch.long, device=keep.device)
    index = layout.window_of_position.expand(batch, -1)
    occupied.scatter_reduce_(1, index, keep.reshape(batch, -1).long(), reduce="amax")
    return occupied.sum(1)
