"""The benchmark on Ray: every augmentation method x seed, trained on the same data, classifier
and budget, scored by the evaluation suite, reported with mean ± std and tracked in MLflow.

Flow of ``run_benchmark``:
1. checks first: method names against the registry, the tracking store, and - when resuming -
   that the finished runs on disk were made with this same setup;
2. one Ray task (a whole node's CPUs) fills the shared stage cache: the upstream (GAN, BIES +
   shift, directions; the sweep's cache entries, so free when the main job already ran this
   profile), the latent codes of the benchmark's splits and the models some methods need (VAE,
   CVAE) - so the fan-out never has two tasks waiting on one cache lock;
3. one Ray task per method x seed (``benchmark.cpus_per_task`` CPUs and as many torch threads:
   2 at once on a 2-core machine) running the single-process trial (``workflow.trial.run_trial`` with the in-process fit),
   each with its MLflow child run under one parent;
4. each finished run writes ``<storage>/benchmarks/<name>/results/<method>-s<seed>.json``
   atomically; a rerun skips those (resume), and its MLflow child run, found by its trial tag,
   is reused rather than duplicated;
5. the report (``distributed/results.py``: Markdown table, reference rows, PNG chart) is
   written and logged to the parent run with per-method mean/std metrics.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from natra_ray.cache import content_key
from natra_ray.config import Config, ConfigError
from natra_ray.distributed import console
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.upstream import RETIRED_KEYS, Upstream

log = logging.getLogger(__name__)

EXPERIMENT = "natra-benchmark"  # MLflow experiment unless tracking.experiment names one
RESULT_VERSION = 1
# Config keys that may differ between a benchmark's runs (or between its invocations) without
# changing what is measured: they are left out of the setup key and of the parent's params.
_NOT_SETUP = ("seed", "device", "robust.method", "benchmark.methods", "benchmark.seeds",
              "benchmark.name", "benchmark.cpus_per_task", "benchmark.gpus_per_task")
_NOT_SETUP_SECTIONS = ("tune.", "tracking.")


@dataclass(frozen=True)
class BenchRun:
    """One method x seed: a Ray task, a result file and an MLflow child run."""

    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"


# --------------------------------------------------------------------------- pure pieces
def resolve_methods(requested: Optional[Sequence[str]], cfg: Config) -> List[str]:
    """``requested``, else ``benchmark.methods``, else every registered method; unknown names fail
    with the list of registered ones."""
    from natra_ray.augment import list_methods

    known = list_methods()
    methods = list(requested or cfg.benchmark.methods or known)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown augmentation method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods listed twice: {', '.join(sorted({m for m in methods if methods.count(m) > 1}))}")
    return methods


def resolve_seeds(requested: Optional[Sequence[int]], cfg: Config) -> List[int]:
    seeds = list(requested if requested else cfg.benchmark.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be distinct non-negative integers; got {seeds}")
    return seeds


def bench_config(cfg: Config) -> Config:
    """The profile's config with the benchmark budget applied to the classifier runs."""
    b, over = cfg.benchmark, {}
    if b.epochs:
        over["robust.epochs"] = b.epochs
    if b.eval_examples:
        over["eval.max_examples"] = b.eval_examples
    return cfg.replace(**over) if over else cfg


def run_config(cfg: Config, run: BenchRun) -> Config:
    return cfg.replace(**{"robust.method": run.method, "seed": run.seed})


def setup_params(cfg: Config) -> Dict[str, Any]:
    """The flat config of what is measured (no seed/method/resources/tracking)."""
    return {k: v for k, v in cfg.flat().items()
            if k not in _NOT_SETUP and not k.startswith(_NOT_SETUP_SECTIONS)}


# Keys added after results were first stored, with the value that computes what those results
# did: left out of the key at that value, so the results made before the key existed resume.
ADDED_KEYS = {"robust.precision": "fp32"}


def setup_key(cfg: Config) -> str:
    # With the retired keys' one value, as the cache keys do: results made before their removal resume.
    params = {k: v for k, v in setup_params(cfg).items() if k not in ADDED_KEYS or ADDED_KEYS[k] != v}
    return content_key({**params, **RETIRED_KEYS})


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write-then-rename: a killed writer never leaves a half-written result that a resume trusts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


def load_result(p: Path, key: str) -> Optional[Dict[str, Any]]:
    """The finished result in ``p``, or ``None``; a result of another setup is an error."""
    if not p.is_file():
        return None
    try:
        r = json.loads(p.read_text())
    except json.JSONDecodeError:
        log.warning("ignoring unreadable result %s (it will be recomputed)", p)
        return None
    if r.get("setup_key") != key:
        raise ConfigError(f"benchmark results in {p.parent.parent} were made with another setup (key {r.get('setup_key')} "
                          f"!= {key}: the config changed); use another benchmark.name / --name, or --fresh to start over")
    return r


def bench_splits(cfg: Config) -> Dict[str, Any]:
    """The profile's splits with the benchmark's train/val subsets (the first N: the splits are
    drawn from one seeded shuffle, so a prefix is a random subset)."""
    from natra_ray.workflow.upstream import load_splits

    splits = load_splits(cfg)
    b = cfg.benchmark
    if b.train_examples and b.train_examples < len(splits["train"]):
        splits["train"] = splits["train"].subset(slice(0, b.train_examples))
    if b.val_examples and b.val_examples < len(splits["val"]):
        splits["val"] = splits["val"].subset(slice(0, b.val_examples))
    return splits


# --------------------------------------------------------------------------- Ray tasks
def prepare_caches(cfg: Config, layout: StorageLayout, methods: List[str], threads: int) -> Tuple[Upstream, Dict[str, Any]]:
    """Everything the runs share, each computed once into the stage cache: the upstream (GAN,
    BIES + shift, directions: the same cache entries the sweep uses), the codes of the
    benchmark's splits for every LCE setting the methods use, and each method's extra model
    (VAE, CVAE). Returns the upstream and the facts of the setup for the report."""
    import torch

    from natra_ray.runtime import setup_logging
    from natra_ray.stages import robust
    from natra_ray.workflow.trial import trial_inputs
    from natra_ray.workflow.upstream import extra_model_paths, load_splits, prepare_upstream

    setup_logging()
    torch.set_num_threads(threads)
    full_train = load_splits(cfg)["train"]
    up = prepare_upstream(cfg, layout, full_train)
    splits = bench_splits(cfg)
    for m in methods:  # each distinct set of codes / extra model is made once, the rest are cache hits
        mcfg = cfg.replace(**{"robust.method": m})
        extra_model_paths(mcfg, layout, full_train)  # their keys cover the full training data: train on it
        trial_inputs(mcfg, layout, up, splits)
    clf = robust.build_classifier(cfg, len(splits["train"].class_names))
    return up, {"train_images": len(splits["train"]), "val_images": len(splits["val"]),
                "test_images": len(splits["test"]), "classifier_params": sum(p.numel() for p in clf.parameters())}


def run_one(base: Config, run: BenchRun, layout: StorageLayout, upstream: Upstream, tracking: Mapping[str, str],
            threads: int) -> Dict[str, Any]:
    """One method x seed: ``run_trial`` in this process, its MLflow child run, its result file."""
    import torch

    from natra_ray.distributed.tracking import TrialTracker
    from natra_ray.runtime import seed_everything, setup_logging
    from natra_ray.workflow.trial import in_process_fit, run_trial, trial_inputs

    setup_logging()
    torch.set_num_threads(threads)
    cfg, key, name = run_config(base, run), setup_key(base), base.benchmark.name
    t0, c0 = time.time(), time.process_time()
    with TrialTracker.from_spec(tracking, run.name, cfg.flat(), run_name=run.name) as recorder:
        recorder.set_tags({"natra.method": run.method, "natra.seed": run.seed, "natra.setup_key": key})
        seed_everything(run.seed)  # the classifier's initial weights; batches come from robust's own generator
        inputs = trial_inputs(cfg, layout, upstream, bench_splits(cfg))
        result = run_trial(cfg, inputs, layout.benchmark_run(name, run.name), in_process_fit, recorder)
        # CPU seconds of this process (all its threads): wall time on a shared machine says little
        metrics = {**result.metrics, "task_cpu_seconds": time.process_time() - c0}
        recorder.log_metrics(metrics, step=cfg.robust.epochs)
        out = {"version": RESULT_VERSION, "method": run.method, "seed": run.seed, "run": run.name, "setup_key": key,
               "status": "DONE", "metrics": metrics, "classifier_path": str(result.classifier_path),
               "mlflow_run_id": recorder.run_id, "task_seconds": time.time() - t0, "finished_at": time.time()}
        write_json_atomic(layout.benchmark_result(name, run.name), out)
    return out


# --------------------------------------------------------------------------- the driver
@dataclass
class BenchmarkOutcome:
    rows: List[Dict[str, Any]]  # finished runs (this invocation's and earlier ones)
    failed: List[Dict[str, Any]]
    skipped: List[str]  # runs found finished on disk
    report_path: Path
    chart_path: Path
    parent_run_id: str
    tracking_uri: str
    setup: Dict[str, Any] = field(default_factory=dict)


def _tracking_cfg(cfg: Config) -> Config:
    return cfg if cfg.tracking.experiment.strip() else cfg.replace(**{"tracking.experiment": EXPERIMENT})


def run_benchmark(cfg: Config, methods: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
                  resume: bool = True) -> BenchmarkOutcome:
    """The whole benchmark; see the module docstring."""
    from natra_ray.distributed.tracking import SweepTracker, recorded_parent_run, resolve_tracking_uri, save_parent_run

    # 1. checks, before any compute
    methods, seeds = resolve_methods(methods, cfg), resolve_seeds(seeds, cfg)
    bcfg = bench_config(cfg)
    key = setup_key(bcfg)
    layout = StorageLayout.from_config(cfg.tune.storage_path)
    bench_dir = layout.benchmark(cfg.benchmark.name)
    if not resume and bench_dir.exists():
        log.info("--fresh: removing the earlier results of benchmark %r (%s)", cfg.benchmark.name, bench_dir)
        shutil.rmtree(bench_dir)
    tcfg = _tracking_cfg(cfg)
    parent_id = recorded_parent_run(bench_dir, resolve_tracking_uri(tcfg), f"benchmark {cfg.benchmark.name!r}",
                                    f"start over in the new store with another --name, or with --fresh (which "
                                    f"deletes the finished results in {bench_dir})")
    bench_dir.mkdir(parents=True, exist_ok=True)
    key_file = bench_dir / "setup_key"
    if key_file.exists() and key_file.read_text().strip() != key:
        raise ConfigError(f"benchmark {cfg.benchmark.name!r} in {bench_dir} was started with another setup (the config "
                          f"changed); use another --name, or --fresh to start it over")
    key_file.write_text(key)
    runs = [BenchRun(m, s) for s in seeds for m in methods]  # seed-major: a whole first seed comes first
    done = {r.name: res for r in runs
            if (res := load_result(layout.benchmark_result(cfg.benchmark.name, r.name), key)) is not None}
    pending = [r for r in runs if r.name not in done]
    tracker = SweepTracker.from_config(tcfg)
    parent_id = tracker.start_parent(f"benchmark-{cfg.benchmark.name}", params=setup_params(bcfg),
                                     tags={"natra.role": "benchmark", "natra.profile": cfg.profile,
                                           "natra.setup_key": key, "natra.methods": ",".join(methods),
                                           "natra.seeds": ",".join(map(str, seeds))},
                                     parent_run_id=parent_id)
    save_parent_run(bench_dir, tracker.uri, parent_id)
    log.info("benchmark %r: %d methods x %d seeds = %d runs; %d finished earlier, %d to run",
             cfg.benchmark.name, len(methods), len(seeds), len(runs), len(done), len(pending))
    try:
        return _run(bcfg, methods, seeds, runs, done, pending, key, layout, tracker, parent_id)
    except BaseException as e:  # Ctrl-C / SIGTERM / a crash: the parent run says so
        tracker.finish(console.end_status(e), reason=f"{type(e).__name__}: {e}"[:2000])
        raise


def _run(cfg: Config, methods: List[str], seeds: List[int], runs: List[BenchRun], done: Dict[str, Dict[str, Any]],
         pending: List[BenchRun], key: str, layout: StorageLayout, tracker: Any, parent_id: str) -> BenchmarkOutcome:
    import ray

    from natra_ray.distributed.ray_init import init_ray
    from natra_ray.distributed.upstream import node_threads

    b = cfg.benchmark
    bench_dir = layout.benchmark(b.name)
    facts_file = bench_dir / "setup.json"
    facts: Dict[str, Any] = json.loads(facts_file.read_text()) if facts_file.exists() else {}
    failed: List[Dict[str, Any]] = []
    if pending or not facts:  # else every run is finished: only the report is rewritten, no Ray
        init_ray(cfg)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
        if b.cpus_per_task > cluster_cpus + 1e-9:
            raise ConfigError(f"benchmark.cpus_per_task={b.cpus_per_task:g} but the cluster has {cluster_cpus:g} CPUs; "
                              f"lower it")
        # 2. the shared cache (upstream, codes, extra models) in one task with a whole node's CPUs
        t0 = time.time()
        threads = node_threads()
        prep = ray.remote(num_cpus=threads, num_gpus=b.gpus_per_task, max_retries=0)(prepare_caches)
        upstream, facts = ray.get(prep.remote(cfg, layout, methods, threads))
        write_json_atomic(facts_file, facts)
        tracker.log_metrics({f"upstream_{k}": v for k, v in upstream.metrics.items()})
        log.info("upstream and caches ready in %.0f s", time.time() - t0)
        # 3. fan out: one task per pending method x seed
        task = ray.remote(num_cpus=b.cpus_per_task, num_gpus=b.gpus_per_task, max_retries=0)(run_one)
        threads = int(max(1, b.cpus_per_task))
        spec = tracker.trial_spec()
        refs = {task.remote(cfg, r, layout, upstream, spec, threads): r for r in pending}
        try:
            failed = _gather(refs, done, len(runs))
        except BaseException:
            for ref in refs:
                ray.cancel(ref)
            raise
    # 4. report, from every finished result on disk (this run's and earlier ones)
    from natra_ray.distributed import results

    rows = [done[r.name] for r in runs if r.name in done]
    setup = {"name": b.name, "profile": cfg.profile, "dataset": cfg.data.dataset, **facts,
             "eval_examples": min(cfg.eval.max_examples, facts.get("test_images", cfg.eval.max_examples)),
             "epochs": cfg.robust.epochs, "batch_size": cfg.robust.batch_size, "lr": cfg.robust.lr,
             "momentum": cfg.robust.momentum, "classifier": f"{cfg.robust.classifier} (width {cfg.robust.classifier_width})",
             "mixup_alpha": cfg.robust.mixup_alpha, "image_size": cfg.data.image_size,
             "deepfool_steps": cfg.eval.deepfool_steps, "w_dim": cfg.gan.w_dim, "lce_codes": cfg.encoder.lce_codes,
             "seeds": seeds, "methods": methods, "setup_key": key}
    missing = [r.name for r in runs if r.name not in done and all(f["run"] != r.name for f in failed)]
    md, png = results.write_report(rows, setup, bench_dir, failed, missing)
    write_json_atomic(bench_dir / "results.json", {"setup": setup, "rows": rows, "failed": failed})
    agg = results.aggregate(rows)
    tracker.log_metrics({f"{m}/{k}_{stat}": v for m, a in agg.items() for k, s in a.items()
                                for stat, v in (("mean", s[0]), ("std", s[1])) if v == v})
    for p in (md, png, bench_dir / "results.json"):
        tracker.log_artifact(str(p))
    tracker.finish("FINISHED" if not failed and not missing else "FAILED",
                   reason=None if not failed else f"{len(failed)} run(s) failed: " + ", ".join(f["run"] for f in failed))
    return BenchmarkOutcome(rows, failed, [r.name for r in runs if r.name in done and r not in pending],
                            md, png, parent_id, tracker.uri, setup)


def _gather(refs: Dict[Any, BenchRun], done: Dict[str, Dict[str, Any]], total: int) -> List[Dict[str, Any]]:
    """Wait for the tasks as they finish; a failed run is recorded (and retried by the next
    invocation), the others go on."""
    import ray

    failed: List[Dict[str, Any]] = []
    left = list(refs)
    while left:
        ready, left = ray.wait(left, num_returns=1)
        run = refs[ready[0]]
        try:
            res = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - RayTaskError wraps whatever the run raised
            cause = getattr(e, "cause", None) or e
            msg = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ''}"
            failed.append({"method": run.method, "seed": run.seed, "run": run.name, "error": msg})
            log.error("[%d/%d] %s failed: %s", len(done) + len(failed), total, run.name, msg)
            continue
        done[run.name] = res
        m = res["metrics"]
        log.info("[%d/%d] %s done in %.0f s: clean %.4f, natural %.4f, corruptions %.4f, DeepFool %.4f",
                 len(done) + len(failed), total, run.name, res.get("task_seconds", 0), m.get("test_clean_acc", -1),
                 m.get("test_natural_acc", -1), m.get("test_corruption_mean_acc", -1), m.get("test_deepfool_score", -1))
    return failed


__all__ = ["BenchRun", "BenchmarkOutcome", "resolve_methods", "resolve_seeds", "bench_config", "setup_key",
           "setup_params", "bench_splits", "run_one", "prepare_caches", "run_benchmark", "EXPERIMENT"]
