"""Attacks checked against closed forms on linear classifiers, plus invariants (eps ball,
[0, 1], model mode, no parameter gradients) on small nonlinear ones."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natra_ray.attacks import (
    ATTACKS,
    accuracy_under,
    create_attack,
    deepfool,
    deepfool_score,
    fgsm,
    latent_pgd,
    list_attacks,
    pgd_linf,
)
from natra_ray.registry import UnknownNameError

SHAPE = (1, 4, 4)  # (C, H, W) of the toy images
D = 16


def linear_model(num_classes: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, num_classes))


def mlp(num_classes: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(32, num_classes))


def images(b: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((b, *SHAPE), generator=torch.Generator().manual_seed(seed))


def boundary_distances(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Closed form for an affine classifier: min_k |f_k - f_y| / ||w_k - w_y||, y = argmax."""
    lin = model[1]
    with torch.no_grad():
        f = model(x)  # (B, K)
        y = f.argmax(1)
        w = lin.weight  # (K, D)
        dw = w[None, :, :] - w[y][:, None, :]  # (B, K, D)
        df = (f - f.gather(1, y[:, None])).abs()  # (B, K)
        dist = df / dw.norm(dim=2)
        dist[torch.arange(len(y)), y] = float("inf")
    return dist.min(dim=1).values


# ----------------------------------------------------------------------------- DeepFool
@pytest.mark.parametrize("num_classes", [2, 5])
def test_deepfool_linear_matches_distance_to_boundary(num_classes: int) -> None:
    model, x, os_ = linear_model(num_classes), images(32), 0.02
    x_adv, r, iters = deepfool(model, x, overshoot=os_)
    dist = boundary_distances(model, x)
    # One linear step reaches the nearest boundary exactly (+1e-4 guard), then the overshoot.
    expected = (1 + os_) * (dist + 1e-4)
    torch.testing.assert_close(r.flatten(1).norm(dim=1), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(iters, torch.ones_like(iters))
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != model(x).argmax(1)).all()
    torch.testing.assert_close(x_adv, x + r)


def test_deepfool_binary_direction_is_weight_difference() -> None:
    model, x = linear_model(2), images(8)
    _, r, _ = deepfool(model, x)
    y = model(x).argmax(1)
    dw = model[1].weight[1 - y] - model[1].weight[y]  # (B, D): toward the other class
    cos = F.cosine_similarity(r.flatten(1), dw.detach(), dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_deepfool_score_closed_form_and_top_k_candidates() -> None:
    model, x, os_ = linear_model(5), images(40), 0.05
    expected = ((1 + os_) * (boundary_distances(model, x) + 1e-4)
                / x.flatten(1).norm(dim=1)).mean()
    score = deepfool_score(model, x, overshoot=os_, batch_size=16)  # 3 uneven batches
    assert math.isclose(score, float(expected), rel_tol=1e-4)
    # Restricting to the top-2 classes can only find a boundary at least as far away.
    assert deepfool_score(model, x, overshoot=os_, num_classes=2) >= score - 1e-6


def test_deepfool_nonlinear_flips_every_label_and_restores_mode() -> None:
    model = mlp()
    model.train()
    x = images(16)
    x_adv, r, iters = deepfool(model, x, max_iter=50)
    assert model.training and model[3].training  # mode restored on every submodule
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != model(x).argmax(1)).all()
    assert (iters >= 1).all() and r.abs().sum() > 0


def test_deepfool_clamp_stays_in_unit_box() -> None:
    x_adv, r, _ = deepfool(linear_model(3), images(8), clamp=True)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    torch.testing.assert_close(x_adv, images(8) + r)


# ----------------------------------------------------------------------------- FGSM
def test_fgsm_linear_binary_is_sign_of_weight_difference() -> None:
    model, x, eps = linear_model(2), images(16), 0.1
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(3))
    w = model[1].weight.detach()
    # grad_x CE = (1 - p_y) (w_other - w_y) for two classes, so its sign is that of dw.
    expected = (x + eps * torch.sign(w[1 - y] - w[y]).view_as(x)).clamp(0, 1)
    out = fgsm(model, x, y, eps=eps)
    torch.testing.assert_close(out, expected)
    assert out.min() >= 0 and out.max() <= 1 and (out == 1).any()  # clamping was exercised
    assert all(p.grad is None for p in model.parameters())


def test_fgsm_per_example_eps() -> None:
    model, x = linear_model(3), images(4)
    y = torch.zeros(4, dtype=torch.long)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.1])
    out = fgsm(model, x.clamp(0.2, 0.8), y, eps=eps)
    delta = (out - x.clamp(0.2, 0.8)).flatten(1).abs().amax(1)
    torch.testing.assert_close(delta, eps)


# ----------------------------------------------------------------------------- PGD
def test_pgd_linf_in_ball_and_raises_loss() -> None:
    model = mlp()
    model.train()
    x = images(64)
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    eps = 0.1
    x_adv = pgd_linf(model, x, y, eps=eps, steps=10, generator=torch.Generator().manual_seed(0))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        adv = F.cross_entropy(model(x_adv), y)
    assert adv > clean


def test_pgd_linf_linear_deterministic_and_per_example_eps() -> None:
    model, x = linear_model(3), images(8)
    y = torch.zeros(8, dtype=torch.long)
    eps = torch.linspace(0.0, 0.2, 8)
    a = pgd_linf(model, x, y, eps=eps, steps=5, generator=torch.Generator().manual_seed(7))
    b = pgd_linf(model, x, y, eps=eps, steps=5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert ((a - x).flatten(1).abs().amax(1) <= eps + 1e-6).all()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(a), y, reduction="none")
    assert (adv[1:] > clean[1:]).all() and torch.isclose(adv[0], clean[0])


# ----------------------------------------------------------------------------- latent PGD
def test_latent_pgd_concave_loss_reaches_boundary_per_example() -> None:
    eps = torch.tensor([0.05, 0.1, 0.3])
    c = torch.tensor([[1.0, -1.0, 2.0, -0.5]] * 3)  # outside every ball: optimum on the boundary
    delta = latent_pgd(lambda d: -((d - c) ** 2).sum(1), (3, 4), eps=eps, steps=20,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(delta, torch.sign(c) * eps[:, None])
    assert (delta.abs() <= eps[:, None] + 1e-7).all()


def test_latent_pgd_never_worse_than_start() -> None:
    def loss(d: torch.Tensor) -> torch.Tensor:  # max at 0.01; oscillates, not concave
        return torch.cos(20.0 * (d - 0.01)).sum(1)

    start_loss = loss(torch.zeros(5, 3))
    # One step of 2.5 * eps = 0.25 lands on a much lower loss: the start must be returned.
    one = latent_pgd(loss, (5, 3), eps=0.1, steps=1, random_start=False)
    assert torch.equal(one, torch.zeros(5, 3))
    for steps in (2, 5, 13):
        d = latent_pgd(loss, (5, 3), eps=0.5, steps=steps, random_start=False)
        assert (loss(d) >= start_loss - 1e-6).all() and d.abs().max() <= 0.5


def test_latent_pgd_aux_is_taken_at_the_returned_iterate() -> None:
    """return_aux hands back what loss_fn computed at the delta it returns (what NaTra uses
    instead of decoding and classifying the winner again), for every example and budget."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    y = torch.tensor([0, 1, 2, 0, 1])

    def fn(d: torch.Tensor):
        x = torch.tanh(3.0 * d)  # non-concave: the best iterate is often not the last
        logits = lin(x)
        return F.cross_entropy(logits, y, reduction="none"), x, logits

    for eps, steps in ((0.4, 3), (torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0]), 7), (0.3, 0)):
        g = torch.Generator().manual_seed(2)
        d, (x, logits) = latent_pgd(fn, (5, 4), eps=eps, steps=steps, generator=g, return_aux=True)
        plain = latent_pgd(lambda t: fn(t)[0], (5, 4), eps=eps, steps=steps, generator=torch.Generator().manual_seed(2))
        assert torch.equal(d, plain)  # the aux path picks the same iterate
        with torch.no_grad():
            _, x_ref, logits_ref = fn(d)
        torch.testing.assert_close(x, x_ref)
        torch.testing.assert_close(logits, logits_ref)
        assert not x.requires_grad and not logits.requires_grad


def test_latent_pgd_zero_budget_and_no_param_grads() -> None:
    lin = nn.Linear(4, 2)
    fn = lambda d: F.cross_entropy(lin(d), torch.zeros(6, dtype=torch.long), reduction="none")
    assert torch.equal(latent_pgd(fn, (6, 4), eps=0.0, steps=5), torch.zeros(6, 4))
    assert torch.equal(latent_pgd(fn, (6, 4), eps=0.3, steps=0), torch.zeros(6, 4))
    eps = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.0])
    d = latent_pgd(fn, (6, 4), eps=eps, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(d[eps == 0], torch.zeros(3, 4))
    assert ((d.abs().amax(1) - eps).abs() < 1e-6)[eps > 0].all()  # linear loss: on the boundary
    assert all(p.grad is None for p in lin.parameters())
    with torch.no_grad():
        assert (fn(d) >= fn(torch.zeros(6, 4)) - 1e-6).all()


# ----------------------------------------------------------------------------- registry, accuracy
def test_registry_and_accuracy_under() -> None:
    assert {"fgsm", "pgd_linf", "none"} <= set(list_attacks())
    with pytest.raises(UnknownNameError, match="fgsm"):
        create_attack("nope")
    model, x = linear_model(3), images(50)
    with torch.no_grad():
        y = model(x).argmax(1)  # every clean prediction is correct by construction
    assert accuracy_under(None, model, x, y, batch_size=16) == 1.0
    assert accuracy_under("none", model, x, y) == 1.0
    attack = create_attack("pgd_linf", eps=0.3, steps=10,
                           generator=torch.Generator().manual_seed(0))
    acc = accuracy_under(attack, model, x, y, batch_size=16)
    assert 0.0 <= acc < 1.0
    assert accuracy_under(ATTACKS.get("fgsm"), model, x, y, eps=0.3) < 1.0
