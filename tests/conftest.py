"""Shared fixtures. One local Ray session serves every test marked ``ray`` (a ray.init costs
~13 s here), started lazily the first time such a test asks for it."""
from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread: on a shared 2-core machine, OpenMP threads spin at barriers and a
# descheduled one stalls the rest - measured 40x slower GAN steps with 2 threads under load.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
