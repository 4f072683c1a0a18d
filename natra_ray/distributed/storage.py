"""The storage root on a cluster: checked to be one shared folder before any compute.

Everything ``StorageLayout`` names is written by one node and read by another (the head's cache
entries by a trial on a GPU node, a lost node's checkpoints by the node that resumes them), so
a root on one node's own disk fails late and confusingly: a trial "cannot find" a generator the
head just stored. ``check_shared`` asks every live node, before the sweep starts, to read a
marker the driver has just written there.
"""
from __future__ import annotations

import logging
import secrets
from typing import Dict, List

from natra_ray.config import ConfigError
from natra_ray.config_rules import parse_resources
from natra_ray.workflow.layout import StorageLayout

log = logging.getLogger(__name__)


def _reads(path: str, token: str) -> bool:
    try:
        with open(path) as fh:
            return fh.read() == token
    except OSError:
        return False


def check_shared(layout: StorageLayout, timeout_s: float = 60.0) -> None:
    """Raise ``ConfigError`` naming the nodes of the connected cluster that cannot read the
    storage root. A node that does not answer within ``timeout_s`` is only warned about (it may
    be busy starting up); nodes the autoscaler adds later get the same mount from
    ``ray_cluster.yaml``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    marker = layout.root / f".shared-check-{token}"
    marker.write_text(token)
    reads = ray.remote(num_cpus=0, max_retries=0)(_reads)
    try:
        refs: Dict[str, object] = {
            n["NodeID"]: reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(marker), token) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        answered = {node: ray.get(ref) for node, ref in refs.items() if ref in ready}
    finally:
        marker.unlink(missing_ok=True)
    addresses = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    blind: List[str] = [f"{addresses[node]} ({node[:8]})" for node, ok in answered.items() if not ok]
    if blind:
        raise ConfigError(
            f"storage root {layout.root} is not shared: {len(blind)} of {len(nodes)} node(s) cannot read it "
            f"({', '.join(blind)}); set tune.storage_path to a folder every node mounts at the same path "
            f"(EFS/NFS; ray_cluster.yaml mounts one at /mnt/natra)")
    if len(answered) < len(nodes):
        log.warning("%d node(s) did not answer the shared-storage check within %.0f s", len(nodes) - len(answered),
                    timeout_s)


def trial_resources(cfg) -> Dict[str, float]:
    """``tune.trial_resources`` as Ray resources: what each trial bundle adds to its CPUs/GPUs."""
    return parse_resources(cfg.tune.trial_resources)


__all__ = ["check_shared", "trial_resources"]
