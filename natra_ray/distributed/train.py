"""Ray Train for the classifier: the per-worker loop and the ``Fit`` that runs it.

Layers kept apart (Ray's train_tune_interop shape):
- ``robust_worker_loop`` runs on every worker, ends each epoch in
  ``ray.train.report(metrics, checkpoint=...)`` and resumes from ``ray.train.get_checkpoint()``
  after a worker failure (``FailureConfig``); what it trains is one typed ``RobustJob``;
- ``fit_robust`` builds ``TorchTrainer`` + ``ScalingConfig`` + ``RunConfig``;
- ``ray_fit`` is the ``workflow.trial.Fit`` the Tune trial hands to ``run_trial``.
The upstream stages' loops are in ``distributed/upstream.py``; the stages stay Ray-free.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

from natra_ray.config import Config

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
DIVERGED_FILE = "DIVERGED.txt"  # a worker whose loss became nan/inf writes the reason here


def use_gpu(cfg: Config) -> bool:
    """tune.use_gpu resolved: 'auto' means 'when CUDA is visible'."""
    return cfg.tune.use_gpu == "yes" or (cfg.tune.use_gpu == "auto" and torch.cuda.is_available())


def scaling_config(cfg: Config):
    from ray.train import ScalingConfig

    from natra_ray.distributed.storage import trial_resources

    gpu = use_gpu(cfg)
    return ScalingConfig(num_workers=cfg.tune.train_workers, use_gpu=gpu,
                         resources_per_worker={"CPU": cfg.tune.cpus_per_worker, **({"GPU": 1} if gpu else {}),
                                               **trial_resources(cfg)})


def report(metrics: Dict[str, Any], state: Optional[Dict[str, Any]] = None) -> None:
    """``ray.train.report(metrics)``, with ``state`` (rank 0's; None on the other ranks) as the
    checkpoint. The state is written to a temporary folder that report copies to the run's
    storage before it returns, and the folder goes when it does: a folder per report left in
    the worker's /tmp would fill a long GAN run's disk (7 MB every 100 steps at the cpu profile)."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="natra-ckpt-") as d:
        torch.save(state, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _load_state() -> Optional[Dict[str, Any]]:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def collective_device() -> torch.device:
    """Where this process group reduces: NCCL takes CUDA tensors only (this process's GPU),
    gloo takes CPU ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_budgets(eps: torch.Tensor, before: torch.Tensor) -> None:
    """Sum every worker's APT budget changes of this epoch into ``eps`` (in place; ``before``:
    the budgets when the epoch began). Each example is seen by exactly one worker per epoch, so
    the sum gives every worker the same state. The reduction runs on the process group's device
    (``collective_device``), whatever device the budgets live on."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    delta = (eps - before.to(eps.device)).to(collective_device())
    dist.all_reduce(delta)
    eps.copy_(before.to(eps.device) + delta.to(eps.device))


def stream_batch(b: Mapping[str, torch.Tensor], device: torch.device) -> Any:
    """A Ray Data batch as the training loop takes it: float images, int64 labels and example
    positions, all on ``device`` (the Train worker's), so the method never meets a batch on one
    device and a model or APT state on another."""
    from natra_ray.augment import Batch

    x_rand = b["x_rand"].to(device).float() if "x_rand" in b else None
    return Batch(b["image"].to(device).float(), b["label"].to(device).long(), b["idx"].to(device).long(),
                 x_rand=x_rand)


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
@dataclass(frozen=True)
class RobustJob:
    """What every classifier worker trains: the trial's config and the files it reads (never the
    images themselves: each worker loads its splits from the config)."""

    cfg: Config
    generator_path: Path
    directions_path: Path
    codes: Mapping[str, Path]  # split -> codes.pt
    extra: Mapping[str, Path]  # the method's extra models ("vae" / "cvae")
    stream: bool  # the training batches come as a Ray Data shard
    diverged_file: Path
    title: str

    @classmethod
    def of(cls, cfg: Config, inputs: Any, storage_path: Path, run_name: str, stream: bool) -> "RobustJob":
        """The job of ``workflow.trial.TrialInputs`` ``inputs`` as Train run ``run_name``."""
        up = inputs.upstream
        return cls(cfg, Path(up.generator_path), Path(up.directions_path), dict(inputs.codes), dict(inputs.extra),
                   stream, diverged_file(storage_path, run_name), f"{run_name} ({cfg.robust.epochs} epochs)")

    def upstream(self):
        from natra_ray.workflow.upstream import Upstream

        return Upstream(self.generator_path, Path(), self.directions_path, {}, {})


def robust_worker_loop(config: Dict[str, Any]) -> None:
    """One classifier, data-parallel over the workers; the training split's latent-augmented
    batches arrive as this worker's Ray Data shard (or from memory when data_stream is off)."""
    import ray.train
    import ray.train.torch

    from natra_ray import progress
    from natra_ray.augment import Batch, method_needs
    from natra_ray.distributed.console import setup_worker
    from natra_ray.stages import robust
    from natra_ray.stages.lce import LatentCodes
    from natra_ray.workflow.trial import eval_source, latent_source
    from natra_ray.data import load_dataset
    from natra_ray.workflow.upstream import UPSTREAM_SEED, load_extra_models

    setup_worker()
    job: RobustJob = config["job"]
    cfg = job.cfg
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    device = ray.train.torch.get_device()
    # Only what this worker reads: the train and val splits (the test split is the trial driver's),
    # and the codes memory-mapped, so only the rows of the examples it visits are read.
    splits = {k: load_dataset(cfg.data, k, seed=UPSTREAM_SEED) for k in ("train", "val")}
    codes = {k: LatentCodes.load(job.codes[k], mmap=True) for k in ("train", "val")}
    latent = latent_source(cfg, job.upstream(), codes["train"], device) if method_needs(cfg.robust.method).latent else None
    # the fixed evaluation attack, not robust.*; on this worker's device (``cuda`` alone can name
    # another worker's GPU when Ray Train shows a node's GPUs to all its workers)
    val_latent = eval_source(cfg, job.upstream(), codes["val"], device)
    extra = load_extra_models(job.extra, device)  # e.g. the VAE of vae_mixup
    train = splits["train"]
    steps = len(train) // cfg.robust.batch_size
    state = robust.make_state(cfg, len(train.class_names), steps, device)
    saved = _load_state()
    resumed_from = None
    if saved is not None:  # a restarted worker group (FailureConfig): continue after the last epoch
        state.load_state_dict(saved, latent)
        resumed_from = state.epoch
        log.info("rank %d resumed from epoch %d", rank, state.epoch)
    state.model = ray.train.torch.prepare_model(state.model)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank * 7 + state.epoch)
    per_worker = cfg.robust.batch_size // world

    shard = ray.train.get_dataset_shard("train") if job.stream else None
    # One bar per trial over all its epochs' batches (so its ETA covers the whole training).
    pbar = progress.bar((cfg.robust.epochs - state.epoch) * steps, job.title, unit="batch", enabled=rank == 0)

    def stream_batches():
        for b in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device):
            pbar.update(1)
            yield stream_batch(b, device)

    # This rank's examples, fixed for the whole run (every world-th one): it reads only their rows
    # of the codes. Each epoch visits them in a new seeded order, ``steps`` batches of
    # ``per_worker`` on every rank (one process: the whole split, as before).
    shard_rows = torch.arange(rank, len(train), world)

    def memory_batches():
        perm = shard_rows[torch.randperm(len(shard_rows), generator=torch.Generator().manual_seed(cfg.seed + state.epoch))]
        for i in range(0, steps * per_worker, per_worker):
            idx = perm[i:i + per_worker]
            pbar.update(1)
            yield Batch(train.images[idx], train.labels[idx], idx)

    while state.epoch < cfg.robust.epochs:
        eps_before = latent.eps.clone() if latent is not None else None
        try:
            m = robust.train_epoch(cfg, state, train, latent, gen,
                                   stream_batches if shard is not None else memory_batches, extra=extra)
        except FloatingPointError as e:
            # A diverged loss is not a lost worker: retrying it (FailureConfig) would only burn
            # the budget again. Leave the reason where the driver looks (run storage) and end
            # this worker cleanly; ``raise_if_diverged`` fails the trial with it. (Reporting it
            # as a metric would trip Tune's check that every result carries the sweep metric.)
            job.diverged_file.parent.mkdir(parents=True, exist_ok=True)
            job.diverged_file.write_text(f"rank {rank}: {e}")
            return
        if latent is not None and world > 1:
            all_reduce_budgets(latent.eps, eps_before)
        m.update(robust.val_metrics(cfg, state.bare, splits["val"], val_latent))
        m["worker_peak_rss_mb"] = peak_rss_mb()  # rank 0's; every rank holds the same-sized shard
        if resumed_from is not None:  # the history shows where a lost worker picked up
            m["resumed_from_epoch"], resumed_from = float(resumed_from), None
        state.history.append(m)
        report(m, state.state_dict(latent) if rank == 0 else None)
    pbar.close()


def fit_robust(job: RobustJob, run_name: str, storage_path: Path, callbacks: Optional[List[Any]] = None,
               datasets: Optional[Dict[str, Any]] = None):
    """Build and run the classifier's TorchTrainer; returns the Ray Train ``Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from natra_ray.distributed.console import train_logging_config
    from natra_ray.distributed.data import ingest_config

    cfg = job.cfg
    trainer = TorchTrainer(
        robust_worker_loop,
        train_loop_config={"job": job},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=run_name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks or [], logging_config=train_logging_config()),
        datasets=datasets or {},
        dataset_config=ingest_config(),
    )
    return trainer.fit()


def ray_fit(storage_path: Path, run_name: str, callbacks: Optional[List[Any]] = None):
    """A ``workflow.trial.Fit`` that trains in a TorchTrainer named ``run_name`` (``tune.train_workers``
    workers), fed by the Ray Data latent stream when ``tune.data_stream`` is on."""
    def fit(cfg: Config, inputs: Any, report: Any):
        from natra_ray.distributed.data import training_stream
        from natra_ray.workflow.trial import Fitted

        job = RobustJob.of(cfg, inputs, storage_path, run_name, stream=cfg.tune.data_stream)
        datasets = {"train": training_stream(inputs.splits["train"], job, use_gpu=use_gpu(cfg))} if job.stream else None
        result = fit_robust(job, run_name, storage_path, callbacks=callbacks, datasets=datasets)
        if result.error is not None:
            raise result.error
        raise_if_diverged(storage_path, run_name)
        state = load_result_state(result)
        for m in state["history"]:
            report(m)
        return Fitted(state["model"], state["history"])
    return fit


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def diverged_file(storage_path: Path, run_name: str) -> Path:
    return Path(storage_path) / run_name / DIVERGED_FILE


def raise_if_diverged(storage_path: Path, run_name: str) -> None:
    """Turn a worker's divergence note into the FloatingPointError it caught."""
    f = diverged_file(storage_path, run_name)
    if f.exists():
        raise FloatingPointError(f.read_text().strip() or "the training loss became nan/inf")


def load_result_state(result) -> Dict[str, Any]:
    """The final training state (model weights, history, APT budgets) from a Result."""
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


__all__ = ["RobustJob", "robust_worker_loop", "stream_batch", "all_reduce_budgets", "collective_device", "fit_robust", "ray_fit", "load_result_state", "raise_if_diverged",
           "scaling_config", "use_gpu"]
