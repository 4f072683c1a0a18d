"""Every registered model's forward shapes, and the generator interface the stages rely on."""
import pytest
import torch

from natra_ray.models import (create_discriminator, create_encoder, create_generator, create_model,
                              list_classifiers, list_discriminators, list_encoders, list_generators)
from natra_ray.models.layers import UPSAMPLE_MODES, ModulatedConv2d
from natra_ray.registry import UnknownNameError


@pytest.mark.parametrize("name", list_generators())
@pytest.mark.parametrize("res, ch", [(16, 1), (32, 3)])
@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
def test_generator_shapes(name, res, ch, upsample):
    g = create_generator(name, resolution=res, img_channels=ch, z_dim=16, w_dim=16, channels=16, mapping_layers=2,
                         upsample=upsample)
    assert g.num_ws == 2 * int(torch.log2(torch.tensor(res))) - 2  # StyleGAN's count
    z = g.sample_z(3)
    w = g.mapping(z)
    assert w.shape == (3, g.w_dim)
    assert g.synthesis(w).shape == (3, ch, res, res)
    assert g.synthesis(g.broadcast(w)).shape == (3, ch, res, res)


@pytest.mark.parametrize("name", list_discriminators())
def test_discriminator_shapes(name):
    d = create_discriminator(name, resolution=32, img_channels=1, channels=8)
    assert d(torch.randn(4, 1, 32, 32)).shape == (4,)


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_shapes(name):
    e = create_encoder(name, resolution=32, img_channels=1, num_ws=8, w_dim=16, channels=8)
    assert e(torch.rand(2, 1, 32, 32)).shape == (2, 8, 16)


def test_every_registered_model_kind_is_covered():
    assert list_generators() and list_discriminators() and list_encoders() and list_classifiers()


def test_unknown_names_list_known_ones():
    with pytest.raises(UnknownNameError, match="unknown generator 'biggan'; known names are: style"):
        create_generator("biggan")
    with pytest.raises(ValueError, match="unknown model kind"):
        create_model("vae3000", "x")


@pytest.fixture(params=UPSAMPLE_MODES)
def tiny(request):
    torch.manual_seed(0)
    return create_generator("style_tiny", resolution=32, upsample=request.param)


def test_transposed_upsampling_conv_keeps_unit_variance():
    """Demodulation promises unit-variance outputs for unit-variance inputs; each output pixel of
    the stride-2 transposed conv sees only a quarter of its taps, which the layer must correct."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 32, 4, 16, upsample=True, upsample_mode="transpose")
    out = conv(torch.randn(16, 64, 8, 8), torch.randn(16, 16))
    assert out.shape == (16, 32, 16, 16)
    assert 0.85 < float(out[:, :, 2:-2, 2:-2].std()) < 1.15
    with pytest.raises(ValueError, match="kernel 4"):
        ModulatedConv2d(8, 8, 3, 16, upsample=True, upsample_mode="transpose")
    with pytest.raises(ValueError, match="known: bilinear, transpose"):
        ModulatedConv2d(8, 8, 3, 16, upsample=True, upsample_mode="nearest")


def test_w_plus_per_layer_styles_matter(tiny):
    ws = tiny.broadcast(tiny.mapping(tiny.sample_z(2)))
    base = tiny.synthesis(ws)
    ws2 = ws.clone()
    ws2[:, 3] += 1.0  # change the style input of layer 3 only
    assert not torch.allclose(tiny.synthesis(ws2), base)
    assert torch.allclose(tiny.synthesis(ws.clone()), base)


def test_head_then_rest_equals_full_forward_at_every_layer(tiny):
    ws = tiny.broadcast(tiny.mapping(tiny.sample_z(3)))
    full = tiny.synthesis(ws)
    for l in range(tiny.num_layers + 1):
        feat = tiny.head(ws, l)
        assert feat.shape[1:] == tiny.layer_shape(l)
        assert torch.allclose(tiny.rest(feat, ws, l), full, atol=1e-5), f"split at layer {l}"


def test_activations_match_head(tiny):
    ws = tiny.broadcast(tiny.mapping(tiny.sample_z(2)))
    acts = tiny.activations(ws, [0, 2, 4])
    assert sorted(acts) == [0, 2, 4]
    for l, a in acts.items():
        assert torch.allclose(a, tiny.head(ws, l + 1), atol=1e-6)


def test_truncation_pulls_toward_w_avg(tiny):
    tiny.w_avg.fill_(0.5)
    z = tiny.sample_z(4)
    w, wt = tiny.mapping(z), tiny.mapping(z, truncation_psi=0.5)
    assert torch.allclose(wt, 0.5 + 0.5 * (w - 0.5), atol=1e-6)


def test_invalid_layer_ranges(tiny):
    with pytest.raises(ValueError, match="layer range 5..2 is invalid"):
        tiny.ws_of_layers(5, 2)
    with pytest.raises(ValueError, match="out of range"):
        tiny.head(tiny.broadcast(tiny.mapping(tiny.sample_z(1))), tiny.num_layers + 1)
    with pytest.raises(ValueError, match="power of two"):
        create_generator("style", resolution=28)
