"""The in-memory dataset type and ``load_dataset``: pick a reader, split, convert to floats.

Readers (``READERS``: ``fashion_mnist``, ``image_folder``, ``parquet``) return whole splits as
uint8 arrays and cache them in-process; this module selects the requested examples *before* converting to float32,
so a 512-example smoke run never materialises the 245 MB float copy of Fashion-MNIST.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from natra_ray.config import DataConfig
from natra_ray.registry import Registry

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
def _pad_box(h: int, w: int, image_size: int, pad_28_to_32: bool) -> Optional[Tuple[int, int, int, int]]:
    """The zeros (left, right, top, bottom) that take an ``h`` x ``w`` image to ``image_size``
    when the rule is to pad (28 px Fashion-MNIST to 32, centered); ``None`` when it resizes."""
    if pad_28_to_32 and (h, w) == (28, 28) and image_size == 32:
        return (2, 2, 2, 2)
    return None


def fit_images(x: torch.Tensor, image_size: int, channels: int, pad_28_to_32: bool = False) -> torch.Tensor:
    """float ``(N, C, H, W)`` in [0, 1] -> ``(N, channels, size, size)``: the geometry and channel
    rule of :func:`to_float_images`, on tensors (so a model can apply it to its input, and
    ``torch.export`` can trace it). ``N`` must be >= 1."""
    h, w = x.shape[-2:]
    box = _pad_box(h, w, image_size, pad_28_to_32)
    if box is not None:
        x = F.pad(x, box)
    elif (h, w) != (image_size, image_size):
        # antialias only when shrinking: it blurs away aliasing, not detail
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=image_size < min(h, w))
        x = x.clamp(0.0, 1.0)
    if x.shape[1] != channels:
        if not (x.shape[1] == 1 and channels == 3):
            raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")
        x = x.repeat(1, 3, 1, 1)  # gray -> RGB; a real copy so in-place edits stay per-channel
    return x


def _u8_to_float(u8: np.ndarray) -> torch.Tensor:
    if u8.ndim == 3:
        u8 = u8[:, None]
    return torch.from_numpy(np.ascontiguousarray(u8)).to(torch.float32).div_(255.0)


def to_float_images(u8: np.ndarray, image_size: int, channels: int, pad_28_to_32: bool = False) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, C, H, W)`` -> float32 ``(N, channels, size, size)`` in [0, 1].

    ``pad_28_to_32`` zero-pads 28 px to 32 px (centered) instead of resizing: the generator
    needs a power-of-two side, and padding keeps the original pixels untouched. The rule is
    :func:`fit_images`'s (zeros padded before or after the /255 are the same floats).
    """
    if u8.ndim == 3:
        u8 = u8[:, None]
    h, w = u8.shape[-2:]
    box = _pad_box(h, w, image_size, pad_28_to_32)
    if box is not None:
        # pad while still uint8: a quarter of the memory traffic of padding floats
        left, right, top, bottom = box
        padded = np.zeros(u8.shape[:2] + (top + h + bottom, left + w + right), dtype=np.uint8)
        padded[:, :, top:top + h, left:left + w] = u8
        u8 = padded
    if not len(u8):
        return torch.zeros((0, channels, image_size, image_size))
    return fit_images(_u8_to_float(u8), image_size, channels, pad_28_to_32).contiguous()


@dataclass(frozen=True)
class InputSpec:
    """A dataset's images as its reader delivers them (``channels`` x ``height`` x ``width``, float
    in [0, 1]: Fashion-MNIST 1x28x28; an image folder already resized to ``data.image_size``) and
    what the loader makes of them for the models (:func:`preprocess`)."""

    channels: int
    height: int
    width: int
    image_size: int  # data.image_size
    model_channels: int  # data.channels
    pad_28_to_32: bool

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def model_shape(self) -> Tuple[int, int, int]:
        return (self.model_channels, self.image_size, self.image_size)

    @classmethod
    def identity(cls, channels: int, height: int, width: int) -> "InputSpec":
        """Images already at the model's size (nothing to do but check the shape)."""
        if height != width:
            raise ValueError(f"the models take square images; got {height}x{width}")
        return cls(channels, height, width, height, channels, False)


def preprocess(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Native images ``(N, *spec.shape)`` -> the models' input ``(N, *spec.model_shape)``, exactly
    as :func:`load_dataset` prepares them."""
    return fit_images(x, spec.image_size, spec.model_channels, spec.pad_28_to_32)


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


# Each reader says whether 28 px images are zero-padded to 32 (``pad_28_to_32``, see
# :func:`to_float_images`) and where it reads from (``source``, for the dataset card).
READERS: Registry[Callable[[DataConfig], RawSplits]] = Registry("dataset")


@READERS.register("fashion_mnist", pad_28_to_32=True,
                  source=lambda cfg: _module("fashion_mnist").locate(cfg)["train_images"].parent.resolve())
def _read_fashion_mnist(cfg: DataConfig) -> RawSplits:
    return _module("fashion_mnist").read_fashion_mnist(cfg)


@READERS.register("image_folder", pad_28_to_32=False,
                  source=lambda cfg: _module("image_folder")._resolve_root(cfg).resolve())
def _read_image_folder(cfg: DataConfig) -> RawSplits:
    return _module("image_folder").read_image_folder(cfg)


@READERS.register("parquet", pad_28_to_32=True, source=lambda cfg: _module("parquet").layout(cfg).root)
def _read_parquet(cfg: DataConfig) -> RawSplits:
    return _module("parquet").read_parquet(cfg)


def _module(name: str) -> Any:
    """A reader module, imported on first use (each imports this module for DatasetError)."""
    return importlib.import_module(f"natra_ray.data.{name}")


def _read(cfg: DataConfig) -> Tuple[RawSplits, bool]:
    """Dispatch to the reader; returns ({"train"/"test": (uint8 images, labels)}, classes), pad flag."""
    return READERS.get(cfg.dataset)(cfg), bool(READERS.meta(cfg.dataset)["pad_28_to_32"])


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


def input_spec(cfg: DataConfig) -> InputSpec:
    """The size and channels of the dataset's images as read (from the decoded arrays: 1x28x28
    for Fashion-MNIST) and the preprocessing :func:`load_dataset` applies to them."""
    (arrays, _), pad = _read(cfg)
    shape = arrays["train"][0].shape[1:]
    c, h, w = (1, *shape) if len(shape) == 2 else shape
    return InputSpec(int(c), int(h), int(w), cfg.image_size, cfg.channels, pad)


def load_dataset(cfg: DataConfig, split: str, seed: int = 0, native: bool = False) -> ImageDataset:
    """Load ``split`` ("train", "val" or "test") of the dataset described by ``cfg``.

    Deterministic for a given ``seed``; decoded files are cached in-process, so asking for
    train, val and test in turn reads the files once. ``native=True`` gives the same examples
    as read, before :func:`preprocess` (shape ``input_spec(cfg).shape``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    (arrays, class_names), pad = _read(cfg)
    src = arrays["test" if split == "test" else "train"]
    idx = split_indices(len(arrays["train"][1]), len(arrays["test"][1]), cfg, split, seed)
    if native:
        images = _u8_to_float(src[0][idx]).contiguous()
    else:
        images = to_float_images(src[0][idx], cfg.image_size, cfg.channels, pad_28_to_32=pad)
    labels = torch.from_numpy(src[1][idx].astype(np.int64))
    return ImageDataset(images, labels, list(class_names))


def class_counts(ds: ImageDataset) -> Sequence[int]:
    """Examples per class (handy for logging how balanced a subset is)."""
    return torch.bincount(ds.labels, minlength=ds.num_classes).tolist()


def dataset_card(cfg: DataConfig, splits: Mapping[str, ImageDataset]) -> Dict[str, Any]:
    """What a run trained and was scored on, for the tracking store: ``name`` (the dataset),
    ``source`` (the folder read), ``digest`` (a hash of the splits' labels and pixels as the
    models see them: equal for runs on the same examples, stable across runs and machines),
    ``split_sizes``, the native ``input_shape`` and the ``classes``."""
    import hashlib

    source = READERS.meta(cfg.dataset)["source"](cfg)
    h = hashlib.blake2b(digest_size=16)
    sizes: Dict[str, int] = {}
    names: List[str] = []
    for split in SPLITS:
        if split not in splits:
            continue
        ds = splits[split]
        sizes[split] = len(ds)
        names = list(ds.class_names)
        h.update(f"{split}:{len(ds)}:{tuple(ds.images.shape)}".encode())
        h.update(ds.labels.numpy().tobytes())
        h.update(ds.images.contiguous().numpy().tobytes())
    return {"name": cfg.dataset, "source": str(source), "digest": h.hexdigest()[:16],
            "split_sizes": sizes, "input_shape": list(input_spec(cfg).shape), "classes": names}
