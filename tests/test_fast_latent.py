"""robust.natra_mode=pool (augment/pool.py): NaTra's worst-of-P over a pool of decoded edits.

Real tiny data (scikit-learn's digits at 32 px), a real tiny generator, random codes and
directions: every test runs in about a second, without Ray. No timing here (bench/bench_epoch.py
measures the speed goal)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from natra_ray.augment import AugmentContext, Batch, create_method, soft_cross_entropy
from natra_ray.augment.latent import LatentSource
from natra_ray.augment.pool import LatentPool, Surrogate, TwoPass, from_uint8, member_losses
from natra_ray.config import ConfigError, load_config
from natra_ray.data import ImageDataset
from natra_ray.models import create_generator
from natra_ray.models.latent import Directions, resolve_layer_range
from natra_ray.stages import robust

B = 32


def _cfg(**over):
    base = {"robust.method": "natra", "robust.epochs": 2, "robust.batch_size": B, "robust.num_directions": 4,
            "robust.pgd_steps": 2}
    return load_config("smoke", overrides={**base, **over})


def _pool_cfg(select="gradient", **over):
    return _cfg(**{"robust.natra_mode": "pool", "robust.pool_select": select, "robust.pool_size": 4,
                   "robust.pool_refresh": 2, **over})


def _tiny(cfg, n=96, device="cpu"):
    """Digits at 32 px and a LatentSource over a real (untrained) style_tiny generator on
    ``device`` (the codes stay on the CPU)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=32)
    ds = ImageDataset(x[:n], torch.tensor(d.target)[:n], [str(i) for i in range(10)])
    torch.manual_seed(0)
    G = create_generator("style_tiny", resolution=32, img_channels=1).eval().requires_grad_(False)
    k = cfg.robust.num_directions
    q, _ = torch.linalg.qr(torch.randn(G.w_dim, k))
    with torch.no_grad():
        ws = G.broadcast(G.mapping(G.sample_z(n)))[:, None]
    start, end = resolve_layer_range(G, 0, -1)
    src = LatentSource(G.to(device), ws, torch.ones(n, 1, G.layer_shape(0)[0]), 0,
                       Directions(q.t().contiguous(), torch.ones(k), "test"), k, (start, end),
                       torch.full((n,), float(cfg.robust.eps)), precision=cfg.robust.precision)
    return ds, src


def _ctx(cfg, model, src, seed=3):
    return AugmentContext(model, cfg.robust, 10, torch.Generator().manual_seed(seed), src)


def _batch(ds, idx):
    return Batch(ds.images[idx], ds.labels[idx], idx)


def _visit(cfg, model, src, ds, idx, seed=3):
    """One visit of examples ``idx``: the method's batch, the second half chosen as the trainer
    would (from the clean half's input gradient) when the method returns a TwoPass."""
    aug = create_method(cfg.robust.method)(_ctx(cfg, model, src, seed), _batch(ds, idx))
    if isinstance(aug, TwoPass):
        x = aug.x.clone().requires_grad_(True)
        soft_cross_entropy(model(x), aug.target).sum().backward()
        return aug, aug.second(x.grad), x.grad
    return aug, None, None


def test_exact_is_the_default_and_the_fast_mode_keys_are_checked():
    r = load_config("smoke").robust
    assert (r.natra_mode, r.pool_select, r.pool_propose) == ("exact", "gradient", "surrogate")
    for bad in ({"robust.pool_size": 0}, {"robust.pool_refresh": 0}, {"robust.natra_mode": "fast"},
                {"robust.pool_select": "best"}, {"robust.pool_propose": "pgd"}, {"robust.adv_fraction": 0.0},
                {"robust.adv_fraction": 1.5}):
        with pytest.raises(ConfigError):
            _cfg(**bad)


def test_pool_members_are_real_decodes_within_budget():
    cfg = _pool_cfg(**{"robust.pool_refresh": 1})  # every slot decoded at each visit
    ds, src = _tiny(cfg)
    model = robust.build_classifier(cfg, 10)
    idx = torch.arange(B)
    radius = (src.eps[idx] + cfg.robust.rho).clamp(max=cfg.robust.eps_cap)
    _visit(cfg, model, src, ds, idx)
    pool: LatentPool = src.pool
    assert pool.images.dtype == torch.uint8 and pool.images.shape == (len(ds), 4, 1, 32, 32)
    assert bool(pool.valid(idx).all()) and not bool(pool.valid(torch.arange(B, len(ds))).any())
    assert pool.nbytes >= len(ds) * 4 * 32 * 32 and int(pool.visits[idx].min()) == 1
    r = pool.coeffs[idx]  # (B, P, k): corners of each example's box at its attack radius
    assert torch.allclose(r.abs(), radius[:, None, None].expand_as(r))
    assert torch.equal(pool.radius[idx], radius[:, None].expand(B, 4))
    assert r.abs().amax((1, 2)).le(cfg.robust.eps_cap).all()
    with torch.no_grad():
        for p in range(4):
            ws, alpha = src.codes(idx)
            want = src.decode(ws, alpha, r[:, p])
            assert (from_uint8(pool.images[idx, p]) - want).abs().max() <= 1 / 255 + 1e-6
    # distinct members: random corners, not one edit repeated
    assert not torch.equal(pool.images[idx, 0], pool.images[idx, 1])


def test_refresh_schedule_decodes_pool_size_over_refresh_members_per_visit():
    cfg = _pool_cfg(**{"robust.pool_size": 4, "robust.pool_refresh": 4})
    ds, src = _tiny(cfg)
    model = robust.build_classifier(cfg, 10)
    idx = torch.arange(B)
    counts = []
    for v in range(6):
        aug, half, _ = _visit(cfg, model, src, ds, idx, seed=v)
        counts.append(aug.seen(model(half.x).detach())["pool_decodes"])
    assert counts == [1.0] * 6  # P / R = 1 member per example per visit, the first visit included
    assert bool(src.pool.valid(idx).all()) and int(src.pool.visits[idx].min()) == 6


@pytest.mark.parametrize("select", ["gradient", "loss"])
def test_selected_member_is_the_worst_of_the_pool_for_the_current_model(select):
    cfg = _pool_cfg(select, **{"robust.pool_refresh": 1})
    ds, src = _tiny(cfg)
    torch.manual_seed(5)
    model = robust.build_classifier(cfg, 10)
    idx = torch.arange(B)
    _visit(cfg, model, src, ds, idx)  # fills every slot
    eps_before = src.eps.clone()
    aug, half, grad = _visit(cfg, model, src, ds, idx, seed=4)  # refreshes every slot again, then selects
    members = from_uint8(src.pool.images[idx])  # (B, P, 1, 32, 32): the pool the selection saw
    assert aug.x.shape[0] == B and torch.equal(aug.x, ds.images[:B]) and half.x.shape[0] == B
    if select == "loss":
        model.eval()
        with torch.no_grad():  # brute force: every member classified on its own
            losses = torch.stack([F.cross_entropy(model(members[:, p]), ds.labels[:B], reduction="none")
                                  for p in range(4)], 1)
        model.train()
        want = losses.argmax(1)
        got = member_losses(model, members, torch.ones(B, 4, dtype=torch.bool), ds.labels[:B])
        assert torch.allclose(got, losses, atol=1e-5)
    else:
        # brute force: the first-order loss change <g, x_m - x> of every member, one at a time
        gain = torch.stack([((members[:, p] - ds.images[:B]) * grad).flatten(1).sum(1) for p in range(4)], 1)
        want = gain.argmax(1)
    x_adv = half.x
    aug.info.update(aug.seen(model(x_adv).detach()))
    assert torch.equal(x_adv, members[torch.arange(B), want])
    # APT as in natra: eps_i + rho unless the selected member fools the model, truncated at the cap
    assert {"eps_mean", "adv_fooled", "pool_members"} <= set(aug.info)
    grown = src.eps[idx] - eps_before[idx]
    assert bool(((grown == 0) | torch.isclose(grown, torch.tensor(cfg.robust.rho))).all())
    assert abs(aug.info["adv_fooled"] - float((grown == 0).float().mean())) < 1e-6


def test_two_pass_gradients_equal_one_pass_over_both_halves():
    """Without BatchNorm the two passes compute exactly the one-pass mean loss's gradient."""
    from natra_ray.stages.robust import _two_pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x1, x2 = torch.rand(5, 1, 4, 4), torch.rand(5, 1, 4, 4)
    t1, t2 = F.one_hot(torch.randint(0, 3, (5,)), 3).float(), torch.softmax(torch.randn(5, 3), 1)
    seen = {}
    aug = TwoPass(x1, t1, second=lambda g: _second(seen, g, x2, t2), seen=lambda logits: {"n": float(len(logits))})
    loss = _two_pass(model, aug, torch.device("cpu"))
    two = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    one = soft_cross_entropy(model(torch.cat([x1, x2])), torch.cat([t1, t2])).mean()
    one.backward()
    assert torch.isclose(loss, one.detach())
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(two, model.parameters()))
    xg = x1.clone().requires_grad_(True)
    (soft_cross_entropy(model(xg), t1).sum() / 10).backward()
    assert torch.allclose(seen["g"], xg.grad) and aug.info == {"n": 5.0}


def _second(seen, g, x2, t2):
    from natra_ray.augment import Augmented

    seen["g"] = g.clone()
    return Augmented(x2, t2)


@pytest.mark.parametrize("method,over", [
    ("natra", {}), ("natra", {"robust.pool_select": "loss", "robust.pool_propose": "random"}),
    ("natra_oa", {}), ("natra+classic", {}), ("natra", {"robust.natra_mode": "fraction"})])
def test_fast_modes_train_end_to_end_through_robust_train(method, over):
    cfg = _pool_cfg(**{"robust.method": method, **over})
    ds, src = _tiny(cfg)
    val, val_src = _tiny(cfg, n=48)
    seen = []
    state = robust.train(cfg, ds, val, latent=src, val_latent=val_src, report=seen.append)
    assert [h["epoch"] for h in state.history] == [1, 2] and len(seen) == 2
    for h in state.history:
        assert torch.isfinite(torch.tensor(h["train_loss"])) and 0 <= h["adv_fooled"] <= 1
        assert 0 <= h["val_natural_acc"] <= 1
    if cfg.robust.natra_mode == "fraction":
        assert src.pool is None and float(src.eps.max()) > cfg.robust.eps
        return
    assert all(1 <= h["pool_members"] <= 4 for h in state.history)
    used = src.pool.visits > 0  # drop_last: 3 batches of 32 = every example, each epoch
    assert int(used.sum()) == len(ds) and int(src.pool.visits.max()) == 2
    if method == "natra_oa":  # no APT: one fixed budget
        held = src.pool.radius[src.pool.valid(torch.arange(len(ds)))]
        assert bool((src.eps == cfg.robust.eps).all()) and bool((held == cfg.robust.eps).all())
    else:
        assert bool((src.eps >= cfg.robust.eps).all()) and float(src.eps.max()) > cfg.robust.eps


def test_surrogate_recovers_a_linear_decoder_and_proposes_its_fgsm_corner():
    torch.manual_seed(0)
    k, pixels = 4, 64
    true = torch.randn(3, k, pixels)  # per class: how each direction changes the image
    sur = Surrogate.empty(3, k, pixels)
    y = torch.arange(60) % 3
    assert not bool(sur.ready(y).any())
    signs = torch.randint(0, 2, (60, k)).float() * 2 - 1
    sur.update(y, signs, torch.einsum("mk,mkd->md", signs, true[y]))
    assert bool(sur.ready(y).all())
    g = torch.randn(60, pixels)
    want = torch.einsum("mkd,md->mk", true[y], g)  # d loss / d r of the linear decoder
    assert torch.equal(torch.sign(sur.directions(y, g)), torch.sign(want))


def test_surrogate_members_are_the_fgsm_corner_of_the_fit():
    cfg = _pool_cfg(**{"robust.pool_size": 2, "robust.pool_refresh": 1})
    ds, src = _tiny(cfg)
    model = robust.build_classifier(cfg, 10)
    for v in range(4):  # fill the fit: 96 examples x 2 slots per pass over the data
        for i in range(0, len(ds), B):
            _visit(cfg, model, src, ds, torch.arange(i, i + B), seed=v)
    import copy

    idx = torch.arange(B)
    fit = copy.deepcopy(src.pool.surrogate)  # the fit the proposals are made with (updated after)
    aug, half, grad = _visit(cfg, model, src, ds, idx, seed=9)
    assert aug.seen(model(half.x).detach())["pool_surrogate"] == 1.0  # one surrogate corner per example
    r = src.pool.coeffs[idx, 0]  # R = 1: both slots due, the first (slot 0) gets the surrogate corner
    assert torch.equal(torch.sign(r), torch.sign(fit.directions(ds.labels[:B], grad)))
    radius = (src.eps[idx] + cfg.robust.rho).clamp(max=cfg.robust.eps_cap)
    assert bool((r.abs() <= radius[:, None] + 1e-6).all())


def test_fraction_mode_attacks_a_share_of_the_batch_and_weighs_it_as_the_whole():
    cfg = _cfg(**{"robust.natra_mode": "fraction", "robust.adv_fraction": 0.25})
    ds, src = _tiny(cfg)
    model = robust.build_classifier(cfg, 10)
    eps_before = src.eps.clone()
    aug, half, _ = _visit(cfg, model, src, ds, torch.arange(B))
    assert aug.x.shape[0] == B and half.x.shape[0] == B // 4 and half.target.shape == (B // 4, 10)
    aug.seen(model(half.x).detach())
    changed = (src.eps != eps_before).nonzero().flatten()
    assert len(changed) <= B // 4 and bool((changed < B).all())


def test_two_pass_with_a_smaller_second_half_is_the_mean_of_the_halves_means():
    from natra_ray.augment import Augmented
    from natra_ray.stages.robust import _two_pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x1, x2 = torch.rand(8, 1, 4, 4), torch.rand(2, 1, 4, 4)
    t1, t2 = F.one_hot(torch.randint(0, 3, (8,)), 3).float(), F.one_hot(torch.randint(0, 3, (2,)), 3).float()
    loss = _two_pass(model, TwoPass(x1, t1, second=lambda g: Augmented(x2, t2)), torch.device("cpu"))
    want = (soft_cross_entropy(model(x1), t1).mean() + soft_cross_entropy(model(x2), t2).mean()) / 2
    assert torch.isclose(loss, want.detach())


def test_pool_mode_runs_a_whole_trial_in_process(tmp_path):
    from test_workflow import _tiny_inputs

    from natra_ray.workflow.recorder import MemoryRecorder
    from natra_ray.workflow.trial import in_process_fit, run_trial

    cfg = load_config("smoke", overrides={"robust.method": "natra", "robust.natra_mode": "pool", "robust.epochs": 2,
                                          "robust.batch_size": 32, "robust.num_directions": 4,
                                          "robust.pool_size": 3, "robust.pool_refresh": 2,
                                          "eval.max_examples": 32, "eval.deepfool_steps": 2})
    result = run_trial(cfg, _tiny_inputs(tmp_path, cfg), tmp_path / "out", in_process_fit, MemoryRecorder())
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all("pool_members" in h for h in result.history)
    for k in ("test_clean_acc", "test_natural_acc"):
        assert 0.0 <= result.metrics[k] <= 1.0


@pytest.fixture
def one_thread():
    """The golden numbers below are one intra-op thread's: with two, float32 reductions run in
    another order and by the second epoch one adversarial example flips. Earlier tests in the
    same process leave torch at whatever thread count their fit set, so pin it here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exact_mode_is_unchanged(one_thread):
    """The numbers the exact mode gave from this seed before the pool mode existed (commit 435a1a9)."""
    cfg = _cfg()
    assert cfg.robust.natra_mode == "exact"
    ds, src = _tiny(cfg)
    torch.manual_seed(1)
    model = robust.build_classifier(cfg, 10)
    aug = create_method("natra")(_ctx(cfg, model, src), _batch(ds, torch.arange(B)))
    assert src.pool is None and not isinstance(aug, TwoPass)
    got = [float(aug.x.sum()), float(aug.x[B:].pow(2).sum()), float(aug.target[B:].pow(2).sum()), float(src.eps.sum())]
    assert got == pytest.approx([17833.0, 4171.673828125, 29.16214370727539, 48.400001525878906], rel=1e-5)
    assert aug.info == pytest.approx({"eps_mean": 0.5, "adv_fooled": 0.875})
    torch.manual_seed(2)
    state = robust.make_state(cfg, 10, len(ds) // B, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    src.eps.fill_(cfg.robust.eps)
    got = []
    for _ in range(2):
        m = robust.train_epoch(cfg, state, ds, src, gen)
        got.append([m["train_loss"], m["eps_mean"], m["adv_fooled"], float(src.eps.sum())])
    want = [[2.354493776957194, 0.5, 0.9479166666666666, 48.5], [2.0167588790257773, 0.5052083532015482,
                                                                   0.9479166666666666, 49.0]]
    assert got == [pytest.approx(w, rel=1e-5) for w in want]
    assert float(sum(p.detach().double().sum() for p in state.model.parameters())) == pytest.approx(35.31072996314114,
                                                                                                   rel=1e-5)


def test_two_pass_under_ddp_matches_the_plain_model(tmp_path):
    """The Ray worker loop trains a DDP-wrapped classifier: the two passes (first under no_sync)
    give the same weights as the bare model (one process, gloo)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = _pool_cfg()
    weights = []
    for wrap in (False, True):
        ds, src = _tiny(cfg)
        torch.manual_seed(7)
        state = robust.make_state(cfg, 10, len(ds) // B, torch.device("cpu"))
        if wrap:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
            state.model = DDP(state.model)
        try:
            robust.train_epoch(cfg, state, ds, src, torch.Generator().manual_seed(0))
        finally:
            if wrap:
                dist.destroy_process_group()
        weights.append([p.detach().clone() for p in state.bare.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*weights))


def test_running_norm_second_half_meets_the_test_time_statistics():
    """robust.two_pass_norm=running: the transformed half is normalised by the running statistics
    that the clean half just updated (as an attacked test image is), and leaves them unchanged."""
    import copy

    from natra_ray.augment import Augmented
    from natra_ray.stages.robust import _two_pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                torch.nn.Linear(12, 3)).train()
    x1, x2 = torch.rand(8, 1, 4, 4), torch.rand(8, 1, 4, 4) * 0.3  # a darker second half
    t1, t2 = F.one_hot(torch.randint(0, 3, (8,)), 3).float(), F.one_hot(torch.randint(0, 3, (8,)), 3).float()
    want = copy.deepcopy(model)
    clean = soft_cross_entropy(want(x1), t1).mean()  # updates the running statistics once
    with torch.no_grad():
        want.eval()
        dark = soft_cross_entropy(want(x2), t2).mean()
        own = copy.deepcopy(model).train()
        own(x1)
        dark_own = soft_cross_entropy(own(x2), t2).mean()  # the half's own batch statistics
    loss = _two_pass(model, TwoPass(x1, t1, second=lambda g: Augmented(x2, t2)), torch.device("cpu"),
                     second_norm="running")
    bn, ref = model[1], want[1]
    assert bn.training and int(bn.num_batches_tracked) == 1
    assert torch.allclose(bn.running_mean, ref.running_mean) and torch.allclose(bn.running_var, ref.running_var)
    assert torch.isclose(loss, (clean.detach() + dark) / 2, atol=1e-6)
    assert not torch.isclose(loss, (clean.detach() + dark_own) / 2, atol=1e-4)
