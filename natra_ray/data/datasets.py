"""The in-memory dataset type and ``load_dataset``: pick a reader, split, convert to floats.

Readers (``fashion_mnist``, ``image_folder``) return whole splits as uint8 arrays and cache
them in-process; this module selects the requested examples *before* converting to float32,
so a 512-example smoke run never materialises the 245 MB float copy of Fashion-MNIST.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from natra_ray.config import DataConfig

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DatasetError(FileNotFoundError, ValueError):
    """A dataset is missing or malformed. The message says what was looked for and how to fix it.

    Subclasses both ``FileNotFoundError`` (missing data) and ``ValueError`` (bad data) so
    callers can catch whichever fits; always constructed with a single message argument.
    """


@dataclass
class ImageDataset:
    """Images as float32 ``(N, C, H, W)`` in [0, 1] and int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: List[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W); got shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"labels must be (N,) with N = {len(self.images)}; got shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, idx: Any) -> "ImageDataset":
        """Examples at ``idx`` (tensor/array/list of indices, a boolean mask, or a slice)."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(np.asarray(idx))
            if idx.dtype != torch.bool:
                idx = idx.long()
        return ImageDataset(self.images[idx], self.labels[idx], list(self.class_names))


# --------------------------------------------------------------------------- conversion
def to_float_images(u8: np.ndarray, image_size: int, channels: int, pad_28_to_32: bool = False) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, C, H, W)`` -> float32 ``(N, channels, size, size)`` in [0, 1].

    ``pad_28_to_32`` zero-pads 28 px to 32 px (centered) instead of resizing: the generator
    needs a power-of-two side, and padding keeps the original pixels untouched.
    """
    if u8.ndim == 3:
        u8 = u8[:, None]
    h, w = u8.shape[-2:]
    if pad_28_to_32 and (h, w) == (28, 28) and image_size == 32:
        # pad while still uint8: a quarter of the memory traffic of padding floats
        padded = np.zeros(u8.shape[:2] + (32, 32), dtype=np.uint8)
        padded[:, :, 2:30, 2:30] = u8
        u8, h, w = padded, 32, 32
    x = torch.from_numpy(np.ascontiguousarray(u8)).to(torch.float32).div_(255.0)
    if (h, w) != (image_size, image_size):
        if len(x):
            # antialias only when shrinking: it blurs away aliasing, not detail
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=image_size < min(h, w))
            x = x.clamp_(0.0, 1.0)
        else:
            x = x.new_zeros((0, x.shape[1], image_size, image_size))
    if x.shape[1] != channels:
        if not (x.shape[1] == 1 and channels == 3):
            raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")
        x = x.repeat(1, 3, 1, 1)  # gray -> RGB; a real copy so in-place edits stay per-channel
    return x.contiguous()


# --------------------------------------------------------------------------- splitting
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def split_indices(n_train: int, n_test: int, cfg: DataConfig, split: str, seed: int) -> np.ndarray:
    """Indices of ``split`` into the reader's train (train/val) or test array.

    train/val: one seeded shuffle of the training split, cut to ``train_subset``, the first
    ``round(val_fraction * n)`` held out as val. Both come from the same permutation, so they
    are disjoint and identical for every call with the same seed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "test":
        perm = torch.randperm(n_test, generator=_generator(seed)).numpy()
        if cfg.test_subset > 0:
            if cfg.test_subset > n_test:
                logger.warning("data.test_subset=%d exceeds the %d test examples; using all",
                               cfg.test_subset, n_test)
            perm = perm[: cfg.test_subset]
        return perm
    perm = torch.randperm(n_train, generator=_generator(seed)).numpy()
    if cfg.train_subset > 0:
        if cfg.train_subset > n_train:
            logger.warning("data.train_subset=%d exceeds the %d training examples; using all",
                           cfg.train_subset, n_train)
        perm = perm[: cfg.train_subset]
    n_val = int(round(cfg.val_fraction * len(perm)))
    if split == "val":
        return perm[:n_val]
    if len(perm) - n_val <= 0:
        raise DatasetError(
            f"the train split is empty: {len(perm)} examples, {n_val} held out for val "
            f"(data.val_fraction={cfg.val_fraction}); lower data.val_fraction or raise data.train_subset"
        )
    return perm[n_val:]


# --------------------------------------------------------------------------- entry point
RawSplits = Tuple[Dict[str, Tuple[np.ndarray, np.ndarray]], List[str]]


def _read(cfg: DataConfig) -> Tuple[RawSplits, bool]:
    """Dispatch to the reader; returns ({"train"/"test": (uint8 images, labels)}, classes), pad flag."""
    if cfg.dataset == "fashion_mnist":
        from natra_ray.data.fashion_mnist import read_fashion_mnist

        return read_fashion_mnist(cfg), True
    if cfg.dataset == "image_folder":
        from natra_ray.data.image_folder import read_image_folder

        return read_image_folder(cfg), False
    raise ValueError(f"data.dataset must be 'fashion_mnist' or 'image_folder'; got {cfg.dataset!r}")


def check_dataset(cfg: DataConfig) -> Dict[str, int]:
    """Read the dataset once, as a job's first step, so a missing folder, an unreadable image,
    mixed sizes/channels or an empty class fail before any compute (``DatasetError``, one line
    naming the file). Returns the example counts of the reader's train and test splits; the
    decoded arrays stay cached in-process for the ``load_dataset`` calls that follow."""
    (arrays, class_names), _ = _read(cfg)
    n_train, n_test = len(arrays["train"][1]), len(arrays["test"][1])
    split_indices(n_train, n_test, cfg, "train", 0)  # raises when nothing is left to train on
    if n_test == 0:
        raise DatasetError(f"the dataset has no test images ({n_train} train images in {len(class_names)} "
                           "classes); an image folder needs >= 2 images per class, or train/ and test/ sub-folders")
    return {"train": n_train, "test": n_test}


def load_dataset(cfg: DataConfig, split: str, seed: int = 0) -> ImageDataset:
    """Load ``split`` ("train", "val" or "test") of the dataset described by ``cfg``.

    Deterministic for a given ``seed``; decoded files are cached in-process, so asking for
    train, val and test in turn reads the files once.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    (arrays, class_names), pad = _read(cfg)
    src = arrays["test" if split == "test" else "train"]
    idx = split_indices(len(arrays["train"][1]), len(arrays["test"][1]), cfg, split, seed)
    images = to_float_images(src[0][idx], cfg.image_size, cfg.channels, pad_28_to_32=pad)
    labels = torch.from_numpy(src[1][idx].astype(np.int64))
    return ImageDataset(images, labels, list(class_names))


def class_counts(ds: ImageDataset) -> Sequence[int]:
    """Examples per class (handy for logging how balanced a subset is)."""
    return torch.bincount(ds.labels, minlength=ds.num_classes).tolist()
