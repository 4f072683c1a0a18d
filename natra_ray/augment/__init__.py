"""Augmentation methods behind one registry and one signature.

A method is ``method(ctx: AugmentContext, batch: Batch) -> Augmented``: given the current
classifier and a clean batch, it returns the inputs to train on with their (soft) targets.
Training code never special-cases a method, so NaTra, its ablations and every baseline are
trained and compared by the same loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natra_ray.config import RobustConfig
from natra_ray.registry import Registry


@dataclass
class Batch:
    x: Tensor  # (B, C, H, W) in [0, 1]
    y: Tensor  # (B,) int64
    idx: Tensor  # (B,) int64 positions in the training set (keys of per-example state)
    # A random natural transformation dec(enc(x) + V r), |r| <= eps, when the batch came
    # through the Ray Data stream (its actor decodes it); None when fed from memory.
    x_rand: Optional[Tensor] = None


@dataclass
class Augmented:
    x: Tensor  # (B', C, H, W) in [0, 1]
    target: Tensor  # (B', num_classes) soft labels, rows sum to 1
    info: Dict[str, float] = field(default_factory=dict)  # per-batch diagnostics for logging
    # Keyword arguments of the training forward pass, model(x, **forward_kwargs): empty for
    # methods that only make inputs; manifold_mixup mixes hidden states (mix_layer, mix_fn).
    forward_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentContext:
    model: nn.Module
    cfg: RobustConfig
    num_classes: int
    generator: torch.Generator  # all randomness of a method comes from here (reproducible)
    latent: Optional[Any] = None  # natra_ray.augment.latent.LatentSource for latent methods
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. a VAE for vae_mixup


Method = Callable[[AugmentContext, Batch], Augmented]
METHODS: Registry[Augmented] = Registry("augmentation method")

# Methods that need the generator, encoder codes and directions (the upstream NaTra stages).
LATENT_METHODS = {"natra", "natra_ol", "natra_oa", "random_latent", "gan_mixup", "natra+classic", "advmix"}
# Methods that need a VAE trained on the data, handed over as AugmentContext.extra["vae"].
VAE_METHODS = {"vae_mixup"}


def needs_latent(name: str) -> bool:
    return name in LATENT_METHODS


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(y, num_classes).float()


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example cross-entropy against soft targets (B, C) -> (B,)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1)


def create_method(name: str) -> Method:
    return METHODS.get(name)


def list_methods() -> List[str]:
    return METHODS.names()


# Registration happens on import of the method modules.
from natra_ray.augment import basic, latent, pixel, mix, advmix  # noqa: E402,F401
from natra_ray.augment import cvae  # noqa: E402,F401  (learned perturbation sets, paper 001)
