"""The user's cluster path end to end, once: ``ray job submit -- python jobs/tune_natra.py`` on
the session's real local cluster, on a dataset of the user's own (Fashion-MNIST written as
Hugging Face writes it: Parquet files of PNG bytes), each trial a ``TorchTrainer`` whose workers
read the Parquet rows through Ray Data. One job, read three ways:

1. the console the job's submitter sees: every stage's line, progress, Tune's table, no Ray
   internals, each warning once; ``--resume`` of a sweep that never ran says so once;
2. MLflow: one parent run, the ``none`` reference and the finished trials as its children, with
   their params, metrics and a classifier that loads and takes 28x28 images;
3. the shared storage: the trials' Train runs and the sweep's summary with the reference row.

It shares the session's storage root (and so its stage cache) with the other smoke sweeps, but
its data is its own, so its upstream is trained here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from console_text import assert_clean_console, screen
from hf_parquet import fashion_mnist_slice, write_hf_folder

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _submit(ray_cluster, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ray_cluster["dashboard"]}
    for k in ("MLFLOW_TRACKING_URI", "NATRA_VERBOSE", "NATRA_DATA_DIR"):
        env.pop(k, None)
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster["dashboard"],
           "--working-dir", str(REPO),
           "--runtime-env-json", '{"excludes": [".venv", ".git", "*.egg-info", "__pycache__"]}',
           "--", sys.executable, "jobs/tune_natra.py", *args]
    for _ in range(30):  # the head's job agent starts after the dashboard answers: wait for it
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def test_submitted_sweep_on_a_parquet_dataset_shows_its_stages_and_lands_in_mlflow(ray_cluster, tmp_path,
                                                                                   smoke_storage):
    import mlflow

    from natra_ray.distributed.tracking import _fluent_target

    data = write_hf_folder(tmp_path, fashion_mnist_slice())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _submit(ray_cluster, "--profile", "smoke", "tune.search_space=smoke", "tune.name=ci-submit",
                   f"tune.storage_path={smoke_storage}", f"tracking.uri={uri}", "tune.num_samples=2",
                   "tune.references=[none]", "tune.trainer=train", "data.dataset=parquet", f"data.root={data}",
                   "data.train_subset=256", "data.test_subset=64", "--resume")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out[-2000:].lower(), out[-4000:]

    # 1. the console
    lines = screen(out)
    text = "\n".join(lines)
    for stage in ("GAN", "BIES", "directions", "encoding the train split"):
        assert re.search(rf"\[stage\] {stage}.* (done in (\d+ s|[\d.]+ min)|cached) -> ", text), (stage, text[-4000:])
    assert re.search(r"training.*\| *\d+/\d+ \[", text) or re.search(r"train-\w+ \(\d+ epochs\).*batch", text), \
        text[-4000:]
    assert sum("nothing to resume" in line for line in lines) == 1
    assert "Trial status:" in text  # Tune's trial table
    assert_clean_console(lines)

    # 2. MLflow
    with _fluent_target(uri):  # read the store without leaking a global tracking URI to other tests
        runs = mlflow.search_runs([mlflow.get_experiment_by_name("ci-submit").experiment_id])
        parents = runs[runs["tags.natra.role"] == "sweep"]
        assert len(parents) == 1
        children = runs[runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]]
        refs = children[children["tags.natra.role"] == "reference"]
        assert list(refs["tags.natra.method"]) == ["none"] and (refs["status"] == "FINISHED").all()
        assert refs["metrics.test_clean_acc"].between(0, 1).all()
        trials = children[children["tags.natra.role"] == "trial"]
        done = trials[trials["status"] == "FINISHED"]
        assert len(done) == 2, trials[["run_id", "status"]]
        assert (done["params.data.dataset"] == "parquet").all()
        for col in ("robust.eps", "robust.rho", "robust.label_smoothing_c", "robust.layer_start",
                    "robust.layer_end", "encoder.lce_codes"):
            assert done[f"params.{col}"].notna().all(), col
        for m in ("test_clean_acc", "test_natural_acc", "val_natural_acc"):
            assert done[f"metrics.{m}"].between(0, 1).all(), m
        model = mlflow.pytorch.load_model(f"runs:/{done.iloc[0]['run_id']}/classifier")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)  # the dataset's own size: the model pads to 32 itself

    # 3. the shared storage: each trial a TorchTrainer (fed by the Ray Data stream), not inline
    trained = {p.name for p in (smoke_storage / "train_runs").iterdir()}
    assert {f"train-{t}" for t in done["tags.natra.trial_id"]} <= trained, trained
    summary = (smoke_storage / "sweeps" / "ci-submit" / "summary.md").read_text()
    assert "| reference-none | REFERENCE |" in summary, summary
