"""Dataset readers: synthetic IDX files and PNG folders in tmp_path, plus the real Debian copy."""
from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from natra_ray.config import DataConfig, load_config
from natra_ray.data import DatasetError, ImageDataset, load_dataset, split_indices
from natra_ray.data import fashion_mnist as fm

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
STEMS = list(fm.FILES.values())  # train-images, train-labels, t10k-images, t10k-labels


# --------------------------------------------------------------------------- helpers
def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">I", 0x800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def fake_images(n: int, offset: int = 0) -> np.ndarray:
    """28x28 images whose corner pixels encode a unique id (so splits can be told apart)."""
    rng = np.random.default_rng(offset)
    imgs = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    imgs[:, 0, 0] = ids % 256
    imgs[:, 0, 1] = ids // 256
    return imgs


def image_ids(ds: ImageDataset, pad: int = 2) -> list[int]:
    px = torch.round(ds.images[:, 0, pad, pad: pad + 2] * 255).long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def make_fmnist(d: Path, n_train: int = 40, n_test: int = 20, gz: "bool | str" = True) -> dict:
    """Write the four IDX files; ``gz="mixed"`` gzips only the image files."""
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        STEMS[0]: fake_images(n_train), STEMS[1]: (np.arange(n_train) % 10).astype(np.uint8),
        STEMS[2]: fake_images(n_test, offset=10_000), STEMS[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }
    paths = {}
    for i, (stem, arr) in enumerate(arrays.items()):
        use_gz = (i % 2 == 0) if gz == "mixed" else bool(gz)
        paths[stem] = write_idx(d / stem, arr, use_gz)
    return {"arrays": arrays, "paths": paths}


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No NATRA_DATA_DIR, an empty HOME (so an empty cache) and a non-existent Debian dir."""
    monkeypatch.delenv("NATRA_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    return tmp_path


def fcfg(root: Path | str = "", **kw) -> DataConfig:
    kw.setdefault("download", False)
    return DataConfig(dataset="fashion_mnist", root=str(root), **kw)


# --------------------------------------------------------------------------- Fashion-MNIST IDX
@pytest.mark.parametrize("gz", [True, False, "mixed"])
def test_reads_synthetic_idx(tmp_path, gz):
    made = make_fmnist(tmp_path / "fm", gz=gz)
    cfg = fcfg(tmp_path / "fm", val_fraction=0.0)
    ds = load_dataset(cfg, "train")
    assert ds.images.shape == (40, 1, 32, 32) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (40,)
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot" and ds.num_classes == 10
    # 28 -> 32 is a centred zero pad: the original pixels are untouched, the 2-px border is 0
    idx = split_indices(40, 20, cfg, "train", 0)
    src = made["arrays"][STEMS[0]][idx]
    assert torch.equal(torch.round(ds.images[:, 0, 2:30, 2:30] * 255).to(torch.uint8), torch.from_numpy(src))
    border = ds.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.abs().sum() == 0
    assert ds.labels.tolist() == (idx % 10).tolist()
    test = load_dataset(cfg, "test")
    assert len(test) == 20 and set(image_ids(test)) == set(range(10_000, 10_020))


def test_channels_and_resize(tmp_path):
    make_fmnist(tmp_path / "fm")
    rgb = load_dataset(fcfg(tmp_path / "fm", channels=3), "test")
    assert rgb.images.shape == (20, 3, 32, 32)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    for size in (16, 64):
        ds = load_dataset(fcfg(tmp_path / "fm", image_size=size), "test")
        assert ds.images.shape == (20, 1, size, size)
        assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
        assert ds.images[:, :, size // 4:, size // 4:].mean() > 0.2  # resized, not padded with zeros


def _truncate_gz(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-40])


def _bad_magic(p: Path) -> None:
    data = bytearray(gzip.decompress(p.read_bytes()))
    data[2:4] = b"\x08\x01"  # claims 1 dimension: a labels header on an images file
    p.write_bytes(gzip.compress(bytes(data)))


def _wrong_size(p: Path) -> None:
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + b"\x00" * 5))


@pytest.mark.parametrize("damage, stem, needle", [
    (_truncate_gz, STEMS[0], "truncated or corrupt"),
    (_bad_magic, STEMS[0], "bad magic number"),
    (_wrong_size, STEMS[1], "wrong size"),
])
def test_malformed_idx_names_the_file(tmp_path, damage, stem, needle):
    made = make_fmnist(tmp_path / "fm", gz=True)
    path = made["paths"][stem]
    damage(path)
    with pytest.raises(DatasetError) as ei:
        load_dataset(fcfg(tmp_path / "fm"), "train")
    assert str(path) in str(ei.value) and needle in str(ei.value)


def test_label_image_count_mismatch(tmp_path):
    made = make_fmnist(tmp_path / "fm", gz=False)
    write_idx(tmp_path / "fm" / STEMS[3], np.zeros(19, np.uint8), gz=False)  # 20 test images, 19 labels
    with pytest.raises(DatasetError) as ei:
        load_dataset(fcfg(tmp_path / "fm"), "test")
    msg = str(ei.value)
    assert str(made["paths"][STEMS[2]]) in msg and "19 labels" in msg
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, FileNotFoundError)


def test_missing_dataset_message(isolated, monkeypatch):
    empty = isolated / "empty"
    empty.mkdir()
    monkeypatch.setenv("NATRA_DATA_DIR", str(empty))
    with pytest.raises(DatasetError) as ei:
        load_dataset(fcfg(), "train")
    msg = str(ei.value)
    for looked in (empty, isolated / "debian", isolated / "home" / ".cache" / "natra_ray" / "fashion-mnist"):
        assert str(looked) in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "NATRA_DATA_DIR" in msg and "data.root" in msg and "data.download=false" in msg


def test_search_order_env_then_debian(isolated, monkeypatch):
    make_fmnist(isolated / "debian", n_test=20)
    assert len(load_dataset(fcfg(), "test")) == 20  # found in the (monkeypatched) Debian dir
    make_fmnist(isolated / "env" / "fashion-mnist", n_test=30)  # the sub-folder layout is accepted
    monkeypatch.setenv("NATRA_DATA_DIR", str(isolated / "env"))
    assert len(load_dataset(fcfg(), "test")) == 30  # NATRA_DATA_DIR wins over Debian


def test_explicit_root_is_not_replaced(isolated):
    make_fmnist(isolated / "debian")
    (isolated / "mine").mkdir()
    with pytest.raises(DatasetError) as ei:
        load_dataset(fcfg(isolated / "mine"), "train")
    assert str(isolated / "mine") in str(ei.value)


def test_download_from_mirror(isolated, monkeypatch):
    src = make_fmnist(isolated / "mirror", gz=True)
    monkeypatch.setattr(fm, "MIRRORS", ((isolated / "nowhere").as_uri() + "/", (isolated / "mirror").as_uri() + "/"))
    monkeypatch.setattr(fm, "MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                                    for p in src["paths"].values()})
    ds = load_dataset(fcfg(download=True), "test")
    assert len(ds) == 20
    cache = isolated / "home" / ".cache" / "natra_ray" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(s + ".gz" for s in STEMS)  # no .part left


def test_download_checksum_mismatch(isolated, monkeypatch):
    make_fmnist(isolated / "mirror", gz=True)
    monkeypatch.setattr(fm, "MIRRORS", ((isolated / "mirror").as_uri() + "/",))  # MD5 = official values
    with pytest.raises(DatasetError) as ei:
        load_dataset(fcfg(download=True), "train")
    assert "MD5" in str(ei.value) and "apt-get install -y dataset-fashion-mnist" in str(ei.value)
    cache = isolated / "home" / ".cache" / "natra_ray" / "fashion-mnist"
    assert not any(cache.iterdir())  # nothing half-written or unverified was kept


# --------------------------------------------------------------------------- splits
def test_train_val_disjoint_and_deterministic(tmp_path):
    make_fmnist(tmp_path / "fm", n_train=100)
    cfg = fcfg(tmp_path / "fm", val_fraction=0.2)
    tr, va = load_dataset(cfg, "train", seed=3), load_dataset(cfg, "val", seed=3)
    assert len(tr) == 80 and len(va) == 20
    assert set(image_ids(tr)).isdisjoint(image_ids(va))
    assert set(image_ids(tr)) | set(image_ids(va)) == set(range(100))
    assert torch.equal(load_dataset(cfg, "train", seed=3).images, tr.images)
    assert image_ids(load_dataset(cfg, "val", seed=4)) != image_ids(va)

    sub = fcfg(tmp_path / "fm", val_fraction=0.1, train_subset=50, test_subset=7)
    tr, va, te = (load_dataset(sub, s, seed=1) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (45, 5, 7)
    assert set(image_ids(tr)).isdisjoint(image_ids(va))
    assert image_ids(te) == image_ids(load_dataset(sub, "test", seed=1))


def test_empty_train_split_and_bad_split_name(tmp_path):
    make_fmnist(tmp_path / "fm")
    with pytest.raises(DatasetError, match="val_fraction"):
        load_dataset(fcfg(tmp_path / "fm", train_subset=1, val_fraction=0.9), "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset(fcfg(tmp_path / "fm"), "validation")


def test_decoded_files_are_cached(tmp_path):
    make_fmnist(tmp_path / "fm")
    cfg = fcfg(tmp_path / "fm")
    load_dataset(cfg, "train")
    before = fm._load_idx_cached.cache_info()
    load_dataset(cfg, "val")
    load_dataset(cfg, "test")
    after = fm._load_idx_cached.cache_info()
    assert after.misses == before.misses and after.hits >= before.hits + 4  # no file decoded twice


def test_subset(tmp_path):
    make_fmnist(tmp_path / "fm")
    ds = load_dataset(fcfg(tmp_path / "fm"), "test")
    sub = ds.subset([3, 1])
    assert len(sub) == 2 and torch.equal(sub.images[0], ds.images[3]) and torch.equal(sub.images[1], ds.images[1])
    assert sub.labels.tolist() == [ds.labels[3].item(), ds.labels[1].item()] and sub.class_names == ds.class_names
    assert len(ds.subset(slice(0, 5))) == 5
    assert len(ds.subset(ds.labels == ds.labels[0])) == int((ds.labels == ds.labels[0]).sum())


# --------------------------------------------------------------------------- image folder
COLORS = {"bird": (255, 0, 0), "cat": (0, 255, 0), "dog": (0, 0, 255)}


def make_folder(root: Path, n: int = 5, size=(8, 8), mode: str = "RGB") -> Path:
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, size, color if mode == "RGB" else 128).save(root / name / f"{i}.png")
    return root


def icfg(root: Path, **kw) -> DataConfig:
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(dataset="image_folder", root=str(root), **kw)


def test_image_folder_happy_path(tmp_path):
    root = make_folder(tmp_path / "imgs", n=5)
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored
    (root / ".ipynb_checkpoints").mkdir()  # ignored
    cfg = icfg(root, image_size=16, channels=3)
    tr, te = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert tr.class_names == ["bird", "cat", "dog"]
    assert tr.images.shape == (12, 3, 16, 16) and te.images.shape == (3, 3, 16, 16)
    assert sorted(te.labels.tolist()) == [0, 1, 2]  # 80/20 per class: one test image per class
    # solid colours survive conversion: label k is lit only in its own channel (R, G, B)
    for ds in (tr, te):
        assert torch.allclose(ds.images.mean((2, 3)), torch.eye(3)[ds.labels])
    gray = load_dataset(icfg(root, image_size=8, channels=1, val_fraction=0.25), "val")
    assert gray.images.shape == (3, 1, 8, 8) and gray.labels.dtype == torch.int64


def test_image_folder_explicit_splits(tmp_path):
    make_folder(tmp_path / "imgs" / "train", n=4)
    make_folder(tmp_path / "imgs" / "test", n=2)
    cfg = icfg(tmp_path / "imgs", image_size=8, channels=3)
    assert len(load_dataset(cfg, "train")) == 12 and len(load_dataset(cfg, "test")) == 6


def test_image_folder_missing_root_and_no_classes(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as ei:
        load_dataset(icfg(tmp_path / "nope"), "train")
    assert str(tmp_path / "nope") in str(ei.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(icfg(tmp_path / "empty"), "train")


def test_image_folder_empty_class(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "zebra").mkdir()
    with pytest.raises(DatasetError, match="zebra.*has no images"):
        load_dataset(icfg(root), "train")


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_image_folder_corrupt_image(tmp_path, how):
    root = make_folder(tmp_path / "imgs", size=(64, 64))
    bad = root / "cat" / "2.png"
    if how == "garbage":
        bad.write_bytes(b"this is not a png")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:400])
    with pytest.raises(DatasetError) as ei:
        load_dataset(icfg(root), "train")
    assert str(bad) in str(ei.value) and "\n" not in str(ei.value)


def test_image_folder_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "imgs", size=(8, 8))
    Image.new("RGB", (10, 12)).save(root / "dog" / "big.png")
    with pytest.raises(DatasetError, match="mixed sizes") as ei:
        load_dataset(icfg(root), "train")
    assert "big.png is 10x12" in str(ei.value) and "8x8" in str(ei.value)


def test_image_folder_mixed_modes(tmp_path):
    root = make_folder(tmp_path / "imgs", mode="RGB")
    Image.new("L", (8, 8), 7).save(root / "dog" / "gray.png")
    with pytest.raises(DatasetError, match="mixed channel modes") as ei:
        load_dataset(icfg(root), "train")
    assert "gray.png is L" in str(ei.value) and "RGB" in str(ei.value)


# --------------------------------------------------------------------------- packaging / real data
def test_data_package_does_not_import_ray():
    code = "import sys, natra_ray.data; assert 'ray' not in sys.modules, 'ray imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("NATRA_DATA_DIR", raising=False)
    cfg = DataConfig(download=False)
    tr, va, te = (load_dataset(cfg, s) for s in ("train", "val", "test"))
    n_val = round(cfg.val_fraction * 60000)
    assert (len(tr), len(va), len(te)) == (60000 - n_val, n_val, 10000)
    assert tr.images.shape[1:] == (1, 32, 32) and te.images.shape[1:] == (1, 32, 32)
    assert torch.bincount(te.labels).tolist() == [1000] * 10
    # Fashion-MNIST pixel mean is 0.286 at 28 px; the zero border scales it by 784/1024
    assert abs(float(te.images.mean()) - 0.286 * 784 / 1024) < 0.005
    smoke = load_config("smoke").data
    assert len(load_dataset(smoke, "train")) + len(load_dataset(smoke, "val")) == smoke.train_subset


# --------------------------------------------------------------------------- Ray Data
@pytest.mark.ray
def test_ray_dataset_round_trip(ray_session, tmp_path):
    from natra_ray.distributed.data import to_ray_dataset

    make_fmnist(tmp_path / "fm", n_train=40)
    cfg = fcfg(tmp_path / "fm", channels=3)
    ds = load_dataset(cfg, "train")
    rds = to_ray_dataset(ds, rows_per_block=8)
    assert rds.count() == len(ds)
    batches = list(rds.iter_torch_batches(batch_size=7))
    assert batches[0]["image"].shape[1:] == (3, 32, 32) and batches[0]["image"].dtype == torch.float32
    assert batches[0]["label"].dtype == torch.int64
    assert torch.equal(torch.cat([b["image"] for b in batches]), ds.images)
    assert torch.equal(torch.cat([b["label"] for b in batches]), ds.labels)
    row = to_ray_dataset(load_dataset(cfg, "test"), with_index=True).take(1)[0]
    assert row["image"].shape == (3, 32, 32) and row["image"].dtype == np.float32 and row["idx"] == 0
