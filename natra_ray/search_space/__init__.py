"""Hyperparameter search spaces as data: YAML files in ``search_spaces/``, checked against the
config they will be applied to before any trial starts.

A space maps config keys (``"section.key"``, exactly as in ``Config.flat()``) to parameter
specs; the file format is documented at the top of ``search_spaces/default.yaml``. Only keys a
trial applies may be sampled (``natra_ray.workflow.upstream.applied_per_trial``: ``robust``,
``eval``, ``vae``, ``cvae``, ``encoder.lce_*``, ...); an upstream key (the rest of ``data``,
``gan``, ``encoder``; ``directions``), computed once per sweep from the base config, or a setting
of the sweep itself is refused, though a bound may still read one (``high: $directions.x``).
Loading a space proves that *every* value it can produce gives a valid ``Config``: types against the
config field (``natra_ray.config.coerce``), and the rules of ``natra_ray.config_rules`` -
the same rules ``natra_ray.config.validate`` applies (registered methods, eps/rho against the
truncation cap, direction counts, ...) - plus the generator's layer range. A bad space fails
with one line naming the parameter, not after an hour of trials.

Modules: ``space`` (the frozen ``ParamSpec`` / ``SearchSpace`` and sampling), ``parse`` (YAML
or dict -> ``SearchSpace``), ``checks`` (the values a space can produce against the config's
rules). Import from this package.

A ``SearchSpace`` is a frozen dataclass of plain values: it pickles, so the Tune layer can hand
trials the validated object itself (``tune.with_parameters(..., space=space)``) instead of
rebuilding it from ``to_dict()`` in every trial.

Optuna / Ray Tune convention (``ray.tune.search.optuna.OptunaSearch(space=fn)``):
``SearchSpace.define_by_run`` is the define-by-run function. Every sampled parameter is
suggested under its config key, dots kept (``trial.suggest_float("robust.eps", ...)``); Ray
captures the ``suggest_*`` return values by name, merges the dict the function returns
(``fixed`` constants, or None when there are none) and calls ``unflatten_dict(params)`` with the
``"/"`` delimiter - dotted names contain no ``"/"``, so the trial config Tune hands the trainable
is the flat ``{"robust.eps": 0.41, "robust.method": "natra", ...}``, ready for
``SearchSpace.sample_config(base, config)`` (or ``space.select(config)`` first when the Tune
config also carries other keys). Parameter names must therefore never contain ``"/"``.

This package imports neither Ray nor (until a trial is sampled) Optuna.
"""
from __future__ import annotations

from natra_ray.search_space.parse import (
    SEARCH_SPACE_DIR,
    list_search_spaces,
    load_search_space,
    resolve_search_space,
    search_space_from_dict,
)
from natra_ray.search_space.space import (
    LAYER_PAIRS,
    PARAM_TYPES,
    Objective,
    ParamSpec,
    SearchSpace,
    SearchSpaceError,
)

__all__ = [
    "LAYER_PAIRS",
    "PARAM_TYPES",
    "SEARCH_SPACE_DIR",
    "Objective",
    "ParamSpec",
    "SearchSpace",
    "SearchSpaceError",
    "list_search_spaces",
    "load_search_space",
    "resolve_search_space",
    "search_space_from_dict",
]
