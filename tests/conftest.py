"""Shared fixtures.

One local Ray cluster serves every test marked ``ray``: started lazily (``ray start --head
--block`` on loopback, so `ray job submit` can reach its dashboard too) the first time a test
asks for it, and stopped at the end of the session. A ray.init costs ~13 s here; paying it
once keeps the suite fast.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

# One intra-op thread: on a shared 2-core machine, OpenMP threads spin at barriers and a
# descheduled one stalls the rest - measured 40x slower GAN steps with 2 threads under load.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# `ray start --head` keeps the cluster's token in ~/.ray/auth_token; a client sends it only when
# RAY_AUTH_MODE=token (Ray 2.60's token authentication stays on). Set before Ray is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local cluster: {"address": gcs address, "dashboard": http url}."""
    port, dash = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("ray") / "ray_start.log", "w")
    # Our own temp dir (short: Ray's socket paths must stay under 107 chars) marks every
    # process of this cluster, so teardown stops exactly them and not a user's cluster.
    temp_dir = tempfile.mkdtemp(prefix="natra-rt-", dir="/tmp")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=true", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    import urllib.request

    import urllib.error

    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering at all (401 under token auth) means it is up
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed; see {log.name}")
            time.sleep(1)
    yield {"address": address, "dashboard": url}
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    subprocess.run(["pkill", "-f", temp_dir], check=False)  # stragglers (gcs, workers) of this cluster
    shutil.rmtree(temp_dir, ignore_errors=True)
    # `ray start` records the head in /tmp/ray/ray_current_cluster; a stale record makes a later
    # plain ray.init() try to join this dead cluster.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smoke_storage(tmp_path_factory) -> Path:
    """One ``tune.storage_path`` for the smoke sweeps of the session: they share the stage cache,
    so the smoke GAN, BIES and directions are trained once (the cache is safe under concurrent
    and killed writers, tests/test_faults_tracking_cache.py). Each sweep keeps its own
    ``tune.name`` and MLflow store, so their Tune experiments and runs stay apart."""
    return tmp_path_factory.mktemp("smoke_store")
