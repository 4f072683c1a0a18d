"""Fashion-MNIST written as Hugging Face writes an image dataset: a struct {bytes, path} of PNG
bytes (or plain binary bytes) and an integer label column, the class names in the schema's
``huggingface`` metadata. Used by the Parquet reader's tests and by the job-submit test, which
runs the real job on such a folder."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

N_TRAIN, N_TEST = 300, 100


def fashion_mnist_slice():
    """((train images, labels), (test images, labels), class names): the first N_TRAIN / N_TEST
    images of the installed Fashion-MNIST, uint8 28x28."""
    from natra_ray.config import DataConfig
    from natra_ray.data.fashion_mnist import CLASS_NAMES, read_fashion_mnist

    (arrays, _) = read_fashion_mnist(DataConfig(download=False))
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    return (xtr[:N_TRAIN], ytr[:N_TRAIN].astype(np.int64)), (xte[:N_TEST], yte[:N_TEST].astype(np.int64)), CLASS_NAMES


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def hf_metadata(names) -> dict:
    feats = {"image": {"_type": "Image"}, "label": {"names": list(names), "_type": "ClassLabel"}}
    return {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}


def table(images, labels, struct: bool, names=None, image="image", label="label"):
    import pyarrow as pa

    blobs = [png(x) for x in images]
    col = (pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
                    type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
           if struct else pa.array(blobs, type=pa.binary()))
    t = pa.table({image: col, label: pa.array(labels, type=pa.int64())})
    return t.replace_schema_metadata(hf_metadata(names)) if names else t


def write_hf_folder(parent: Path, fm) -> Path:
    """The Hugging Face export layout under ``parent/fashion_mnist``: data/train-00000-of-00001.parquet
    (in row groups of 128) and data/test-...; returns the dataset folder."""
    import pyarrow.parquet as pq

    (xtr, ytr), (xte, yte), names = fm
    d = parent / "fashion_mnist"
    (d / "data").mkdir(parents=True)
    pq.write_table(table(xtr, ytr, True, names), d / "data" / "train-00000-of-00001.parquet", row_group_size=128)
    pq.write_table(table(xte, yte, True, names), d / "data" / "test-00000-of-00001.parquet")
    return d
