"""Parquet files of encoded images: an image column of PNG/JPEG bytes and an integer label column.

``data.root`` is one ``.parquet`` file, a folder of them (searched recursively) or a filesystem
URI that pyarrow opens (``file://``, ``s3://bucket/prefix``, ``gs://...``). The image column
(``data.image_column``, default ``image``) holds either plain binary or the struct
``{bytes, path}`` that Hugging Face ``datasets`` writes for an ``Image`` feature; the label column
(``data.label_column``, default ``label``) holds integers.

- **Classes** are the label values: their sorted distinct values become the class indices
  0..K-1 (labels 3, 7, 9 train a 3-class classifier). A class is named after the value, or
  after the Hugging Face ``ClassLabel`` name the file's schema declares for it.
- **Splits**: when some files are named ``train*`` and some ``test*`` (Hugging Face's
  ``train-00000-of-00001.parquet``), or sit under ``train/`` and ``test/`` folders, those are the
  splits and any other file (``validation-*``) is left out; otherwise every row is pooled and
  split 80/20 per class with a fixed seed, as an image folder is.
- **Memory**: the in-process reader (this module; pyarrow and PIL, no Ray) keeps the decoded
  pixels as uint8 at their stored size, one array per split: ``load_dataset`` converts only the
  examples a split asks for to float32. The Ray Data reader (``distributed/data.py``) reads the
  same files row group by row group through :func:`decode_images` and never builds the arrays.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from natra_ray.config import DataConfig
from natra_ray.data.datasets import DatasetError, RawSplits

logger = logging.getLogger(__name__)

TEST_FRACTION = 0.2  # the pooled rows' split, as image_folder's
SPLIT_SEED = 0
_SPLIT_NAME = re.compile(r"^(train|test)(?:[-_.]|$)")


@dataclass(frozen=True)
class ParquetFile:
    path: str  # as the filesystem names it
    num_rows: int
    row_group_rows: Tuple[int, ...]
    split: str  # "train", "test" or "" (untagged)


@dataclass(frozen=True, eq=False)  # hashed by identity: one object per cached read
class Layout:
    """What the footers say, before any image is decoded: the files, their rows, and which pooled
    row (the rows of every file in order, numbered from 0) belongs to which split."""

    root: str
    files: Tuple[ParquetFile, ...]
    rows: Dict[str, np.ndarray]  # split -> pooled row numbers, in the split's order
    labels: np.ndarray  # class index of every pooled row (-1: a row of no split)
    class_names: Tuple[str, ...]

    def locate(self, pooled: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(file index, row within that file) of each pooled row number."""
        starts = np.cumsum([0] + [f.num_rows for f in self.files])
        fi = np.searchsorted(starts, pooled, side="right") - 1
        return fi, pooled - starts[fi]


# --------------------------------------------------------------------------- locating
def open_root(root: str):
    """(pyarrow filesystem, path inside it) of ``data.root``: a URI, or a local path."""
    from pyarrow import fs as pafs

    if "://" in root:
        try:
            return pafs.FileSystem.from_uri(root)
        except Exception as e:  # ArrowInvalid for an unknown scheme, OSError for missing credentials
            raise DatasetError(f"cannot open {root}: {e}; data.root takes a local path or a "
                               "file://, s3:// or gs:// URI") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def _resolve_root(cfg: DataConfig) -> str:
    root = cfg.root or os.environ.get("NATRA_DATA_DIR", "")
    if not root:
        raise DatasetError("data.dataset=parquet needs its files: set data.root=<file.parquet, a folder "
                           "of .parquet files, or a URI such as s3://bucket/prefix>")
    return root


def _split_of(rel: str) -> str:
    parts = rel.replace("\\", "/").split("/")
    for part in parts[:-1]:
        if part in ("train", "test"):
            return part
    m = _SPLIT_NAME.match(parts[-1])
    return m.group(1) if m else ""


def list_files(root: str) -> Tuple[object, List[Tuple[str, str, int, int]]]:
    """(filesystem, [(path, split tag, size, mtime_ns)]) of the Parquet files ``root`` names."""
    from pyarrow import fs as pafs

    fs, base = open_root(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"parquet dataset {root} does not exist; set data.root to a .parquet file, "
                           "a folder of them, or a URI such as s3://bucket/prefix")
    if info.type == pafs.FileType.File:
        infos, base_dir = [info], os.path.dirname(base)
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                 if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                 and not any(p.startswith((".", "_")) for p in i.path[len(base):].split("/") if p)]
        base_dir = base
        if not infos:
            raise DatasetError(f"no .parquet files in {root}; set data.root to a .parquet file or a "
                               "folder holding them")
    out = [(i.path, _split_of(i.path[len(base_dir):].lstrip("/")), int(i.size or 0), int(i.mtime_ns or 0))
           for i in sorted(infos, key=lambda i: i.path)]
    return fs, out


# --------------------------------------------------------------------------- columns
def _open(fs, path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except Exception as e:  # ArrowInvalid: not Parquet, truncated footer
        raise DatasetError(f"cannot read {path} as Parquet ({e}); the file is truncated or corrupt, "
                           "fix or delete it") from None


def check_columns(schema, path: str, cfg: DataConfig) -> None:
    """The image column must be binary or a struct with ``bytes``; the label column integers."""
    import pyarrow as pa

    names = schema.names
    for col, key, want in ((cfg.image_column, "data.image_column", "encoded images (PNG/JPEG bytes)"),
                           (cfg.label_column, "data.label_column", "integer labels")):
        if col not in names:
            raise DatasetError(f"{path}: no column {col!r} (columns: {', '.join(names)}); set {key}=<the "
                               f"column of {want}>")
    img = schema.field(cfg.image_column).type
    ok = (pa.types.is_binary(img) or pa.types.is_large_binary(img)
          or (pa.types.is_struct(img) and img.get_field_index("bytes") >= 0))
    if not ok:
        raise DatasetError(f"{path}: column {cfg.image_column!r} is {img}, not encoded image bytes (binary, "
                           "or a struct with a 'bytes' field); set data.image_column to the column of images")
    lab = schema.field(cfg.label_column).type
    if not pa.types.is_integer(lab):
        raise DatasetError(f"{path}: column {cfg.label_column!r} is {lab}, not integer labels; set "
                           "data.label_column to an integer column, or write the labels as integers")


def image_bytes(column) -> list:
    """The encoded bytes of an image column (binary, or Hugging Face's ``{bytes, path}`` struct)."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def _hf_names(schema, label_column: str) -> Optional[List[str]]:
    """The ``ClassLabel`` names Hugging Face ``datasets`` stores in the schema, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feat = json.loads(meta)["info"]["features"][label_column]
        return list(feat["names"]) if feat.get("_type") == "ClassLabel" else None
    except (TypeError, KeyError, ValueError):
        return None


# --------------------------------------------------------------------------- layout
def _split_pooled(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class seeded 80/20 split of pooled rows (every class with >= 2 rows appears in test)."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        perm = rows[torch.randperm(len(rows), generator=gen).numpy()]
        n_test = int(round(TEST_FRACTION * len(rows)))
        if len(rows) >= 2:
            n_test = max(1, n_test)
        test.append(np.sort(perm[:n_test]))
        train.append(np.sort(perm[n_test:]))
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.lru_cache(maxsize=8)
def _layout_cached(root: str, signature: Tuple, image_column: str, label_column: str) -> Layout:
    fs, listing = list_files(root)
    del signature
    cfg = DataConfig(dataset="parquet", root=root, image_column=image_column, label_column=label_column)
    tags = {tag for _, tag, _, _ in listing}
    use_tags = {"train", "test"} <= tags
    files, raw, names = [], [], None
    for path, tag, _, _ in listing:
        if use_tags and tag not in ("train", "test"):
            logger.info("parquet: %s belongs to neither train nor test; left out", path)
            continue
        f = _open(fs, path)
        check_columns(f.schema_arrow, path, cfg)
        md = f.metadata
        files.append(ParquetFile(path, md.num_rows, tuple(md.row_group(i).num_rows for i in range(md.num_row_groups)),
                                 tag if use_tags else ""))
        col = f.read(columns=[label_column]).column(0)
        if col.null_count:
            raise DatasetError(f"{path}: {col.null_count} rows have no label (null) in column {label_column!r}; "
                               "fix or drop them")
        raw.append(col.to_numpy().astype(np.int64))
        names = names or _hf_names(f.schema_arrow, label_column)
    values = np.concatenate(raw) if raw else np.zeros(0, np.int64)
    if not len(values):
        raise DatasetError(f"parquet dataset {root} has no rows; point data.root at files that hold images")
    classes = np.unique(values)  # sorted distinct values -> class indices 0..K-1
    if len(classes) < 2:
        raise DatasetError(f"parquet dataset {root} has one label value ({classes[0]}) in column "
                           f"{label_column!r}; a classifier needs at least two classes")
    labels = np.searchsorted(classes, values)
    if use_tags:
        split = np.concatenate([np.full(f.num_rows, f.split == "test") for f in files])
        rows = {"train": np.flatnonzero(~split), "test": np.flatnonzero(split)}
    else:
        train, test = _split_pooled(labels)
        rows = {"train": train, "test": test}
    class_names = tuple(names[v] if names and 0 <= v < len(names) else str(v) for v in classes.tolist())
    logger.info("parquet %s: %d files, %d train / %d test rows, %d classes", root, len(files),
                len(rows["train"]), len(rows["test"]), len(class_names))
    return Layout(root, tuple(files), rows, labels, class_names)


def layout(cfg: DataConfig) -> Layout:
    """The dataset's :class:`Layout`, cached per (root, every file's path, size and mtime)."""
    root = _resolve_root(cfg)
    _, listing = list_files(root)
    return _layout_cached(root, tuple(listing), cfg.image_column, cfg.label_column)


# --------------------------------------------------------------------------- decoding
def decode_images(blobs: Sequence[Optional[bytes]], channels: int, where: Sequence[str],
                  first: Optional[Tuple[str, Tuple[int, int]]] = None) -> np.ndarray:
    """Encoded images -> uint8 ``(N, channels, H, W)`` at their stored size. ``where`` names each
    row for the error; ``first`` is the (row, size) earlier rows had, so one size holds throughout."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    out: Optional[np.ndarray] = None
    for i, data in enumerate(blobs):
        if data is None:
            raise DatasetError(f"{where[i]}: no image bytes (null); fix or drop the row")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's palette-transparency chatter
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    if img.mode == "P" and "transparency" in img.info:
                        img = img.convert("RGBA")
                    arr = np.asarray(img.convert(mode), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"cannot decode the image of {where[i]}: {e} (corrupt or not PNG/JPEG; "
                               "fix or drop the row)") from None
        size = arr.shape[:2]
        if first is None:
            first = (where[i], size)
        elif size != first[1]:
            raise DatasetError(f"images have mixed sizes: {first[0]} is {first[1][1]}x{first[1][0]} but "
                               f"{where[i]} is {size[1]}x{size[0]}; resize them to one size first")
        if out is None:
            out = np.empty((len(blobs), channels, *size), dtype=np.uint8)
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out if out is not None else np.zeros((0, channels, 1, 1), np.uint8)


def read_images(pf, row_group: int, cfg: DataConfig) -> list:
    """The encoded images of one row group of the open Parquet file ``pf`` (labels come from the
    :class:`Layout`, read once)."""
    return image_bytes(pf.read_row_group(row_group, columns=[cfg.image_column]).column(0))


def _decode_split(lay: Layout, cfg: DataConfig, split: str,
                  first: Optional[Tuple[str, Tuple[int, int]]]) -> np.ndarray:
    """uint8 images of ``split``'s rows in order, decoded one row group at a time."""
    out: Optional[np.ndarray] = None
    for unit in row_group_units(lay, lay.rows[split]):
        u8 = decode_unit(lay.root, cfg, unit, first)
        if out is None:
            out = np.empty((len(lay.rows[split]), *u8.shape[1:]), dtype=np.uint8)
            first = first or (f"{unit['file']} row {int(unit['start']) + int(unit['rows'][0])}", u8.shape[2:])
        out[unit["idx"]] = u8
    if out is None:
        return np.zeros((0, cfg.channels, *(first[1] if first else (1, 1))), np.uint8)
    return out


@functools.lru_cache(maxsize=2)
def _read_cached(lay: Layout, cfg: DataConfig) -> RawSplits:
    train = _decode_split(lay, cfg, "train", None)
    test = _decode_split(lay, cfg, "test", (f"{lay.root} (train split)", train.shape[2:]) if len(train) else None)
    return {"train": (train, lay.labels[lay.rows["train"]]),
            "test": (test, lay.labels[lay.rows["test"]])}, list(lay.class_names)


def read_parquet(cfg: DataConfig) -> RawSplits:
    """({"train": (uint8 (N,C,H,W), int64 (N,)), "test": ...}, class names) of ``data.root``."""
    lay = layout(cfg)
    key = DataConfig(dataset="parquet", root=lay.root, channels=cfg.channels,
                     image_column=cfg.image_column, label_column=cfg.label_column)
    return _read_cached(lay, key)


# --------------------------------------------------------------------------- row-group units
def row_group_units(lay: Layout, pooled: np.ndarray) -> List[Dict[str, object]]:
    """The reads behind rows ``pooled`` (pooled row numbers; example ``i`` of a split is
    ``pooled[i]``): one unit per row group holding any of them, ``{"file", "group", "start" (the
    group's first row in the file), "rows" (within the group), "idx" (their positions in ``pooled``),
    "label" (their class indices)}``. A unit reads its row group once."""
    pooled = np.asarray(pooled, dtype=np.int64)
    fi, local = lay.locate(pooled)
    units: List[Dict[str, object]] = []
    for k, f in enumerate(lay.files):
        mine = np.flatnonzero(fi == k)
        bounds = np.cumsum((0,) + f.row_group_rows)
        group = np.searchsorted(bounds, local[mine], side="right") - 1
        for g in np.unique(group):
            sel = mine[group == g]
            units.append({"file": f.path, "group": int(g), "start": int(bounds[g]),
                          "rows": (local[sel] - bounds[g]).tolist(), "idx": sel.tolist(),
                          "label": lay.labels[pooled[sel]].tolist()})
    return units


def decode_unit(root: str, cfg: DataConfig, unit: Dict[str, object],
                first: Optional[Tuple[str, Tuple[int, int]]] = None) -> np.ndarray:
    """uint8 images ``(n, C, H, W)`` of one :func:`row_group_units` unit, in its ``rows`` order
    (``first``: as :func:`decode_images`)."""
    fs, _ = open_root(root)
    blobs = read_images(_open(fs, str(unit["file"])), int(unit["group"]), cfg)
    rows = [int(r) for r in unit["rows"]]
    where = [f"{unit['file']} row {int(unit['start']) + r}" for r in rows]
    return decode_images([blobs[r] for r in rows], cfg.channels, where, first)
