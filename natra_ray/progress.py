"""What a person watching a job sees: one line when a stage starts and one when it ends (its
time and where its output went), and a progress bar with an ETA for each long loop.

No Ray import: stages call ``stage`` and ``bar`` and stay Ray-free. In a Ray worker the Ray
layer installs a bar factory (``set_bar_factory``) whose bars are drawn by the driver; elsewhere
bars are plain ``tqdm`` on stderr. Status lines go to stderr too, so stdout keeps the results.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

VERBOSE_ENV = "NATRA_VERBOSE"  # 1: Ray's own output and every stage's step logs come back

_bar_factory: Optional[Callable[..., Any]] = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def set_bar_factory(factory: Optional[Callable[..., Any]]) -> None:
    """``factory(total=, desc=, unit=)`` -> an object with ``update(n)`` and ``close()``."""
    global _bar_factory
    _bar_factory = factory


def say(msg: str) -> None:
    """One status line that does not tear a progress bar drawn on the same terminal. What was
    printed before it comes before it: stdout is flushed first (to a pipe, as under ``ray job
    submit`` or a log file, it is block-buffered and would otherwise land after this line)."""
    sys.stdout.flush()
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(msg, file=sys.stderr, flush=True)
    sys.stderr.flush()


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class _Stage:
    def __init__(self, name: str) -> None:
        self.name = name
        self.out: Any = None  # where the output went; the caller sets it before the block ends
        self.note = ""


@contextmanager
def stage(name: str, out: Any = None) -> Iterator[_Stage]:
    """``[stage] NAME started`` ... ``[stage] NAME done in T -> OUT``; a failure or an interrupt
    says so with the time spent, then propagates."""
    st = _Stage(name)
    st.out = out
    t0 = time.time()
    say(f"[stage] {name} started")
    try:
        yield st
    except KeyboardInterrupt:
        say(f"[stage] {name} interrupted after {_fmt_seconds(time.time() - t0)}")
        raise
    except BaseException as e:
        say(f"[stage] {name} failed after {_fmt_seconds(time.time() - t0)}: {type(e).__name__}")
        raise
    where = f" -> {st.out}" if st.out is not None else ""
    note = f" ({st.note})" if st.note else ""
    say(f"[stage] {name} done in {_fmt_seconds(time.time() - t0)}{note}{where}")


def cached(name: str, out: Any) -> None:
    """The line of a stage whose output already exists (nothing is computed)."""
    say(f"[stage] {name} cached -> {out}")


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A progress bar with rate and ETA over ``total`` units; ``enabled=False`` (e.g. on every
    data-parallel rank but the first) gives one that draws nothing."""
    if not enabled or total <= 0:
        return _NullBar()
    if _bar_factory is not None:
        return _bar_factory(total=int(total), desc=desc, unit=unit)
    from tqdm import tqdm

    # On a terminal the bar redraws in place; in a log file (no tty) it writes a line every
    # 30 s instead of ten a second.
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=int(total), desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2 if tty else 30.0, leave=True)


__all__ = ["VERBOSE_ENV", "verbose", "set_bar_factory", "say", "stage", "cached", "bar"]
