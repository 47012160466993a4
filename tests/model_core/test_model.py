import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from model_core.model import AdaMTL, InvalidRequestError
from model_core.presets import TASKS, get_preset, preset_names
from tests.model_core.conftest import make_images, make_model


def static_reference(model: AdaMTL, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the same weights through timm's own stage forward and the heads, with no policy."""
    encoder = model.encoder
    x = encoder.patch_embed(images)
    features = []
    for index, stage in enumerate(encoder.layers):
        x = stage(x)
        features.append(encoder.output_norm(index, x).permute(0, 3, 1, 2))
    outputs = {}
    for task, head in model.heads.items():
        out = F.interpolate(
            head(features, model.head_size), size=images.shape[-2:], mode="bilinear"
        )
        outputs[task] = F.normalize(out, dim=1, eps=1e-6) if task == "normals" else out
    return outputs


def test_budget_one_equals_static_model(calibrated_model):
    images = make_images(2)
    with torch.no_grad():
        adaptive = calibrated_model(images, 1.0)
        reference = static_reference(calibrated_model, images)
        all_kept = calibrated_model(images, 1.0, random_keep=1.0)
    for task in TASKS:
        torch.testing.assert_close(adaptive.outputs[task], reference[task], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(all_kept.outputs[task], reference[task], atol=1e-4, rtol=1e-4)
    assert torch.equal(adaptive.stats.flops, adaptive.stats.static_flops)
    assert adaptive.stats.blocks_executed.tolist() == [8, 8]


def test_batch_equals_one_by_one(calibrated_model):
    images = make_images(4, seed=3)
    budgets = [0.3, 0.7, 1.0, 0.5]
    tasks = [["semseg"], ["saliency", "normals"], list(TASKS), ["human_parts", "semseg"]]
    with torch.no_grad():
        batched = calibrated_model(images, budgets, tasks, return_masks=True)
        singles = [
            calibrated_model(images[i : i + 1], budgets[i], [tasks[i]], return_masks=True)
            for i in range(4)
        ]
    for index, single in enumerate(singles):
        assert set(single.outputs) == set(tasks[index])
        for task in tasks[index]:
            torch.testing.assert_close(
                batched.outputs[task][index], single.outputs[task][0], atol=1e-4, rtol=1e-4
            )
        for block, mask in enumerate(single.stats.keep_masks):
            assert torch.equal(batched.stats.keep_masks[block][index], mask[0]), (index, block)
        assert batched.stats.flops[index].item() == pytest.approx(single.stats.flops[0].item())
        assert batched.stats.static_flops[index].item() == single.stats.static_flops[0].item()
    # The images of the batch really took different paths.
    masks = batched.stats.keep_masks[1]
    assert not torch.equal(masks[0], masks[1])
    assert len(set(batched.stats.flops.tolist())) == 4


def test_rows_without_task_are_zero(calibrated_model):
    images = make_images(2)
    with torch.no_grad():
        out = calibrated_model(images, 0.5, [["semseg"], ["saliency"]])
    assert set(out.outputs) == {"semseg", "saliency"}
    assert out.outputs["semseg"][1].abs().sum() == 0
    assert out.outputs["saliency"][0].abs().sum() == 0


def test_eval_is_deterministic_across_calls_and_seeds(calibrated_model):
    images = make_images(3)
    with torch.no_grad():
        torch.manual_seed(0)
        first = calibrated_model(images, 0.5, return_masks=True)
        torch.manual_seed(123)
        second = calibrated_model(images, 0.5, return_masks=True)
    for task in TASKS:
        assert torch.equal(first.outputs[task], second.outputs[task])
    assert torch.equal(first.stats.flops, second.stats.flops)
    for a, b in zip(first.stats.keep_masks, second.stats.keep_masks, strict=True):
        assert torch.equal(a, b)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


# FlopCounterMode has no formula for the CPU flash-attention kernel that SDPA dispatches to,
# so the test adds the standard SDPA formula for it explicitly.
_CUSTOM_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@pytest.mark.parametrize("budget", [1.0, 0.9, 0.5, 0.3])
def test_reported_flops_match_counted_flops(calibrated_model, budget):
    images = make_images(3, seed=5)
    with (
        torch.no_grad(),
        FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS) as counter,
    ):
        out = calibrated_model(images, budget)
    counted_macs = counter.get_total_flops() / 2  # the counter counts 2 FLOPs per MAC
    reported = out.stats.flops.sum().item()
    assert reported == pytest.approx(counted_macs, rel=0.01)


def test_reported_flops_match_counted_flops_with_task_subsets(calibrated_model):
    images = make_images(3, seed=6)
    tasks = [["semseg"], ["normals", "saliency"], list(TASKS)]
    with (
        torch.no_grad(),
        FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS) as counter,
    ):
        out = calibrated_model(images, [0.5, 1.0, 0.7], tasks)
    assert out.stats.flops.sum().item() == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


def test_nearly_full_blocks_compute_every_token():
    model = make_model()
    images = make_images(3, seed=8)
    with torch.no_grad():
        model.full_block_share = 1.01  # never round up
        policy = model(images, 0.5, return_masks=True)
        model.full_block_share = 0.6
        rounded = model(images, 0.5, return_masks=True)
        with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS) as counter:
            model(images, 0.5)
    # The first stage's inputs do not depend on the rule, so its policy masks are the same.
    first_stage = model.config.depths[0]
    changed = 0
    before_masks = policy.stats.keep_masks[:first_stage]
    after_masks = rounded.stats.keep_masks[:first_stage]
    for block, (before, after) in enumerate(zip(before_masks, after_masks, strict=True)):
        for image in range(3):
            share = before[image].float().mean().item()
            if share >= 0.6:
                assert bool(after[image].all()), (block, image)
                changed += int(share < 1.0)
            else:
                assert torch.equal(after[image], before[image]), (block, image)
    assert changed > 0
    executed = rounded.stats.executed_token_ratio
    assert bool(((executed < 0.6) | (executed == 1.0)).all())
    assert bool((rounded.stats.flops > policy.stats.flops).any())
    counted_macs = counter.get_total_flops() / 2
    assert rounded.stats.flops.sum().item() == pytest.approx(counted_macs, rel=0.01)


def _policy_counted_macs(counter: FlopCounterMode, stage: int) -> float:
    prefix = f"AdaMTL.policies.{stage}."
    counts = counter.get_flop_counts()
    return sum(sum(ops.values()) for name, ops in counts.items() if name.startswith(prefix)) / 2


def test_skipped_stage_skips_token_policy():
    model = make_model()  # uncalibrated: every gate offset is 0
    stage = 1
    policy = model.policies[stage]
    # Block logits that follow the budget alone: every block of the stage is skipped at budget
    # 0.3 and runs at 0.9, for any image.
    with torch.no_grad():
        policy.block_in.weight.zero_()
        policy.block_in.bias.zero_()
        policy.block_budget.weight.fill_(10.0)
        policy.block_budget.bias.zero_()
        policy.block_out.weight.fill_(1.0)
        policy.block_out.bias.fill_(-1.0)
    images = make_images(2, seed=3)
    budgets = [0.3, 0.9]
    with (
        torch.no_grad(),
        FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS) as counter,
    ):
        out = model(images, budgets)
    first = sum(model.config.depths[:stage])
    blocks = out.stats.block_keep[:, first : first + model.config.depths[stage]]
    assert torch.all(blocks[0] == 0)
    assert torch.all(blocks[1] == 1)
    assert torch.all(out.stats.token_keep[0, first : first + model.config.depths[stage]] == 0)

    height, width = model.encoder.stage_sizes[stage]
    block_cost = policy.block_flops_per_image()
    token_cost = policy.token_flops_per_image(height, width)
    assert token_cost > 0
    # Both images ran the block policy, only the second the token policy.
    assert _policy_counted_macs(counter, stage) == 2 * block_cost + token_cost
    assert out.stats.flops.sum().item() == pytest.approx(counter.get_total_flops() / 2, rel=0.01)

    # Each image alone reports the same work and outputs as in the batch.
    for index, budget in enumerate(budgets):
        with torch.no_grad():
            alone = model(images[index : index + 1], budget)
        assert alone.stats.policy_flops[0] == out.stats.policy_flops[index]
        assert alone.stats.flops[0] == out.stats.flops[index]
        for task, value in alone.outputs.items():
            torch.testing.assert_close(value[0], out.outputs[task][index], atol=1e-4, rtol=1e-4)
    assert out.stats.policy_flops[1] - out.stats.policy_flops[0] == token_cost


def test_flops_fall_with_budget(calibrated_model):
    images = make_images(6, seed=9)
    means = []
    with torch.no_grad():
        for budget in (1.0, 0.9, 0.7, 0.5, 0.3):
            means.append(calibrated_model(images, budget).stats.flops.mean().item())
    assert means == sorted(means, reverse=True)
    assert means[-1] < 0.6 * means[0]


def test_fewer_tasks_cost_fewer_flops(calibrated_model):
    images = make_images(2)
    with torch.no_grad():
        all_tasks = calibrated_model(images, 0.7).stats.flops
        two_tasks = calibrated_model(images, 0.7, ["semseg", "normals"]).stats.flops
        one_task = calibrated_model(images, 0.7, ["semseg"]).stats.flops
    assert torch.all(two_tasks < all_tasks)
    assert torch.all(one_task < two_tasks)
    static_all = calibrated_model.static_flops()
    assert calibrated_model.static_flops(["semseg"]) < static_all


def test_gradients_reach_every_policy_subnetwork():
    model = make_model(seed=2).train()
    images = make_images(2)
    out = model(images, 0.5, generator=torch.Generator().manual_seed(0))
    loss = sum(o.float().square().mean() for o in out.outputs.values())
    loss = loss + out.stats.token_keep.mean() + out.stats.block_keep.mean()
    loss.backward()
    num_tasks = len(model.config.tasks)
    for stage, policy in enumerate(model.policies):
        for name in ("block_out", "token_out"):
            grad = getattr(policy, name).weight.grad.view(policy.depth, num_tasks, -1)
            for task in range(num_tasks):
                assert grad[:, task].abs().sum() > 0, (stage, name, model.config.tasks[task])


def test_training_forward_uses_gumbel_noise():
    model = make_model(seed=2).train()
    images = make_images(1)
    first = model(images, 0.5, generator=torch.Generator().manual_seed(0)).stats.token_keep
    second = model(images, 0.5, generator=torch.Generator().manual_seed(1)).stats.token_keep
    assert not torch.equal(first, second)


def test_task_agnostic_policy_ignores_task_choice():
    model = make_model(policy_mode="task_agnostic")
    images = make_images(2)
    with torch.no_grad():
        one = model(images, 0.5, ["semseg"], return_masks=True)
        all_tasks = model(images, 0.5, return_masks=True)
    for a, b in zip(one.stats.keep_masks, all_tasks.stats.keep_masks, strict=True):
        assert torch.equal(a, b)
    assert model.policies[0].token_out.out_features == model.config.depths[0]


@pytest.mark.parametrize(
    ("adapt_blocks", "adapt_tokens"), [(True, False), (False, True)], ids=["blocks", "tokens"]
)
def test_single_axis_ablations(adapt_blocks, adapt_tokens):
    torch.manual_seed(0)
    model = AdaMTL(get_preset("tiny"), adapt_blocks=adapt_blocks, adapt_tokens=adapt_tokens).eval()
    with torch.no_grad():
        out = model(
            make_images(2), 0.5, random_keep=0.5, generator=torch.Generator().manual_seed(4)
        )
    if adapt_blocks:
        assert torch.all(out.stats.token_keep == 1)
        assert torch.any(out.stats.block_keep == 0)
    else:
        assert torch.all(out.stats.block_keep == 1)
        assert torch.any(out.stats.token_keep < 1)


@pytest.mark.parametrize("budget", [0.1, 1.5, float("nan")])
def test_invalid_budget_names_range(budget):
    model = make_model()
    with pytest.raises(
        InvalidRequestError, match=r"invalid budget .* choose a value in \[0.3, 1\]"
    ):
        model(make_images(1), budget)


def test_unknown_task_lists_valid_tasks():
    model = make_model()
    with pytest.raises(InvalidRequestError, match="unknown task 'depth'; valid tasks"):
        model(make_images(1), 1.0, ["depth"])


def test_wrong_image_size_rejected():
    model = make_model()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\)"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_with_small_policy(name):
    torch.manual_seed(0)
    model = AdaMTL(get_preset(name))
    assert model.policy_flops() <= 0.03 * model.static_flops()
    assert model.static_flops(["semseg"]) < model.static_flops()


def test_encoder_shift_masks_are_exact():
    model = make_model()
    images = make_images(2)
    shifted = [b for stage in model.encoder.layers for b in stage.blocks if any(b.shift_size)]
    assert shifted
    with torch.no_grad():
        exact = model(images, 1.0).outputs
        for block in shifted:
            assert set(block.attn_mask.unique().tolist()) == {0.0, float("-inf")}
            block.attn_mask = block.get_attn_mask()  # timm's own mask, -100 across regions
        with_timm_masks = model(images, 1.0).outputs
    for task, output in exact.items():
        torch.testing.assert_close(output, with_timm_masks[task], atol=1e-5, rtol=1e-5)


def test_swin_t_encoder_flops_match_swin_paper():
    model = AdaMTL(get_preset("swin-t"))
    # The Swin-T classifier costs 4.5 GMACs at 224 px; the encoder here drops only its head.
    assert model._static_costs["encoder"] / 1e9 == pytest.approx(4.49, abs=0.01)


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_small_presets_run_forward(name):
    torch.manual_seed(0)
    config = get_preset(name)
    model = AdaMTL(config).eval()
    images = torch.randn(1, 3, config.img_size, config.img_size)
    with torch.no_grad():
        out = model(images, 0.6)
    assert out.outputs["semseg"].shape == (
        1,
        len(config.classes["semseg"]),
        config.img_size,
        config.img_size,
    )
    norms = out.outputs["normals"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)
