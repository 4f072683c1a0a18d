"""ray_cluster.yaml passes Ray's own autoscaler validation and opens nothing but SSH."""
import re
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def test_ray_autoscaler_accepts_the_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(cfg)  # raises jsonschema.ValidationError / ValueError when malformed
    types = cfg["available_node_types"]
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] >= 1
    assert cfg["head_node_type"] == "head"


def test_only_ssh_is_open_to_the_world_and_ui_ports_bind_loopback():
    cfg = yaml.safe_load(CLUSTER.read_text())
    for perm in cfg["provider"]["security_group"]["IpPermissions"]:
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in perm.get("IpRanges", []))
        assert not world or (perm["FromPort"], perm["ToPort"]) == (22, 22), perm
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--host 127.0.0.1" in " ".join(cfg["head_setup_commands"])  # the UI for people


def test_trials_on_worker_nodes_reach_the_tracking_server():
    """The tracking server binds the head's private address (not loopback, which trial drivers
    on other nodes cannot reach, and not 0.0.0.0), and jobs started on the head get its URI."""
    cfg = yaml.safe_load(CLUSTER.read_text())
    setup = " ".join(cfg["head_setup_commands"])
    server = re.search(r'mlflow server --host ("[^"]+"|\S+) --port (\d+)', setup)
    assert server, setup
    private = "\"$(hostname -I | awk '{print $1}')\""
    assert server.group(1) == private
    start = " ".join(cfg["head_start_ray_commands"])
    assert f'MLFLOW_TRACKING_URI="http://{private[1:-1]}:{server.group(2)}"' in start
    ui = re.search(r"mlflow ui --host 127\.0\.0\.1 --port (\d+)", setup)
    assert ui and ui.group(1) != server.group(2)


def test_every_node_mounts_the_one_storage_root_and_jobs_use_it():
    """setup_commands (every node) mount the shared file system at the path the head's jobs get
    as NATRA_STORAGE, which natra_ray takes as tune.storage_path when none is given."""
    cfg = yaml.safe_load(CLUSTER.read_text())
    setup = " ".join(cfg["setup_commands"])
    mount = re.search(r"mount -t nfs4 .* (/\S+?)\) && sudo chown", setup)
    assert mount, setup
    root = mount.group(1)
    head = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    assert head and re.search(rf"(^|\s)NATRA_STORAGE={re.escape(root)}\s.*ray start --head", head[0]), head
    from natra_ray.config_rules import storage_problem

    assert storage_problem(root) is None
