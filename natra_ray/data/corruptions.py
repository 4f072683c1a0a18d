"""An MNIST-C-style corruption suite (Mu & Gilmer 2019) and paper 002's fixed blur, batched.

Every corruption has the signature ``fn(x, severity, generator=None) -> Tensor`` with
``x`` a float batch (B, C, H, W) in [0, 1] and ``severity`` an int in 1..5; the result has
the same shape and dtype, is clamped to [0, 1], and is a deterministic function of
(x, severity, generator state). Random parameters (signs, noise, fields) are drawn from the
generator on the generator's device (CPU when None: then from torch's global CPU RNG) and moved
to ``x``'s device, so a CPU generator gives the same result whatever device ``x`` is on.

Severity parameters are data (``SEVERITY``): one 5-tuple per corruption, chosen for
28-32 px images; geometric sizes are fractions of the image side, so they carry over to other
resolutions. Geometric corruptions are one batched ``grid_sample`` call with
zero padding (the black background of MNIST/Fashion-MNIST).

This module imports only torch, numpy, the standard library and ``natra_ray.registry``, so
evaluation code and Ray workers can use it without the data pipeline's dependencies.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from natra_ray.registry import Registry

Corruption = Callable[[Tensor, int, Optional[torch.Generator]], Tensor]
CORRUPTIONS: Registry[Tensor] = Registry("corruption")

# One entry per severity 1..5. rotate/shear/translate get a random sign per image (per axis
# for translate), as MNIST-C draws the direction at random; scale always zooms out.
SEVERITY: Dict[str, Tuple] = {
    "rotate": (5.0, 10.0, 20.0, 30.0, 45.0),  # degrees
    "shear": (0.1, 0.2, 0.3, 0.4, 0.5),  # horizontal shear: samples the input at x + s*y
    "scale": (0.9, 0.8, 0.7, 0.6, 0.5),  # zoom-out factor: keeps the object inside the frame
    "translate": (0.04, 0.08, 0.12, 0.16, 0.2),  # shift per axis, fraction of the side
    "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),  # sigma in pixels (kernel radius 3 sigma)
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # std of additive N(0, std^2)
    "impulse_noise": (0.01, 0.02, 0.04, 0.07, 0.1),  # fraction of salt-and-pepper pixels
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel
    "contrast": (0.6, 0.45, 0.3, 0.2, 0.1),  # factor on deviations from the image mean
    "fog": (0.2, 0.3, 0.4, 0.5, 0.6),  # max haze opacity
    # (alpha, sigma) as fractions of the side: displacement std and smoothing of the field.
    "elastic": ((0.02, 0.12), (0.03, 0.12), (0.04, 0.12), (0.055, 0.12), (0.07, 0.12)),
}

# Paper 002's "blurred accuracy": Gaussian kernel of size 5. The paper gives no sigma; we use
# sigma = 0.3 * ((5 - 1) / 2 - 1) + 0.8 = 1.1, the value both OpenCV (cv2.GaussianBlur with
# sigma=0) and torchvision.transforms.functional.gaussian_blur (sigma=None) derive from the
# kernel size, i.e. what "a Gaussian kernel of size 5" gives in the libraries the paper's
# PyTorch code most likely used. Reflect padding, as torchvision.
BLUR5_KSIZE = 5
BLUR5_SIGMA = 0.3 * ((BLUR5_KSIZE - 1) * 0.5 - 1) + 0.8

# Fog octaves: coarse grid sizes (independent of the image size, so the haze is low-frequency
# at any resolution) and their amplitudes (halving: a 1/f-like "plasma" spectrum).
FOG_GRIDS: Sequence[int] = (2, 4, 8)
FOG_AMPLITUDES: Sequence[float] = (1.0, 0.5, 0.25)


# ----------------------------------------------------------------------------- helpers
def _level(name: str, severity: int):
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
            or not 1 <= int(severity) <= 5:
        raise ValueError(f"{name}: severity must be an int in 1..5, got {severity!r}")
    return SEVERITY[name][int(severity) - 1]


def _check(x: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")


def _dev(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape: Sequence[int], generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """U[0, 1) drawn on the generator's device, returned on ``like``'s device and dtype."""
    u = torch.rand(tuple(shape), generator=generator, device=_dev(generator), dtype=like.dtype)
    return u.to(like.device)


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    n = torch.randn(tuple(shape), generator=generator, device=_dev(generator), dtype=like.dtype)
    return n.to(like.device)


def _signs(b: int, generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """(b,) random +-1."""
    s = torch.randint(0, 2, (b,), generator=generator, device=_dev(generator))
    return (2 * s - 1).to(like.device, like.dtype)


def _base_grid(h: int, w: int, like: Tensor) -> Tensor:
    """(H, W, 2) identity sampling grid in normalised (x, y) coords, pixel centres
    (align_corners=False): what ``F.affine_grid`` gives for the identity, without its cost."""
    xs = (2.0 * torch.arange(w, dtype=like.dtype, device=like.device) + 1.0) / w - 1.0
    ys = (2.0 * torch.arange(h, dtype=like.dtype, device=like.device) + 1.0) / h - 1.0
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2)


def _sample(x: Tensor, grid: Tensor) -> Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_transform(x: Tensor, lin: Tensor, shift: Optional[Tensor] = None) -> Tensor:
    """Batched affine warp in *pixel* units about the image centre.

    The output pixel at centred position p (x right, y down, in pixels) samples the input at
    ``lin @ p + shift``: ``lin`` (B, 2, 2) and ``shift`` (B, 2) are the output -> input map
    (so ``shift = (-1, 0)`` moves the content one pixel to the right). Working in pixels
    keeps rotations true rotations on non-square images. Bilinear, zero padding, not clamped.
    The grid is one broadcast matmul (``F.affine_grid`` is several times slower on CPU).
    """
    b, _, h, w = x.shape
    d = torch.tensor([w / 2.0, h / 2.0], dtype=x.dtype, device=x.device)  # pixels per unit
    # normalised coords u = p / d  =>  theta_lin = D^-1 lin D, theta_shift = D^-1 shift
    theta = lin.to(x) * d[None, None, :] / d[None, :, None]  # (B, 2, 2)
    grid = torch.matmul(_base_grid(h, w, x).view(1, h * w, 2), theta.transpose(1, 2))
    if shift is not None:
        grid = grid + (shift.to(x) / d[None, :])[:, None, :]
    return _sample(x, grid.view(b, h, w, 2))


def _eye(b: int, like: Tensor) -> Tensor:
    return torch.eye(2, dtype=like.dtype, device=like.device).expand(b, 2, 2).clone()


def gaussian_kernel1d(sigma: float, radius: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 1-D Gaussian taps at -radius..radius."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float, radius: int) -> Tensor:
    """(n, n) float64 matrix M with ``M @ v`` = 1-D Gaussian blur of v with reflect padding
    (replicate when n <= radius, where reflecting is undefined), the padding folded in."""
    k = gaussian_kernel1d(sigma, radius, torch.float64)
    i = torch.arange(n)[:, None]  # (n, 1) output index
    j = i + torch.arange(-radius, radius + 1)[None, :]  # (n, 2r+1) input index before padding
    if radius < n:
        j = j.abs()  # reflect at 0 (no edge repeat, as F.pad "reflect")
        j = torch.where(j > n - 1, 2 * (n - 1) - j, j)  # reflect at n-1
    else:
        j = j.clamp(0, n - 1)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((i.expand_as(j), j), k.expand_as(j).clone(), accumulate=True)
    return m


def gaussian_blur2d(x: Tensor, sigma: float, radius: Optional[int] = None) -> Tensor:
    """Separable Gaussian blur of every channel of (B, C, H, W), reflect padding (replicate
    when the image is too small to reflect). Radius defaults to ceil(3 sigma).

    Done as two small matmuls ``M_h @ x @ M_w^T`` with the padding folded into the (H, H) and
    (W, W) blur matrices: on CPU this is several times faster than depthwise ``conv2d`` with
    one input channel, and it is exact (same taps, same padding)."""
    r = max(1, math.ceil(3.0 * sigma)) if radius is None else radius
    _, _, h, w = x.shape
    mh = _blur_matrix(h, float(sigma), r).to(x.device, x.dtype)
    mw = mh if w == h else _blur_matrix(w, float(sigma), r).to(x.device, x.dtype)
    return torch.matmul(mh, torch.matmul(x, mw.T))  # (B, C, H, W)


# ----------------------------------------------------------------------------- geometric
@CORRUPTIONS.register("rotate")
def rotate(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Rotation by SEVERITY['rotate'] degrees, random direction per image."""
    _check(x)
    a = math.radians(_level("rotate", severity)) * _signs(x.shape[0], generator, x)  # (B,)
    cos, sin = torch.cos(a), torch.sin(a)
    lin = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return affine_transform(x, lin).clamp(0.0, 1.0)


@CORRUPTIONS.register("shear")
def shear(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Horizontal shear: output (x, y) samples the input at (x + s y, y), s = SEVERITY['shear']
    with a random sign per image."""
    _check(x)
    lin = _eye(x.shape[0], x)
    lin[:, 0, 1] = _level("shear", severity) * _signs(x.shape[0], generator, x)
    return affine_transform(x, lin).clamp(0.0, 1.0)


@CORRUPTIONS.register("scale")
def scale(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Zoom out about the centre by SEVERITY['scale'] (deterministic; generator unused)."""
    _check(x)
    lin = _eye(x.shape[0], x) / _level("scale", severity)  # sample farther out = shrink
    return affine_transform(x, lin).clamp(0.0, 1.0)


@CORRUPTIONS.register("translate")
def translate(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Shift by SEVERITY['translate'] of the side along each axis, random signs per axis."""
    _check(x)
    b, _, h, w = x.shape
    f = _level("translate", severity)
    sx, sy = _signs(b, generator, x), _signs(b, generator, x)
    shift = torch.stack([sx * f * w, sy * f * h], dim=1)  # (B, 2) pixels
    return affine_transform(x, _eye(b, x), shift).clamp(0.0, 1.0)


@CORRUPTIONS.register("elastic")
def elastic(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Elastic deformation (Simard et al. 2003): a U(-1, 1) displacement field per image,
    smoothed by a Gaussian of sigma = s * side, rescaled to std alpha * side (normalising the
    std keeps the severity meaningful whatever the smoothing), then ``grid_sample``."""
    _check(x)
    b, _, h, w = x.shape
    alpha, sig = _level("elastic", severity)
    side = min(h, w)
    field = 2.0 * _rand((b, 2, h, w), generator, x) - 1.0
    field = gaussian_blur2d(field, sig * side)  # (B, 2, H, W), smooth
    field = field / field.flatten(1).std(dim=1).clamp_min(1e-12).view(b, 1, 1, 1)
    disp = field * (alpha * side)  # pixels
    grid = _base_grid(h, w, x) + torch.stack([disp[:, 0] * 2.0 / w, disp[:, 1] * 2.0 / h],
                                              dim=-1)  # (B, H, W, 2)
    return _sample(x, grid).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- blur / noise
@CORRUPTIONS.register("gaussian_blur")
def gaussian_blur(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Gaussian blur with sigma SEVERITY['gaussian_blur'] pixels (deterministic)."""
    _check(x)
    return gaussian_blur2d(x, _level("gaussian_blur", severity)).clamp(0.0, 1.0)


@CORRUPTIONS.register("blur5")
def blur5(x: Tensor, severity: int = 1, generator: Optional[torch.Generator] = None) -> Tensor:
    """Paper 002's fixed blur: 5x5 Gaussian, sigma BLUR5_SIGMA = 1.1, reflect padding.
    ``severity`` is accepted for the common signature and ignored (not validated)."""
    _check(x)
    return gaussian_blur2d(x, BLUR5_SIGMA, radius=BLUR5_KSIZE // 2).clamp(0.0, 1.0)


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Additive i.i.d. N(0, std^2) per pixel and channel."""
    _check(x)
    std = _level("gaussian_noise", severity)
    return (x + std * _randn(x.shape, generator, x)).clamp(0.0, 1.0)


@CORRUPTIONS.register("impulse_noise")
def impulse_noise(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Salt and pepper: a fraction p of the pixels set to 0 or 1 (same value on all channels)."""
    _check(x)
    p = _level("impulse_noise", severity)
    b, _, h, w = x.shape
    u = _rand((b, 1, h, w), generator, x)
    out = torch.where(u < p / 2, torch.zeros_like(x), x)  # pepper
    return torch.where((u >= p / 2) & (u < p), torch.ones_like(x), out)  # salt


# ----------------------------------------------------------------------------- photometric
@CORRUPTIONS.register("brightness")
def brightness(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Add SEVERITY['brightness'] to every pixel (deterministic)."""
    _check(x)
    return (x + _level("brightness", severity)).clamp(0.0, 1.0)


@CORRUPTIONS.register("contrast")
def contrast(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Scale deviations from each image's mean by SEVERITY['contrast'] (deterministic)."""
    _check(x)
    m = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return ((x - m) * _level("contrast", severity) + m).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=64)
def _upsample_matrix(g: int, n: int) -> Tensor:
    """(n, g) matrix U with ``U @ v`` = bicubic upsampling of v (length g) to length n, exactly
    as ``F.interpolate(mode="bicubic", align_corners=False)`` does along one axis: obtained by
    upsampling the g basis images that are constant along the other axis."""
    basis = torch.eye(g, dtype=torch.float64).view(g, 1, g, 1).expand(g, 1, g, 4)
    up = F.interpolate(basis, size=(n, 4), mode="bicubic", align_corners=False)  # (g,1,n,4)
    return up[:, 0, :, 0].T.contiguous()  # (n, g)


def smooth_noise(b: int, h: int, w: int, generator: Optional[torch.Generator],
                 like: Tensor) -> Tensor:
    """(B, 1, H, W) low-frequency noise in [0, 1]: octaves of uniform noise on FOG_GRIDS
    coarse grids, bicubically upsampled, weighted by FOG_AMPLITUDES, min-max normalised."""
    acc = like.new_zeros(b, 1, h, w)
    for g, amp in zip(FOG_GRIDS, FOG_AMPLITUDES):
        coarse = _rand((b, 1, g, g), generator, like)
        uh = _upsample_matrix(g, h).to(like.device, like.dtype)  # (H, g)
        uw = uh if w == h else _upsample_matrix(g, w).to(like.device, like.dtype)
        acc = acc + amp * torch.matmul(uh, torch.matmul(coarse, uw.T))  # bicubic, separable
    lo = acc.flatten(1).amin(dim=1).view(b, 1, 1, 1)
    hi = acc.flatten(1).amax(dim=1).view(b, 1, 1, 1)
    return (acc - lo) / (hi - lo).clamp_min(1e-12)


@CORRUPTIONS.register("fog")
def fog(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Fog-like haze: blend toward white with a smooth opacity map a * h(x, y), h in [0, 1]
    (``smooth_noise``), a = SEVERITY['fog']: ``x * (1 - a h) + a h``. Grey haze, shared by
    the channels; on a dark background it lifts the background and lowers the contrast."""
    _check(x)
    b, _, h, w = x.shape
    haze = _level("fog", severity) * smooth_noise(b, h, w, generator, x)  # (B, 1, H, W)
    return (x * (1.0 - haze) + haze).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- API
def apply_corruption(name: str, x: Tensor, severity: int,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """``CORRUPTIONS[name](x, severity, generator)``; unknown names list the known ones."""
    return CORRUPTIONS.get(name)(x, severity, generator)


def list_corruptions() -> List[str]:
    return CORRUPTIONS.names()
