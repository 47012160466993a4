"""Budget splits (the per-block training targets of co-training) and the inference gate."""

import pytest
import torch

from model_core.policy import any_task_keeps, budget_targets, gumbel_sigmoid_gate, union_over_tasks

DEPTHS = (2, 2, 2, 2)


@pytest.mark.parametrize(
    ("split", "budget", "blocks", "tokens"),
    [
        ("uniform", 0.5, [0.812] * 4, [0.616] * 4),
        ("latency", 0.4, [1.0, 0.632, 0.481, 0.481], [0.4, 0.632, 0.833, 0.833]),
        ("latency", 1.0, [1.0] * 4, [1.0] * 4),
    ],
)
def test_budget_targets_by_stage(split, budget, blocks, tokens):
    block_targets, token_targets = budget_targets(budget, DEPTHS, split)
    # One target per block, the same for the two blocks of a stage.
    expected_blocks = torch.tensor(blocks).repeat_interleave(2)
    expected_tokens = torch.tensor(tokens).repeat_interleave(2)
    torch.testing.assert_close(block_targets, expected_blocks, atol=1e-3, rtol=0)
    torch.testing.assert_close(token_targets, expected_tokens, atol=1e-3, rtol=0)
    torch.testing.assert_close(block_targets * token_targets, torch.full((8,), budget))


def test_budget_targets_clamps_the_budget():
    blocks, tokens = budget_targets(1.5, DEPTHS, "latency")
    assert torch.equal(blocks, torch.ones(8))
    assert torch.equal(tokens, torch.ones(8))


def test_budget_targets_invalid_arguments():
    with pytest.raises(ValueError, match="unknown budget split 'fast'"):
        budget_targets(0.5, DEPTHS, "fast")
    with pytest.raises(ValueError, match="has 4 stages, the model 3"):
        budget_targets(0.5, (2, 2, 2), "latency")


@pytest.mark.parametrize("shape", [(3, 2), (3, 4, 4, 2)])
def test_inference_gate_matches_union(shape):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, 4, generator=generator)
    logits[0, ..., 1] = 0.0  # exactly on the threshold: not kept
    task_mask = torch.tensor([[True, True, False, False], [False, False, False, True], [True] * 4])
    expected = union_over_tasks(gumbel_sigmoid_gate(logits, 1.0, training=False), task_mask)
    got = any_task_keeps(logits, task_mask)
    assert got.dtype == torch.bool
    assert torch.equal(got, expected.bool())
