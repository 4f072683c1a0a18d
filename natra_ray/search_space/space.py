"""The search space as data: ``ParamSpec`` per config key, ``SearchSpace`` for the whole space.

Both are frozen dataclasses of plain values (no functions, no open files), so a loaded space
pickles and travels through Ray as it is (``tune.with_parameters(..., space=space)``); a
trial samples from the same object the driver validated, name included.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from natra_ray.config import Config, ConfigError, plain

PARAM_TYPES = ("float", "int", "categorical", "fixed")

# Generator layer ranges (inclusive) on W+: both ends must lie in [0, num_ws - 1] and start <= end.
# The config does not check these (num_ws depends on the generator); the search space does, at
# load (every value a space can produce) and for each trial (``SearchSpace.sample_config``).
# (directions.layer_* is an upstream key, never sampled: the base config's checks cover it.)
LAYER_PAIRS = (("robust.layer_start", "robust.layer_end"),)


class SearchSpaceError(ConfigError):
    """A search space is malformed or can produce an invalid config (a ``ConfigError``)."""


def num_ws_of(image_size: int) -> int:
    """The generator's number of style inputs at ``data.image_size`` (its own formula)."""
    from natra_ray.models.generator import (
        num_style_inputs,  # lazy: the generator module imports torch
    )

    return num_style_inputs(image_size)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt_when(when: Sequence[tuple[str, tuple[Any, ...]]]) -> str:
    return " and ".join(f"{k} in {list(v)}" for k, v in when)


# --------------------------------------------------------------------------- one parameter
@dataclass(frozen=True)
class ParamSpec:
    """One parameter. ``when`` = ((categorical_key, allowed_choices), ...): sampled only if every
    listed categorical parameter was sampled with one of the allowed choices."""

    name: str
    type: Literal["float", "int", "categorical", "fixed"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def conditional(self) -> bool:
        return bool(self.when)

    def active(self, values: Mapping[str, Any]) -> bool:
        """Does the condition hold given the values sampled so far in this trial?"""
        return all(k in values and values[k] in allowed for k, allowed in self.when)

    def contains(self, v: Any) -> bool:
        if self.type == "fixed":
            return plain(v) == plain(self.value)
        if self.type == "categorical":  # True is not 1 here, but 1 and 1.0 are the same number
            return any((v == c and type(v) is type(c)) or (is_num(v) and is_num(c) and v == c)
                       for c in self.choices)
        if not is_num(v) or (self.type == "int" and not float(v).is_integer()):
            return False
        tol = 1e-9 * max(1.0, abs(self.high))
        return self.low - tol <= v <= self.high + tol

    def to_dict(self) -> dict[str, Any]:
        if self.type == "fixed":
            d: dict[str, Any] = {"fixed": plain(self.value)}
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


# --------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class SearchSpace:
    """A validated space. Build it with ``load_search_space`` / ``search_space_from_dict``:
    they prove every value it can produce gives a valid config for their base config."""

    name: str
    params: dict[str, ParamSpec]  # in file order; see sampling_order()
    objectives: tuple[Objective, ...]
    source: str = ""  # the YAML file it came from ("" when built from a dict)
    description: str = ""
    profiles: tuple[str, ...] = ()  # the profiles it is sized for ("profiles:" in the YAML)

    # ----------------------------------------------------------------- introspection
    def param_names(self) -> list[str]:
        """Every config key the space sets (sampled and fixed), in file order."""
        return list(self.params)

    def sampled_names(self) -> list[str]:
        return [k for k, p in self.params.items() if p.type != "fixed"]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]

    def sampling_order(self) -> list[str]:
        """Categoricals first, every parameter after the categoricals its ``when`` names, and a
        layer end after its layer start (its lower bound is the sampled start)."""
        names = list(self.params)
        pri = sorted(names, key=lambda k: (self.params[k].type != "categorical", names.index(k)))
        deps = {k: {c for c, _ in self.params[k].when} for k in names}
        for start, end in LAYER_PAIRS:
            if start in self.params and end in self.params:
                deps[end].add(start)
        order: list[str] = []
        while len(order) < len(names):
            ready = [k for k in pri if k not in order and deps[k] <= set(order)]
            if not ready:  # load-time validation rejects cycles; keep this total anyway
                raise SearchSpaceError(f"search space {self.name!r}: the 'when' conditions of "
                                       f"{', '.join(k for k in pri if k not in order)} form a cycle")
            order.append(ready[0])
        return order

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (bounds resolved against the base config it was loaded with). The name
        is not part of it: a file's name is its stem, a dict's the caller's."""
        d: dict[str, Any] = {}
        if self.description:
            d["description"] = self.description
        d["params"] = {k: p.to_dict() for k, p in self.params.items()}
        d["objectives"] = [{"metric": o.metric, "mode": o.mode} for o in self.objectives]
        if self.profiles:
            d["profiles"] = list(self.profiles)
        return d

    # ----------------------------------------------------------------- sampling
    def _sample(self, trial: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        sampled: dict[str, Any] = {}
        consts: dict[str, Any] = {}
        values: dict[str, Any] = {}
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

    def define_by_run(self, trial: Any) -> dict[str, Any] | None:
        """Optuna define-by-run function (``OptunaSearch(space=space.define_by_run)``).

        Suggests every active parameter under its dotted config key and returns the ``fixed``
        constants that apply to this trial (None when there are none), as Optuna/Ray expect."""
        _, consts = self._sample(trial)
        return consts or None

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sampled params plus constants in one flat dict - what Ray's OptunaSearch hands the
        trainable for the same trial (use it when driving Optuna directly)."""
        sampled, consts = self._sample(trial)
        return {**sampled, **consts}

    def select(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of a (Tune trial) config that belong to this space."""
        return {k: config[k] for k in self.params if k in config}

    def sample_config(self, base: Config, trial_params: Mapping[str, Any]) -> Config:
        """``base`` with the trial's values applied, validated by the config layer (and the
        layer ranges against the generator)."""
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
                                       f"{fmt_when(p.when)} does not hold")
            if not p.contains(v):
                raise SearchSpaceError(f"{where}: trial param {k}={v!r} lies outside its spec {p.to_dict()}")
        try:
            cfg = base.replace(**dict(trial_params))
        except ConfigError as e:
            raise SearchSpaceError(f"{where}: trial params {dict(trial_params)} give an invalid config: {e}") from None
        num_ws = num_ws_of(cfg.data.image_size)
        flat = cfg.flat()
        for start_key, end_key in LAYER_PAIRS:
            if start_key in trial_params or end_key in trial_params:
                s, e = flat[start_key], flat[end_key]
                e = num_ws - 1 if e < 0 else e
                if not 0 <= s <= e <= num_ws - 1:
                    raise SearchSpaceError(
                        f"{where}: trial gives {start_key}={s}, {end_key}={e}; the generator's "
                        f"{num_ws} style inputs need 0 <= start <= end <= {num_ws - 1}")
        return cfg
