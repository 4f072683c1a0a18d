"""Classifiers behind the CLASSIFIERS registry: shapes, gradients, Manifold Mixup hooks, errors."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import natra_ray.models.classifiers as classifiers
from natra_ray.models.registries import CLASSIFIERS
from natra_ray.registry import UnknownNameError

# Small widths keep the whole file fast on 2 CPU cores; wide_resnet width 1 = WRN-10-1.
SMALL: Dict[str, Dict[str, Any]] = {
    "small_cnn": {"width": 8},
    "vgg16": {"width": 8},
    "wide_resnet": {"width": 1, "depth": 10},
}
NAMES = CLASSIFIERS.names()


def build(name: str, **kw: Any) -> nn.Module:
    return CLASSIFIERS.create(name, **{**SMALL.get(name, {}), **kw})


def test_the_three_classifiers_are_registered() -> None:
    assert {"small_cnn", "vgg16", "wide_resnet"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_forward_shape_and_finite(name: str, channels: int, size: int) -> None:
    model = build(name, in_channels=channels, num_classes=7, image_size=size)
    x = torch.rand(2, channels, size, size)  # (B, C, H, W) in [0, 1]
    for train in (True, False):
        model.train(train)
        logits = model(x)
        assert logits.shape == (2, 7)
        assert torch.isfinite(logits).all()
    feats = model.features(x)
    assert feats.ndim == 2 and feats.shape[0] == 2
    # features() is exactly the penultimate layer: the linear head maps it to the logits.
    torch.testing.assert_close(model.fc(feats), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_ignored_arguments_are_accepted(name: str) -> None:
    # Every factory has the same signature; arguments it does not use must not raise.
    factory = CLASSIFIERS.get(name)
    kw = dict(in_channels=1, num_classes=10, image_size=28, width=SMALL.get(name, {}).get("width", 8),
              depth=SMALL.get(name, {}).get("depth", 16))
    assert factory(**kw).eval()(torch.rand(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("name", NAMES)
def test_input_size_other_than_image_size_still_runs(name: str) -> None:
    model = build(name, image_size=32).eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_the_input(name: str) -> None:
    model = build(name).eval()  # attacks differentiate w.r.t. the input in eval mode
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_identity_mix_equals_plain_forward_at_every_layer(name: str) -> None:
    model = build(name).eval()
    x = torch.rand(3, 1, 32, 32)
    plain = model(x)
    assert model.num_mix_layers >= 3  # input + at least two hidden positions
    for layer in range(model.num_mix_layers):
        seen: List[Tensor] = []

        def identity(h: Tensor) -> Tensor:
            seen.append(h)
            return h

        torch.testing.assert_close(model(x, mix_layer=layer, mix_fn=identity), plain)
        assert len(seen) == 1 and seen[0].shape[0] == 3  # applied exactly once, to the batch
        if layer == 0:
            assert seen[0] is x  # position 0 is the input itself, untouched


@pytest.mark.parametrize("name", NAMES)
def test_zeroing_the_hidden_state_changes_the_output(name: str) -> None:
    model = build(name).eval()
    x = torch.rand(3, 1, 32, 32)
    plain = model(x)
    for layer in range(model.num_mix_layers):
        mixed = model(x, mix_layer=layer, mix_fn=torch.zeros_like)
        assert not torch.allclose(mixed, plain, atol=1e-4), f"mix_layer={layer} had no effect"
        # After zeroing, every example's hidden state is identical, hence so are the logits.
        torch.testing.assert_close(mixed[0], mixed[1])


@pytest.mark.parametrize("name", NAMES)
def test_mix_gradient_flows_through_both_mixed_examples(name: str) -> None:
    # Manifold Mixup's typical mix_fn: lam * h + (1 - lam) * h[perm].
    model = build(name).train()
    x = torch.rand(4, 1, 32, 32, requires_grad=True)
    perm = torch.tensor([1, 0, 3, 2])
    layer = model.num_mix_layers - 1
    out = model(x, mix_layer=layer, mix_fn=lambda h: 0.7 * h + 0.3 * h[perm])
    out[0].sum().backward()
    # Example 0 is mixed with example 1, so both receive gradient from logits[0].
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bad_mix_arguments_raise(name: str) -> None:
    model = build(name).eval()
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="mix_layer must be in"):
        model(x, mix_layer=model.num_mix_layers, mix_fn=torch.zeros_like)
    with pytest.raises(ValueError, match="mix_layer must be in"):
        model(x, mix_layer=-1, mix_fn=torch.zeros_like)
    with pytest.raises(ValueError, match="given together"):
        model(x, mix_layer=1)
    with pytest.raises(ValueError, match="given together"):
        model(x, mix_fn=torch.zeros_like)


@pytest.mark.parametrize("depth", [15, 4, 0, 12])
def test_wide_resnet_rejects_depth_not_6n_plus_4(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"depth must be 6n\+4 \(10, 16, 22, 28, \.\.\.\); got {depth}"):
        CLASSIFIERS.create("wide_resnet", depth=depth, width=1)


def test_wide_resnet_width_rule() -> None:
    assert classifiers.wide_resnet_widen_factor(10) == 10  # <= 20: the widen factor itself
    assert classifiers.wide_resnet_widen_factor(20) == 20
    assert classifiers.wide_resnet_widen_factor(32) == 2  # > 20: first-group channels 16k
    assert classifiers.wide_resnet_widen_factor(160) == 10
    with pytest.raises(ValueError, match="multiple of 16"):
        CLASSIFIERS.create("wide_resnet", width=40)
    model = CLASSIFIERS.create("wide_resnet", in_channels=3)  # config defaults: WRN-16-2
    assert (model.depth, model.widen_factor, model.feature_dim) == (16, 2, 128)


@pytest.mark.parametrize("depth,k,millions", [(16, 8, 11.0), (40, 4, 8.9)])
def test_wide_resnet_matches_the_paper_parameter_counts(depth: int, k: int, millions: float) -> None:
    # Zagoruyko & Komodakis (2016), Table: CIFAR-10 models with 3 input channels.
    model = CLASSIFIERS.create("wide_resnet", in_channels=3, depth=depth, width=k)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - millions) < 0.05


def test_vgg16_layout_scales_with_width() -> None:
    model = CLASSIFIERS.create("vgg16", width=64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    assert len(convs) + len(linears) == 16  # the "16" of VGG-16
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    half = CLASSIFIERS.create("vgg16", width=32)
    assert [c.out_channels for c in half.modules() if isinstance(c, nn.Conv2d)][-1] == 256
    assert len(model.blocks) == 5  # one mixable block per stage


def test_small_cnn_width_is_first_conv_channels() -> None:
    model = CLASSIFIERS.create("small_cnn", width=24)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.out_channels == 24
    assert model.feature_dim == 8 * 24


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        CLASSIFIERS.create("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message
    for name in ("small_cnn", "vgg16", "wide_resnet"):
        assert name in message


@pytest.mark.parametrize("kw", [{"in_channels": 0}, {"num_classes": 0}, {"width": 0}])
def test_invalid_common_arguments_raise(kw: Dict[str, int]) -> None:
    for name in ("small_cnn", "vgg16", "wide_resnet"):
        with pytest.raises(ValueError, match="positive integer"):
            CLASSIFIERS.create(name, **kw)


def test_one_sgd_step_lowers_the_loss_for_small_cnn() -> None:
    model = build("small_cnn").train()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = F.cross_entropy(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)  # same batch, same BN batch statistics
    assert after < before - 1e-3
