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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from natra_ray.config import Config, ConfigError
from natra_ray.distributed import console
from natra_ray.distributed.resources import ResourceError  # noqa: F401  (callers catch it from here)
from natra_ray.distributed.resources import (NodeType, SweepPlan, cluster_node_types, cluster_yaml_path, fmt,
                                             live_node_types, max_trials, node_types_from_yaml, not_live_yet,
                                             sweep_plan, trial_bundles)
from natra_ray.distributed.results import SUMMARY_METRICS, pareto_front, pareto_png, summary_table
from natra_ray.search_space import SearchSpace, load_search_space
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.upstream import Upstream

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- resources
# The pure rules are distributed/resources.py's; these two name a one-node CPU cluster.
def trial_cpus(cfg: Config) -> float:
    return sum(b.resources.get("CPU", 0.0) * b.count for b in trial_bundles(cfg, gpu=False))


def max_concurrent(cfg: Config, cluster_cpus: float) -> int:
    """Trials that fit at once on ``cluster_cpus`` CPUs; a trial that can never fit is an error."""
    types = [NodeType("cluster", {"CPU": cluster_cpus}, 1)]
    sweep_plan(cfg, types, gpu=False)  # raises when one trial can never fit
    return cfg.tune.max_concurrent_trials or max_trials(trial_bundles(cfg, gpu=False), types, limit=1024)


def precheck_cluster(cfg: Config, nodes, num_samples: Optional[int] = None) -> SweepPlan:
    """The sweep's resource check: the live ``nodes`` (``ray.nodes()``) and what the autoscaler's
    node types can add, against every bundle the sweep asks for (``resources.sweep_plan``)."""
    from natra_ray.distributed.train import use_gpu

    return sweep_plan(cfg, cluster_node_types(cfg, nodes), use_gpu(cfg), num_samples)


def trial_process_resources(cfg: Config) -> Dict[str, float]:
    """What Tune reserves for the trial's own process: the first of its bundles (inline, the
    whole trial; else its driver, whose TorchTrainer asks for the workers' own)."""
    from natra_ray.distributed.train import use_gpu

    own = trial_bundles(cfg, use_gpu(cfg))[0].resources
    return {k: v for k, v in own.items() if v}


# --------------------------------------------------------------------------- the trial
def inline_fit(cfg: Config):
    """A ``workflow.trial.Fit`` that trains in the Tune trial's own process (``tune.inline``),
    reporting every epoch to Tune (so ASHA can stop it) as a TorchTrainer's callback would."""
    import ray.tune
    import torch

    from natra_ray.workflow.trial import in_process_fit

    def fit(tcfg: Config, inputs: Any, report: Any):
        torch.set_num_threads(max(1, int(tcfg.tune.cpus_per_worker)))

        def both(m: Mapping[str, Any]) -> None:
            report(m)
            ray.tune.report({k: v for k, v in m.items() if isinstance(v, (int, float))})
        return in_process_fit(tcfg, inputs, both)
    return fit


def trial_fn(params: Dict[str, Any], cfg: Config, space: SearchSpace, layout: StorageLayout, upstream: Upstream,
             tracking: Mapping[str, str]) -> None:
    """One Tune trial: the sampled config, then ``run_trial`` with a TorchTrainer fit (fed by the
    Ray Data stream), or the inline one (``tune.trainer``), and the trial's MLflow child run as its
    recorder."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from natra_ray.distributed.console import setup_worker
    from natra_ray.distributed.remote_stages import ray_encode, ray_score
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
        # A TorchTrainer trial's driver holds a fraction of a CPU: the splits' LCE and the evaluation
        # suite run as Ray tasks (with GPUs when the trial has them). An inline trial is its own
        # worker: it does both itself, in the CPUs it holds (tasks would wait for CPUs it holds).
        remote = not tcfg.tune.inline
        inputs = trial_inputs(tcfg, layout, upstream, load_splits(tcfg), **({"encode": ray_encode()} if remote else {}))
        fit = inline_fit(tcfg) if tcfg.tune.inline else ray_fit(layout.train_runs, f"train-{trial_id}",
                                                                 callbacks=[TuneReportCallback()])
        result = run_trial(tcfg, inputs, layout.trial(trial_id), fit, recorder, log_model=True,
                           **({"score": ray_score()} if remote else {}))
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
    declared = cluster_yaml_path(cfg)
    if declared:  # a bad cluster config fails before Ray starts
        node_types_from_yaml(declared)
    init_ray(cfg)
    check_shared(layout)  # every node must open what the head stores (the cache, checkpoints)
    plan = precheck_cluster(cfg, ray.nodes(), num_samples)
    concurrent = plan.concurrent
    log.info("%s", plan.describe())
    waiting = not_live_yet(plan.trial, live_node_types(ray.nodes()))
    if waiting:  # fine on an autoscaling cluster; without an autoscaler they would wait forever
        log.warning("no live node holds the %s yet: they start once the autoscaler adds one",
                    ", ".join(f"{b.name} ({fmt(b.resources)})" for b in waiting))
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

    splits = load_splits(cfg)  # the base config's, read once for both below
    try:
        kept: Optional[Dict[str, float]] = label_preservation(cfg, upstream, layout, splits)
        tracker.log_metrics({f"upstream_{k}": v for k, v in kept.items()})
    except Exception as e:  # noqa: BLE001
        log.warning("label preservation not measured: %s: %s", type(e).__name__, e)
        kept = None

    # the base config's latent codes of every split, once, with all of this process's threads:
    # otherwise the first trials (and the references) would each wait on the cache lock for them
    from natra_ray.workflow.trial import trial_inputs

    trial_inputs(cfg, layout, upstream, splits)

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
        {**trial_process_resources(cfg), **trial_resources(cfg)})
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


