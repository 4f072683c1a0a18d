"""Benchmark 3: sweep throughput - Ray Tune (1 and 2 concurrent trials) vs a bare Optuna loop.

One trial function, run three ways with the same sampler (Optuna TPE, same seed) and the same
number of trials:

* bare Optuna: ``study.optimize`` calling it in this process, one trial after another;
* Ray Tune + ``OptunaSearch``, one trial at a time (``max_concurrent_trials=1``);
* the same with ``reuse_actors=True`` (one trial process for all trials: the diagnosis);
* Ray Tune, two trials at a time (each trial reserves 1 CPU of ``num_cpus=2``);
* (full mode) Ray Tune running each trial's work inside a one-worker ``TorchTrainer`` with
  ``TuneReportCallback``, the shape of the project's real sweep (``distributed/tune.py``).

The trial is a real small training loop: the ``cpu`` profile's classifier (small_cnn) trained
with SGD on the ``cpu`` profile's Fashion-MNIST subset for a fixed number of steps (so a fixed
amount of CPU work; the count is calibrated at start to last ``--trial-seconds`` here), with
the learning rate and momentum sampled, reporting validation accuracy after each fifth of its
steps. Each trial also reports the seconds it spent working, so the wall time of every runner
splits into work and overhead (scheduling, process start, data loading per process,
reporting, checkpoint/result files) without assuming the shared machine's load stayed put.

Ray is started as ``distributed/tune.py`` starts it (``address="local"``, dashboard on
loopback), with ``num_cpus=2``; ``ray.init`` is timed separately (once per sweep).

    .venv/bin/python bench/bench_sweep.py --quick   # 4 trials of ~2.5 s each (< 2 min)
    .venv/bin/python bench/bench_sweep.py           # 3 trials of ~60 s each, + Tune -> TorchTrainer
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

SEED = 0
METRIC = "val_acc"
CHUNKS = 5  # reports per trial


def trial_work(config: Dict[str, Any], report: Callable[[Dict[str, float]], None]) -> Dict[str, float]:
    """The trial: load the cpu profile's split, train small_cnn for ``config['steps']`` SGD
    steps (batch 128), report validation accuracy every ``steps / CHUNKS`` steps.

    Every report carries where the trial's time went: ``import_s`` (natra_ray + its imports:
    zero when the process already has them), ``load_s`` (the data split: cached in-process
    after the first load), ``work_s`` (training and validation only), the wall-clock times
    the trial was entered and reported (``t_enter``/``t_report``), its process id and that
    process's age at entry."""
    t_enter = time.time()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from natra_ray.config import load_config
    from natra_ray.data import load_dataset
    from natra_ray.stages import robust

    t1 = time.perf_counter()
    cfg = load_config("cpu")
    train, val = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "val")
    t2 = time.perf_counter()
    torch.manual_seed(SEED)
    model = robust.build_classifier(cfg, len(train.class_names))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    gen = torch.Generator().manual_seed(SEED)
    steps, bs = int(config["steps"]), cfg.robust.batch_size
    base = {"import_s": t1 - t0, "load_s": t2 - t1, "t_enter": t_enter, "pid": float(os.getpid()),
            "process_age_s": t_enter - _process_start()}
    m: Dict[str, float] = {}
    for chunk in range(CHUNKS):
        model.train()
        for _ in range(steps // CHUNKS):
            idx = torch.randint(len(train), (bs,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(train.images[idx]), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = robust.accuracy(model, val.images, val.labels)
        m = {METRIC: acc, **base, "work_s": time.perf_counter() - t2, "chunk": chunk + 1, "t_report": time.time()}
        report(m)
    return m


def _process_start() -> float:
    """This process's start (wall clock), from /proc (Linux)."""
    try:
        ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return float("nan")


def define_by_run(trial: Any) -> None:
    """The search space, in Optuna's define-by-run form (what OptunaSearch(space=fn) takes)."""
    trial.suggest_float("lr", 1e-3, 0.3, log=True)
    trial.suggest_float("momentum", 0.5, 0.99)


def calibrate_steps(seconds: float) -> Dict[str, float]:
    """SGD steps that take ``seconds`` here (median of timed steps, data loading excluded)."""
    from natra_ray.config import load_config
    from natra_ray.data import load_dataset
    from natra_ray.stages import robust

    cfg = load_config("cpu")
    train = load_dataset(cfg.data, "train")
    model = robust.build_classifier(cfg, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        idx = torch.randint(len(train), (cfg.robust.batch_size,))
        loss = torch.nn.functional.cross_entropy(model(train.images[idx]), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = benchlib.interleaved({"step": step}, rounds=15, warmup=3)["step"].median
    steps = max(CHUNKS, int(round(seconds / t / CHUNKS)) * CHUNKS)
    return {"step_s": t, "steps": steps}


def run_optuna(n: int, steps: int) -> Dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials: List[Dict[str, float]] = []

    def objective(trial: Any) -> float:
        define_by_run(trial)
        m = trial_work({**trial.params, "steps": steps}, report=lambda _: None)
        trials.append(m)
        return m[METRIC]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=SEED))
    t, start = time.perf_counter(), time.time()
    study.optimize(objective, n_trials=n)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "start": start, "trials": trials, "params": [tr.params for tr in study.trials],
            "values": [tr.value for tr in study.trials]}


def tune_trainable(config: Dict[str, Any]) -> None:
    import ray.tune

    trial_work(config, report=ray.tune.report)


def run_tune(n: int, steps: int, concurrent: int, storage: str, reuse: bool = False,
             train: bool = False) -> Dict[str, Any]:
    """Tune + OptunaSearch over the trial; ``reuse`` keeps trial processes (reuse_actors),
    ``train`` runs each trial's work in a one-worker TorchTrainer as ``distributed/tune.py``
    does (the trial itself then holds 0.5 CPU, the Train worker 1)."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(space=define_by_run, metric=METRIC, mode="max",
                          sampler=optuna.samplers.TPESampler(seed=SEED), seed=SEED)
    fn = tune.with_parameters(_in_train if train else _fixed_steps, steps=steps,
                              **({"storage": storage} if train else {}))
    name = f"bench-c{concurrent}{'-reuse' if reuse else ''}{'-train' if train else ''}"
    tuner = tune.Tuner(
        tune.with_resources(fn, {"CPU": 0.5 if train else 1}),
        tune_config=tune.TuneConfig(search_alg=search, num_samples=n, max_concurrent_trials=concurrent,
                                    metric=METRIC, mode="max", reuse_actors=reuse),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))
    t, start = time.perf_counter(), time.time()
    grid = tuner.fit()
    wall = time.perf_counter() - t
    res = [r for r in grid]
    keep = (METRIC, "import_s", "load_s", "work_s", "t_enter", "t_report", "pid", "process_age_s")
    return {"wall_s": wall, "start": start, "trials": [{k: r.metrics.get(k) for k in keep} for r in res if r.metrics],
            "params": [{k: r.config[k] for k in ("lr", "momentum")} for r in res],
            "values": [r.metrics.get(METRIC) for r in res], "errors": [str(r.error) for r in res if r.error]}


def _fixed_steps(config: Dict[str, Any], steps: int) -> None:
    tune_trainable({**config, "steps": steps})


def _in_train(config: Dict[str, Any], steps: int, storage: str) -> None:
    """The trial as the project runs it: a TorchTrainer (1 worker) reporting through Tune."""
    import ray.train
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(lambda c: trial_work(c, report=ray.train.report),
                           train_loop_config={**config, "steps": steps},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"train-{ray.tune.get_context().get_trial_id()}",
                                                storage_path=storage, callbacks=[TuneReportCallback()]))
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 trials of ~2.5 s, no Train variant (< 2 min)")
    ap.add_argument("--trials", type=int, default=0, help="trials per runner (4 quick, 3 full)")
    ap.add_argument("--trial-seconds", type=float, default=0, help="work per trial (3 quick, 60 full)")
    args = ap.parse_args()
    info = benchlib.start(1)
    t_start = time.time()
    n = args.trials or (4 if args.quick else 3)
    cal = calibrate_steps(args.trial_seconds or (2.5 if args.quick else 60.0))
    print(f"calibrated: {cal['steps']} steps of {1e3 * cal['step_s']:.0f} ms", flush=True)
    out: Dict[str, Any] = {"calibration": cal, "trials": n}
    out["optuna"] = run_optuna(n, cal["steps"])
    print(f"optuna: {out['optuna']['wall_s']:.1f} s", flush=True)

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    out["ray_init_s"] = time.perf_counter() - t
    try:
        with tempfile.TemporaryDirectory(prefix="natra-bench-tune-") as storage:
            runs = {"tune_c1": dict(concurrent=1), "tune_c1_reuse": dict(concurrent=1, reuse=True),
                    "tune_c2": dict(concurrent=2)}
            if not args.quick:
                runs["tune_c1_train"] = dict(concurrent=1, train=True)
            for key, kw in runs.items():
                out[key] = run_tune(n, cal["steps"], storage=storage, **kw)
                print(f"{key}: {out[key]['wall_s']:.1f} s", flush=True)
    finally:
        ray.shutdown()
    out["seconds"] = time.time() - t_start
    benchlib.write_results("sweep", "quick" if args.quick else "full", render(out), out, info)


def _summary(r: Dict[str, Any], n: int) -> Dict[str, float]:
    """Wall time split into trial work, per-trial imports, data loads, and the rest."""
    tr = r["trials"]
    work = sum(t["work_s"] for t in tr)
    imp = sum(t["import_s"] for t in tr)
    load = sum(t["load_s"] for t in tr)
    return {"wall": r["wall_s"], "work": work, "import": imp, "load": load,
            "other": r["wall_s"] - work - imp - load, "trials_per_hour": 3600 * n / r["wall_s"],
            "processes": len({t["pid"] for t in tr}), "process_age": statistics.median(t["process_age_s"] for t in tr)}


def render(d: Dict[str, Any]) -> str:
    n = d["trials"]
    o, t1, t2 = (_summary(d[k], n) for k in ("optuna", "tune_c1", "tune_c2"))
    per_trial = (t1["wall"] - t1["work"]) / n - (o["wall"] - o["work"]) / n  # Tune's extra non-work s per trial
    minute = per_trial / (60 + per_trial)

    def row(name: str, c: int, s: Dict[str, float], vs: str) -> List[Any]:
        if c > 1:  # trials overlap: their summed work exceeds the wall, no split
            return [name, c, s["wall"], s["work"], s["import"], s["load"], "-", "-", s["trials_per_hour"],
                    s["processes"], vs]
        return [name, c, s["wall"], s["work"], s["import"], s["load"], s["other"],
                f"{100 * (s['wall'] - s['work']) / s['wall']:.1f}%", s["trials_per_hour"], s["processes"], vs]

    head = ["runner", "concurrent", "wall s", "training work s", "imports s", "data loads s", "other s",
            "non-work share of wall", "trials/hour", "trial processes", "extra wall vs Optuna"]
    def vs(s: Dict[str, float]) -> str:
        return f"{100 * (s['wall'] - o['wall']) / s['wall']:.1f}% of its wall"

    rows = [row("bare Optuna loop (in-process)", 1, o, "-"),
            row("Ray Tune + OptunaSearch", 1, t1, vs(t1))]
    if "tune_c1_reuse" in d:
        tr = _summary(d["tune_c1_reuse"], n)
        rows.append(row("Ray Tune, reuse_actors=True", 1, tr, vs(tr)))
    if "tune_c1_train" in d:
        tt = _summary(d["tune_c1_train"], n)
        rows.append(row("Ray Tune -> TorchTrainer (1 worker), as distributed/tune.py", 1, tt, vs(tt)))
    rows.append(row("Ray Tune + OptunaSearch", 2, t2, "-"))
    errors = [e for k in d if k.startswith("tune_") for e in d[k].get("errors", [])]
    lines = [f"{n} trials per runner, each {d['calibration']['steps']} SGD steps of small_cnn (cpu profile, batch 128; "
             f"~{d['calibration']['steps'] * d['calibration']['step_s']:.1f} s of work at the "
             f"{1e3 * d['calibration']['step_s']:.0f} ms/step calibrated at start). Same TPE sampler and seed in all three. "
             f"ray.init took {d['ray_init_s']:.1f} s (once per sweep; not in the walls below). 'other' = wall minus "
             f"what the trials timed themselves: scheduling, trial process start, reporting, result files.", "",
             benchlib.md_table(head, rows), "",
             f"Tune's non-work time per sequential trial beyond the bare loop's: {per_trial:.1f} s; against a "
             f"1-minute trial that is {100 * minute:.1f}% of the wall time (goal <= 10%). Two concurrent trials vs one: "
             f"{t2['trials_per_hour'] / t1['trials_per_hour']:.2f}x the trials/hour (median training work per trial "
             f"{statistics.median(t['work_s'] for t in d['tune_c2']['trials']):.1f} s two at a time vs "
             f"{statistics.median(t['work_s'] for t in d['tune_c1']['trials']):.1f} s alone)."]
    if errors:
        lines.append(f"Trial errors: {errors}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
