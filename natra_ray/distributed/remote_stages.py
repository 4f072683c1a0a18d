"""The trial's heavy stages as Ray tasks: LCE encoding of a split (sharded over its images) and
the evaluation suite (its independent parts side by side), each task with the resources a
Train worker gets (a GPU when ``tune.use_gpu``, else ``tune.cpus_per_worker`` CPUs), not in
the Tune trial driver's ``tune.driver_cpus``.

``ray_encode`` and ``ray_score`` are the ``workflow.upstream.Encode`` and ``workflow.trial.Score``
a trial hands to ``trial_inputs`` and ``run_trial``; each task calls the same Ray-free function
the in-process default calls (``encode_in_process`` on a shard, ``stages.evaluate.run_part``), so
the numbers are the in-process ones: shards start at whole encoder batches (whose seeds are
their positions in the split), and each part of the suite draws from its own seeded generator.
The files a task reads (generator, encoder, directions, codes) come by path, so they must be
on storage every node sees (``tune.storage_path``); images and weights go by the object store.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from natra_ray.config import Config
from natra_ray.data import ImageDataset

log = logging.getLogger(__name__)


def task_resources(cfg: Config) -> Dict[str, float]:
    """What one encoding or evaluation task asks Ray for: a Train worker's share."""
    from natra_ray.distributed.train import use_gpu

    return {"num_cpus": float(cfg.tune.cpus_per_worker), "num_gpus": 1.0 if use_gpu(cfg) else 0.0}


def _task_options(cfg: Config, name: str) -> Dict[str, Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Tune runs a trial inside its placement group (tune.driver_cpus) and captures the tasks it
    # starts into it, where a task asking for a GPU or a whole CPU would wait forever: these ask
    # the cluster (and its autoscaler) for their own resources instead.
    return {**task_resources(cfg), "name": name,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}


def _threads(cfg: Config) -> None:
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_worker)))


# --------------------------------------------------------------------------- encoding
def _encode_shard(cfg: Config, up: Any, images: torch.Tensor, n_codes: int, desc: str, first_batch: int):
    from natra_ray.distributed.console import setup_worker
    from natra_ray.workflow.upstream import encode_in_process

    setup_worker()
    _threads(cfg)
    return encode_in_process(cfg, up, images, n_codes, desc, first_batch=first_batch)


def ray_encode(shards: int = 0):
    """An ``Encode`` that inverts a split in ``shards`` Ray tasks (0: ``tune.train_workers``, the
    trial's GPUs), each aligned to ``RECON_IMAGES`` so the first holds the scored images."""
    def encode(cfg: Config, up: Any, images: torch.Tensor, n_codes: int, desc: str = "encoding"):
        import ray

        from natra_ray.stages import lce
        from natra_ray.workflow.upstream import RECON_IMAGES

        ranges = lce.shard_ranges(len(images), shards or cfg.tune.train_workers, RECON_IMAGES)
        task = ray.remote(_encode_shard).options(**_task_options(cfg, "natra-encode"))
        t0 = time.time()
        refs = [task.remote(cfg, up, images[a:b].contiguous(), n_codes, f"{desc} [{a}:{b}]", a // lce.ENCODE_BATCH)
                for a, b in ranges]
        parts = ray.get(refs)
        log.info("%s: %d images in %d shard(s), %.1f s", desc, len(images), len(parts), time.time() - t0)
        return lce.LatentCodes.concat(parts, seconds=time.time() - t0)
    return encode


# --------------------------------------------------------------------------- evaluation
def _score_part(cfg: Config, model_state: Mapping[str, torch.Tensor], num_classes: int, test: ImageDataset,
                up: Any, codes: Path, part: str) -> Tuple[Dict[str, float], Dict[str, bytes]]:
    """One part of the suite on this task's device; the files it wrote, as bytes (the driver
    writes them into the trial's folder: the task's node need not see it)."""
    from natra_ray.distributed.console import setup_worker
    from natra_ray.runtime import resolve_device
    from natra_ray.stages import evaluate
    from natra_ray.workflow.trial import classifier_from, scoring_source

    setup_worker()
    _threads(cfg)
    dev = resolve_device(cfg.device)
    model = classifier_from(cfg, num_classes, model_state, dev)
    src = scoring_source(cfg, up, codes, dev) if part in evaluate.LATENT_PARTS else None
    with tempfile.TemporaryDirectory(prefix="natra-eval-") as d:
        metrics = evaluate.run_part(cfg, model, test, src, part, Path(d))
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    return metrics, files


def ray_score(parts: Optional[List[str]] = None):
    """A ``Score`` that runs the evaluation suite's parts (``stages.evaluate.PARTS``) as parallel
    Ray tasks; the test split and the weights travel once, through the object store."""
    def score(cfg: Config, inputs: Any, model_state: Mapping[str, torch.Tensor], out_dir: Path) -> Dict[str, float]:
        import ray

        from natra_ray.stages import evaluate

        t0 = time.time()
        test_ref = ray.put(inputs.splits["test"])
        state_ref = ray.put({k: v.detach().cpu() for k, v in model_state.items()})
        task = ray.remote(_score_part).options(**_task_options(cfg, "natra-evaluate"))
        todo = parts or list(evaluate.PARTS)
        refs = [task.remote(cfg, state_ref, inputs.num_classes, test_ref, inputs.upstream, inputs.codes["test"], p)
                for p in todo]
        metrics: Dict[str, float] = {}
        for m, files in ray.get(refs):
            metrics.update(m)
            for name, data in files.items():
                (Path(out_dir) / name).write_bytes(data)
        metrics["eval_seconds"] = time.time() - t0
        return {f"test_{k}": v for k, v in metrics.items()}
    return score


__all__ = ["task_resources", "ray_encode", "ray_score"]
