"""Block and token policies, the Gumbel-sigmoid gate and budget conditioning.

One `StagePolicy` per encoder stage reads that stage's input tokens and returns, per task
sub-network, one keep logit per block (from pooled features) and one keep logit per token and
block. The first layer of each policy is shared by the task sub-networks, and the token policy
of a stage is shared by its blocks up to the output layer, which keeps the policy near one
percent of the encoder's FLOPs. The requested budget enters every hidden layer.

Gate: during training a Gumbel-sigmoid with a straight-through hard mask; at inference the
mask is `logit + offset > 0`, deterministic, with the offset read from the calibration table.
Task-aware union: a block or token runs if any requested task keeps it. In training it is a
sum, then a clamp to 1, with the gradient passed straight through the clamp so every task's
gate receives it. At inference `any_task_keeps` computes the gate and the union together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BUDGET_SPLITS",
    "BudgetSplit",
    "StageDecision",
    "StagePolicy",
    "any_task_keeps",
    "budget_targets",
    "gumbel_sigmoid_gate",
    "union_over_tasks",
]


@dataclass(frozen=True)
class BudgetSplit:
    """How a FLOPs budget becomes block and token keep targets for co-training.

    In stage s the block target is budget ** block_shares[s] and the token target is
    budget ** (1 - block_shares[s]), so the two multiply to the budget in every stage.

    Attributes:
        block_shares: per stage, the share of the cut (in log terms) taken by skipping whole
            blocks. Skipping tokens takes the rest.
        per_stage_blocks: compare each stage's fraction of executed blocks with that stage's
            target. When False, all blocks are compared with one target, as in AdaMTL.
        width_weights: weigh each block's token gap by its stage's embedding width, as in
            AdaMTL. When False, every block's gap weighs the same.
    """

    block_shares: tuple[float, ...]
    per_stage_blocks: bool
    width_weights: bool


BUDGET_SPLITS: dict[str, BudgetSplit] = {
    # AdaMTL's split: the same in every stage, tokens taking the larger share of the cut
    # (budget 0.5 gives 0.81 of blocks and 0.62 of tokens).
    "uniform": BudgetSplit((0.3, 0.3, 0.3, 0.3), per_stage_blocks=False, width_weights=True),
    # Cut where a CPU saves time at batch 1. A first-stage block's time falls with its kept
    # tokens, so that stage skips only tokens. A deeper block's time falls less with fewer
    # tokens (in the demo model at batch 1 its matrix products have 36 to 576 rows). So the
    # second stage takes half of its cut from whole blocks, and the last two most of it
    # (docs/benchmarks.md).
    "latency": BudgetSplit((0.0, 0.5, 0.8, 0.8), per_stage_blocks=True, width_weights=False),
}


def budget_targets(
    budget: float | torch.Tensor, depths: Sequence[int], split: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a FLOPs budget into per-block (block keep, token keep) training targets.

    Args:
        budget: requested budget, a float or a 0-d tensor; clamped to [0, 1].
        depths: blocks per stage.
        split: a key of `BUDGET_SPLITS`.

    Returns:
        Two (K,) tensors, K = sum(depths): each block's target probability of running and
        target fraction of kept tokens. Budget 1 gives ones.
    """
    if split not in BUDGET_SPLITS:
        raise ValueError(f"unknown budget split {split!r}: use one of {sorted(BUDGET_SPLITS)}")
    shares = BUDGET_SPLITS[split].block_shares
    if len(depths) != len(shares):
        raise ValueError(
            f"budget split {split!r} has {len(shares)} stages, the model {len(depths)} "
            f"(depths {list(depths)})"
        )
    budget = torch.as_tensor(budget, dtype=torch.float32).clamp(0.0, 1.0)
    share = torch.tensor(shares, dtype=torch.float32).repeat_interleave(torch.tensor(depths))
    return budget.pow(share), budget.pow(1.0 - share)


def gumbel_sigmoid_gate(
    logits: torch.Tensor,
    temperature: float,
    training: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn keep logits into a binary mask.

    Args:
        logits: keep logits of any shape.
        temperature: Gumbel-sigmoid temperature (training only).
        training: add logistic noise and return hard values with the soft gradient; when False,
            return `(logits > 0)` as floats, deterministic.
        generator: random generator for the noise.

    Returns:
        Mask of the same shape with values 0 or 1.
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    uniform = torch.rand(
        logits.shape, generator=generator, device=logits.device, dtype=logits.dtype
    )
    uniform = uniform.clamp(1e-6, 1.0 - 1e-6)
    noise = torch.log(uniform) - torch.log1p(-uniform)  # difference of two Gumbel samples
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (soft > 0.5).to(logits.dtype)
    return hard + soft - soft.detach()


def union_over_tasks(masks: torch.Tensor, task_mask: torch.Tensor) -> torch.Tensor:
    """Combine per-task masks: keep where any requested task keeps.

    Args:
        masks: (B, ..., T) per-task masks with values 0 or 1.
        task_mask: (B, T) bool, the tasks each image requests.

    Returns:
        (B, ...) mask. Its value is clamp(sum, 1); its gradient is that of the sum.
    """
    shape = (task_mask.shape[0],) + (1,) * (masks.dim() - 2) + (task_mask.shape[1],)
    total = (masks * task_mask.view(shape).to(masks.dtype)).sum(-1)
    return total.clamp(max=1.0).detach() + total - total.detach()


def any_task_keeps(logits: torch.Tensor, task_mask: torch.Tensor) -> torch.Tensor:
    """Inference gate and union in one: keep where any requested task's logit is positive.

    Gives the same mask as `union_over_tasks(gumbel_sigmoid_gate(logits, ..., training=False),
    task_mask)` in three tensor operations instead of about ten. That matters at batch 1, where
    each operation's fixed cost exceeds its arithmetic.

    Args:
        logits: (B, ..., T) per-task keep logits, gate offsets included.
        task_mask: (B, T) bool, the tasks each image requests.

    Returns:
        (B, ...) bool mask.
    """
    shape = (task_mask.shape[0],) + (1,) * (logits.dim() - 2) + (task_mask.shape[1],)
    return ((logits > 0) & task_mask.view(shape)).any(-1)


@dataclass
class StageDecision:
    """Per-task keep logits of one stage.

    Attributes:
        block_logits: (B, depth, T).
        token_logits: (B, H, W, depth, T).
    """

    block_logits: torch.Tensor | None
    token_logits: torch.Tensor | None


class StagePolicy(nn.Module):
    """Block and token policy of one stage; NHWC input.

    Args:
        dim: channels of the stage's tokens.
        depth: blocks in the stage.
        num_subnets: task sub-networks (1 in task-agnostic mode).
        hidden: hidden width.
        adapt_blocks: emit block logits.
        adapt_tokens: emit token logits.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_subnets: int,
        hidden: int,
        adapt_blocks: bool = True,
        adapt_tokens: bool = True,
    ):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.num_subnets = num_subnets
        self.hidden = hidden
        self.adapt_blocks = adapt_blocks
        self.adapt_tokens = adapt_tokens
        self.act = nn.GELU()
        if adapt_blocks:
            self.block_in = nn.Linear(dim, hidden)
            self.block_budget = nn.Linear(1, hidden)
            self.block_out = nn.Linear(hidden, depth * num_subnets)
        if adapt_tokens:
            self.token_in = nn.Linear(dim, hidden)
            self.token_budget = nn.Linear(1, hidden)
            self.token_out = nn.Linear(hidden, depth * num_subnets)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A positive output bias makes an untrained policy keep most work (sigmoid(3) ~ 0.95).
        for name in ("block_out", "token_out"):
            layer = getattr(self, name, None)
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.constant_(layer.bias, 3.0)

    def forward(self, x: torch.Tensor, budgets: torch.Tensor) -> StageDecision:
        """Compute keep logits from the stage input.

        Args:
            x: (B, H, W, C) stage input.
            budgets: (B,) requested budgets.
        """
        condition = self.condition(budgets, x.dtype).view(x.shape[0], 1)
        return StageDecision(
            block_logits=self.block_logits(x, condition) if self.adapt_blocks else None,
            token_logits=self.token_logits(x, condition) if self.adapt_tokens else None,
        )

    def condition(self, budgets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Return the (B, 1) budget input of the hidden layers."""
        return (budgets.to(dtype) - 0.5).view(-1, 1)

    def block_logits(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Return (B, depth, T) block keep logits of the (B, H, W, C) stage input."""
        pooled = x.mean(dim=(1, 2))  # (B, C)
        hidden = self.act(self.block_in(pooled) + self.block_budget(condition))
        return self.block_out(hidden).view(x.shape[0], self.depth, self.num_subnets)

    def token_logits(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Return (B, H, W, depth, T) token keep logits of the (B, H, W, C) stage input."""
        batch, height, width, _ = x.shape
        budget_term = self.token_budget(condition).view(batch, 1, 1, self.hidden)
        hidden = self.act(self.token_in(x) + budget_term)  # (B, H, W, hidden)
        return self.token_out(hidden).view(batch, height, width, self.depth, self.num_subnets)

    def flops_per_image(self, height: int, width: int) -> int:
        """Return the multiply-accumulates of one forward pass for one image."""
        return self.block_flops_per_image() + self.token_flops_per_image(height, width)

    def block_flops_per_image(self) -> int:
        """Return the multiply-accumulates of the block policy for one image (0 if absent)."""
        if not self.adapt_blocks:
            return 0
        return self.dim * self.hidden + self.hidden + self.hidden * self.depth * self.num_subnets

    def token_flops_per_image(self, height: int, width: int) -> int:
        """Return the multiply-accumulates of the token policy for one image (0 if absent)."""
        if not self.adapt_tokens:
            return 0
        outputs = self.depth * self.num_subnets
        return height * width * (self.dim * self.hidden + self.hidden * outputs) + self.hidden
