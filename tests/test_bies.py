"""BIES (encoder + shifting, NaTra Sec. 3.2), LCE (Sec. 3.3) and the perceptual loss wrapper.

Everything runs on ``style_tiny`` (untrained, its w_avg measured) and a tiny encoder; the
target data are images of a *different* random style_tiny, so the encoder and the shifting
have a real domain gap to close. One encoder is trained once per module and shared.
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from PIL import Image

from natra_ray.checkpoints import save_checkpoint
from natra_ray.config import load_config
from natra_ray.data import ImageDataset
from natra_ray.losses import (BACKBONE_FILES, Perceptual, PerceptualWeightsMissing, image_loss,
                              latent_loss, unit)
from natra_ray.models import create_generator, create_model, to_unit
from natra_ray.models.latent import lce_decode
from natra_ray.stages import bies, lce
from natra_ray.stages.gan import load_generator

LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core box: two intra-op threads spin against other
    # processes and run ~20x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _generator(seed: int):
    torch.manual_seed(seed)
    G = create_generator("style_tiny")
    with torch.no_grad():  # what GAN training would have measured
        G.w_avg.copy_(G.mapping(torch.randn(2000, G.z_dim)).mean(0))
    return G.eval().requires_grad_(False)


def _cfg(**over):
    base = {"encoder.steps": 40, "encoder.batch_size": 8, "encoder.shift_steps": 30,
            "encoder.shift_lr": 0.002, "encoder.lr": 0.001, "gan.style_mixing": 0.5}
    base.update(over)
    return load_config("smoke", overrides=base)


@pytest.fixture(scope="module")
def G():
    return _generator(0)


@pytest.fixture(scope="module")
def data():
    other = _generator(1)  # the "target domain": another generator's images
    with torch.no_grad():
        imgs = to_unit(other(torch.randn(48, other.z_dim, generator=torch.Generator().manual_seed(2))))
    return ImageDataset(imgs, torch.zeros(48, dtype=torch.long), ["x"])


@pytest.fixture(scope="module")
def perceptual():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Perceptual("alex")


@pytest.fixture(scope="module")
def trained(G, data, perceptual):
    """(encoder, per-step history) of one BIES encoder run."""
    history = []
    E = bies.train_encoder(_cfg(), G, data, perceptual=perceptual, history=history)
    return E, history


def _objective(G, ws, alpha, x, perceptual):
    total, _ = image_loss(x, to_unit(lce_decode(G, ws, alpha, LAYER)), perceptual, 1.0, 0.8)
    return total  # (B,)


# --------------------------------------------------------------------------- pure losses
def test_latent_and_image_loss_values():
    w = torch.zeros(2, 3, 4)
    assert latent_loss(w, w + 2).item() == pytest.approx(4.0)
    x = torch.zeros(2, 1, 8, 8)
    total, parts = image_loss(x, x + 0.5, None, 2.0, 0.8)
    assert torch.allclose(total, torch.full((2,), 0.5))  # 2 * 0.25, no LPIPS term
    assert set(parts) == {"mse"}
    # straight-through clamp: value clamped, gradient still flows from overshooting pixels
    img = torch.tensor([3.0, 0.0], requires_grad=True)
    out = unit(img)
    assert torch.equal(out.detach(), torch.tensor([1.0, 0.5]))
    out.sum().backward()
    assert torch.equal(img.grad, torch.tensor([0.5, 0.5]))


# --------------------------------------------------------------------------- BIES
def test_bies_latent_loss_falls(trained):
    _, hist = trained
    lat = [h["latent_loss"] for h in hist]
    img = [h["image_loss"] for h in hist]
    assert len(hist) == 40 and all("lpips" in h for h in hist)
    first, last = sum(lat[:8]) / 8, sum(lat[-8:]) / 8
    assert last < 0.9 * first, (first, last)  # Eq. 8
    assert sum(img[-8:]) / 8 < sum(img[:8]) / 8  # Eq. 9


def test_encoder_starts_at_generator_w_avg(G, data):
    E = bies.build_encoder(_cfg(), G)
    tiny = create_model("encoder", "resnet", resolution=32, img_channels=1, num_ws=G.num_ws,
                        w_dim=G.w_dim, channels=8)  # the smoke profile's encoder
    assert {k: v.shape for k, v in E.state_dict().items()} == {k: v.shape for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        w = E(data.images[:2])
    assert w.shape == (2, G.num_ws, G.w_dim)
    assert torch.allclose(w, G.w_avg.expand_as(w))


def test_shifting_lowers_reconstruction_error(G, data, trained, perceptual):
    E, _ = trained
    g_before = [p.clone() for p in G.parameters()]
    x = data.images[:16]
    before = bies.recon_error(G, E, x, perceptual)
    hist = []
    Gs = bies.shift_generator(_cfg(), G, E, data, perceptual=perceptual, history=hist)
    after = bies.recon_error(Gs, E, x, perceptual)
    assert after["mse"] < 0.95 * before["mse"], (before, after)
    assert after["lpips"] < before["lpips"], (before, after)
    assert len(hist) == 30
    # G itself is untouched (the shift works on a copy) and the copy is frozen
    assert all(torch.equal(a, b) for a, b in zip(g_before, G.parameters()))
    assert not any(p.requires_grad for p in Gs.parameters())


def test_nonfinite_loss_raises(G, data, perceptual):
    bad = ImageDataset(data.images[:8].clone(), data.labels[:8], ["x"])
    bad.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Eq. 9"):
        bies.train_encoder(_cfg(**{"encoder.steps": 2}), G, bad, perceptual=perceptual)


def test_bies_run_checkpoint_round_trip(tmp_path, G, data):
    cfg = _cfg(**{"encoder.steps": 4, "encoder.shift_steps": 3})
    gpath = save_checkpoint(tmp_path / "g.pt", G, kind="generator", name="style_tiny",
                            kwargs={"resolution": 32, "img_channels": 1})
    reports = []
    with pytest.warns(RuntimeWarning, match="RANDOMLY INITIALISED"):
        art = bies.run(cfg, gpath, data, tmp_path / "bies", reports.append)
    m = art.metrics
    assert m["lpips_pretrained"] == 0.0
    for k in ("mse", "lpips"):
        assert m[f"bies_recon_{k}_before_shift"] > 0 and m[f"bies_recon_{k}_after_shift"] > 0
    assert any("bies_step" in r for r in reports) and any("shift_step" in r for r in reports)

    E1, E2 = bies.load_encoder(art.encoder_path, G), bies.load_encoder(art.encoder_path, G)
    G1 = load_generator(art.shifted_generator_path, cfg)
    _, held = bies.split_heldout(data, cfg.seed)
    with torch.no_grad():
        assert torch.equal(E1(held.images), E2(held.images))
        # the shift really changed the generator
        w = E1(held.images)
        assert not torch.equal(G1.synthesis(w), G.synthesis(w))
    # the reloaded pair reproduces the metrics computed in memory by run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P = Perceptual("alex")
    again = bies.recon_error(G1, E1, held.images, P)
    assert again["mse"] == pytest.approx(m["bies_recon_mse_after_shift"], rel=1e-5)
    assert again["lpips"] == pytest.approx(m["bies_recon_lpips_after_shift"], rel=1e-5)
    with Image.open(art.recon_grid_path) as im:  # 3 rows x 8 columns of 32 px (x2 upscale)
        assert im.size == (2 * (8 * 34 + 2), 2 * (3 * 34 + 2))


# --------------------------------------------------------------------------- LCE
def test_lce_one_code_is_plain_inversion(G, data, trained, perceptual):
    E, _ = trained
    x = data.images[:6]
    with torch.no_grad():
        w = E(x)
        plain = G.synthesis(w)
    for layer in (0, 1, LAYER, G.num_layers):
        ws, alpha = lce.invert(G, E, x, 1, layer, 25, 0.05, perceptual, 1.0, 0.8)
        assert ws.shape == (6, 1, G.num_ws, G.w_dim)
        assert alpha.shape == (6, 1, G.layer_shape(layer)[0])
        assert torch.equal(ws[:, 0], w) and torch.equal(alpha, torch.ones_like(alpha))
        with torch.no_grad():
            assert torch.equal(lce_decode(G, ws, alpha, layer), plain)
    cfg1 = _cfg(**{"encoder.lce_codes": 1})
    codes = lce.encode_dataset(G, E, x, cfg1, batch_size=len(x))
    assert torch.equal(codes.ws[:, 0], w) and codes.meta["steps"] == 0
    # other batch sizes agree up to the encoder's batch-size-dependent float rounding
    codes4 = lce.encode_dataset(G, E, x, cfg1, batch_size=4)
    assert torch.allclose(codes4.ws, codes.ws, atol=1e-5) and torch.equal(codes4.alpha, codes.alpha)


def test_lce_more_codes_not_worse(G, data, trained, perceptual):
    E, _ = trained
    x = data.images[:8]
    ws1, a1 = lce.invert(G, E, x, 1, LAYER, 0, 0.05, perceptual, 1.0, 0.8)
    # step 0 of N > 1 is the plain inversion (alpha = (1, 0, 0))
    ws0, a0 = lce.invert(G, E, x, 3, LAYER, 0, 0.05, perceptual, 1.0, 0.8)
    assert torch.equal(a0[:, 0], a1[:, 0]) and (a0[:, 1:] == 0).all()
    with torch.no_grad():
        assert torch.allclose(lce_decode(G, ws0, a0, LAYER), lce_decode(G, ws1, a1, LAYER), atol=1e-5)
    ws3, a3 = lce.invert(G, E, x, 3, LAYER, 15, 0.05, perceptual, 1.0, 0.8)
    assert ws3.shape == (8, 3, G.num_ws, G.w_dim) and a3.shape == (8, 3, G.layer_shape(LAYER)[0])
    assert not (a3[:, 1:] == 0).all()  # the extra codes were used: not stuck at the init
    with torch.no_grad():
        l1 = _objective(G, ws1, a1, x, perceptual)
        l3 = _objective(G, ws3, a3, x, perceptual)
    assert (l3 <= l1 + 1e-6).all(), (l1, l3)
    assert l3.mean() < 0.9 * l1.mean(), (l1.mean(), l3.mean())


def test_lce_invalid_layer(G, trained, data):
    E, _ = trained
    with pytest.raises(ValueError, match="layer 0 is the constant"):
        lce.invert(G, E, data.images[:2], 2, 0, 1, 0.01, None, 1.0, 0.0)


def test_encode_dataset_save_load_and_metrics(tmp_path, G, data, trained, perceptual):
    E, _ = trained
    cfg = _cfg(**{"encoder.lce_codes": 2, "encoder.lce_layer": LAYER, "encoder.lce_steps": 5})
    x = data.images[:10]
    codes = lce.encode_dataset(G, E, x, cfg, batch_size=4, perceptual=perceptual)
    assert codes.ws.shape == (10, 2, G.num_ws, G.w_dim) and codes.alpha.shape[:2] == (10, 2)
    assert codes.ws.device.type == "cpu" and not codes.ws.requires_grad
    path = codes.save(tmp_path / "codes.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors only
    assert raw["kind"] == "latent_codes"
    back = lce.LatentCodes.load(path)
    assert torch.equal(back.ws, codes.ws) and torch.equal(back.alpha, codes.alpha) and back.layer == LAYER
    m = lce.recon_metrics(G, back, x, perceptual, batch_size=3)
    m_plain = bies.recon_error(G, E, x, perceptual)
    assert set(m) == {"mse", "lpips"}
    with torch.no_grad():
        direct = (to_unit(lce_decode(G, codes.ws, codes.alpha, LAYER)) - x).pow(2).mean().item()
    assert m["mse"] == pytest.approx(direct, rel=1e-5)
    assert m["mse"] + 0.8 * m["lpips"] <= m_plain["mse"] + 0.8 * m_plain["lpips"] + 1e-6


# --------------------------------------------------------------------------- perceptual
@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """No weights anywhere, and any download attempt fails the test."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_download(*a, **k):
        raise AssertionError("LPIPS tried to download weights")

    import torchvision.models._api as tv_api

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_download)
    return hub


def test_perceptual_random_backbone_fallback_is_loud(empty_hub, caplog):
    with caplog.at_level(logging.WARNING, logger="natra_ray.losses"):
        with pytest.warns(RuntimeWarning, match="RANDOMLY INITIALISED"):
            P = Perceptual("alex", fallback="random_backbone")
    assert P.pretrained is False and P.weights_path == ""
    assert any(BACKBONE_FILES["alex"] in r.getMessage() for r in caplog.records)
    x = torch.rand(3, 1, 32, 32)
    d = P(x, torch.rand(3, 1, 32, 32))
    assert d.shape == (3,) and (d > 0).all()
    assert torch.allclose(P(x, x), torch.zeros(3), atol=1e-6)
    assert P(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)).shape == (2,)  # small -> upsampled


def test_perceptual_error_mode_raises(empty_hub):
    with pytest.raises(PerceptualWeightsMissing, match=BACKBONE_FILES["alex"]):
        Perceptual("alex", fallback="error")
    with pytest.raises(PerceptualWeightsMissing, match="does not exist"):
        Perceptual("alex", weights=str(empty_hub / "nope.pth"))


def test_perceptual_loads_local_weights(empty_hub, perceptual):
    # torchvision-style file ("features.N.weight") made from a backbone we can recognise
    src = {f"features.{k.split('.', 1)[1]}": v + 1.0 for k, v in perceptual.lpips.net.state_dict().items()}
    src["classifier.1.weight"] = torch.zeros(2, 2)  # full torchvision files also hold the head
    empty_hub.joinpath("checkpoints").mkdir(parents=True)
    f = empty_hub / "checkpoints" / BACKBONE_FILES["alex"]
    torch.save(src, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when weights exist
        P = Perceptual("alex", fallback="error")  # found in the hub cache
    assert P.pretrained and P.weights_path == str(f)
    for k, v in P.lpips.net.state_dict().items():
        assert torch.equal(v, src[f"features.{k.split('.', 1)[1]}"])
    explicit = Perceptual("alex", weights=str(f))
    assert explicit.pretrained
