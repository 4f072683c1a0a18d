"""The validation shift suite: natural transformations that neither our generator makes nor the
test corruption suite (``natra_ray.data.corruptions``) contains, drawn on the validation split only.

Why a second suite: Tune selects trials on validation metrics. Scoring a trial only against the
latent attack rewards robustness to the very transformations NaTra trains on, and scoring it on
the test corruptions would let the test suite choose the model. These shifts are a third,
independent family - a camera tilted or with a different lens, another exposure curve, uneven
lighting, thicker or thinner strokes - so the objective (``stages.robust.val_metrics``) rewards
robustness that carries over to changes nobody trained on, and the test suite stays unseen.

Every shift has the corruptions' signature ``fn(x, severity, generator=None) -> Tensor``: ``x`` a
float batch (B, C, H, W) in [0, 1], ``severity`` an int in 1..5; the result has the same shape
and dtype, is clamped to [0, 1], and is a deterministic function of (x, severity, generator
state). Random choices (a sign, an axis, a direction) are drawn from the generator on its own
device, the same draws at every severity, so one seed gives the same choices at every severity
and a higher severity only strengthens the same change. ``shift_generator`` gives the suite's
fixed generator of each shift.

Severity parameters are data (``SEVERITY``), one 5-tuple per shift, chosen for 28-32 px images;
geometric sizes are in normalised image coordinates, so they carry over to other resolutions.
"""
from __future__ import annotations

import math
import numbers
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# the corruption suite's low-level helpers (validation, generator-device draws, sampling grids)
from natra_ray.data.corruptions import _base_grid, _check, _rand, _sample, _signs
from natra_ray.registry import Registry

Shift = Callable[[Tensor, int, Optional[torch.Generator]], Tensor]
SHIFTS: Registry[Tensor] = Registry("shift")

SEVERITY: Dict[str, Tuple[float, ...]] = {
    # homography strength k: the output point (u, v) samples the input at (u, v) / (1 + k t), t the
    # coordinate across the tilt axis; |k| < 1 keeps it finite (0.4: one edge 0.71x, the other 1.67x)
    "perspective": (0.08, 0.16, 0.24, 0.32, 0.4),
    # radial lens distortion k: samples at p (1 + k |p|^2), |p|^2 <= 2 (barrel k > 0, pincushion k < 0)
    "lens": (0.05, 0.1, 0.15, 0.2, 0.3),
    "gamma": (1.2, 1.4, 1.7, 2.0, 2.5),  # exponent g of x ** g (or x ** (1 / g)): the tone curve
    "vignette": (0.2, 0.35, 0.5, 0.65, 0.8),  # gain 1 - a |p|^2 / 2: the corners keep 1 - a
    "illumination": (0.2, 0.35, 0.5, 0.65, 0.8),  # gain falls linearly by a across the image
    # grey-level 3x3 dilation / erosion: floor(s) full passes, then a blend of s - floor(s) toward one more
    "dilate": (0.25, 0.5, 0.75, 1.0, 1.5),
    "erode": (0.25, 0.5, 0.75, 1.0, 1.5),
}


def _severity(name: str, severity: int) -> float:
    """SEVERITY[name] at ``severity`` (an int in 1..5, as the corruptions take)."""
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or not 1 <= int(severity) <= 5:
        raise ValueError(f"{name}: severity must be an int in 1..5, got {severity!r}")
    return SEVERITY[name][int(severity) - 1]


def _uv(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(1, H, W) normalised x and y coordinates of the pixel centres, in [-1, 1]."""
    g = _base_grid(x.shape[2], x.shape[3], x)
    return g[None, ..., 0], g[None, ..., 1]


# ----------------------------------------------------------------------------- geometric
@SHIFTS.register("perspective")
def perspective(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Keystone: the image plane tilted about its horizontal or vertical axis (random per image,
    as is the direction of the tilt), a true homography - one edge shrinks, the opposite one
    grows. Bilinear, zero padding."""
    _check(x)
    b = x.shape[0]
    k = _severity("perspective", severity) * _signs(b, generator, x)  # (B,)
    about_vertical = _rand((b,), generator, x) < 0.5  # tilt about the vertical axis: columns change height
    u, v = _uv(x)
    t = torch.where(about_vertical[:, None, None], u, v)  # (B, H, W)
    den = 1.0 + k[:, None, None] * t
    grid = torch.stack([u.expand_as(den) / den, v.expand_as(den) / den], dim=-1)
    return _sample(x, grid).clamp(0.0, 1.0)


@SHIFTS.register("lens")
def lens(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Radial lens distortion about the centre, barrel or pincushion (random per image): the
    output point p samples the input at p (1 + k |p|^2)."""
    _check(x)
    k = _severity("lens", severity) * _signs(x.shape[0], generator, x)  # (B,)
    u, v = _uv(x)
    f = 1.0 + k[:, None, None] * (u * u + v * v)  # (B, H, W)
    return _sample(x, torch.stack([u * f, v * f], dim=-1)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- photometric
@SHIFTS.register("gamma")
def gamma(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Another exposure curve: ``x ** g`` (darker mid-tones) or ``x ** (1 / g)`` (lighter), random
    per image. Black and white stay; unlike brightness or contrast it bends the tones."""
    _check(x)
    g = _severity("gamma", severity) ** _signs(x.shape[0], generator, x)  # (B,) g or 1 / g
    return x.clamp(0.0, 1.0).pow(g.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


@SHIFTS.register("vignette")
def vignette(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A lens's fall-off of light toward the corners: gain ``1 - a |p|^2 / 2`` (deterministic)."""
    _check(x)
    u, v = _uv(x)
    gain = 1.0 - _severity("vignette", severity) * (u * u + v * v) / 2.0  # (1, H, W)
    return (x * gain[:, None]).clamp(0.0, 1.0)


@SHIFTS.register("illumination")
def illumination(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Light from one side: a gain that falls linearly from 1 to ``1 - a`` across the image,
    along a random direction per image."""
    _check(x)
    b = x.shape[0]
    theta = 2.0 * math.pi * _rand((b,), generator, x)  # (B,)
    u, v = _uv(x)
    t = (u * torch.cos(theta)[:, None, None] + v * torch.sin(theta)[:, None, None]) / math.sqrt(2.0)  # in [-1, 1]
    gain = 1.0 - _severity("illumination", severity) * (1.0 + t) / 2.0  # (B, H, W)
    return (x * gain[:, None]).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- morphological
def _morph(x: Tensor, amount: float, dilate: bool) -> Tensor:
    """``floor(amount)`` grey-level 3x3 dilations (or erosions), then a blend of the fractional
    part toward one more: thicker (thinner) strokes by ``amount`` pixels on each side."""
    def step(t: Tensor) -> Tensor:
        return F.max_pool2d(t, 3, stride=1, padding=1) if dilate else -F.max_pool2d(-t, 3, stride=1, padding=1)

    out = x
    for _ in range(int(amount)):
        out = step(out)
    frac = amount - int(amount)
    if frac > 0:
        out = out + frac * (step(out) - out)
    return out.clamp(0.0, 1.0)


@SHIFTS.register("dilate")
def dilate(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Thicker strokes and bolder shapes (deterministic)."""
    _check(x)
    return _morph(x, _severity("dilate", severity), dilate=True)


@SHIFTS.register("erode")
def erode(x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Thinner strokes and slimmer shapes (deterministic)."""
    _check(x)
    return _morph(x, _severity("erode", severity), dilate=False)


# ----------------------------------------------------------------------------- API
def apply_shift(name: str, x: Tensor, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``SHIFTS[name](x, severity, generator)``; unknown names list the known ones."""
    return SHIFTS.get(name)(x, severity, generator)


def list_shifts() -> List[str]:
    return SHIFTS.names()


def shift_generator(seed: int, name: str) -> torch.Generator:
    """The suite's fixed CPU generator of shift ``name``: the same shifted images for every model,
    trial and epoch, and the same random choices at every severity (``zlib.crc32``, not ``hash``:
    stable across processes)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(name.encode()))


def shift_suite(x: Tensor, names: Sequence[str], severities: Sequence[int],
                seed: int) -> Iterator[Tuple[str, int, Tensor]]:
    """Each (name, severity, shifted copy of ``x``) of the suite, in config order."""
    for name in names:
        for s in severities:
            yield name, s, apply_shift(name, x, s, shift_generator(seed, name))


__all__ = ["SHIFTS", "SEVERITY", "apply_shift", "list_shifts", "shift_generator", "shift_suite"]
