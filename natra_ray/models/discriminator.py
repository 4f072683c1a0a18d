"""Discriminators: StyleGAN2's residual D, and a strided one for small CPU budgets.

Both end in the same head: a minibatch-stddev feature, a 3x3 conv and two linear layers.
"""
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


class _Discriminator(nn.Module):
    """image (B, C, R, R) in [-1, 1] -> realness logit (B,). Subclasses build their layers,
    then call ``_build_head`` (which keeps the parameter order, and so saved optimiser states,
    as it was), and implement ``body`` (image -> (B, ch(4), 4, 4) features)."""

    def __init__(self, resolution: int, channels: int, max_channels: int, stddev_group: int) -> None:
        super().__init__()
        log_res = int(math.log2(resolution))
        if 2 ** log_res != resolution or resolution < 8:
            raise ValueError(f"discriminator resolution must be a power of two >= 8; got {resolution}")
        self.resolution, self.log_res = resolution, log_res
        self._channels, self._max_channels = channels, max_channels
        self.stddev_group = stddev_group

    def _build_head(self) -> None:
        self.final_conv = EqualConv2d(self.ch(4) + 1, self.ch(4), 3, activate=True)
        self.fc = nn.Sequential(EqualLinear(self.ch(4) * 16, self.ch(4), activate=True), EqualLinear(self.ch(4), 1))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ch(self, res: int) -> int:
        """Channels at resolution ``res``: mirror of the generator, narrow at high resolution."""
        return min(self._max_channels, self._channels * self.resolution // res)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, C4, 4, 4)
        # Minibatch stddev: lets D see sample diversity, which discourages mode collapse.
        b, c, hh, ww = h.shape
        g = min(self.stddev_group, b)
        while b % g:
            g -= 1
        std = h.view(g, -1, c, hh, ww).var(0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
        std = std.view(-1, 1, 1, 1).repeat(g, 1, hh, ww)
        h = self.final_conv(torch.cat([h, std], dim=1))
        return self.fc(h.flatten(1)).squeeze(1)


class ResDiscriminator(_Discriminator):
    """StyleGAN2's "resnet" D: two 3x3 convs and an average-pooled skip per resolution."""

    def __init__(self, resolution: int = 32, img_channels: int = 1, channels: int = 64,
                 max_channels: int = 256, stddev_group: int = 4) -> None:
        super().__init__(resolution, channels, max_channels, stddev_group)
        ch = self.ch
        self.from_rgb = EqualConv2d(img_channels, ch(resolution), 1, activate=True)
        self.blocks = nn.Sequential(*[_ResBlock(ch(2 ** r), ch(2 ** (r - 1))) for r in range(self.log_res, 2, -1)])
        self._build_head()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.from_rgb(x))


class StridedDiscriminator(_Discriminator):
    """DCGAN's shape with StyleGAN's parts: a 3x3 conv at full resolution, then one stride-2
    3x3 conv per halving (equalized lr, leaky ReLU), then the shared head.

    Each conv runs at its *output* resolution, so at 32 px with 16 channels a forward pass is
    ~4x fewer multiply-adds than the residual D (measured: a whole GAN step 1.9x faster on
    2 CPU cores). On the ``cpu`` profile's fixed time budget that buys twice the images seen,
    which matters more there than the residual D's capacity (docs/results/cpu_gan.md).
    """

    def __init__(self, resolution: int = 32, img_channels: int = 1, channels: int = 64,
                 max_channels: int = 256, stddev_group: int = 4) -> None:
        super().__init__(resolution, channels, max_channels, stddev_group)
        ch = self.ch
        layers = [EqualConv2d(img_channels, ch(resolution), 3, activate=True)]
        layers += [EqualConv2d(ch(2 ** r), ch(2 ** (r - 1)), 3, activate=True, stride=2)
                   for r in range(self.log_res, 2, -1)]
        self.convs = nn.Sequential(*layers)
        self._build_head()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


@DISCRIMINATORS.register("resnet")
def resnet(resolution: int = 32, img_channels: int = 1, channels: int = 64, max_channels: int = 256) -> ResDiscriminator:
    return ResDiscriminator(resolution, img_channels, channels, max_channels)


@DISCRIMINATORS.register("strided")
def strided(resolution: int = 32, img_channels: int = 1, channels: int = 64, max_channels: int = 256) -> StridedDiscriminator:
    return StridedDiscriminator(resolution, img_channels, channels, max_channels)
