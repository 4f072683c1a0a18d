"""The corruption suite: contract (shape, dtype, range, determinism, severity ordering) for every
registered corruption, plus closed-form checks of the primitives and of paper 002's blur5."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from natra_ray.data.corruptions import (
    BLUR5_SIGMA,
    CORRUPTIONS,
    SEVERITY,
    affine_transform,
    apply_corruption,
    list_corruptions,
    smooth_noise,
)
from natra_ray.registry import UnknownNameError

NAMES = list_corruptions()
REQUIRED = {"rotate", "shear", "scale", "translate", "gaussian_blur", "gaussian_noise",
            "brightness", "contrast", "fog", "elastic", "blur5"}
RANDOM = {"rotate", "shear", "translate", "elastic", "gaussian_noise", "impulse_noise", "fog"}


def square(b: int = 6, c: int = 1, h: int = 32, w: int = 32) -> torch.Tensor:
    """A centred bright square (half the side) on a dark background, plus a gradient so that
    brightness/contrast have something to act on everywhere."""
    x = torch.full((b, c, h, w), 0.1)
    x[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 0.9
    return x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_has_the_suite() -> None:
    assert REQUIRED <= set(NAMES)
    assert set(SEVERITY) <= set(NAMES) and all(len(v) == 5 for v in SEVERITY.values())
    with pytest.raises(UnknownNameError, match="rotate"):
        apply_corruption("nope", square(), 1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_shape_dtype_range_determinism(name: str, dtype: torch.dtype) -> None:
    x = torch.rand(5, 3, 20, 24, generator=gen(9), dtype=dtype)  # non-square, RGB
    for sev in (1, 3, 5):
        a = apply_corruption(name, x, sev, gen(1))
        assert a.shape == x.shape and a.dtype == dtype
        assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
        assert torch.equal(a, apply_corruption(name, x, sev, gen(1)))
        if name in RANDOM:
            assert not torch.equal(a, apply_corruption(name, x, sev, gen(2)))


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"blur5"}))
def test_severity_5_changes_more_than_severity_1(name: str) -> None:
    x = square()
    d1 = (apply_corruption(name, x, 1, gen(3)) - x).abs().mean()
    d5 = (apply_corruption(name, x, 5, gen(3)) - x).abs().mean()
    assert d1 > 0 and d5 > 1.5 * d1, (name, float(d1), float(d5))


@pytest.mark.parametrize("sev", [0, 6, 2.0, True])
def test_bad_severity_raises(sev: object) -> None:
    with pytest.raises(ValueError, match="severity"):
        apply_corruption("rotate", square(), sev)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- geometry
def test_affine_identity_and_integer_shift() -> None:
    x = torch.rand(3, 2, 8, 10, generator=gen(4))
    eye = torch.eye(2).expand(3, 2, 2)
    torch.testing.assert_close(affine_transform(x, eye), x, atol=1e-6, rtol=0)
    # Sampling one pixel to the left (shift -1 in x) moves the content one pixel right.
    moved = affine_transform(x, eye, torch.tensor([[-1.0, 0.0]] * 3))
    torch.testing.assert_close(moved[..., 1:], x[..., :-1], atol=1e-6, rtol=0)
    assert moved[..., 0].abs().max() == 0  # zero padding enters on the left


def test_affine_quarter_turn_is_rot90() -> None:
    # Pixel units make a quarter turn exact on a square image (half-integer centres map to
    # half-integer centres), which also checks the (x, y) / (W, H) bookkeeping.
    x = torch.rand(2, 1, 6, 6, generator=gen(5))
    quarter = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]] * 2)
    out = affine_transform(x, quarter)
    ok = [torch.allclose(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-6) for k in (1, -1)]
    assert any(ok)


def test_rotate_magnitude_matches_table() -> None:
    # A thin horizontal bar rotated by +-a: its second moments give tan(2 theta).
    h = w = 64
    x = torch.zeros(8, 1, h, w)
    x[:, :, h // 2 - 1: h // 2 + 1, 8:-8] = 1.0
    out = apply_corruption("rotate", x, 4, gen(0))[:, 0]  # 30 degrees
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2,
                            indexing="ij")
    m = out.sum((1, 2))
    cxx, cyy = (out * xx ** 2).sum((1, 2)) / m, (out * yy ** 2).sum((1, 2)) / m
    cxy = (out * xx * yy).sum((1, 2)) / m
    angle = 0.5 * torch.atan2(2 * cxy, cxx - cyy).abs()
    torch.testing.assert_close(angle, torch.full((8,), math.radians(30.0)), atol=0.02, rtol=0)


def test_scale_shrinks_mass_by_factor_squared() -> None:
    x = square(1, 1, 64, 64)
    fg = x - 0.1  # foreground mass above the background
    out = apply_corruption("scale", fg.clamp(0, 1), 5)  # factor 0.5
    assert math.isclose(float(out.sum()), 0.25 * float(fg.sum()), rel_tol=0.02)


# ----------------------------------------------------------------------------- blur
def test_blur5_equals_normalised_gaussian_conv() -> None:
    x = torch.rand(4, 3, 16, 16, generator=gen(6))
    t = torch.arange(-2, 3, dtype=torch.float64)
    k2 = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * BLUR5_SIGMA ** 2))
    k2 = (k2 / k2.sum()).float()  # 5x5, sums to 1
    ref = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k2.expand(3, 1, 5, 5), groups=3)
    out = apply_corruption("blur5", x, 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(out, apply_corruption("blur5", x, 5))  # severity ignored
    assert math.isclose(BLUR5_SIGMA, 1.1, rel_tol=1e-9)
    flat = torch.full((1, 1, 8, 8), 0.37)  # normalised kernel: constants are fixed points
    torch.testing.assert_close(apply_corruption("blur5", flat, 1), flat)


def test_blur5_matches_torchvision_default_sigma() -> None:
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(2, 1, 28, 28, generator=gen(7))
    torch.testing.assert_close(apply_corruption("blur5", x, 1),
                               tvf.gaussian_blur(x, kernel_size=[5, 5]), atol=1e-5, rtol=0)


def test_gaussian_blur_preserves_mean_and_smooths() -> None:
    x = torch.rand(2, 1, 32, 32, generator=gen(8)) * 0.5 + 0.25
    out = apply_corruption("gaussian_blur", x, 5)
    assert math.isclose(float(out.mean()), float(x.mean()), rel_tol=0.01)
    assert out.std() < 0.5 * x.std()


# ----------------------------------------------------------------------------- photometric
def test_noise_brightness_contrast_closed_forms() -> None:
    grey = torch.full((4, 1, 64, 64), 0.5)
    noisy = apply_corruption("gaussian_noise", grey, 2, gen(0))  # std 0.08, no clipping here
    assert math.isclose(float((noisy - grey).std()), SEVERITY["gaussian_noise"][1], rel_tol=0.03)
    x = square()
    torch.testing.assert_close(apply_corruption("brightness", x, 1),
                               (x + SEVERITY["brightness"][0]).clamp(0, 1))
    c = SEVERITY["contrast"][2]
    m = x.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(apply_corruption("contrast", x, 3), (x - m) * c + m)
    salt = apply_corruption("impulse_noise", grey, 5, gen(0))
    frac = float((salt != 0.5).float().mean())
    assert math.isclose(frac, SEVERITY["impulse_noise"][4], rel_tol=0.1)


def test_fog_is_smooth_haze_of_the_tabled_strength() -> None:
    black = torch.zeros(4, 1, 32, 32)
    haze = apply_corruption("fog", black, 5, gen(0))  # on black the output is the haze a*h
    a = SEVERITY["fog"][4]
    torch.testing.assert_close(haze.flatten(1).amax(1), torch.full((4,), a))
    assert haze.min() >= 0
    h = smooth_noise(4, 32, 32, gen(0), black)
    # Low frequency: neighbouring pixels differ far less than independent noise would.
    assert (h[..., 1:] - h[..., :-1]).abs().mean() < 0.05
    white = torch.ones(2, 3, 16, 16)  # a white image is unchanged by white haze
    torch.testing.assert_close(apply_corruption("fog", white, 5, gen(0)), white)


def test_elastic_is_a_small_smooth_warp() -> None:
    x = square(4, 1, 32, 32)
    out = apply_corruption("elastic", x, 1, gen(0))
    # A warp moves edges, not the interior of the flat regions: corners of the image and
    # the centre of the square stay (nearly) as they were.
    torch.testing.assert_close(out[:, :, 16, 16], x[:, :, 16, 16], atol=1e-4, rtol=0)
    assert (out - x).abs().mean() < 0.05


def test_device_generator_independent_of_global_rng() -> None:
    x = square()
    torch.manual_seed(123)
    a = apply_corruption("elastic", x, 3, gen(5))
    torch.manual_seed(456)
    assert torch.equal(a, apply_corruption("elastic", x, 3, gen(5)))
    assert set(CORRUPTIONS.names()) == set(NAMES)


def test_fast_paths_match_torch_references() -> None:
    # The matmul shortcuts must equal the torch ops they replace.
    from natra_ray.data.corruptions import _base_grid, _upsample_matrix

    for h, w in ((32, 32), (20, 24)):
        ref = F.affine_grid(torch.eye(2, 3)[None], [1, 1, h, w], align_corners=False)[0]
        torch.testing.assert_close(_base_grid(h, w, torch.zeros(1)), ref)
    c = torch.rand(3, 1, 4, 4, generator=gen(11), dtype=torch.float64)
    ref = F.interpolate(c, size=(32, 20), mode="bicubic", align_corners=False)
    torch.testing.assert_close(_upsample_matrix(4, 32) @ c @ _upsample_matrix(4, 20).T, ref)


def test_one_severity_per_image_scores_every_image_once_per_corruption() -> None:
    """``eval.corruption_severity=one_per_image``: the severities' shares of the images partition
    the test split (each image counted once per corruption), each share's accuracy is that of
    its own images at its severity, and the corruption's score is the mean over severities."""
    from natra_ray.config import load_config
    from natra_ray.stages.evaluate import corruption_accuracies

    seen: list = []

    class Recorder(torch.nn.Module):  # a fixed classifier that notes every image it classifies
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return torch.stack([x.flatten(1).mean(1), 0.3 + 0 * x[:, 0, 0, 0]], 1)  # class 0 iff mean > 0.3

    n = 90
    x = torch.rand(n, 1, 32, 32) * torch.linspace(0.2, 1.0, n).view(n, 1, 1, 1)
    y = (x.flatten(1).mean(1) <= 0.3).long()  # a perfect labelling of the clean images
    cfg = load_config("smoke", overrides={"eval.severities": [1, 3, 5], "eval.corruptions": ["brightness", "fog"],
                                          "eval.corruption_severity": "one_per_image"})
    m = corruption_accuracies(cfg, Recorder(), x, y)
    assert sum(seen) == 2 * n  # every image once per corruption, not once per severity
    every = corruption_accuracies(cfg.replace(**{"eval.corruption_severity": "every"}), Recorder(), x, y)
    assert sum(seen) == 2 * n + 2 * 3 * n
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + 999))
    for name in ("brightness", "fog"):
        accs = []
        for i, s in enumerate((1, 3, 5)):
            rows = order[i::3].sort().values
            xc = apply_corruption(name, x[rows], s, generator=torch.Generator().manual_seed(cfg.seed * 1000 + s))
            accs.append(float((Recorder()(xc).argmax(1) == y[rows]).float().mean()))
            assert m[f"corruption_{name}_s{s}_acc"] == pytest.approx(accs[-1])
        assert m[f"corruption_{name}_acc"] == pytest.approx(sum(accs) / 3)
    assert set(m) == set(every)  # the same metrics, only fewer forward passes
    assert m["corruption_mean_acc"] == pytest.approx((m["corruption_brightness_acc"] + m["corruption_fog_acc"]) / 2)
