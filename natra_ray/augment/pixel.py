"""Pixel-space adversarial training: the paper's "Adv" baseline (``pgd``) and ``fgsm``.

Both attack the current classifier inside an l_inf ball of radius ``robust.pixel_eps`` around
the clean images (the attacks themselves are the pure functions of ``natra_ray.attacks``):

* ``pgd`` - Madry et al. 2018: train on the PGD worst case only, hard labels. ``robust.pgd_steps``
  steps (shared with the latent attack: one "attack steps" knob), Madry's step size
  ``2.5 * eps / steps`` and a uniform random start drawn from ``ctx.generator``.
* ``fgsm`` - Goodfellow et al. 2015, Sec. 6: the objective ``0.5 J(x, y) + 0.5 J(x + eps
  sign(grad_x J), y)``, i.e. the clean batch and its FGSM examples in one batch.
"""
from __future__ import annotations

import torch

from natra_ray.attacks import fgsm as fgsm_attack
from natra_ray.attacks import pgd_linf
from natra_ray.augment import METHODS, AugmentContext, Augmented, Batch, Needs, one_hot


def _on_model(ctx: AugmentContext, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    dev = next(ctx.model.parameters()).device
    return batch.x.to(dev), batch.y.to(dev)


@METHODS.register("pgd", needs=Needs())
def pgd(ctx: AugmentContext, batch: Batch) -> Augmented:
    """Madry's adversarial training: the l_inf PGD example of each image, hard labels."""
    x, y = _on_model(ctx, batch)
    x_adv = pgd_linf(ctx.model, x, y, eps=ctx.cfg.pixel_eps, steps=ctx.cfg.pgd_steps, generator=ctx.generator)
    return Augmented(x_adv, one_hot(y, ctx.num_classes))


@METHODS.register("fgsm", needs=Needs())
def fgsm(ctx: AugmentContext, batch: Batch) -> Augmented:
    """Goodfellow's adversarial objective: clean images + their FGSM examples, hard labels."""
    x, y = _on_model(ctx, batch)
    x_adv = fgsm_attack(ctx.model, x, y, eps=ctx.cfg.pixel_eps)
    return Augmented(torch.cat([x, x_adv]), one_hot(torch.cat([y, y]), ctx.num_classes))
