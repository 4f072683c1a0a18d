"""Encoders from images to W+ (trained by BIES, NaTra Sec. 3.2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from natra_ray.models.registries import ENCODERS


class _Block(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1)
        self.norm1 = nn.GroupNorm(min(8, out_ch), out_ch)
        self.norm2 = nn.GroupNorm(min(8, out_ch), out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm1(self.conv1(x)), 0.2)
        h = F.leaky_relu(self.norm2(self.conv2(h)), 0.2)
        return F.avg_pool2d(h + self.skip(x), 2)


class ResEncoder(nn.Module):
    """image (B, C, R, R) in [0, 1] -> w+ (B, num_ws, w_dim), predicted as an offset from
    ``w_avg`` (starting at the average image makes early BIES steps well conditioned)."""

    def __init__(self, resolution: int = 32, img_channels: int = 1, num_ws: int = 8, w_dim: int = 128,
                 channels: int = 32, max_channels: int = 256) -> None:
        super().__init__()
        n_down = int(math.log2(resolution)) - 2  # down to 4x4
        chs = [min(max_channels, channels * 2 ** i) for i in range(n_down + 1)]
        self.stem = nn.Conv2d(img_channels, chs[0], 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(chs[i], chs[i + 1]) for i in range(n_down)])
        self.num_ws, self.w_dim = num_ws, w_dim
        self.head = nn.Linear(chs[-1] * 16, num_ws * w_dim)
        nn.init.zeros_(self.head.weight)  # start exactly at w_avg
        nn.init.zeros_(self.head.bias)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x * 2 - 1))  # (B, C, 4, 4)
        delta = self.head(h.flatten(1)).view(-1, self.num_ws, self.w_dim)
        return self.w_avg + delta


@ENCODERS.register("resnet")
def resnet(resolution: int = 32, img_channels: int = 1, num_ws: int = 8, w_dim: int = 128,
           channels: int = 32, max_channels: int = 256) -> ResEncoder:
    return ResEncoder(resolution, img_channels, num_ws, w_dim, channels, max_channels)
