"""Token skipping inside Swin windows, as pure functions over timm's `SwinTransformerBlock`.

Two execution paths share one semantics: a skipped token passes through the block unchanged
and is not used as a key or value by the kept tokens of its window.

- `run_block_packed` (inference) gathers the kept tokens of the whole batch into one
  `(K, C)` matrix, so norms, qkv, projection and MLP cost scales with K. Window attention
  runs only over windows that hold at least one kept token, with empty slots masked.
- `run_block_masked` (training) computes every token densely and multiplies both residual
  updates by the keep mask, so gradients reach the policy through a straight-through gate.

Layouts: block inputs and outputs are NHWC `(B, H, W, C)`; keep masks are `(B, H, W)`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse

__all__ = [
    "PackedBlockStats",
    "WindowLayout",
    "exclude_other_regions_exactly",
    "run_block_masked",
    "run_block_packed",
    "use_exact_shift_mask",
    "window_layout",
]


@dataclass(frozen=True)
class WindowLayout:
    """Window and slot of every spatial position after the block's cyclic shift.

    Attributes:
        window_of_position: (H * W,) window index in timm's `window_partition` order.
        slot_of_position: (H * W,) row-major position inside that window.
        num_windows: windows per image.
        window_area: tokens per window.
    """

    window_of_position: torch.Tensor
    slot_of_position: torch.Tensor
    num_windows: int
    window_area: int


@functools.lru_cache(maxsize=64)
def window_layout(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> WindowLayout:
    """Build the cached position -> (window, slot) table for one block geometry."""
    win_h, win_w = window
    if height % win_h or width % win_w:
        raise ValueError(
            f"feature map {height}x{width} is not a multiple of window {win_h}x{win_w}; "
            "choose an input size whose stage resolutions divide by the window size"
        )
    rows = torch.arange(height, device=device).view(-1, 1).expand(height, width)
    cols = torch.arange(width, device=device).view(1, -1).expand(height, width)
    # timm rolls by -shift, so the token at (r, c) lands at ((r - shift) mod H, (c - shift) mod W).
    rows = (rows - shift[0]) % height
    cols = (cols - shift[1]) % width
    window = (rows // win_h) * (width // win_w) + cols // win_w
    slot = (rows % win_h) * win_w + cols % win_w
    return WindowLayout(
        window_of_position=window.reshape(-1).contiguous(),
        slot_of_position=slot.reshape(-1).contiguous(),
        num_windows=(height // win_h) * (width // win_w),
        window_area=win_h * win_w,
    )


@dataclass
class PackedBlockStats:
    """Work done by one packed block, per image.

    Attributes:
        kept_tokens: (B,) tokens computed.
        attended_windows: (B,) windows that held at least one kept token.
    """

    kept_tokens: torch.Tensor
    attended_windows: torch.Tensor


def exclude_other_regions_exactly(mask: torch.Tensor) -> torch.Tensor:
    """Return a shifted-window mask with -inf where timm's has -100.

    timm separates the regions that the cyclic shift brings into one window by adding -100 to
    the attention scores. The softmax then gives those pairs weights near exp(-100), about
    4e-44: subnormal floats, which x86 CPUs process many times more slowly than normal ones.
    In the demo model's first shifted block, the product of those weights with the values
    took about 11 times as long as in the unshifted block before it. Each shifted block took
    1.7 to 2.1 times as long as with -inf (docs/benchmarks.md). With -inf the weights
    are exactly 0, and each query still attends to its own region, which includes itself, so
    no row of the softmax is empty.
    """
    return mask.masked_fill(mask < 0, float("-inf"))


def use_exact_shift_mask(block: SwinTransformerBlock) -> None:
    """Replace the stored shift mask of a timm block with `exclude_other_regions_exactly`'s.

    The buffer stays non-persistent, so checkpoints do not change.
    """
    if any(block.shift_size) and block.attn_mask is not None:
        block.attn_mask = exclude_other_regions_exactly(block.attn_mask)


def _shift_mask(block: SwinTransformerBlock) -> torch.Tensor | None:
    # timm stores the (num_windows, A, A) shift mask as a buffer, or builds it per call.
    if not any(block.shift_size):
        return None
    if getattr(block, "dynamic_mask", False) or block.attn_mask is None:
        mask = block.get_attn_mask(device=block.norm1.weight.device, dtype=block.norm1.weight.dtype)
        return exclude_other_regions_exactly(mask)
    return block.attn_mask


def _relative_position_bias(attn: torch.nn.Module) -> torch.Tensor:
    """Return timm's (1, heads, A, A) relative position bias of `attn`, in fewer operations.

    Built on every call, as timm does, so that it follows any change of the bias table and
    passes gradients to it. Gathering straight into the (heads, A * A) layout takes one
    indexing operation where timm's takes an index, a permute and a copy.
    """
    area = attn.window_area
    index = attn.relative_position_index.view(-1)
    bias = attn.relative_position_bias_table.t().index_select(1, index)  # (heads, A * A)
    return bias.view(1, -1, area, area)


def _window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """Compute softmax(scale * q @ k^T + bias) @ v within each window.

    q, k, v: (N, heads, A, hd); bias: (N, heads, A, A), finite or -inf. Returns (N, heads, A,
    hd), equal to `F.scaled_dot_product_attention` to float rounding.

    On the CPU this runs baddbmm, softmax and bmm, because on a 2-core CPU with windows of 36
    tokens SDPA took about three times as long in the forward pass, and eight times as long
    for forward and backward under bfloat16 autocast (docs/benchmarks.md). Float32 with
    gradients keeps SDPA, whose backward was faster in the second and third stages. Other
    devices keep SDPA too, since they were not measured.
    """
    if q.device.type != "cpu" or (q.dtype == torch.float32 and q.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    windows, heads, area, head_dim = q.shape
    scores = torch.baddbmm(
        bias.reshape(windows * heads, area, area),
        q.reshape(windows * heads, area, head_dim),
        k.reshape(windows * heads, area, head_dim).transpose(1, 2),
        alpha=scale,
    )
    probs = scores.softmax(dim=-1)
    return torch.bmm(probs, v.reshape(windows * heads, area, head_dim)).view(q.shape)


@functools.lru_cache(maxsize=64)
def _batch_layout(
    batch: int, height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window of the whole batch, and slot, of every flat (B * H * W) token index."""
    layout = window_layout(height, width, window, shift, device)
    offsets = torch.arange(batch, device=device).view(-1, 1) * layout.num_windows
    global_window = (offsets + layout.window_of_position.view(1, -1)).reshape(-1)
    return global_window.contiguous(), layout.slot_of_position.repeat(batch)


def run_block_packed(
    block: SwinTransformerBlock, x: torch.Tensor, keep: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, PackedBlockStats]:
    """Run `block` on the kept tokens only; skipped tokens are copied through unchanged.

    Args:
        block: a timm Swin block in eval mode (dropout and drop-path are not applied).
        x: (B, H, W, C) block input.
        keep: (B, H, W) bool, True where the token is computed. A sample whose block is
            skipped keeps no token.
        inplace: write the kept tokens' results into `x` instead of a copy of it, which saves
            copying the whole feature map. Only without autograd, and only when the caller
            no longer needs its input.

    Returns:
        The (B, H, W, C) block output and the per-image work done.
    """
    batch, height, width, channels = x.shape
    attn = block.attn
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    num_windows = (height // window[0]) * (width // window[1])
    area = window[0] * window[1]

    flat = x.reshape(batch * height * width, channels)  # (B*H*W, C)
    keep_index = keep.reshape(-1).nonzero().squeeze(1)  # (K,)
    kept_per_image = keep.reshape(batch, -1).sum(1)
    if keep_index.numel() == 0:
        zeros = torch.zeros(batch, dtype=torch.long, device=x.device)
        return x, PackedBlockStats(kept_tokens=kept_per_image, attended_windows=zeros)
    if keep_index.numel() == keep.numel():
        # Every token of every image is kept: timm's dense forward does the same work without
        # the packing bookkeeping.
        windows = torch.full((batch,), num_windows, dtype=torch.long, device=x.device)
        return block(x), PackedBlockStats(kept_tokens=kept_per_image, attended_windows=windows)

    window_table, slot_table = _batch_layout(batch, height, width, window, shift, x.device)
    global_window = window_table.index_select(0, keep_index)  # (K,)
    slot = slot_table.index_select(0, keep_index)  # (K,)

    # Compact the occupied windows without sorting: a cumulative sum numbers them in order.
    occupied = torch.zeros(batch * num_windows, dtype=torch.long, device=x.device)
    occupied.index_fill_(0, global_window, 1)
    compact = occupied.cumsum(0) - 1  # (B*nW,)
    occupied_ids = occupied.nonzero().squeeze(1)  # (U,)
    num_occupied = occupied_ids.numel()
    # Row of each kept token in the (U * A) matrix of occupied window slots.
    dense_row = compact.index_select(0, global_window) * area + slot  # (K,)

    kept = flat.index_select(0, keep_index)  # (K, C)
    qkv = attn.qkv(block.norm1(kept))  # (K, 3C)
    dense_qkv = qkv.new_zeros(num_occupied * area, qkv.shape[1]).index_copy_(0, dense_row, qkv)
    # Additive key mask: 0 for kept tokens, -inf for empty slots, which no query attends to.
    key_mask = torch.full((num_occupied * area,), float("-inf"), dtype=qkv.dtype, device=x.device)
    key_mask.index_fill_(0, dense_row, 0.0)

    q, k, v = dense_qkv.view(num_occupied, area, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    bias = _relative_position_bias(attn)  # (1, heads, A, A)
    shift_mask = _shift_mask(block)
    if shift_mask is not None:
        local_window = occupied_ids % num_windows  # (U,)
        bias = bias + shift_mask.index_select(0, local_window).unsqueeze(1)  # (U, heads, A, A)
    bias = bias + key_mask.view(num_occupied, 1, 1, area)  # (U, heads, A, A)
    attended = _window_attention(q, k, v, bias, attn.scale)  # (U, heads, A, hd)
    attended = attended.transpose(1, 2).reshape(num_occupied * area, -1)  # (U*A, C)
    attended = attn.proj(attended.index_select(0, dense_row))  # (K, C)

    kept = kept + attended
    kept = kept + block.mlp(block.norm2(kept))
    target = flat if inplace else flat.clone()
    out = target.index_copy_(0, keep_index, kept).view(batch, height, width, channels)
    windows_per_image = occupied.view(batch, num_windows).sum(1)
    return out, PackedBlockStats(kept_tokens=kept_per_image, attended_windows=windows_per_image)


def run_block_masked(
    block: SwinTransformerBlock, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Run `block` densely with the semantics of `run_block_packed`, differentiably.

    Args:
        block: a timm Swin block.
        x: (B, H, W, C) block input.
        mask: (B, H, W) keep mask with values 0 or 1 (straight-through gate output).

    Returns:
        (B, H, W, C): x plus the residual updates multiplied by the mask.
    """
    batch, height, width, channels = x.shape
    attn = block.attn
    window = tuple(block.window_size)
    shift = tuple(block.shift_size)
    area = window[0] * window[1]

    hidden = block.norm1(x)
    keys = mask.detach() > 0.5
    if any(shift):
        hidden = torch.roll(hidden, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        keys = torch.roll(keys, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = window_partition(hidden, window).view(-1, area, channels)  # (B*nW, A, C)
    key_valid = window_partition(keys.unsqueeze(-1), window).view(-1, area)  # (B*nW, A)
    num_windows = windows.shape[0] // batch

    qkv = attn.qkv(windows).view(windows.shape[0], area, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B*nW, heads, A, hd)
    bias = _relative_position_bias(attn)  # (1, heads, A, A)
    shift_mask = _shift_mask(block)
    if shift_mask is not None:
        bias = bias + shift_mask.repeat(batch, 1, 1).unsqueeze(1)  # (B*nW, heads, A, A)
    # A skipped query attends to itself, so no softmax row is empty. Its output is discarded.
    allowed = key_valid[:, None, None, :] | torch.eye(area, dtype=torch.bool, device=x.device)
    bias = bias.expand(windows.shape[0], attn.num_heads, area, area).masked_fill(
        ~allowed, float("-inf")
    )
    attended = _window_attention(q, k, v, bias, attn.scale)
    attended = attn.proj(attended.transpose(1, 2).reshape(batch * num_windows, area, channels))
    attended = window_reverse(
        attended.view(-1, window[0], window[1], channels), window, height, width
    )
    if any(shift):
        attended = torch.roll(attended, shifts=shift, dims=(1, 2))

    gate = mask.unsqueeze(-1).to(x.dtype)  # (B, H, W, 1)
    x = x + gate * attended
    x = x + gate * block.mlp(block.norm2(x))
    return x
