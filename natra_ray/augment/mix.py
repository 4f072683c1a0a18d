"""The Mixup family (paper 002 Sec. 1.1-2.2): mix two training examples and their labels with
the same weight lambda ~ Beta(a, a), ``a = robust.mixup_alpha``, in a different space each.

* ``mixup`` (Zhang et al. 2018; NaTra's "MixI"): ``x~ = l x_i + (1 - l) x_j`` on the pixels.
* ``manifold_mixup`` (Verma et al. 2019): the same mixing on the hidden state at a position k
  drawn uniformly per batch among the classifier's mix positions (0 = the input, i = after
  block i; see ``MixableClassifier``), applied inside the training forward pass
  (``Augmented.forward_kwargs``) so the loss back-propagates through every layer.
* ``gan_mixup`` (paper 002 Sec. 2.1; NaTra's "MixL"): mix the two images' latent codes (the
  cached W+ codes, and with LCE the N codes and their channel importances alike), decode.
* ``vae_mixup`` (paper 002 Sec. 2.2): mix the VAE posterior means of the two images, decode
  with the VAE's decoder (``ctx.extra["vae"]``, trained by ``natra_ray.stages.vae``).

Every mixed example's target is ``l y_i + (1 - l) y_j``, so the soft cross-entropy equals
Mixup's ``l CE(y_i) + (1 - l) CE(y_j)`` exactly. Partners j are a random permutation of the
batch (one partner per example, the usual in-batch pairing). One lambda per *example* rather
than per batch: the same expected objective with less variance per step (our choice).

``mixup`` and ``manifold_mixup`` train on the mixed batch alone, as in their papers. The two
latent variants train on the clean batch plus the decoded mixes: paper 002 reports that on
Fashion-MNIST half the data must be original images (decodes are imperfect reconstructions),
and the same clean + augmented protocol as NaTra keeps the comparison fair. Paper 002 tried a
sharpening filter on blurry VAE decodes; it did not help them and is not implemented.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from natra_ray.augment import (
    METHODS,
    AugmentContext,
    Augmented,
    Batch,
    Needs,
    one_hot,
    require_latent,
)


# --------------------------------------------------------------------------- pure pieces
def sample_beta(n: int, alpha: float, generator: torch.Generator) -> Tensor:
    """(n,) float32 draws from Beta(alpha, alpha), reproducible from ``generator``.

    torch's Beta/Gamma samplers take no torch.Generator, so a NumPy generator is seeded from
    one draw of it: the stream still depends on ``generator`` alone."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


@dataclass
class MixPairs:
    perm: Tensor  # (B,) int64: the partner j of each example i
    lam: Tensor  # (B,) weight of the example itself, in [0, 1]


def draw_pairs(b: int, alpha: float, generator: torch.Generator) -> MixPairs:
    """Partners (a random permutation) and per-example weights lambda ~ Beta(alpha, alpha)."""
    perm = torch.randperm(b, generator=generator)
    return MixPairs(perm, sample_beta(b, alpha, generator))


def mix(a: Tensor, pairs: MixPairs) -> Tensor:
    """``l_i a_i + (1 - l_i) a_{perm_i}`` along dim 0 of ``a`` (B, ...), on ``a``'s device."""
    lam = pairs.lam.to(a.device, a.dtype).view(-1, *([1] * (a.dim() - 1)))
    return lam * a + (1 - lam) * a[pairs.perm.to(a.device)]


def mixed_targets(y: Tensor, num_classes: int, pairs: MixPairs) -> Tensor:
    """(B, num_classes) soft labels ``l onehot(y_i) + (1 - l) onehot(y_perm_i)``."""
    return mix(one_hot(y, num_classes), pairs)


def _mix_with_clean(batch: Batch, x_mix: Tensor, ctx: AugmentContext, pairs: MixPairs) -> Augmented:
    dev = x_mix.device
    x = torch.cat([batch.x.to(dev), x_mix])
    t = torch.cat([one_hot(batch.y, ctx.num_classes), mixed_targets(batch.y, ctx.num_classes, pairs)])
    return Augmented(x, t.to(dev), {"mix_lambda": float(pairs.lam.mean())})


# --------------------------------------------------------------------------- methods
@METHODS.register("mixup", needs=Needs())
def mixup(ctx: AugmentContext, batch: Batch) -> Augmented:
    """Input Mixup (MixI): convex combinations of image pairs and of their labels."""
    pairs = draw_pairs(batch.x.shape[0], ctx.cfg.mixup_alpha, ctx.generator)
    return Augmented(mix(batch.x, pairs), mixed_targets(batch.y, ctx.num_classes, pairs),
                     {"mix_lambda": float(pairs.lam.mean())})


@METHODS.register("manifold_mixup", needs=Needs())
def manifold_mixup(ctx: AugmentContext, batch: Batch) -> Augmented:
    """Manifold Mixup: mix hidden states at a random mix position of the classifier."""
    positions: Any = getattr(ctx.model, "num_mix_layers", None)
    if positions is None:
        raise TypeError(f"manifold_mixup needs a MixableClassifier (forward(x, mix_layer, mix_fn)); "
                        f"{type(ctx.model).__name__} has no num_mix_layers - use a natra_ray classifier")
    pairs = draw_pairs(batch.x.shape[0], ctx.cfg.mixup_alpha, ctx.generator)
    k = int(torch.randint(int(positions), (1,), generator=ctx.generator))
    return Augmented(batch.x, mixed_targets(batch.y, ctx.num_classes, pairs),
                     {"mix_lambda": float(pairs.lam.mean()), "mix_layer": float(k)},
                     forward_kwargs={"mix_layer": k, "mix_fn": functools.partial(mix, pairs=pairs)})


@METHODS.register("gan_mixup", needs=Needs(latent=True))
def gan_mixup(ctx: AugmentContext, batch: Batch) -> Augmented:
    """GAN-Mixup (MixL): decode convex combinations of two images' latent codes."""
    src = require_latent(ctx, "gan_mixup")
    pairs = draw_pairs(batch.x.shape[0], ctx.cfg.mixup_alpha, ctx.generator)
    ws, alpha = src.codes(batch.idx)  # (B, N, num_ws, w_dim), (B, N, C_l)
    with torch.no_grad():
        x_mix = src.decode(mix(ws, pairs), mix(alpha, pairs))
    return _mix_with_clean(batch, x_mix, ctx, pairs)


@METHODS.register("vae_mixup", needs=Needs(vae=True))
def vae_mixup(ctx: AugmentContext, batch: Batch) -> Augmented:
    """VAE-Mixup: decode convex combinations of two images' VAE posterior means."""
    vae = ctx.extra.get("vae")
    if vae is None:
        raise ValueError("method 'vae_mixup' needs a trained VAE in AugmentContext.extra['vae'] "
                         "(the pipeline trains one with natra_ray.stages.vae)")
    pairs = draw_pairs(batch.x.shape[0], ctx.cfg.mixup_alpha, ctx.generator)
    dev = next(vae.parameters()).device
    with torch.no_grad():
        mu, _ = vae.encode(batch.x.to(dev))  # (B, z_dim)
        x_mix = vae.decode(mix(mu, pairs))
    return _mix_with_clean(batch, x_mix, ctx, pairs)
