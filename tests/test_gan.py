"""GAN stage: losses move the right way on a tiny batch; run() leaves a generator and grids."""
import pytest
import torch

from natra_ray.config import load_config
from natra_ray.data import ImageDataset
from natra_ray.models import list_discriminators
from natra_ray.stages import gan

TINY = ["gan.generator=style_tiny", "gan.d_channels=8", "gan.batch_size=8", "gan.style_mixing=0.0",
        "gan.steps=4", "gan.sample_every=2"]


def _real(n=8):
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, 32, 32)
    x[:, :, 8:24, 10:22] = 0.8 + 0.2 * torch.rand(n, 1, 16, 12, generator=g)  # a "garment" blob
    return x


@pytest.mark.parametrize("loss", ["ns_r1", "wgan_gp"])
def test_one_step_decreases_each_players_loss(loss):
    torch.manual_seed(0)
    cfg = load_config("smoke", overrides=TINY + [f"gan.loss={loss}", "gan.lr=0.01"])
    tr = gan.GanTrainer(cfg)
    real = gan.from_unit(_real())
    z = torch.randn(8, tr.G.z_dim)
    d_loss_fn = gan.d_logistic_loss if loss == "ns_r1" else gan.d_wgan_loss
    g_loss_fn = gan.g_nonsaturating_loss if loss == "ns_r1" else gan.g_wgan_loss

    with torch.no_grad():
        fake = tr.G(z)
        d_before = float(d_loss_fn(tr.D(real), tr.D(fake)))
    tr.step = 1  # skip the lazy R1 step so the update is the plain loss gradient
    tr.d_step(_real())
    with torch.no_grad():
        d_after = float(d_loss_fn(tr.D(real), tr.D(fake)))
    assert d_after < d_before

    torch.manual_seed(5)
    with torch.no_grad():
        g_before = float(g_loss_fn(tr.D(tr._fake(8))))
    torch.manual_seed(5)
    tr.g_step(8)
    torch.manual_seed(5)
    with torch.no_grad():
        g_after = float(g_loss_fn(tr.D(tr._fake(8))))
    assert g_after < g_before


@pytest.mark.parametrize("disc", list_discriminators())
def test_every_discriminator_learns_and_every_parameter_gets_a_gradient(disc):
    torch.manual_seed(0)
    cfg = load_config("smoke", overrides=TINY + [f"gan.discriminator={disc}", "gan.lr=0.01"])
    tr = gan.GanTrainer(cfg)
    real, fake = gan.from_unit(_real()), tr.G(torch.randn(8, tr.G.z_dim)).detach()
    loss = gan.d_logistic_loss(tr.D(real), tr.D(fake))
    loss.backward()
    silent = [n for n, p in tr.D.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"{disc}: no gradient reaches {silent}"
    tr.step = 1  # no lazy R1 on this step
    for _ in range(3):
        tr.d_step(_real())
    with torch.no_grad():
        assert float(gan.d_logistic_loss(tr.D(real), tr.D(fake))) < float(loss)


def test_r1_penalty_is_gradient_norm():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    pred = (2.0 * x).flatten(1).sum(1)  # gradient is 2 everywhere: ||g||^2 = 4 * 16
    assert torch.isclose(gan.d_r1_penalty(pred, x), torch.tensor(64.0))


def test_ema_accumulate():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    gan.accumulate(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


def test_run_writes_generator_and_grids_and_reloads(tmp_path):
    cfg = load_config("smoke", overrides=TINY)
    data = ImageDataset(_real(16), torch.zeros(16, dtype=torch.long), ["blob"])
    art = gan.run(cfg, data, tmp_path)
    assert art.generator_path.is_file()
    assert [p.name for p in art.sample_grids] == ["step_000002.png", "step_000004.png", "final.png"]
    g = gan.load_generator(art.generator_path, cfg)
    assert g.synthesis(g.mapping(g.sample_z(2))).shape == (2, 1, 32, 32)

    # gan.checkpoint = an external generator: no training, the same weights come back
    cfg2 = cfg.replace(**{"gan.checkpoint": str(art.generator_path)})
    art2 = gan.run(cfg2, data, tmp_path / "ext")
    g2 = gan.load_generator(art2.generator_path)
    z = g.sample_z(2)
    assert torch.equal(g(z), g2(z))


def test_external_generator_of_wrong_image_shape_is_refused(tmp_path):
    cfg = load_config("smoke", overrides=TINY)
    data = ImageDataset(_real(16), torch.zeros(16, dtype=torch.long), ["blob"])
    art = gan.run(cfg, data, tmp_path)
    with pytest.raises(ValueError, match="makes 1x32x32 images but the data is 3x32x32"):
        gan.load_generator(art.generator_path, cfg.replace(**{"data.channels": 3}))
