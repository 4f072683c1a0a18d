"""An upstream stage interrupted for real continues from its checkpoint (real local Ray cluster,
real driver processes, real Ctrl-C):

1. the upstream driver (``distributed.upstream.prepare_upstream``, what ``make run`` calls first) gets
   SIGINT once the GAN's Ray Train run has registered a checkpoint;
2. the rerun's GAN starts from that checkpoint's step (never from step 0: the grids it writes
   are all past that step), finishes and is cached; it gets SIGINT once BIES has checkpointed
   its encoder phase;
3. the third run takes the GAN from the cache and BIES continues with the checkpointed encoder
   (not retrained); once the entries are stored their Train runs are removed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from natra_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Tiny stages: a GAN step and a shift step take tens of ms on one thread. Each interrupted
# phase (GAN steps, BIES shift) runs long enough (several seconds on an idle machine) that the
# interrupt, sent once a checkpoint is registered, lands inside it and not after it.
OVERRIDES = {"data.image_size": 16, "data.train_subset": 256, "data.test_subset": 64,
             "gan.generator": "style_tiny", "gan.batch_size": 8, "gan.d_channels": 8, "gan.steps": 300,
             "gan.sample_every": 10, "encoder.batch_size": 8, "encoder.steps": 10, "encoder.shift_steps": 400,
             "encoder.gamma2": 0.0, "directions.estimator": "pca", "directions.num_samples": 64,
             "tune.upstream_cpus_per_worker": 1}
GAN_REPORT_EVERY = 10

DRIVER = """
import json, os, sys
from pathlib import Path
import ray
from natra_ray.config import load_config
from natra_ray.distributed.upstream import prepare_upstream
from natra_ray.workflow.layout import StorageLayout
from natra_ray.runtime import setup_logging
setup_logging()
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
cfg = load_config("smoke", overrides=json.loads(sys.argv[2]))
prepare_upstream(cfg, StorageLayout(Path(sys.argv[1])), gan_report_every=int(sys.argv[3]))
print("UPSTREAM READY", flush=True)
"""


def _env(ray_cluster) -> dict:
    # The Train controller polls its workers every 2 s by default; faster polling registers a
    # checkpoint soon after it is reported (the interrupt must land in the phase after it) and
    # notices a finished run sooner.
    return {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "RAY_AUTH_MODE": "token",
            "PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def _start(root: Path, log: Path, ray_cluster) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(root), json.dumps(OVERRIDES), str(GAN_REPORT_EVERY)],
                            env=_env(ray_cluster), stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)


def _latest_registered(run: Path):
    """The latest checkpoint the run's controller registered, from its snapshot (what a restored
    run resumes from: a checkpoint uploaded but not yet registered is not): {"checkpoint_dir_name",
    "metrics"}, or None."""
    try:
        return json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return None


def _interrupt_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the driver ended before the interrupt:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no checkpoint to interrupt after:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=120) != 0, "an interrupted run must not exit as a success"


def _state(run: Path) -> dict:
    ckpt = run / _latest_registered(run)["checkpoint_dir_name"] / "state.pt"
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_interrupted_gan_and_bies_continue_from_their_checkpoints(ray_cluster, tmp_path):
    from natra_ray import cache
    from natra_ray.distributed.upstream import upstream_run_name

    t0 = time.time()
    cfg = load_config("smoke", overrides=OVERRIDES)
    gan_name, bies_name = upstream_run_name(cfg, "gan"), upstream_run_name(cfg, "bies")
    runs, entries = tmp_path / "train_runs", tmp_path / "cache"
    gan_run, bies_run, gan_entry, bies_entry = runs / gan_name, runs / bies_name, entries / gan_name, entries / bies_name

    # 1. Ctrl-C in the GAN, after its first checkpoint.
    log1 = tmp_path / "run1.log"
    _interrupt_when(_start(tmp_path, log1, ray_cluster), lambda: _latest_registered(gan_run) is not None, log1)
    assert not cache.is_complete(gan_entry)
    step = int(_latest_registered(gan_run)["metrics"]["step"])
    assert GAN_REPORT_EVERY <= step < cfg.gan.steps, step

    # 2. The GAN continues from that step; Ctrl-C in BIES after its encoder phase.
    log2 = tmp_path / "run2.log"
    _interrupt_when(_start(tmp_path, log2, ray_cluster),
                    lambda: ((_latest_registered(bies_run) or {}).get("metrics") or {}).get("phase") == 1, log2)
    text2 = log2.read_text()
    assert f"GAN resumes from step {step} of {cfg.gan.steps} (checkpoint {gan_run}" in text2, text2[-3000:]
    assert cache.is_complete(gan_entry)
    grids = [int(re.findall(r"\d+", p.stem)[0]) for p in (gan_entry / "samples").glob("step_*.png")]
    # Grids are written every 10 steps by the run that takes the step: steps 1..step were not redone.
    assert grids and min(grids) > step and max(grids) == cfg.gan.steps, (step, sorted(grids))
    assert (gan_entry / "samples" / "final.png").is_file() and (gan_entry / "generator.pt").is_file()
    assert not cache.is_complete(bies_entry) and _latest_registered(bies_run)["metrics"]["phase"] == 1
    encoder_seconds = _state(bies_run)["times"]["bies_encoder_seconds"]

    # 3. The GAN comes from the cache; BIES shifts with the checkpointed encoder.
    log3 = tmp_path / "run3.log"
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), json.dumps(OVERRIDES), str(GAN_REPORT_EVERY)],
                          env=_env(ray_cluster), stdout=open(log3, "w"), stderr=subprocess.STDOUT, cwd=REPO, timeout=300)
    text3 = log3.read_text()
    assert done.returncode == 0 and "UPSTREAM READY" in text3, text3[-3000:]
    assert "GAN resumes" not in text3
    assert f"BIES resumes after the encoder phase (checkpoint {bies_run}" in text3, text3[-3000:]
    # The stored encoder time is the interrupted run's: the encoder was trained once.
    assert cache.read_manifest(bies_entry)["summary"]["bies_encoder_seconds"] == encoder_seconds
    assert (bies_entry / "encoder.pt").is_file() and (bies_entry / "generator_shifted.pt").is_file()
    # Stored entries hold the results: their Train runs are gone, and no temp folder is left.
    assert not gan_run.exists() and not bies_run.exists(), sorted(p.name for p in runs.iterdir())
    assert not list(entries.glob(".*-*")), sorted(p.name for p in entries.iterdir())
    print(f"resume test: {time.time() - t0:.0f} s")


def test_finished_run_without_its_entry_is_reused_not_redone(ray_session, tmp_path, caplog, monkeypatch):
    """A run that finished but whose cache entry is missing (deleted, or the driver died between
    the fit and the store): asked again, the GAN restores its final checkpoint (the loop is already
    at the last step) and BIES does not shift again; both give back the same models."""
    import logging

    import ray

    from natra_ray.distributed.upstream import bies_fit, gan_fit
    from natra_ray.workflow.upstream import load_splits

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # passed on to the Train controller
    cfg = load_config("smoke", overrides=OVERRIDES).replace(**{"gan.steps": 6, "encoder.steps": 3, "encoder.shift_steps": 3})
    train = load_splits(cfg)["train"]
    fit_gan, fit_bies = gan_fit(tmp_path, ray.put(train), report_every=GAN_REPORT_EVERY)(cfg), bies_fit(tmp_path)(cfg)
    tr1, _ = fit_gan(tmp_path / "out1")
    E1, Gs1, times1 = fit_bies(tr1.G_ema, train)
    with caplog.at_level(logging.INFO, logger="natra_ray.distributed.upstream"):
        tr2, _ = fit_gan(tmp_path / "out2")
        E2, Gs2, times2 = fit_bies(tr1.G_ema, train)
    assert f"GAN resumes from step {cfg.gan.steps} of {cfg.gan.steps}" in caplog.text
    assert "BIES resumes after the shift (the run had finished)" in caplog.text
    assert not (tmp_path / "out2" / "samples").exists()  # not one GAN step was taken again
    assert tr2.step == cfg.gan.steps and times2 == times1  # the recorded phase times are the first run's
    for a, b in [(tr1.G_ema, tr2.G_ema), (tr1.D, tr2.D), (E1, E2), (Gs1, Gs2)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
