"""Ray Tune + Optuna over NaTra's hyperparameters, every trial tracked in MLflow.

Flow of a sweep (``run_sweep``):
1. everything that can be wrong is checked before any compute: the search space, the
   tracking store, the cluster's resources;
2. the upstream stages (GAN, BIES + shift, directions) are computed once, cached by their
   config, outside the trials: a sweep over eps/rho/c never retrains the encoder; then the
   reference classifiers (``tune.references``: none, classic) at the trials' budget;
3. a ``Tuner`` runs ``trial_fn`` per sampled config (Optuna TPE or NSGA-II, ASHA): each
   trial is ``workflow.trial.run_trial`` with a ``TorchTrainer`` fit (``distributed/train.py``)
   fed by the Ray Data stream, and its MLflow child run as the recorder;
4. the best trial's classifier is registered; a summary table (the references beside the
   trials; the Pareto front in multi-objective mode) is written and logged to the parent run.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from natra_ray.config import Config, ConfigError
from natra_ray.distributed import console
from natra_ray.distributed.results import SUMMARY_METRICS, pareto_front, pareto_png, summary_table
from natra_ray.search_space import SearchSpace, load_search_space
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.upstream import Upstream

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- the trial
def trial_fn(params: Dict[str, Any], cfg: Config, space: SearchSpace, layout: StorageLayout, upstream: Upstream,
             tracking: Mapping[str, str]) -> None:
    """One Tune trial: the sampled config, then ``run_trial`` with a TorchTrainer fit (fed by the
    Ray Data stream) and the trial's MLflow child run as its recorder."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from natra_ray.distributed.console import setup_worker
    from natra_ray.distributed.tracking import TrialTracker
    from natra_ray.distributed.train import ray_fit
    from natra_ray.workflow.trial import run_trial, trial_inputs
    from natra_ray.workflow.upstream import load_splits

    setup_worker()
    sampled = space.select(params)
    tcfg = space.sample_config(cfg, sampled)
    trial_id = ray.tune.get_context().get_trial_id()
    logged = {**tcfg.flat(), **{f"sampled.{k}": v for k, v in sampled.items()}}
    with TrialTracker.from_spec(tracking, trial_id, logged, run_name=f"trial-{trial_id}") as recorder:
        inputs = trial_inputs(tcfg, layout, upstream, load_splits(tcfg))
        fit = ray_fit(layout.train_runs, f"train-{trial_id}", callbacks=[TuneReportCallback()])
        result = run_trial(tcfg, inputs, layout.trial(trial_id), fit, recorder, log_model=True)
    ray.tune.report({**result.metrics, "mlflow_run_id": recorder.run_id, "done": True})


@dataclass
class SweepOutcome:
    rows: List[Dict[str, Any]]
    best: Optional[Dict[str, Any]]
    table_path: Path
    parent_run_id: str
    tracking_uri: str
    # workflow.labels.label_preservation of the base config (None when it could not be measured)
    label_preservation: Optional[Dict[str, float]] = None


def run_sweep(cfg: Config, resume: bool = False, num_samples: Optional[int] = None) -> SweepOutcome:
    """The whole sweep; see the module docstring."""
    import ray

    from natra_ray.distributed.ray_init import init_ray
    from natra_ray.distributed.storage import check_shared
    from natra_ray.distributed.tracking import (SweepTracker, check_tracking, given_tracking_uri, recorded_parent_run,
                                                resolve_tracking_uri, save_parent_run)

    # 1. everything checkable, before any compute and before anything is written
    space = load_search_space(cfg.tune.search_space, cfg)
    uri = given_tracking_uri(cfg)
    layout = StorageLayout.from_config(cfg.tune.storage_path)
    sweep_dir = layout.sweep(cfg.tune.name)
    parent_id = None
    if resume:  # the parent run it reopens must be in this store (without --resume a new one starts)
        parent_id = recorded_parent_run(sweep_dir, resolve_tracking_uri(cfg), f"sweep {cfg.tune.name!r}",
                                        "start over in the new store without --resume, or with another tune.name")
    if uri:  # a given store must answer (the default SQLite file is created below)
        check_tracking(uri)
    init_ray(cfg)
    check_shared(layout)  # every node must open what the head stores (the cache, checkpoints)
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
        return _sweep(cfg, resume, num_samples, space, tracker, layout, concurrent, parent_id)
    except BaseException as e:  # Ctrl-C / SIGTERM / a crash: the parent run says so, then re-raise
        tracker.finish(console.end_status(e), reason=f"{type(e).__name__}: {e}"[:2000])
        raise


def _sweep(cfg: Config, resume: bool, num_samples: Optional[int], space: SearchSpace, tracker: Any,
           layout: StorageLayout, concurrent: int, parent_id: str) -> SweepOutcome:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    from natra_ray.distributed.console import tune_verbosity
    from natra_ray.distributed.tracking import open_ui_command, register_best
    from natra_ray.distributed.upstream import prepare_upstream
    from natra_ray.distributed.references import run_references
    from natra_ray.distributed.storage import trial_resources

    # 3. upstream once
    upstream = prepare_upstream(cfg, layout)
    tracker.log_metrics({f"upstream_{k}": v for k, v in upstream.metrics.items()})
    # how often the reconstructions and edits the trials train on keep their class, by a plainly
    # trained reference classifier (cached; a diagnostic, so a failure is a warning, not the sweep's end)
    from natra_ray.workflow.labels import label_preservation
    from natra_ray.workflow.upstream import load_splits

    try:
        kept: Optional[Dict[str, float]] = label_preservation(cfg, upstream, layout, load_splits(cfg))
        tracker.log_metrics({f"upstream_{k}": v for k, v in kept.items()})
    except Exception as e:  # noqa: BLE001
        log.warning("label preservation not measured: %s: %s", type(e).__name__, e)
        kept = None

    # the reference classifiers (none, classic) at the trials' budget, before the trials take the CPUs
    references = run_references(cfg, layout, upstream, tracker.trial_spec())

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
        tune.with_parameters(trial_fn, cfg=cfg, space=space, layout=layout, upstream=upstream,
                             tracking=tracker.trial_spec()),
        {"CPU": cfg.tune.driver_cpus, **trial_resources(cfg)})
    exp_path = layout.tune_experiment(cfg.tune.name)
    run_config = tune.RunConfig(name=cfg.tune.name, storage_path=str(layout.tune),
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
    sweep_dir = layout.sweep(cfg.tune.name)
    table_path = sweep_dir / "summary.md"
    rows += references  # beside the trials in the table; never a candidate for the best
    table_path.write_text(summary_table(rows, space, metrics))
    tracker.log_artifact(str(table_path))
    (sweep_dir / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
    if multi:
        front = pareto_front(done, metrics[:2], modes[:2])
        (sweep_dir / "pareto.md").write_text(summary_table(front, space, metrics))
        pareto_png(done, front, metrics[:2], sweep_dir / "pareto.png")
        tracker.log_artifact(str(sweep_dir / "pareto.md"))
        tracker.log_artifact(str(sweep_dir / "pareto.png"))
    if best is not None and best.get("mlflow_run_id"):
        version = register_best(tracker.uri, best["mlflow_run_id"], cfg.tracking.register_model)
        tracker.set_tags({"natra.best_run_id": best["mlflow_run_id"], "natra.registered_version": str(version)})
        tracker.log_metrics({f"best_{k}": v for k, v in best.items() if isinstance(v, (int, float))})
    tracker.finish("FINISHED")
    log.info("MLflow UI: %s", open_ui_command(tracker.uri))
    return SweepOutcome(rows, best, table_path, parent_id, tracker.uri, kept)


