"""Swin Transformer encoder assembled from timm's modules, with timm's parameter names.

`SwinEncoder` keeps timm's `patch_embed`, `layers` and `norm` modules under the same names as
`timm.models.swin_transformer.SwinTransformer`, so an ImageNet checkpoint of timm or of the
original Swin release loads into it (`load_backbone_weights`). The adaptive execution of its
blocks lives in `model_core.model` and `model_core.skipping`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from torch import nn

from model_core.presets import ModelConfig
from model_core.skipping import use_exact_shift_mask

__all__ = ["BackboneWeightsError", "SwinEncoder", "load_backbone_weights"]


class BackboneWeightsError(ValueError):
    """A backbone weights file is missing, unreadable or does not match the encoder."""


class SwinEncoder(nn.Module):
    """Patch embedding, four Swin stages and output norms; NHWC inside the stages.

    Attributes:
        patch_embed: timm PatchEmbed producing (B, H/4, W/4, C).
        layers: timm SwinTransformerStage modules; stage i > 0 starts with patch merging.
        norm: timm's final LayerNorm, applied to the last stage output.
        out_norms: LayerNorms of the first three stage outputs (not in ImageNet checkpoints).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        swin = SwinTransformer(
            img_size=config.img_size,
            patch_size=4,
            in_chans=3,
            num_classes=0,
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            mlp_ratio=config.mlp_ratio,
            drop_rate=0.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
        )
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        self.norm = swin.norm
        self.out_norms = nn.ModuleList(nn.LayerNorm(dim) for dim in config.stage_dims[:-1])
        grid = config.img_size // 4
        self.stage_sizes: list[tuple[int, int]] = [(grid >> i, grid >> i) for i in range(4)]
        for stage, size in zip(self.layers, self.stage_sizes, strict=True):
            for block in stage.blocks:
                assert tuple(block.input_resolution) == size, (block.input_resolution, size)
                use_exact_shift_mask(block)

    def output_norm(self, stage_index: int, x: torch.Tensor) -> torch.Tensor:
        """Normalise stage `stage_index`'s (B, H, W, C) output."""
        if stage_index == len(self.layers) - 1:
            return self.norm(x)
        return self.out_norms[stage_index](x)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means an unusable file
        raise BackboneWeightsError(
            f"cannot read backbone weights {path} ({type(error).__name__}: {error}); check that "
            "it is a complete .safetensors, .pth or .bin file of a Swin state dict"
        ) from error
    if not isinstance(state, dict):
        raise BackboneWeightsError(
            f"invalid backbone weights {path}: found a {type(state).__name__}, "
            "expected a state dict"
        )
    return state


def load_backbone_weights(encoder: SwinEncoder, path: str | Path) -> None:
    """Load ImageNet Swin weights (timm or original Swin release layout) into `encoder`.

    Accepts `.safetensors`, or `.pth`/`.bin` files read with `weights_only=True`. The
    classifier head is dropped; `out_norms` keep their initial values.

    Raises:
        BackboneWeightsError: naming the file and the missing, unexpected or mismatched keys.
    """
    path = Path(path)
    state = checkpoint_filter_fn(_read_state_dict(path), encoder)
    state = {k: v for k, v in state.items() if not k.startswith("head")}
    expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith("out_norms.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise BackboneWeightsError(
            f"backbone weights {path} do not match the encoder: "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; "
            f"shape mismatches {mismatched[:10]}. Check that the preset matches the checkpoint "
            "(embed dim, depths, heads, window size)."
        )
    encoder.load_state_dict(state, strict=False)
