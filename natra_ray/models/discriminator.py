"""A residual discriminator (StyleGAN2's "resnet" D) with a minibatch-stddev feature."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from natra_ray.models.layers import EqualConv2d, EqualLinear
from natra_ray.models.registries import DISCRIMINATORS


class _ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = EqualConv2d(in_ch, in_ch, 3, activate=True)
        self.conv2 = EqualConv2d(in_ch, out_ch, 3, activate=True)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(self.conv2(self.conv1(x)), 2)
        skip = self.skip(F.avg_pool2d(x, 2))
        return (out + skip) / math.sqrt(2)  # keep the variance of the sum at 1


class ResDiscriminator(nn.Module):
    """image (B, C, R, R) in [-1, 1] -> realness logit (B,)."""

    def __init__(self, resolution: int = 32, img_channels: int = 1, channels: int = 64,
                 max_channels: int = 256, stddev_group: int = 4) -> None:
        super().__init__()
        log_res = int(math.log2(resolution))
        if 2 ** log_res != resolution or resolution < 8:
            raise ValueError(f"discriminator resolution must be a power of two >= 8; got {resolution}")

        def ch(res: int) -> int:  # mirror of the generator: narrow at high resolution
            return min(max_channels, channels * resolution // res)

        self.from_rgb = EqualConv2d(img_channels, ch(resolution), 1, activate=True)
        self.blocks = nn.Sequential(*[_ResBlock(ch(2 ** r), ch(2 ** (r - 1))) for r in range(log_res, 2, -1)])
        self.stddev_group = stddev_group
        self.final_conv = EqualConv2d(ch(4) + 1, ch(4), 3, activate=True)
        self.fc = nn.Sequential(EqualLinear(ch(4) * 16, ch(4), activate=True), EqualLinear(ch(4), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.from_rgb(x))  # (B, C4, 4, 4)
        # Minibatch stddev: lets D see sample diversity, which discourages mode collapse.
        b, c, hh, ww = h.shape
        g = min(self.stddev_group, b)
        while b % g:
            g -= 1
        std = h.view(g, -1, c, hh, ww).var(0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
        std = std.view(-1, 1, 1, 1).repeat(g, 1, hh, ww)
        h = self.final_conv(torch.cat([h, std], dim=1))
        return self.fc(h.flatten(1)).squeeze(1)


@DISCRIMINATORS.register("resnet")
def resnet(resolution: int = 32, img_channels: int = 1, channels: int = 64, max_channels: int = 256) -> ResDiscriminator:
    return ResDiscriminator(resolution, img_channels, channels, max_channels)
