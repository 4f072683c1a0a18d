"""What a person sees on the console of a job: stage lines and progress bars, no Ray-internal
lines, each warning once, and an interrupt that ends in one line.

The interrupt test runs ``jobs/tune_natra.py`` (smoke profile) on the session's real local
cluster and reads its console the way a terminal shows it; the console of a whole sweep is
checked on the job that tests/test_job_submit.py submits.
"""
from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from console_text import screen

REPO = Path(__file__).resolve().parents[1]


def test_noise_filter_drops_ray_lines_and_keeps_ours_and_live_bars():
    from natra_ray.distributed.console import RayNoiseFilter

    out = io.StringIO()
    f = RayNoiseFilter(out)
    lines = [
        "\x1b[36m(TrainController pid=6504)\x1b[0m [2026-12-01 20:17:13,023 E 6504 6536] core_worker.cc:2465: "
        "Actor with class name: 'PreemptionWatcher' ... max_restarts > 0.\n",
        "\x1b[36m(RayTrainWorker pid=6610)\x1b[0m Checkpoint successfully created at: Checkpoint(filesystem=local)\n",
        "(RayTrainWorker pid=6610) Reporting training result 1: TrainingReport(checkpoint=None, metrics={})\n",
        "(SplitCoordinator pid=8918) Execution plan of Dataset train_0: InputDataBuffer[Input] -> ...\n",
        "\x1b[36m(RayTrainWorker pid=18311)\x1b[0m \n",
        "(trial_fn pid=7977) [stage] encoding the train split started\n",
        "[stage] GAN (30 steps) done in 63 s -> /x/cache/gan-1\n",
    ]
    for line in lines:  # print() writes the text and its newline separately
        f.write(line[:-1])
        f.write("\n")
    f.write("\rGAN steps:  40%|####      | 12/30 [00:10<00:17]")  # a bar redrawing in place: no newline
    assert out.getvalue() == lines[5] + lines[6] + "\rGAN steps:  40%|####      | 12/30 [00:10<00:17]"
    assert f.dropped == 5


def test_stage_lines_and_a_warning_repeated_by_every_stage_shown_once(capsys):
    from natra_ray import progress
    from natra_ray.runtime import OncePerProcess

    with progress.stage("GAN (3 steps)") as st:
        bar = progress.bar(3, "GAN steps", unit="step")
        for _ in range(3):
            bar.update(1)
        bar.close()
        st.out = "/x/cache/gan-1"
    with pytest.raises(KeyboardInterrupt):
        with progress.stage("BIES"):
            raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert "[stage] GAN (3 steps) started" in err
    assert re.search(r"\[stage\] GAN \(3 steps\) done in \d+ s -> /x/cache/gan-1", err)
    assert "3/3" in err  # the bar
    assert re.search(r"\[stage\] BIES interrupted after \d+ s", err)

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(OncePerProcess())
    log = logging.getLogger("natra_ray.test_console")
    log.addHandler(handler)
    try:
        for _ in range(5):
            log.warning("LPIPS-alex is running on a RANDOMLY INITIALISED backbone")
        log.warning("another warning")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["LPIPS-alex is running on a RANDOMLY INITIALISED backbone",
                                              "another warning"]


def test_our_stream_settings_raise_no_ray_data_deprecation_and_no_readonly_numpy_warning():
    import numpy as np
    import torch

    from natra_ray.distributed.data import ingest_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opts = ingest_config()._resolve_execution_options("train")
        idx = np.arange(4, dtype=np.int64)
        idx.setflags(write=False)  # what Ray Data hands a map_batches actor
        t = torch.from_numpy(np.array(idx, dtype=np.int64))  # what LatentAugmenter does with it
    assert t.tolist() == [0, 1, 2, 3]
    assert opts.preserve_order is not None
    assert not [w for w in caught if "exclude_resources" in str(w.message) or "not writable" in str(w.message)], \
        [str(w.message) for w in caught]


def test_kept_summary_names_what_an_interrupted_run_left_under_the_layout(tmp_path):
    from natra_ray import cache
    from natra_ray.distributed.console import kept_summary
    from natra_ray.workflow.layout import StorageLayout

    store = StorageLayout(tmp_path)
    assert kept_summary(tmp_path, "s") == f"0 finished trials in {store.tune_experiment('s')}"
    assert kept_summary(store) == "nothing (no stage had finished)"
    for stage, key in (("gan", "a1"), ("codes-train", "b2"), ("bies", "c3")):
        cache.cached(store.cache, stage, key, lambda out: {})
    (store.cache / "directions-d4").mkdir()  # unfinished: not counted
    (store.tune_experiment("s") / "trial_1").mkdir(parents=True)
    (store.tune_experiment("s") / "trial_1" / "result.json").write_text('{"done": false}\n{"done": true}\n')
    (store.train_runs / "train-x" / "checkpoint_000001").mkdir(parents=True)
    assert kept_summary(store, "s") == (f"3 cache entries (bies, codes-train, gan) in {store.cache}, "
                                        f"1 finished trial in {store.tune_experiment('s')}, "
                                        f"Train checkpoints of 1 run in {store.train_runs}")


def _cmd(storage: Path, name: str, uri: str, *extra: str) -> list:
    return [sys.executable, str(REPO / "jobs" / "tune_natra.py"), "--profile", "smoke", "tune.search_space=smoke",
            f"tune.name={name}", f"tune.storage_path={storage}", f"tracking.uri={uri}", *extra]


def _env(ray_cluster) -> dict:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "RAY_AUTH_MODE": "token"}
    for k in ("MLFLOW_TRACKING_URI", "NATRA_VERBOSE"):
        env.pop(k, None)
    return env


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_mid_sweep_ends_in_one_line_saying_what_was_kept_and_how_to_resume(ray_cluster, tmp_path, smoke_storage):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(_cmd(smoke_storage, "console-stop", uri, "tune.num_samples=2"), env=_env(ray_cluster),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    seen: list = []

    def read():
        for line in proc.stdout:
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 600
    while not any("[stage]" in line for line in seen) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert any("[stage]" in line for line in seen), "".join(seen)[-3000:]
    time.sleep(3)  # mid-stage: Train workers (or a trial) running
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` does to the driver
    rc = proc.wait(timeout=300)
    reader.join(timeout=30)
    lines = [line for line in screen("".join(seen)) if line.strip()]
    assert rc == 130, lines[-20:]
    last = lines[-1]
    assert last.startswith("interrupted: kept "), lines[-20:]
    assert "resume with: python jobs/tune_natra.py" in last and "--resume" in last, last
    after = lines[[i for i, line in enumerate(lines) if "[stage]" in line and "interrupted" in line][0]:] \
        if any("[stage]" in line and "interrupted" in line for line in lines) else lines[-3:]
    assert not any("Traceback" in line or ".cc:" in line for line in after), after
