"""Per-task multi-scale fusing layers and two-convolution decoders (NCHW).

Each task projects the four stage outputs to `width` channels at their own resolution, resizes
them to the head resolution (input / head_stride), concatenates, fuses them with a 1x1
convolution and one residual block, and decodes with two convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TaskHead", "project_stages", "unit_vectors"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + x, inplace=True)


class TaskHead(nn.Module):
    """Fusing layer and decoder of one task.

    Args:
        stage_dims: channels of the four stage outputs.
        width: channels of the fused feature map.
        out_channels: channels of the task's output map.
    """

    def __init__(self, stage_dims: Sequence[int], width: int, out_channels: int):
        super().__init__()
        self.stage_dims = tuple(stage_dims)
        self.width = width
        self.out_channels = out_channels
        self.projections = nn.ModuleList(nn.Conv2d(dim, width, 1, bias=False) for dim in stage_dims)
        self.fuse = _conv_bn_relu(width * len(stage_dims), width, 1)
        self.residual = ResidualBlock(width)
        self.decoder = nn.Sequential(
            _conv_bn_relu(width, width, 3),
            nn.Conv2d(width, out_channels, 1),
        )

    def forward(self, features: Sequence[torch.Tensor], head_size: tuple[int, int]) -> torch.Tensor:
        """Decode one task's output map.

        Args:
            features: four (B, C_i, H_i, W_i) stage outputs.
            head_size: (H, W) of the fused map.

        Returns:
            (B, out_channels, H, W) output at head resolution.
        """
        projected = []
        for feature, projection in zip(features, self.projections, strict=True):
            feature = projection(feature)
            if feature.shape[-2:] != head_size:
                feature = F.interpolate(
                    feature, size=head_size, mode="bilinear", align_corners=False
                )
            projected.append(feature)
        return self.decode(projected)

    def decode(self, projected: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse and decode the four projected maps, each (B, width, H, W) at head resolution."""
        fused = self.fuse(torch.cat(list(projected), dim=1))
        return self.decoder(self.residual(fused))

    def flops_per_image(
        self, stage_sizes: Sequence[tuple[int, int]], head_size: tuple[int, int]
    ) -> int:
        """Return the multiply-accumulates of one forward pass for one image."""
        total = 0
        for (height, width), dim in zip(stage_sizes, self.stage_dims, strict=True):
            total += height * width * dim * self.width
        pixels = head_size[0] * head_size[1]
        total += pixels * self.width * len(self.stage_dims) * self.width  # 1x1 fuse
        total += 3 * pixels * self.width * self.width * 9  # residual block and first decoder conv
        total += pixels * self.width * self.out_channels  # output conv
        return total


def project_stages(
    heads: Sequence[TaskHead], features: Sequence[torch.Tensor], head_size: tuple[int, int]
) -> list[list[torch.Tensor]]:
    """Project and resize the stage outputs for several heads at once.

    Computes what each head's `forward` computes before `decode`: its 1x1 projection of every
    stage output, resized bilinearly to `head_size`. The heads' projection weights of a stage
    are stacked into one matrix that multiplies the channels-last stage output, and the
    result is resized once for all heads. This gives the same values as the per-head
    convolutions (resizing is linear per channel, so it commutes with the projection) with
    one matrix product and one resize per stage instead of one of each per head.

    Args:
        heads: the heads to project for.
        features: four (B, H_i, W_i, C_i) stage outputs, channels last.
        head_size: (H, W) of the fused maps.

    Returns:
        One list per head of four (B, width, H, W) maps, ready for `TaskHead.decode`.
    """
    widths = [head.width for head in heads]
    per_stage = []
    for stage_index, feature in enumerate(features):
        weight = torch.cat([head.projections[stage_index].weight.flatten(1) for head in heads])
        projected = F.linear(feature, weight).permute(0, 3, 1, 2)  # (B, sum(widths), H_i, W_i)
        if projected.shape[-2:] != head_size:
            projected = F.interpolate(
                projected, size=head_size, mode="bilinear", align_corners=False
            )
        per_stage.append(projected.split(widths, dim=1))
    return [[stage[index] for stage in per_stage] for index in range(len(heads))]


def unit_vectors(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide x by the L2 norm of its dim-1 vectors, floored at `eps`, as `F.normalize` does.

    torch's norm kernel reduces slowly over a short channel dimension of a contiguous NCHW
    tensor: normalising a (1, 3, 480, 640) map took about 25 ms on one CPU thread, this about
    2.6 ms. The floor is applied to the squared norm, so the gradient stays finite at 0.
    """
    return x * x.square().sum(dim=1, keepdim=True).clamp_min(eps * eps).rsqrt()
