"""Which config values are valid: every range and cross-key rule, stated once, as data.

``natra_ray.config.validate`` applies these rules to a loaded config. ``natra_ray.search_space``
asks the same rules about the extreme values a search space can produce (range ends, each
choice, fixed values), so a space is refused at load for exactly the reasons a config would be,
and no rule is written twice. Nothing here raises: a check returns the sentence that says what
is wrong (or None) and the caller raises its own error with it.

Three kinds of rule, keyed by the ``"section.key"`` names of ``Config.flat()``:

- ``RULES``: what one key's value must satisfy on its own (a ``Rule``: a test and its words).
- ``ORDERS``: one numeric key must stay at or below another (an ``Order``: eps <= eps_cap, ...).
  Orders are kept apart from the other cross-key rules because they are monotone: a search
  space need only check the largest value of the smaller key against the smallest of the other.
- ``CROSS_CHECKS``: any other rule over several keys (a function of the flat config).

Types are not checked here (``natra_ray.config.coerce`` does that first, on load and in a
search space), so a rule's test may assume the value has its field's type.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


# --------------------------------------------------------------------------- one key
@dataclass(frozen=True)
class Rule:
    """``test(value)`` must hold; ``must`` completes "<key> must ..." (e.g. "be >= 0").

    A rule with ``names`` is a membership rule (a registry): its failure lists the allowed
    names, which are looked up only then (the registry imports torch)."""

    test: Callable[[Any], bool]
    must: str
    names: Callable[[], Sequence[str]] | None = None

    def problem(self, key: str, value: Any, subject: str = "") -> str | None:
        """None when ``value`` passes, else the sentence saying why not. ``subject`` is how the
        caller names the value ("low=-0.1", "choice 'natra'"); without one the sentence names
        the key and ends with the value ("robust.eps must be >= 0; got -0.1")."""
        if self.test(value):
            return None
        if self.names is not None:
            return (f"{key} {subject or repr(value)} is not {self.must}; "
                    f"choose one of: {', '.join(self.names())}")
        return f"{key} {subject} must {self.must}" if subject else f"{key} must {self.must}; got {value!r}"


def _note(why: str) -> str:
    return f" ({why})" if why else ""


def at_least(low: float, why: str = "") -> Rule:
    return Rule(lambda v: v >= low, f"be >= {low:g}{_note(why)}")


def above(low: float, why: str = "") -> Rule:
    return Rule(lambda v: v > low, f"be > {low:g}{_note(why)}")


def within(low: float, high: float, *, high_open: bool = False, why: str = "") -> Rule:
    """``low <= v <= high`` (``< high`` when ``high_open``)."""
    return Rule(lambda v: low <= v and (v < high if high_open else v <= high),
                f"be in [{low:g}, {high:g}{')' if high_open else ']'}{_note(why)}")


def _each(section: str, keys: str, rule: Rule) -> dict[str, Rule]:
    return {f"{section}.{k}": rule for k in keys.split()}


def _methods() -> Sequence[str]:
    # imported here, not at the top: the method registry imports natra_ray.config (and torch)
    from natra_ray.augment import list_methods

    return list_methods()


def _shifts() -> Sequence[str]:
    from natra_ray.data.shifts import list_shifts  # lazy, as _methods: the shift suite imports torch

    return list_shifts()


RULES: dict[str, Rule] = {
    "data.image_size": Rule(lambda s: s >= 8 and s & (s - 1) == 0, "be a power of two >= 8"),
    "data.channels": Rule(lambda c: c in (1, 3), "be 1 or 3"),
    "data.val_fraction": within(0, 1, high_open=True),
    **_each("data", "train_subset test_subset", at_least(0, "0 = whole split")),
    **_each("gan", "z_dim w_dim mapping_layers channels batch_size n_critic r1_every", at_least(1)),
    **_each("gan", "steps sample_every", at_least(0)),
    "gan.lr": above(0),
    **_each("encoder", "batch_size lce_codes", at_least(1)),
    **_each("directions", "num_samples num_directions", at_least(1)),
    "robust.method": Rule(lambda m: m in _methods(), "a registered augmentation method", names=_methods),
    **_each("robust", "epochs batch_size num_directions classifier_width advmix_candidates", at_least(1)),
    **_each("robust", "pool_size pool_refresh", at_least(1)),
    "robust.adv_fraction": Rule(lambda f: 0 < f <= 1, "be in (0, 1] (the attacked share of each batch)"),
    **_each("robust", "eps rho label_smoothing_c pgd_steps cvae_eps cvae_steps cvae_step_size", at_least(0)),
    "robust.lr": above(0),
    "robust.pixel_eps": within(0, 1, why="images are in [0, 1]"),
    "robust.mixup_alpha": above(0, "Beta(a, a) mixing"),
    **_each("robust", "classic_rotation_deg classic_shear_deg classic_translate classic_brightness",
            at_least(0, "a +- range")),
    "robust.classic_scale": within(0, 1, high_open=True, why="zoom in [1 - s, 1 + s]"),
    "robust.classic_contrast": within(0, 1, high_open=True),
    "robust.advmix_split": at_least(-1, "-1 = num_ws // 2"),
    **_each("vae", "z_dim channels batch_size", at_least(1)),
    "vae.steps": at_least(0),
    "vae.lr": above(0),
    **_each("cvae", "latent_dim hidden batch_size", at_least(1)),
    **_each("cvae", "epochs sweep_images beta reg_weight max_param", at_least(0)),
    "cvae.lr": above(0),
    "eval.natural_eps": at_least(0),
    "eval.severities": Rule(lambda vs: all(1 <= v <= 5 for v in vs), "lie in 1..5"),
    "eval.natural_layer_start": at_least(0),
    "eval.natural_layer_end": at_least(-1, "-1 = last style input"),
    "eval.natural_directions": at_least(0, "0 = directions.num_directions"),
    "eval.shifts": Rule(lambda ns: len(ns) >= 1 and all(n in _shifts() for n in ns),
                        "a non-empty list of registered validation shifts", names=_shifts),
    "eval.shift_severities": Rule(lambda vs: len(vs) >= 1 and all(1 <= v <= 5 for v in vs),
                                  "list at least one severity, each in 1..5"),
    "eval.shift_examples": at_least(0, "0 = the whole validation split"),
    **_each("tune", "num_samples train_workers cpus_per_worker upstream_workers", at_least(1)),
    "tune.data_gpus": within(0, 1, why="a share of one GPU"),
    "tune.references": Rule(lambda ms: all(m in _methods() for m in ms), "a list of registered augmentation methods",
                            names=_methods),
    "tune.storage_path": Rule(lambda v: storage_problem(v) is None,
                              "be '' or an absolute path that every node mounts at the same place (EFS/NFS); "
                              "object-store URIs cannot hold the stage cache (it locks and renames files): "
                              "mount the bucket and give the mount's path"),
    "tune.trial_resources": Rule(lambda rs: resources_problem(rs) is None,
                                 "list custom Ray resources as NAME=AMOUNT (e.g. [node2=1]), AMOUNT > 0, "
                                 "NAME not CPU, GPU or memory"),
    "benchmark.seeds": Rule(lambda s: len(s) >= 1, "list at least one seed"),
    **_each("benchmark", "epochs train_examples val_examples eval_examples",
            at_least(0, "0 = the profile's own value")),
    "benchmark.cpus_per_task": above(0),
    "benchmark.gpus_per_task": at_least(0),
}


def value_problem(key: str, value: Any, subject: str = "") -> str | None:
    """What is wrong with ``value`` for ``key`` on its own (None: nothing, or no rule)."""
    rule = RULES.get(key)
    return rule.problem(key, value, subject) if rule else None


def storage_problem(path: str) -> str | None:
    """Why ``path`` cannot be the storage root (None: it can). A URI (``s3://``, ``gs://``,
    ``file://``) is refused, and so is a relative path: the driver of ``ray job submit`` runs in
    a temporary copy of the working directory, and other nodes resolve it against their own."""
    if path == "":
        return None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", path):
        return f"{path!r} is a URI"
    if not path.startswith(("/", "~")):
        return f"{path!r} is relative"
    return None


def parse_resources(entries: Sequence[str]) -> dict[str, float]:
    """``["node2=1", "a10g=0.5"]`` -> ``{"node2": 1.0, "a10g": 0.5}`` (entries already valid)."""
    return {name.strip(): float(amount) for name, _, amount in (e.partition("=") for e in entries)}


def resources_problem(entries: Sequence[str]) -> str | None:
    for e in entries:
        name, eq, amount = e.partition("=")
        if not (eq and re.match(r"^[A-Za-z_][A-Za-z0-9_.:\-]*$", name.strip())) or name.strip() in ("CPU", "GPU", "memory"):
            return f"bad entry {e!r}"
        try:
            if float(amount) <= 0:
                return f"bad amount in {e!r}"
        except ValueError:
            return f"bad amount in {e!r}"
    return None


# --------------------------------------------------------------------------- two keys, ordered
@dataclass(frozen=True)
class Order:
    """``small <= large`` (``small < large`` when ``strict``) for two numeric keys."""

    small: str
    large: str
    strict: bool
    why: str  # said after the failure
    large_is: str = ""  # what the large key is, said before its name ("the truncation cap ")

    def holds(self, small: Any, large: Any) -> bool:
        return small < large if self.strict else small <= large

    def problem(self, small_text: str, large_text: str) -> str:
        """The failure, given each key named with its value ("robust.eps=0.6", "robust.eps
        high=2.5", "robust.eps_cap=2.0 (base config)")."""
        verb = "reaches" if self.strict else "exceeds"
        return f"{small_text} {verb} {self.large_is}{large_text}; {self.why}"


ORDERS: tuple[Order, ...] = (
    Order("robust.eps", "robust.eps_cap", strict=False,
          why="APT starts each example at eps and grows it by rho up to the cap"),
    Order("robust.rho", "robust.eps_cap", strict=True, large_is="the truncation cap ",
          why="the APT step rho must stay below eps_cap"),
    Order("robust.num_directions", "directions.num_directions", strict=False,
          why="cannot attack along directions that were not estimated"),
    Order("eval.natural_directions", "directions.num_directions", strict=False,
          why="the evaluation attack cannot use directions that were not estimated"),
)


# --------------------------------------------------------------------------- other cross-key rules
def _folders_need_pairs(f: Mapping[str, Any]) -> str | None:
    if f["cvae.family"] == "folders" and not (f["cvae.pairs_x"] and f["cvae.pairs_x_prime"]):
        return "cvae.family=folders needs cvae.pairs_x and cvae.pairs_x_prime (two folders, same file names)"
    return None


def _folders_have_no_bundles(f: Mapping[str, Any]) -> str | None:
    if f["cvae.family"] == "folders" and f["cvae.reg_weight"] != 0:
        return "cvae.reg_weight needs sample bundles (x, T_theta x, T_2theta x); user pairs have none: set it to 0"
    return None


def _eval_layers_in_range(f: Mapping[str, Any]) -> str | None:
    """The evaluation attack's layer range, checked before any compute (the training range is
    checked against the generator when a trial builds it, and by the search space)."""
    from natra_ray.models.generator import num_style_inputs  # lazy: imports torch

    size = f["data.image_size"]
    if value_problem("data.image_size", size):
        return None  # said by the image size's own rule
    last = num_style_inputs(size) - 1
    start, end = f["eval.natural_layer_start"], f["eval.natural_layer_end"]
    end = last if end < 0 else end
    if not 0 <= start <= end <= last:
        return (f"eval.natural_layer_start..eval.natural_layer_end = {start}..{end} is not a layer range of the "
                f"generator: data.image_size={size} gives layers 0..{last} (-1 = {last})")
    return None


def _inline_is_one_worker(f: Mapping[str, Any]) -> str | None:
    if f["tune.trainer"] == "inline" and f["tune.train_workers"] != 1:
        return (f"tune.trainer=inline trains in the trial's own process, one worker, but tune.train_workers="
                f"{f['tune.train_workers']}: set tune.trainer=train (or auto) for several workers")
    return None


def _fp16_needs_cuda(f: Mapping[str, Any]) -> str | None:
    if f["robust.precision"] == "fp16" and f["device"] == "cpu":
        return ("robust.precision=fp16 is for CUDA (a CPU has no fast float16 and fp16 needs a GradScaler): "
                "use robust.precision=bf16 or fp32 with device=cpu")
    return None


CROSS_CHECKS: tuple[Callable[[Mapping[str, Any]], str | None], ...] = (
    _folders_need_pairs, _folders_have_no_bundles, _eval_layers_in_range, _inline_is_one_worker, _fp16_needs_cuda,
)


def cross_problem(flat: Mapping[str, Any]) -> str | None:
    """The first ``CROSS_CHECKS`` failure of a flat config, or None."""
    return next((p for check in CROSS_CHECKS if (p := check(flat))), None)


# --------------------------------------------------------------------------- all of them
def problems(flat: Mapping[str, Any]) -> Iterator[str]:
    """Every rule a flat config (``Config.flat()``) breaks, one sentence each."""
    for key, rule in RULES.items():
        if (p := rule.problem(key, flat[key])) is not None:
            yield p
    for o in ORDERS:
        a, b = flat[o.small], flat[o.large]
        if not o.holds(a, b):
            yield o.problem(f"{o.small}={a}", f"{o.large}={b}")
    yield from (p for check in CROSS_CHECKS if (p := check(flat)) is not None)
