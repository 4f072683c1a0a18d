"""The ``cvae`` method: train on members of a learned perturbation set (paper 001, after
Wong & Kolter 2020).

The set of x is ``S(x) = {Q(x, mu_p(x) + sigma_p(x) * u) : ||u||_2 <= eps}``: a ball in the
CVAE prior's standardised coordinates u. Per batch the method picks one u per image

* ``random``: u ~ N(0, I) (z drawn from the prior p(z | x)), projected into the ball;
* ``pgd``: the worst case, projected L2 gradient ascent on the classifier's cross-entropy
  (Wong & Kolter's CVAE attack: normalised gradient steps, renormalised into the ball),

and returns the clean batch plus the perturbed one, hard labels. The settings are
``robust.cvae_eps`` / ``cvae_attack`` / ``cvae_steps`` / ``cvae_step_size``; the trained CVAE
arrives as ``ctx.extra["cvae"]`` (the pipeline trains it once per training data + ``cvae``
config section and caches it, as the method's ``Needs(cvae=True)`` asks).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from natra_ray.attacks import _eval_mode
from natra_ray.augment import (
    METHODS,
    AugmentContext,
    Augmented,
    Batch,
    Needs,
    one_hot,
)
from natra_ray.models.cvae import CVAE


# --------------------------------------------------------------------------- pure pieces
def project_l2(u: Tensor, eps: float) -> Tensor:
    """Rows of u (B, k) scaled down onto the L2 ball of radius eps (rows inside stay)."""
    norm = u.norm(dim=1, keepdim=True)
    return u * (eps / norm.clamp_min(1e-12)).clamp(max=1.0)


def random_in_ball(n: int, k: int, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """u ~ N(0, I_k) (a prior draw in standardised coordinates), projected into ||u|| <= eps."""
    return project_l2(torch.randn(n, k, generator=generator), eps)


def uniform_in_ball(n: int, k: int, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Uniform in the L2 ball: a uniform direction, radius eps * U^(1/k)."""
    d = torch.randn(n, k, generator=generator)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return d * eps * torch.rand(n, 1, generator=generator).pow(1.0 / k)


def l2_pgd(loss_fn: Callable[[Tensor], Tensor], shape: Sequence[int], *, eps: float, steps: int,
           step_size: float = 0.0, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> Tensor:
    """Projected gradient ascent on a per-example loss ``loss_fn(u) -> (B,)`` over the L2 ball
    ||u||_2 <= eps: a uniform start in the ball, then ``steps`` steps
    ``u <- project(u + alpha * g / ||g||)`` with alpha = ``step_size`` or 2.5 eps / steps.
    Returns the u with the highest loss seen per example (the start included), detached."""
    n, k = int(shape[0]), int(shape[1])
    if steps <= 0 or eps == 0:
        return torch.zeros(n, k, device=device)
    alpha = step_size or 2.5 * eps / steps
    u = uniform_in_ball(n, k, eps, generator).to(device)
    best, best_loss = u.clone(), torch.full((n,), -float("inf"), device=device)
    for it in range(steps + 1):
        last = it == steps
        d = u.detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            loss = loss_fn(d).reshape(-1)  # (B,)
        better = loss.detach() > best_loss
        best_loss = torch.where(better, loss.detach(), best_loss)
        best[better] = u[better]
        if last:
            break
        (g,) = torch.autograd.grad(loss.sum(), d)
        u = project_l2(u + alpha * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12), eps).detach()
    return best.detach()


def cvae_attack(model: torch.nn.Module, cvae: CVAE, x: Tensor, y: Tensor, *, eps: float, attack: str = "pgd",
                steps: int = 5, step_size: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One member of S(x) per image: (x' (B, C, H, W) in [0, 1], u (B, k)), with u random or
    the worst case for ``model`` (which runs in eval mode: BatchNorm statistics untouched)."""
    k = cvae.latent_dim
    if attack == "random":
        u = random_in_ball(x.shape[0], k, eps, generator).to(x.device)
    elif attack == "pgd":
        with _eval_mode(model):
            u = l2_pgd(lambda v: F.cross_entropy(model(cvae.perturb(x, v)), y, reduction="none"),
                       (x.shape[0], k), eps=eps, steps=steps, step_size=step_size,
                       generator=generator, device=x.device)
    else:
        raise ValueError(f"robust.cvae_attack must be 'random' or 'pgd'; got {attack!r}")
    with torch.no_grad():
        return cvae.perturb(x, u), u


# --------------------------------------------------------------------------- method
@METHODS.register("cvae", needs=Needs(cvae=True))
def cvae(ctx: AugmentContext, batch: Batch) -> Augmented:
    """Clean batch + one member of the learned perturbation set per image (random or worst case)."""
    cvae_model = ctx.extra.get("cvae")
    if cvae_model is None:
        raise ValueError("method 'cvae' needs a trained CVAE in AugmentContext.extra['cvae']; run it through the "
                         "pipeline, which trains one (cvae config section) when robust.method=cvae")
    if not isinstance(cvae_model, CVAE):
        raise TypeError(f"AugmentContext.extra['cvae'] must be a natra_ray.models.cvae.CVAE; got "
                        f"{type(cvae_model).__name__}")
    r, dev = ctx.cfg, next(ctx.model.parameters()).device
    cvae_model.to(dev)
    x, y = batch.x.to(dev), batch.y.to(dev)
    x_pert, u = cvae_attack(ctx.model, cvae_model, x, y, eps=r.cvae_eps, attack=r.cvae_attack, steps=r.cvae_steps,
                            step_size=r.cvae_step_size, generator=ctx.generator)
    with torch.no_grad(), _eval_mode(ctx.model):
        fooled = (ctx.model(x_pert).argmax(1) != y).float().mean()
    target = one_hot(torch.cat([batch.y, batch.y]), ctx.num_classes).to(dev)
    return Augmented(torch.cat([x, x_pert]), target,
                     {"cvae_u_norm": float(u.norm(dim=1).mean()), "cvae_fooled": float(fooled)})

