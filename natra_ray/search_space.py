"""Hyperparameter search spaces as data: YAML files in ``search_spaces/``, checked against the
config they will be applied to before any trial starts.

A space maps config keys (``"section.key"``, exactly as in ``Config.flat()``) to parameter
specs; the file format is documented at the top of ``search_spaces/default.yaml``. Loading a
space proves that *every* value it can produce gives a valid ``Config``: types against the
config field, registered augmentation methods, and the cross-field rules of
``natra_ray.config.validate`` (eps/rho against the truncation cap, direction counts, ...) plus
the generator's layer range. A bad space fails with one line naming the parameter, not after
an hour of trials.

Optuna / Ray Tune convention (``ray.tune.search.optuna.OptunaSearch(space=fn)``):
``SearchSpace.define_by_run`` is the define-by-run function. Every sampled parameter is
suggested under its config key, dots kept (``trial.suggest_float("robust.eps", ...)``); Ray
captures the ``suggest_*`` return values by name, merges the dict the function returns
(``fixed`` constants, or None when there are none) and calls ``unflatten_dict(params)`` with the
``"/"`` delimiter - dotted names contain no ``"/"``, so the trial config Tune hands the trainable
is the flat ``{"robust.eps": 0.41, "robust.method": "natra", ...}``, ready for
``SearchSpace.sample_config(base, config)`` (or ``space.select(config)`` first when the Tune
config also carries other keys). Parameter names must therefore never contain ``"/"``.

This module imports neither Ray nor (until a trial is sampled) Optuna.
"""
from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import yaml

from natra_ray.config import SECTIONS, Config, ConfigError, _coerce

SEARCH_SPACE_DIR = Path(__file__).resolve().parents[1] / "search_spaces"

PARAM_TYPES = ("float", "int", "categorical", "fixed")
_SPEC_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
    "fixed": {"type", "value", "fixed", "when"},
}
_TOP_KEYS = {"params", "objectives", "description"}
_MODES = ("max", "min")

# Generator layer ranges (inclusive) on W+: both ends must lie in [0, num_ws - 1] and start <= end.
LAYER_PAIRS = (("robust.layer_start", "robust.layer_end"), ("directions.layer_start", "directions.layer_end"))
# Simple lower bounds, mirrored from config.validate (named here for clearer messages; any other
# single-key rule of config.validate is still caught by the generic per-value check).
_LOWER_BOUNDS: Dict[str, Tuple[float, bool]] = {  # key -> (bound, strict)
    "robust.eps": (0.0, False),
    "robust.rho": (0.0, False),
    "robust.eps_cap": (0.0, False),
    "robust.label_smoothing_c": (0.0, False),
    "robust.pgd_steps": (0, False),
    "robust.num_directions": (1, False),
    "robust.epochs": (1, False),
    "robust.batch_size": (1, False),
    "robust.lr": (0.0, True),
    "encoder.lce_codes": (1, False),
    "directions.num_directions": (1, False),
    "gan.lr": (0.0, True),
    "eval.natural_eps": (0.0, False),
}
# Keys whose validity depends on another key; when both are in the space the explicit relation
# checks cover them and the single-key config check (which would use the base value of the
# other key) is skipped.
_RELATED = {
    "robust.eps": {"robust.eps_cap"},
    "robust.rho": {"robust.eps_cap"},
    "robust.eps_cap": {"robust.eps", "robust.rho"},
    "robust.num_directions": {"directions.num_directions"},
    "directions.num_directions": {"robust.num_directions"},
}


class SearchSpaceError(ConfigError):
    """A search space is malformed or can produce an invalid config (a ``ConfigError``)."""


# --------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class ParamSpec:
    """One parameter. ``when`` = ((categorical_key, allowed_choices), ...): sampled only if every
    listed categorical parameter was sampled with one of the allowed choices."""

    name: str
    type: Literal["float", "int", "categorical", "fixed"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Tuple[Any, ...] = ()
    value: Any = None
    when: Tuple[Tuple[str, Tuple[Any, ...]], ...] = ()

    @property
    def conditional(self) -> bool:
        return bool(self.when)

    def active(self, values: Mapping[str, Any]) -> bool:
        """Does the condition hold given the values sampled so far in this trial?"""
        return all(k in values and values[k] in allowed for k, allowed in self.when)

    def contains(self, v: Any) -> bool:
        if self.type == "fixed":
            return _plain(v) == _plain(self.value)
        if self.type == "categorical":
            return any(v == c and type(v) is type(c) or _num_eq(v, c) for c in self.choices)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.type == "int" and not float(v).is_integer():
            return False
        tol = 1e-9 * max(1.0, abs(self.high))
        return self.low - tol <= v <= self.high + tol

    def to_dict(self) -> Dict[str, Any]:
        if self.type == "fixed":
            d: Dict[str, Any] = {"fixed": _plain(self.value)}
        elif self.type == "categorical":
            d = {"type": "categorical", "choices": list(self.choices)}
        else:
            d = {"type": self.type, "low": self.low, "high": self.high}
            if self.log:
                d["log"] = True
            if self.step is not None:
                d["step"] = self.step
        if self.when:
            d["when"] = {k: list(v) for k, v in self.when}
        return d


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class SearchSpace:
    name: str
    params: Dict[str, ParamSpec]  # in file order; see sampling_order()
    objectives: Tuple[Objective, ...]
    source: str = ""  # the YAML file it came from ("" when built from a dict)
    description: str = ""

    # ----------------------------------------------------------------- introspection
    def param_names(self) -> List[str]:
        """Every config key the space sets (sampled and fixed), in file order."""
        return list(self.params)

    def sampled_names(self) -> List[str]:
        return [k for k, p in self.params.items() if p.type != "fixed"]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def metrics(self) -> List[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> List[str]:
        return [o.mode for o in self.objectives]

    def sampling_order(self) -> List[str]:
        """Categoricals first, every parameter after the categoricals its ``when`` names, and a
        layer end after its layer start (its lower bound is the sampled start)."""
        names = list(self.params)
        pri = sorted(names, key=lambda k: (self.params[k].type != "categorical", names.index(k)))
        deps = {k: {c for c, _ in self.params[k].when} for k in names}
        for start, end in LAYER_PAIRS:
            if start in self.params and end in self.params:
                deps[end].add(start)
        order: List[str] = []
        while len(order) < len(names):
            ready = [k for k in pri if k not in order and deps[k] <= set(order)]
            if not ready:  # load-time validation rejects cycles; keep this total anyway
                raise SearchSpaceError(f"search space {self.name!r}: the 'when' conditions of "
                                       f"{', '.join(k for k in pri if k not in order)} form a cycle")
            order.append(ready[0])
        return order

    def to_dict(self) -> Dict[str, Any]:
        """The YAML form (bounds resolved against the base config it was loaded with)."""
        d: Dict[str, Any] = {}
        if self.description:
            d["description"] = self.description
        d["params"] = {k: p.to_dict() for k, p in self.params.items()}
        d["objectives"] = [{"metric": o.metric, "mode": o.mode} for o in self.objectives]
        return d

    # ----------------------------------------------------------------- sampling
    def _sample(self, trial: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        sampled: Dict[str, Any] = {}
        consts: Dict[str, Any] = {}
        values: Dict[str, Any] = {}
        layer_start_of = {end: start for start, end in LAYER_PAIRS}
        for key in self.sampling_order():
            p = self.params[key]
            if not p.active(values):
                continue
            if p.type == "fixed":
                consts[key] = values[key] = p.value
                continue
            if p.type == "categorical":
                v = trial.suggest_categorical(key, list(p.choices))
            elif p.type == "float":
                v = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
            else:
                low = int(p.low)
                start = layer_start_of.get(key)
                if start in values:  # layer end: never below the start sampled in this trial
                    low = max(low, int(values[start]))
                kw = {"log": p.log} if p.log else {}
                if p.step is not None:
                    kw["step"] = int(p.step)
                v = trial.suggest_int(key, low, int(p.high), **kw)
            sampled[key] = values[key] = v
        return sampled, consts

    def define_by_run(self, trial: Any) -> Optional[Dict[str, Any]]:
        """Optuna define-by-run function (``OptunaSearch(space=space.define_by_run)``).

        Suggests every active parameter under its dotted config key and returns the ``fixed``
        constants that apply to this trial (None when there are none), as Optuna/Ray expect."""
        _, consts = self._sample(trial)
        return consts or None

    def suggest(self, trial: Any) -> Dict[str, Any]:
        """Sampled params plus constants in one flat dict - what Ray's OptunaSearch hands the
        trainable for the same trial (use it when driving Optuna directly)."""
        sampled, consts = self._sample(trial)
        return {**sampled, **consts}

    def select(self, config: Mapping[str, Any]) -> Dict[str, Any]:
        """The entries of a (Tune trial) config that belong to this space."""
        return {k: config[k] for k in self.params if k in config}

    def sample_config(self, base: Config, trial_params: Mapping[str, Any]) -> Config:
        """``base`` with the trial's values applied, validated by the config layer."""
        where = f"search space {self.name!r}"
        if not isinstance(trial_params, Mapping):
            raise SearchSpaceError(f"{where}: trial params must be a mapping; got {type(trial_params).__name__}")
        for k, v in trial_params.items():
            p = self.params.get(k)
            if p is None:
                raise SearchSpaceError(f"{where}: trial param {k!r} is not a parameter of this space "
                                       f"(parameters: {', '.join(self.params)})")
            if not p.active(trial_params):
                raise SearchSpaceError(f"{where}: trial param {k}={v!r} given but its condition "
                                       f"{_fmt_when(p.when)} does not hold")
            if not p.contains(v):
                raise SearchSpaceError(f"{where}: trial param {k}={v!r} lies outside its spec {p.to_dict()}")
        try:
            cfg = base.replace(**dict(trial_params))
        except ConfigError as e:
            raise SearchSpaceError(f"{where}: trial params {dict(trial_params)} give an invalid config: {e}") from None
        num_ws = _num_ws(cfg.data.image_size)
        for start_key, end_key in LAYER_PAIRS:
            if start_key in trial_params or end_key in trial_params:
                s, e = cfg.flat()[start_key], cfg.flat()[end_key]
                e = num_ws - 1 if e < 0 else e
                if not 0 <= s <= e <= num_ws - 1:
                    raise SearchSpaceError(
                        f"{where}: trial gives {start_key}={s}, {end_key}={e}; the generator's "
                        f"{num_ws} style inputs need 0 <= start <= end <= {num_ws - 1}")
        return cfg


# --------------------------------------------------------------------------- loading
def list_search_spaces() -> List[str]:
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
    """Read, parse and validate a search space against the config its trials will start from."""
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

    flat = base.flat()
    params: Dict[str, ParamSpec] = {}
    for key, spec in params_raw.items():
        params[key] = _parse_param(key, spec, base, flat, set(params_raw), fail)
    _check_conditions(params, fail)
    objectives = _parse_objectives(raw.get("objectives"), base, fail)
    space = SearchSpace(name=name, params=params, objectives=objectives, source=source,
                        description=description)
    space.sampling_order()  # proves the order exists
    _check_values(space, base, fail)
    return space


# --------------------------------------------------------------------------- parsing
def _field_type(key: str) -> Any:
    if "." in key:
        sec, k = key.split(".", 1)
        return typing.get_type_hints(SECTIONS[sec])[k]
    return typing.get_type_hints(Config)[key]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num_eq(a: Any, b: Any) -> bool:
    return _is_num(a) and _is_num(b) and a == b


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _fmt_when(when: Sequence[Tuple[str, Tuple[Any, ...]]]) -> str:
    return " and ".join(f"{k} in {list(v)}" for k, v in when)


def _num_ws(image_size: int) -> int:
    return 2 * int(round(math.log2(image_size))) - 2


def _parse_param(key: Any, spec: Any, base: Config, flat: Mapping[str, Any], space_keys: set, fail) -> ParamSpec:
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

    ftype = _field_type(key)

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

    def coerce(v: Any, what: str) -> Any:
        try:
            return _coerce(key, v, ftype)
        except ConfigError as e:
            fail(f"{key} {what} is not valid for the config field: {e}")

    when = _parse_when(key, spec.get("when"), fail)
    if typ == "fixed":
        value = coerce(ref(spec["value"], "value"), f"value={spec['value']!r}")
        return ParamSpec(key, "fixed", value=value, when=when)

    if typ == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            fail(f"{key}: categorical needs a non-empty list 'choices'; got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                fail(f"{key}: choice {c!r} is not a scalar (Optuna categoricals take None, bool, int, "
                     f"float or str); use 'fixed' for a list value")
            coerce(c, f"choice {c!r}")
        if len({(type(c), c) for c in choices}) != len(choices):
            fail(f"{key}: choices {list(choices)} contain duplicates")
        return ParamSpec(key, "categorical", choices=tuple(choices), when=when)

    # float / int ranges
    if typing.get_origin(ftype) is Literal or ftype in (str, bool) or typing.get_origin(ftype) in (tuple, Tuple):
        fail(f"{key}: type {typ} cannot drive a config field of type {_type_label(ftype)}; use type: categorical")
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
        if not _is_num(v) or (typ == "int" and not isinstance(v, int)):
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
        if not _is_num(step) or step <= 0 or (typ == "int" and not isinstance(step, int)):
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


def _type_label(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _parse_when(key: str, when: Any, fail) -> Tuple[Tuple[str, Tuple[Any, ...]], ...]:
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


def _parse_objectives(raw: Any, base: Config, fail) -> Tuple[Objective, ...]:
    t = base.tune
    if raw is None:
        objs: Tuple[Objective, ...] = (Objective(t.metric, t.mode),)
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


# --------------------------------------------------------------------------- value checks
def _support(space: SearchSpace, key: str, flat: Mapping[str, Any]) -> List[Tuple[Any, str]]:
    """Every value ``key`` can take in a trial, as (value, how the space produces it) - range
    ends for float/int, each choice, the fixed value, plus the base value when the parameter is
    conditional (or not in the space at all)."""
    p = space.params.get(key)
    if p is None:
        return [(flat[key], f"(base config value {flat[key]!r})")]
    if p.type == "fixed":
        out = [(p.value, f"fixed value {p.value!r}")]
    elif p.type == "categorical":
        out = [(c, f"choice {c!r}") for c in p.choices]
    else:
        out = [(p.low, f"low={p.low}"), (p.high, f"high={p.high}")]
    if p.conditional:
        out.append((flat[key], f"base value {flat[key]!r} (used when {_fmt_when(p.when)} is false)"))
    return out


def _extreme(sup: List[Tuple[Any, str]], fn) -> Optional[Tuple[Any, str]]:
    nums = [(v, s) for v, s in sup if _is_num(v)]
    return fn(nums, key=lambda t: t[0]) if nums else None


def _check_values(space: SearchSpace, base: Config, fail) -> None:
    flat = base.flat()
    P = space.params

    def sup(k: str) -> List[Tuple[Any, str]]:
        return _support(space, k, flat)

    def own(k: str) -> List[Tuple[Any, str]]:  # values the space itself produces for k
        return [t for t in sup(k) if not t[1].startswith(("base value", "(base config"))]

    def lo(k: str):
        return _extreme(sup(k), min)

    def hi(k: str):
        return _extreme(sup(k), max)

    # robust.method (and any fixed method) must be a registered augmentation method
    if "robust.method" in P:
        from natra_ray.augment import list_methods  # lazy: pulls in torch

        known = list_methods()
        for v, how in own("robust.method"):
            if v not in known:
                fail(f"robust.method {how} is not a registered augmentation method; known: {', '.join(known)}")

    # simple lower bounds
    for k, (bound, strict) in _LOWER_BOUNDS.items():
        if k in P:
            for v, how in own(k):
                if _is_num(v) and (v <= bound if strict else v < bound):
                    fail(f"{k} {how} must be {'>' if strict else '>='} {bound:g}")

    # eps <= eps_cap and rho < eps_cap for every combination the space can produce
    if {"robust.eps", "robust.rho", "robust.eps_cap"} & set(P):
        cap_v, cap_how = lo("robust.eps_cap")
        cap_txt = f"robust.eps_cap {cap_how}" if "robust.eps_cap" in P else f"robust.eps_cap={cap_v} (base config)"
        eps_v, eps_how = hi("robust.eps")
        if eps_v > cap_v:
            fail(f"robust.eps {eps_how} exceeds {cap_txt}; the config needs eps <= eps_cap"
                 if "robust.eps" in P else
                 f"{cap_txt} is below robust.eps {eps_how}; the config needs eps <= eps_cap")
        rho_v, rho_how = hi("robust.rho")
        if rho_v >= cap_v:
            fail(f"robust.rho {rho_how} reaches the truncation cap {cap_txt}; rho must stay below eps_cap"
                 if "robust.rho" in P else
                 f"{cap_txt} does not exceed robust.rho {rho_how}; rho must stay below eps_cap")

    # attack directions must have been estimated
    if {"robust.num_directions", "directions.num_directions"} & set(P):
        nd_v, nd_how = hi("robust.num_directions")
        dd_v, dd_how = lo("directions.num_directions")
        dd_txt = (f"directions.num_directions {dd_how}" if "directions.num_directions" in P
                  else f"directions.num_directions={dd_v} (base config)")
        if nd_v > dd_v:
            fail(f"robust.num_directions {nd_how} exceeds {dd_txt} - cannot attack along directions "
                 f"that were not estimated" if "robust.num_directions" in P else
                 f"{dd_txt} is below robust.num_directions {nd_how}")

    # generator layer ranges
    sizes = [v for v, _ in sup("data.image_size") if _is_num(v)]
    size = min(sizes)
    num_ws = _num_ws(size)
    last = num_ws - 1
    why = f"data.image_size={size} gives num_ws={num_ws} style inputs, valid layers 0..{last}"

    def norm(k: str, vals: List[Tuple[Any, str]]) -> List[Tuple[Any, str]]:
        if k.endswith("layer_end"):
            return [((last if _is_num(v) and v < 0 else v), how) for v, how in vals]
        return vals

    for start, end in LAYER_PAIRS:
        for k in (start, end):
            if k in P:
                for v, how in own(k):
                    if not (0 <= v <= last):
                        fail(f"{k} {how} is outside the generator's layer range ({why})")
        if start not in P and end not in P:
            continue
        s_sup, e_sup = norm(start, sup(start)), norm(end, sup(end))
        # start values the sampler can see (sampled or fixed in the trial) vs the base value used
        # when the start is absent from the trial
        s_trial = [t for t in s_sup if not t[1].startswith(("base value", "(base config"))]
        s_absent = [t for t in s_sup if t[1].startswith(("base value", "(base config"))]
        pe = P.get(end)
        if pe is not None and pe.type == "int":
            # layer end sampled from [max(end.low, start), end.high] when the start is in the trial
            if s_trial:
                sv, show = max(s_trial, key=lambda t: t[0])
                if sv > pe.high:
                    if start in P and P[start].type in ("float", "int") and P[start].low > pe.high:
                        fail(f"inverted layer range: {start} low={P[start].low} > {end} high={pe.high}")
                    fail(f"{start} {show} exceeds {end} high={pe.high}: no layer end would remain")
            for sv, show in s_absent:  # start absent: end is sampled from its own range
                if sv > pe.low:
                    fail(f"{end} low={pe.low} is below {start} {show}; the range would be inverted")
            if pe.conditional:
                ev = norm(end, [(flat[end], "")])[0][0]
                for sv, show in s_sup:
                    if sv > ev:
                        fail(f"{start} {show} exceeds {end}'s base value {flat[end]!r} (used when "
                             f"{_fmt_when(pe.when)} is false); the range would be inverted")
        else:  # end is fixed, categorical or the base value: every start must stay <= every end
            ev, ehow = min(e_sup, key=lambda t: t[0])
            sv, show = max(s_sup, key=lambda t: t[0])
            if sv > ev:
                fail(f"inverted layer range: {start} {show} > {end} {ehow}")

    # generic: each value the space produces must pass the config's own validation
    for k, p in P.items():
        if _RELATED.get(k, set()) & set(P):
            continue  # covered by the relation checks above
        for v, how in own(k):
            try:
                base.replace(**{k: v})
            except ConfigError as e:
                fail(f"{k} {how} gives an invalid config: {e}")


__all__ = [
    "SEARCH_SPACE_DIR", "SearchSpaceError", "ParamSpec", "Objective", "SearchSpace",
    "list_search_spaces", "resolve_search_space", "load_search_space", "search_space_from_dict",
]
