"""A real local Ray head for the tests, brought up exactly as the README's cluster section does
(``ray start --head`` with token authentication on), but carrying its own token.

Ray 2.60's ``ray start --head`` refuses to start when token authentication is on and no token
exists (``AuthenticationError``), and ``ray get-auth-token --generate`` always writes
``~/.ray/auth_token``. So that the suite never depends on (or writes into) the home directory,
the token lives in a temporary file named by ``RAY_AUTH_TOKEN_PATH``, which every Ray process
(head, workers, ``ray job submit``, a client's ``ray.init``) reads before the home directory.

Used by ``conftest.py`` and by the test that runs this set-up with an empty ``HOME``.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, List, Optional

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> List[int]:
    """``n`` distinct free ports: every socket stays bound until all are picked (ports asked for
    one at a time can come back twice, and Ray refuses two components on one port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def own_token(folder: str | os.PathLike) -> Path:
    """Write a fresh token (256 bits, Ray's own format) into ``folder`` and point this process
    and its children at it. Returns the token file."""
    path = Path(folder) / "ray_auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # a token in the environment would win over the file
    return path


@dataclass
class Head:
    proc: subprocess.Popen
    address: str  # the GCS address, for ray.init(address=...)
    dashboard: str  # http url, for ray job submit
    port: int
    temp_dir: str
    log: IO[str]

    def as_dict(self) -> Dict[str, str]:
        return {"address": self.address, "dashboard": self.dashboard}


def start_head(log_path: str | os.PathLike, num_cpus: int = 2, timeout_s: float = 120,
               env: Optional[Dict[str, str]] = None) -> Head:
    """``ray start --head --block`` on loopback, waiting until its dashboard answers."""
    # Every listening port picked free, not Ray's fixed defaults: a second head on this machine
    # (another test run, the user's own cluster) would otherwise take the job agent's port and
    # `ray job submit` would wait forever for "an available agent".
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    port, dash, *others = free_ports(2 + len(flags))
    agent_ports = [f"--{flag}={p}" for flag, p in zip(flags, others)]
    log = open(log_path, "w")
    # Our own temp dir (short: Ray's socket paths must stay under 107 chars) marks every
    # process of this cluster, so teardown stops exactly them and not a user's cluster.
    temp_dir = tempfile.mkdtemp(prefix="natra-rt-", dir="/tmp")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats", *agent_ports],
        stdout=log, stderr=subprocess.STDOUT,
        env={**(env if env is not None else os.environ), "RAY_USAGE_STATS_ENABLED": "0"})
    head = Head(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", port, temp_dir, log)
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2)
            return head
        except urllib.error.HTTPError:  # answering at all (401 under token auth) means it is up
            return head
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                stop_head(head)
                raise RuntimeError(f"ray start failed; see {log_path}")
            time.sleep(1)


def stop_head(head: Head) -> None:
    # `ray start --block` stops its processes gracefully on SIGTERM, which takes it ~30 s; a test
    # cluster has nothing to save, so after a short grace its processes are killed.
    head.proc.terminate()
    try:
        head.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        head.proc.kill()
        head.proc.wait(timeout=30)
    subprocess.run(["pkill", "-KILL", "-f", head.temp_dir], check=False)  # stragglers (gcs, raylet, workers)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    head.log.close()
    # `ray start` records the head in /tmp/ray/ray_current_cluster; a stale record makes a later
    # plain ray.init() try to join this dead cluster.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{head.port}"):
        current.unlink()
