"""Two real Ray nodes on this machine, sharing nothing but the storage root.

The second node runs in its own mount namespace (``local_cluster.start_node``): empty folders
hide the default storage (``~/natra_ray_results``), the head's Ray temp dir and this session's
tmp folders from it, all but the shared one. So everything a trial opens on it - the stage
cache, the codes, its checkpoints, the MLflow store - must come through ``tune.storage_path``,
as on a cluster whose nodes mount one EFS/NFS folder:

1. a sweep whose trials are pinned to the second node (``tune.trial_resources``) finishes, its
   trial recorded in MLflow and its classifier in the shared folder;
2. a storage root the second node cannot see is refused before any compute;
3. the second node lost mid-training (SIGKILL of all its processes, after an epoch was
   checkpointed): the run resumes on the head from the shared checkpoint, finished epochs kept.

A cluster of its own (not the session's): the second node hides folders the other tests use.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from local_cluster import kill_node, start_head, start_node, stop_head, stop_node

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="the second node needs a mount namespace: root and unshare(1)")]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, smoke_storage):
    """{"address", "head_temp", "shared"}: a 2-CPU head and a 2-CPU second node with the custom
    resource ``node2``. The shared folder is the session's smoke storage, so the smoke upstream
    other tests trained is reused (and kept for them)."""
    logs = tmp_path_factory.mktemp("two_nodes")
    # A lost node is noticed in ~3 s, not Ray's default ~30 s.
    env = {**os.environ, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    head = start_head(logs / "head.log", num_cpus=2, env=env)
    private = [str(Path.home() / "natra_ray_results"), head.temp_dir, str(tmp_path_factory.getbasetemp())]
    if Path("/tmp/ray").is_dir():
        private.append("/tmp/ray")
    try:
        node = start_node(head, logs / "node2.log", smoke_storage, private, num_cpus=2, resources={"node2": 100})
    except Exception:
        stop_head(head)
        raise
    yield {"address": head.address, "head": head, "node": node, "shared": smoke_storage, "logs": logs}
    stop_node(node)
    stop_head(head)


@contextmanager
def _driver_of(address: str):
    """This process as a driver of the two-node cluster, then back on the session's cluster (if
    it was on one): a process holds one Ray connection at a time."""
    import ray

    before = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    ray.shutdown()
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if before:
            ray.init(address=before, log_to_driver=False, configure_logging=False)


def _node_ids(address: str) -> dict:
    """{"head": id, "node2": id} of the live nodes."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")])
    return {("node2" if "node2" in (n.resources_total or {}) else "head"): n.node_id for n in nodes}


def _actors(address: str, class_name: str) -> list:
    from ray.util.state import list_actors

    return list_actors(address=address, filters=[("class_name", "=", class_name)], limit=1000, detail=True)


def test_trials_on_the_second_node_read_and_write_only_shared_storage(two_nodes, tmp_path):
    shared, address = two_nodes["shared"], two_nodes["address"]
    nodes = _node_ids(address)
    assert set(nodes) == {"head", "node2"}, nodes
    uri = f"sqlite:///{shared / 'two_nodes_mlflow.db'}"  # on the shared folder: node 2 logs to it
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(REPO / "jobs" / "tune_natra.py"), "--profile", "smoke", "tune.search_space=smoke",
           "tune.name=two-nodes", "tune.num_samples=1", f"tune.storage_path={shared}", f"tracking.uri={uri}",
           "tune.trial_resources=[node2=1]", "tune.trainer=train"]  # a Train worker beside the trial's driver
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    out = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, out

    import mlflow

    from natra_ray.distributed.tracking import _fluent_target

    with _fluent_target(uri):
        runs = mlflow.search_runs([mlflow.get_experiment_by_name("two-nodes").experiment_id])
    trials = runs[runs["tags.natra.role"] != "sweep"]
    assert len(trials) == 1 and trials.iloc[0]["status"] == "FINISHED", runs.T
    assert 0 <= trials.iloc[0]["metrics.test_clean_acc"] <= 1
    trial_id = trials.iloc[0]["tags.natra.trial_id"]
    assert (shared / "trials" / trial_id / "classifier.pt").is_file()
    # The custom resource reached the trial's driver and its Train worker: both ran on node 2.
    for cls in ("ImplicitFunc", "RayTrainWorker"):
        pinned = [a for a in _actors(address, cls) if any(k.startswith("node2") for k in a.required_resources or {})]
        assert pinned and {a.node_id for a in pinned} == {nodes["node2"]}, (cls, pinned)


def test_a_root_the_second_node_cannot_see_is_refused(two_nodes, tmp_path):
    from natra_ray.config import ConfigError
    from natra_ray.distributed.storage import check_shared
    from natra_ray.workflow.layout import StorageLayout

    with _driver_of(two_nodes["address"]):
        check_shared(StorageLayout(two_nodes["shared"]))  # the shared one passes
        with pytest.raises(ConfigError, match=r"is not shared: 1 of 2 node\(s\) cannot read it"):
            check_shared(StorageLayout(tmp_path / "head_only"))  # under the tmp folders node 2 does not see


def test_lost_node_resumes_on_the_head_from_the_shared_checkpoint(two_nodes):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from natra_ray.config import load_config
    from natra_ray.distributed.train import fit_robust, load_result_state
    from natra_ray.workflow.upstream import load_splits

    from test_faults import wait_for_registered_checkpoint
    from test_ray_layer import tiny_job

    address = two_nodes["address"]
    work = Path(tempfile.mkdtemp(prefix="lost-node-", dir=two_nodes["shared"]))
    cfg = load_config("smoke", overrides={
        "robust.method": "none", "robust.epochs": 3, "robust.batch_size": 64, "robust.classifier_width": 8,
        "robust.lr": 0.05, "robust.num_directions": 4, "data.train_subset": 1600, "data.test_subset": 200,
        "tune.data_stream": False, "tune.max_failures": 2})
    nodes = _node_ids(address)
    run = work / "ray" / "lost"
    with _driver_of(address) as ray:
        # The head's CPUs held, so the worker starts on node 2; freed once node 2 is gone.
        class Holder:
            def ready(self) -> bool:
                return True

        holder = ray.remote(num_cpus=2, scheduling_strategy=NodeAffinitySchedulingStrategy(nodes["head"], soft=False))(
            Holder).remote()
        ray.get(holder.ready.remote())
        job = tiny_job(cfg, work, load_splits(cfg), "lost")

        import threading

        seen = {}

        def lose_node_after_first_checkpoint():
            wait_for_registered_checkpoint(run)
            seen["workers"] = {a.node_id for a in _actors(address, "RayTrainWorker") if a.state == "ALIVE"}
            kill_node(two_nodes["node"])
            seen["killed"] = True
            ray.kill(holder)

        t = threading.Thread(target=lose_node_after_first_checkpoint, daemon=True)
        t.start()
        earlier = {a.actor_id for a in _actors(address, "RayTrainWorker")}
        result = fit_robust(job, "lost", work / "ray")
        t.join(timeout=30)
        after = {a.node_id for a in _actors(address, "RayTrainWorker") if a.actor_id not in earlier}
    assert seen.get("killed"), "node 2 was never lost"
    assert seen["workers"] == {nodes["node2"]}, (seen, nodes)  # epoch 1 trained on node 2 ...
    assert after == {nodes["head"], nodes["node2"]}, after  # ... and the restarted group on the head
    assert result.error is None, result.error
    hist = load_result_state(result)["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    resumed = [(h["epoch"], h["resumed_from_epoch"]) for h in hist if "resumed_from_epoch" in h]
    # resumed once, right after the last checkpointed epoch (>= 1): no finished epoch redone
    assert len(resumed) == 1 and resumed[0][1] == resumed[0][0] - 1 >= 1, hist

