"""The generator interface every NaTra stage talks to, and a StyleGAN2-style implementation.

Layer bookkeeping (32 px example, ``num_layers = 7``, ``num_ws = 8``)::

    layer 0: 4x4 conv          <- ws[:, 0]
    layer 1: 8x8 up-conv       <- ws[:, 1]     layer 2: 8x8 conv   <- ws[:, 2]
    layer 3: 16x16 up-conv     <- ws[:, 3]     layer 4: 16x16 conv <- ws[:, 4]
    layer 5: 32x32 up-conv     <- ws[:, 5]     layer 6: 32x32 conv <- ws[:, 6]
    to_rgb                     <- ws[:, 7]

so ``num_ws = 2 * log2(resolution) - 2`` exactly as in StyleGAN (18 at 1024 px). The split at
layer ``l`` (LCE, NaTra Sec. 3.3): ``head(ws, l)`` runs layers ``0..l-1`` and returns the
feature map ``g_h^l``; ``rest(feat, ws, l)`` runs layers ``l..`` plus to_rgb (``g_r^l``), so
``rest(head(ws, l), ws, l) == synthesis(ws)`` for every l.

Images leave the generator in [-1, 1]; ``to_unit`` maps them to the [0, 1] the data and
classifiers use. Noise inputs are left out on purpose: inversion and latent attacks need a
deterministic decoder, and at 32 px they add little.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch
from torch import nn

from natra_ray.models.layers import EqualLinear, ModulatedConv2d, lrelu
from natra_ray.models.registries import GENERATORS


def to_unit(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] generator output -> [0, 1] image."""
    return (img.clamp(-1, 1) + 1) * 0.5


def from_unit(img: torch.Tensor) -> torch.Tensor:
    """[0, 1] image -> [-1, 1] generator range."""
    return img * 2 - 1


def num_style_inputs(resolution: int) -> int:
    """``num_ws`` of the style generator at ``resolution``: one per layer plus to_rgb. A pure
    function so the search space can check layer ranges without building a generator."""
    return 2 * int(math.log2(resolution)) - 2


class Generator(nn.Module):
    """The interface (GANSpace's model wrapper idea): stages use only these members."""

    z_dim: int
    w_dim: int
    num_layers: int
    num_ws: int
    resolution: int
    img_channels: int

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = self.w_avg.device
        return torch.randn(n, self.z_dim, generator=generator, device="cpu").to(dev)

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """(B, w_dim) -> (B, num_ws, w_dim); W+ input passes through."""
        return w.unsqueeze(1).repeat(1, self.num_ws, 1) if w.dim() == 2 else w

    def ws_of_layers(self, start: int, end: int) -> slice:
        """The style inputs (indices into ws) that feed layers start..end inclusive."""
        if not (0 <= start <= end < self.num_ws):
            raise ValueError(
                f"layer range {start}..{end} is invalid for a generator with {self.num_ws} style "
                f"inputs (valid: 0 <= start <= end <= {self.num_ws - 1})"
            )
        return slice(start, end + 1)

    def activations(self, ws: torch.Tensor, layers: Iterable[int]) -> Dict[int, torch.Tensor]:
        """Feature maps after each requested layer (``head(ws, l + 1)``), one pass."""
        wanted = sorted(set(layers))
        ws = self.broadcast(ws)
        out: Dict[int, torch.Tensor] = {}
        feat = self.head(ws, 0)
        for l in range(self.num_layers):
            feat = self.run_layers(feat, ws, l, l + 1)
            if l in wanted:
                out[l] = feat
            if l >= wanted[-1]:
                break
        return out

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        return self.synthesis(self.mapping(z, truncation_psi))

    # Implementations provide: mapping, synthesis, head, rest, run_layers, layer_shape, w_avg.


class StyleGenerator(Generator):
    """Mapping MLP z -> w, then modulated convolutions from a learned 4x4 constant."""

    def __init__(self, resolution: int = 32, img_channels: int = 1, z_dim: int = 128, w_dim: int = 128,
                 mapping_layers: int = 4, channels: int = 128, min_channels: int = 16,
                 mapping_lr_mult: float = 0.01, upsample: str = "bilinear") -> None:
        super().__init__()
        log_res = int(math.log2(resolution))
        if 2 ** log_res != resolution or resolution < 8:
            raise ValueError(f"generator resolution must be a power of two >= 8; got {resolution}")
        self.resolution, self.img_channels = resolution, img_channels
        self.z_dim, self.w_dim = z_dim, w_dim
        self.num_layers = 1 + 2 * (log_res - 2)
        self.num_ws = num_style_inputs(resolution)  # num_layers + 1

        layers = [EqualLinear(z_dim if i == 0 else w_dim, w_dim, lr_mult=mapping_lr_mult, activate=True)
                  for i in range(mapping_layers)]
        self.mapping_net = nn.Sequential(*layers)
        self.register_buffer("w_avg", torch.zeros(w_dim))

        def ch(res: int) -> int:  # full width up to 8x8, then halve per doubling
            return max(min_channels, min(channels, channels * 8 // res))

        self.const = nn.Parameter(torch.randn(1, ch(4), 4, 4))
        convs = [ModulatedConv2d(ch(4), ch(4), 3, w_dim)]
        self._shapes = [(ch(4), 4, 4)]  # shape after each layer
        for lr in range(3, log_res + 1):
            res = 2 ** lr
            convs.append(ModulatedConv2d(ch(res // 2), ch(res), 4 if upsample == "transpose" else 3,
                                         w_dim, upsample=True, upsample_mode=upsample))
            convs.append(ModulatedConv2d(ch(res), ch(res), 3, w_dim))
            self._shapes += [(ch(res), res, res)] * 2
        self.convs = nn.ModuleList(convs)
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(1, s[0], 1, 1)) for s in self._shapes])
        self.to_rgb = ModulatedConv2d(ch(resolution), img_channels, 1, w_dim, demodulate=False)
        self.rgb_bias = nn.Parameter(torch.zeros(1, img_channels, 1, 1))

    # ---- latent side
    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """z (B, z_dim) -> w (B, w_dim); pixel-norm first, truncation toward w_avg."""
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        w = self.mapping_net(z)
        if truncation_psi != 1.0:
            w = self.w_avg + truncation_psi * (w - self.w_avg)
        return w

    # ---- synthesis side
    def layer_shape(self, l: int) -> Tuple[int, int, int]:
        """(C, H, W) of ``head(ws, l)``: the input of layer l (the 4x4 constant for l = 0)."""
        if not 0 <= l <= self.num_layers:
            raise ValueError(f"layer {l} out of range 0..{self.num_layers}")
        return tuple(self.const.shape[1:]) if l == 0 else self._shapes[l - 1]

    def run_layers(self, feat: torch.Tensor, ws: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Apply layers start..end-1 to ``feat``; ws is (B, num_ws, w_dim)."""
        for l in range(start, end):
            feat = lrelu(self.convs[l](feat, ws[:, l]) + self.biases[l])
        return feat

    def head(self, ws: torch.Tensor, l: int) -> torch.Tensor:
        """g_h^l: layers 0..l-1 -> feature map (B, C_l, H_l, W_l)."""
        if not 0 <= l <= self.num_layers:
            raise ValueError(f"split layer {l} out of range 0..{self.num_layers}")
        ws = self.broadcast(ws)
        feat = self.const.expand(ws.shape[0], -1, -1, -1)
        return self.run_layers(feat, ws, 0, l)

    def rest(self, feat: torch.Tensor, ws: torch.Tensor, l: int) -> torch.Tensor:
        """g_r^l: layers l.. and to_rgb -> image (B, C, H, W) in [-1, 1] (not clamped)."""
        if not 0 <= l <= self.num_layers:
            raise ValueError(f"split layer {l} out of range 0..{self.num_layers}")
        ws = self.broadcast(ws)
        feat = self.run_layers(feat, ws, l, self.num_layers)
        return self.to_rgb(feat, ws[:, self.num_layers]) + self.rgb_bias

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        """w (B, w_dim) or w+ (B, num_ws, w_dim) -> image (B, C, H, W)."""
        ws = self.broadcast(ws)
        if ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be (B, {self.num_ws}, {self.w_dim}); got {tuple(ws.shape)}")
        return self.rest(self.head(ws, 0), ws, 0)


@GENERATORS.register("style")
def style(resolution: int = 32, img_channels: int = 1, z_dim: int = 128, w_dim: int = 128,
          mapping_layers: int = 4, channels: int = 128, min_channels: int = 16,
          mapping_lr_mult: float = 0.01, upsample: str = "bilinear") -> StyleGenerator:
    """StyleGAN2-style generator; sizes come from the ``gan`` config section. ``upsample``:
    "bilinear" (interpolate, then a 3x3 conv at the new resolution) or "transpose" (a stride-2
    4x4 transposed conv at the old resolution: ~half the generator's multiply-adds)."""
    return StyleGenerator(resolution, img_channels, z_dim, w_dim, mapping_layers, channels,
                          min_channels, mapping_lr_mult, upsample)


@GENERATORS.register("style_tiny")
def style_tiny(resolution: int = 32, img_channels: int = 1, upsample: str = "bilinear",
               **_ignored: object) -> StyleGenerator:
    """A few thousand parameters: makes every later stage testable on CPU in seconds."""
    return StyleGenerator(resolution, img_channels, z_dim=16, w_dim=16, mapping_layers=2,
                          channels=16, min_channels=8, upsample=upsample)
