"""AdvMix (Gowal et al., CVPR 2020, "Achieving robustness in the wild via adversarial mixing
with disentangled representations"), reimplemented from the paper's description: no public
code exists, so this module documents how we read it.

What the paper says: a StyleGAN's latent representation splits an image into factors that
carry its class ("content") and factors that should not matter ("style"); new training images
are made by *adversarially composing* the content of an image with the style of other images,
decoded by the generator, and trained on with the original label.

Our reading, on this project's StyleGAN W+ codes (NaTra's cached, LCE-composed codes):

* content = the coarse style inputs ``0 .. s-1`` of the image's own code, style = the fine
  inputs ``s .. num_ws-1`` (``s = robust.advmix_split``, default ``num_ws // 2``: at 32 px
  layers up to the 16x16 up-sampling carry shape and pose, the later ones stroke and texture,
  StyleGAN's coarse/fine split).
* the style set of image i is the convex hull of its own fine styles and those of
  ``K = robust.advmix_candidates`` other training images drawn at random (from the whole
  training set's codes, with ``ctx.generator``): ``w_fine = sum_k beta_k w_fine^(k)``,
  ``beta`` in the probability simplex (vertex 0 = own style = the plain reconstruction).
  With LCE, each of the N codes mixes with the same-index code of the candidates.
* the adversary: first the discrete AdvMix choice - every vertex (own style and each
  candidate's style swapped in) is decoded and the one with the highest loss kept; then
  ``robust.pgd_steps`` projected signed-gradient ascent steps on ``beta`` over the simplex
  (Euclidean projection, step ``1 / steps``), keeping the highest-loss iterate seen. So the
  result is never easier than the worst plain style swap (nor than the reconstruction).
* training: the clean batch plus the adversarial mixes, hard original labels (the same
  clean + adversarial protocol as NaTra; the paper's exact clean/adversarial weighting is not
  recoverable from its text).
"""
from __future__ import annotations

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
    require_latent,
)
from natra_ray.augment.latent import LatentSource


# --------------------------------------------------------------------------- pure pieces
def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` (B, K) onto {b >= 0, sum b = 1}
    (the sort-based algorithm of Held et al. 1974 / Duchi et al. 2008)."""
    u, _ = torch.sort(v, dim=1, descending=True)
    css = u.cumsum(1) - 1.0
    j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / j) > 0).to(v.dtype).mul(j).argmax(1, keepdim=True)  # last index where positive
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0.0)


def resolve_split(split: int, num_ws: int) -> int:
    """``robust.advmix_split`` (-1 = num_ws // 2) -> the first fine style input, checked."""
    s = num_ws // 2 if split < 0 else split
    if not 1 <= s <= num_ws - 1:
        raise ValueError(f"robust.advmix_split={split} leaves no content or no style for a generator with "
                         f"{num_ws} style inputs; use 1..{num_ws - 1} (or -1 for {num_ws // 2})")
    return s


def mix_styles(ws: Tensor, pool: Tensor, beta: Tensor, split: int) -> Tensor:
    """Codes whose fine inputs ``split..`` are the beta-mix of the own and candidate styles.

    ws (B, N, L, D) own codes; pool (B, K, N, L, D) candidates' codes; beta (B, K + 1) with
    the own style first. Coarse inputs ``..split-1`` stay the image's own. -> (B, N, L, D)."""
    styles = torch.cat([ws[:, None], pool], dim=1)  # (B, K+1, N, L, D)
    mixed = (beta[:, :, None, None, None].to(ws) * styles).sum(1)  # (B, N, L, D)
    fine = torch.zeros(ws.shape[-2], 1, device=ws.device, dtype=ws.dtype)
    fine[split:] = 1.0
    return ws * (1.0 - fine) + mixed * fine


def advmix_attack(model: torch.nn.Module, src: LatentSource, idx: Tensor, y: Tensor, candidates: int,
                  steps: int, split: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The adversarial style mix of each image (see the module docstring).

    Returns (x_adv (B, C, H, W) in [0, 1], beta (B, K + 1) on the simplex, the candidates'
    dataset indices (B, K))."""
    b = idx.shape[0]
    ws, alpha = src.codes(idx)
    cand = torch.randint(len(src.ws), (b, candidates), generator=generator)  # (B, K)
    pool = src.ws[cand.flatten()].view(b, candidates, *ws.shape[1:]).to(ws.device)
    y = y.to(ws.device)
    n = candidates + 1

    def loss_of(beta: Tensor) -> Tensor:
        x = src.decode(mix_styles(ws, pool, beta, split), alpha)
        return F.cross_entropy(model(x), y, reduction="none")  # (B,)

    best = torch.zeros(b, n, device=ws.device)
    best_loss = torch.full((b,), -float("inf"), device=ws.device)

    def keep(beta: Tensor, loss: Tensor) -> None:
        better = loss > best_loss
        best[better] = beta.detach()[better]
        best_loss.copy_(torch.where(better, loss, best_loss))

    with _eval_mode(model):
        with torch.no_grad():  # discrete AdvMix: own style and each candidate's style swapped in
            for k in range(n):
                vertex = F.one_hot(torch.full((b,), k, device=ws.device), n).float()
                keep(vertex, loss_of(vertex))
        beta = best.clone()
        for _ in range(steps):  # continuous refinement over the simplex
            bt = beta.requires_grad_(True)
            (g,) = torch.autograd.grad(loss_of(bt).sum(), bt)
            beta = project_simplex(beta.detach() + g.sign() / steps)
            with torch.no_grad():
                keep(beta, loss_of(beta))
        with torch.no_grad():
            x_adv = src.decode(mix_styles(ws, pool, best, split), alpha)
    return x_adv, best, cand


@METHODS.register("advmix", needs=Needs(latent=True))
def advmix(ctx: AugmentContext, batch: Batch) -> Augmented:
    """Clean batch + each image's content decoded with the worst mix of other images' styles."""
    src = require_latent(ctx, "advmix")
    split = resolve_split(ctx.cfg.advmix_split, src.ws.shape[-2])
    x_adv, beta, _ = advmix_attack(ctx.model, src, batch.idx, batch.y, ctx.cfg.advmix_candidates,
                                   ctx.cfg.pgd_steps, split, ctx.generator)
    x = torch.cat([batch.x.to(x_adv.device), x_adv])
    t = one_hot(torch.cat([batch.y, batch.y]), ctx.num_classes).to(x.device)
    return Augmented(x, t, {"advmix_own_style": float(beta[:, 0].mean())})
