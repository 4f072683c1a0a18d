"""The Ray tests' set-up on a brand-new machine: nothing in the home directory.

Ray 2.60 refuses ``ray start --head`` under token authentication when no token exists, and
``~/.ray/auth_token`` exists only where Ray ran before, so a suite that relied on it passed on a
used machine and failed on a new one. This runs the suite's own set-up (``local_cluster.py``,
what ``conftest.py`` uses) with ``HOME`` pointed at an empty folder, and checks that a head
starts, that a driver and ``ray job submit`` authenticate with the suite's token, and that
nothing was written into the home directory.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import os, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
from local_cluster import RAY, own_token, start_head, stop_head

work = tempfile.mkdtemp(prefix="natra-fresh-")
own_token(work)
head = start_head(os.path.join(work, "ray_start.log"), num_cpus=1)
try:
    import ray
    ray.init(address=head.address, log_to_driver=False, configure_logging=False)
    print("task:", ray.get(ray.remote(lambda: 41 + 1).remote()))
    ray.shutdown()
    import time
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a few seconds after its dashboard
        job = subprocess.run([RAY, "job", "submit", "--address", head.dashboard, "--", "python", "-c",
                              "print('job ran')"], capture_output=True, text=True, timeout=300)
        if "No available agent" not in job.stderr or time.time() > deadline:
            break
        time.sleep(2)
    print("job rc:", job.returncode)
    print(job.stdout[-2000:], job.stderr[-2000:])
finally:
    stop_head(head)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_ray_setup_needs_nothing_in_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(HERE)], env=env, capture_output=True,
                         text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "task: 42" in text, text[-4000:]
    assert "job rc: 0" in text and "job ran" in text, text[-4000:]
    # The token came with the set-up: the home directory holds no ~/.ray/auth_token afterwards.
    assert not (home / ".ray" / "auth_token").exists(), sorted(str(p) for p in home.rglob("*"))
