"""NaTra's fast mode (``robust.natra_mode=pool``): a pool of decoded edits per training example,
new members at a surrogate FGSM corner, the worst member chosen without a pass through G.

The exact mode (Eq. 6) spends K decodes *with gradients through G* and K classifier passes on
every example of every batch: ~10x a standard epoch on the cpu profile (bench/bench_epoch.py),
where a decode alone costs about one standard training step per image (the style generator has
~3.5x the small CNN's multiply-adds). Within a budget of 3x a standard epoch, training on the
clean and the transformed half already takes 2x, which leaves room for ~0.8 decodes per example
per epoch and no backward pass through G at all. The pool mode spends them so:

* **Two passes** (``TwoPass``, run by ``stages.robust.train_epoch``): the clean half is trained
  first and its input gradient ``g = d loss / d x`` (free: the backward computes it) is handed
  to the method, which then picks the transformed half; one optimiser step on both (the mean of
  the halves' mean losses, i.e. one pass over the 2B batch; under DDP one all-reduce). BatchNorm
  normalises each half over its own rows (``robust.two_pass_norm=batch``; ``running`` normalises
  the transformed half as a test image is, which cost clean accuracy on the whole split:
  stages.robust._two_pass).
* **Pool.** ``LatentPool`` holds P members per example: uint8 images (P x C x H x W bytes) and
  their coefficients ``r``, within the example's attack radius when decoded (``eps_i + rho``
  with APT, ``eps`` without; APT only raises ``eps_i``, so an older member stays within the
  budget). Slot s of example i is re-decoded every ``robust.pool_refresh`` (R) visits, the slots
  staggered over examples and visits, so each batch decodes ~P / R members per example (an
  example's first visit decodes one at least): the cost of re-decoding the pool every R epochs,
  spread evenly, with no per-epoch hook (the in-process trainer and the Ray worker loop call the
  method alike; each worker fills the pool of the examples it visits).
* **New members** (``robust.pool_propose``): ``surrogate`` = the corner ``radius * sign(D_c g)``
  where ``D_c`` (k x pixels) is a least-squares fit, per class, of how each direction changes
  the image, gathered from every member decoded so far (``Surrogate``; G is frozen, so the fit
  only accumulates). ``g . (s @ D_c)`` is the first-order loss change of corner s, so this is
  latent FGSM with a class-average Jacobian instead of a backward pass through G; measured on
  the cpu upstream it fools the model about as often as FGSM with the true Jacobian (71% vs
  72% of test images on an exact-trained classifier, PGD-5 79%, a random corner 42%).
  ``random`` = random corners (worst-of-P over random corners; Engstrom et al. 2019).
* **Selection** (``robust.pool_select``) by the current model: ``gradient`` = the first-order
  worst, ``argmax_m <g, x_m>`` (P dot products per example); ``loss`` = the exact worst,
  every member classified (P forward passes in eval mode: strong with many fresh members,
  costly on a CPU).
* **APT and label smoothing** as in ``natra``: the transformed half is labelled with
  ``c * eps_i``, and ``eps_i`` grows by rho (to the cap) unless the selected member fools the
  model (the training pass's own logits).

What it buys (bench/bench_epoch.py; BENCHMARKS.md section 7): ~2.4x a standard epoch on the cpu
profile (3x in the first, which decodes one member per example), against ~9x for the exact mode,
but a much weaker attack at a real budget: trained 3 epochs on the whole training split, its
classifier keeps 64.0 % latent worst-case accuracy, the exact mode's 75.2 %, the fraction mode's
72.8 %, a standard one's 57.2 %. (On 3,600 images the pool looked as strong as the fraction mode;
twice the fresh decodes add under a point.) ``natra_mode=exact`` stays the default.

Memory: P bytes per pixel per example (uint8): P x 10 MB per 10k 32 x 32 grey images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from natra_ray.attacks import _eval_mode
from natra_ray.augment import AugmentContext, Augmented, Batch, one_hot

DECODE_CHUNK = 128  # images per decode call (larger batches are slower per image on CPU)
SCORE_CHUNK = 512  # images per scoring forward of ``loss`` selection


def to_uint8(x: Tensor) -> Tensor:
    """Images in [0, 1] -> uint8 (error <= 1 / 510)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def from_uint8(x: Tensor) -> Tensor:
    return x.float() / 255


def random_signs(n: int, k: int, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randint(0, 2, (n, k), generator=generator).float() * 2 - 1


@dataclass
class Surrogate:
    """Per class c, the least-squares linear effect of each direction on the image,
    ``x(radius * s) - x ~= radius * s @ D_c`` (D_c: k x pixels), fitted to every member decoded
    so far (pairs of corner signs s and pixel changes); G is frozen, so the fit only gathers
    data. Its use: the first-order loss change of corner s for an example with input gradient
    g is ``radius * s . (D_c g)``, so ``sign(D_c g)`` is the corner FGSM would take with the
    true Jacobian - found with k dot products and no backward pass through G."""

    ss: Tensor  # (C, k, k) sum of s s^T
    sd: Tensor  # (C, k, pixels) sum of s (x_m - x) / radius
    n: Tensor  # (C,) pairs seen

    @classmethod
    def empty(cls, classes: int, k: int, pixels: int) -> "Surrogate":
        return cls(torch.zeros(classes, k, k), torch.zeros(classes, k, pixels), torch.zeros(classes, dtype=torch.long))

    def update(self, y: Tensor, signs: Tensor, change: Tensor) -> None:
        """Add pairs: labels (M,), corner signs (M, k), pixel change per unit radius (M, ...)."""
        y, signs, change = y.cpu(), signs.cpu().float(), change.flatten(1).cpu().float()
        self.ss.index_add_(0, y, signs[:, :, None] * signs[:, None, :])
        self.sd.index_add_(0, y, signs[:, :, None] * change[:, None, :])
        self.n += torch.bincount(y, minlength=self.n.numel())

    def ready(self, y: Tensor) -> Tensor:
        """(M,) whether the classes of ``y`` have 2k pairs (enough for k unknowns)."""
        return self.n[y.cpu()] >= 2 * self.ss.shape[1]

    def directions(self, y: Tensor, grad: Tensor) -> Tensor:
        """(M, k) ``D_c g`` for labels ``y`` (M,) and input gradients ``grad`` (M, ...)."""
        k = self.ss.shape[1]
        ridge = 1e-3 * self.n.clamp(min=1).float()[:, None, None] * torch.eye(k)
        D = torch.linalg.solve(self.ss + ridge, self.sd)  # (C, k, pixels)
        y = y.cpu()
        return torch.einsum("mkd,md->mk", D[y].to(grad), grad.flatten(1).float())


@dataclass
class LatentPool:
    """P decoded members per training example (CPU tensors, indexed by example position), and
    the surrogate fitted to them."""

    images: Tensor  # (N, P, C, H, W) uint8
    coeffs: Tensor  # (N, P, k) float32 edit coefficients of each member
    radius: Tensor  # (N, P) float32: the budget |r|_inf each member was decoded at; < 0 = empty slot
    visits: Tensor  # (N,) int64: visits of each example so far (drives the refresh schedule)
    surrogate: Surrogate

    @classmethod
    def empty(cls, n: int, size: int, k: int, image_shape: tuple[int, ...], classes: int) -> "LatentPool":
        return cls(torch.zeros(n, size, *image_shape, dtype=torch.uint8), torch.zeros(n, size, k),
                   torch.full((n, size), -1.0), torch.zeros(n, dtype=torch.long),
                   Surrogate.empty(classes, k, math.prod(image_shape)))

    @property
    def size(self) -> int:
        return self.images.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.coeffs, self.radius, self.visits,
                                                         self.surrogate.ss, self.surrogate.sd))

    def valid(self, idx: Tensor) -> Tensor:
        """(B, P) bool: which slots of examples ``idx`` hold a member."""
        return self.radius[idx] >= 0

    def due(self, idx: Tensor, refresh: int) -> Tensor:
        """(B, P) bool: the slots decoded (again) at this visit of examples ``idx``: slot s when
        ``(visits + idx) % R == s % R`` (each slot every R visits, staggered over examples), and
        one slot of an example that has no member yet."""
        phase = (self.visits[idx] + idx) % refresh  # (B,)
        slots = torch.arange(self.size)
        due = (slots[None] % refresh) == phase[:, None]
        empty = ~self.valid(idx).any(1)
        first = (self.visits[idx] + idx) % self.size
        due[empty, first[empty]] = True
        return due

    def members(self, idx: Tensor, device: torch.device | str = "cpu") -> Tensor:
        """(B, P, C, H, W) float images in [0, 1] on ``device`` (empty slots are zeros)."""
        return from_uint8(self.images[idx].to(device))


def ensure_pool(src, cfg, classes: int) -> LatentPool:  # src: LatentSource, cfg: RobustConfig
    """The latent source's pool, made on first use (``cfg.pool_size`` slots per example)."""
    pool = getattr(src, "pool", None)
    if pool is None or pool.images.shape[0] != src.ws.shape[0] or pool.size != cfg.pool_size:
        with torch.no_grad():
            shape = tuple(src.reconstruct(torch.zeros(1, dtype=torch.long)).shape[1:])
        pool = LatentPool.empty(src.ws.shape[0], cfg.pool_size, src.num_directions, shape, classes)
        src.pool = pool
    return pool


@torch.no_grad()
def decode_into(pool: LatentPool, src, ex: Tensor, slots: Tensor, r: Tensor, budget: Tensor) -> Tensor:
    """Decode examples ``ex`` (M,) edited by ``r`` (M, k), ``|r|_inf <= budget`` (M,), into
    ``slots`` (M,); returns the images."""
    out = []
    for i in range(0, ex.numel(), DECODE_CHUNK):
        j = slice(i, i + DECODE_CHUNK)
        ws, alpha = src.codes(ex[j])
        out.append(src.decode(ws, alpha, r[j].to(src.device)).cpu())
    x = torch.cat(out)
    pool.images[ex, slots] = to_uint8(x)
    pool.coeffs[ex, slots] = r.cpu()
    pool.radius[ex, slots] = budget.float().cpu()
    return x


def select_by_gradient(members: Tensor, valid: Tensor, grad: Tensor) -> Tensor:
    """(B,) index of the first-order worst member: ``argmax_m <grad, x_m>`` over valid members
    (= the largest first-order loss increase ``<grad, x_m - x>``: ``x`` is common to all m)."""
    score = torch.einsum("bpd,bd->bp", members.flatten(2), grad.flatten(1).to(members))
    return score.masked_fill(~valid, -math.inf).argmax(1)


@torch.no_grad()
def member_losses(model: torch.nn.Module, members: Tensor, valid: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy (B, P) of every valid member (-inf elsewhere), the model in eval mode."""
    b, p = valid.shape
    rows, slots = valid.nonzero(as_tuple=True)
    dev = next(model.parameters()).device
    flat = members[rows, slots]
    with _eval_mode(model):
        logits = torch.cat([model(flat[i:i + SCORE_CHUNK].to(dev)) for i in range(0, len(rows), SCORE_CHUNK)])
    loss = torch.full((b, p), -math.inf, device=dev)
    loss[rows.to(dev), slots.to(dev)] = F.cross_entropy(logits, y.to(dev)[rows.to(dev)], reduction="none")
    return loss


def select_by_loss(model: torch.nn.Module, members: Tensor, valid: Tensor, y: Tensor) -> Tensor:
    """(B,) index of the worst valid member for ``model`` (every member classified)."""
    return member_losses(model, members, valid, y).argmax(1)


@dataclass
class TwoPass(Augmented):
    """A batch trained in two passes with one optimiser step (``stages.robust.train_epoch``):
    first this Augmented's inputs (the clean half), whose input gradient d loss / d x goes to
    ``second(grad)``, which returns the other half (one row per row of this one); then
    ``seen(logits)`` gets the model's detached logits on that half and returns its diagnostics."""

    second: Optional[Callable[[Tensor], Augmented]] = None
    seen: Optional[Callable[[Tensor], Dict[str, float]]] = None


def natra_pool(ctx: AugmentContext, batch: Batch, apt: bool) -> TwoPass:
    """NaTra (``_natra``) with the pool: the clean half, then, given its input gradient, the
    members due decoded (at surrogate or random corners) and the worst member of each example."""
    from natra_ray.augment.latent import apt_update, smooth_labels

    cfg, src = ctx.cfg, ctx.latent
    idx = batch.idx.cpu()
    eps_i = src.budgets(idx).cpu()  # the pool and its bookkeeping live on the CPU
    radius = (eps_i + cfg.rho).clamp(max=cfg.eps_cap) if apt else torch.full_like(eps_i, cfg.eps)
    pool = ensure_pool(src, cfg, ctx.num_classes)
    due = pool.due(idx, cfg.pool_refresh)
    pool.visits[idx] += 1
    used = eps_i if apt else radius
    target = smooth_labels(batch.y, ctx.num_classes, cfg.label_smoothing_c * used, ctx.generator)
    y, x_clean = batch.y.cpu(), batch.x.cpu()
    rows_all = torch.arange(len(idx), device=src.device)
    stats: Dict[str, float] = {}

    def second(grad: Tensor) -> Augmented:
        grad = grad.detach()
        rows, slots = due.nonzero(as_tuple=True)
        signs = random_signs(rows.numel(), src.num_directions, ctx.generator)
        surrogate_share = 0.0
        if rows.numel() and cfg.pool_propose == "surrogate":
            # one surrogate corner per example and visit (its first due slot); other due slots random
            first = torch.ones_like(rows, dtype=torch.bool)
            first[1:] = rows[1:] != rows[:-1]
            ready = pool.surrogate.ready(y[rows]) & first
            if bool(ready.any()):
                a = pool.surrogate.directions(y[rows[ready]], grad[rows[ready].to(grad.device)]).cpu()
                signs[ready] = torch.where(a == 0, signs[ready], torch.sign(a))
            surrogate_share = float(ready.sum()) / len(idx)
        if rows.numel():
            r = signs * radius[rows][:, None]
            x_new = decode_into(pool, src, idx[rows], slots, r, radius[rows])
            pool.surrogate.update(y[rows], signs, (x_new - x_clean[rows]) / radius[rows].clamp(min=1e-8).view(-1, 1, 1, 1))
        members, valid = pool.members(idx, src.device), pool.valid(idx).to(src.device)
        if cfg.pool_select == "loss":
            best = select_by_loss(ctx.model, members, valid, batch.y)
        else:
            best = select_by_gradient(members, valid, grad)
        stats.update(pool_members=float(valid.sum(1).float().mean()), pool_decodes=rows.numel() / len(idx),
                     pool_surrogate=surrogate_share)
        return Augmented(members[rows_all, best.to(src.device)], target.to(src.device))

    def judged(logits: Tensor) -> Dict[str, float]:
        mis = logits.argmax(1).cpu() != y
        if apt:
            src.set_budgets(idx, apt_update(eps_i, mis, cfg.rho, cfg.eps_cap))
        return {"eps_mean": float(used.mean()), "adv_fooled": float(mis.float().mean()), **stats}

    return TwoPass(batch.x, one_hot(batch.y, ctx.num_classes), second=second, seen=judged)
