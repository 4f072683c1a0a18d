"""A folder of images, one sub-folder per class: ``root/<class>/*.{png,jpg,jpeg,bmp,webp}``.

``root/train`` + ``root/test`` are used as the splits when both exist; otherwise the images
are split 80/20 per class with a fixed seed (``SPLIT_SEED``, independent of the run seed, so
every run and every Tune trial is scored on the same test images).
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from natra_ray.config import DataConfig
from natra_ray.data.datasets import DatasetError, RawSplits

logger = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
# Modes whose pixels carry one gray channel (alpha aside); any other mode counts as color.
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}

Listing = List[Tuple[Path, int]]  # (image path, label)


def _resolve_root(cfg: DataConfig) -> Path:
    root = cfg.root or os.environ.get("NATRA_DATA_DIR", "")
    if not root:
        raise DatasetError(
            "data.dataset=image_folder needs a folder: set data.root=<folder> (or NATRA_DATA_DIR) "
            "holding one sub-folder of images per class"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"image folder {path} does not exist; set data.root to a folder holding one sub-folder per class"
        )
    return path


def _class_dirs(root: Path) -> List[Path]:
    # hidden and dunder folders (.ipynb_checkpoints, __MACOSX) are tooling debris, not classes
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _images_in(d: Path) -> List[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _list(split_root: Path, class_names: Optional[List[str]] = None) -> Tuple[List[str], Listing]:
    """Class names (sorted folder names unless given) and the (path, label) listing of one tree."""
    dirs = _class_dirs(split_root)
    if not dirs:
        raise DatasetError(
            f"no class folders in {split_root}; expected {split_root}/<class_name>/*.png (one sub-folder per class)"
        )
    names = [d.name for d in dirs]
    if class_names is None:
        if len(names) < 2:  # one class trains a "classifier" that is right by construction
            raise DatasetError(
                f"image folder {split_root} has 1 class ({names[0]}); a classifier needs at least two "
                "class folders: add a sub-folder of images for each other class"
            )
        class_names = names
    else:
        extra = sorted(set(names) - set(class_names))
        if extra:
            raise DatasetError(
                f"{split_root} has class folders {', '.join(extra)} that the train split lacks; "
                "train and test must use the same classes"
            )
    listing: Listing = []
    for d in dirs:
        files = _images_in(d)
        if not files:
            raise DatasetError(
                f"class folder {d} has no images ({'/'.join(e[1:] for e in EXTENSIONS)}); "
                "add images or remove the folder"
            )
        label = class_names.index(d.name)
        listing += [(f, label) for f in files]
    return class_names, listing


def _split_80_20(listing: Listing, num_classes: int) -> Tuple[Listing, Listing]:
    """Per-class seeded 80/20 split, so every class with >= 2 images appears in test."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    train: Listing = []
    test: Listing = []
    for c in range(num_classes):
        items = [it for it in listing if it[1] == c]
        perm = torch.randperm(len(items), generator=gen).tolist()
        n_test = int(round(TEST_FRACTION * len(items)))
        if len(items) >= 2:
            n_test = max(1, n_test)
        test += [items[i] for i in sorted(perm[:n_test])]
        train += [items[i] for i in sorted(perm[n_test:])]
    return train, test


def _decode(listing: Listing, image_size: int, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 (N, channels, size, size) and labels, checking that all files agree in size and mode."""
    out = np.empty((len(listing), channels, image_size, image_size), dtype=np.uint8)
    first: Optional[Tuple[Path, Tuple[int, int], str]] = None
    target_mode = "L" if channels == 1 else "RGB"
    for i, (path, _) in enumerate(listing):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's palette-transparency chatter
                with Image.open(path) as img:
                    img.load()  # header-only open would miss truncated pixel data
                    size, mode = img.size, img.mode
                    if first is None:
                        first = (path, size, mode)
                    elif size != first[1]:
                        raise DatasetError(
                            f"images have mixed sizes: {first[0]} is {first[1][0]}x{first[1][1]} but {path} "
                            f"is {size[0]}x{size[1]}; resize them to one size first"
                        )
                    elif (mode in _GRAY_MODES) != (first[2] in _GRAY_MODES):
                        raise DatasetError(
                            f"images have mixed channel modes: {first[0]} is {first[2]} but {path} is {mode}; "
                            "convert them all to grayscale or all to RGB"
                        )
                    if mode == "P" and "transparency" in img.info:
                        img = img.convert("RGBA")
                    img = fit_image(img.convert(target_mode), image_size)
                    arr = np.asarray(img, dtype=np.uint8)
        except DatasetError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"cannot decode image {path}: {e} (corrupt or truncated; fix or delete it)") from None
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    labels = np.fromiter((lab for _, lab in listing), dtype=np.int64, count=len(listing))
    return out, labels


def _listings(base: Path) -> Tuple[List[str], Listing, Listing]:
    """(class names, train listing, test listing) of the folder ``base``."""
    train_dir, test_dir = base / "train", base / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        class_names, train = _list(train_dir)
        _, test = _list(test_dir, class_names)
        logger.info("image folder %s: using train/ and test/ as splits (%d classes)", base, len(class_names))
    else:
        if test_dir.is_dir():
            raise DatasetError(f"{test_dir} exists but {train_dir} does not; add train/ or remove test/")
        src = train_dir if train_dir.is_dir() else base
        class_names, listing = _list(src)
        train, test = _split_80_20(listing, len(class_names))
        logger.info("image folder %s: %d classes, split %d/%d train/test with seed %d",
                    src, len(class_names), len(train), len(test), SPLIT_SEED)
    return class_names, train, test


@functools.lru_cache(maxsize=4)
def _read_cached(root: str, signature: Tuple, image_size: int, channels: int) -> RawSplits:
    del signature  # only part of the cache key: any added/removed/changed file re-reads
    class_names, train, test = _listings(Path(root))
    # decode both splits in one pass so the size/mode check spans every file
    images, labels = _decode(train + test, image_size, channels)
    n = len(train)
    return {"train": (images[:n], labels[:n]), "test": (images[n:], labels[n:])}, class_names


def split_listings(cfg: DataConfig) -> Tuple[List[str], Listing, Listing]:
    """(class names, train listing, test listing) of ``data.root``: the file behind each example
    of the reader's splits, in their order (what a reader of the files elsewhere needs)."""
    return _listings(_resolve_root(cfg).resolve())


def fit_image(img: "Image.Image", image_size: int) -> "Image.Image":
    """The reader's resize rule (bilinear to ``image_size`` square, when not already that size)."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return img


def _signature(root: Path) -> Tuple:
    """(path, mtime, size) of every file two levels down (three with train/ and test/)."""
    sig = []
    for dirpath, dirs, files in os.walk(root):
        if len(Path(dirpath).relative_to(root).parts) >= 2:
            dirs[:] = []  # prune: deeper folders are never read
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            sig.append((p, st.st_mtime_ns, st.st_size))
    return tuple(sorted(sig))


def read_image_folder(cfg: DataConfig) -> RawSplits:
    """({"train": (uint8 (N,C,S,S), int64 (N,)), "test": ...}, class names) of ``data.root``."""
    root = _resolve_root(cfg)
    logger.info("image folder dataset found in %s", root)
    return _read_cached(str(root.resolve()), _signature(root), cfg.image_size, cfg.channels)
