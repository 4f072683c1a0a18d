"""Ray Data views of an ``ImageDataset``. Ray is imported inside the functions so the Ray-free
stages can import ``natra_ray.data`` without paying for (or needing) Ray."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from natra_ray.config import DataConfig
from natra_ray.data.datasets import ImageDataset, load_dataset

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

# Rows per Arrow block: ~2 MB of 1x32x32 float32 images, small enough to spread over workers.
ROWS_PER_BLOCK = 512


def to_ray_dataset(ds: ImageDataset, rows_per_block: int = ROWS_PER_BLOCK) -> "ray.data.Dataset":
    """Rows ``{"image": float32 (C, H, W), "label": int64}`` in the dataset's order."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    images = ds.images.detach().cpu().numpy().astype(np.float32, copy=False)
    labels = ds.labels.detach().cpu().numpy().astype(np.int64, copy=False)
    tables = []
    for start in range(0, max(len(ds), 1), rows_per_block):
        sl = slice(start, start + rows_per_block)
        tables.append(pa.table({
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[sl])),
            "label": pa.array(labels[sl], type=pa.int64()),
        }))
    return ray.data.from_arrow(tables)


def load_ray_dataset(cfg: DataConfig, split: str, seed: int = 0) -> "ray.data.Dataset":
    """``to_ray_dataset(load_dataset(cfg, split, seed))``."""
    return to_ray_dataset(load_dataset(cfg, split, seed))
