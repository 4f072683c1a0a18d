"""NaTra and the latent-space methods (NaTra Sec. 3.1, 3.4.3; Eq. 1, 6, 13, 14).

The training set's latent codes depend only on the frozen encoder (+ LCE), so they are
computed once (``LatentSource.codes``) and indexed by example position; an epoch only edits
and decodes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from natra_ray.attacks import _eval_mode, latent_pgd
from natra_ray.augment import (
    METHODS,
    AugmentContext,
    Augmented,
    Batch,
    Needs,
    one_hot,
    require_latent,
)
from natra_ray.augment.basic import classic_augment
from natra_ray.models.generator import Generator, to_unit
from natra_ray.models.latent import Directions, lce_decode
from natra_ray.precision import autocast


# --------------------------------------------------------------------------- pure pieces
def apt_update(eps: Tensor, misclassified: Tensor, rho: float, cap: float) -> Tensor:
    """Eq. 13's alternating update: an example the transformation at eps_i + rho already
    fools keeps eps_i; one it does not fool gets eps_i + rho, truncated at ``cap``."""
    return torch.where(misclassified, eps, (eps + rho).clamp(max=cap))


def smooth_labels(y: Tensor, num_classes: int, alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Adaptive label smoothing: y~ = (1 - alpha_i) y + alpha_i u, u ~ Dirichlet(1) per example.

    alpha (B,) is c * eps_i (Sec. 3.4.3): a larger budget earns more label uncertainty. The
    result is on ``y``'s device: labels come on the training device, the budgets from wherever
    the APT state lives, and the draws from a CPU generator (the same numbers on any device)."""
    # Dirichlet(1, ..., 1) = normalised i.i.d. Exp(1) draws; sampled this way so a seeded
    # torch.Generator controls it (torch.distributions.Dirichlet takes no generator).
    e = -torch.log(torch.rand(y.shape[0], num_classes, generator=generator).clamp_min(1e-12)).to(y.device)
    u = e / e.sum(1, keepdim=True)
    a = alpha.to(y.device).clamp(0, 1).view(-1, 1)
    return (1 - a) * one_hot(y, num_classes) + a * u


@dataclass
class LatentSource:
    """Everything a latent method needs: frozen G, the dataset's cached codes, directions."""

    G: Generator
    ws: Tensor  # (N, n_codes, num_ws, w_dim) codes of the whole dataset (CPU)
    alpha: Tensor  # (N, n_codes, C_l) LCE channel importance
    layer: int  # LCE composition layer
    directions: Directions
    num_directions: int
    layer_range: tuple[int, int]  # (start, end) inclusive: D(u_i, start-end)
    eps: Tensor  # (N,) per-example budget, the APT state (kept across epochs), on G's device
    # robust.natra_mode=pool: the decoded members of each example (augment.pool.LatentPool),
    # made on first use and refreshed as examples are visited; None until then.
    pool: Any = None
    precision: str = "fp32"  # robust.precision: autocast of decoding and of the attacked classifier

    def __post_init__(self) -> None:
        # The budgets are read and written on every batch next to the attack's logits: kept on
        # the compute device, an APT update never mixes devices and never waits for a copy. The
        # codes stay on the CPU (the whole split's; ``codes`` moves a batch's).
        self.eps = self.eps.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.G.w_avg.device

    def budgets(self, idx: Tensor) -> Tensor:
        """(B,) the APT budgets of examples ``idx`` (any device), on the source's device."""
        return self.eps[idx.to(self.eps.device)]

    def set_budgets(self, idx: Tensor, eps: Tensor) -> None:
        self.eps[idx.to(self.eps.device)] = eps.to(self.eps.device, self.eps.dtype)

    def codes(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.ws[idx.cpu()].to(self.device), self.alpha[idx.cpu()].to(self.device)

    def decode(self, ws: Tensor, alpha: Tensor, coeffs: Tensor | None = None) -> Tensor:
        """Codes (B, N, num_ws, w_dim) edited by coeffs (B, k) along the directions -> [0, 1]."""
        if coeffs is not None:
            ws = self.directions.edit(ws, coeffs, *self.layer_range)
        with autocast(self.device, self.precision):
            x = lce_decode(self.G, ws, alpha, self.layer)
        return to_unit(x.float())

    def classify(self, model: torch.nn.Module, x: Tensor) -> Tensor:
        """``model(x)`` as the attacks run it: under the source's autocast, float32 logits."""
        with autocast(self.device, self.precision):
            return model(x).float()

    @torch.no_grad()
    def reconstruct(self, idx: Tensor) -> Tensor:
        return self.decode(*self.codes(idx))


class LatentAdversary(NamedTuple):
    x: Tensor  # (B, C, H, W) in [0, 1]: the decoded worst edit
    r: Tensor  # (B, k): its coefficients, |r|_inf <= eps
    logits: Tensor  # (B, classes): the model's logits on ``x`` in eval mode


def latent_attack(model: torch.nn.Module, src: LatentSource, idx: Tensor, y: Tensor, eps: Tensor | float,
                  steps: int, step_size: float | None, generator: torch.Generator | None,
                  random_start: bool = True) -> LatentAdversary:
    """Eq. 6: K steps of projected signed-gradient ascent on the CE loss w.r.t. the edit
    coefficients r (B, k), |r|_inf <= eps. The attack keeps the images and logits of the
    iterate it returns, so callers neither decode it again nor classify it again (15 % of a
    NaTra step's FLOPs, BENCHMARKS.md section 1)."""
    ws, alpha = src.codes(idx)
    y = y.to(src.device)

    def loss_fn(r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = src.decode(ws, alpha, r)
        logits = src.classify(model, x)
        return F.cross_entropy(logits, y, reduction="none"), x, logits

    if isinstance(eps, Tensor):
        eps = eps.to(src.device)
    with _eval_mode(model):  # BatchNorm statistics are not updated by the attack
        r, (x_adv, logits) = latent_pgd(loss_fn, (idx.shape[0], src.num_directions), eps=eps, steps=steps,
                                        step_size=step_size, random_start=random_start, generator=generator,
                                        device=src.device, return_aux=True)
    return LatentAdversary(x_adv, r, logits)


# --------------------------------------------------------------------------- methods
def _natra(ctx: AugmentContext, batch: Batch, apt: bool, method: str) -> Augmented:
    cfg, src = ctx.cfg, require_latent(ctx, method)
    if cfg.natra_mode == "pool":  # worst of a pool of decoded edits (augment/pool.py)
        from natra_ray.augment.pool import natra_pool

        return natra_pool(ctx, batch, apt)
    if cfg.natra_mode == "fraction":
        return _natra_fraction(ctx, batch, apt, src)
    # Everything per example on the source's device: budgets, labels, the attack's verdict.
    y = batch.y.to(src.device)
    eps_i = src.budgets(batch.idx)  # (B,)
    # APT attacks at eps_i + rho (Sec. 3.4.3): the same transformation trains theta and
    # tells whether eps_i may grow, so tuning costs no extra forward passes.
    radius = (eps_i + cfg.rho).clamp(max=cfg.eps_cap) if apt else torch.full_like(eps_i, cfg.eps)
    step = cfg.pgd_step_size or None
    adv = latent_attack(ctx.model, src, batch.idx, y, radius, cfg.pgd_steps, step, ctx.generator)
    x_adv = adv.x
    mis = adv.logits.argmax(1) != y
    if apt:
        src.set_budgets(batch.idx, apt_update(eps_i, mis, cfg.rho, cfg.eps_cap))
    used = eps_i if apt else radius
    target = smooth_labels(y, ctx.num_classes, cfg.label_smoothing_c * used, ctx.generator)
    x = torch.cat([batch.x.to(x_adv.device), x_adv])
    t = torch.cat([one_hot(y, ctx.num_classes), target])
    return Augmented(x, t, {"eps_mean": float(used.mean()), "adv_fooled": float(mis.float().mean())})


def _natra_fraction(ctx: AugmentContext, batch: Batch, apt: bool, src: LatentSource) -> Augmented:
    """Eq. 6's attack on a random fraction of the batch; the adversarial half's mean loss over
    those rows is an unbiased estimate of the whole batch's (the clean half stays whole)."""
    from natra_ray.augment.pool import TwoPass

    cfg = ctx.cfg
    b = batch.x.shape[0]
    m = max(1, round(cfg.adv_fraction * b))
    pick = torch.randperm(b, generator=ctx.generator)[:m]
    idx = batch.idx.cpu()[pick]
    y = batch.y.cpu()[pick]
    eps_i = src.budgets(idx).cpu()  # this mode's per-example bookkeeping is on the CPU
    radius = (eps_i + cfg.rho).clamp(max=cfg.eps_cap) if apt else torch.full_like(eps_i, cfg.eps)
    used = eps_i if apt else radius
    target = smooth_labels(y, ctx.num_classes, cfg.label_smoothing_c * used, ctx.generator)
    info: dict[str, float] = {}

    def second(grad: Tensor) -> Augmented:
        adv = latent_attack(ctx.model, src, idx, y, radius, cfg.pgd_steps, cfg.pgd_step_size or None, ctx.generator)
        mis = (adv.logits.argmax(1).cpu() != y)
        if apt:
            src.set_budgets(idx, apt_update(eps_i, mis, cfg.rho, cfg.eps_cap))
        info.update(eps_mean=float(used.mean()), adv_fooled=float(mis.float().mean()))
        return Augmented(adv.x, target.to(adv.x.device))

    return TwoPass(batch.x, one_hot(batch.y, ctx.num_classes), second=second, seen=lambda logits: dict(info))


@METHODS.register("natra", needs=Needs(latent=True))
def natra(ctx: AugmentContext, batch: Batch) -> Augmented:
    """Clean batch + the worst natural transformation within eps_i (APT on)."""
    return _natra(ctx, batch, apt=ctx.cfg.apt, method="natra")


@METHODS.register("natra_oa", needs=Needs(latent=True))
def natra_oa(ctx: AugmentContext, batch: Batch) -> Augmented:
    """NaTra without APT: a fixed eps for every example (label smoothing at c * eps)."""
    return _natra(ctx, batch, apt=False, method="natra_oa")


@METHODS.register("natra_ol", needs=Needs(latent=True, single_code=True))
def natra_ol(ctx: AugmentContext, batch: Batch) -> Augmented:
    """NaTra without LCE: the pipeline builds its codes with one code per image (plain
    inversion: ``Needs(single_code=True)``), the attack itself is unchanged."""
    src = require_latent(ctx, "natra_ol")
    if src.ws.shape[1] != 1:
        raise ValueError(f"natra_ol (NaTra without LCE) needs one latent code per image but the latent source "
                         f"has {src.ws.shape[1]}; build its codes with method_needs('natra_ol').lce_codes(...) = 1")
    return _natra(ctx, batch, apt=ctx.cfg.apt, method="natra_ol")


@METHODS.register("natra+classic", needs=Needs(latent=True))
def natra_classic(ctx: AugmentContext, batch: Batch) -> Augmented:
    """NaTra on top of the usual augmentation: the clean half of NaTra's batch goes through
    ``classic`` (as a data loader's transform would), the worst natural transformations are
    NaTra's own (they are searched from the image's latent code, which a pixel warp has not)."""
    out = _natra(ctx, batch, apt=ctx.cfg.apt, method="natra+classic")
    b = batch.x.shape[0]
    out.x = torch.cat([classic_augment(out.x[:b], ctx.cfg, ctx.generator), out.x[b:]])
    return out


@METHODS.register("random_latent", needs=Needs(latent=True, random_decode=True))
def random_latent(ctx: AugmentContext, batch: Batch) -> Augmented:
    """NaTra's "Random" baseline: Gaussian noise N(0, eps^2) on the edit coefficients.

    The one method that declares ``random_decode``: it trains on ``Batch.x_rand`` when the Ray
    Data stream decoded one and decodes its own otherwise."""
    src = require_latent(ctx, "random_latent")
    if batch.x_rand is not None:  # decoded upstream by the Ray Data actor
        x_rand = batch.x_rand.to(src.device)
    else:
        r = torch.randn(batch.x.shape[0], src.num_directions, generator=ctx.generator).to(src.device) * ctx.cfg.eps
        with torch.no_grad():
            x_rand = src.decode(*src.codes(batch.idx), r)
    x = torch.cat([batch.x.to(x_rand.device), x_rand])
    t = one_hot(torch.cat([batch.y, batch.y]), ctx.num_classes).to(x.device)
    return Augmented(x, t)
