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
order is shuffled every epoch.
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
