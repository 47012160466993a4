"""Block and token policies, the Gumbel-sigmoid gate and budget conditioning.

One `StagePolicy` per encoder stage reads that stage's input tokens and returns, per task
sub-network, one keep logit per block (from pooled features) and one keep logit per token and
block. The first layer of each policy is shared by the task sub-networks, and the token policy
of a stage is shared by its blocks up to the output layer, which keeps the policy near one
percent of the encoder's FLOPs. The requested budget enters every hidden layer.

Gate: during training a Gumbel-sigmoid with a straight-through hard mask; at inference the
mask is `logit + offset > 0`, deterministic, with the offset read from the calibration table.
Task-aware union: a block or token runs if any requested task keeps it (sum, then clamp to 1,
with the gradient passed straight through the clamp so every task's gate receives it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "StageDecision",
    "StagePolicy",
    "budget_targets",
    "gumbel_sigmoid_gate",
    "union_over_tasks",
]


def budget_targets(budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a FLOPs budget into (block keep ratio, token keep ratio) training targets.

    The encoder's cost scales with blocks kept times tokens kept, so the two targets multiply
    to the budget; tokens take the larger share of the cut (budget 0.5 gives 0.81 of blocks
    and 0.62 of tokens). Budget 1 gives 1 for both.
    """
    budget = budget.clamp(0.0, 1.0)
    return budget.pow(0.3), budget.pow(0.7)


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
        batch, height, width, _ = x.shape
        condition = (budgets.to(x.dtype) - 0.5).view(batch, 1)  # (B, 1)
        block_logits = token_logits = None
        if self.adapt_blocks:
            pooled = x.mean(dim=(1, 2))  # (B, C)
            hidden = self.act(self.block_in(pooled) + self.block_budget(condition))
            block_logits = self.block_out(hidden).view(batch, self.depth, self.num_subnets)
        if self.adapt_tokens:
            budget_term = self.token_budget(condition).view(batch, 1, 1, self.hidden)
            hidden = self.act(self.token_in(x) + budget_term)  # (B, H, W, hidden)
            token_logits = self.token_out(hidden).view(
                batch, height, width, self.depth, self.num_subnets
            )
        return StageDecision(block_logits=block_logits, token_logits=token_logits)

    def flops_per_image(self, height: int, width: int) -> int:
        """Return the multiply-accumulates of one forward pass for one image."""
        outputs = self.depth * self.num_subnets
        total = 0
        if self.adapt_blocks:
            total += self.dim * self.hidden + self.hidden + self.hidden * outputs
        if self.adapt_tokens:
            total += height * width * (self.dim * self.hidden + self.hidden * outputs) + self.hidden
        return total
