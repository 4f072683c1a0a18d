"""Config: profiles load, overrides apply, and every kind of bad value names its key."""
import pickle
import re

import pytest

from natra_ray import config_rules
from natra_ray.config import (
    Config,
    ConfigError,
    from_dict,
    list_profiles,
    load_config,
    parse_override,
    plain,
    save_config,
    validate,
)


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_profiles_load_and_differ_from_defaults(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert isinstance(cfg.gan.steps, int) and cfg.gan.steps > 0


def test_profiles_listed():
    assert {"smoke", "cpu", "paper"} <= set(list_profiles())


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown profile 'gpu-monster'.*cpu, paper, smoke"):
        load_config("gpu-monster")


def test_override_types_are_parsed_and_applied():
    cfg = load_config("smoke", overrides=["gan.lr=0.001", "robust.apt=false", "eval.severities=[1,2]"])
    assert cfg.gan.lr == 0.001 and cfg.robust.apt is False and cfg.eval.severities == (1, 2)


def test_int_accepted_for_float_but_not_str_for_int():
    assert load_config("smoke", overrides={"robust.eps": 1}).robust.eps == 1.0
    with pytest.raises(ConfigError, match=r"'gan.steps' expects int; got 'many'"):
        load_config("smoke", overrides=["gan.steps=many"])


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="'gan.steps' expects int"):
        load_config("smoke", overrides={"gan.steps": True})


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides=["robust.epsilon=0.1"])
    msg = str(e.value)
    assert "robust.epsilon" in msg and "eps" in msg and "label_smoothing_c" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'robustness'"):
        load_config("smoke", overrides={"robustness.eps": 0.1})


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match="'directions.estimator' must be one of 'umap', 'pca'"):
        load_config("smoke", overrides=["directions.estimator=ica"])


@pytest.mark.parametrize("override, fragment", [
    ("robust.eps=-0.1", "robust.eps must be >= 0"),
    ("robust.rho=5.0", "robust.rho=5.0 reaches the truncation cap robust.eps_cap=2.0"),
    ("robust.eps=3.0", "robust.eps=3.0 exceeds robust.eps_cap=2.0"),
    ("robust.lr=0", "robust.lr must be > 0; got 0.0"),
    ("eval.severities=[0, 3]", "eval.severities must lie in 1..5; got [0, 3]"),
    ("encoder.lce_codes=0", "encoder.lce_codes must be >= 1"),
    ("data.image_size=30", "power of two"),
    ("robust.num_directions=99", "exceeds directions.num_directions"),
])
def test_range_checks(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config("smoke", overrides=[override])


def test_yaml_file_merges_and_round_trips(tmp_path):
    cfg = load_config("smoke", overrides=["gan.steps=7"])
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    again = load_config("cpu", config_file=path)  # the file wins over the cpu profile
    assert again.gan.steps == 7 and again.to_dict() == {**cfg.to_dict(), "profile": "cpu"}


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("gan: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("smoke", config_file=p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("smoke", config_file=tmp_path / "missing.yaml")


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("gan.steps")


def test_key_depends_only_on_named_sections():
    a = load_config("smoke")
    b = a.replace(**{"robust.eps": 0.3})
    assert a.key("data", "gan") == b.key("data", "gan")
    assert a.key("robust") != b.key("robust")
    assert isinstance(Config().flat()["gan.lr"], float)


# The four keys nothing ever read; they are gone, so setting one is a typo like any other.
REMOVED = {"output_dir": ("output_dir", "x"), "data.num_workers": ("data", {"num_workers": 2}),
           "robust.clean_weight": ("robust", {"clean_weight": 0.5}),
           "tracking.log_images": ("tracking", {"log_images": False})}


@pytest.mark.parametrize("key", sorted(REMOVED))
def test_removed_keys_are_unknown(key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config("smoke", overrides=[f"{key}={'x' if key == 'output_dir' else 2}"])
    top, value = REMOVED[key]
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        from_dict({top: value})
    assert key not in Config().flat()


def test_config_pickles():
    cfg = load_config("smoke", overrides=["robust.eps=0.3", "eval.severities=[1, 5]"])
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.key("robust", "eval") == cfg.key("robust", "eval")
    assert again.eval.severities == (1, 5)  # still a tuple, still frozen
    with pytest.raises(AttributeError):
        again.robust.eps = 1.0  # type: ignore[misc]


def test_rules_name_real_keys_and_pass_the_defaults():
    flat = Config().flat()
    keys = set(config_rules.RULES) | {k for o in config_rules.ORDERS for k in (o.small, o.large)}
    assert keys <= set(flat), keys - set(flat)
    assert list(config_rules.problems(flat)) == []
    for profile in list_profiles():
        validate(load_config(profile))


def test_one_rule_two_framings():
    """validate and the search space word a failure from the same Rule."""
    rule = config_rules.RULES["robust.eps"]
    assert rule.problem("robust.eps", -0.1) == "robust.eps must be >= 0; got -0.1"
    assert rule.problem("robust.eps", -0.1, "low=-0.1") == "robust.eps low=-0.1 must be >= 0"
    assert config_rules.value_problem("robust.eps", 0.0) is None
    assert config_rules.value_problem("robust.momentum", -5.0) is None  # no rule for that key
    assert plain({"a": (1, (2, 3))}) == {"a": [1, [2, 3]]}


@pytest.mark.parametrize("root, why", [("s3://bucket/natra", "object-store URIs cannot hold the stage cache"),
                                       ("results/natra", "an absolute path")])
def test_storage_root_must_be_a_path_every_node_opens(root, why):
    with pytest.raises(ConfigError, match=why):
        load_config("smoke", overrides=[f"tune.storage_path={root}"])


def test_trial_resources_are_custom_ray_resources():
    from natra_ray.distributed.storage import trial_resources

    cfg = load_config("smoke", overrides=["tune.trial_resources=[node2=1, a10g=0.5]"])
    assert trial_resources(cfg) == {"node2": 1.0, "a10g": 0.5}
    for bad in ("[GPU=1]", "[node2]", "[node2=0]", "[node2=x]"):
        with pytest.raises(ConfigError, match="tune.trial_resources must list custom Ray resources"):
            load_config("smoke", overrides=[f"tune.trial_resources={bad}"])
