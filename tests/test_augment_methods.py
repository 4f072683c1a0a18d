"""Every augmentation method does what its name says (issue 5), on the tiny generator, a
width-8 small_cnn and a tiny VAE: mixup labels are convex combinations, pgd examples lie in the
eps ball and raise the loss, gan_mixup decodes mixed latents, natra_ol uses one code, ..."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from natra_ray import cache
from natra_ray.augment import (METHODS as REGISTRY, AugmentContext, Batch, Needs, create_method, list_methods,
                               method_needs, one_hot, soft_cross_entropy)
from natra_ray.augment.advmix import advmix_attack, mix_styles, project_simplex, resolve_split
from natra_ray.augment.basic import ClassicParams, apply_classic, classic_augment, sample_classic_params
from natra_ray.augment.latent import LatentSource
from natra_ray.augment.mix import draw_pairs, mix, sample_beta
from natra_ray.config import ConfigError, load_config
from natra_ray.data import ImageDataset
from natra_ray.models import create_classifier, create_generator, create_model
from natra_ray.models.latent import Directions
from natra_ray.registry import Registry, UnknownNameError
from natra_ray.search_space import load_search_space
from natra_ray.stages import robust
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.upstream import extra_model_paths, load_extra_models
from natra_ray.stages import vae as vae_stage

METHODS = ["none", "classic", "random_latent", "pgd", "fgsm", "mixup", "manifold_mixup", "gan_mixup",
           "vae_mixup", "advmix", "natra", "natra_ol", "natra_oa", "natra+classic"]
N, B, K = 24, 8, 3  # dataset size, batch size, classes


@pytest.fixture(scope="module")
def world():
    """A frozen tiny generator with one code per image, 4 orthonormal directions, labels."""
    torch.manual_seed(0)
    G = create_generator("style_tiny", resolution=32).eval().requires_grad_(False)
    ws = G.broadcast(G.mapping(G.sample_z(N)))[:, None]  # (N, 1, num_ws, w_dim)
    alpha = torch.ones(N, 1, G.layer_shape(0)[0])
    q, _ = torch.linalg.qr(torch.randn(G.w_dim, 4))
    src = LatentSource(G, ws, alpha, 0, Directions(q.t().contiguous(), torch.ones(4), "test"), 4,
                       (0, G.num_ws - 1), torch.full((N,), 0.3))
    with torch.no_grad():
        x = src.reconstruct(torch.arange(N))
    y = torch.arange(N) % K
    return src, x, y


@pytest.fixture(scope="module")
def cfg():
    return load_config("smoke", overrides={"robust.num_directions": 4, "robust.pgd_steps": 2,
                                           "robust.eps_cap": 0.9, "robust.rho": 0.2})


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(1)
    return create_model("vae", "conv_vae", in_channels=1, image_size=32, z_dim=4, channels=4).eval()


def model_():
    torch.manual_seed(2)
    return create_classifier("small_cnn", num_classes=K, width=8)


def ctx_(cfg, src, vae, seed=0, model=None, **robust):
    r = cfg.robust if not robust else cfg.replace(**{f"robust.{k}": v for k, v in robust.items()}).robust
    src.eps.fill_(0.3)
    return AugmentContext(model or model_(), r, K, torch.Generator().manual_seed(seed), src, {"vae": vae})


def batch_(world, n=B):
    src, x, y = world
    idx = torch.arange(n)
    return Batch(x[idx], y[idx], idx)


def ce(model, x, y):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# --------------------------------------------------------------------------- every method
def test_registry_has_every_method_of_the_papers():
    assert set(METHODS) <= set(list_methods())
    latent = {n for n in list_methods() if method_needs(n).latent}
    assert {"random_latent", "gan_mixup", "advmix", "natra", "natra_ol", "natra_oa", "natra+classic"} <= latent
    assert {n for n in list_methods() if method_needs(n).vae} == {"vae_mixup"}


# --------------------------------------------------------------------------- what each method needs
NEEDS = {"none": Needs(), "classic": Needs(), "pgd": Needs(), "fgsm": Needs(), "mixup": Needs(),
         "manifold_mixup": Needs(), "gan_mixup": Needs(latent=True), "vae_mixup": Needs(vae=True),
         "advmix": Needs(latent=True), "natra": Needs(latent=True), "natra_oa": Needs(latent=True),
         "natra_ol": Needs(latent=True, single_code=True), "natra+classic": Needs(latent=True),
         "random_latent": Needs(latent=True, random_decode=True), "cvae": Needs(cvae=True)}


def test_every_registered_method_declares_its_needs():
    for name in list_methods():
        assert isinstance(REGISTRY.meta(name).get("needs"), Needs), f"{name} is registered without needs=Needs(...)"
        assert method_needs(name) is REGISTRY.meta(name)["needs"]
    assert {n: method_needs(n) for n in list_methods()} == NEEDS
    assert method_needs("natra_ol").lce_codes(10) == 1 and method_needs("natra").lce_codes(10) == 10
    assert {n: method_needs(n).lce_codes(3) for n in list_methods() if n != "natra_ol"} == \
        {n: 3 for n in list_methods() if n != "natra_ol"}
    assert [n for n in list_methods() if method_needs(n).random_decode] == ["random_latent"]
    assert method_needs("vae_mixup").extra_models == ("vae",) and method_needs("cvae").extra_models == ("cvae",)
    assert all(method_needs(n).extra_models == () for n in list_methods() if n not in ("vae_mixup", "cvae"))
    with pytest.raises(UnknownNameError, match="unknown augmentation method 'nope'; known names are: advmix, "):
        method_needs("nope")


def test_needs_is_checked_and_registry_entries_carry_metadata():
    with pytest.raises(ValueError, match="single_code=True"):
        Needs(single_code=True)
    with pytest.raises(ValueError, match="random_decode=True"):
        Needs(random_decode=True)
    with pytest.raises(AttributeError):
        Needs().latent = True  # frozen
    reg: Registry[int] = Registry("thing")
    reg.register("a", colour="red")(lambda: 1)
    reg.register("b")(lambda: 2)
    assert dict(reg.meta("a")) == {"colour": "red"} and dict(reg.meta("b")) == {} and reg.create("a") == 1
    with pytest.raises(TypeError):
        reg.meta("a")["colour"] = "blue"  # read-only
    with pytest.raises(UnknownNameError, match="unknown thing 'c'; known names are: a, b"):
        reg.meta("c")


@pytest.mark.parametrize("name", METHODS)
def test_needs_match_what_the_method_reads(name, world, cfg, tiny_vae):
    """A method runs with exactly what its Needs declare (and fails clearly without it); only a
    random_decode method looks at Batch.x_rand."""
    src = world[0]
    needs = method_needs(name)
    extra = {k: {"vae": tiny_vae}[k] for k in needs.extra_models}

    def run(latent, extra, batch):
        c = ctx_(cfg, src, tiny_vae, seed=3)
        c.latent, c.extra = latent, extra
        return create_method(name)(c, batch)

    if needs.latent:
        with pytest.raises(ValueError, match=f"method '{re.escape(name)}' needs the latent source"):
            run(None, extra, batch_(world))
    if needs.vae:
        with pytest.raises(ValueError, match=r"needs a trained VAE in AugmentContext.extra\['vae'\]"):
            run(src if needs.latent else None, {}, batch_(world))
    plain = run(src if needs.latent else None, extra, batch_(world))
    b = batch_(world)
    b.x_rand = torch.full_like(b.x, 0.5)  # what the Ray Data stream would hand over
    streamed = run(src if needs.latent else None, extra, b)
    if needs.random_decode:
        assert torch.equal(streamed.x[B:], b.x_rand) and not torch.equal(plain.x[B:], b.x_rand)
    else:
        assert torch.equal(streamed.x, plain.x) and torch.equal(streamed.target, plain.target)


@pytest.mark.parametrize("name", METHODS)
def test_shared_signature_soft_targets_and_reproducible(name, world, cfg, tiny_vae):
    outs = [create_method(name)(ctx_(cfg, world[0], tiny_vae, seed=3), batch_(world)) for _ in range(2)]
    a, b = outs
    assert a.x.dim() == 4 and a.x.shape[1:] == (1, 32, 32) and a.target.shape == (a.x.shape[0], K)
    assert a.x.shape[0] in (B, 2 * B)
    assert float(a.x.min()) >= 0.0 and float(a.x.max()) <= 1.0
    assert bool((a.target >= 0).all()) and torch.allclose(a.target.sum(1), torch.ones(a.x.shape[0]))
    assert torch.equal(a.x, b.x) and torch.equal(a.target, b.target)  # all randomness from ctx.generator


def test_every_method_trains_through_the_robust_epoch(world, cfg, tiny_vae):
    src, x, y = world
    data = ImageDataset(x[:16], y[:16], ["a", "b", "c"])
    for name in METHODS:
        c = cfg.replace(**{"robust.method": name, "robust.batch_size": 8})
        state = robust.make_state(c, K, 2, torch.device("cpu"))
        before = [p.detach().clone() for p in state.model.parameters()]
        src.eps.fill_(0.3)
        m = robust.train_epoch(c, state, data, src if method_needs(name).latent else None,
                               torch.Generator().manual_seed(0), extra={"vae": tiny_vae})
        assert math.isfinite(m["train_loss"]), name
        assert any(not torch.equal(p0, p) for p0, p in zip(before, state.model.parameters())), name


# --------------------------------------------------------------------------- none, classic
def test_none_is_the_clean_batch(world, cfg, tiny_vae):
    b = batch_(world)
    out = create_method("none")(ctx_(cfg, world[0], tiny_vae), b)
    assert torch.equal(out.x, b.x) and torch.equal(out.target, one_hot(b.y, K))


def _params(n, **kw):
    base = dict(angle_deg=torch.zeros(n), scale=torch.ones(n), shear_deg=torch.zeros(n), translate=torch.zeros(n, 2),
                brightness=torch.zeros(n), contrast=torch.ones(n))
    base.update(kw)
    return ClassicParams(**base)


def test_classic_warps_are_the_named_affine_maps():
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(apply_classic(x, _params(2)), x, atol=1e-5)  # zero ranges: identity
    # rotation by 90 degrees counter-clockwise as displayed = torch.rot90 over (H, W)
    rot = apply_classic(x, _params(2, angle_deg=torch.full((2,), 90.0)))
    assert torch.allclose(rot, torch.rot90(x, 1, dims=(2, 3)), atol=1e-4)
    # integer translation by (3 right, 2 down): a shift with zero fill
    sh = apply_classic(x, _params(2, translate=torch.tensor([[3.0, 2.0]] * 2)))
    assert torch.allclose(sh[..., 2:, 3:], x[..., :-2, :-3], atol=1e-5) and float(sh[..., :2, :].abs().max()) == 0
    # zoom 2x about the centre: the centre pixel block comes from the central half
    z = apply_classic(x, _params(2, scale=torch.full((2,), 2.0)))
    assert torch.allclose(z[..., 15:17, 15:17].mean(), x[..., 15:17, 15:17].mean(), atol=0.2)
    # photometric: c (x - mean) + mean + b
    g = torch.full((1, 1, 32, 32), 0.4)
    g[..., :16] = 0.6
    pj = apply_classic(g, _params(1, brightness=torch.tensor([0.1]), contrast=torch.tensor([0.5])))
    assert torch.allclose(pj[..., :16], torch.full_like(pj[..., :16], 0.65), atol=1e-5)
    assert torch.allclose(pj[..., 16:], torch.full_like(pj[..., 16:], 0.55), atol=1e-5)


def test_classic_samples_within_the_configured_ranges(world, cfg, tiny_vae):
    r = cfg.robust
    p = sample_classic_params(500, 32, r, torch.Generator().manual_seed(0))
    assert float(p.angle_deg.abs().max()) <= r.classic_rotation_deg and float(p.angle_deg.abs().max()) > 0.8 * r.classic_rotation_deg
    assert float((p.scale - 1).abs().max()) <= r.classic_scale and float((p.contrast - 1).abs().max()) <= r.classic_contrast
    assert float(p.shear_deg.abs().max()) <= r.classic_shear_deg
    assert float(p.translate.abs().max()) <= r.classic_translate * 32 and float(p.brightness.abs().max()) <= r.classic_brightness
    b = batch_(world)
    out = create_method("classic")(ctx_(cfg, world[0], tiny_vae, seed=5), b)
    assert out.x.shape == b.x.shape and torch.equal(out.target, one_hot(b.y, K))
    assert torch.equal(out.x, classic_augment(b.x, r, torch.Generator().manual_seed(5)))
    assert float((out.x - b.x).abs().mean()) > 0.01  # it did transform the images


# --------------------------------------------------------------------------- pixel attacks
def test_pgd_examples_lie_in_the_eps_ball_and_raise_the_loss(world, cfg, tiny_vae):
    b = batch_(world)
    ctx = ctx_(cfg, world[0], tiny_vae, pixel_eps=0.05, pgd_steps=5)
    out = create_method("pgd")(ctx, b)
    assert out.x.shape == b.x.shape and torch.equal(out.target, one_hot(b.y, K))  # Madry: adversarial only
    assert float((out.x - b.x).abs().max()) <= 0.05 + 1e-6 and float((out.x - b.x).abs().max()) > 0.04
    clean, adv = ce(ctx.model, b.x, b.y), ce(ctx.model, out.x, b.y)
    assert float(adv.mean()) > float(clean.mean()) + 1e-3 and int((adv > clean).sum()) >= B - 1


def test_fgsm_is_clean_plus_one_signed_gradient_step(world, cfg, tiny_vae):
    b = batch_(world)
    ctx = ctx_(cfg, world[0], tiny_vae, pixel_eps=0.03)
    out = create_method("fgsm")(ctx, b)
    assert torch.equal(out.x[:B], b.x) and torch.equal(out.target, one_hot(torch.cat([b.y, b.y]), K))
    xg = b.x.clone().requires_grad_(True)
    ctx.model.eval()
    (g,) = torch.autograd.grad(F.cross_entropy(ctx.model(xg), b.y, reduction="sum"), xg)
    assert torch.allclose(out.x[B:], (b.x + 0.03 * g.sign()).clamp(0, 1), atol=1e-6)
    assert float(ce(ctx.model, out.x[B:], b.y).mean()) > float(ce(ctx.model, b.x, b.y).mean())


# --------------------------------------------------------------------------- mixup family
def test_sample_beta_follows_its_alpha():
    g = torch.Generator().manual_seed(0)
    lo, hi = sample_beta(4000, 0.2, g), sample_beta(4000, 5.0, g)
    assert bool(((lo >= 0) & (lo <= 1)).all()) and abs(float(hi.mean()) - 0.5) < 0.02
    for v, a in ((lo, 0.2), (hi, 5.0)):  # Beta(a, a): variance 1 / (4 (2a + 1))
        assert float(v.var()) == pytest.approx(1 / (4 * (2 * a + 1)), rel=0.1)


def test_mixup_inputs_and_labels_are_the_same_convex_combination(world, cfg, tiny_vae):
    b = batch_(world)
    out = create_method("mixup")(ctx_(cfg, world[0], tiny_vae, seed=7), b)
    pairs = draw_pairs(B, cfg.robust.mixup_alpha, torch.Generator().manual_seed(7))  # replay
    lam = pairs.lam
    assert out.x.shape == b.x.shape and bool(((lam > 0) & (lam < 1)).all())
    assert torch.allclose(out.x, lam.view(-1, 1, 1, 1) * b.x + (1 - lam.view(-1, 1, 1, 1)) * b.x[pairs.perm], atol=1e-6)
    expect = lam[:, None] * one_hot(b.y, K) + (1 - lam[:, None]) * one_hot(b.y[pairs.perm], K)
    assert torch.allclose(out.target, expect, atol=1e-6)
    # the soft CE is exactly Mixup's lam * CE(y_i) + (1 - lam) * CE(y_j)
    logits = torch.randn(B, K)
    assert torch.allclose(soft_cross_entropy(logits, out.target),
                          lam * F.cross_entropy(logits, b.y, reduction="none")
                          + (1 - lam) * F.cross_entropy(logits, b.y[pairs.perm], reduction="none"), atol=1e-5)


def test_manifold_mixup_mixes_hidden_states_inside_the_forward_pass(world, cfg, tiny_vae):
    b = batch_(world)
    model = model_().eval()
    layers = set()
    for seed in range(8):
        out = create_method("manifold_mixup")(ctx_(cfg, world[0], tiny_vae, seed=seed, model=model), b)
        fw = out.forward_kwargs
        k = fw["mix_layer"]
        layers.add(k)
        assert torch.equal(out.x, b.x) and 0 <= k < model.num_mix_layers
        pairs = draw_pairs(B, cfg.robust.mixup_alpha, torch.Generator().manual_seed(seed))
        assert torch.allclose(out.target, mix(one_hot(b.y, K), pairs))
        with torch.no_grad():  # reference: run the blocks by hand, mix at position k
            h = b.x
            h = mix(h, pairs) if k == 0 else h
            h = h * 2 - 1
            for i, block in enumerate(model.blocks, start=1):
                h = block(h)
                h = mix(h, pairs) if i == k else h
            ref = model.fc(model.neck(h))
            assert torch.allclose(model(out.x, **fw), ref, atol=1e-5)
            if k > 0:  # a hidden-layer mix is not the input mix
                assert not torch.allclose(ref, model(mix(b.x, pairs)), atol=1e-3)
    assert len(layers) >= 2


def test_gan_mixup_decodes_mixed_latents_with_mixed_labels(world, cfg, tiny_vae):
    src, x, y = world
    b = batch_(world)
    out = create_method("gan_mixup")(ctx_(cfg, src, tiny_vae, seed=4), b)
    pairs = draw_pairs(B, cfg.robust.mixup_alpha, torch.Generator().manual_seed(4))
    ws, alpha = src.codes(b.idx)
    with torch.no_grad():
        expect = src.decode(mix(ws, pairs), mix(alpha, pairs))
    assert torch.equal(out.x[:B], b.x) and torch.equal(out.target[:B], one_hot(b.y, K))  # half original
    assert torch.allclose(out.x[B:], expect, atol=1e-6)
    assert torch.allclose(out.target[B:], mix(one_hot(b.y, K), pairs), atol=1e-6)
    pixel_mix = mix(b.x, pairs)  # decoding a latent mix is not blending the two images
    assert float((out.x[B:] - pixel_mix).abs().mean()) > 1e-3


def test_vae_mixup_decodes_mixed_posterior_means(world, cfg, tiny_vae):
    b = batch_(world)
    out = create_method("vae_mixup")(ctx_(cfg, world[0], tiny_vae, seed=6), b)
    pairs = draw_pairs(B, cfg.robust.mixup_alpha, torch.Generator().manual_seed(6))
    with torch.no_grad():
        mu, _ = tiny_vae.encode(b.x)
        expect = tiny_vae.decode(mix(mu, pairs))
    assert torch.equal(out.x[:B], b.x) and torch.allclose(out.x[B:], expect, atol=1e-6)
    assert torch.allclose(out.target[B:], mix(one_hot(b.y, K), pairs), atol=1e-6)
    with pytest.raises(ValueError, match=r"vae_mixup' needs a trained VAE in AugmentContext.extra\['vae'\]"):
        create_method("vae_mixup")(AugmentContext(model_(), cfg.robust, K, torch.Generator()), b)


# --------------------------------------------------------------------------- advmix
def test_project_simplex():
    v = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.6, -1.0], [0.2, 0.3, 0.5]])
    p = project_simplex(v)
    assert torch.allclose(p, torch.tensor([[1 / 3] * 3, [1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]), atol=1e-6)
    r = project_simplex(torch.randn(50, 5) * 3)
    assert bool((r >= 0).all()) and torch.allclose(r.sum(1), torch.ones(50), atol=1e-5)
    assert torch.allclose(project_simplex(r), r, atol=1e-6)


def test_advmix_keeps_content_and_takes_the_worst_style_mix(world, cfg, tiny_vae):
    src, x, y = world
    b = batch_(world)
    num_ws = src.ws.shape[-2]
    split = resolve_split(-1, num_ws)
    assert split == num_ws // 2
    # mix_styles: coarse inputs untouched, fine inputs the beta-mix of the style codes
    ws, alpha = src.codes(b.idx)
    pool = src.ws[torch.arange(B, 2 * B)].view(B, 1, *ws.shape[1:])
    half = torch.full((B, 2), 0.5)
    m = mix_styles(ws, pool, half, split)
    assert torch.equal(m[..., :split, :], ws[..., :split, :])
    assert torch.allclose(m[..., split:, :], 0.5 * ws[..., split:, :] + 0.5 * pool[:, 0, ..., split:, :], atol=1e-6)
    # the method: clean + adversarial mix, hard labels, loss >= every vertex (own style, each swap)
    model = model_()
    ctx = ctx_(cfg, src, tiny_vae, seed=9, model=model, advmix_candidates=3, pgd_steps=2)
    out = create_method("advmix")(ctx, b)
    assert torch.equal(out.x[:B], b.x) and torch.equal(out.target, one_hot(torch.cat([b.y, b.y]), K))
    cand = torch.randint(N, (B, 3), generator=torch.Generator().manual_seed(9))  # replay the candidates
    pool = src.ws[cand.flatten()].view(B, 3, *ws.shape[1:])
    adv = ce(model, out.x[B:], b.y)
    for k in range(4):
        vertex = F.one_hot(torch.full((B,), k), 4).float()
        with torch.no_grad():
            xv = src.decode(mix_styles(ws, pool, vertex, split), alpha)
        assert bool((adv >= ce(model, xv, b.y) - 1e-4).all()), k
    assert 0.0 <= out.info["advmix_own_style"] <= 1.0
    # the attack's output is the decode of its own simplex mix of the replayed candidates
    x_adv, beta, cand2 = advmix_attack(model, src, b.idx, b.y, 3, 2, split, torch.Generator().manual_seed(9))
    assert torch.equal(cand2, cand) and torch.allclose(x_adv, out.x[B:], atol=1e-6)
    assert bool((beta >= 0).all()) and torch.allclose(beta.sum(1), torch.ones(B), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(x_adv, src.decode(mix_styles(ws, pool, beta, split), alpha), atol=1e-5)
    with pytest.raises(ValueError, match="leaves no content or no style"):
        resolve_split(num_ws, num_ws)


# --------------------------------------------------------------------------- latent: NaTra family
def test_random_latent_decodes_gaussian_edits(world, cfg, tiny_vae):
    src, x, y = world
    b = batch_(world)
    out = create_method("random_latent")(ctx_(cfg, src, tiny_vae, seed=2, eps=0.7), b)
    r = torch.randn(B, 4, generator=torch.Generator().manual_seed(2)) * 0.7
    with torch.no_grad():
        expect = src.decode(*src.codes(b.idx), r)
    assert torch.equal(out.x[:B], b.x) and torch.allclose(out.x[B:], expect, atol=1e-6)
    assert torch.equal(out.target, one_hot(torch.cat([b.y, b.y]), K))


def test_natra_tunes_budgets_and_natra_oa_keeps_them_fixed(world, cfg, tiny_vae):
    src, x, y = world
    b = batch_(world)
    create_method("natra")(ctx_(cfg, src, tiny_vae), b)
    moved = src.eps[:B]
    assert bool((((moved - 0.3).abs() < 1e-6) | ((moved - 0.5).abs() < 1e-6)).all()) and float(moved.max()) > 0.3 + 1e-6
    out = create_method("natra_oa")(ctx_(cfg, src, tiny_vae), b)
    assert torch.equal(src.eps, torch.full((N,), 0.3)) and out.info["eps_mean"] == pytest.approx(cfg.robust.eps)


def test_natra_ol_uses_one_code(world, cfg, tiny_vae):
    src, x, y = world
    assert method_needs("natra_ol").lce_codes(5) == 1
    assert method_needs("natra").lce_codes(5) == 5 and method_needs("advmix").lce_codes(3) == 3
    out = create_method("natra_ol")(ctx_(cfg, src, tiny_vae), batch_(world))
    assert out.x.shape[0] == 2 * B
    two = LatentSource(src.G, src.ws.repeat(1, 2, 1, 1), src.alpha.repeat(1, 2, 1) / 2, 0, src.directions, 4,
                       src.layer_range, src.eps.clone())
    with pytest.raises(ValueError, match="natra_ol .* needs one latent code per image but the latent source has 2"):
        create_method("natra_ol")(ctx_(cfg, two, tiny_vae), batch_(world))


def test_natra_plus_classic_is_natra_with_a_classic_clean_half(world, cfg, tiny_vae):
    src, x, y = world
    b = batch_(world)
    plain = create_method("natra")(ctx_(cfg, src, tiny_vae, seed=11), b)
    gen = torch.Generator().manual_seed(11)
    both = create_method("natra+classic")(ctx_(cfg, src, tiny_vae, seed=11), b)
    src.eps.fill_(0.3)
    create_method("natra")(AugmentContext(model_(), cfg.robust, K, gen, src), b)  # advance gen as natra does
    assert torch.allclose(both.x[B:], plain.x[B:], atol=1e-6) and torch.allclose(both.target, plain.target)
    assert torch.allclose(both.x[:B], classic_augment(b.x, cfg.robust, gen), atol=1e-6)
    assert float((both.x[:B] - b.x).abs().mean()) > 0.01


# --------------------------------------------------------------------------- config, space, VAE stage
def test_config_validates_method_names_and_method_knobs():
    with pytest.raises(ConfigError, match=r"robust.method 'mixupp' is not a registered augmentation method; choose one of: .*mixup"):
        load_config("smoke", overrides={"robust.method": "mixupp"})
    for key, bad in {"mixup_alpha": 0.0, "classic_scale": 1.0, "pixel_eps": 1.5, "advmix_candidates": 0,
                     "classic_rotation_deg": -1.0}.items():
        with pytest.raises(ConfigError, match=f"robust.{key}"):
            load_config("smoke", overrides={f"robust.{key}": bad})
    for profile in ("smoke", "cpu", "paper"):
        assert load_config(profile).vae.steps > 0


@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_every_method_is_selectable_in_the_baselines_space(profile):
    space = load_search_space("baselines", load_config(profile))
    assert set(METHODS) <= set(space.params["robust.method"].choices)


def test_vae_stage_trains_with_the_elbo_and_the_pipeline_caches_it(world, tmp_path):
    src, x, y = world
    data = ImageDataset(x.repeat(3, 1, 1, 1), y.repeat(3), ["a", "b", "c"])
    cfg = load_config("smoke", overrides={"robust.method": "vae_mixup", "vae.steps": 40, "vae.batch_size": 16,
                                          "vae.lr": 0.003})
    short = vae_stage.run(cfg.replace(**{"vae.steps": 1}), data, tmp_path / "one")
    art = vae_stage.run(cfg, data, tmp_path / "v")
    assert art.metrics["vae_recon_mse"] < short.metrics["vae_recon_mse"]  # the ELBO training fits the data
    vae = vae_stage.load_vae(art.vae_path)
    assert not vae.training and vae.z_dim == cfg.vae.z_dim
    paths = extra_model_paths(cfg, StorageLayout(tmp_path), data)
    again = extra_model_paths(cfg, StorageLayout(tmp_path), data)
    assert paths == again and set(paths) == {"vae"}
    assert cache.read_manifest(paths["vae"].parent)["summary"]["vae_recon_mse"] == pytest.approx(art.metrics["vae_recon_mse"])
    other = extra_model_paths(cfg.replace(**{"vae.z_dim": 4, "vae.steps": 2}), StorageLayout(tmp_path), data)
    assert other["vae"] != paths["vae"]  # keyed on the vae config
    assert extra_model_paths(cfg.replace(**{"robust.method": "mixup"}), StorageLayout(tmp_path), data) == {}
    extra = load_extra_models(paths, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(extra["vae"].decode(torch.zeros(1, cfg.vae.z_dim)), vae.decode(torch.zeros(1, cfg.vae.z_dim)))
