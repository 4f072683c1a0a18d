"""Faults on a real local Ray cluster (issue: reliability), each injected for real:

1. a Ray Train worker process killed (SIGKILL) mid-epoch: the worker group restarts from the
   last epoch's checkpoint (FailureConfig) and ends where an undisturbed run ends;
2. the sweep driver interrupted (SIGTERM) mid-sweep: ``--resume`` finishes the sweep, finished
   trials are not rerun and MLflow holds exactly one child run per trial;
3. a trial whose loss diverges: it ends FAILED with the reason in MLflow, the sweep goes on
   (run in multi-objective mode, which also checks the Pareto front reaches the parent run).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from natra_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _train_worker_pids(address: str) -> list:
    """PIDs of this cluster's live Ray Train workers (named address: other clusters may run here)."""
    from ray.util.state import list_actors

    alive = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in alive]


def wait_for_registered_checkpoint(run: Path, timeout: float = 600) -> None:
    """Until the Train controller of ``run`` has registered a checkpoint (its snapshot lists one)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


def test_killed_train_worker_resumes_from_its_checkpoint(ray_cluster, ray_session, tmp_path):
    from natra_ray.distributed.train import fit_robust, load_result_state
    from natra_ray.workflow.upstream import load_splits

    from test_ray_layer import tiny_job

    cfg = load_config("smoke", overrides={
        "robust.method": "none", "robust.epochs": 3, "robust.batch_size": 64, "robust.classifier_width": 8,
        "robust.lr": 0.05, "robust.num_directions": 4, "data.train_subset": 1600, "data.test_subset": 200,
        "tune.data_stream": False, "tune.max_failures": 2})
    splits = load_splits(cfg)
    calm = load_result_state(fit_robust(tiny_job(cfg, tmp_path, splits, "calm"), "calm", tmp_path / "ray"))["history"]

    killed = []

    def kill_after_first_checkpoint():
        # Wait until the controller has *registered* a checkpoint (its snapshot lists one); a
        # directory alone may still be mid-report, and a worker killed then restarts from scratch.
        wait_for_registered_checkpoint(tmp_path / "ray" / "faulty")
        pids = _train_worker_pids(ray_cluster["address"])
        for pid in pids:  # epoch 2 is running now: kill it mid-epoch
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    t.start()
    result = fit_robust(tiny_job(cfg, tmp_path, splits, "faulty"), "faulty", tmp_path / "ray")
    t.join(timeout=5)
    assert killed, "no Train worker was found to kill"
    assert result.error is None, result.error
    hist = load_result_state(result)["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    # The restarted worker picked up after the last registered epoch, not from scratch...
    resumed = [(h["epoch"], h["resumed_from_epoch"]) for h in hist if "resumed_from_epoch" in h]
    assert len(resumed) == 1 and resumed[0][1] == resumed[0][0] - 1 >= 1, hist
    # ... and the run ends where the undisturbed one does (same seeds, same data order).
    assert abs(hist[-1]["val_acc"] - calm[-1]["val_acc"]) <= 0.03, (hist[-1], calm[-1])


def _children(uri: str, experiment: str):
    import mlflow

    from natra_ray.distributed.tracking import _fluent_target

    with _fluent_target(uri):
        exp = mlflow.get_experiment_by_name(experiment)
        runs = mlflow.search_runs([exp.experiment_id])
    parents = runs[runs["tags.natra.role"] == "sweep"]
    assert len(parents) == 1, parents
    return runs[runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]]


def _sweep_cmd(storage: Path, name: str, uri: str, *extra: str) -> list:
    return [sys.executable, str(REPO / "jobs" / "tune_natra.py"), "--profile", "smoke", "tune.search_space=smoke",
            f"tune.name={name}", f"tune.storage_path={storage}", f"tracking.uri={uri}", *extra]


def _env(ray_cluster) -> dict:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "RAY_AUTH_MODE": "token"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(ray_cluster, tmp_path, smoke_storage):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _sweep_cmd(smoke_storage, "resume", uri, "tune.num_samples=3")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=_env(ray_cluster), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    # Wait for a trial's final report (it carries its MLflow run id, and is sent after the run
    # ended FINISHED) in Tune's own result files; the MLflow store is not touched meanwhile (two
    # processes creating a fresh SQLite schema at once would race).
    first_run_id = None
    deadline = time.time() + 900
    while first_run_id is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.25)
        for f in (smoke_storage / "tune" / "resume").glob("*/result.json"):
            for line in f.read_text().splitlines():
                if '"mlflow_run_id"' in line:
                    first_run_id = json.loads(line)["mlflow_run_id"]
    assert first_run_id is not None, (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` or a preempted head does to the driver
    assert proc.wait(timeout=300) != 0
    kids = _children(uri, "resume")
    first_done = kids[kids["run_id"] == first_run_id].iloc[0]
    assert first_done["status"] == "FINISHED"
    # Two trials run at once, so the third may have opened its run before the first one's last
    # report was seen: what resuming needs is a trial left unfinished (never started, or cut off
    # with its run RUNNING, which --resume must reopen rather than duplicate).
    assert (kids["status"] == "FINISHED").sum() < 3, "the sweep was interrupted too late to test resuming"

    resumed = subprocess.run([*cmd, "--resume"], env=_env(ray_cluster), capture_output=True, text=True,
                             timeout=1200, cwd=REPO)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    kids = _children(uri, "resume")
    ids = kids["tags.natra.trial_id"].tolist()
    assert len(ids) == len(set(ids)) == 3, kids[["run_id", "tags.natra.trial_id", "status"]]
    assert (kids["status"] == "FINISHED").all(), kids[["run_id", "status"]]
    again = kids[kids["run_id"] == first_done["run_id"]].iloc[0]
    # The trial that had finished was not run again: same run, same end time.
    assert again["end_time"] == first_done["end_time"]


def test_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(ray_cluster, tmp_path, smoke_storage):
    space = tmp_path / "diverge.yaml"
    # Two trials: the random sampler (seed 0) draws each learning rate once, so one trial
    # diverges and one trains. The assertions below hold for whichever trial gets which.
    space.write_text("description: one sane and one absurd learning rate\n"
                     "params:\n"
                     "  robust.method: {type: categorical, choices: [none]}\n"
                     "  robust.lr: {type: categorical, choices: [0.05, 1.0e+30]}\n"
                     # multi-objective mode rides along: the Pareto table and PNG reach the parent
                     "objectives:\n"
                     "  - {metric: val_acc, mode: max}\n"
                     "  - {metric: val_natural_acc, mode: max}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _sweep_cmd(smoke_storage, "diverge", uri, f"tune.search_space={space}", "tune.num_samples=2",
                     "tune.sampler=random", "seed=0", "tune.data_stream=false", "tune.multi_objective=true")
    proc = subprocess.run(cmd, env=_env(ray_cluster), capture_output=True, text=True, timeout=1200, cwd=REPO)
    out = (proc.stdout + proc.stderr)[-4000:]
    kids = _children(uri, "diverge")
    assert len(kids) == 2, out
    lr = kids["params.robust.lr"].astype(float)
    assert set(lr) == {0.05, 1e30}, "the sampler must draw both learning rates; change the seed"
    bad, good = kids[lr > 1].iloc[0], kids[lr < 1].iloc[0]
    assert bad["status"] == "FAILED"
    reason = bad["tags.natra.failure_reason"]
    assert "FloatingPointError" in reason and "lower robust.lr" in reason, reason
    assert good["status"] == "FINISHED" and 0 <= good["metrics.test_clean_acc"] <= 1
    assert proc.returncode == 0, out  # a sweep with a finished trial succeeds
    import mlflow

    from natra_ray.distributed.tracking import _fluent_target

    with _fluent_target(uri):
        parent = kids.iloc[0]["tags.mlflow.parentRunId"]
        names = {a.path for a in mlflow.MlflowClient().list_artifacts(parent)}
    assert {"pareto.md", "pareto.png", "summary.md"} <= names, names
