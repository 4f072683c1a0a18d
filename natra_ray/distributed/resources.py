"""What a sweep asks of a cluster, and whether the cluster can ever give it. No Ray here: the
callers pass the live nodes in (``ray.nodes()``), so every rule is tested without a cluster.

A cluster is a list of ``NodeType`` s (resources, and how many such nodes can exist at once):
the node types of the autoscaler's config - ``tune.cluster_yaml``, else the
``~/ray_bootstrap_config.yaml`` that ``ray up`` leaves on the head - plus every live node that is
not one of them. A local machine without an autoscaler is just its live node.

A sweep asks for ``Bundle`` s: the GAN / BIES workers (before the trials, all at once: one
placement group), the reference tasks, and per trial its driver, its Train workers (one
placement group) and its Data actor. Each bundle must fit some node type; trials run at once only
as many as fit together, every bundle of each of them placed: a trial whose workers hold their
GPUs while its Data actor waits for one another trial holds would wait forever.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natra_ray.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the autoscaler's config on a `ray up` head
MAX_NODES_PER_TYPE = 256  # packing expands node types into nodes; more than this is never the limit
_EPS = 1e-9


class ResourceError(ConfigError):
    """The requested shape can never fit the cluster."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: Mapping[str, float]
    count: int  # nodes of this type the cluster can have at once

    def holds(self, need: Mapping[str, float]) -> bool:
        return _holds(self.resources, need)

    def describe(self) -> str:
        return f"{self.name} x{self.count} ({fmt(self.resources)})"


@dataclass(frozen=True)
class Bundle:
    name: str  # what asks, as an error names it ("Train worker")
    resources: Mapping[str, float]
    count: int = 1  # how many of it a trial (or the stage) places at once
    knobs: str = ""  # the config keys that size it

    def describe(self) -> str:
        return f"{self.count} {self.name}{'s' if self.count != 1 else ''} x ({fmt(self.resources)})"


@dataclass(frozen=True)
class SweepPlan:
    """What the pre-check found: the cluster it counted and the trials that fit at once."""

    node_types: tuple
    trial: tuple  # the Bundles of one trial
    concurrent: int

    def describe(self) -> str:
        return (f"cluster {', '.join(t.describe() for t in self.node_types)}; one trial = "
                f"{' + '.join(b.describe() for b in self.trial)} -> {self.concurrent} at once")


def fmt(res: Mapping[str, float]) -> str:
    """{"CPU": 4, "GPU": 1} -> "4 CPU + 1 GPU": CPU and GPU first, then custom resources; zero
    amounts and Ray's own bookkeeping (memory, object store, ``node:<ip>``) left out."""
    custom = sorted(k for k in res if k not in ("CPU", "GPU", "memory", "object_store_memory") and ":" not in k)
    keys = [k for k in ("CPU", "GPU") if k in res] + custom
    return " + ".join(f"{res[k]:g} {k}" for k in keys if res[k] > 0) or "nothing"


def _holds(free: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in need.items() if v > 0)


def total(types: Iterable[NodeType], key: str) -> float:
    return sum(t.resources.get(key, 0.0) * t.count for t in types)


# --------------------------------------------------------------------------- the cluster
def cluster_yaml_path(cfg: Config) -> Path | None:
    """``tune.cluster_yaml`` (relative: to the working directory, then the repository), else the
    head's bootstrap config when there is one, else None (the live nodes are the cluster)."""
    given = cfg.tune.cluster_yaml
    if not given:
        boot = Path(os.path.expanduser(BOOTSTRAP_CONFIG))
        return boot if boot.is_file() else None
    p = Path(os.path.expanduser(given))
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, REPO / p]):
        if cand.is_file():
            return cand
    raise ResourceError(f"tune.cluster_yaml={given} does not exist; give the cluster config `ray up` uses "
                        f"(e.g. ray_cluster.yaml) or leave it empty")


def node_types_from_yaml(path: Path) -> list[NodeType]:
    """A Ray cluster config's ``available_node_types``: the head type once, every other type up to
    its ``max_workers`` (and the cluster's). Each must declare its CPU / GPU resources."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ResourceError(f"cluster config {path} is not readable YAML: {' '.join(str(e).split())}") from None
    types = raw.get("available_node_types") if isinstance(raw, Mapping) else None
    if not isinstance(types, Mapping) or not types:
        raise ResourceError(f"cluster config {path} has no available_node_types; the sweep cannot be checked against it")
    cluster_max = int(raw.get("max_workers", MAX_NODES_PER_TYPE))
    out = []
    for name, t in types.items():
        res = {k: float(v) for k, v in ((t or {}).get("resources") or {}).items()}
        if res.get("CPU", 0) <= 0:
            raise ResourceError(f"cluster config {path}: node type {name!r} declares no CPU resources; state them "
                                f"(resources: {{CPU: 4, GPU: 1}}) so bundles can be checked against it")
        n = 1 if name == raw.get("head_node_type") else min(int(t.get("max_workers", cluster_max)), cluster_max)
        out.append(NodeType(str(name), res, min(n, MAX_NODES_PER_TYPE)))
    return out


def live_node_types(nodes: Iterable[Mapping[str, Any]]) -> list[NodeType]:
    """``ray.nodes()`` -> one NodeType per alive node (its numeric resources)."""
    return [NodeType(f"live node {n.get('NodeManagerAddress', '?')}",
                     {k: float(v) for k, v in n.get("Resources", {}).items() if isinstance(v, (int, float))}, 1)
            for n in nodes if n.get("Alive", True)]


def merge_live(declared: Sequence[NodeType], live: Sequence[NodeType]) -> list[NodeType]:
    """The declared node types plus each live node that none of them covers (a live node within
    a declared type's resources is taken to be one of its nodes, up to the type's count)."""
    left = {t.name: t.count for t in declared}
    extra = []
    for node in live:
        fits = [t for t in declared if left[t.name] > 0 and all(t.resources.get(k, 0.0) + _EPS >= node.resources.get(k, 0.0)
                                                               for k in ("CPU", "GPU"))]
        if fits:
            left[min(fits, key=lambda t: (t.resources.get("GPU", 0.0), t.resources.get("CPU", 0.0))).name] -= 1
        else:
            extra.append(node)
    return [*declared, *extra]


def cluster_node_types(cfg: Config, nodes: Iterable[Mapping[str, Any]]) -> list[NodeType]:
    """What the cluster has now (``nodes``: ``ray.nodes()``) and what its autoscaler can add."""
    path = cluster_yaml_path(cfg)
    live = live_node_types(nodes)
    return merge_live(node_types_from_yaml(path), live) if path else live


# --------------------------------------------------------------------------- the bundles
def data_actor_resources(cfg: Config, gpu: bool) -> dict[str, float]:
    """The Ray Data decode actor: ``tune.data_cpus``, and a ``tune.data_gpus`` share of a GPU
    when the trial trains on GPUs (0 by default: a whole GPU for it would idle a Train worker's)."""
    return {"CPU": cfg.tune.data_cpus, "GPU": cfg.tune.data_gpus if gpu else 0.0}


def trial_bundles(cfg: Config, gpu: bool) -> list[Bundle]:
    """A trial's bundles, its own process first (what Tune reserves for it)."""
    t = cfg.tune
    if t.inline:  # the trial's own process trains: no Train worker group, no Data actor
        return [Bundle("trial (trained inline)", {"CPU": float(t.cpus_per_worker), "GPU": 1.0 if gpu else 0.0}, 1,
                       "tune.cpus_per_worker")]
    out = [Bundle("trial driver", {"CPU": t.driver_cpus}, 1, "tune.driver_cpus"),
           Bundle("Train worker", {"CPU": float(t.cpus_per_worker), "GPU": 1.0 if gpu else 0.0}, t.train_workers,
                  "tune.train_workers / tune.cpus_per_worker")]
    if t.data_stream:
        out.append(Bundle("Data actor", data_actor_resources(cfg, gpu), 1, "tune.data_cpus / tune.data_gpus"))
    return out


def upstream_cpus(cfg: Config, gpu: bool, types: Sequence[NodeType]) -> int:
    """CPUs per GAN / BIES worker: ``tune.upstream_cpus_per_worker``, else a host node's share
    (at most 8: one torch thread each), the host being the biggest node type that has the GPU a
    worker needs (a g5.xlarge's 4 vCPUs, not the CPU head's 8)."""
    if cfg.tune.upstream_cpus_per_worker:
        return cfg.tune.upstream_cpus_per_worker
    hosts = [t for t in types if not gpu or t.resources.get("GPU", 0.0) >= 1]
    if not hosts:
        return 1
    host = max(hosts, key=lambda t: t.resources.get("CPU", 0.0))
    workers = cfg.tune.upstream_workers
    per_node = min(workers, int(host.resources.get("GPU", 0.0))) if gpu else workers
    return int(max(1, min(8, host.resources.get("CPU", 1.0) // max(1, per_node))))


def upstream_bundle(cfg: Config, gpu: bool, types: Sequence[NodeType]) -> Bundle:
    return Bundle("upstream GAN/BIES worker", {"CPU": float(upstream_cpus(cfg, gpu, types)), "GPU": 1.0 if gpu else 0.0},
                  cfg.tune.upstream_workers, "tune.upstream_workers / tune.upstream_cpus_per_worker")


def reference_bundle(cfg: Config) -> Bundle:
    return Bundle("reference task", {"CPU": float(cfg.tune.cpus_per_worker)}, len(cfg.tune.references),
                  "tune.cpus_per_worker / tune.references")


# --------------------------------------------------------------------------- fitting
def pack(bundles: Sequence[Bundle], types: Sequence[NodeType], copies: int = 1) -> Bundle | None:
    """Place ``copies`` x every bundle on the cluster's nodes, biggest first, each on the first node
    with room (a bundle without GPUs tries GPU-less nodes first, as Ray's scheduler does). Returns
    the first bundle that found no room, None when everything fits. First-fit is not optimal
    packing, so the concurrency it gives is a safe lower bound."""
    free = [dict(t.resources) for t in types for _ in range(min(t.count, MAX_NODES_PER_TYPE))]
    items = sorted((b for b in bundles for _ in range(b.count * copies)),
                   key=lambda b: (-b.resources.get("GPU", 0.0), -b.resources.get("CPU", 0.0)))
    for b in items:
        order = free if b.resources.get("GPU", 0.0) > 0 else sorted(free, key=lambda f: f.get("GPU", 0.0) > 0)
        node = next((f for f in order if _holds(f, b.resources)), None)
        if node is None:
            return b
        for k, v in b.resources.items():
            node[k] = node.get(k, 0.0) - v
    return None


def check_fits_some_node(bundles: Sequence[Bundle], types: Sequence[NodeType]) -> None:
    for b in bundles:
        if b.count and not any(t.holds(b.resources) for t in types):
            no_gpu = b.resources.get("GPU", 0.0) > 0 and not total(types, "GPU")
            fix = ("the cluster has and can add no GPU: set tune.use_gpu=no, or name a cluster config with GPU "
                   "nodes in tune.cluster_yaml" if no_gpu else
                   f"lower {b.knobs}, or declare a node type that holds it in tune.cluster_yaml")
            raise ResourceError(f"the {b.name} bundle asks {fmt(b.resources)} but no node type holds that "
                                f"(node types: {'; '.join(t.describe() for t in types)}); {fix}")


def _trial_shortfall(cfg: Config, bundles: Sequence[Bundle], types: Sequence[NodeType]) -> str:
    t = cfg.tune
    cpus = sum(b.resources.get("CPU", 0.0) * b.count for b in bundles)
    gpus = sum(b.resources.get("GPU", 0.0) * b.count for b in bundles)
    parts = (f"trained inline in the trial's process, tune.cpus_per_worker={t.cpus_per_worker}" if t.inline else
             f"driver {t.driver_cpus:g} + {t.train_workers} Train workers x {t.cpus_per_worker}" +
             (f" + Data {t.data_cpus:g}" if t.data_stream else ""))
    if not gpus:
        return (f"one trial needs {cpus:g} CPUs ({parts}) but the cluster has {total(types, 'CPU'):g}; "
                f"lower tune.train_workers / tune.cpus_per_worker or add nodes")
    has_cpus, has_gpus = total(types, "CPU"), total(types, "GPU")
    short = cpus > has_cpus + _EPS or gpus > has_gpus + _EPS
    return (f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs ({parts}, 1 GPU per worker"
            f"{f' + Data {t.data_gpus:g}' if t.data_stream and t.data_gpus else ''}) but the cluster can have "
            f"{has_cpus:g} CPUs and {has_gpus:g} GPUs{'' if short else ', not on nodes that hold its bundles together'} "
            f"(node types: {'; '.join(nt.describe() for nt in types)}); lower tune.train_workers or add nodes")


def not_live_yet(bundles: Sequence[Bundle], live: Sequence[NodeType]) -> list[Bundle]:
    """The bundles no live node holds: they wait for the autoscaler to add a node that does."""
    return [b for b in bundles if b.count and not any(t.holds(b.resources) for t in live)]


def max_trials(bundles: Sequence[Bundle], types: Sequence[NodeType], limit: int) -> int:
    """The most trials (at most ``limit``) whose bundles all fit the cluster together."""
    n = 0
    while n < limit and pack(bundles, types, copies=n + 1) is None:
        n += 1
    return n


def sweep_plan(cfg: Config, types: Sequence[NodeType], gpu: bool, num_samples: int | None = None) -> SweepPlan:
    """Every bundle of the sweep against ``types``; the trials that may run at once. Raises one
    ``ResourceError`` line naming the bundle that can never be placed."""
    trial = trial_bundles(cfg, gpu)
    upstream = upstream_bundle(cfg, gpu, types)
    check_fits_some_node([upstream, reference_bundle(cfg), *trial], types)
    if pack([upstream], types) is not None:
        raise ResourceError(f"the {upstream.describe()} must run at once, but the cluster "
                            f"({'; '.join(t.describe() for t in types)}) cannot hold them together; "
                            f"lower {upstream.knobs}")
    if pack(trial, types) is not None:
        raise ResourceError(_trial_shortfall(cfg, trial, types))
    limit = num_samples or cfg.tune.num_samples
    fit = max_trials(trial, types, max(limit, cfg.tune.max_concurrent_trials))
    want = cfg.tune.max_concurrent_trials
    if want > fit:
        raise ResourceError(f"tune.max_concurrent_trials={want} but only {fit} trial(s) fit the cluster at once "
                            f"({' + '.join(b.describe() for b in trial)} each): more would hold resources another "
                            f"trial waits for; lower it, or 0 to derive it")
    return SweepPlan(tuple(types), tuple(trial), want or max(1, min(fit, limit)))


__all__ = [
    "Bundle",
    "NodeType",
    "ResourceError",
    "SweepPlan",
    "cluster_node_types",
    "cluster_yaml_path",
    "data_actor_resources",
    "live_node_types",
    "max_trials",
    "merge_live",
    "node_types_from_yaml",
    "not_live_yet",
    "pack",
    "sweep_plan",
    "trial_bundles",
    "upstream_bundle",
    "upstream_cpus",
]
