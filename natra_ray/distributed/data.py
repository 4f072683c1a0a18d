"""Ray Data: the latent-augmented training stream.

A split becomes a dataset of rows {image, label, idx}; a stateful ``map_batches`` actor
(``LatentAugmenter``) holds the frozen generator, the split's cached latent codes and the
directions, and attaches to every batch a random natural transformation
``x_rand = dec(enc(x) + V r)``, r ~ N(0, eps^2) (what the "Random" baseline trains on). The classifier workers read their shard with
``iter_torch_batches``; the adversarial inner maximisation needs the *current* classifier,
so it stays in the worker (an actor cannot hold weights that change every step).

The split is cut into one block per batch: the actor streams block by block, so the first
batch reaches the worker after one decode rather than after the whole epoch's (bench/
bench_stream.py measured 28.6 s of idle worker per epoch with a single block), and the block
order is shuffled every epoch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from natra_ray.data import ImageDataset


class LatentAugmenter:
    """map_batches actor: one generator load per actor, reused for every batch."""

    def __init__(self, cfg_dict: Dict[str, Any], generator_path: str, directions_path: str, codes_path: str,
                 seed: int = 0) -> None:
        from natra_ray.config import from_dict
        from natra_ray.models.latent import Directions, resolve_layer_range
        from natra_ray.runtime import resolve_device
        from natra_ray.stages.gan import load_generator
        from natra_ray.stages.lce import LatentCodes

        torch.set_num_threads(1)
        self.cfg = from_dict(cfg_dict)
        self.device = resolve_device(self.cfg.device)
        self.G = load_generator(generator_path).to(self.device)
        self.dirs = Directions.load(directions_path)
        self.codes = LatentCodes.load(codes_path)
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


def training_stream(ds: ImageDataset, cfg_dict: Dict[str, Any], generator_path: Path, directions_path: Path,
                    codes_path: Path, batch_size: int, use_gpu: bool = False, num_cpus: float = 0.5):
    """rows {image, label, idx} in blocks of ``batch_size`` -> LatentAugmenter actor -> {..., x_rand}."""
    import ray

    from natra_ray.distributed.console import quiet_ray_data

    quiet_ray_data()  # one line per batch per operator floods job logs; the trial has its own bar
    n = len(ds)
    table = {"image": ds.images.numpy(), "label": ds.labels.numpy().astype(np.int64),
             "idx": np.arange(n, dtype=np.int64)}
    arrow = _to_arrow(table)
    blocks = [arrow.slice(i, batch_size) for i in range(0, n, batch_size)]
    return ray.data.from_arrow(blocks).randomize_block_order().map_batches(
        LatentAugmenter,
        fn_constructor_kwargs={"cfg_dict": cfg_dict, "generator_path": str(generator_path),
                               "directions_path": str(directions_path), "codes_path": str(codes_path)},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0 if use_gpu else num_cpus, num_gpus=1 if use_gpu else 0,
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


def _to_arrow(table: Dict[str, np.ndarray]):
    """Columns with per-row tensors as Arrow fixed-shape tensor arrays (what Ray Data reads)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({k: (ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v)) for k, v in table.items()})
