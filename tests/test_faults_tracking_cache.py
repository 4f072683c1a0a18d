"""Faults 4 and 5: the MLflow server unreachable at start or lost mid-sweep; two processes asking
the stage cache for one entry at once, and a cache writer killed mid-write.

Everything here is real: a real ``mlflow server`` (reached through a TCP relay in this process
that the test cuts and restores, which is how a network partition looks to the client), and
real processes with real files and ``SIGKILL`` for the cache.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from natra_ray import cache
from natra_ray.distributed.tracking import SweepTracker, TrackingError, ensure_experiment

from test_bad_input import assert_nothing_written, call_job, error_line, folder_args, image_folder, run_job

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("good") / "imgs")


# --------------------------------------------------------------------------- 4a. unreachable at start
def test_unreachable_tracking_server_fails_before_any_compute(tmp_path, good_folder):
    """`tracking.uri=http://127.0.0.1:<nothing listening>`: one line, exit 2, in seconds, before Ray
    starts and before any stage, run or folder exists."""
    port = free_port()
    storage = tmp_path / "store"
    proc = run_job([*folder_args(good_folder), f"tracking.uri=http://127.0.0.1:{port}"], storage)
    line = error_line(proc)
    assert line.startswith(f"error: MLflow tracking server at http://127.0.0.1:{port} is unreachable: "), line
    assert "mlflow server" in line  # says how to fix it
    assert_nothing_written(storage, proc)


def test_unreachable_server_from_the_environment(tmp_path, good_folder, monkeypatch):
    """The same through ``$MLFLOW_TRACKING_URI`` (how a cluster's jobs usually get it)."""
    port = free_port()
    storage = tmp_path / "store"
    proc = call_job(folder_args(good_folder), storage, monkeypatch,
                    env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}/"})
    assert f"MLflow tracking server at http://127.0.0.1:{port}/ is unreachable" in error_line(proc)
    assert_nothing_written(storage, proc)


# --------------------------------------------------------------------------- 4b. lost mid-sweep
class Relay:
    """A TCP relay from a loopback port to the MLflow server. ``cut()`` closes the listener and
    every open connection (the client sees refused connections, as when the server is gone);
    ``restore()`` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.conns: list = []
        self.lock = threading.Lock()
        self.listener = None
        self.restore()

    def restore(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        self.listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone does not
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback (SQLite backend, proxied artifacts), in its own
    process group so teardown stops exactly it."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import requests

    deadline = time.time() + 300
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not start; see {log.name}")
        time.sleep(1)
    yield f"http://127.0.0.1:{port}", port
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def relayed_trial(mlflow_server, monkeypatch, request):
    """A trial's tracker talking to the server through a relay; MLflow's own HTTP retries are
    shortened (they would otherwise back off for minutes before ours even start)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    direct, port = mlflow_server
    relay = Relay(port)
    name = f"faults-{request.node.name}"
    sweep = SweepTracker(relay.uri, ensure_experiment(relay.uri, name))
    sweep.start_parent(name)
    trial = sweep.trial_tracker("t0001", params={"robust.eps": 0.5})
    trial.start()
    yield relay, trial, direct
    relay.cut()


def metric_steps(uri: str, run_id: str, key: str) -> dict:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


@pytest.mark.slow
def test_lost_server_is_retried_and_the_metrics_land(relayed_trial, caplog):
    """The server vanishes for ~1.5 s mid-trial: the write is retried with backoff and stored."""
    relay, trial, direct = relayed_trial
    trial.log_metrics({"val_acc": 0.5}, step=1)
    relay.cut()
    threading.Timer(1.5, relay.restore).start()
    with caplog.at_level(logging.WARNING, logger="natra_ray.distributed.tracking"):
        trial.log_metrics({"val_acc": 0.75}, step=2)  # first attempt refused; a retry succeeds
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert metric_steps(direct, trial.run_id, "val_acc") == {1: 0.5, 2: 0.75}  # read past the relay


@pytest.mark.slow
def test_lost_server_fails_the_trial_loudly(relayed_trial):
    """The server stays away: after its retries the write raises TrackingError naming what was
    lost (a trial that raises ends ERROR in Tune), never a silent drop."""
    relay, trial, direct = relayed_trial
    trial.log_metrics({"val_acc": 0.5}, step=1)
    relay.cut()
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=rf"MLflow refused to log 1 metric\(s\) at step 2 to run "
                                            rf"{trial.run_id} after 4 attempts"):
        trial.log_metrics({"val_acc": 0.75}, step=2)
    assert 3 <= time.monotonic() - t0 < 60  # it did back off (0.5 + 1 + 2 s) before giving up
    assert metric_steps(direct, trial.run_id, "val_acc") == {1: 0.5}


# --------------------------------------------------------------------------- 5. the stage cache
# One process asking the cache for entry ("gan", KEY). ``produce`` logs that it ran (to count
# computations), then writes a 4 MiB payload in 64 slices with pauses, so a reader that could
# see a half-written entry would. Modes: "go" waits for ``need`` processes to be ready, then asks;
# "hang" stops for good in the middle of writing (after touching ``inside``) until it is killed.
WORKER = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from natra_ray import cache

root, mode, need = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
SLICE = hashlib.sha256(b"natra").digest() * 2048  # 64 KiB

def produce(tmp):
    with open(root / "computed.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(tmp / "payload.bin", "wb") as f:
        for i in range(64):
            f.write(SLICE)
            f.flush()
            if mode == "hang" and i == 32:
                (root / "inside").touch()
                time.sleep(600)
            time.sleep(0.01)
    return {"sha256": hashlib.sha256(SLICE * 64).hexdigest()}

(root / f"ready-{os.getpid()}").touch()
while len(list(root.glob("ready-*"))) < need:
    time.sleep(0.005)
entry = cache.cached(root, "gan", "k" * 16, produce)
got = hashlib.sha256((entry / "payload.bin").read_bytes()).hexdigest()
print(json.dumps({"entry": str(entry), "intact": got == cache.read_manifest(entry)["summary"]["sha256"]}))
"""


def start_worker(root: Path, mode: str, need: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(root), mode, str(need)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def computations(root: Path) -> int:
    log = root / "computed.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_two_processes_asking_at_once_compute_once_and_both_read_it_intact(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    procs = [start_worker(root, "go", need=2) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert computations(root) == 1
    assert all(r["intact"] for r in results) and results[0]["entry"] == results[1]["entry"]
    entry = Path(results[0]["entry"])
    assert sorted(p.name for p in entry.iterdir()) == ["_complete.json", "payload.bin"]
    assert not list(root.glob(".gan-*"))  # no temporary folder left behind


def test_a_killed_writer_leaves_nothing_that_is_read(tmp_path):
    """SIGKILL in the middle of writing: the half-written data never becomes the entry; a
    process already waiting for it takes over (the kernel drops the dead writer's lock) and
    computes it afresh; the killed writer's temporary folder is removed."""
    root = tmp_path / "cache"
    root.mkdir()
    writer = start_worker(root, "hang")
    deadline = time.time() + 120
    while not (root / "inside").exists():
        assert writer.poll() is None and time.time() < deadline, writer.stderr.read() if writer.poll() is not None else "timeout"
        time.sleep(0.05)
    final = cache.entry_dir(root, "gan", "k" * 16)
    half = list(root.glob(".gan-*"))
    assert len(half) == 1 and (half[0] / "payload.bin").stat().st_size < 64 * 65536  # really half-written
    waiter = start_worker(root, "go")  # blocks on the writer's lock
    time.sleep(1.0)
    assert waiter.poll() is None and not final.exists()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    result = finish(waiter)
    assert computations(root) == 2  # the waiter recomputed; it did not take the half entry
    assert result["intact"] and cache.is_complete(final)
    assert not list(root.glob(".gan-*"))  # the dead writer's temporary folder is gone


def test_an_entry_without_its_manifest_is_never_read(tmp_path):
    """The other half-way state a killed writer can leave (renamed into place, manifest not yet
    written): it does not count as an entry and the next caller redoes it."""
    root = tmp_path / "cache"
    final = cache.entry_dir(root, "gan", "k" * 16)
    final.mkdir(parents=True)
    (final / "payload.bin").write_bytes(b"half")
    calls = []

    def produce(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "payload.bin").write_bytes(b"whole")
        return {}

    assert not cache.is_complete(final)
    entry = cache.cached(root, "gan", "k" * 16, produce)
    assert len(calls) == 1 and (entry / "payload.bin").read_bytes() == b"whole" and cache.is_complete(entry)
    assert cache.cached(root, "gan", "k" * 16, produce) == entry and len(calls) == 1  # now a hit
