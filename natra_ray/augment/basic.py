"""Methods that need neither a generator nor an attack: ``none`` (the paper's "Original") and
``classic``, the hand-designed augmentation most users train with today.

``classic`` is a per-image random affine warp (rotation, zoom, horizontal shear, translation)
followed by brightness and contrast jitter, every parameter drawn uniformly within the
``robust.classic_*`` ranges from ``ctx.generator``. It replaces the clean batch (as a data
loader's transform would); labels stay hard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from natra_ray.augment import METHODS, AugmentContext, Augmented, Batch, Needs, one_hot
from natra_ray.config import RobustConfig
from natra_ray.data.corruptions import affine_transform


@METHODS.register("none", needs=Needs())
def none(ctx: AugmentContext, batch: Batch) -> Augmented:
    """"Original" in the paper's tables: the clean batch, hard labels."""
    return Augmented(batch.x, one_hot(batch.y, ctx.num_classes))


# --------------------------------------------------------------------------- classic
@dataclass
class ClassicParams:
    """Per-image parameters of one classic augmentation, each of shape (B,) (translate: (B, 2))."""

    angle_deg: Tensor  # counter-clockwise as displayed (y axis pointing down)
    scale: Tensor  # > 1 zooms in
    shear_deg: Tensor  # horizontal shear angle
    translate: Tensor  # (B, 2) shift of the content in pixels, (x right, y down)
    brightness: Tensor  # added to every pixel
    contrast: Tensor  # factor on deviations from the image mean


def _uniform(n: int, half_range: float, generator: torch.Generator, center: float = 0.0) -> Tensor:
    """(n,) draws from U[center - half_range, center + half_range] on the CPU."""
    return center + (2.0 * torch.rand(n, generator=generator) - 1.0) * half_range


def sample_classic_params(b: int, size: int, cfg: RobustConfig, generator: torch.Generator) -> ClassicParams:
    """Draw the parameters of ``b`` classic augmentations of ``size`` px images from ``cfg``."""
    return ClassicParams(
        angle_deg=_uniform(b, cfg.classic_rotation_deg, generator),
        scale=_uniform(b, cfg.classic_scale, generator, center=1.0),
        shear_deg=_uniform(b, cfg.classic_shear_deg, generator),
        translate=torch.stack([_uniform(b, cfg.classic_translate * size, generator),
                               _uniform(b, cfg.classic_translate * size, generator)], dim=1),
        brightness=_uniform(b, cfg.classic_brightness, generator),
        contrast=_uniform(b, cfg.classic_contrast, generator, center=1.0),
    )


def apply_classic(x: Tensor, p: ClassicParams) -> Tensor:
    """Warp then jitter ``x`` (B, C, H, W) in [0, 1] with per-image parameters ``p``.

    The content moves by ``A q + t`` (q: centred pixel position), ``A = R(angle) Sh(shear) S(scale)``;
    sampling needs the output -> input map ``A^-1 (p - t)``. Bilinear, zero padding (the black
    background of Fashion-MNIST), then ``c (x - mean) + mean + b``, clamped to [0, 1]."""
    dev, dt = x.device, x.dtype
    a = torch.deg2rad(p.angle_deg.to(dev, dt))
    cos, sin = torch.cos(a), torch.sin(a)
    # y points down on screen, so a counter-clockwise turn as displayed is [[c, s], [-s, c]].
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (B, 2, 2)
    shear = torch.eye(2, device=dev, dtype=dt).repeat(x.shape[0], 1, 1)
    shear[:, 0, 1] = torch.tan(torch.deg2rad(p.shear_deg.to(dev, dt)))
    fwd = rot @ shear * p.scale.to(dev, dt)[:, None, None]  # (B, 2, 2) content map
    inv = torch.linalg.inv(fwd)
    shift = -(inv @ p.translate.to(dev, dt)[:, :, None])[:, :, 0]  # (B, 2)
    y = affine_transform(x, inv, shift)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * p.contrast.to(dev, dt).view(-1, 1, 1, 1) + mean + p.brightness.to(dev, dt).view(-1, 1, 1, 1)
    return y.clamp(0.0, 1.0)


def classic_augment(x: Tensor, cfg: RobustConfig, generator: torch.Generator) -> Tensor:
    """One random classic augmentation per image of ``x`` (B, C, H, W) in [0, 1]."""
    return apply_classic(x, sample_classic_params(x.shape[0], x.shape[-1], cfg, generator))


@METHODS.register("classic", needs=Needs())
def classic(ctx: AugmentContext, batch: Batch) -> Augmented:
    """Random affine (rotation, zoom, shear, translation) + brightness/contrast jitter."""
    return Augmented(classic_augment(batch.x, ctx.cfg, ctx.generator), one_hot(batch.y, ctx.num_classes))
