"""Ray Data: the latent-augmented training stream.

A split becomes a dataset of rows {image, label, idx}. For a method that trains on random
decodes (``Needs.random_decode``: the "Random" baseline), a stateful ``map_batches`` actor
(``LatentAugmenter``) holds the frozen generator, the split's cached latent codes and the
directions, and attaches to every batch a random natural transformation
``x_rand = dec(enc(x) + V r)``, r ~ N(0, eps^2); every other method skips that decode. The classifier workers read their shard with
``iter_torch_batches``; the adversarial inner maximisation needs the *current* classifier,
so it stays in the worker (an actor cannot hold weights that change every step).

The split is cut into one block per batch: the actor streams block by block, so the first
batch reaches the worker after one decode rather than after the whole epoch's (bench/
bench_stream.py measured 28.6 s of idle worker per epoch with a single block), and the block
order is shuffled every epoch. A Parquet or image-folder split is not copied from memory: Ray
Data tasks read and decode its files (``parquet_stream``, ``image_folder_stream``).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

from natra_ray.data import ImageDataset


class LatentAugmenter:
    """map_batches actor: one generator load per actor, reused for every batch."""

    def __init__(self, job: Any, seed: int = 0) -> None:
        from natra_ray.models.latent import Directions, resolve_layer_range
        from natra_ray.runtime import resolve_device
        from natra_ray.stages.gan import load_generator
        from natra_ray.stages.lce import LatentCodes

        torch.set_num_threads(1)
        self.cfg = job.cfg
        self.device = resolve_device(self.cfg.device)
        self.G = load_generator(job.generator_path).to(self.device)
        self.dirs = Directions.load(job.directions_path)
        self.codes = LatentCodes.load(job.codes["train"])
        self.range = resolve_layer_range(self.G, self.cfg.robust.layer_start, self.cfg.robust.layer_end)
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from natra_ray.models.generator import to_unit
        from natra_ray.models.latent import lce_decode

        # Ray Data hands out read-only views of its Arrow blocks; the index column is tiny, copy it.
        idx = torch.from_numpy(np.array(batch["idx"], dtype=np.int64))
        ws = self.codes.ws[idx].to(self.device)
        alpha = self.codes.alpha[idx].to(self.device)
        k = self.cfg.robust.num_directions
        r = torch.randn(len(idx), k, generator=self.gen).to(self.device) * self.cfg.robust.eps  # "Random": N(0, eps^2)
        x_rand = to_unit(lce_decode(self.G, self.dirs.edit(ws, r, *self.range), alpha, self.codes.layer))
        batch["x_rand"] = x_rand.cpu().numpy()
        return batch


def training_stream(ds: ImageDataset, job: Any, use_gpu: bool = False):
    """rows {image, label, idx} in blocks of ``robust.batch_size``; for a method that reads a random
    decode (``Needs.random_decode``), through the LatentAugmenter actor -> {..., x_rand}.
    ``job``: the trial's ``distributed.train.RobustJob``."""
    import ray

    from natra_ray.augment import method_needs
    from natra_ray.distributed.console import quiet_ray_data

    quiet_ray_data()  # one line per batch per operator floods job logs; the trial has its own bar
    cfg = job.cfg
    if cfg.data.dataset == "parquet":  # read from the files in the Data tasks, not from ``ds``
        blocks = parquet_stream(cfg, len(ds), rows_per_block=cfg.robust.batch_size)
    elif cfg.data.dataset == "image_folder":
        blocks = image_folder_stream(cfg, len(ds), rows_per_block=cfg.robust.batch_size)
    else:
        blocks = to_ray_dataset(ds, rows_per_block=cfg.robust.batch_size, with_index=True).randomize_block_order()
    if not method_needs(cfg.robust.method).random_decode:
        return blocks
    from natra_ray.distributed.resources import data_actor_resources

    res = data_actor_resources(cfg, use_gpu)  # what the sweep's pre-check budgeted for it
    return blocks.map_batches(
        LatentAugmenter, fn_constructor_kwargs={"job": job},
        batch_size=cfg.robust.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=res["CPU"], num_gpus=res["GPU"],
    )


def parquet_stream(cfg: Any, n_expected: int, rows_per_block: int = 512):
    """Rows ``{"image": float32 (C, S, S), "label", "idx"}`` of the trial's train split of a
    ``data.dataset=parquet`` dataset, read and decoded in Ray Data tasks one Parquet row group at a
    time (``data.parquet.row_group_units``) and preprocessed as ``load_dataset`` does; ``idx`` is
    the row's position in ``load_splits(cfg)["train"]`` (``n_expected`` rows, checked).

    Why not ``ray.data.read_parquet``: its rows do not say where in their file they came from,
    and the per-example state (latent codes, APT budgets) is keyed by that position. A unit reads
    only the row groups that hold the split's rows; the unit order is shuffled every epoch, and the
    rows inside a unit too (files sorted by class would otherwise give one-class batches)."""
    import ray.data

    from natra_ray.data import parquet

    lay = parquet.layout(cfg.data)
    pooled = lay.rows["train"][_trial_rows(cfg, len(lay.rows["train"]), len(lay.rows["test"]), n_expected)]
    units = parquet.row_group_units(lay, pooled)
    return ray.data.from_items(units, override_num_blocks=len(units)).randomize_block_order().map_batches(
        _decode_units, fn_kwargs={"root": lay.root, "data": cfg.data, "rows_per_block": rows_per_block},
        batch_size=1, batch_format="numpy", num_cpus=cfg.tune.data_cpus)


def _decode_units(batch: Dict[str, np.ndarray], root: str, data: Any, rows_per_block: int):
    """map_batches: row-group units in, their rows decoded to the models' input out (in blocks of
    ``rows_per_block``, each unit's rows in a fresh random order)."""
    from natra_ray.data import parquet
    from natra_ray.data.datasets import READERS, to_float_images

    pad = bool(READERS.meta("parquet")["pad_28_to_32"])
    for i in range(len(batch["file"])):
        unit = {k: batch[k][i] for k in batch}
        u8 = parquet.decode_unit(root, data, unit)
        order = np.random.default_rng().permutation(len(u8))
        u8, idx, label = u8[order], np.asarray(unit["idx"], np.int64)[order], np.asarray(unit["label"], np.int64)[order]
        for s in range(0, len(u8), rows_per_block):
            sl = slice(s, s + rows_per_block)
            x = to_float_images(u8[sl], data.image_size, data.channels, pad_28_to_32=pad)
            yield {"image": x.numpy(), "label": label[sl], "idx": idx[sl]}


def _trial_rows(cfg: Any, n_train: int, n_test: int, n_expected: int) -> np.ndarray:
    """Which of the reader's training examples the trial trains on, in ``load_splits`` order."""
    from natra_ray.data.datasets import split_indices
    from natra_ray.workflow.upstream import UPSTREAM_SEED

    rows = split_indices(n_train, n_test, cfg.data, "train", UPSTREAM_SEED)
    if len(rows) != n_expected:
        raise RuntimeError(f"the stream has {len(rows)} training rows but the trial's split {n_expected}: "
                           f"{cfg.data.root} changed while the sweep ran")
    return rows


def image_folder_stream(cfg: Any, n_expected: int, rows_per_block: int = 512):
    """Rows ``{"image", "label", "idx"}`` of the trial's train split of a class-per-folder dataset,
    read with ``ray.data.read_images`` and resized as the in-process reader does, in Data tasks.
    ``idx`` (the row's position in ``load_splits(cfg)["train"]``) comes from the file's path."""
    import ray.data

    from natra_ray.data import image_folder

    _, train, test = image_folder.split_listings(cfg.data)
    rows = _trial_rows(cfg, len(train), len(test), n_expected)
    files = [str(train[r][0]) for r in rows]
    index = {f: (i, train[r][1]) for i, (f, r) in enumerate(zip(files, rows))}
    mode = "L" if cfg.data.channels == 1 else "RGB"
    read = ray.data.read_images(files, include_paths=True, mode=mode, num_cpus=cfg.tune.data_cpus,
                                override_num_blocks=max(1, len(files) // rows_per_block))
    fit = {"index": index, "image_size": cfg.data.image_size, "channels": cfg.data.channels}
    return read.randomize_block_order().map_batches(_fit_folder_images, fn_kwargs=fit, batch_format="numpy",
                                                    num_cpus=cfg.tune.data_cpus)


def _fit_folder_images(batch: Dict[str, np.ndarray], index: Dict[str, Any], image_size: int, channels: int):
    """map_batches: decoded files in, the models' input out, keyed by their path."""
    from PIL import Image

    from natra_ray.data.datasets import to_float_images
    from natra_ray.data.image_folder import fit_image

    u8 = np.stack([np.asarray(fit_image(Image.fromarray(np.asarray(x)), image_size)) for x in batch["image"]])
    u8 = u8[:, None] if u8.ndim == 3 else u8.transpose(0, 3, 1, 2)
    idx, label = zip(*(index[str(p)] for p in batch["path"]))
    return {"image": to_float_images(u8, image_size, channels).numpy(),
            "label": np.asarray(label, np.int64), "idx": np.asarray(idx, np.int64)}


def ingest_config():
    """Ray Train's ``DataConfig`` for the stream: Ray Data's defaults, stated without the
    deprecated ``exclude_resources`` option that Train's own default copies in (and warns about)."""
    import ray
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    ctx = ray.data.DataContext.get_current()
    return DataConfig(execution_options=ExecutionOptions(
        resource_limits=ctx.execution_options.resource_limits,
        preserve_order=ctx.execution_options.preserve_order,
        verbose_progress=ctx.execution_options.verbose_progress))


def to_ray_dataset(ds: ImageDataset, rows_per_block: int = 512, with_index: bool = False):
    """Rows ``{"image": float32 (C, H, W), "label": int64}`` (and ``"idx"``, the row's position, the
    key of per-example state) in the dataset's order, ``rows_per_block`` rows per Arrow block."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    images = ds.images.detach().cpu().numpy().astype(np.float32, copy=False)
    labels = ds.labels.detach().cpu().numpy().astype(np.int64, copy=False)
    blocks = []
    for start in range(0, max(len(ds), 1), rows_per_block):
        sl = slice(start, start + rows_per_block)
        cols = {"image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[sl])), "label": pa.array(labels[sl])}
        if with_index:
            cols["idx"] = pa.array(np.arange(len(ds), dtype=np.int64)[sl])
        blocks.append(pa.table(cols))
    return ray.data.from_arrow(blocks)
