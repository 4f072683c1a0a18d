"""Training pairs (x, x') for the learned perturbation sets of paper 001 (after Wong & Kolter).

Two sources:

* a **transformation family** ``T_theta`` applied to a dataset's images, as *sample bundles*
  ``(x, T_theta x, T_2theta x)`` with ``theta ~ U[-max, max]`` per image (paper 001 Sec. 5.1:
  rotation by theta and 2 theta, theta in [-20, 20] degrees). Every family here composes
  additively, ``T_a(T_b x) ~= T_{a+b} x`` (up to interpolation and clipping), so the bundle
  also gives the closure triple x -> y = T_theta x -> z = T_theta y = T_2theta x of Sec. 2;
* **user pairs**: two aligned image folders, the same file names in both (``a/cat1.png`` is
  the original of ``b/cat1.png``). They have no bundle, so the linear-cost regulariser and the
  composition metrics do not apply to them.

Families have the signature ``family(x, theta) -> x'`` with x (B, C, H, W) in [0, 1] and
theta (B,), and live in ``PAIR_FAMILIES``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from natra_ray.data.corruptions import affine_transform
from natra_ray.data.datasets import DatasetError
from natra_ray.data.image_folder import EXTENSIONS, SPLIT_SEED, TEST_FRACTION, _decode
from natra_ray.registry import Registry

Family = Callable[[Tensor, Tensor], Tensor]
PAIR_FAMILIES: Registry[Tensor] = Registry("pair transformation family")
# theta ~ U[-max, max] when cvae.max_param is 0 (the paper's +-20 degrees for rotation).
DEFAULT_MAX_PARAM: Dict[str, float] = {"rotation": 20.0, "thickness": 1.0, "brightness": 0.4, "lighting": 0.5}


# --------------------------------------------------------------------------- families
@PAIR_FAMILIES.register("rotation")
def rotation(x: Tensor, theta: Tensor) -> Tensor:
    """Rotation about the image centre by theta degrees (B,), bilinear, zero fill."""
    a = torch.deg2rad(theta.to(x))
    cos, sin = torch.cos(a), torch.sin(a)
    lin = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    return affine_transform(x, lin).clamp(0.0, 1.0)


def _dilate(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)  # grayscale dilation by a 3x3 square


def _erode(x: Tensor) -> Tensor:
    return -F.max_pool2d(-x, 3, stride=1, padding=1)


@PAIR_FAMILIES.register("thickness")
def thickness(x: Tensor, theta: Tensor) -> Tensor:
    """Stroke thickness: |theta| 3x3 morphological dilations (theta > 0) or erosions (< 0).

    A fractional |theta| = k + f blends k and k + 1 steps, (1 - f) M^k x + f M^(k+1) x, so
    theta is a continuous parameter and T_2theta is twice the steps of T_theta."""
    theta = theta.to(x)
    out = x.clone()
    for rows, op in ((theta > 0, _dilate), (theta < 0, _erode)):
        if not bool(rows.any()):
            continue
        cur, m = x[rows], theta[rows].abs()
        acc = torch.zeros_like(cur)
        for k in range(int(m.max().floor()) + 2):  # cur = M^k x
            w = (1 - (m - k).abs()).clamp(min=0.0)  # hat weights: 1 - f at floor(m), f at floor(m) + 1
            acc = acc + w.view(-1, 1, 1, 1) * cur
            cur = op(cur)
        out[rows] = acc
    return out.clamp(0.0, 1.0)


@PAIR_FAMILIES.register("brightness")
def brightness(x: Tensor, theta: Tensor) -> Tensor:
    """Brightness gain x * exp(theta), clipped to [0, 1] (gains compose: e^a e^b = e^(a+b))."""
    return (x * torch.exp(theta.to(x)).view(-1, 1, 1, 1)).clamp(0.0, 1.0)


@PAIR_FAMILIES.register("lighting")
def lighting(x: Tensor, theta: Tensor) -> Tensor:
    """Lighting as a gamma curve x ** exp(-theta): theta > 0 brightens the mid-tones, keeps 0
    and 1 fixed, never clips, and composes exactly ((x^a)^b = x^(ab))."""
    return x.clamp(0.0, 1.0).pow(torch.exp(-theta.to(x)).view(-1, 1, 1, 1))


def apply_family(name: str, x: Tensor, theta: Tensor) -> Tensor:
    return PAIR_FAMILIES.get(name)(x, theta)


def list_families() -> List[str]:
    return PAIR_FAMILIES.names()


# --------------------------------------------------------------------------- pair data
@dataclass
class PairData:
    """Aligned pairs; with ``x2`` they are sample bundles (x, T_theta x, T_2theta x)."""

    x: Tensor  # (N, C, H, W) originals in [0, 1]
    x1: Tensor  # (N, C, H, W) perturbed: T_theta x, or the user's x'
    x2: Optional[Tensor] = None  # (N, C, H, W) T_2theta x (bundles only)
    theta: Optional[Tensor] = None  # (N,) the family parameter (bundles only)

    def __post_init__(self) -> None:
        for name in ("x1", "x2"):
            t = getattr(self, name)
            if t is not None and t.shape != self.x.shape:
                raise ValueError(f"pair tensor {name} has shape {tuple(t.shape)}, x has {tuple(self.x.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def bundles(self) -> bool:
        return self.x2 is not None

    def subset(self, idx: Tensor | slice) -> "PairData":
        pick = (lambda t: None if t is None else t[idx])  # noqa: E731
        return PairData(self.x[idx], self.x1[idx], pick(self.x2), pick(self.theta))


def make_bundles(images: Tensor, family: str, max_param: float = 0.0,
                 generator: Optional[torch.Generator] = None, batch_size: int = 1024) -> PairData:
    """Sample bundles (x, T_theta x, T_2theta x), theta ~ U[-max, max] per image (paper 001
    Sec. 5.1). ``max_param`` 0 takes the family's default range (``DEFAULT_MAX_PARAM``)."""
    fn = PAIR_FAMILIES.get(family)
    m = max_param or DEFAULT_MAX_PARAM.get(family, 1.0)
    theta = (2 * torch.rand(len(images), generator=generator) - 1) * m  # (N,)

    def apply(t: Tensor) -> Tensor:  # batched: bounded memory for the grid_sample temporaries
        parts = [fn(images[i:i + batch_size], t[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        return torch.cat(parts) if parts else images.clone()

    return PairData(images, apply(theta), apply(2 * theta), theta)


# --------------------------------------------------------------------------- user pairs
def _listing(root: Path) -> Dict[str, Path]:
    """Relative path (posix) -> file, for every image under ``root`` (hidden entries skipped)."""
    out: Dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and p.suffix.lower() in EXTENSIONS and not any(s.startswith(".") for s in rel.parts):
            out[rel.as_posix()] = p
    return out


def _matched(dir_x: Path, dir_xp: Path) -> List[Tuple[Path, Path]]:
    for d, key in ((dir_x, "cvae.pairs_x"), (dir_xp, "cvae.pairs_x_prime")):
        if not d.is_dir():
            raise DatasetError(f"pair folder {d} ({key}) does not exist; set {key} to a folder of images")
    a, b = _listing(dir_x), _listing(dir_xp)
    if not a:
        raise DatasetError(f"no images ({'/'.join(e[1:] for e in EXTENSIONS)}) in pair folder {dir_x}")
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} file(s) of {dir_x} have no partner in {dir_xp} (e.g. {only_a[0]!r})")
        if only_b:
            parts.append(f"{len(only_b)} file(s) of {dir_xp} have no partner in {dir_x} (e.g. {only_b[0]!r})")
        raise DatasetError("mismatched pair folders: " + "; ".join(parts)
                           + "; both folders must hold the same relative file names")
    return [(a[k], b[k]) for k in sorted(a)]


def read_pair_folders(dir_x: str | Path, dir_xp: str | Path, image_size: int, channels: int) -> PairData:
    """User pairs from two aligned folders (same relative file names), decoded with the image
    folder reader; every image of both folders must share one size and channel mode."""
    if not str(dir_x) or not str(dir_xp):
        raise DatasetError("user pairs need two folders: set cvae.pairs_x (originals) and cvae.pairs_x_prime "
                           "(their perturbed versions, same file names)")
    pairs = _matched(Path(dir_x).expanduser(), Path(dir_xp).expanduser())
    listing = [(p, 0) for p, _ in pairs] + [(q, 0) for _, q in pairs]
    u8, _ = _decode(listing, image_size, channels)  # one pass: size/mode checked across both
    x = torch.from_numpy(np.ascontiguousarray(u8)).float().div_(255.0)
    n = len(pairs)
    return PairData(x[:n], x[n:])


def split_pairs(data: PairData, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> Dict[str, PairData]:
    """Seeded train/test split of user pairs (test gets at least one pair when there are two)."""
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * n))) if n >= 2 else 0
    return {"train": data.subset(perm[n_test:]), "test": data.subset(perm[:n_test])}
