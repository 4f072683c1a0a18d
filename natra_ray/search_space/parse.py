"""Reading a search space: YAML file or dict -> a validated ``SearchSpace``.

Parsing checks that each parameter is a key a trial applies (the upstream - GAN, BIES,
directions - is computed once per sweep from the base config, so sampling one of its keys would
change nothing: ``workflow.upstream.applied_per_trial`` says which), the form of each spec
(types, bounds, steps, conditions, objectives) and that every value is valid for its config
field (``natra_ray.config.coerce``); ``checks`` then asks the config's rules about the values the
space can produce. Every failure is one ``SearchSpaceError`` line naming the parameter.
"""
from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from natra_ray.config import (
    SECTIONS,
    Config,
    ConfigError,
    coerce,
    field_type,
    list_profiles,
    type_name,
)
from natra_ray.search_space.checks import check_values
from natra_ray.search_space.space import (
    LAYER_PAIRS,
    PARAM_TYPES,
    Objective,
    ParamSpec,
    SearchSpace,
    SearchSpaceError,
    is_num,
)

SEARCH_SPACE_DIR = Path(__file__).resolve().parents[2] / "search_spaces"

_SPEC_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
    "fixed": {"type", "value", "fixed", "when"},
}
_TOP_KEYS = {"params", "objectives", "description", "profiles"}
_MODES = ("max", "min")


# --------------------------------------------------------------------------- loading
def list_search_spaces() -> list[str]:
    return sorted(p.stem for p in SEARCH_SPACE_DIR.glob("*.yaml"))


def resolve_search_space(name_or_path: str | Path) -> Path:
    """A name (file stem in ``search_spaces/``) or an explicit path to a YAML file."""
    text = str(name_or_path)
    p = Path(text)
    looks_like_path = p.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
    if looks_like_path or p.is_file():
        if not p.is_file():
            raise SearchSpaceError(f"search space file {p} does not exist")
        return p
    cand = SEARCH_SPACE_DIR / f"{text}.yaml"
    if not cand.is_file():
        raise SearchSpaceError(f"unknown search space {text!r}; known search spaces in {SEARCH_SPACE_DIR}: "
                               f"{', '.join(list_search_spaces()) or '(none)'} (or pass a path to a YAML file)")
    return cand


def load_search_space(name_or_path: str | Path, base: Config) -> SearchSpace:
    """Read, parse and validate a search space against the config its trials will start from;
    the space is named after the file's stem."""
    path = resolve_search_space(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"search space {path.stem!r}: {path} is not valid YAML: "
                               f"{' '.join(str(e).split())}") from None
    return search_space_from_dict(raw, base, name=path.stem, source=str(path))


def search_space_from_dict(raw: Any, base: Config, name: str = "<dict>", source: str = "") -> SearchSpace:
    """Parse and validate the YAML form (see ``search_spaces/default.yaml``)."""
    where = f"search space {name!r}"

    def fail(msg: str) -> None:
        raise SearchSpaceError(f"{where}: {msg}")

    if not isinstance(base, Config):
        raise TypeError(f"base must be a natra_ray.config.Config; got {type(base).__name__}")
    if not isinstance(raw, Mapping):
        fail(f"must be a mapping with a 'params' section; got {type(raw).__name__}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        fail(f"unknown top-level key(s) {', '.join(map(repr, sorted(map(str, unknown))))}; "
             f"allowed: {', '.join(sorted(_TOP_KEYS))}")
    params_raw = raw.get("params")
    if not isinstance(params_raw, Mapping) or not params_raw:
        fail("'params' must be a non-empty mapping of config keys (section.key) to parameter specs")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        fail("'description' must be a string")

    profiles = _parse_profiles(raw.get("profiles"), fail)
    flat = base.flat()
    params: dict[str, ParamSpec] = {}
    for key, spec in params_raw.items():
        params[key] = _parse_param(key, spec, flat, set(params_raw), fail)
    _check_conditions(params, fail)
    objectives = _parse_objectives(raw.get("objectives"), base, fail)
    space = SearchSpace(name=name, params=params, objectives=objectives, source=source,
                        description=description, profiles=profiles)
    space.sampling_order()  # proves the order exists
    check_values(space, base, lambda msg: fail(msg + _claim_note(profiles, base.profile)))
    return space


def _parse_profiles(raw: Any, fail) -> tuple[str, ...]:
    """``profiles: [smoke, cpu]``: the profiles whose base config the space is sized for (tests
    load every shipped space with each profile it names)."""
    if raw is None:
        return ()
    known = list_profiles()
    if not isinstance(raw, list) or not raw or any(p not in known for p in raw):
        fail(f"'profiles' must be a non-empty list of profile names (known: {', '.join(known)}); got {raw!r}")
    return tuple(raw)


def _claim_note(profiles: tuple[str, ...], profile: str) -> str:
    """Said after a rule a space breaks, when the space names the profiles it is for."""
    if not profiles:
        return ""
    if profile in profiles:
        return f" (with profile {profile!r}, which the space claims to fit)"
    fits = [n for n in list_search_spaces() if profile in _declared_profiles(n)]
    hint = f"; for {profile!r} use tune.search_space={' or '.join(fits)}" if fits else ""
    return f" (the space is for profiles {', '.join(profiles)}, not {profile!r}{hint})"


def _declared_profiles(name: str) -> tuple[str, ...]:
    try:
        raw = yaml.safe_load((SEARCH_SPACE_DIR / f"{name}.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ()
    got = raw.get("profiles") if isinstance(raw, Mapping) else None
    return tuple(got) if isinstance(got, list) else ()


# --------------------------------------------------------------------------- one parameter
_STAGE_NAMES = {"gan": "the GAN", "bies": "BIES (the encoder and shifted generator)", "directions": "the directions"}


def _not_per_trial(key: str, flat: Mapping[str, Any]) -> str | None:
    """Why a trial would not apply ``key`` (None when it does). What a trial applies, and which
    upstream stage covers the rest, is ``workflow.upstream``'s (``applied_per_trial``,
    ``upstream_stage``), beside the cache keys that make it so."""
    from natra_ray.workflow.upstream import SCORING_SECTIONS, applied_per_trial, upstream_stage  # lazy: torch

    if applied_per_trial(key):
        return None
    if key.partition(".")[0] in SCORING_SECTIONS:
        return (f"{key} is part of the evaluation every trial is scored by (the same attack and shift suite for "
                f"all, or a trial could sample an easier test); set it in the config ({key}=...), or remove it "
                f"from the space")
    stage = upstream_stage(key)
    if stage is not None:
        return (f"{key} is an upstream key (it keys {_STAGE_NAMES[stage]}; GAN, BIES and directions are computed "
                f"once per sweep from the base config, so every trial would silently use the base value "
                f"{flat[key]!r}); set it in the config ({key}=...) and run one sweep per value, or remove it "
                f"from the space")
    return (f"{key} is a setting of the sweep itself, not of a trial (the sweep's search, resources and tracking "
            f"are set up once from the base config, where it is {flat[key]!r}); set it in the config ({key}=...), "
            f"or remove it from the space")


def _parse_param(key: Any, spec: Any, flat: Mapping[str, Any], space_keys: set, fail) -> ParamSpec:
    if not isinstance(key, str):
        fail(f"parameter names must be config keys like 'robust.eps'; got {key!r}")
    if key not in flat:
        near = difflib.get_close_matches(key, list(flat), n=5, cutoff=0.6)
        if not near and "." in key and key.split(".", 1)[0] in SECTIONS:
            sec = key.split(".", 1)[0]
            near = [k for k in flat if k.startswith(sec + ".")]
            fail(f"unknown config key {key!r}; keys in section {sec!r}: {', '.join(near)}")
        hint = f"; did you mean: {', '.join(near)}?" if near else f"; config sections: {', '.join(SECTIONS)}"
        fail(f"unknown config key {key!r}{hint}")
    if "/" in key:  # pragma: no cover - config keys never contain "/" (Ray's flatten delimiter)
        fail(f"{key}: parameter names must not contain '/'")
    if (why := _not_per_trial(key, flat)):
        fail(why)
    if not isinstance(spec, Mapping):
        fail(f"{key}: spec must be a mapping like {{type: float, low: 0.1, high: 1.0}}, "
             f"{{type: categorical, choices: [...]}} or {{fixed: value}}; got {spec!r}")
    spec = dict(spec)
    if "fixed" in spec:
        if spec.get("type", "fixed") != "fixed" or "value" in spec:
            fail(f"{key}: 'fixed: value' cannot be combined with 'type' or 'value'")
        typ = "fixed"
        spec["value"] = spec.pop("fixed")
    elif "type" not in spec:
        fail(f"{key}: missing 'type' (one of {', '.join(PARAM_TYPES)}; or write {{fixed: value}})")
    else:
        typ = spec["type"]
        if typ not in PARAM_TYPES:
            fail(f"{key}: unknown type {typ!r}; allowed types: {', '.join(PARAM_TYPES)}")
    extra = set(spec) - _SPEC_KEYS[typ] - {"type"}
    if extra:
        fail(f"{key}: unknown spec key(s) {', '.join(sorted(map(str, extra)))} for type {typ}; "
             f"allowed: {', '.join(sorted(_SPEC_KEYS[typ] - {'fixed'}))}")

    ftype = field_type(key)

    def ref(v: Any, what: str) -> Any:
        """``$section.key`` = that key's value in the base config."""
        if isinstance(v, str) and v.startswith("$"):
            rk = v[1:]
            if rk not in flat:
                near = difflib.get_close_matches(rk, list(flat), n=3, cutoff=0.6)
                fail(f"{key}: {what}={v!r} refers to unknown config key {rk!r}"
                     + (f"; did you mean: {', '.join(near)}?" if near else ""))
            if rk in space_keys:
                fail(f"{key}: {what}={v!r} refers to {rk}, which this space searches; "
                     f"a bound may only refer to a key the base config fixes")
            return flat[rk]
        return v

    def typed(v: Any, what: str) -> Any:
        try:
            return coerce(key, v, ftype)
        except ConfigError as e:
            fail(f"{key} {what} is not valid for the config field: {e}")

    when = _parse_when(key, spec.get("when"), fail)
    if typ == "fixed":
        value = typed(ref(spec["value"], "value"), f"value={spec['value']!r}")
        return ParamSpec(key, "fixed", value=value, when=when)

    if typ == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            fail(f"{key}: categorical needs a non-empty list 'choices'; got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                fail(f"{key}: choice {c!r} is not a scalar (Optuna categoricals take None, bool, int, "
                     f"float or str); use 'fixed' for a list value")
            typed(c, f"choice {c!r}")
        if len({(type(c), c) for c in choices}) != len(choices):
            fail(f"{key}: choices {list(choices)} contain duplicates")
        return ParamSpec(key, "categorical", choices=tuple(choices), when=when)

    # float / int ranges
    if typing.get_origin(ftype) is Literal or ftype in (str, bool) or typing.get_origin(ftype) is tuple:
        fail(f"{key}: type {typ} cannot drive a config field of type {type_name(ftype)}; use type: categorical")
    if typ == "float" and ftype is int:
        fail(f"{key}: config key {key!r} is an int; use type: int")
    bounds = {}
    for b in ("low", "high"):
        if b not in spec:
            fail(f"{key}: type {typ} needs '{b}' (and '{'high' if b == 'low' else 'low'}')")
        v = ref(spec[b], b)
        if typ == "float" and isinstance(v, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if not is_num(v) or (typ == "int" and not isinstance(v, int)):
            fail(f"{key}: {b}={spec[b]!r} must be {'an int' if typ == 'int' else 'a number'}")
        bounds[b] = v if typ == "int" else float(v)
    low, high = bounds["low"], bounds["high"]
    if low > high:
        fail(f"{key}: low={low} is greater than high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        fail(f"{key}: log must be true or false; got {log!r}")
    step = spec.get("step")
    if step is not None:
        if not is_num(step) or step <= 0 or (typ == "int" and not isinstance(step, int)):
            fail(f"{key}: step={step!r} must be a positive {'int' if typ == 'int' else 'number'}")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            fail(f"{key}: high - low = {high - low:g} is not a multiple of step={step}")
        if typ == "float":
            step = float(step)
    if log:
        if low <= 0:
            fail(f"{key}: log=true needs low > 0; got low={low}")
        if step is not None and not (typ == "int" and step == 1):
            fail(f"{key}: log=true cannot be combined with step={step} (Optuna)")
    if key in {k for pair in LAYER_PAIRS for k in pair} and (log or step not in (None, 1)):
        fail(f"{key}: layer indices must be a plain int range (no log/step)")
    return ParamSpec(key, typ, low=low, high=high, log=log, step=step, when=when)


# --------------------------------------------------------------------------- conditions, objectives
def _parse_when(key: str, when: Any, fail) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        fail(f"{key}: 'when' must be a mapping {{categorical_param: [choices]}}; got {when!r}")
    out = []
    for ck, allowed in when.items():
        if not isinstance(allowed, (list, tuple)):
            allowed = [allowed]
        if not allowed:
            fail(f"{key}: when {ck}: needs at least one choice")
        out.append((ck, tuple(allowed)))
    return tuple(out)


def _check_conditions(params: Mapping[str, ParamSpec], fail) -> None:
    for key, p in params.items():
        for ck, allowed in p.when:
            if ck == key:
                fail(f"{key}: 'when' cannot refer to the parameter itself")
            cp = params.get(ck)
            if cp is None:
                fail(f"{key}: 'when' refers to {ck!r}, which is not a parameter of this space "
                     f"(parameters: {', '.join(params)})")
            if cp.type != "categorical":
                fail(f"{key}: 'when' refers to {ck}, which is a {cp.type} parameter; conditions "
                     f"must name a categorical parameter")
            for a in allowed:
                if not cp.contains(a):
                    fail(f"{key}: 'when' {ck}: {a!r} is not one of its choices {list(cp.choices)}")


def _parse_objectives(raw: Any, base: Config, fail) -> tuple[Objective, ...]:
    t = base.tune
    if raw is None:
        objs: tuple[Objective, ...] = (Objective(t.metric, t.mode),)
    else:
        if not isinstance(raw, list) or not raw:
            fail(f"'objectives' must be a non-empty list like [{{metric: val_acc, mode: max}}]; got {raw!r}")
        out = []
        for i, o in enumerate(raw):
            if not isinstance(o, Mapping):
                fail(f"objectives[{i}] must be a mapping {{metric: name, mode: max|min}}; got {o!r}")
            extra = set(o) - {"metric", "mode"}
            if extra:
                fail(f"objectives[{i}]: unknown key(s) {', '.join(sorted(map(str, extra)))}; allowed: metric, mode")
            m, mode = o.get("metric"), o.get("mode", "max")
            if not isinstance(m, str) or not m.strip():
                fail(f"objectives[{i}]: metric must be a non-empty string; got {m!r}")
            if mode not in _MODES:
                fail(f"objectives[{i}] ({m}): mode must be 'max' or 'min'; got {mode!r}")
            out.append(Objective(m, mode))
        names = [o.metric for o in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            fail(f"objectives name metric(s) {', '.join(dup)} more than once")
        objs = tuple(out)
    if len(objs) > 1 and not t.multi_objective:
        fail(f"defines {len(objs)} objectives ({', '.join(o.metric for o in objs)}) but the config has "
             f"tune.multi_objective=false; set tune.multi_objective=true or use a single-objective space")
    if t.multi_objective and len(objs) < 2:
        fail("tune.multi_objective=true needs an 'objectives:' list with at least two metrics in the "
             f"search space; it has only {objs[0].metric}")
    return objs
