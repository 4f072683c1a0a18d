"""Ray Tune + Optuna over NaTra's hyperparameters, every trial tracked in MLflow.

Flow of a sweep (``run_sweep``):
1. everything that can be wrong is checked before any compute: the search space, the
   tracking store, the cluster's resources;
2. the upstream stages (GAN, BIES + shift, directions) are computed once, cached by their
   config, outside the trials: a sweep over eps/rho/c never retrains the encoder;
3. a ``Tuner`` runs ``trial_fn`` per sampled config (Optuna TPE or NSGA-II, ASHA): each
   trial builds a ``TorchTrainer`` for the classifier (``distributed/train.py``), fed by the
   Ray Data latent stream, and ends with the evaluation suite and an MLflow child run;
4. the best trial's classifier is registered; a summary table (and the Pareto front in
   multi-objective mode) is written and logged to the parent run.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from natra_ray.config import Config, ConfigError, from_dict
from natra_ray.distributed import console
from natra_ray.search_space import SearchSpace, load_search_space

log = logging.getLogger(__name__)

CODES_SPLITS = ("train", "val", "test")


class ResourceError(ConfigError):
    """The requested trial shape can never fit the cluster."""


# --------------------------------------------------------------------------- resources
def trial_cpus(cfg: Config) -> float:
    t = cfg.tune
    return t.driver_cpus + t.train_workers * t.cpus_per_worker + (t.data_cpus if t.data_stream else 0.0)


def max_concurrent(cfg: Config, cluster_cpus: float, autoscaling: bool = False) -> int:
    """Trials that fit at once; a trial that can never fit is an error before anything starts."""
    need = trial_cpus(cfg)
    if need > cluster_cpus + 1e-9 and not autoscaling:
        raise ResourceError(
            f"one trial needs {need:g} CPUs (driver {cfg.tune.driver_cpus:g} + {cfg.tune.train_workers} Train "
            f"workers x {cfg.tune.cpus_per_worker} + Data {cfg.tune.data_cpus:g}) but the cluster has "
            f"{cluster_cpus:g}; lower tune.train_workers / tune.cpus_per_worker or add nodes")
    if cfg.tune.max_concurrent_trials > 0:
        return cfg.tune.max_concurrent_trials
    return max(1, int(math.floor(cluster_cpus / need + 1e-9)))


# --------------------------------------------------------------------------- upstream
def prepare_upstream(cfg: Config, root: Path, gan_report_every: int = 100) -> Dict[str, Any]:
    """GAN / BIES / directions, each computed once per upstream config (the stage cache).

    The GAN and BIES train as TorchTrainer jobs (``distributed/train.py``: workers, checkpoints,
    FailureConfig), each run named by its cache key under ``train_runs/``: interrupted (Ctrl-C,
    a lost driver), the next call continues it from its last checkpoint (the GAN's every
    ``gan_report_every`` steps, BIES's after the encoder phase); once the stage's entry is stored
    its run is removed. The cache lookups and grids are the stage code's, run here in the driver,
    which also computes the directions (a PCA / UMAP fit, no training)."""
    import ray

    from natra_ray.distributed.train import bies_fit, gan_fit, node_threads, remove_stored_upstream_runs
    from natra_ray.stages import pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(node_threads())
    try:
        train = pipeline.load_splits(cfg)["train"]
        storage = Path(root) / "train_runs"
        up = pipeline.prepare_upstream(cfg, Path(root), train,
                                       gan_fit=gan_fit(storage, ray.put(train), report_every=gan_report_every),
                                       bies_fit=bies_fit(storage))
        remove_stored_upstream_runs(storage, up.dirs)
    finally:
        torch.set_num_threads(threads)
    return {"generator_path": str(up.generator_path), "encoder_path": str(up.encoder_path),
            "directions_path": str(up.directions_path),
            "dirs": {k: str(v) for k, v in up.dirs.items()}, "metrics": up.metrics}


# --------------------------------------------------------------------------- the trial
def trial_fn(params: Dict[str, Any], base: Dict[str, Any], space_dict: Dict[str, Any], root: str,
             upstream: Dict[str, Any], tracking: Dict[str, Any]) -> None:
    """One Tune trial: sampled config -> codes -> TorchTrainer -> evaluation -> MLflow."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from natra_ray.data.datasets import dataset_card, input_spec, load_dataset
    from natra_ray.distributed import data as rdata
    from natra_ray.distributed.tracking import TrialTracker
    from natra_ray.augment.latent import lce_codes_for
    from natra_ray.distributed.console import setup_worker
    from natra_ray.distributed.train import fit_robust, load_result_state, raise_if_diverged, use_gpu
    from natra_ray.search_space import search_space_from_dict
    from natra_ray.stages import evaluate, pipeline, robust

    setup_worker()
    base_cfg = from_dict(base)
    space = search_space_from_dict(space_dict, base_cfg, name=space_dict.get("name", "sweep"))
    cfg = space.sample_config(base_cfg, space.select(params))
    trial_id = ray.tune.get_context().get_trial_id()
    tracker = TrialTracker(**tracking, trial_id=trial_id, run_name=f"trial-{trial_id}")
    tracker.start()
    tracker.log_params({**cfg.flat(), **{f"sampled.{k}": v for k, v in space.select(params).items()}})
    # Which cache entries hold this trial's generator, encoder and directions (the explorer's
    # --run-id follows these to the files).
    tracker.set_tags({f"natra.upstream.{k}": Path(v).name for k, v in (upstream.get("dirs") or {}).items()})
    try:
        rootp = Path(root)
        splits = pipeline.load_splits(cfg)
        tracker.log_dataset(dataset_card(cfg.data, splits))
        up = pipeline.Upstream(Path(upstream["generator_path"]), Path(upstream["encoder_path"]),
                               Path(upstream["directions_path"]), {}, {})
        n_codes = lce_codes_for(cfg.robust.method, cfg.encoder.lce_codes)
        # One cache lookup per split: the paths go to the workers, the test codes are loaded here.
        code_paths = {k: str(pipeline.codes_path(cfg, up, rootp, k, splits[k], n_codes)) for k in CODES_SPLITS}
        test_codes = pipeline.lce.LatentCodes.load(code_paths["test"])
        paths = {"generator_path": str(up.generator_path), "encoder_path": str(up.encoder_path),
                 "directions_path": str(up.directions_path), "codes_paths": code_paths,
                 "extra_paths": {k: str(v) for k, v in pipeline.method_extra_paths(cfg, rootp, splits["train"]).items()}}
        datasets = None
        if cfg.tune.data_stream:
            datasets = {"train": rdata.training_stream(splits["train"], cfg.to_dict(), up.generator_path,
                                                       up.directions_path, Path(code_paths["train"]),
                                                       batch_size=cfg.robust.batch_size,
                                                       use_gpu=use_gpu(cfg), num_cpus=cfg.tune.data_cpus)}
        run_name = f"train-{trial_id}"
        result = fit_robust(cfg, run_name, rootp / "train_runs", paths,
                            callbacks=[TuneReportCallback()], datasets=datasets)
        if result.error is not None:
            raise result.error
        raise_if_diverged(rootp / "train_runs", run_name)
        state = load_result_state(result)
        for epoch_metrics in state["history"]:
            tracker.log_metrics({k: v for k, v in epoch_metrics.items() if k != "epoch"}, step=int(epoch_metrics["epoch"]))
        model = robust.build_classifier(cfg, len(splits["train"].class_names))
        model.load_state_dict(state["model"])
        model.eval()
        out = rootp / "trials" / trial_id
        out.mkdir(parents=True, exist_ok=True)
        test_src = pipeline.latent_source(cfg, up, test_codes.subset(slice(0, cfg.eval.max_examples)), cfg.robust.eps)
        metrics = evaluate.run(cfg, model, splits["test"], test_src, out)
        clf_path = robust.save_classifier(out / "classifier.pt", model, cfg, len(splits["train"].class_names),
                                          extra={"history": state["history"], "trial_id": trial_id})
        final = {**state["history"][-1], **metrics}
        tracker.log_metrics({k: v for k, v in final.items() if k != "epoch"}, step=int(final["epoch"]))
        tracker.log_artifact(str(clf_path))
        for d in (upstream.get("dirs") or {}).values():
            for png in sorted(Path(d).rglob("*.png"))[:12]:
                tracker.log_artifact(str(png), artifact_path=f"upstream/{Path(d).name}")
        for png in out.glob("*.png"):
            tracker.log_artifact(str(png))
        # the logged model takes the dataset's own images (its test images as read) and pads them itself
        native = load_dataset(cfg.data, "test", seed=pipeline.UPSTREAM_SEED, native=True).images[:4]
        tracker.log_classifier(model, native.numpy(), input_spec(cfg.data))
        tracker.end("FINISHED")
        ray.tune.report({**final, "mlflow_run_id": tracker.run_id, "done": True})
    except BaseException as e:  # the reason must reach MLflow before the trial dies
        tracker.end("FAILED", reason=f"{type(e).__name__}: {e}"[:5000])
        raise


# --------------------------------------------------------------------------- results
def pareto_front(rows: List[Dict[str, Any]], metrics: List[str], modes: List[str]) -> List[Dict[str, Any]]:
    """Non-dominated rows (all objectives turned into maximisation)."""
    def vec(r):
        return [r[m] if mode == "max" else -r[m] for m, mode in zip(metrics, modes)]

    valid = [r for r in rows if all(isinstance(r.get(m), (int, float)) for m in metrics)]
    front = []
    for r in valid:
        v = vec(r)
        dominated = any(all(a >= b for a, b in zip(vec(o), v)) and any(a > b for a, b in zip(vec(o), v))
                        for o in valid if o is not r)
        if not dominated:
            front.append(r)
    return front


def pareto_png(rows: List[Dict[str, Any]], front: List[Dict[str, Any]], metrics: List[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [r[metrics[0]] for r in rows if metrics[0] in r and metrics[1] in r]
    ys = [r[metrics[1]] for r in rows if metrics[0] in r and metrics[1] in r]
    ax.scatter(xs, ys, c="lightgray", label="trials")
    f = sorted(front, key=lambda r: r[metrics[0]])
    ax.plot([r[metrics[0]] for r in f], [r[metrics[1]] for r in f], "o-", c="C3", label="Pareto front")
    ax.set_xlabel(metrics[0])
    ax.set_ylabel(metrics[1])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class SweepOutcome:
    rows: List[Dict[str, Any]]
    best: Optional[Dict[str, Any]]
    table_path: Path
    parent_run_id: str
    tracking_uri: str


def _init_ray(cfg: Config) -> None:
    """Join the cluster a job was submitted to, or start a local one (dashboard on loopback:
    Train-in-Tune needs it, and exposing it is a deliberate act, see the README)."""
    import os

    import ray

    if ray.is_initialized():
        return
    from natra_ray.distributed.console import worker_env

    if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`, or by the user ("auto")
        # The cluster's workers do not inherit this process's environment: the console settings
        # travel in the job's runtime env.
        env = worker_env()
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                     runtime_env={"env_vars": env} if env else None)
        except ValueError:  # the submitted job sets one of them itself: its own value stands
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # address="local": a fresh local instance. Without it ray.init() would try to join
        # whatever cluster /tmp/ray/ray_current_cluster names, even a dead one (hangs).
        from natra_ray.cli import bind_host

        ray.init(address="local", include_dashboard=True,
                 dashboard_host=bind_host(cfg.tune.dashboard_host, "the Ray dashboard"),
                 log_to_driver=True, configure_logging=False)
    console.reclaim_signals()


def run_sweep(cfg: Config, resume: bool = False, num_samples: Optional[int] = None) -> SweepOutcome:
    """The whole sweep; see the module docstring."""
    import ray

    from natra_ray.cli import storage_root
    from natra_ray.distributed.tracking import (SweepTracker, check_tracking, given_tracking_uri, recorded_parent_run,
                                                resolve_tracking_uri, save_parent_run)

    # 1. everything checkable, before any compute and before anything is written
    space = load_search_space(cfg.tune.search_space, cfg)
    uri = given_tracking_uri(cfg)
    root = storage_root(cfg)
    sweep_dir = root / "sweeps" / cfg.tune.name
    parent_id = None
    if resume:  # the parent run it reopens must be in this store (without --resume a new one starts)
        parent_id = recorded_parent_run(sweep_dir, resolve_tracking_uri(cfg), f"sweep {cfg.tune.name!r}",
                                        "start over in the new store without --resume, or with another tune.name")
    if uri:  # a given store must answer (the default SQLite file is created below)
        check_tracking(uri)
    _init_ray(cfg)
    total_cpus = float(ray.cluster_resources().get("CPU", 0))
    concurrent = max_concurrent(cfg, total_cpus)
    log.info("cluster: %g CPUs; each trial needs %g -> %d concurrent trial(s)", total_cpus, trial_cpus(cfg), concurrent)
    tracker = SweepTracker.from_config(cfg, check=not uri)
    sweep_dir.mkdir(parents=True, exist_ok=True)

    # 2. MLflow parent run (reopened on --resume so children stay under one parent)
    parent_id = tracker.start_parent(f"sweep-{cfg.tune.name}", params=cfg.flat(),
                                     tags={"natra.search_space": space.name, "natra.profile": cfg.profile},
                                     parent_run_id=parent_id)
    save_parent_run(sweep_dir, tracker.uri, parent_id)

    try:
        return _sweep(cfg, resume, num_samples, space, tracker, root, sweep_dir, concurrent, parent_id)
    except BaseException as e:  # Ctrl-C / SIGTERM / a crash: the parent run says so, then re-raise
        tracker.finish(console.end_status(e), reason=f"{type(e).__name__}: {e}"[:2000])
        raise


def _sweep(cfg: Config, resume: bool, num_samples: Optional[int], space: SearchSpace, tracker: Any,
           root: Path, sweep_dir: Path, concurrent: int, parent_id: str) -> SweepOutcome:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    from natra_ray.distributed.console import tune_verbosity
    from natra_ray.distributed.tracking import open_ui_command, register_best

    # 3. upstream once
    upstream = prepare_upstream(cfg, root)
    tracker.log_parent_metrics({f"upstream_{k}": v for k, v in upstream["metrics"].items()})

    # 4. the Tuner over the trial driver
    metrics, modes = space.metrics, space.modes
    sampler = {"tpe": optuna.samplers.TPESampler(seed=cfg.seed),
               "nsga2": optuna.samplers.NSGAIISampler(seed=cfg.seed),
               "random": optuna.samplers.RandomSampler(seed=cfg.seed)}[cfg.tune.sampler]
    multi = space.multi_objective or cfg.tune.multi_objective
    if multi and len(metrics) < 2:
        raise ConfigError("tune.multi_objective needs a search space with two 'objectives' (e.g. search_spaces/multi_objective.yaml)")
    search = OptunaSearch(space=space.define_by_run, metric=metrics if multi else metrics[0],
                          mode=modes if multi else modes[0], sampler=sampler, seed=cfg.seed)
    # ASHA stops weak trials after their first epochs (single objective only: it ranks by one metric).
    scheduler = None if multi or cfg.tune.scheduler == "none" else ASHAScheduler(time_attr="training_iteration", grace_period=cfg.tune.asha_grace_period,
                                                 max_t=cfg.robust.epochs + 1, reduction_factor=2)
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base=cfg.to_dict(), space_dict=space.to_dict(), root=str(root),
                             upstream=upstream, tracking=tracker.trial_spec()),
        {"CPU": cfg.tune.driver_cpus})
    tune_dir = root / "tune"
    exp_path = tune_dir / cfg.tune.name
    run_config = tune.RunConfig(name=cfg.tune.name, storage_path=str(tune_dir),
                                failure_config=tune.FailureConfig(max_failures=0), verbose=tune_verbosity())
    # Tune's per-trial result box lists these (not the 50 metrics each trial reports).
    trainable._progress_metrics = list(dict.fromkeys([*metrics, *SUMMARY_METRICS]))
    if resume and tune.Tuner.can_restore(str(exp_path)):
        log.info("resuming the sweep at %s (finished trials are kept, unfinished ones restart)", exp_path)
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        if resume:  # --resume is safe to pass always: with nothing to continue it starts fresh
            log.warning("nothing to resume: %s holds no Tune experiment yet; the sweep starts fresh "
                        "(finished upstream stages are reused from the cache)", exp_path)
        if exp_path.exists() and not resume:
            shutil.rmtree(exp_path)  # a fresh sweep of the same name starts clean
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler,
                                        num_samples=num_samples or cfg.tune.num_samples,
                                        max_concurrent_trials=concurrent,
                                        **({} if multi else {"metric": metrics[0], "mode": modes[0]})),
            run_config=run_config,
        )
    grid = tuner.fit()

    # 5. results: table, best model, Pareto front
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        m["trial_id"] = m.get("trial_id") or (r.path.rsplit("_", 2)[0] if r.path else "?")
        # DONE = reached its final report (evaluation + MLflow model); STOPPED = cut by ASHA.
        m["status"] = "ERROR" if r.error else ("DONE" if m.get("mlflow_run_id") else "STOPPED")
        if r.error:
            m["error"] = str(r.error).splitlines()[0][:200]
        m.update({k: v for k, v in (r.config or {}).items() if k in space.params})
        rows.append(m)
    done = [r for r in rows if r["status"] == "DONE"]
    for r in rows:  # early-stopped trials: their child runs end KILLED with the reason
        if r["status"] == "STOPPED" and r.get("trial_id"):
            t = tracker.trial_tracker(str(r["trial_id"]), run_name=f"trial-{r['trial_id']}")
            t.start()
            t.end("KILLED", reason="stopped early by the ASHA scheduler (below its rung's cut-off)")
    key, mode = metrics[0], modes[0]
    best = max(done, key=lambda r: r.get(key, -1e9) if mode == "max" else -r.get(key, 1e9)) if done else None
    table_path = sweep_dir / "summary.md"
    table_path.write_text(summary_table(rows, space, metrics))
    tracker.log_parent_artifact(str(table_path))
    (sweep_dir / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
    if multi:
        front = pareto_front(done, metrics[:2], modes[:2])
        (sweep_dir / "pareto.md").write_text(summary_table(front, space, metrics))
        pareto_png(done, front, metrics[:2], sweep_dir / "pareto.png")
        tracker.log_parent_artifact(str(sweep_dir / "pareto.md"))
        tracker.log_parent_artifact(str(sweep_dir / "pareto.png"))
    if best is not None and best.get("mlflow_run_id"):
        version = register_best(tracker.uri, best["mlflow_run_id"], cfg.tracking.register_model)
        tracker.set_tags({"natra.best_run_id": best["mlflow_run_id"], "natra.registered_version": str(version)})
        tracker.log_parent_metrics({f"best_{k}": v for k, v in best.items() if isinstance(v, (int, float))})
    tracker.finish("FINISHED")
    log.info("MLflow UI: %s", open_ui_command(tracker.uri))
    return SweepOutcome(rows, best, table_path, parent_id, tracker.uri)


SUMMARY_METRICS = ("val_acc", "val_natural_acc", "test_clean_acc", "test_natural_acc",
                   "test_corruption_mean_acc", "test_pixel_pgd_acc", "test_deepfool_score")


def summary_table(rows: List[Dict[str, Any]], space: SearchSpace, metrics: List[str]) -> str:
    cols = list(dict.fromkeys([*metrics, *SUMMARY_METRICS]))
    params = space.param_names()
    key = metrics[0]
    rows = sorted(rows, key=lambda r: r.get(key) if isinstance(r.get(key), (int, float)) else -1e9, reverse=True)
    head = "| trial | status | " + " | ".join(cols + params) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols) + len(params))]

    def f(v):
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    for r in rows:
        lines.append(f"| {r.get('trial_id', '?')} | {r.get('status', '?')} | "
                     + " | ".join(f(r.get(c)) for c in cols + params) + " |")
    return "\n".join(lines) + "\n"
