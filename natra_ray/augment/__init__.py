"""Augmentation methods behind one registry and one signature.

A method is ``method(ctx: AugmentContext, batch: Batch) -> Augmented``: given the current
classifier and a clean batch, it returns the inputs to train on with their (soft) targets.
Training code never special-cases a method, so NaTra, its ablations and every baseline are
trained and compared by the same loop.

A method is registered together with what it needs (timm's habit: the registry entry carries
what a model needs), and that entry is the one place the workflow reads it from::

    @METHODS.register("natra", needs=Needs(latent=True))
    def natra(ctx: AugmentContext, batch: Batch) -> Augmented: ...

``method_needs(name)`` returns the ``Needs``; a method registered without ``needs=`` needs
nothing beyond the classifier and the clean batch. ``Needs`` says

* ``latent``: the generator, the directions and each split's latent codes, handed over as
  ``AugmentContext.latent`` (a ``natra_ray.augment.latent.LatentSource``);
* ``single_code``: those codes are inverted with one code per image even when
  ``encoder.lce_codes`` > 1 (``natra_ol``, NaTra without LCE); ``Needs.lce_codes(configured)``
  is the number of codes to invert the splits with;
* ``vae`` / ``cvae``: a VAE / CVAE trained on the data, handed over as
  ``AugmentContext.extra["vae"]`` / ``extra["cvae"]`` (``Needs.extra_models`` names them);
* ``random_decode``: the method reads ``Batch.x_rand``, the random decode the Ray Data stream
  makes; for every other method the stream need not decode it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    # A random natural transformation dec(enc(x) + V r), r ~ N(0, eps^2), when the batch came
    # through the Ray Data stream (its actor decodes it); None when fed from memory. Only a
    # method whose Needs say random_decode reads it, and it decodes one itself when None.
    x_rand: Tensor | None = None


@dataclass
class Augmented:
    x: Tensor  # (B', C, H, W) in [0, 1]
    target: Tensor  # (B', num_classes) soft labels, rows sum to 1
    info: dict[str, float] = field(default_factory=dict)  # per-batch diagnostics for logging
    # Keyword arguments of the training forward pass, model(x, **forward_kwargs): empty for
    # methods that only make inputs; manifold_mixup mixes hidden states (mix_layer, mix_fn).
    forward_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentContext:
    model: nn.Module
    cfg: RobustConfig
    num_classes: int
    generator: torch.Generator  # all randomness of a method comes from here (reproducible)
    latent: Any | None = None  # natra_ray.augment.latent.LatentSource for latent methods
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a VAE for vae_mixup


@dataclass(frozen=True)
class Needs:
    """What an augmentation method needs besides the classifier and the clean batch."""

    latent: bool = False  # the generator, the directions and each split's latent codes (ctx.latent)
    single_code: bool = False  # one code per image even when encoder.lce_codes > 1 (natra_ol)
    vae: bool = False  # a VAE trained on the data -> AugmentContext.extra["vae"]
    cvae: bool = False  # a CVAE trained on the data -> AugmentContext.extra["cvae"]
    random_decode: bool = False  # reads Batch.x_rand, which the Ray Data stream decodes

    def __post_init__(self) -> None:
        for flag in ("single_code", "random_decode"):
            if getattr(self, flag) and not self.latent:
                raise ValueError(f"Needs({flag}=True) is about the latent codes; it needs latent=True too")

    def lce_codes(self, configured: int) -> int:
        """How many LCE codes per image the splits are inverted with, given ``encoder.lce_codes``."""
        return 1 if self.single_code else configured

    @property
    def extra_models(self) -> tuple[str, ...]:
        """The keys of ``AugmentContext.extra`` the method reads: ("vae",), ("cvae",) or ()."""
        return tuple(k for k in ("vae", "cvae") if getattr(self, k))


Method = Callable[[AugmentContext, Batch], Augmented]
METHODS: Registry[Augmented] = Registry("augmentation method")


def method_needs(name: str) -> Needs:
    """What method ``name`` declared on its registry entry (unknown name: the registry's error)."""
    needs = METHODS.meta(name).get("needs", Needs())
    if not isinstance(needs, Needs):
        raise TypeError(f"augmentation method {name!r} was registered with needs={needs!r}; expected a Needs")
    return needs


def require_latent(ctx: AugmentContext, method: str) -> Any:
    """``ctx.latent`` for a method with ``Needs(latent=True)``, or an error that says so."""
    if ctx.latent is None:
        raise ValueError(f"method {method!r} needs the latent source (generator, the dataset's codes, directions) "
                         f"in AugmentContext.latent; the pipeline builds it when method_needs({method!r}).latent")
    return ctx.latent


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(y, num_classes).float()


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example cross-entropy against soft targets (B, C) -> (B,)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1)


def create_method(name: str) -> Method:
    return METHODS.get(name)


def list_methods() -> list[str]:
    return METHODS.names()


# Registration happens on import of the method modules.
from natra_ray.augment import (  # noqa: F401
    advmix,
    basic,
    cvae,  # learned perturbation sets, paper 001
    latent,
    mix,
    pixel,
)

