"""NaTra's training pieces: APT (Eq. 13), adaptive label smoothing, latent PGD (Eq. 6) on the
tiny generator, the method registry, and a robust training epoch end to end."""
import pytest
import torch
import torch.nn.functional as F

from natra_ray.augment import AugmentContext, Batch, create_method, list_methods, soft_cross_entropy
from natra_ray.augment.latent import LatentSource, apt_update, latent_attack, smooth_labels
from natra_ray.config import load_config
from natra_ray.data import ImageDataset
from natra_ray.models import create_classifier, create_generator
from natra_ray.models.latent import Directions
from natra_ray.registry import UnknownNameError
from natra_ray.stages import robust


def test_apt_raises_eps_exactly_when_not_fooled_and_never_beyond_cap():
    eps = torch.tensor([0.1, 0.1, 0.45, 0.5])
    fooled = torch.tensor([True, False, False, False])
    new = apt_update(eps, fooled, rho=0.1, cap=0.5)
    assert torch.allclose(new, torch.tensor([0.1, 0.2, 0.5, 0.5]))
    for _ in range(20):  # repeated updates saturate at the cap
        new = apt_update(new, torch.zeros(4, dtype=torch.bool), 0.1, 0.5)
    assert float(new.max()) <= 0.5 + 1e-7


def test_label_smoothing_rows_sum_to_one_and_scale_with_eps():
    y = torch.tensor([0, 3, 9, 9])
    alpha = torch.tensor([0.0, 0.1, 0.5, 1.0])
    t = smooth_labels(y, 10, alpha, torch.Generator().manual_seed(0))
    assert torch.allclose(t.sum(1), torch.ones(4)) and bool((t >= 0).all())
    assert torch.equal(t[0], F.one_hot(y[0], 10).float())  # alpha 0 keeps the hard label
    assert float(t[1, 3]) >= 0.9 - 1e-6 and float(t[2, 9]) >= 0.5 - 1e-6
    assert not torch.allclose(t[3], torch.full((10,), 0.1))  # u is a Dirichlet draw, not uniform


@pytest.fixture(scope="module")
def tiny_world():
    torch.manual_seed(0)
    G = create_generator("style_tiny", resolution=32).eval().requires_grad_(False)
    n = 24
    ws = G.broadcast(G.mapping(G.sample_z(n)))[:, None]  # (n, 1, num_ws, w_dim)
    alpha = torch.ones(n, 1, G.layer_shape(0)[0])
    q, _ = torch.linalg.qr(torch.randn(G.w_dim, 4))
    dirs = Directions(q.t().contiguous(), torch.ones(4), "test")
    src = LatentSource(G, ws, alpha, 0, dirs, 4, (0, G.num_ws - 1), torch.full((n,), 0.3))
    y = torch.arange(n) % 3
    with torch.no_grad():
        x = src.reconstruct(torch.arange(n))
    return src, x, y


def test_latent_pgd_stays_in_ball_and_does_not_lower_the_loss(tiny_world):
    src, x, y = tiny_world
    model = create_classifier("small_cnn", num_classes=3, width=4)
    idx = torch.arange(len(y))
    eps = torch.linspace(0.1, 1.0, len(y))
    x_adv, r, logits = latent_attack(model, src, idx, y, eps, steps=3, step_size=None,
                                     generator=torch.Generator().manual_seed(0), random_start=False)
    assert bool((r.abs() <= eps[:, None] + 1e-6).all())
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert bool((adv >= clean - 1e-5).all()) and float((adv - clean).sum()) > 0


def test_natra_method_applies_apt_and_smoothing(tiny_world):
    src, x, y = tiny_world
    cfg = load_config("smoke", overrides={"robust.rho": 0.2, "robust.eps_cap": 0.9, "robust.pgd_steps": 2,
                                          "robust.num_directions": 4, "robust.label_smoothing_c": 0.5})
    model = create_classifier("small_cnn", num_classes=3, width=4)
    src.eps.fill_(0.3)
    ctx = AugmentContext(model, cfg.robust, 3, torch.Generator().manual_seed(0), src)
    idx = torch.arange(8)
    out = create_method("natra")(ctx, Batch(x[idx], y[idx], idx))
    assert out.x.shape == (16, 1, 32, 32) and out.target.shape == (16, 3)
    assert torch.allclose(out.target.sum(1), torch.ones(16))
    new = src.eps[idx]
    assert bool((((new - 0.3).abs() < 1e-6) | ((new - 0.5).abs() < 1e-6)).all())
    assert torch.equal(src.eps[8:], torch.full((len(y) - 8,), 0.3))  # only the batch's budgets move


def test_natra_oa_keeps_a_fixed_budget(tiny_world):
    src, x, y = tiny_world
    cfg = load_config("smoke", overrides={"robust.num_directions": 4})
    src.eps.fill_(0.3)
    ctx = AugmentContext(create_classifier("small_cnn", num_classes=3, width=4), cfg.robust, 3,
                         torch.Generator().manual_seed(0), src)
    idx = torch.arange(8)
    out = create_method("natra_oa")(ctx, Batch(x[idx], y[idx], idx))
    assert torch.equal(src.eps, torch.full((len(y),), 0.3)) and out.info["eps_mean"] == pytest.approx(cfg.robust.eps)


def test_method_registry():
    assert {"none", "natra", "natra_oa", "natra_ol", "random_latent"} <= set(list_methods())
    with pytest.raises(UnknownNameError, match="unknown augmentation method 'natra2'; known names are"):
        create_method("natra2")


def test_soft_cross_entropy_matches_hard_labels():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(y, 4).float()),
                          F.cross_entropy(logits, y, reduction="none"), atol=1e-6)


def test_robust_epoch_learns_and_diverging_loss_fails_clearly(tiny_world, tmp_path):
    src, x, y = tiny_world
    g = torch.Generator().manual_seed(0)
    # two separable classes: bright left half vs bright right half
    imgs = torch.zeros(64, 1, 32, 32)
    lab = torch.arange(64) % 2
    imgs[lab == 0, :, :, :16] = 1.0
    imgs[lab == 1, :, :, 16:] = 1.0
    imgs += 0.05 * torch.rand(imgs.shape, generator=g)
    data = ImageDataset(imgs.clamp(0, 1), lab, ["left", "right"])
    cfg = load_config("smoke", overrides={"robust.method": "none", "robust.epochs": 3, "robust.batch_size": 16,
                                          "robust.classifier_width": 4, "robust.lr": 0.05})
    art = robust.run(cfg, data, data, tmp_path)
    assert art.history[-1]["val_acc"] >= 0.9 and art.classifier_path.is_file()

    bad = cfg.replace(**{"robust.lr": 1e12, "robust.momentum": 0.0})
    with pytest.raises(FloatingPointError, match="lower robust.lr"):
        robust.run(bad, data, data, tmp_path / "bad")


def test_classifier_artifact_loads_without_natra_ray(tmp_path):
    import subprocess
    import sys

    cfg = load_config("smoke", overrides={"robust.classifier_width": 4})
    model = robust.build_classifier(cfg, 10).eval()
    path = robust.save_classifier(tmp_path / "classifier.pt", model, cfg, 10)
    x = torch.rand(3, 1, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "ref.pt")
    # A fresh interpreter that never imports natra_ray: only torch.
    code = ("import sys, torch; sys.modules['natra_ray'] = None; "
            f"m = torch.jit.load(r'{path.with_suffix('.torchscript.pt')}'); "
            f"x = torch.load(r'{tmp_path / 'x.pt'}'); ref = torch.load(r'{tmp_path / 'ref.pt'}'); "
            "assert torch.allclose(m(x), ref, atol=1e-5); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
