"""data.dataset=parquet: Fashion-MNIST written as Hugging Face writes an image dataset (a struct
{bytes, path} of PNG bytes, or plain binary, and an integer label column), read back in one
process and through Ray Data with the source's pixels and labels; the bad files' one-line
errors. The real job on such a folder, submitted to the cluster: tests/test_job_submit.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from natra_ray.config import DataConfig
from natra_ray.data.datasets import DatasetError, load_dataset, split_indices, to_float_images

from hf_parquet import N_TEST, N_TRAIN, fashion_mnist_slice, png, table, write_hf_folder

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def fm():
    return fashion_mnist_slice()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, fm):
    """The Hugging Face export layout: data/train-00000-of-00001.parquet and data/test-..., the
    train split in two row groups."""
    return write_hf_folder(tmp_path_factory.mktemp("hf"), fm)


@pytest.fixture(scope="module")
def binary_file(tmp_path_factory, fm):
    """One file, plain binary images, labels 0..9: the rows are pooled and split 80/20."""
    (xtr, ytr), _, _ = fm
    f = tmp_path_factory.mktemp("bin") / "images.parquet"
    pq.write_table(table(xtr, ytr, False), f, row_group_size=100)
    return f


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="parquet", root=str(root), **kw)


# --------------------------------------------------------------------------- the Ray-free reader
def test_hugging_face_layout_reads_the_source_pixels_labels_and_class_names(hf_folder, fm):
    from natra_ray.data.parquet import read_parquet

    (xtr, ytr), (xte, yte), names = fm
    (arrays, classes) = read_parquet(_cfg(hf_folder))
    assert classes == list(names)  # the ClassLabel names the schema declares
    assert arrays["train"][0].dtype == np.uint8 and arrays["train"][0].shape == (N_TRAIN, 1, 28, 28)
    np.testing.assert_array_equal(arrays["train"][0][:, 0], xtr)
    np.testing.assert_array_equal(arrays["test"][0][:, 0], xte)
    np.testing.assert_array_equal(arrays["train"][1], ytr)
    np.testing.assert_array_equal(arrays["test"][1], yte)
    # a split is what the Fashion-MNIST reader makes of the same pixels: padded 28 -> 32
    cfg = _cfg(hf_folder, train_subset=200)
    val = load_dataset(cfg, "val", seed=3)
    idx = split_indices(N_TRAIN, N_TEST, cfg, "val", 3)
    assert torch.equal(val.images, to_float_images(xtr[idx], 32, 1, pad_28_to_32=True))
    assert torch.equal(val.labels, torch.from_numpy(ytr[idx]))
    # a file:// URI names the same data
    (uri_arrays, _) = read_parquet(_cfg(f"file://{hf_folder}"))
    np.testing.assert_array_equal(uri_arrays["test"][0], arrays["test"][0])


def test_plain_binary_one_file_is_pooled_and_split_per_class(binary_file, fm):
    from natra_ray.data.parquet import layout, read_parquet

    (xtr, ytr), _, _ = fm
    (arrays, classes) = read_parquet(_cfg(binary_file))
    assert classes == [str(c) for c in range(10)]  # no ClassLabel names: the values name the classes
    lay = layout(_cfg(binary_file))
    rows = np.concatenate([lay.rows["train"], lay.rows["test"]])
    assert sorted(rows.tolist()) == list(range(N_TRAIN))  # disjoint, and every row in one split
    assert abs(len(lay.rows["test"]) - 0.2 * N_TRAIN) <= 10
    for s in ("train", "test"):
        np.testing.assert_array_equal(arrays[s][0][:, 0], xtr[lay.rows[s]])
        np.testing.assert_array_equal(arrays[s][1], ytr[lay.rows[s]])


def test_label_values_become_sorted_class_indices(tmp_path, fm):
    from natra_ray.data.parquet import read_parquet

    (xtr, ytr), _, _ = fm
    sparse = np.array([3, 7, 9])[ytr % 3]  # three label values, not 0..K-1
    pq.write_table(table(xtr[:60], sparse[:60], False), tmp_path / "x.parquet")
    (arrays, classes) = read_parquet(_cfg(tmp_path / "x.parquet"))
    assert classes == ["3", "7", "9"]
    lay_rows = np.concatenate([arrays["train"][1], arrays["test"][1]])
    assert set(lay_rows.tolist()) == {0, 1, 2}


# --------------------------------------------------------------------------- bad files
def _write(path: Path, t) -> Path:
    pq.write_table(t, path)
    return path


@pytest.mark.parametrize("case", ["missing_image", "missing_label", "string_labels", "undecodable", "null_image",
                                  "mixed_sizes", "null_label", "empty", "one_class", "not_parquet", "no_files", "missing_root"])
def test_bad_files_fail_in_one_line_saying_what_to_do(tmp_path, fm, case):
    from natra_ray.data.datasets import check_dataset

    (xtr, ytr), _, _ = fm
    good = table(xtr[:20], ytr[:20], True)
    f = tmp_path / "d.parquet"
    if case == "missing_image":
        _write(f, good.rename_columns(["img", "label"]))
        want = ["no column 'image'", "data.image_column="]
    elif case == "missing_label":
        _write(f, good.rename_columns(["image", "y"]))
        want = ["no column 'label'", "data.label_column="]
    elif case == "string_labels":
        _write(f, good.set_column(1, "label", pa.array([str(v) for v in ytr[:20]])))
        want = ["'label' is string, not integer labels", "data.label_column"]
    elif case == "undecodable":
        blobs = [png(x) for x in xtr[:20]]
        blobs[7] = b"not an image"
        _write(f, pa.table({"image": pa.array(blobs), "label": pa.array(ytr[:20])}))
        want = ["cannot decode the image of", "d.parquet row 7"]
    elif case == "null_image":
        blobs = [png(x) for x in xtr[:20]]
        blobs[4] = None
        _write(f, pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(ytr[:20])}))
        want = ["d.parquet row 4: no image bytes"]
    elif case == "mixed_sizes":
        blobs = [png(x) for x in xtr[:20]]
        blobs[5] = png(np.zeros((30, 30), np.uint8))
        _write(f, pa.table({"image": pa.array(blobs), "label": pa.array(ytr[:20])}))
        want = ["images have mixed sizes", "is 28x28 but", "row 5 is 30x30"]
    elif case == "null_label":
        _write(f, good.set_column(1, "label", pa.array([None] + ytr[1:20].tolist(), pa.int64())))
        want = ["1 rows have no label (null) in column 'label'"]
    elif case == "empty":
        _write(f, good.slice(0, 0))
        want = ["has no rows"]
    elif case == "one_class":
        _write(f, good.set_column(1, "label", pa.array(np.zeros(20, np.int64))))
        want = ["one label value (0)", "at least two classes"]
    elif case == "not_parquet":
        f.write_bytes(b"PAR1 but not really")
        want = ["cannot read", "as Parquet"]
    elif case == "no_files":
        (tmp_path / "empty").mkdir()
        f = tmp_path / "empty"
        want = ["no .parquet files in"]
    else:
        f = tmp_path / "nowhere"
        want = ["does not exist", "set data.root"]
    with pytest.raises(DatasetError) as e:
        check_dataset(_cfg(f))
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in want:
        assert w in msg, (w, msg)


# --------------------------------------------------------------------------- Ray Data
def _assert_one_pass_of(rows, train) -> None:
    """A stream's epoch holds each example of ``train`` once, with its pixels and label at its position."""
    idx = np.array([r["idx"] for r in rows])
    assert sorted(idx.tolist()) == list(range(len(train)))
    images = torch.from_numpy(np.stack([r["image"] for r in rows]))
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 32, 32)
    assert torch.equal(images, train.images[idx])
    assert torch.equal(torch.tensor([r["label"] for r in rows]), train.labels[idx])


@pytest.mark.ray
def test_ray_data_stream_decodes_in_tasks_the_rows_the_trial_trains_on(ray_session, hf_folder, binary_file):
    """Every epoch's stream holds each training example once, with the pixels and label that
    ``load_splits`` gives the same position (the key of its latent codes and APT budget)."""
    from natra_ray.config import load_config
    from natra_ray.distributed.data import parquet_stream
    from natra_ray.workflow.upstream import load_splits

    for root in (hf_folder, f"file://{binary_file}"):
        cfg = load_config("smoke", overrides={"data.dataset": "parquet", "data.root": str(root),
                                              "data.train_subset": 200})
        train = load_splits(cfg)["train"]
        _assert_one_pass_of(parquet_stream(cfg, len(train), rows_per_block=32).take_all(), train)


@pytest.mark.ray
def test_image_folder_stream_reads_the_files_with_read_images(ray_session, tmp_path, fm):
    """A class-per-folder dataset through ``ray.data.read_images``: the same rows, pixels (resized
    as the in-process reader resizes) and labels as ``load_splits``."""
    from PIL import Image

    from natra_ray.config import load_config
    from natra_ray.distributed.data import image_folder_stream
    from natra_ray.workflow.upstream import load_splits

    (xtr, ytr), _, names = fm
    for i in range(90):
        d = tmp_path / f"class_{ytr[i] % 3}"
        d.mkdir(exist_ok=True)
        Image.fromarray(xtr[i]).save(d / f"{i:03d}.png")
    cfg = load_config("smoke", overrides={"data.dataset": "image_folder", "data.root": str(tmp_path),
                                          "data.train_subset": 0})
    train = load_splits(cfg)["train"]
    _assert_one_pass_of(image_folder_stream(cfg, len(train), rows_per_block=16).take_all(), train)
