"""Ray Train for the upstream stages (GAN pretraining, BIES), and the driver that computes the
upstream once per config before any trial starts.

The GAN and BIES train as TorchTrainer jobs (workers, checkpoints, FailureConfig), each run named
by its cache key under ``train_runs/``: interrupted (Ctrl-C, a lost driver), the next call
continues it from its last checkpoint (the GAN's every ``report_every`` steps, BIES's after the
encoder phase); once the stage's cache entry is stored its run is removed. The cache lookups and
grids are the stage code's (``workflow.upstream``), run in the driver, which also computes the
directions (a PCA / UMAP fit, no training).
"""
from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict

import torch

from natra_ray.config import Config
from natra_ray.distributed.train import _all_reduce_grads, _load_state, load_result_state, report, use_gpu
from natra_ray.workflow.layout import StorageLayout

log = logging.getLogger(__name__)


def prepare_upstream(cfg: Config, layout: StorageLayout, gan_report_every: int = 100):
    """``workflow.upstream.prepare_upstream`` with the GAN and BIES trained on Ray Train, with a
    whole node's threads for the driver's own share (the directions)."""
    import ray

    from natra_ray.workflow.upstream import load_splits
    from natra_ray.workflow.upstream import prepare_upstream as prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(node_threads())
    try:
        train = load_splits(cfg)["train"]
        up = prepare(cfg, layout, train, gan_fit=gan_fit(layout.train_runs, ray.put(train), report_every=gan_report_every),
                     bies_fit=bies_fit(layout.train_runs))
        remove_stored_upstream_runs(layout.train_runs, up.entries)
    finally:
        torch.set_num_threads(threads)
    return up


def upstream_scaling_config(cfg: Config, node_types):
    """GAN / BIES workers: nothing else runs before the trials, so by default each takes a
    whole host node's CPUs (at most 8; a GPU node's when they train on GPUs) with one torch
    thread per CPU (``resources.upstream_bundle``; ``node_types``: the cluster's)."""
    from ray.train import ScalingConfig

    from natra_ray.distributed.resources import upstream_bundle

    gpu = use_gpu(cfg)
    bundle = upstream_bundle(cfg, gpu, node_types)
    return ScalingConfig(num_workers=bundle.count, use_gpu=gpu,
                         resources_per_worker={k: v for k, v in bundle.resources.items() if v > 0})


def _worker_setup(config: Dict[str, Any]):
    """Common to the upstream worker loops: config, logging, threads, rank/world, device."""
    import ray.train
    import ray.train.torch

    from natra_ray.distributed.console import setup_worker

    setup_worker()
    cfg: Config = config["cfg"]
    torch.set_num_threads(max(1, int(config["threads"])))
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    return cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def largest_node_cpus() -> float:
    """CPUs of the biggest live node of the connected Ray cluster (1 if none reports any)."""
    import ray

    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)


def node_threads() -> int:
    """Torch threads for work that has a whole node to itself: its CPUs, at most 8."""
    return int(max(1, min(8, largest_node_cpus())))


def upstream_run_name(cfg: Config, stage: str) -> str:
    """The Ray Train run of upstream ``stage`` ("gan" / "bies"): named exactly like the stage's
    cache entry (``gan-<key>``; the key hashes the config the stage depends on). Ray Train restores
    a run from the checkpoints under its name, so a stage interrupted before its entry was
    stored continues from its last checkpoint when asked for the same entry again."""
    from natra_ray import cache
    from natra_ray.workflow.upstream import upstream_keys

    return cache.entry_dir(".", stage, upstream_keys(cfg)[stage]).name


def last_checkpoint(storage_path: Path, run_name: str):
    """The latest checkpoint run ``run_name`` registered (a ``ray.train.Result``: ``.checkpoint``,
    ``.metrics``), or None if it has none. A run folder Ray could not restore from (its snapshot
    unreadable, or naming checkpoints that are gone) is removed: the stage starts afresh instead
    of failing on every rerun."""
    from ray.train import Result

    run = Path(storage_path) / run_name
    if not run.is_dir():
        return None
    try:
        result = Result.from_path(run)
    except Exception as e:  # no snapshot (killed before the first checkpoint), or a damaged one
        log.warning("no usable checkpoint in %s (%s: %s); starting that stage afresh", run, type(e).__name__, e)
        shutil.rmtree(run, ignore_errors=True)
        return None
    return result if result.checkpoint is not None else None


def remove_stored_upstream_runs(storage_path: Path, entries: Dict[str, Path]) -> None:
    """Delete the Train runs of upstream stages whose cache entry is complete. The entry holds the
    result, and a GAN run's checkpoint (G, D, the EMA copy, both Adam states) is several times the
    generator's size; while the entry is missing the run is kept, to be resumed."""
    from natra_ray import cache

    for stage in ("gan", "bies"):
        entry = entries.get(stage)
        if entry is None or not cache.is_complete(Path(entry)):
            continue
        storage = Path(storage_path)
        # Runs named after a producer's private temp dir (``gan-.gan-<key>.<random>``) are never
        # resumed by any name: removed with the entry's own run.
        for run in [storage / Path(entry).name, *storage.glob(f"{stage}-.{Path(entry).name}.*")]:
            if run.is_dir():
                shutil.rmtree(run, ignore_errors=True)
                log.info("removed %s (its result is in %s)", run, entry)


def _run_upstream_trainer(loop, cfg: Config, run_name: str, storage_path: Path, loop_config: Dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from natra_ray.distributed.console import train_logging_config

    import ray

    from natra_ray.distributed.resources import cluster_node_types

    scaling = upstream_scaling_config(cfg, cluster_node_types(cfg, ray.nodes()))
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg, "threads": int(scaling.resources_per_worker["CPU"]), **loop_config},
        scaling_config=scaling,
        run_config=RunConfig(name=run_name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             logging_config=train_logging_config()),
    )
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        result = trainer.fit()
    except SystemExit as e:
        # Ray's Ctrl-C handler aborts the run, then exits with status 0; the job must see the
        # interrupt as one (its runs are marked KILLED, the exit status is not success).
        raise KeyboardInterrupt(f"{run_name} interrupted; its checkpoints are kept in {storage_path}") from e
    finally:
        # fit() leaves Ray's handler installed, bound to this run's (now gone) controller: a later
        # Ctrl-C would be turned into a clean exit instead of an interrupt.
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    if result.error is not None:
        raise result.error
    return result


def gan_worker_loop(config: Dict[str, Any]) -> None:
    """Data-parallel GAN pretraining (the stage's GanTrainer, gradients all-reduced): every
    worker draws the same seeded batch and takes its stride. Rank 0 writes the sample grids;
    a checkpoint every ``report_every`` steps is what a restarted worker resumes from."""
    import ray
    import ray.train

    from natra_ray import progress
    from natra_ray.stages import gan
    from natra_ray.viz import save_grid

    cfg, rank, world, device = _worker_setup(config)
    tr = gan.GanTrainer(cfg, device, grad_sync=_all_reduce_grads)
    saved = _load_state()
    if saved is not None:
        tr.load_state_dict(saved)
        log.info("GAN worker %d resumed at step %d", rank, tr.step)
    # Same initial weights everywhere (seeded above), but each worker's fakes must differ:
    # the global RNG (latents, style mixing) is reseeded per rank.
    torch.manual_seed(cfg.seed * 1000 + 1 + rank + tr.step)
    data = ray.get(config["data"])
    out_dir = Path(config["out_dir"])
    z_fixed = gan.fixed_z(cfg, tr.G.z_dim)
    g = cfg.gan
    every = max(1, int(config.get("report_every", 100)))
    t0, seen0 = time.time(), tr.images_seen
    pbar = progress.bar(g.steps - tr.step, f"GAN steps {tr.step}-{g.steps}" if tr.step else "GAN steps",
                        unit="step", enabled=rank == 0)
    while tr.step < g.steps:
        # Seeded by the step: a resumed worker continues the same batch sequence.
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + tr.step)
        idx = torch.randint(len(data), (g.batch_size,), generator=gen)[rank::world]
        m = tr.train_step(data.images[idx])
        pbar.update(1)
        gan.check_finite(m, tr.step, out_dir)
        if rank == 0 and g.sample_every and tr.step % g.sample_every == 0:
            save_grid(tr.samples(z_fixed), out_dir / "samples" / f"step_{tr.step:06d}.png", nrow=8)
            log.info("gan step %d/%d %s (%.0f s)", tr.step, g.steps,
                     " ".join(f"{k}={v:.3f}" for k, v in m.items()), time.time() - t0)
        if tr.step % every == 0 or tr.step == g.steps:
            rate = (tr.images_seen - seen0) * world / max(time.time() - t0, 1e-9)
            report({**m, "step": tr.step, "images_per_s": rate}, tr.state_dict() if rank == 0 else None)
    pbar.close()


def gan_fit(storage_path: Path, data_ref: Any, report_every: int = 100):
    """A ``stages.gan.Fit`` that trains in a TorchTrainer (``upstream_workers`` workers), as the
    run ``upstream_run_name(cfg, "gan")``: an interrupted GAN continues from its last checkpoint
    (at most ``report_every`` steps are redone; the sample grids written before the interrupt
    went with the cache's temporary folder, ``final.png`` is always written)."""
    def for_config(cfg: Config):
        def fit(out_dir: Path):
            from natra_ray.stages import gan

            t0 = time.time()
            name = upstream_run_name(cfg, "gan")
            prior = last_checkpoint(storage_path, name)
            if prior is not None:
                log.info("GAN resumes from step %d of %d (checkpoint %s)", int(prior.metrics.get("step", 0)),
                         cfg.gan.steps, prior.checkpoint.path)
            result = _run_upstream_trainer(gan_worker_loop, cfg, name, storage_path,
                                           {"data": data_ref, "out_dir": str(out_dir), "report_every": report_every})
            state = load_result_state(result)
            if int(state["step"]) != cfg.gan.steps:  # never store an unfinished GAN as the entry
                raise RuntimeError(f"GAN run {name} ended at step {state['step']} of {cfg.gan.steps}")
            tr = gan.GanTrainer(cfg, torch.device("cpu"))
            tr.load_state_dict(state)
            last = {f"gan_{k}": float(v) for k, v in (result.metrics or {}).items()
                    if k in ("d_loss", "g_loss", "r1", "gp", "images_per_s")}
            return tr, {**last, "gan_seconds": time.time() - t0}
        return fit
    return for_config


def bies_worker_loop(config: Dict[str, Any]) -> None:
    """BIES data-parallel: the stage's train_encoder then shift_generator, each worker on its
    shard of every batch with gradients all-reduced. A checkpoint after each phase: a worker
    lost while shifting does not retrain the encoder."""
    import ray
    import ray.train

    from natra_ray.losses import Perceptual
    from natra_ray.stages import bies

    cfg, rank, world, device = _worker_setup(config)
    saved = _load_state() or {}
    if "generator_shifted" in saved:  # a finished run whose cache entry was not stored: nothing to redo
        return
    G = ray.get(config["generator"]).to(device)
    train = ray.get(config["data"])
    perceptual = Perceptual.from_config(cfg.encoder).to(device) if cfg.encoder.gamma2 > 0 else None
    times = dict(saved.get("times", {}))
    if "encoder" in saved:
        log.info("BIES worker %d resumed after the encoder phase", rank)
        E = bies.build_encoder(cfg, G).to(device)
        E.load_state_dict(saved["encoder"])
        E.eval().requires_grad_(False)
    else:
        t0 = time.time()
        E = bies.train_encoder(cfg, G, train, perceptual=perceptual, grad_sync=_all_reduce_grads, shard=(rank, world))
        times["bies_encoder_seconds"] = time.time() - t0
        state = {"encoder": E.state_dict(), "times": times}
        report({"phase": 1, **times}, state if rank == 0 else None)
    t0 = time.time()
    Gs = bies.shift_generator(cfg, G, E, train, perceptual=perceptual, grad_sync=_all_reduce_grads, shard=(rank, world))
    times["bies_shift_seconds"] = time.time() - t0
    state = {"encoder": E.state_dict(), "generator_shifted": Gs.state_dict(), "times": times}
    report({"phase": 2, **times}, state if rank == 0 else None)


def bies_fit(storage_path: Path):
    """A ``stages.bies.Fit`` that trains in a TorchTrainer (``upstream_workers`` workers), as the
    run ``upstream_run_name(cfg, "bies")``: interrupted while shifting, it does not retrain the
    encoder. ``G`` must be the generator of ``cfg``'s GAN entry (the BIES key covers the GAN's),
    as ``workflow.upstream.prepare_upstream`` passes it."""
    import ray

    def for_config(cfg: Config):
        def fit(G, train):
            import copy

            from natra_ray.stages import bies

            G_cpu = copy.deepcopy(G).cpu()
            name = upstream_run_name(cfg, "bies")
            prior = last_checkpoint(storage_path, name)
            if prior is not None:
                done = "the shift (the run had finished)" if prior.metrics.get("phase") == 2 else "the encoder phase"
                log.info("BIES resumes after %s (checkpoint %s)", done, prior.checkpoint.path)
            result = _run_upstream_trainer(bies_worker_loop, cfg, name, storage_path,
                                           {"data": ray.put(train), "generator": ray.put(G_cpu)})
            state = load_result_state(result)
            if "generator_shifted" not in state:  # never store an encoder without its shifted generator
                raise RuntimeError(f"BIES run {name} ended before shifting the generator")
            E = bies.build_encoder(cfg, G_cpu)
            E.load_state_dict(state["encoder"])
            Gs = copy.deepcopy(G_cpu)
            Gs.load_state_dict(state["generator_shifted"])
            return E, Gs, {k: float(v) for k, v in state["times"].items()}
        return fit
    return for_config


__all__ = ["prepare_upstream", "gan_worker_loop", "gan_fit", "bies_worker_loop", "bies_fit", "largest_node_cpus",
           "last_checkpoint", "node_threads", "remove_stored_upstream_runs", "upstream_run_name",
           "upstream_scaling_config"]
