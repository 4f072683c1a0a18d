"""Search spaces: every malformed space fails at load with its own one-line message, the shipped
spaces load against the smoke and cpu profiles, and define-by-run sampling with a real Optuna
TPE study only ever produces valid configs (conditions, layer order, determinism)."""
from __future__ import annotations

import re

import copy
import pickle

import optuna
import pytest
import yaml

from natra_ray.augment import list_methods
from natra_ray.config import ConfigError, load_config
from natra_ray.config_rules import ORDERS
from natra_ray.search_space import (
    SEARCH_SPACE_DIR,
    SearchSpace,
    SearchSpaceError,
    list_search_spaces,
    load_search_space,
    search_space_from_dict,
)
from natra_ray.search_space.space import num_ws_of

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONDITIONAL = {  # param -> methods for which default.yaml samples it
    "robust.rho": {"natra", "natra_ol"},
    "robust.label_smoothing_c": {"natra", "natra_oa", "natra_ol"},
    "encoder.lce_codes": {"natra", "natra_oa"},
}


@pytest.fixture(scope="module")
def cpu():
    return load_config("cpu")


@pytest.fixture(scope="module")
def smoke():
    return load_config("smoke")


def good_space() -> dict:
    return {"params": {
        "robust.method": {"type": "categorical", "choices": ["natra", "none"]},
        "robust.eps": {"type": "float", "low": 0.1, "high": 1.0},
        "robust.rho": {"type": "float", "low": 0.02, "high": 0.3, "when": {"robust.method": ["natra"]}},
        "robust.layer_start": {"type": "int", "low": 0, "high": 7},
        "robust.layer_end": {"type": "int", "low": 0, "high": 7},
        "encoder.lce_codes": {"type": "int", "low": 1, "high": 3},
        "robust.num_directions": {"type": "int", "low": 2, "high": 8},
        "robust.pgd_steps": {"type": "int", "low": 1, "high": 3},
    }}


def with_params(**changes) -> dict:
    """good_space() with params replaced (value None = removed); keys use '__' for '.'."""
    d = copy.deepcopy(good_space())
    for k, v in changes.items():
        key = k.replace("__", ".")
        if v is None:
            d["params"].pop(key, None)
        else:
            d["params"][key] = v
    return d


# --------------------------------------------------------------------------- shipped spaces
@pytest.mark.parametrize("profile", ["smoke", "cpu"])
@pytest.mark.parametrize("name", ["default", "smoke"])
def test_shipped_spaces_load(name, profile):
    base = load_config(profile)
    space = load_search_space(name, base)
    assert isinstance(space, SearchSpace) and space.name == name
    assert space.source.endswith(f"search_spaces/{name}.yaml")
    assert set(space.param_names()) <= set(base.flat())
    assert space.objectives[0].metric == base.tune.metric and not space.multi_objective
    method = space.params["robust.method"]
    assert set(method.choices) <= set(list_methods())
    # $directions.num_directions resolved against this profile's base config
    if "robust.num_directions" in space.params:
        assert space.params["robust.num_directions"].high == base.directions.num_directions


def test_smoke_space_is_tiny(smoke):
    space = load_search_space("smoke", smoke)
    p = space.params
    assert p["robust.method"].choices == ("natra",)
    assert p["encoder.lce_codes"].choices == (1, 2)
    assert p["robust.pgd_steps"].high <= 2
    assert {"robust.eps", "robust.rho", "robust.label_smoothing_c", "robust.layer_start",
            "robust.layer_end"} <= set(p)


def test_multi_objective_space(cpu):
    with pytest.raises(SearchSpaceError, match="tune.multi_objective=false"):
        load_search_space("multi_objective", cpu)
    space = load_search_space("multi_objective", cpu.replace(**{"tune.multi_objective": True}))
    assert space.multi_objective
    assert space.metrics == ["val_acc", "val_shift_mean_acc"] and space.modes == ["max", "max"]
    with pytest.raises(SearchSpaceError, match="at least two metrics"):
        load_search_space("default", cpu.replace(**{"tune.multi_objective": True}))


def test_names_paths_and_round_trip(cpu, tmp_path):
    assert {"default", "smoke"} <= set(list_search_spaces())
    with pytest.raises(SearchSpaceError, match=r"unknown search space 'nope'.*default.*smoke"):
        load_search_space("nope", cpu)
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_search_space(str(tmp_path / "missing.yaml"), cpu)
    space = load_search_space(SEARCH_SPACE_DIR / "default.yaml", cpu)
    f = tmp_path / "copy.yaml"
    f.write_text(yaml.safe_dump(space.to_dict()))
    again = load_search_space(str(f), cpu)
    assert again.params == space.params and again.objectives == space.objectives
    assert again.name == "copy"
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: {robust.eps: {type: float, low: [}")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        load_search_space(str(bad), cpu)


# --------------------------------------------------------------------------- malformed spaces
BAD = {
    "unknown key": (with_params(robust__epss={"type": "float", "low": 0.1, "high": 1.0}),
                    r"unknown config key 'robust.epss'; did you mean: robust.eps"),
    "missing low": (with_params(robust__eps={"type": "float", "high": 1.0}), r"robust.eps: type float needs 'low'"),
    "missing high": (with_params(robust__eps={"type": "float", "low": 0.1}), r"robust.eps: type float needs 'high'"),
    "low > high": (with_params(robust__eps={"type": "float", "low": 1.0, "high": 0.5}),
                   r"robust.eps: low=1.0 is greater than high=0.5"),
    "unknown type": (with_params(robust__eps={"type": "uniform", "low": 0, "high": 1}),
                     r"robust.eps: unknown type 'uniform'; allowed types: float, int, categorical, fixed"),
    "missing type": (with_params(robust__eps={"low": 0, "high": 1}), r"robust.eps: missing 'type'"),
    "unknown spec key": (with_params(robust__eps={"type": "float", "low": 0.1, "high": 1.0, "hi": 2}),
                         r"robust.eps: unknown spec key\(s\) hi"),
    "empty choices": (with_params(robust__method={"type": "categorical", "choices": []}),
                      r"robust.method: categorical needs a non-empty list 'choices'"),
    "str choice for int": (with_params(robust__pgd_steps={"type": "categorical", "choices": [1, "three"]}),
                           r"robust.pgd_steps choice 'three' is not valid.*expects int"),
    "float range for int": (with_params(robust__pgd_steps={"type": "float", "low": 1, "high": 3}),
                            r"robust.pgd_steps: config key 'robust.pgd_steps' is an int; use type: int"),
    "range for literal": (with_params(cvae__recon={"type": "int", "low": 0, "high": 2}),
                          r"cvae.recon: type int cannot drive.*use type: categorical"),
    "bad literal choice": (with_params(cvae__recon={"type": "categorical", "choices": ["bce", "l1"]}),
                           r"cvae.recon choice 'l1' is not valid"),
    "fixed wrong type": (with_params(robust__pgd_steps={"fixed": "two"}), r"robust.pgd_steps value='two' is not valid"),
    "log with low 0": (with_params(robust__eps={"type": "float", "low": 0.0, "high": 1.0, "log": True}),
                       r"robust.eps: log=true needs low > 0"),
    "step not dividing": (with_params(robust__eps={"type": "float", "low": 0.1, "high": 1.0, "step": 0.4}),
                          r"robust.eps: high - low = 0.9 is not a multiple of step=0.4"),
    "unregistered method": (with_params(robust__method={"type": "categorical", "choices": ["natra", "natra_typo"]}),
                            r"robust.method choice 'natra_typo' is not a registered augmentation method; choose one of: .*natra_oa"),
    "negative eps": (with_params(robust__eps={"type": "float", "low": -0.1, "high": 1.0}),
                     r"^search space 'bad': robust.eps low=-0.1 must be >= 0$"),
    "eps above cap": (with_params(robust__eps={"type": "float", "low": 0.1, "high": 2.5}),
                      r"robust.eps high=2.5 exceeds robust.eps_cap=2.0 \(base config\)"),
    "rho reaches cap": (with_params(robust__rho={"type": "float", "low": 0.1, "high": 2.0}),
                        r"robust.rho high=2.0 reaches the truncation cap robust.eps_cap=2.0 \(base config\)"),
    "rho vs searched cap": (with_params(robust__eps={"type": "float", "low": 0.1, "high": 0.2},
                                        robust__eps_cap={"type": "float", "low": 0.25, "high": 3.0}),
                            r"robust.rho high=0.3 reaches the truncation cap robust.eps_cap low=0.25"),
    "cap below base rho": (with_params(robust__rho=None, robust__eps=None,
                                       robust__eps_cap={"type": "float", "low": 0.05, "high": 3.0}),
                           r"robust.eps=0.5 \(base config\) exceeds robust.eps_cap low=0.05"),
    "lce codes < 1": (with_params(encoder__lce_codes={"type": "int", "low": 0, "high": 3}),
                      r"encoder.lce_codes low=0 must be >= 1"),
    "layer end too high": (with_params(robust__layer_end={"type": "int", "low": 0, "high": 8}),
                           r"robust.layer_end high=8 is outside the generator's layer range \(data.image_size=32 gives num_ws=8"),
    "layer start negative": (with_params(robust__layer_start={"type": "int", "low": -1, "high": 3}),
                             r"robust.layer_start low=-1 is outside the generator's layer range"),
    "inverted layer range": (with_params(robust__layer_start={"type": "int", "low": 5, "high": 7},
                                         robust__layer_end={"type": "int", "low": 0, "high": 3}),
                             r"inverted layer range: robust.layer_start low=5 > robust.layer_end high=3"),
    "start above end high": (with_params(robust__layer_start={"type": "int", "low": 0, "high": 6},
                                         robust__layer_end={"type": "int", "low": 2, "high": 4}),
                             r"robust.layer_start high=6 exceeds robust.layer_end high=4"),
    "fixed start > fixed end": (with_params(robust__layer_start={"fixed": 5}, robust__layer_end={"fixed": 2}),
                                r"inverted layer range: robust.layer_start fixed value 5 > robust.layer_end fixed value 2"),
    "too many directions": (with_params(robust__num_directions={"type": "int", "low": 2, "high": 12}),
                            r"robust.num_directions high=12 exceeds directions.num_directions=8 \(base config\)"),
    "when unknown param": (with_params(robust__rho={"type": "float", "low": 0.02, "high": 0.3,
                                                    "when": {"robust.methd": ["natra"]}}),
                           r"robust.rho: 'when' refers to 'robust.methd', which is not a parameter of this space"),
    "when non-categorical": (with_params(robust__rho={"type": "float", "low": 0.02, "high": 0.3,
                                                      "when": {"robust.eps": [0.5]}}),
                             r"robust.rho: 'when' refers to robust.eps, which is a float parameter"),
    "when unknown choice": (with_params(robust__rho={"type": "float", "low": 0.02, "high": 0.3,
                                                     "when": {"robust.method": ["natra_oa"]}}),
                            r"robust.rho: 'when' robust.method: 'natra_oa' is not one of its choices \['natra', 'none'\]"),
    "bad ref": (with_params(robust__num_directions={"type": "int", "low": 2, "high": "$directions.num_direction"}),
                r"high='\$directions.num_direction' refers to unknown config key.*did you mean: directions.num_directions"),
    "config range rule": (with_params(robust__classic_contrast={"type": "float", "low": 0.0, "high": 1.0}),
                          r"^search space 'bad': robust.classic_contrast high=1.0 must be in \[0, 1\)$"),
    "config cross-key rule": (with_params(cvae__family={"type": "categorical", "choices": ["rotation", "folders"]}),
                              r"cvae.family choice 'folders' gives an invalid config: cvae.family=folders needs cvae.pairs_x"),
    "objective mode": ({**good_space(), "objectives": [{"metric": "val_acc", "mode": "maximize"}]},
                       r"objectives\[0\] \(val_acc\): mode must be 'max' or 'min'; got 'maximize'"),
    "objective metric": ({**good_space(), "objectives": [{"metric": 3, "mode": "max"}]},
                         r"objectives\[0\]: metric must be a non-empty string; got 3"),
    "no params": ({"params": {}}, r"'params' must be a non-empty mapping"),
    "unknown top key": ({**good_space(), "param": {}}, r"unknown top-level key\(s\) 'param'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_space_fails_with_its_message(case, cpu):
    raw, pattern = BAD[case]
    with pytest.raises(SearchSpaceError, match=pattern) as ei:
        search_space_from_dict(raw, cpu, name="bad")
    msg = str(ei.value)
    assert isinstance(ei.value, ConfigError)
    assert msg.startswith("search space 'bad': ") and "\n" not in msg


def test_good_space_is_valid_and_unknown_key_suggests(cpu):
    assert search_space_from_dict(good_space(), cpu, name="good").sampled_names()
    # layer_end alone is fine while its low >= the base layer_start (2 in the cpu profile)
    end_from_2 = with_params(robust__layer_start=None, robust__layer_end={"type": "int", "low": 2, "high": 7})
    assert "robust.layer_end" in search_space_from_dict(end_from_2, cpu).params
    with pytest.raises(ConfigError) as ei:  # callers catching ConfigError catch it
        search_space_from_dict(with_params(robust__lable_smoothing_c={"fixed": 0.1}), cpu, name="x")
    assert "robust.label_smoothing_c" in str(ei.value)


def test_base_dependent_checks(cpu):
    # rho's range is fine for eps_cap=2.0 but reaches a smaller base cap
    low_cap = cpu.replace(**{"robust.eps_cap": 0.3, "robust.eps": 0.2, "robust.rho": 0.05})
    with pytest.raises(SearchSpaceError, match=r"robust.rho high=0.3 reaches the truncation cap robust.eps_cap=0.3"):
        search_space_from_dict(with_params(robust__eps={"type": "float", "low": 0.1, "high": 0.3}), low_cap)
    # a conditional param's base value counts too: rho absent -> base rho must be < searched cap
    raw = with_params(robust__eps=None, robust__rho={"type": "float", "low": 0.01, "high": 0.05,
                                                     "when": {"robust.method": ["natra"]}},
                      robust__eps_cap={"type": "float", "low": 0.08, "high": 1.0})
    with pytest.raises(SearchSpaceError, match=r"robust.rho base value 0.1 \(used when robust.method in \['natra'\] "
                                               r"is false\) reaches the truncation cap robust.eps_cap low=0.08"):
        search_space_from_dict(raw, cpu.replace(**{"robust.eps": 0.05}))
    # 16 px images have 6 style inputs: layers 0..5
    with pytest.raises(SearchSpaceError, match=r"robust.layer_start high=7 .*num_ws=6"):
        search_space_from_dict(good_space(), cpu.replace(**{"data.image_size": 16}))
    # base layer_start above a searched end's low
    with pytest.raises(SearchSpaceError, match=r"robust.layer_end low=0 is below robust.layer_start=3 \(base config\)"):
        search_space_from_dict(with_params(robust__layer_start=None), cpu.replace(**{"robust.layer_start": 3}))


# --------------------------------------------------------------------------- what a trial applies
# One key per family a sweep does not apply per trial, with a valid range or choice for it: the
# refusal comes before any check of the values.
NOT_PER_TRIAL = {
    "data.image_size": ({"type": "categorical", "choices": [16, 32]}, "upstream key (it keys the GAN;"),
    "data.train_subset": ({"type": "int", "low": 100, "high": 400}, "upstream key (it keys the GAN;"),
    "data.val_fraction": ({"type": "float", "low": 0.05, "high": 0.2}, "upstream key (it keys the GAN;"),
    "gan.steps": ({"type": "int", "low": 100, "high": 1000}, "upstream key (it keys the GAN;"),
    "gan.r1_gamma": ({"type": "float", "low": 0.001, "high": 1.0, "log": True}, "upstream key (it keys the GAN;"),
    "encoder.steps": ({"type": "int", "low": 10, "high": 100}, "upstream key (it keys BIES"),
    "encoder.lpips_net": ({"type": "categorical", "choices": ["alex", "vgg"]}, "upstream key (it keys BIES"),
    "encoder.shift_steps": ({"fixed": 5}, "upstream key (it keys BIES"),
    "directions.num_directions": ({"type": "int", "low": 4, "high": 8}, "upstream key (it keys the directions;"),
    "directions.estimator": ({"type": "categorical", "choices": ["umap", "pca"]},
                             "upstream key (it keys the directions;"),
    "directions.layer_end": ({"type": "int", "low": 2, "high": 7}, "upstream key (it keys the directions;"),
    "tune.num_samples": ({"type": "int", "low": 2, "high": 4}, "setting of the sweep itself"),
    "tune.train_workers": ({"type": "int", "low": 1, "high": 2}, "setting of the sweep itself"),
    "tracking.experiment": ({"type": "categorical", "choices": ["a", "b"]}, "setting of the sweep itself"),
    "benchmark.epochs": ({"type": "int", "low": 1, "high": 2}, "setting of the sweep itself"),
}


@pytest.mark.parametrize("key", list(NOT_PER_TRIAL))
def test_keys_a_trial_does_not_apply_are_refused(key, cpu):
    spec, why = NOT_PER_TRIAL[key]
    with pytest.raises(SearchSpaceError) as ei:
        search_space_from_dict({"params": {"robust.eps": {"type": "float", "low": 0.1, "high": 1.0}, key: spec}},
                               cpu, name="x")
    msg = str(ei.value)
    assert msg.startswith(f"search space 'x': {key} is a") and why in msg and "\n" not in msg, msg
    assert f"the base value {cpu.flat()[key]!r}" in msg or f"where it is {cpu.flat()[key]!r}" in msg
    assert f"set it in the config ({key}=...)" in msg and "remove it from the space" in msg
    if "upstream" in why:
        assert "computed once per sweep from the base config" in msg and "one sweep per value" in msg


def test_the_upstream_message_reads_as_documented(cpu):
    with pytest.raises(SearchSpaceError) as ei:
        search_space_from_dict({"params": {"gan.steps": {"type": "int", "low": 100, "high": 1000}}}, cpu, name="x")
    assert str(ei.value) == (
        "search space 'x': gan.steps is an upstream key (it keys the GAN; GAN, BIES and directions are computed "
        f"once per sweep from the base config, so every trial would silently use the base value {cpu.gan.steps}); "
        "set it in the config (gan.steps=...) and run one sweep per value, or remove it from the space")


def test_keys_a_trial_applies_are_accepted(cpu):
    raw = {"params": {
        "robust.method": {"type": "categorical", "choices": ["natra", "vae_mixup", "cvae"]},
        "robust.eps": {"type": "float", "low": 0.1, "high": 1.0},
        "robust.classifier_width": {"type": "categorical", "choices": [8, 16]},
        "encoder.lce_codes": {"type": "int", "low": 1, "high": 3},
        "encoder.lce_steps": {"type": "int", "low": 2, "high": 5},
        "vae.z_dim": {"type": "int", "low": 8, "high": 32},
        "vae.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "cvae.beta": {"type": "float", "low": 0.5, "high": 2.0},
        "seed": {"type": "categorical", "choices": [0, 1]},
        "data.test_subset": {"fixed": 200},  # the trial loads its own test split (in no upstream key)
        # a bound may still read an upstream key: it is the base value, the same in every trial
        "robust.num_directions": {"type": "int", "low": 2, "high": "$directions.num_directions"},
    }}
    space = search_space_from_dict(raw, cpu, name="ok")
    assert set(space.params) == set(raw["params"])
    assert space.params["robust.num_directions"].high == cpu.directions.num_directions


def test_every_key_is_either_applied_or_refused(cpu):
    """Exhaustive: each config key, fixed at its base value, is refused as one a trial does not
    apply exactly when ``applied_per_trial`` says so (a fixed robust.layer_end=-1 fails later, on
    the layer range: still a key a trial applies)."""
    from natra_ray.workflow.upstream import applied_per_trial

    accepted = set()
    for key, value in cpu.flat().items():
        try:
            search_space_from_dict({"params": {key: {"fixed": value}}}, cpu, name="x")
        except SearchSpaceError as e:
            if str(e).startswith((f"search space 'x': {key} is an upstream key",
                                  f"search space 'x': {key} is part of the evaluation every trial is scored by",
                                  f"search space 'x': {key} is a setting of the sweep itself")):
                continue
        accepted.add(key)
    assert accepted == {k for k in cpu.flat() if applied_per_trial(k)}
    sections = {k.split(".")[0] for k in accepted}
    assert sections == {"robust", "vae", "cvae", "encoder", "data", "seed", "device"}
    assert {k for k in accepted if k.startswith(("encoder.", "data."))} == (
        {k for k in cpu.flat() if k.startswith("encoder.lce_")} | {"data.test_subset", "data.download"})


def _perturbed(cfg, key: str):
    """``cfg`` with ``key`` changed to some other value of its type, unvalidated (only keys are read)."""
    import dataclasses

    def other(v):
        if isinstance(v, bool):
            return not v
        if isinstance(v, (int, float)):
            return v + 1
        if isinstance(v, str):
            return v + "_other"
        return (*v, v[0]) if v else ("x",)

    section, _, name = key.partition(".")
    if not name:
        return dataclasses.replace(cfg, **{section: other(getattr(cfg, section))})
    sec = getattr(cfg, section)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sec, **{name: other(getattr(sec, name))})})


def test_the_classification_is_what_the_cache_keys_cover(cpu):
    """``upstream_stage`` names the first upstream key a change of the config key changes (and
    None when none changes); what a trial applies changes no upstream key - its codes' key for
    ``encoder.lce_*``, its extra model's for ``vae.*`` / ``cvae.*``."""
    from pathlib import Path

    from natra_ray.workflow.upstream import (Upstream, applied_per_trial, codes_key, extra_model_key,
                                             upstream_keys, upstream_stage)

    base = upstream_keys(cpu)
    up = Upstream(Path("/x/bies-k/generator_shifted.pt"), Path("/x/bies-k/encoder.pt"), Path("/x/d/directions.pt"), {}, {})
    for key in cpu.flat():
        cfg = _perturbed(cpu, key)
        keys = upstream_keys(cfg)
        changed = [stage for stage in ("gan", "bies", "directions") if keys[stage] != base[stage]]
        assert upstream_stage(key) == (changed[0] if changed else None), key
        if applied_per_trial(key):
            assert not changed, key
        if key.startswith("encoder.lce_") and key != "encoder.lce_codes":  # lce_codes is the n_codes argument
            assert codes_key(cfg, up, "val", 5, 2) != codes_key(cpu, up, "val", 5, 2), key
        for kind in ("vae", "cvae"):
            if key.startswith(f"{kind}."):
                assert extra_model_key(cfg, kind) != extra_model_key(cpu, kind), key


# --------------------------------------------------------------------------- sampling
def run_study(space: SearchSpace, base, n: int = 30, seed: int = 0):
    """A real TPE study; the objective is a cheap function of the params. Returns the list of
    flat trial dicts and the configs they produce."""
    seen, cfgs = [], []

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        assert params == {**trial.params, **(space.define_by_run(trial) or {})}
        cfg = space.sample_config(base, params)
        seen.append(params)
        cfgs.append(cfg)
        r = cfg.robust
        return r.eps - 0.1 * (r.layer_end - r.layer_start) + 0.01 * r.pgd_steps + (r.method == "natra")

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n)
    return seen, cfgs


def test_define_by_run_produces_valid_configs(cpu):
    space = load_search_space("default", cpu)
    seen, cfgs = run_study(space, cpu)
    assert len(seen) == 30
    methods = set()
    for params, cfg in zip(seen, cfgs):
        m = params["robust.method"]
        methods.add(m)
        assert m in list_methods()
        assert 0 <= params["robust.layer_start"] <= params["robust.layer_end"] <= 7
        assert cfg.robust.layer_start == params["robust.layer_start"]
        assert cfg.robust.layer_end == params["robust.layer_end"]
        assert 0.1 <= cfg.robust.eps <= 1.5 and 2 <= cfg.robust.num_directions <= 8
        for key, active_for in CONDITIONAL.items():
            assert (key in params) == (m in active_for), (key, m, params)
            if key not in params:  # absent -> the base value stays
                assert cfg.flat()[key] == cpu.flat()[key]
    assert len(methods) >= 3  # the conditions were exercised both ways


def test_same_seed_same_sequence(smoke):
    space = load_search_space("default", smoke)
    a, _ = run_study(space, smoke, n=12, seed=7)
    b, _ = run_study(space, smoke, n=12, seed=7)
    c, _ = run_study(space, smoke, n=12, seed=8)
    assert a == b
    assert a != c


def test_fixed_values_are_returned_constants(cpu):
    raw = with_params(robust__pgd_steps={"fixed": 2},
                      robust__label_smoothing_c={"fixed": 0.2, "when": {"robust.method": ["natra"]}},
                      robust__classic_rotation_deg={"fixed": 5.0})
    space = search_space_from_dict(raw, cpu, name="fx")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        consts = space.define_by_run(trial)
        assert consts["robust.pgd_steps"] == 2 and consts["robust.classic_rotation_deg"] == 5.0
        assert "robust.pgd_steps" not in trial.params  # constants are returned, not suggested
        assert ("robust.label_smoothing_c" in consts) == (trial.params["robust.method"] == "natra")
        cfg = space.sample_config(cpu, {**trial.params, **consts})
        assert cfg.robust.pgd_steps == 2 and cfg.robust.classic_rotation_deg == 5.0
        assert cfg.robust.label_smoothing_c == (0.2 if trial.params["robust.method"] == "natra" else 0.1)
        study.tell(trial, 0.0)


def test_sample_config_rejects_foreign_params(cpu):
    space = search_space_from_dict(good_space(), cpu, name="g")
    ok = {"robust.method": "natra", "robust.rho": 0.1, "robust.eps": 0.5}
    assert space.sample_config(cpu, ok).robust.rho == 0.1
    with pytest.raises(SearchSpaceError, match="'robust.lr' is not a parameter of this space"):
        space.sample_config(cpu, {**ok, "robust.lr": 0.1})
    with pytest.raises(SearchSpaceError, match=r"robust.rho=0.1 given but its condition robust.method in \['natra'\]"):
        space.sample_config(cpu, {"robust.method": "none", "robust.rho": 0.1})
    with pytest.raises(SearchSpaceError, match="robust.eps=5.0 lies outside its spec"):
        space.sample_config(cpu, {"robust.eps": 5.0})
    with pytest.raises(SearchSpaceError, match="need 0 <= start <= end"):
        space.sample_config(cpu, {"robust.layer_start": 6, "robust.layer_end": 2})
    assert space.select({"robust.eps": 0.3, "other": 1}) == {"robust.eps": 0.3}


def test_ray_optuna_search_uses_dotted_flat_names(cpu):
    """The convention the Ray layer relies on: OptunaSearch(space=define_by_run) suggests a flat
    dict keyed by dotted config keys (no '/' so unflatten_dict leaves it alone)."""
    pytest.importorskip("ray.tune.search.optuna")
    from ray.tune.search.optuna import OptunaSearch

    raw = with_params(robust__pgd_steps={"fixed": 2})
    space = search_space_from_dict(raw, cpu, name="ray")
    searcher = OptunaSearch(space=space.define_by_run, metric=space.metrics[0], mode=space.modes[0],
                            sampler=optuna.samplers.TPESampler(seed=0))
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        assert all("." in k and not isinstance(v, dict) for k, v in config.items()), config
        assert config["robust.pgd_steps"] == 2
        cfg = space.sample_config(cpu, space.select(config))
        assert cfg.robust.layer_start <= cfg.robust.layer_end
        searcher.on_trial_complete(f"t{i}", {space.metrics[0]: 0.5, "training_iteration": 1})

    multi = load_search_space("multi_objective", cpu.replace(**{"tune.multi_objective": True}))
    mo = OptunaSearch(space=multi.define_by_run, metric=multi.metrics, mode=multi.modes,
                      sampler=optuna.samplers.TPESampler(seed=0))
    config = mo.suggest("m0")
    assert multi.sample_config(cpu, config).robust.method == config["robust.method"]
    mo.on_trial_complete("m0", {"val_acc": 0.9, "val_natural_acc": 0.5})


# --------------------------------------------------------------------------- one rule, asked twice
@pytest.mark.parametrize("order", ORDERS, ids=lambda o: f"{o.small}<={o.large}")
def test_orders_are_asked_not_restated(order, cpu):
    """A space that lets ``small`` pass ``large`` is refused in the config's own words (an order
    on a key no space may sample, the evaluation's, is the config's alone)."""
    from natra_ray.workflow.upstream import applied_per_trial

    flat = cpu.flat()
    small, high = flat[order.small], flat[order.large] + 1
    if not applied_per_trial(order.small):
        with pytest.raises(ConfigError, match=re.escape(order.why)):
            cpu.replace(**{order.small: high})
        return
    raw = {"params": {order.small: {"type": "int" if isinstance(small, int) else "float",
                                    "low": small, "high": high}}}
    with pytest.raises(SearchSpaceError) as space_err:
        search_space_from_dict(raw, cpu, name="o")
    with pytest.raises(ConfigError) as config_err:
        cpu.replace(**{order.small: high})
    assert f"{order.small} high={high} " in str(space_err.value)
    assert order.why in str(space_err.value) and order.why in str(config_err.value)


def test_layer_range_uses_the_generators_count():
    from natra_ray.models import create_generator

    for res in (8, 16, 32):
        G = create_generator("style", resolution=res, z_dim=8, w_dim=8, mapping_layers=1, channels=16)
        assert num_ws_of(res) == G.num_ws


# --------------------------------------------------------------------------- through Ray
def test_space_pickles_and_samples_the_same_after(cpu):
    """The Tune layer hands each trial the validated object (``tune.with_parameters(space=...)``):
    it pickles, keeps its name, and samples exactly as the original."""
    space = load_search_space("default", cpu)
    again = pickle.loads(pickle.dumps(space))
    assert again == space and again.name == "default" and again.source == space.source
    a, cfgs_a = run_study(space, cpu, n=6, seed=3)
    b, cfgs_b = run_study(again, cpu, n=6, seed=3)
    assert a == b and cfgs_a == cfgs_b


def test_the_evaluation_cannot_be_sampled(cpu):
    """Every trial is scored by the same attack and shift suite: a space that samples either (a
    trial picking an easier test for itself) is refused, naming the key."""
    for key, spec in (("eval.natural_steps", {"type": "int", "low": 1, "high": 5}),
                      ("eval.natural_directions", {"type": "int", "low": 1, "high": 2}),
                      ("eval.shift_severities", {"fixed": [1]})):
        with pytest.raises(SearchSpaceError, match=rf"{key} is part of the evaluation every trial is scored by"):
            search_space_from_dict({"params": {key: spec}}, cpu, name="x")
