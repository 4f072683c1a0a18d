"""Fashion-MNIST from its four IDX files (gzipped or raw), found locally or downloaded once.

Search order: ``data.root`` alone when it is set (an explicit path is never silently swapped
for another copy); otherwise ``$NATRA_DATA_DIR``, the Debian package location
(``DEBIAN_DIR``), then the download cache. Each location is also tried with the common
sub-folder layouts ``fashion-mnist/`` and torchvision's ``FashionMNIST/raw/``.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from natra_ray.config import DataConfig
from natra_ray.data.datasets import DatasetError, RawSplits

logger = logging.getLogger(__name__)

ENV_VAR = "NATRA_DATA_DIR"
# Where `apt-get install dataset-fashion-mnist` puts the gz files; a module constant so tests
# (and unusual installs) can point it elsewhere.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"

FILES: Dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# The s3-website endpoint serves plain HTTP only; the MD5s below protect the download.
MIRRORS: Tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# MD5 of the official .gz files (same values torchvision pins); a name missing here is not checked.
MD5: Dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation: an offline machine fails fast

CLASS_NAMES: List[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


# --------------------------------------------------------------------------- locating
def cache_dir() -> Path:
    """The download cache; resolved at call time so a changed ``$HOME`` is honoured."""
    return Path(os.path.expanduser("~")) / ".cache" / "natra_ray" / "fashion-mnist"


def _layouts(base: Path) -> List[Path]:
    return [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]


def candidate_dirs(cfg: DataConfig) -> List[Path]:
    """Every directory searched, in order, without duplicates."""
    if cfg.root:
        dirs = _layouts(Path(cfg.root).expanduser())
    else:
        dirs = []
        env = os.environ.get(ENV_VAR, "")
        if env:
            dirs += _layouts(Path(env).expanduser())
        dirs += [Path(DEBIAN_DIR), cache_dir()]
    out: List[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _scan(d: Path) -> Tuple[Dict[str, Path], List[str]]:
    """({key: path} of the files present in ``d``, [names missing]); raw preferred over .gz."""
    found: Dict[str, Path] = {}
    missing: List[str] = []
    for key, stem in FILES.items():
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                found[key] = d / name
                break
        else:
            missing.append(stem + "[.gz]")
    return found, missing


def _fetch(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "natra_ray"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def download(target: Path, mirrors: Optional[Tuple[str, ...]] = None,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch the missing .gz files into ``target``, each written to a temp file then renamed.

    Raises ``OSError`` describing every failed URL when a file cannot be fetched from any mirror.
    """
    mirrors = MIRRORS if mirrors is None else mirrors
    target.mkdir(parents=True, exist_ok=True)
    for stem in FILES.values():
        name = stem + ".gz"
        if (target / name).is_file() or (target / stem).is_file():
            continue
        errors: List[str] = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            try:
                data = _fetch(url, timeout)
                want = MD5.get(name)
                got = hashlib.md5(data).hexdigest()
                if want and got != want:
                    raise ValueError(f"MD5 {got} != expected {want}")
            except (OSError, ValueError) as e:  # URLError, timeouts and HTTP errors are OSErrors
                errors.append(f"{url}: {e}")
                continue
            # tmp file in the same directory + rename: readers never see a half-written file
            fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            logger.info("downloaded %s (%d bytes) to %s", url, len(data), target)
            break
        else:
            raise OSError(f"could not download {name}: " + "; ".join(errors))


def locate(cfg: DataConfig) -> Dict[str, Path]:
    """Paths of the four files, downloading them when allowed; ``DatasetError`` otherwise."""
    looked: List[str] = []
    for d in candidate_dirs(cfg):
        found, missing = _scan(d)
        if not missing:
            logger.info("Fashion-MNIST found in %s", d)
            return found
        if not d.is_dir():
            looked.append(f"{d} (no such directory)")
        else:
            looked.append(f"{d} (missing {', '.join(missing)})")
    if cfg.download:
        target = Path(cfg.root).expanduser() if cfg.root else cache_dir()
        try:
            download(target)
            found, missing = _scan(target)
            if not missing:
                logger.info("Fashion-MNIST downloaded to %s", target)
                return found
            note = f"download into {target} left {', '.join(missing)} missing"
        except OSError as e:
            note = f"download into {target} failed: {e}"
    else:
        note = "download skipped (data.download=false)"
    raise DatasetError(  # the first line names the problem; the rest say how to fix it
        "Fashion-MNIST not found in " + "; ".join(looked) + f" ({note}). Looked for "
        + ", ".join(s + "[.gz]" for s in FILES.values())
        + ".\nFix it with one of:\n"
        f"  - sudo apt-get install -y {DEBIAN_PACKAGE}   (installs the files to {DEBIAN_DIR})\n"
        f"  - put the four files in a folder and set {ENV_VAR}=<folder> or data.root=<folder>\n"
        f"  - go online with data.download=true (files are cached in {cache_dir()})"
    )


# --------------------------------------------------------------------------- decoding
def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        # decide by content, not suffix: a gunzipped file that kept its .gz name still reads
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"{path}: cannot read or decompress ({e}); the file is truncated or corrupt, "
            "delete it and fetch it again"
        ) from None
    return data


def parse_idx(data: bytes, path: Path, magic: int) -> np.ndarray:
    """Decode an unsigned-byte IDX buffer, checking magic number and exact size (read-only view)."""
    what = "images" if magic == _IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise DatasetError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    got = struct.unpack(">I", data[:4])[0]
    if got != magic:
        raise DatasetError(
            f"{path}: bad magic number 0x{got:08x} (expected 0x{magic:08x} for IDX {what}); "
            "not a Fashion-MNIST file or corrupt"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: wrong size, {len(data)} bytes but the header {tuple(dims)} implies {expected}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _load_idx_cached(path: str, mtime_ns: int, size: int, magic: int) -> np.ndarray:
    # mtime/size are part of the key so a replaced file is re-read
    del mtime_ns, size
    return parse_idx(_read_bytes(Path(path)), Path(path), magic)


def load_idx(path: Path, magic: int) -> np.ndarray:
    """Decoded IDX array, cached per (file, mtime, size); the array is read-only, copy to modify."""
    st = path.stat()
    return _load_idx_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, magic)


def _read_pair(images_path: Path, labels_path: Path) -> Tuple[np.ndarray, np.ndarray]:
    images = load_idx(images_path, _IMAGES_MAGIC)
    labels = load_idx(labels_path, _LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "the pair does not match"
        )
    if len(labels) and int(labels.max()) >= len(CLASS_NAMES):
        raise DatasetError(
            f"{labels_path}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}"
        )
    return images, labels


def read_fashion_mnist(cfg: DataConfig) -> RawSplits:
    """({"train": (uint8 (N,28,28), uint8 (N,)), "test": ...}, class names)."""
    files = locate(cfg)
    train = _read_pair(files["train_images"], files["train_labels"])
    test = _read_pair(files["test_images"], files["test_labels"])
    return {"train": train, "test": test}, list(CLASS_NAMES)
