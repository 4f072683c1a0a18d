"""Security: checkpoints never unpickle code; the dashboard and the MLflow UI bind to loopback
unless told otherwise (with a warning); Ray's token authentication stays on; the cluster config
opens nothing to the world but SSH."""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from natra_ray.checkpoints import CheckpointError, load_module, load_tensors, read_checkpoint
from natra_ray.distributed.ray_init import bind_host
from natra_ray.distributed.tracking import open_ui_command
from natra_ray.models import create_model
from natra_ray.models.latent import Directions
from natra_ray.stages.bies import load_encoder
from natra_ray.stages.gan import load_generator
from natra_ray.stages.lce import LatentCodes

from test_bad_input import call_job, error_line, folder_args, image_folder

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pickled code
class Payload:
    """Unpickling this object calls ``open(marker, "w")``: it creates a file, i.e. runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """A file shaped like one of ours (a checkpoint, or a directions/codes tensor file) with the
    payload inside."""
    marker = tmp_path / f"ran-{layout}"
    body = {"checkpoint": {"format_version": 1, "kind": "generator", "name": "style_tiny", "kwargs": {},
                           "state_dict": {"w": torch.zeros(1)}, "extra": {"x": Payload(marker)}},
            "tensors": {"format_version": 1, "kind": "directions", "vectors": torch.zeros(2, 2),
                        "scales": torch.ones(2), "estimator": "pca", "meta": {"x": Payload(marker)}}}[layout]
    path = tmp_path / f"evil-{layout}.pt"
    torch.save(body, path)
    return path, marker


def _factory(name, **kw):
    return create_model("generator", name, **kw)


LOADERS = {
    "read_checkpoint": ("checkpoint", read_checkpoint),
    "load_module": ("checkpoint", lambda p: load_module(p, kind="generator", factory=_factory)),
    "gan.load_generator": ("checkpoint", load_generator),
    "bies.load_encoder": ("checkpoint", load_encoder),
    "load_tensors": ("tensors", lambda p: load_tensors(p, "directions")),
    "Directions.load": ("tensors", Directions.load),
    "LatentCodes.load": ("tensors", LatentCodes.load),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_crafted_file_is_refused_and_its_code_never_runs(loader, tmp_path):
    layout, load = LOADERS[loader]
    path, marker = crafted(tmp_path, layout)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil-.*\.pt: it contains objects that are not "
                                              r"plain tensors/containers"):
        load(path)
    assert not marker.exists()
    # the payload is live: an unsafe load does run it (so the assertion above is not vacuous)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_crafted_generator_checkpoint_through_the_job(tmp_path, monkeypatch):
    """`gan.checkpoint=<crafted file>` on the real job: refused in one line, code not run."""
    path, marker = crafted(tmp_path, "checkpoint")
    folder = image_folder(tmp_path / "imgs")
    proc = call_job([*folder_args(folder), f"gan.checkpoint={path}"], tmp_path / "store", monkeypatch)
    assert re.search(r"^error: refusing to load .*evil-checkpoint\.pt", error_line(proc))
    assert not marker.exists() and not (tmp_path / "store").exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_code_path_unpickles_without_weights_only():
    """Every ``torch.load`` in the package, jobs and benchmarks passes ``weights_only=True``;
    nothing calls ``pickle.load(s)``, ``torch.jit.load`` or ``numpy.load(allow_pickle=True)``."""
    files = [p for d in ("natra_ray", "jobs", "bench") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20
    bad = []
    for f in files:
        for call, name in _calls(ast.parse(f.read_text(), str(f))):
            kw = {k.arg: k.value for k in call.keywords}
            where = f"{f.relative_to(REPO)}:{call.lineno} {name}"
            if name == "torch.load" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                             and kw["weights_only"].value is True):
                bad.append(where)
            if name in ("pickle.load", "pickle.loads", "torch.jit.load", "cloudpickle.load", "cloudpickle.loads"):
                bad.append(where)
            if name.endswith("np.load") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value is True:
                bad.append(where)
    assert not bad, bad


# --------------------------------------------------------------------------- loopback by default
def test_mlflow_ui_command_binds_loopback_and_exposing_it_warns(caplog):
    uri = "sqlite:////srv/runs/mlflow.db"
    with caplog.at_level(logging.WARNING):
        cmd = open_ui_command(uri)
    assert re.search(r"--host 127\.0\.0\.1 --port \d+$", cmd) and not caplog.records
    with caplog.at_level(logging.WARNING):
        exposed = open_ui_command(uri, host="0.0.0.0")
    assert "--host 0.0.0.0" in exposed
    assert any("the MLflow UI will listen on 0.0.0.0, not loopback" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False),
                                         ("::1", False), ("[::1]", False), ("0.0.0.0", True), ("10.0.0.5", True),
                                         ("::", True), ("head.example", True)])
def test_bind_host_warns_for_anything_but_loopback(host, warns, caplog):
    with caplog.at_level(logging.WARNING, logger="natra_ray.distributed.ray_init"):
        assert bind_host(host, "the explorer") == host
    assert bool(caplog.records) == warns


def _listening(port: int) -> set:
    """Local addresses (hex, as in /proc/net/tcp{,6}) of the sockets that LISTEN on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            addr, p = f[1].split(":")
            if f[3] == "0A" and int(p, 16) == port:
                out.add(addr)
    return out


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1

DASHBOARD_PROBE = r"""
import json, os, sys, urllib.request, urllib.error
from natra_ray.config import load_config
from natra_ray.distributed.ray_init import init_ray
import ray
init_ray(load_config("smoke"))
url = ray._private.worker.get_dashboard_url()
status = {}
for name, headers in (("anonymous", {}), ("bad_token", {"Authorization": "Bearer not-the-token"})):
    try:
        status[name] = urllib.request.urlopen(urllib.request.Request(f"http://{url}/api/version", headers=headers),
                                              timeout=30).status
    except urllib.error.HTTPError as e:
        status[name] = e.code
print(json.dumps({"url": url, "status": status}), flush=True)
sys.stdin.readline()  # keep the instance up while the test looks at its sockets
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_dashboard_binds_loopback_and_requires_the_token(tmp_path):
    """The local instance the job starts (``tune._init_ray`` without RAY_ADDRESS): its dashboard
    listens on 127.0.0.1 only, and with RAY_AUTH_MODE unset Ray's token authentication is on
    (an anonymous request gets 401, a wrong token 403)."""
    tmp = tempfile.mkdtemp(prefix="natra-sec-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update({"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen([sys.executable, "-c", DASHBOARD_PROBE], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:] if proc.poll() is not None else "no output"
        info = json.loads(line)
        host, port = info["url"].rsplit(":", 1)
        assert host == "127.0.0.1", info
        listening = _listening(int(port))
        assert listening and listening <= LOOPBACK_HEX, (info, listening)
        assert info["status"] == {"anonymous": 401, "bad_token": 403}, info
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- token authentication
@pytest.mark.ray
def test_cluster_refuses_requests_without_the_token(ray_cluster):
    """`ray start --head` as the README and conftest run it: the jobs API answers only to the
    cluster's token (the suite's own file, RAY_AUTH_TOKEN_PATH; on a user's machine
    ~/.ray/auth_token), which is how `ray job submit` authenticates (RAY_AUTH_MODE=token)."""
    import urllib.error
    import urllib.request

    def status(headers):
        try:
            return urllib.request.urlopen(urllib.request.Request(f"{ray_cluster['dashboard']}/api/jobs/",
                                                                 headers=headers), timeout=30).status
        except urllib.error.HTTPError as e:
            return e.code

    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert status({}) == 401
    assert status({"Authorization": "Bearer wrong"}) == 403
    assert status({"Authorization": f"Bearer {token}"}) == 200
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    ok = subprocess.run([ray, "job", "list", "--address", ray_cluster["dashboard"]], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_nothing_turns_token_authentication_off():
    texts = {p: p.read_text() for d in ("natra_ray", "jobs", "tests") for p in (REPO / d).rglob("*.py")}
    texts.update({p: p.read_text() for p in (REPO / "ray_cluster.yaml", REPO / "Makefile", REPO / "README.md")})
    off = [str(p.relative_to(REPO)) for p, t in texts.items()
           if p.name != "test_security.py" and re.search(r"RAY_AUTH_MODE\W{1,4}disabled", t)]
    assert not off, off


# --------------------------------------------------------------------------- the cluster config
def test_cluster_yaml_opens_only_ssh_to_the_world():
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    perms = cfg["provider"]["security_group"]["IpPermissions"]
    for perm in perms:
        world4 = any(r.get("CidrIp") == "0.0.0.0/0" for r in perm.get("IpRanges", []))
        world6 = any(r.get("CidrIpv6") == "::/0" for r in perm.get("Ipv6Ranges", []))
        if world4 or world6:
            assert (perm.get("IpProtocol"), perm["FromPort"], perm["ToPort"]) == ("tcp", 22, 22), perm
    assert any(p["FromPort"] == 22 for p in perms)
    commands = " ".join(str(c) for k in ("head_start_ray_commands", "head_setup_commands", "setup_commands",
                                         "worker_start_ray_commands") for c in cfg.get(k, []))
    assert "--dashboard-host=127.0.0.1" in commands and "--host 127.0.0.1" in commands
    assert not re.search(r"--(dashboard-)?host[= ]0\.0\.0\.0", commands)


def test_cluster_yaml_keeps_token_authentication_on_every_node():
    """Ray 2.60's `ray start` enables token auth only with RAY_AUTH_MODE=token (or a token already
    on the node): every node starts with it and gets the same token file."""
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all(re.search(r"(^|\s)RAY_AUTH_MODE=token\s+ray start", c) for c in starts), cfg[key]
    assert cfg["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"
