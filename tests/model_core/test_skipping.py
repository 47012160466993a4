import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock

from model_core.skipping import (
    _relative_position_bias,
    _window_attention,
    exclude_other_regions_exactly,
    run_block_masked,
    run_block_packed,
    use_exact_shift_mask,
    window_layout,
)


def make_block(shift: int, seed: int = 0) -> SwinTransformerBlock:
    torch.manual_seed(seed)
    block = SwinTransformerBlock(
        dim=16, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=shift
    )
    return block.eval()


@pytest.mark.parametrize("shift", [0, 2])
def test_all_kept_equals_timm_block(shift):
    block = make_block(shift)
    x = torch.randn(3, 8, 8, 16)
    keep = torch.ones(3, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        packed, stats = run_block_packed(block, x, keep)
        reference = block(x)
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-5)
    assert stats.kept_tokens.tolist() == [64, 64, 64]
    assert stats.attended_windows.tolist() == [4, 4, 4]


@pytest.mark.parametrize("shift", [0, 2])
def test_skipped_tokens_pass_through_unchanged(shift):
    block = make_block(shift)
    x = torch.randn(2, 8, 8, 16)
    keep = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        out, _ = run_block_packed(block, x, keep)
    assert torch.equal(out[~keep], x[~keep])
    assert not torch.allclose(out[keep], x[keep])


def test_skipped_block_leaves_sample_unchanged():
    block = make_block(2)
    x = torch.randn(2, 8, 8, 16)
    keep = torch.ones(2, 8, 8, dtype=torch.bool)
    keep[1] = False
    with torch.no_grad():
        out, stats = run_block_packed(block, x, keep)
        alone = block(x[:1])
    assert torch.equal(out[1], x[1])
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)
    assert stats.kept_tokens.tolist() == [64, 0]
    assert stats.attended_windows.tolist() == [4, 0]


@pytest.mark.parametrize("shift", [0, 2])
def test_skipped_tokens_are_not_keys_or_values(shift):
    block = make_block(shift)
    x = torch.randn(1, 8, 8, 16)
    keep = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(5)) < 0.6
    perturbed = x.clone()
    perturbed[~keep] = torch.randn(int((~keep).sum()), 16) * 10
    with torch.no_grad():
        out, _ = run_block_packed(block, x, keep)
        out_perturbed, _ = run_block_packed(block, perturbed, keep)
    torch.testing.assert_close(out[keep], out_perturbed[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
def test_masked_path_matches_packed_path(shift):
    block = make_block(shift)
    x = torch.randn(2, 8, 8, 16)
    keep = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(11)) < 0.4
    keep[1] = False
    with torch.no_grad():
        packed, _ = run_block_packed(block, x, keep)
        masked = run_block_masked(block, x, keep.float())
    torch.testing.assert_close(masked, packed, atol=1e-5, rtol=1e-5)


def test_masked_path_passes_gradient_to_mask():
    block = make_block(2)
    x = torch.randn(1, 8, 8, 16)
    mask = torch.ones(1, 8, 8, requires_grad=True)
    run_block_masked(block, x, mask).square().sum().backward()
    assert mask.grad is not None
    assert mask.grad.abs().sum() > 0


def test_exact_shift_mask_no_subnormal_weights():
    block = make_block(2)
    timm_mask = block.attn_mask.clone()  # (windows, A, A), 0 or -100
    scores = 0.1 * torch.randn(timm_mask.shape, generator=torch.Generator().manual_seed(2))
    tiny = torch.finfo(torch.float32).tiny

    def smallest_weight(mask):
        weights = (scores + mask).softmax(-1)
        return float(weights[weights != 0].min())

    # timm's -100 leaves weights near exp(-100), below the smallest normal float.
    assert smallest_weight(timm_mask) < tiny
    exact = exclude_other_regions_exactly(timm_mask)
    assert smallest_weight(exact) >= tiny
    assert set(exact.unique().tolist()) == {0.0, float("-inf")}
    # Every query keeps its own region, so no row of the softmax is empty.
    assert bool((exact.diagonal(dim1=1, dim2=2) == 0).all())


def test_exact_shift_mask_keeps_output():
    block = make_block(2)
    x = torch.randn(2, 8, 8, 16)
    keep = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(4)) < 0.7
    with torch.no_grad():
        dense, packed = block(x), run_block_packed(block, x, keep)[0]
        use_exact_shift_mask(block)
        assert torch.isinf(block.attn_mask).any()
        assert "attn_mask" not in block.state_dict()
        torch.testing.assert_close(block(x), dense, atol=1e-6, rtol=1e-6)
        exact_packed = run_block_packed(block, x, keep)[0]
    torch.testing.assert_close(exact_packed, packed, atol=1e-6, rtol=1e-6)


def test_window_layout_matches_timm_partition():
    layout = window_layout(8, 8, (4, 4), (2, 2), torch.device("cpu"))
    positions = torch.arange(64, dtype=torch.float32).view(1, 8, 8, 1)
    shifted = torch.roll(positions, shifts=(-2, -2), dims=(1, 2))
    windows = shifted.view(1, 2, 4, 2, 4, 1).permute(0, 1, 3, 2, 4, 5).reshape(4, 16)
    for position in range(64):
        window = int(layout.window_of_position[position])
        slot = int(layout.slot_of_position[position])
        assert windows[window, slot] == position


def test_window_layout_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not a multiple of window"):
        window_layout(10, 8, (4, 4), (0, 0), torch.device("cpu"))


@pytest.mark.parametrize("shift", [0, 2])
def test_packed_bias_table_edits_and_gradients(shift):
    block = make_block(shift)
    x = torch.randn(2, 8, 8, 16)
    keep = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(5)) < 0.6
    table = block.attn.relative_position_bias_table
    with torch.no_grad():
        before, _ = run_block_packed(block, x, keep)
        # An in-place edit through .data, as exponential moving averages of weights do.
        table.data.add_(1.0 + torch.randn_like(table))
        after, _ = run_block_packed(block, x, keep)
    assert not torch.allclose(before[keep], after[keep])

    # With autograd on, an eval-mode packed block passes gradients to the bias table.
    out, _ = run_block_packed(block, x, keep)
    out[keep].square().sum().backward()
    assert table.grad is not None and bool(table.grad.abs().sum() > 0)


def test_relative_position_bias_equals_timm():
    block = make_block(2)
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    assert torch.equal(_relative_position_bias(block.attn), block.attn._get_rel_pos_bias())


def _attention_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Return q, k, v of shape (N, heads, A, hd) and a bias that masks keys 4 to 8."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 5, 2, 9, 8, generator=generator).unbind(0)  # (N, heads, A, hd)
    bias = torch.randn(5, 2, 9, 9, generator=generator)
    bias[:, :, :, 4:] = float("-inf")  # empty slots, as in a packed window
    return tuple(t.to(dtype) for t in (q, k, v, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_attention_equals_sdpa(dtype):
    q, k, v, bias = _attention_inputs(dtype)
    with torch.no_grad():
        explicit = _window_attention(q, k, v, bias, 8**-0.5)
        reference = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=bias.float()
        )
    assert explicit.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(explicit.float(), reference, atol=tolerance, rtol=tolerance)


def test_window_attention_bfloat16_gradients_match_sdpa():
    # bfloat16 inputs with gradients (training under autocast) take the explicit form.
    q, k, v, bias = _attention_inputs(torch.float32)
    q_explicit = q.to(torch.bfloat16).requires_grad_()
    q_reference = q.clone().requires_grad_()
    explicit = _window_attention(q_explicit, k.bfloat16(), v.bfloat16(), bias.bfloat16(), 8**-0.5)
    explicit.float().square().sum().backward()
    F.scaled_dot_product_attention(q_reference, k, v, attn_mask=bias).square().sum().backward()
    assert q_explicit.grad is not None
    torch.testing.assert_close(q_explicit.grad.float(), q_reference.grad, atol=5e-2, rtol=5e-2)
