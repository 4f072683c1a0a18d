"""Learned perturbation sets (issue 6, paper 001 after Wong & Kolter): the CVAE's losses, the
linear-cost regulariser, pair data, closure metrics on held-out pairs, the `cvae` method's
L2 ball, checkpoints and the pipeline cache. Tiny models on 16-32 px images: seconds on CPU."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from natra_ray import cache
from natra_ray.augment import AugmentContext, Batch, Needs, create_method, list_methods, method_needs
from natra_ray.augment.cvae import cvae_attack, l2_pgd, project_l2, random_in_ball, uniform_in_ball
from natra_ray.checkpoints import CheckpointError
from natra_ray.config import ConfigError, load_config
from natra_ray.data import DatasetError, ImageDataset
from natra_ray.data.pairs import (PairData, apply_family, list_families, make_bundles, read_pair_folders,
                                  split_pairs)
from natra_ray.models import create_classifier
from natra_ray.models.cvae import CvaeOutput, create_cvae, list_cvaes
from natra_ray.search_space import search_space_from_dict
from natra_ray.stages import cvae as stage
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.upstream import extra_model_paths, load_extra_models


def blobs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n smooth, asymmetric gray blobs (B, 1, size, size) in [0, 1]: rotations change them."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    c = (torch.rand(n, 2, generator=g) - 0.5) * 0.8  # off-centre, so rotation moves them
    w = 0.15 + 0.2 * torch.rand(n, 2, generator=g)
    img = torch.exp(-(((xx - c[:, 0, None, None]) / w[:, 0, None, None]) ** 2
                      + ((yy - c[:, 1, None, None]) / w[:, 1, None, None]) ** 2))
    return img[:, None].clamp(0, 1)


def tiny_cfg(**over):
    base = {"data.image_size": 16, "cvae.hidden": 32, "cvae.batch_size": 16, "cvae.epochs": 2,
            "cvae.lr": 0.003, "cvae.sweep_images": 2}
    return load_config("smoke", overrides={**base, **over})


# --------------------------------------------------------------------------- losses
def test_linear_cost_reg_is_zero_exactly_for_linear_encodings():
    torch.manual_seed(0)
    # dyadic values: the arithmetic is exact, so "zero" can be asserted exactly
    mu_p, d = torch.randint(-16, 16, (5, 3)) / 8.0, torch.randint(-16, 16, (5, 3)) / 8.0
    assert torch.equal(stage.linear_cost_reg(mu_p + d, mu_p + 2 * d, mu_p), torch.zeros(5))
    mu_p, d = torch.randn(5, 3), torch.randn(5, 3)  # and zero up to rounding for any floats
    assert torch.allclose(stage.linear_cost_reg(mu_p + d, mu_p + 2 * d, mu_p), torch.zeros(5), atol=1e-5)
    # any other ratio is penalised by |2 d - r d| summed over latent dims
    reg = stage.linear_cost_reg(mu_p + d, mu_p + 3 * d, mu_p)
    assert torch.allclose(reg, d.abs().sum(1))
    assert (stage.linear_cost_reg(mu_p + d, mu_p + 1.5 * d, mu_p) > 0).all()


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, lv, mu_p, lv_p = (torch.randn(4, 3) for _ in range(4))
    q = torch.distributions.Normal(mu, (0.5 * lv).exp())
    p = torch.distributions.Normal(mu_p, (0.5 * lv_p).exp())
    ref = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(stage.gaussian_kl(mu, lv, mu_p, lv_p), ref, atol=1e-5)
    assert torch.allclose(stage.gaussian_kl(mu, lv, mu, lv), torch.zeros(4), atol=1e-6)


def test_cvae_loss_terms_and_normalisation():
    torch.manual_seed(0)
    b, k = 4, 2
    t = torch.rand(b, 1, 4, 4)
    outs = [CvaeOutput(torch.randn(b, 1, 4, 4), torch.randn(b, k), torch.randn(b, k), torch.zeros(b, k),
                       torch.zeros(b, k)) for _ in range(2)]
    terms = stage.cvae_loss(outs, [t, t], beta=0.5, reg_weight=2.0)
    n_pairs = 2 * b
    rec = sum(F.binary_cross_entropy_with_logits(o.logits, t, reduction="sum") for o in outs) / n_pairs
    reg = stage.linear_cost_reg(outs[0].mu, outs[1].mu, outs[0].mu_p).sum() / n_pairs
    assert torch.allclose(terms.recon, rec) and torch.allclose(terms.reg, reg)
    assert torch.allclose(terms.total, terms.recon + 0.5 * terms.kl + 2.0 * terms.reg)
    single = stage.cvae_loss(outs[:1], [t], reg_weight=2.0)  # user pairs: no bundle, no regulariser
    assert float(single.reg) == 0.0


@pytest.mark.parametrize("reg_weight", [0.0, 1.0])
def test_loss_decreases_on_a_small_batch(reg_weight):
    torch.manual_seed(0)
    x = blobs(16)
    p = make_bundles(x, "rotation", 30.0, torch.Generator().manual_seed(0))
    cfg = tiny_cfg(**{"cvae.reg_weight": reg_weight})
    model = create_cvae("fc", image_size=16, channels=1, latent_dim=1, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        terms = stage._batch_loss(model, p, cfg.cvae)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
        losses.append(float(terms.total.detach()))
    assert math.isfinite(losses[-1])
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("arch", list_cvaes())
@pytest.mark.parametrize("k", [1, 3])
def test_every_cvae_architecture_has_the_pair_interface(arch, k):
    torch.manual_seed(0)
    m = create_cvae(arch, image_size=16, channels=1, latent_dim=k, hidden=8)
    x, xp = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    out = m(x, xp)
    assert out.logits.shape == x.shape and out.mu.shape == (3, k) and out.mu_p.shape == (3, k)
    u = torch.zeros(3, k)
    mu_p, _ = m.prior(x)
    assert torch.allclose(m.perturb(x, u), m.decode(x, mu_p))  # u = 0 is the prior mean
    y = m.perturb(x, torch.randn(3, k))
    assert y.min() >= 0 and y.max() <= 1


# --------------------------------------------------------------------------- pair data
def test_families_compose_and_keep_the_identity():
    x = blobs(6, 32)
    for name in list_families():
        assert torch.allclose(apply_family(name, x, torch.zeros(6)), x, atol=1e-5), name
    th = torch.full((6,), 0.3)
    twice = apply_family("lighting", apply_family("lighting", x, th), th)
    assert torch.allclose(twice, apply_family("lighting", x, 2 * th), atol=1e-5)  # gamma composes exactly
    one = apply_family("thickness", x, torch.ones(6))
    assert torch.allclose(one, F.max_pool2d(x, 3, 1, 1))  # theta = 1: one 3x3 dilation
    half = apply_family("thickness", x, torch.full((6,), 0.5))
    assert torch.allclose(half, 0.5 * x + 0.5 * one, atol=1e-6)
    assert (apply_family("thickness", x, -torch.ones(6)) <= x + 1e-6).all()  # erosion thins
    r = torch.full((6,), 10.0)
    rot2 = apply_family("rotation", apply_family("rotation", x, r), r)
    # rotating twice by 10 deg ~ once by 20 deg (bilinear resampling blurs a little)
    assert F.mse_loss(rot2, apply_family("rotation", x, 2 * r)) < 0.1 * F.mse_loss(x, apply_family("rotation", x, 2 * r))


def test_bundles_pair_theta_and_two_theta():
    x = blobs(8, 16)
    p = make_bundles(x, "rotation", 20.0, torch.Generator().manual_seed(0))
    assert p.bundles and p.theta.abs().max() <= 20.0
    assert torch.allclose(p.x1, apply_family("rotation", x, p.theta))
    assert torch.allclose(p.x2, apply_family("rotation", x, 2 * p.theta))


def _write(folder, names, size=16, mode="L", value=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        arr = np.full((size, size) if mode == "L" else (size, size, 3), (value + 20 * i) % 255, dtype=np.uint8)
        Image.fromarray(arr, mode=mode).save(folder / n)


def test_user_pairs_from_two_aligned_folders(tmp_path):
    names = [f"img{i}.png" for i in range(5)]
    _write(tmp_path / "a", names, value=10)
    _write(tmp_path / "b", names, value=50)
    p = read_pair_folders(tmp_path / "a", tmp_path / "b", 16, 1)
    assert len(p) == 5 and not p.bundles
    assert torch.allclose(p.x1 - p.x, torch.full_like(p.x, 40 / 255), atol=1e-6)  # aligned by file name
    s = split_pairs(p)
    assert len(s["train"]) + len(s["test"]) == 5 and len(s["test"]) >= 1


def test_mismatched_pair_folders_fail_with_one_clear_line(tmp_path):
    _write(tmp_path / "a", ["x.png", "y.png"])
    _write(tmp_path / "b", ["x.png", "z.png"])
    with pytest.raises(DatasetError, match=r"mismatched pair folders: 1 file\(s\) of .*'y.png'.*'z.png'"):
        read_pair_folders(tmp_path / "a", tmp_path / "b", 16, 1)
    _write(tmp_path / "c", ["x.png"], size=16)
    _write(tmp_path / "d", ["x.png"], size=20)
    with pytest.raises(DatasetError, match="mixed sizes"):
        read_pair_folders(tmp_path / "c", tmp_path / "d", 16, 1)
    with pytest.raises(DatasetError, match="does not exist"):
        read_pair_folders(tmp_path / "a", tmp_path / "missing", 16, 1)
    with pytest.raises(DatasetError, match="cvae.pairs_x"):
        read_pair_folders("", "", 16, 1)


def test_config_section_is_validated():
    with pytest.raises(ConfigError, match="cvae.pairs_x"):
        load_config("smoke", overrides={"cvae.family": "folders"})
    with pytest.raises(ConfigError, match="needs sample bundles"):
        load_config("smoke", overrides={"cvae.family": "folders", "cvae.pairs_x": "a", "cvae.pairs_x_prime": "b",
                                        "cvae.reg_weight": 1.0})
    with pytest.raises(ConfigError, match="cvae.latent_dim"):
        load_config("smoke", overrides={"cvae.latent_dim": 0})
    with pytest.raises(ConfigError, match="robust.cvae_eps"):
        load_config("smoke", overrides={"robust.cvae_eps": -1.0})
    with pytest.raises(ConfigError, match="unknown config key 'cvae.latnt_dim'"):
        load_config("smoke", overrides={"cvae.latnt_dim": 2})
    for profile in ("smoke", "cpu", "paper"):
        assert load_config(profile).cvae.latent_dim == 1  # paper 001's 1-D code everywhere


# --------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = tiny_cfg()
    pairs = stage.build_pairs(cfg, blobs(64, 16, seed=1), blobs(24, 16, seed=2))
    out = tmp_path_factory.mktemp("cvae")
    return cfg, pairs, stage.run(cfg, pairs, out)


def test_stage_writes_checkpoint_sweeps_and_the_loss_table(trained):
    cfg, pairs, art = trained
    assert set(art.losses) == {"train", "test"}
    for t in art.losses.values():
        assert t["total"] == pytest.approx(t["recon"] + cfg.cvae.beta * t["kl"] + cfg.cvae.reg_weight * t["reg"], rel=1e-5)
        assert t["recon"] + t["kl_reg"] == pytest.approx(t["total"], rel=1e-5)  # the paper's columns add up
    sweep = Image.open(art.sweeps[0])
    # rows = sweep_images, columns = x, x1 and the 11 codes mu + (i - 5) sigma / 5 (2 px pad, upscale 2)
    assert sweep.size == (2 * (13 * 18 + 2), 2 * (2 * 18 + 2))
    table = stage.loss_table({"a": art.losses})
    assert "| a, test |" in table and "reconstruction loss" in table
    assert "closure_mse" in stage.closure_table({"a": art.closure})


def test_closure_metrics_are_computed_on_held_out_pairs(trained):
    cfg, pairs, art = trained
    test = pairs["test"]
    assert art.closure["identity_mse"] == pytest.approx(float(F.mse_loss(test.x, test.x1)), rel=1e-5)
    model = stage.load_cvae(art.model_path, cfg)
    with torch.no_grad():
        mu, _ = model.posterior(test.x, test.x1)
        y_hat = model.decode(test.x, mu)
        mu_yz, _ = model.posterior(test.x1, test.x2)
        mu_xz, _ = model.posterior(test.x, test.x2)
        two_step, direct = model.decode(y_hat, mu_yz), model.decode(test.x, mu_xz)
    assert art.closure["closure_mse"] == pytest.approx(float(F.mse_loss(y_hat, test.x1)), rel=1e-4)
    assert art.closure["composition_mse"] == pytest.approx(float(F.mse_loss(two_step, direct)), rel=1e-4)
    assert art.closure["composition_gt_mse"] == pytest.approx(float(F.mse_loss(two_step, test.x2)), rel=1e-4)
    assert -1.0 <= art.closure["theta_corr"] <= 1.0 and math.isfinite(art.closure["code_ratio"])
    # user pairs (no bundles) get the closure of one pair only
    single = stage.closure_metrics(model, PairData(test.x, test.x1))
    assert set(single) == {"closure_mse", "identity_mse"}


def test_checkpoint_rebuilds_the_cvae_alone(trained, tmp_path):
    cfg, pairs, art = trained
    model = stage.load_cvae(art.model_path)
    assert not model.training and model.latent_dim == cfg.cvae.latent_dim
    x = pairs["test"].x[:3]
    u = torch.randn(3, 1)
    again = stage.load_cvae(art.model_path)
    assert torch.equal(model.perturb(x, u), again.perturb(x, u))
    with pytest.raises(ValueError, match="trained on 1x16 px"):
        stage.load_cvae(art.model_path, load_config("smoke"))  # data is 32 px
    bad = tmp_path / "bad.pt"
    torch.save({"not": "a checkpoint"}, bad)
    with pytest.raises(CheckpointError):
        stage.load_cvae(bad)


# --------------------------------------------------------------------------- the method
def test_l2_pgd_stays_in_its_ball_and_climbs():
    torch.manual_seed(0)
    w = torch.randn(6, 3)

    def loss(u):  # unbounded linear loss: the maximiser sits on the sphere, along w
        return (u * w).sum(1)

    for eps in (0.5, 2.0):
        u = l2_pgd(loss, (6, 3), eps=eps, steps=10, generator=torch.Generator().manual_seed(0))
        assert (u.norm(dim=1) <= eps + 1e-5).all()
        assert torch.allclose(loss(u), eps * w.norm(dim=1), rtol=0.02)
    assert torch.equal(l2_pgd(loss, (6, 3), eps=1.0, steps=0), torch.zeros(6, 3))
    for fn in (random_in_ball, uniform_in_ball):
        assert (fn(500, 2, 0.7, torch.Generator().manual_seed(1)).norm(dim=1) <= 0.7 + 1e-6).all()
    assert torch.allclose(project_l2(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0),
                          torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


@pytest.mark.parametrize("attack", ["pgd", "random"])
def test_cvae_method_trains_on_members_of_the_set(trained, attack):
    cfg, pairs, art = trained
    model = stage.load_cvae(art.model_path)
    torch.manual_seed(0)
    clf = create_classifier("small_cnn", num_classes=3, width=8, image_size=16)
    x, y = pairs["test"].x[:8], torch.arange(8) % 3
    rcfg = load_config("smoke", overrides={"robust.cvae_eps": 0.8, "robust.cvae_attack": attack,
                                           "robust.cvae_steps": 4}).robust
    ctx = AugmentContext(clf, rcfg, 3, torch.Generator().manual_seed(0), extra={"cvae": model})
    aug = create_method("cvae")(ctx, Batch(x, y, torch.arange(8)))
    assert aug.x.shape == (16, 1, 16, 16) and torch.equal(aug.x[:8], x)
    assert torch.equal(aug.target.argmax(1), torch.cat([y, y]))
    assert aug.info["cvae_u_norm"] <= 0.8 + 1e-5
    x_adv, u = cvae_attack(clf, model, x, y, eps=0.8, attack=attack, steps=4,
                           generator=torch.Generator().manual_seed(3))
    assert (u.norm(dim=1) <= 0.8 + 1e-5).all()
    assert torch.allclose(x_adv, model.perturb(x, u))  # a member of S(x)
    if attack == "pgd":
        with torch.no_grad():
            clean = F.cross_entropy(clf.eval()(model.perturb(x, torch.zeros_like(u))), y, reduction="none")
            adv = F.cross_entropy(clf(x_adv), y, reduction="none")
        assert adv.mean() >= clean.mean() - 1e-6  # the worst case is no better than the prior mean


def test_cvae_method_without_a_trained_cvae_says_what_to_do():
    clf = create_classifier("small_cnn", num_classes=3, width=8, image_size=16)
    ctx = AugmentContext(clf, load_config("smoke").robust, 3, torch.Generator())
    with pytest.raises(ValueError, match=r"needs a trained CVAE in AugmentContext.extra\['cvae'\]"):
        create_method("cvae")(ctx, Batch(torch.rand(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), torch.arange(2)))


def test_cvae_is_selectable_by_config_and_search_space():
    assert "cvae" in list_methods()
    assert method_needs("cvae") == Needs(cvae=True) and method_needs("cvae").extra_models == ("cvae",)
    base = load_config("smoke", overrides={"robust.method": "cvae"})
    space = search_space_from_dict({"params": {
        "robust.method": {"type": "categorical", "choices": ["none", "cvae"]},
        "robust.cvae_eps": {"type": "float", "low": 0.5, "high": 2.0, "when": {"robust.method": ["cvae"]}},
        "robust.cvae_attack": {"type": "categorical", "choices": ["random", "pgd"]}}}, base)
    assert set(space.params) == {"robust.method", "robust.cvae_eps", "robust.cvae_attack"}


def test_pipeline_trains_the_cvae_once_and_hands_it_to_the_method(tmp_path):
    cfg = tiny_cfg(**{"robust.method": "cvae", "cvae.epochs": 1})
    data = ImageDataset(blobs(40, 16, seed=4), torch.arange(40) % 3, ["a", "b", "c"])
    paths = extra_model_paths(cfg, StorageLayout(tmp_path), data)
    assert set(paths) == {"cvae"}
    assert extra_model_paths(cfg, StorageLayout(tmp_path), data) == paths  # cached, not retrained
    summary = cache.read_manifest(paths["cvae"].parent)["summary"]
    assert "cvae_closure_mse" in summary and "cvae_test_total" in summary  # held-out part of the train images
    # the attack knobs live in robust.*: changing them reuses the CVAE; its own section retrains
    assert extra_model_paths(cfg.replace(**{"robust.cvae_eps": 2.0}), StorageLayout(tmp_path), data) == paths
    assert extra_model_paths(cfg.replace(**{"cvae.reg_weight": 1.0}), StorageLayout(tmp_path), data) != paths
    extra = load_extra_models(paths, torch.device("cpu"))
    assert extra["cvae"].latent_dim == 1 and not extra["cvae"].training
