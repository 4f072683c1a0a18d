"""Can a search space produce an invalid config? Answered by asking the config's own rules
(``natra_ray.config_rules``) about the values the space can produce; no rule is restated here.

The values a parameter can take in a trial are both ends of a float/int range, each choice,
the fixed value, and - for a conditional parameter - the base config's value (used in trials
where the condition is false). Each kind of rule is asked at the values that could break it:

- a key's own rule (``RULES``): every value the space itself produces. For the bounds and
  intervals the two ends of a range stand for every value between them; a rule that is not an
  interval ("a power of two") is asked at the ends only;
- an order ``small <= large`` (``ORDERS``): the largest value ``small`` can take against the
  smallest ``large`` can take, base values included - a conservative check, as if any two
  values could meet in one trial;
- any other cross-key rule (``CROSS_CHECKS``): each produced value with the rest at base;
- the generator's layer ranges, which only the search space checks (num_ws depends on
  ``data.image_size``, and the generator's formula is asked for it).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from natra_ray.config import Config, plain
from natra_ray.config_rules import ORDERS, cross_problem, value_problem
from natra_ray.search_space.space import (
    LAYER_PAIRS,
    SearchSpace,
    fmt_when,
    is_num,
    num_ws_of,
)


class Value(NamedTuple):
    """One value a key can take in a trial, and how: "low=0.1", "choice 'natra'", "fixed value
    2", "base value 0.1 (used when ... is false)", or "" for a key the space does not set."""

    v: Any
    how: str
    own: bool  # produced by the space (False: the base config's value)


def named(key: str, x: Value) -> str:
    """The key with its value, as a message says it: "robust.eps high=1.5", "robust.eps_cap=2.0 (base config)"."""
    return f"{key} {x.how}" if x.how else f"{key}={x.v} (base config)"


def values_of(space: SearchSpace, key: str, flat: Mapping[str, Any]) -> list[Value]:
    p = space.params.get(key)
    if p is None:
        return [Value(flat[key], "", own=False)]
    if p.type == "fixed":
        out = [Value(p.value, f"fixed value {p.value!r}", own=True)]
    elif p.type == "categorical":
        out = [Value(c, f"choice {c!r}", own=True) for c in p.choices]
    else:
        out = [Value(p.low, f"low={p.low}", own=True), Value(p.high, f"high={p.high}", own=True)]
    if p.conditional:
        out.append(Value(flat[key], f"base value {flat[key]!r} (used when {fmt_when(p.when)} is false)", own=False))
    return out


def check_values(space: SearchSpace, base: Config, fail) -> None:
    """``fail(message)`` (which raises) on the first rule some value of ``space`` breaks."""
    flat = base.flat()
    P = space.params

    def vals(k: str) -> list[Value]:
        return values_of(space, k, flat)

    # each key's own rule
    for k in P:
        for x in vals(k):
            if x.own and (p := value_problem(k, x.v, x.how)):
                fail(p)

    # ordered pairs: the largest small value against the smallest large one
    for o in ORDERS:
        if o.small in P or o.large in P:
            small = max(vals(o.small), key=lambda x: x.v)
            large = min(vals(o.large), key=lambda x: x.v)
            if not o.holds(small.v, large.v):
                fail(o.problem(named(o.small, small), named(o.large, large)))

    _check_layers(space, flat, fail)

    # every other cross-key rule, for each value the space produces, the rest at base
    for k in P:
        for x in vals(k):
            if x.own and (p := cross_problem({**flat, k: plain(x.v)})):
                fail(f"{k} {x.how} gives an invalid config: {p}")


def _check_layers(space: SearchSpace, flat: Mapping[str, Any], fail) -> None:
    """Layer indices in [0, num_ws - 1] and start <= end, however the space samples them."""
    P = space.params
    size = min(x.v for x in values_of(space, "data.image_size", flat) if is_num(x.v))
    num_ws = num_ws_of(size)
    last = num_ws - 1
    why = f"data.image_size={size} gives num_ws={num_ws} style inputs, valid layers 0..{last}"

    def vals(k: str) -> list[Value]:  # a layer end of -1 (the base's "last layer") means `last`
        out = values_of(space, k, flat)
        if k.endswith("layer_end"):
            out = [x._replace(v=last, how=x.how or f"(base config value -1 = layer {last})")
                   if x.v < 0 else x for x in out]
        return out

    for start, end in LAYER_PAIRS:
        for k in (start, end):
            if k in P:
                for x in values_of(space, k, flat):
                    if x.own and not 0 <= x.v <= last:
                        fail(f"{k} {x.how} is outside the generator's layer range ({why})")
        if start not in P and end not in P:
            continue
        starts = vals(start)
        # start values the sampler can see (sampled or fixed in the trial) vs the base value used
        # when the start is absent from the trial
        s_trial = [x for x in starts if x.own]
        s_absent = [x for x in starts if not x.own]
        pe = P.get(end)
        if pe is not None and pe.type == "int":
            # layer end sampled from [max(end.low, start), end.high] when the start is in the trial
            if s_trial:
                s = max(s_trial, key=lambda x: x.v)
                if s.v > pe.high:
                    if start in P and P[start].type in ("float", "int") and P[start].low > pe.high:
                        fail(f"inverted layer range: {start} low={P[start].low} > {end} high={pe.high}")
                    fail(f"{start} {s.how} exceeds {end} high={pe.high}: no layer end would remain")
            for s in s_absent:  # start absent: end is sampled from its own range
                if s.v > pe.low:
                    fail(f"{end} low={pe.low} is below {named(start, s)}; the range would be inverted")
            if pe.conditional:
                end_base = last if flat[end] < 0 else flat[end]
                for s in starts:
                    if s.v > end_base:
                        fail(f"{named(start, s)} exceeds {end}'s base value {flat[end]!r} (used when "
                             f"{fmt_when(pe.when)} is false); the range would be inverted")
        else:  # end is fixed, categorical or the base value: every start must stay <= every end
            e = min(vals(end), key=lambda x: x.v)
            s = max(starts, key=lambda x: x.v)
            if s.v > e.v:
                fail(f"inverted layer range: {named(start, s)} > {named(end, e)}")
