"""Typed configuration: the sections assembled into one frozen ``Config``, checked once on load.

Resolution order (later wins): dataclass defaults -> profile YAML (``natra_ray/profiles``)
-> a user YAML file -> ``section.key=value`` overrides from the command line.
Unknown sections/keys and wrong types are rejected with a message that names the key and
what is allowed, so a typo fails before any compute, not an hour into a sweep.

Three modules, one job each: ``natra_ray.config_sections`` declares the sections (keys, types,
defaults; every class is re-exported here, import them from this module),
``natra_ray.config_rules`` holds every range and cross-key rule as data, and this module loads
a config, checks each value's type (``coerce``) and applies the rules (``validate``). The
search space checks its own values with the same ``coerce``, ``field_type`` and rules.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from natra_ray import config_rules
from natra_ray.config_sections import (
    BenchmarkConfig,
    CvaeConfig,
    DataConfig,
    DirectionsConfig,
    EncoderConfig,
    EvalConfig,
    GanConfig,
    RobustConfig,
    TrackingConfig,
    TuneConfig,
    VaeConfig,
)

PROFILE_DIR = Path(__file__).parent / "profiles"


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Config:
    """The whole configuration: three top-level keys and one frozen dataclass per section.
    Frozen all the way down, so it pickles and travels through Ray as it is."""

    profile: str = "cpu"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    cvae: CvaeConfig = field(default_factory=CvaeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists): feeds YAML, MLflow params and Tune."""
        return plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}``: MLflow params, search-space keys and the rules' keys."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def replace(self, **overrides: Any) -> Config:
        """Return a validated copy with ``{"section.key": value}`` overrides applied."""
        return from_dict(_apply_overrides(self.to_dict(), overrides))

    def key(self, *sections: str) -> str:
        """Stable content hash of the named sections (``cache.content_key``)."""
        from natra_ray.cache import content_key

        d = self.to_dict()
        return content_key({s: d[s] for s in sections})


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)
                             if f.default_factory is not dataclasses.MISSING}


# --------------------------------------------------------------------------- types
def plain(obj: Any) -> Any:
    """Tuples -> lists and mappings -> dicts with string keys, recursively: the YAML/JSON form of a
    value (and what a checkpoint's header holds, so it loads under ``weights_only``)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def field_type(key: str) -> Any:
    """The annotation of a config key (``"robust.eps"`` -> float, ``"seed"`` -> int)."""
    if "." in key:
        sec, k = key.split(".", 1)
        return typing.get_type_hints(SECTIONS[sec])[k]
    return typing.get_type_hints(Config)[key]


def type_name(tp: Any) -> str:
    """How an error message names an annotation: "int", "one of 'umap', 'pca'", "a list of int"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against annotation ``tp`` (as returned by ``field_type``) and in the
    field's own form: ints are accepted for floats (and become floats), lists for tuples.
    Raises ``ConfigError`` naming ``key`` and what the field allows. Ranges are not checked
    here (that is ``validate``)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"config key {key!r} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects {type_name(tp)}; got {value!r}")
        (inner, _ellipsis) = typing.get_args(tp)
        return tuple(coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a new annotation kind must be taught here
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    if not ok:
        raise ConfigError(
            f"config key {key!r} expects {type_name(tp)}; got {value!r} ({type(value).__name__})"
        )
    return value


# --------------------------------------------------------------------------- checking
def _build_section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping of keys; got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in hints:
            raise ConfigError(
                f"unknown config key '{name}.{k}'; allowed keys in section {name!r}: {', '.join(allowed)}"
            )
        kwargs[k] = coerce(f"{name}.{k}", v, hints[k])
    return cls(**kwargs)


def from_dict(d: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (missing keys take defaults)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping; got {type(d).__name__}")
    hints = typing.get_type_hints(Config)
    top: dict[str, Any] = {}
    for k, v in d.items():
        if k in SECTIONS:
            top[k] = _build_section(k, SECTIONS[k], v or {})
        elif k in hints:
            top[k] = coerce(k, v, hints[k])
        else:
            allowed = [f.name for f in dataclasses.fields(Config)]
            raise ConfigError(f"unknown config key {k!r}; allowed top-level keys: {', '.join(allowed)}")
    cfg = Config(**top)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and cross-key checks that types alone cannot express: raises ``ConfigError`` with
    the first rule of ``natra_ray.config_rules`` that ``cfg`` breaks."""
    problem = next(config_rules.problems(cfg.flat()), None)
    if problem is not None:
        raise ConfigError(problem)


# --------------------------------------------------------------------------- loading
def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections; got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"gan.lr=0.001"`` -> ("gan.lr", 0.001); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. gan.steps=500)")
    k, v = text.split("=", 1)
    try:
        return k.strip(), yaml.safe_load(v) if v.strip() != "" else ""
    except yaml.YAMLError:
        return k.strip(), v


def _apply_overrides(d: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = _merge({}, d)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) == 1:
            out[parts[0]] = value
        elif len(parts) == 2:
            sec = out.setdefault(parts[0], {})
            if not isinstance(sec, dict):
                raise ConfigError(f"override {dotted!r}: {parts[0]!r} is not a config section")
            sec[parts[1]] = value
        else:
            raise ConfigError(f"override key {dotted!r} must be 'key' or 'section.key'")
    return out


def load_config(
    profile: str = "cpu",
    config_file: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Config:
    """Defaults -> profile -> YAML file -> overrides, validated once."""
    if profile not in list_profiles():
        raise ConfigError(f"unknown profile {profile!r}; known profiles are: {', '.join(list_profiles())}")
    d = _read_yaml(PROFILE_DIR / f"{profile}.yaml")
    if config_file:
        p = Path(config_file)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        d = _merge(d, _read_yaml(p))
    d["profile"] = profile  # the profile actually loaded, even if the file names another
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o) for o in overrides)
    return from_dict(_apply_overrides(d, overrides))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
