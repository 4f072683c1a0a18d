"""Shared fixtures.

One local Ray cluster serves every test marked ``ray``: started lazily (``ray start --head
--block`` on loopback, so `ray job submit` can reach its dashboard too; ``local_cluster.py``)
the first time a test asks for it, and stopped at the end of the session. A ray.init costs ~13 s here; paying it
once keeps the suite fast.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# One intra-op thread: on a shared 2-core machine, OpenMP threads spin at barriers and a
# descheduled one stalls the rest - measured 40x slower GAN steps with 2 threads under load.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

from local_cluster import own_token, start_head, stop_head  # noqa: E402

# The suite brings its own Ray token (see local_cluster.py): it never reads or writes
# ~/.ray/auth_token, so a brand-new machine and one that has run Ray before behave the same.
# Set before Ray is imported, so every Ray process of the session (heads, local ray.init, the
# jobs the tests start as subprocesses) inherits it.
_TOKEN_DIR = tempfile.mkdtemp(prefix="natra-token-")
RAY_TOKEN = own_token(_TOKEN_DIR)


def pytest_unconfigure(config):
    shutil.rmtree(_TOKEN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local cluster: {"address": gcs address, "dashboard": http url}."""
    head = start_head(tmp_path_factory.mktemp("ray") / "ray_start.log")
    yield head.as_dict()
    stop_head(head)


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
