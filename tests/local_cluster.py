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


# --------------------------------------------------------------------------- a second node
@dataclass
class Node:
    """A worker node joined to a ``Head``, in its own mount namespace (``start_node``)."""

    proc: subprocess.Popen
    temp_dir: str
    stash: str
    log: IO[str]


_HIDE_AND_EXEC = """set -e
mount --make-rprivate /
mount --bind "$SHARED" "$STASH"
for p in $PRIVATE; do mount -t tmpfs natra-private "$p"; done
mkdir -p "$SHARED"
mount --bind "$STASH" "$SHARED"
exec "$@"
"""


def start_node(head: Head, log_path: str | os.PathLike, shared: str | os.PathLike, private: List[str],
               num_cpus: int = 2, resources: Optional[Dict[str, float]] = None, timeout_s: float = 120,
               attempts: int = 3) -> Node:
    """``_start_node``, tried again when the node gave up starting: on a loaded machine its raylet
    can time out waiting for its own agents (a fixed wait in Ray)."""
    for attempt in range(attempts):
        try:
            return _start_node(head, log_path, shared, private, num_cpus, resources, timeout_s)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start_node(head: Head, log_path: str | os.PathLike, shared: str | os.PathLike, private: List[str],
                num_cpus: int, resources: Optional[Dict[str, float]], timeout_s: float) -> Node:
    """``ray start --address`` as a second node that sees its own empty folders over ``private``
    (the default storage, the head's temp dir, the test's tmp folders...) and, of everything
    they hid, only ``shared``: what a real second machine sees of the first. Needs root (a
    mount namespace, ``unshare --mount``); the node shares the network, so its ports are picked free."""
    import json

    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    ports = free_ports(len(flags))
    temp_dir = tempfile.mkdtemp(prefix="natra-n2-", dir="/tmp")
    stash = tempfile.mkdtemp(prefix="natra-stash-", dir="/tmp")  # where `shared` waits while its parents are hidden
    for p in private:
        Path(p).mkdir(parents=True, exist_ok=True)  # a mount point must exist
    cmd = [RAY, "start", f"--address={head.address}", "--block", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats",
           f"--resources={json.dumps(resources or {})}", *[f"--{f}={p}" for f, p in zip(flags, ports)]]
    log = open(log_path, "w")
    env = {**os.environ, "SHARED": str(shared), "STASH": stash, "PRIVATE": " ".join(map(str, private)),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_raylet_start_wait_time_s": "120"}
    proc = subprocess.Popen(["unshare", "--mount", "--", "bash", "-c", _HIDE_AND_EXEC, "node", *cmd],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    node = Node(proc, temp_dir, stash, log)
    deadline = time.time() + timeout_s
    while "Ray runtime started" not in Path(log_path).read_text():
        if proc.poll() is not None or time.time() > deadline:
            stop_node(node)
            raise RuntimeError(f"the second node did not start; see {log_path}")
        time.sleep(0.5)
    return node


def _descendants(pid: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_node(node: Node) -> None:
    """SIGKILL every process of the node (its ``ray start``, raylet, workers): a lost machine.
    Found by ancestry, so no process of the head or of any other cluster is touched."""
    import signal

    for pid in _descendants(node.proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.proc.wait(timeout=30)


def stop_node(node: Node) -> None:
    if node.proc.poll() is None:
        kill_node(node)
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    shutil.rmtree(node.stash, ignore_errors=True)
    node.log.close()
