"""Equalized-learning-rate layers shared by the generator, discriminator and encoder.

StyleGAN scales weights by 1/sqrt(fan_in) at run time instead of at init, so Adam's
per-parameter step sizes act equally on every layer (Karras et al. 2018, Sec. 4.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_GAIN = math.sqrt(2.0)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU with the gain that keeps activations unit-variance."""
    return F.leaky_relu(x, 0.2) * LRELU_GAIN


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mult: float = 1.0,
                 activate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mult / math.sqrt(in_dim)
        self.lr_mult = lr_mult
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mult)
        return lrelu(out) if self.activate else out


class EqualConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, activate: bool = False,
                 stride: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.padding = kernel // 2
        self.stride = stride
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding, stride=self.stride)
        return lrelu(out) if self.activate else out


UPSAMPLE_MODES = ("bilinear", "transpose")


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution: the style scales input channels, then demodulation
    renormalises each output channel (replacing AdaIN's instance norm, no droplet artifacts)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, demodulate: bool = True,
                 upsample: bool = False, upsample_mode: str = "bilinear") -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.kernel = in_ch, out_ch, kernel
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel, kernel))
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)  # style starts at 1 = identity
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsample_mode {upsample_mode!r}; known: {', '.join(UPSAMPLE_MODES)}")
        self.transposed = upsample and upsample_mode == "transpose"
        if self.transposed and kernel != 4:
            raise ValueError(f"the transposed upsampling conv needs kernel 4 (even overlap, no "
                             f"checkerboard); got {kernel}")

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # x: (B, in, H, W), w: (B, w_dim)
        # Modulate the activations rather than the weights: scaling input channels by the style
        # and output channels by the demodulation coefficient is the same operation as the
        # per-sample weight (StyleGAN2-ADA's non-fused path), but it is one ordinary batched
        # convolution instead of a grouped one, which is ~3x faster on CPU.
        style = self.affine(w)  # (B, in)
        weight = self.scale * self.weight[0]  # (out, in, k, k)
        x = x * style[:, :, None, None]
        if self.transposed:
            # 2x upsampling fused with the conv, as in DCGAN (StyleGAN2 does the same with a 3x3
            # kernel and a blur): a stride-2 transposed 4x4 conv runs at the *input* resolution,
            # ~4x fewer multiply-adds than interpolating first, and its taps overlap evenly (no
            # checkerboard, so no blur needed).
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2, padding=1)
        else:
            if self.upsample:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            out = F.conv2d(x, weight, padding=self.kernel // 2)
        if self.demodulate:
            # sum_{in,k,k} (W * s)^2 = s^2 @ sum_{k,k} W^2  -> (B, out)
            demod = torch.rsqrt(style.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t() + 1e-8)
            if self.transposed:
                demod = demod * 2.0  # each output pixel sees 2x2 of the 4x4 taps: 1/4 the variance
            out = out * demod[:, :, None, None]
        return out
