"""Ray Train: the per-worker loops and the drivers that build ``TorchTrainer`` jobs.

Layers kept apart (Ray's train_tune_interop shape):
- ``robust_worker_loop`` / ``gan_worker_loop`` run on every worker, end each epoch (or
  chunk of steps) in ``ray.train.report(metrics, checkpoint=...)``, and resume from
  ``ray.train.get_checkpoint()`` after a worker failure (``FailureConfig``);
- ``fit_robust`` / ``fit_gan`` build ``TorchTrainer`` + ``ScalingConfig`` + ``RunConfig``;
- the Tuner (``distributed/tune.py``) calls the drivers from its trial function.
The stages they call stay Ray-free.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from natra_ray.config import Config, from_dict

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def use_gpu(cfg: Config) -> bool:
    """tune.use_gpu resolved: 'auto' means 'when CUDA is visible'."""
    return cfg.tune.use_gpu == "yes" or (cfg.tune.use_gpu == "auto" and torch.cuda.is_available())


def scaling_config(cfg: Config):
    from ray.train import ScalingConfig

    gpu = use_gpu(cfg)
    return ScalingConfig(num_workers=cfg.tune.train_workers, use_gpu=gpu,
                         resources_per_worker={"CPU": cfg.tune.cpus_per_worker, **({"GPU": 1} if gpu else {})})


def _save_state(state: Dict[str, Any]):
    from ray.train import Checkpoint

    d = tempfile.mkdtemp(prefix="natra-ckpt-")
    torch.save(state, Path(d) / STATE_FILE)
    return Checkpoint.from_directory(d)


def _load_state() -> Optional[Dict[str, Any]]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def _all_reduce_grads(module: torch.nn.Module) -> None:
    """Average gradients over workers (data-parallel by hand: the GAN's D and G steps toggle
    requires_grad and R1 uses double backward, which DDP's reducer does not support)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


# --------------------------------------------------------------------------- robust classifier
def robust_worker_loop(config: Dict[str, Any]) -> None:
    """One classifier, data-parallel over the workers; the training split's latent-augmented
    batches arrive as this worker's Ray Data shard (or from memory when data_stream is off)."""
    import ray.train
    import ray.train.torch

    from natra_ray.augment import Batch, needs_latent
    from natra_ray.stages import pipeline, robust

    cfg = from_dict(config["cfg"])
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    device = ray.train.torch.get_device()
    splits = pipeline.load_splits(cfg)
    up = pipeline.Upstream(Path(config["generator_path"]), Path(config["encoder_path"]),
                           Path(config["directions_path"]), {}, {})
    codes = {k: pipeline.lce.LatentCodes.load(p) for k, p in config["codes_paths"].items()}
    latent = pipeline.latent_source(cfg, up, codes["train"], cfg.robust.eps) if needs_latent(cfg.robust.method) else None
    if latent is not None:
        latent.G.to(device)
    val_latent = pipeline.latent_source(cfg, up, codes["val"], cfg.robust.eps)
    extra = pipeline.load_method_extra(config.get("extra_paths", {}), device)  # e.g. the VAE of vae_mixup
    train = splits["train"]
    steps = len(train) // cfg.robust.batch_size
    state = robust.make_state(cfg, len(train.class_names), steps, device)
    saved = _load_state()
    if saved is not None:
        state.load_state_dict(saved, latent)
        log.info("rank %d resumed from epoch %d", rank, state.epoch)
    state.model = ray.train.torch.prepare_model(state.model)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank * 7 + state.epoch)
    per_worker = cfg.robust.batch_size // world

    shard = ray.train.get_dataset_shard("train") if config.get("stream") else None

    def stream_batches():
        for b in shard.iter_torch_batches(batch_size=per_worker, drop_last=True):
            yield Batch(b["image"].float(), b["label"].long(), b["idx"].long(), x_rand=b["x_rand"].float())

    def memory_batches():
        # The same seeded permutation on every rank, each taking its stride: DistributedSampler.
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + state.epoch))
        usable = (len(perm) // cfg.robust.batch_size) * cfg.robust.batch_size
        for i in range(0, usable, cfg.robust.batch_size):
            idx = perm[i:i + cfg.robust.batch_size][rank::world]
            yield Batch(train.images[idx], train.labels[idx], idx)

    while state.epoch < cfg.robust.epochs:
        eps_before = latent.eps.clone() if latent is not None else None
        m = robust.train_epoch(cfg, state, train, latent, gen, stream_batches if shard is not None else memory_batches,
                               extra=extra)
        if latent is not None and world > 1:
            # Each example is seen by exactly one worker per epoch: summing the budget changes
            # gives every worker the same APT state.
            delta = latent.eps - eps_before
            dist.all_reduce(delta)
            latent.eps.copy_(eps_before + delta)
        m.update(robust.validate(cfg, state.bare, splits["val"], val_latent))
        state.history.append(m)
        ckpt = _save_state(state.state_dict(latent)) if rank == 0 else None
        ray.train.report(m, checkpoint=ckpt)


def fit_robust(cfg: Config, run_name: str, storage_path: Path, upstream_paths: Dict[str, Any],
               callbacks: Optional[List[Any]] = None, datasets: Optional[Dict[str, Any]] = None):
    """Build and run the classifier's TorchTrainer; returns the Ray Train ``Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    loop_config = {"cfg": cfg.to_dict(), **upstream_paths, "stream": bool(datasets)}
    trainer = TorchTrainer(
        robust_worker_loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=run_name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks or []),
        datasets=datasets or {},
    )
    return trainer.fit()


def load_result_state(result) -> Dict[str, Any]:
    """The final training state (model weights, history, APT budgets) from a Result."""
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- GAN
def gan_worker_loop(config: Dict[str, Any]) -> None:
    """Data-parallel GAN pretraining: each worker a shard of every batch, gradients averaged."""
    import ray.train
    import ray.train.torch

    from natra_ray.stages import gan, pipeline

    cfg = from_dict(config["cfg"])
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    tr = gan.GanTrainer(cfg, ray.train.torch.get_device(), grad_sync=_all_reduce_grads)
    saved = _load_state()
    if saved is not None:
        tr.load_state_dict(saved)
    data = pipeline.load_splits(cfg)["train"]
    gen = torch.Generator().manual_seed(cfg.seed + tr.step)
    every = max(1, int(config.get("report_every", 100)))
    while tr.step < cfg.gan.steps:
        idx = torch.randint(len(data), (cfg.gan.batch_size,), generator=gen)[rank::world]
        m = tr.train_step(data.images[idx])
        if tr.step % every == 0 or tr.step == cfg.gan.steps:
            ray.train.report({**m, "step": tr.step}, checkpoint=_save_state(tr.state_dict()) if rank == 0 else None)


def fit_gan(cfg: Config, run_name: str, storage_path: Path, report_every: int = 100):
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        gan_worker_loop,
        train_loop_config={"cfg": cfg.to_dict(), "report_every": report_every},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=run_name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=cfg.tune.max_failures)),
    )
    return trainer.fit()


__all__ = ["robust_worker_loop", "fit_robust", "gan_worker_loop", "fit_gan", "load_result_state", "scaling_config"]
