"""The sweep's resource pre-check against the shipped ray_cluster.yaml: every bundle of every
profile fits a declared node type, trials run at once only as many as cannot deadlock the GPUs,
and the paper profile passes every check that runs before compute (no Ray, nothing trained)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from natra_ray.config import load_config
from natra_ray.distributed.resources import (
    NodeType,
    ResourceError,
    cluster_node_types,
    live_node_types,
    merge_live,
    node_types_from_yaml,
    not_live_yet,
    pack,
    reference_bundle,
    sweep_plan,
    total,
    upstream_bundle,
)
from natra_ray.distributed.tune import precheck_cluster
from natra_ray.search_space import (
    SEARCH_SPACE_DIR,
    SearchSpaceError,
    list_search_spaces,
    load_search_space,
    search_space_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "ray_cluster.yaml"
# this machine as ray.nodes() reports it: one live 2-core node, no GPU, no autoscaler
THIS_MACHINE = [{"NodeManagerAddress": "127.0.0.1", "Alive": True, "Resources": {"CPU": 2.0, "memory": 4e9}}]


def space_cfg(profile: str, space: str, **overrides):
    """The profile with the space, and the multi-objective switch a two-objective space says it needs."""
    raw = yaml.safe_load((SEARCH_SPACE_DIR / f"{space}.yaml").read_text())
    multi = {"tune.multi_objective": True} if len(raw.get("objectives") or []) > 1 else {}
    return load_config(profile, overrides={"tune.search_space": space, **multi, **overrides})


def claimed(profile: str) -> list[str]:
    return [n for n in list_search_spaces()
            if profile in (yaml.safe_load((SEARCH_SPACE_DIR / f"{n}.yaml").read_text()).get("profiles") or [])]


def cluster_cfg(profile: str, **overrides):
    return load_config(profile, overrides={"tune.cluster_yaml": str(CLUSTER), **overrides})


def gpus_of(bundles) -> float:
    return sum(b.resources.get("GPU", 0.0) * b.count for b in bundles)


@pytest.mark.parametrize("profile,gpu", [("smoke", False), ("smoke", True), ("cpu", False), ("cpu", True),
                                         ("paper", True)])
def test_every_bundle_of_each_profile_fits_the_shipped_cluster_and_cannot_deadlock_its_gpus(profile, gpu):
    cfg = cluster_cfg(profile)
    types = node_types_from_yaml(CLUSTER)
    plan = sweep_plan(cfg, types, gpu)
    for b in [*plan.trial, upstream_bundle(cfg, gpu, types), reference_bundle(cfg)]:
        assert any(t.holds(b.resources) for t in types), b
    # the upstream workers share one placement group; the trials' bundles all fit together
    assert pack([upstream_bundle(cfg, gpu, types)], types) is None
    assert pack(plan.trial, types, copies=plan.concurrent) is None
    assert plan.concurrent * gpus_of(plan.trial) <= total(types, "GPU")
    if plan.concurrent < cfg.tune.num_samples:  # the cluster, not the sample count, is the limit
        assert pack(plan.trial, types, copies=plan.concurrent + 1) is not None
    if profile == "paper":  # 4 one-GPU workers a trial, 8 g5.xlarge: two trials, every GPU used
        assert plan.concurrent == 2 and gpus_of(plan.trial) == 4
        assert upstream_bundle(cfg, gpu, types).resources == {"CPU": 4.0, "GPU": 1.0}  # a g5.xlarge's 4 vCPUs


def test_a_data_actor_with_a_whole_gpu_halves_the_paper_concurrency_and_overbooking_is_refused():
    types = node_types_from_yaml(CLUSTER)
    whole = cluster_cfg("paper", **{"tune.data_gpus": 1.0})  # what the Data actor used to reserve
    assert sweep_plan(whole, types, gpu=True).concurrent == 1  # 2 x (4 + 1) GPUs > 8: one at a time
    with pytest.raises(ResourceError) as e:
        sweep_plan(cluster_cfg("paper", **{"tune.data_gpus": 1.0, "tune.max_concurrent_trials": 2}), types, gpu=True)
    msg = str(e.value)
    assert "tune.max_concurrent_trials=2 but only 1 trial(s) fit" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("override,bundle", [
    ({"tune.upstream_cpus_per_worker": 8}, "upstream GAN/BIES worker"),  # the old min(8, head CPUs)
    ({"tune.cpus_per_worker": 6}, "Train worker"),
    ({"tune.data_cpus": 12.0}, "Data actor"),
])
def test_a_bundle_no_node_type_holds_is_one_line_naming_it_and_the_node_types(override, bundle):
    with pytest.raises(ResourceError) as e:
        sweep_plan(cluster_cfg("paper", **override), node_types_from_yaml(CLUSTER), gpu=True)
    msg = str(e.value)
    assert msg.startswith(f"the {bundle} bundle asks ") and "\n" not in msg, msg
    assert "head x1 (8 CPU); gpu_worker x8 (4 CPU + 1 GPU)" in msg and "lower tune." in msg, msg


def test_a_trial_wider_than_the_cluster_names_what_it_needs_and_has():
    with pytest.raises(ResourceError, match=r"^one trial needs 37 CPUs and 9 GPUs .* can have 40 CPUs and 8 GPUs \(node types: head"):
        sweep_plan(cluster_cfg("paper", **{"tune.train_workers": 9}), node_types_from_yaml(CLUSTER), gpu=True)


@pytest.mark.parametrize("space", claimed("paper"))
def test_the_paper_profile_passes_every_pre_compute_check_here_with_each_space_claiming_it(space):
    """What run_sweep checks before any compute, in its order, on this machine's one live node:
    the config (load_config), the search space, the cluster config, the resource plan."""
    cfg = space_cfg("paper", space)
    load_search_space(cfg.tune.search_space, cfg)
    plan = precheck_cluster(cfg, THIS_MACHINE)
    assert plan.concurrent == 2 and {t.name for t in plan.node_types} == {"head", "gpu_worker"}
    # the GPU workers are the autoscaler's to add (the job warns that they are not live yet)
    assert [b.name for b in not_live_yet(plan.trial, live_node_types(THIS_MACHINE))] == ["Train worker"]


def test_the_paper_profile_defaults_to_a_space_that_claims_it():
    assert load_config("paper").tune.search_space in claimed("paper")


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_every_shipped_space_loads_with_each_profile_it_claims(profile):
    assert claimed(profile), profile
    for name in claimed(profile):
        assert load_search_space(name, space_cfg(profile, name)).profiles


def test_a_space_that_does_not_fit_names_itself_the_profile_and_the_spaces_that_do():
    raw = {"profiles": ["cpu"], "params": {"robust.eps": {"type": "float", "low": 0.2, "high": 1.8}}}
    with pytest.raises(SearchSpaceError) as e:
        search_space_from_dict(raw, load_config("paper"), name="wide")
    msg = str(e.value)
    assert msg.startswith("search space 'wide': robust.eps high=1.8 exceeds robust.eps_cap=1.5"), msg
    assert "the space is for profiles cpu, not 'paper'; for 'paper' use tune.search_space=" in msg and "default" in msg


def test_live_nodes_within_a_declared_type_are_not_counted_twice():
    declared = node_types_from_yaml(CLUSTER)
    head = {"NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0, "memory": 3e10}}
    gpus = [{"NodeManagerAddress": f"10.0.1.{i}", "Resources": {"CPU": 4.0, "GPU": 1.0}} for i in range(10)]
    merged = merge_live(declared, live_node_types([head, *gpus]))
    assert total(merged, "GPU") == 10 and total(merged, "CPU") == 8 + 10 * 4  # 8 declared + 2 beyond max_workers
    big = merge_live(declared, live_node_types([{"NodeManagerAddress": "x", "Resources": {"CPU": 64.0}}]))
    assert total(big, "CPU") == 8 + 8 * 4 + 64


def test_without_a_cluster_config_the_live_nodes_are_the_cluster(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml
    cfg = load_config("smoke")
    assert cluster_node_types(cfg, THIS_MACHINE) == [NodeType("live node 127.0.0.1", THIS_MACHINE[0]["Resources"], 1)]
    with pytest.raises(ResourceError, match=r"^the upstream GAN/BIES worker bundle asks \d+ CPU \+ 1 GPU .*"
                                            r"\(node types: live node 127.0.0.1 x1 \(\d+ CPU\)\); the cluster has and "
                                            r"can add no GPU: set tune.use_gpu=no"):
        sweep_plan(load_config("paper", overrides={"tune.cluster_yaml": ""}), cluster_node_types(cfg, THIS_MACHINE),
                   gpu=True)


def test_a_cluster_config_without_resources_or_missing_is_one_clear_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({"max_workers": 2, "head_node_type": "head",
                                   "available_node_types": {"head": {"resources": {}, "node_config": {}}}}))
    with pytest.raises(ResourceError, match=r"node type 'head' declares no CPU resources; state them"):
        node_types_from_yaml(bad)
    with pytest.raises(ResourceError, match=r"^tune.cluster_yaml=nope.yaml does not exist"):
        cluster_node_types(load_config("smoke", overrides={"tune.cluster_yaml": "nope.yaml"}), [])
