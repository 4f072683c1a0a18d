"""NaTra's fast mode (``robust.natra_mode=pool``): worst-of-P over a pool of decoded edits.

The exact mode (Eq. 6) spends K decodes *with gradients through G* and K classifier
forward/backward passes on every example of every batch: ~9x a standard step
(BENCHMARKS.md section 1). On a low-dimensional perturbation set the worst of a few sampled
transformations trains about as robust a model as a first-order attack does (Engstrom et
al. 2019, "Exploring the landscape of spatial robustness": worst-of-10 for rotations and
translations), and the edits latent PGD ends on are corners of the l_inf box anyway (a signed
step of 2.5 eps / K from a random start saturates every coordinate). So the pool mode keeps,
per training example, P decoded corners of its budget box and trains on the worst of them:

* **Pool.** ``LatentPool`` holds P members per example: uint8 images (P x C x H x W bytes)
  and their edit coefficients ``r`` (``|r|_inf`` = the example's attack radius when the member
  was decoded: ``eps_i + rho`` with APT, ``eps`` without). Members are random corners
  ``radius * s``, ``s`` in {-1, +1}^k, decoded by G without gradients: real decodes, within
  the budget (APT only ever raises ``eps_i``, so an older member stays inside it).
* **Refresh.** Each slot is re-decoded every ``robust.pool_refresh`` (R) visits of its example
  (~ epochs), the slots staggered over examples and visits, so every batch decodes ~P / R
  members per example: the cost of decoding the whole pool every R epochs, spread evenly
  (no epoch pays it at once), with no per-epoch hook (the in-process trainer and the Ray
  worker loop call the method alike, and each worker fills the pool of what it visits). An
  example's first visit decodes one member at least. Each new member is at the example's
  radius *then*, so the pool follows APT's budget with a lag of at most R epochs.
* **Selection** (``robust.pool_select``), by the current model, no decode and no gradient
  through G:

  - ``loss``: the exact worst member: the classifier's loss on every member (P forward
    passes in eval mode, as the exact mode's attack scores its iterates);
  - ``gradient``: the first-order worst, ``argmax_m <g, x_m>`` where ``g`` = d loss / d x of
    the *clean* image under the current model. The trainer gets ``g`` for free: it trains the
    clean half first (``TwoPass``), hands its input gradient over, then trains the selected
    half and takes one optimiser step on both (the same loss as one pass over the 2B batch;
    BatchNorm normalises each half over its own rows). Selecting costs P dot products of
    C x H x W per example instead of P classifier passes.

* **APT and label smoothing** as in ``natra``: the adversarial half is labelled with
  ``c * eps_i``, and ``eps_i`` grows by rho (to the cap) unless the selected member fools the
  model (eval-mode logits for ``loss``; the training pass's own logits for ``gradient``).

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


@dataclass
class LatentPool:
    """P decoded members per training example (CPU tensors, indexed by example position)."""

    images: Tensor  # (N, P, C, H, W) uint8
    coeffs: Tensor  # (N, P, k) float32 edit coefficients of each member
    radius: Tensor  # (N, P) float32: the budget |r|_inf each member was decoded at; < 0 = empty slot
    visits: Tensor  # (N,) int64: visits of each example so far (drives the refresh schedule)

    @classmethod
    def empty(cls, n: int, size: int, k: int, image_shape: tuple[int, ...]) -> "LatentPool":
        return cls(torch.zeros(n, size, *image_shape, dtype=torch.uint8), torch.zeros(n, size, k),
                   torch.full((n, size), -1.0), torch.zeros(n, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.images.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.coeffs, self.radius, self.visits))

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


def corners(n: int, k: int, radius: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """(n, k) random corners of the l_inf boxes of ``radius`` (n,): ``radius * s``, s in {-1, 1}^k."""
    s = torch.randint(0, 2, (n, k), generator=generator).float() * 2 - 1
    return s * radius[:, None]


def ensure_pool(src, cfg) -> LatentPool:  # src: LatentSource, cfg: RobustConfig
    """The latent source's pool, made on first use (``cfg.pool_size`` slots per example)."""
    pool = getattr(src, "pool", None)
    if pool is None or pool.images.shape[0] != src.ws.shape[0] or pool.size != cfg.pool_size:
        with torch.no_grad():
            shape = tuple(src.reconstruct(torch.zeros(1, dtype=torch.long)).shape[1:])
        pool = LatentPool.empty(src.ws.shape[0], cfg.pool_size, src.num_directions, shape)
        src.pool = pool
    return pool


@torch.no_grad()
def refresh(pool: LatentPool, src, idx: Tensor, radius: Tensor, refresh_every: int,
            generator: Optional[torch.Generator]) -> int:
    """Decode the members due at this visit of examples ``idx`` (``radius`` (B,) their current
    attack radius), count the visit; returns the number of members decoded."""
    idx = idx.cpu()
    due = pool.due(idx, refresh_every)
    rows, slots = due.nonzero(as_tuple=True)  # (M,), (M,)
    pool.visits[idx] += 1
    if rows.numel() == 0:
        return 0
    r = corners(rows.numel(), src.num_directions, radius[rows].float(), generator)
    ex = idx[rows]
    for i in range(0, rows.numel(), DECODE_CHUNK):
        j = slice(i, i + DECODE_CHUNK)
        ws, alpha = src.codes(ex[j])
        x = src.decode(ws, alpha, r[j].to(src.device)).cpu()
        pool.images[ex[j], slots[j]] = to_uint8(x)
    pool.coeffs[ex, slots] = r
    pool.radius[ex, slots] = radius[rows].float()
    return int(rows.numel())


def select_by_gradient(members: Tensor, valid: Tensor, grad: Tensor) -> Tensor:
    """(B,) index of the first-order worst member: ``argmax_m <grad, x_m>`` over valid members
    (= the largest first-order loss increase ``<grad, x_m - x>``: ``x`` is common to all m)."""
    score = torch.einsum("bpd,bd->bp", members.flatten(2), grad.flatten(1).to(members))
    return score.masked_fill(~valid, -math.inf).argmax(1)


@torch.no_grad()
def member_losses(model: torch.nn.Module, members: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy (B, P) and logits (B, P, classes) of every member, model in eval mode."""
    b, p = members.shape[:2]
    flat = members.flatten(0, 1)
    dev = next(model.parameters()).device
    with _eval_mode(model):
        logits = torch.cat([model(flat[i:i + SCORE_CHUNK].to(dev)) for i in range(0, b * p, SCORE_CHUNK)])
    yy = y.to(dev).repeat_interleave(p)
    return F.cross_entropy(logits, yy, reduction="none").view(b, p), logits.view(b, p, -1)


def select_by_loss(model: torch.nn.Module, members: Tensor, valid: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) index of the worst valid member for ``model`` and its eval-mode logits (B, classes)."""
    loss, logits = member_losses(model, members, y)
    best = loss.masked_fill(~valid.to(loss.device), -math.inf).argmax(1)
    return best, logits[torch.arange(len(best), device=best.device), best]


@dataclass
class TwoPass(Augmented):
    """A batch trained in two passes with one optimiser step (``stages.robust.train_epoch``):
    first this Augmented's inputs (the clean half), whose input gradient d loss / d x goes to
    ``second(grad)``, which returns the other half (one row per row of this one); then
    ``seen(logits)`` gets the model's detached logits on that half and returns its diagnostics."""

    second: Optional[Callable[[Tensor], Augmented]] = None
    seen: Optional[Callable[[Tensor], Dict[str, float]]] = None


def natra_pool(ctx: AugmentContext, batch: Batch, apt: bool) -> Augmented:
    """NaTra (``_natra``) with the pool: clean half + the worst pool member of each example."""
    from natra_ray.augment.latent import apt_update, smooth_labels

    cfg, src = ctx.cfg, ctx.latent
    idx = batch.idx.cpu()
    eps_i = src.eps[idx]
    radius = (eps_i + cfg.rho).clamp(max=cfg.eps_cap) if apt else torch.full_like(eps_i, cfg.eps)
    pool = ensure_pool(src, cfg)
    decoded = refresh(pool, src, idx, radius, cfg.pool_refresh, ctx.generator)
    members, valid = pool.members(idx, src.device), pool.valid(idx).to(src.device)
    used = eps_i if apt else radius
    target = smooth_labels(batch.y, ctx.num_classes, cfg.label_smoothing_c * used, ctx.generator)
    clean_t = one_hot(batch.y, ctx.num_classes)
    y = batch.y.cpu()
    rows = torch.arange(len(idx), device=src.device)

    def judged(logits: Tensor) -> Dict[str, float]:
        mis = (logits.argmax(1).cpu() != y)
        if apt:
            src.eps[idx] = apt_update(eps_i, mis, cfg.rho, cfg.eps_cap)
        return {"eps_mean": float(used.mean()), "adv_fooled": float(mis.float().mean()),
                "pool_members": float(valid.sum(1).float().mean()), "pool_decodes": decoded / len(idx)}

    if cfg.pool_select == "loss":
        best, logits = select_by_loss(ctx.model, members, valid, batch.y)
        info = judged(logits)
        x_adv = members[rows, best]
        x = torch.cat([batch.x.to(x_adv.device), x_adv])
        return Augmented(x, torch.cat([clean_t, target]).to(x.device), info)

    def second(grad: Tensor) -> Augmented:
        best = select_by_gradient(members, valid, grad.detach())
        return Augmented(members[rows, best], target.to(members.device))

    return TwoPass(batch.x, clean_t, second=second, seen=judged)
