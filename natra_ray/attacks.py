"""Adversarial attacks: small pure functions used by training (NaTra's inner maximisation,
pixel-space Adv baseline) and by evaluation (pixel PGD accuracy, DeepFool score).

Conventions shared by the *pixel* attacks (``fgsm``, ``pgd_linf``, the ``ATTACKS`` registry):

* signature ``attack(model, x, y, *, eps, ...) -> x_adv``;
* ``x`` is a batch of images in [0, 1], shape (B, C, H, W); ``y`` int64 labels, shape (B,);
* the result is detached and clamped to [0, 1];
* the model runs in eval mode during the attack (so BatchNorm/Dropout do not couple or randomise
  the examples) and is put back in its original train/eval mode afterwards;
* gradients are taken with ``torch.autograd.grad`` w.r.t. the input only, so no ``.grad`` is
  ever left on the model's parameters (an attack inside a training step must not pollute the
  optimiser's gradients).

``deepfool`` (a minimal-norm attack, no eps) and ``latent_pgd`` (an attack on an arbitrary
per-example loss of a latent offset, used by the NaTra stage with a decode-and-classify closure)
have their own signatures and are not in the registry.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natra_ray.registry import Registry

PixelAttack = Callable[..., Tensor]
ATTACKS: Registry[Tensor] = Registry("attack")


@contextlib.contextmanager
def _eval_mode(model: nn.Module, only: Optional[type] = None) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (or only its submodules of type ``only``, e.g. BatchNorm),
    restoring every submodule's own ``training`` flag on exit (restoring only the top-level flag
    would flip submodules a user froze on purpose)."""
    modes = [(m, m.training) for m in model.modules() if only is None or isinstance(m, only)]
    if only is None:
        model.eval()
    else:
        for m, _ in modes:
            m.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradient of the summed cross-entropy w.r.t. ``x`` only; returns (grad, per-example loss).

    Summing is exact per example because the model is in eval mode (examples independent)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="none")  # (B,)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, loss.detach()


def _broadcast(eps: Union[float, Tensor], like: Tensor) -> Union[float, Tensor]:
    """A per-example (B,) eps reshaped to (B, 1, 1, ...) to broadcast over ``like``."""
    if isinstance(eps, Tensor) and eps.dim() > 0:
        return eps.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return float(eps)


@ATTACKS.register("none")
def no_attack(model: nn.Module, x: Tensor, y: Tensor, **_: object) -> Tensor:
    """Identity 'attack' so that clean accuracy goes through the same code path."""
    return x.detach().clamp(0.0, 1.0)


@ATTACKS.register("fgsm")
def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: Union[float, Tensor]) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): ``x + eps * sign(grad_x CE)``.

    ``eps`` is a float or a per-example (B,) tensor. Returns x_adv (B, C, H, W) in [0, 1]."""
    with _eval_mode(model):
        grad, _ = _input_grad(model, x, y)
    return (x.detach() + _broadcast(eps, x) * grad.sign()).clamp(0.0, 1.0)


@ATTACKS.register("pgd_linf")
def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: Union[float, Tensor],
    steps: int = 10,
    step_size: Optional[float] = None,
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """l_inf projected gradient ascent on the cross-entropy (Madry et al. 2018).

    ``step_size`` defaults to ``2.5 * eps / steps`` (Madry's rule: enough to reach the boundary
    from any start point). The start is uniform in the eps ball when ``random_start``. Returns
    the last iterate (as Madry), which lies in the l_inf eps ball around ``x`` and in [0, 1].
    """
    x0 = x.detach()
    if steps <= 0:
        return x0.clamp(0.0, 1.0)
    e = _broadcast(eps, x0)
    alpha = 2.5 * e / steps if step_size is None else step_size
    if random_start:
        u = torch.rand(x0.shape, generator=generator, dtype=x0.dtype,
                       device=generator.device if generator is not None else x0.device)
        x_adv = x0 + (2.0 * u.to(x0.device) - 1.0) * e
    else:
        x_adv = x0.clone()
    x_adv = _project(x_adv, x0, e)
    with _eval_mode(model):
        for _ in range(steps):
            grad, _ = _input_grad(model, x_adv, y)
            x_adv = _project(x_adv + alpha * grad.sign(), x0, e)
    return x_adv


def _project(x_adv: Tensor, x0: Tensor, e: Union[float, Tensor]) -> Tensor:
    """Projection onto (l_inf ball of radius e around x0) ∩ [0, 1]; the two boxes intersect in
    a box, so clamping to one then the other is the exact projection."""
    return torch.max(torch.min(x_adv, x0 + e), x0 - e).clamp(0.0, 1.0)


def deepfool(
    model: nn.Module,
    x: Tensor,
    *,
    num_classes: Optional[int] = None,
    max_iter: int = 50,
    overshoot: float = 0.02,
    clamp: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Multi-class DeepFool (Moosavi-Dezfooli et al. 2016; Algorithm 2 in the lecture notes),
    batched, following the authors' reference implementation.

    For each example, with k0 the model's *clean prediction* (no labels needed) and x_i the
    current point, linearise every candidate class k: ``w'_k = ∇f_k(x_i) - ∇f_k0(x_i)``,
    ``f'_k = f_k(x_i) - f_k0(x_i)``; step to the nearest linearised boundary,
    ``r_i = (|f'_l| / ||w'_l||_2 + 1e-4) * w'_l / ||w'_l||_2`` (the 1e-4 is the reference code's
    guard against stalling exactly on the boundary), accumulate ``r_tot += r_i`` and evaluate at
    ``x_{i+1} = x + (1 + overshoot) * r_tot`` until the prediction changes or ``max_iter`` steps.

    Args:
        num_classes: candidates are the top-``num_classes`` clean logits (reference code: 10);
            None = all classes.
        clamp: clamp the evaluated points to [0, 1]. Off by default, as in the paper: the
            DeepFool score measures the distance to the decision boundary of f, not the
            distance within the image domain (with clamp=True, r = x_adv - x is still exact).

    Returns:
        x_adv (B, C, H, W): ``x + r``;
        r (B, C, H, W): the perturbation **including the overshoot**, ``(1 + overshoot) * r_tot``
            (what the reference implementation returns and what its robustness score uses);
        iterations (B,) int64: steps taken per example; >= 1 unless ``max_iter == 0``, since
            the reference label is the clean prediction itself (1 for a linear model).
    Examples that do not flip within ``max_iter`` keep their last perturbation.
    """
    x0 = x.detach()
    b = x0.shape[0]
    scale = 1.0 + overshoot
    r_tot = torch.zeros_like(x0)
    iters = torch.zeros(b, dtype=torch.long, device=x0.device)

    def point(idx: Tensor) -> Tensor:
        p = x0[idx] + scale * r_tot[idx]
        return p.clamp(0.0, 1.0) if clamp else p

    with _eval_mode(model):
        with torch.no_grad():
            logits0 = model(x0)  # (B, K)
        k_all = logits0.shape[1]
        nc = k_all if num_classes is None else max(2, min(num_classes, k_all))
        order = logits0.argsort(dim=1, descending=True)[:, :nc]  # (B, nc); column 0 = k0
        active = torch.arange(b, device=x0.device)  # indices still on the clean label
        for it in range(max_iter + 1):
            xi = point(active).requires_grad_(True)
            logits = model(xi)  # (A, K)
            label = order[active, 0]
            keep = logits.argmax(dim=1) == label
            if it == max_iter or not bool(keep.any()):
                break
            f0 = logits.gather(1, label[:, None]).squeeze(1)  # (A,)
            best_dist = torch.full_like(f0, float("inf"))
            best_f = torch.zeros_like(f0)
            best_w = torch.zeros_like(xi)
            for j in range(1, nc):
                fk = logits.gather(1, order[active, j][:, None]).squeeze(1) - f0  # f'_k (A,)
                # One backward per candidate rank: the sum's gradient is per example because
                # examples are independent in eval mode.
                (wk,) = torch.autograd.grad(fk.sum(), xi, retain_graph=j < nc - 1)
                wnorm = wk.flatten(1).norm(dim=1)
                dist = fk.detach().abs() / (wnorm + 1e-12)
                better = dist < best_dist
                best_dist = torch.where(better, dist, best_dist)
                best_f = torch.where(better, fk.detach().abs(), best_f)
                best_w[better] = wk[better]
            wn = best_w.flatten(1).norm(dim=1).clamp_min(1e-12)
            coef = (best_f / wn + 1e-4) / wn  # (A,) -> r_i = coef * w'_l
            r_i = coef.view(-1, *([1] * (x0.dim() - 1))) * best_w
            # Only examples still on their clean label step; the others are done.
            active = active[keep]
            r_tot[active] += r_i[keep]
            iters[active] += 1
    r = scale * r_tot
    x_adv = (x0 + r).clamp(0.0, 1.0) if clamp else x0 + r
    return x_adv.detach(), (x_adv - x0).detach(), iters


def deepfool_score(
    model: nn.Module, x: Tensor, *, batch_size: int = 256, **kw: object
) -> float:
    """Paper 002's DeepFool score (the paper's rho_adv): mean over examples of
    ``||r(x)||_2 / ||x||_2``, with r the DeepFool perturbation *including the overshoot*
    (``(1 + overshoot) * r_tot``, as in Moosavi-Dezfooli et al.'s code). Higher = more robust.
    ``kw`` goes to ``deepfool`` (num_classes, max_iter, overshoot, clamp)."""
    ratios: List[Tensor] = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size]
        _, r, _ = deepfool(model, xb, **kw)  # type: ignore[arg-type]
        ratios.append(r.flatten(1).norm(dim=1) / xb.flatten(1).norm(dim=1).clamp_min(1e-12))
    return float(torch.cat(ratios).mean()) if ratios else float("nan")


def latent_pgd(
    loss_fn: Callable[[Tensor], Union[Tensor, Tuple[Tensor, ...]]],
    delta_shape: Sequence[int],
    *,
    eps: Union[float, Tensor],
    steps: int,
    step_size: Union[float, Tensor, None] = None,
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
    return_aux: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, ...]]]:
    """Projected signed-gradient ASCENT on a per-example loss over an l_inf ball (NaTra Eq. 6),
    independent of any generator: the caller's ``loss_fn(delta) -> (B,)`` decodes and
    classifies (and owns the model's train/eval mode).

    ``delta`` has ``delta_shape`` = (B, ...); ``eps`` is a float or a per-example (B,) tensor
    broadcast over the remaining dims; ``step_size`` defaults to ``2.5 * eps / steps``. The
    start is uniform in the ball (``random_start``) or zero.

    Returns the delta with the highest loss **seen** per example among all evaluated iterates,
    the starting point included, so the result is never worse than the start (unlike the last
    PGD iterate, which a non-concave loss can make worse). ``steps`` gradient evaluations plus
    one gradient-free evaluation of the final iterate. ``steps == 0`` or ``eps == 0`` returns
    zeros (for a tensor eps, the rows with eps 0 stay zero). The result is detached.

    With ``return_aux``, ``loss_fn`` returns ``(loss, *aux)`` with per-example tensors (B, ...)
    (e.g. the decoded images and the logits) and the result is ``(delta, aux)``, ``aux`` taken
    at the same best iterate: a caller needs no second decode or classifier pass (for a zero
    budget, ``loss_fn`` is evaluated once at delta = 0, without gradients).
    """
    if device is None:
        device = eps.device if isinstance(eps, Tensor) else torch.device("cpu")
    zeros = torch.zeros(tuple(delta_shape), device=device)
    e = _broadcast(eps, zeros)
    no_budget = (steps <= 0 or (not isinstance(e, Tensor) and e == 0.0)
                 or (isinstance(e, Tensor) and not bool((e > 0).any())))
    if no_budget:
        if not return_aux:
            return zeros
        with torch.no_grad():
            _, *aux = loss_fn(zeros)
        return zeros, tuple(a.detach() for a in aux)
    alpha = 2.5 * e / steps if step_size is None else _broadcast(step_size, zeros)
    if random_start:
        u = torch.rand(zeros.shape, generator=generator,
                       device=generator.device if generator is not None else device)
        delta = (2.0 * u.to(device) - 1.0) * e
    else:
        delta = zeros.clone()
    best = delta.clone()
    best_loss = torch.full((zeros.shape[0],), -float("inf"), device=device)
    best_aux: List[Tensor] = []
    for it in range(steps + 1):
        last = it == steps
        d = delta.detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            out = loss_fn(d)
        loss, aux = (out[0], out[1:]) if return_aux else (out, ())
        loss = loss.reshape(-1)  # (B,)
        improved = loss.detach() > best_loss
        best_loss = torch.where(improved, loss.detach(), best_loss)
        best[improved] = delta[improved]
        if not best_aux:
            best_aux = [a.detach().clone() for a in aux]
        else:
            for b, a in zip(best_aux, aux):
                b[improved] = a.detach()[improved]
        if last:
            break
        (g,) = torch.autograd.grad(loss.sum(), d)  # per-example: losses are independent
        delta = (delta + alpha * g.sign()).clamp(-e, e)  # signed ascent step, then projection
    return (best.detach(), tuple(best_aux)) if return_aux else best.detach()


def create_attack(name: str, **kw: object) -> PixelAttack:
    """A pixel attack ``attack(model, x, y)`` with its keyword arguments bound."""
    return functools.partial(ATTACKS.get(name), **kw)


def list_attacks() -> List[str]:
    return ATTACKS.names()


def accuracy_under(
    attack: Union[str, PixelAttack, None],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 256,
    **kw: object,
) -> float:
    """Accuracy of ``model`` on ``attack(model, x, y, **kw)``, in batches (None = clean).

    ``attack`` is a registered name or a callable with the pixel-attack signature. The model
    is evaluated in eval mode and restored afterwards."""
    fn: PixelAttack = no_attack if attack is None else (
        ATTACKS.get(attack) if isinstance(attack, str) else attack)
    correct = 0
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        x_adv = fn(model, xb, yb, **kw)
        with _eval_mode(model), torch.no_grad():
            correct += int((model(x_adv).argmax(dim=1) == yb).sum())
    return correct / max(1, x.shape[0])
