"""Markdown tables of results: pure formatting, no Ray, no torch (the jobs, the sweep's and the
benchmark's reports in ``distributed/results.py``, and the scripts under ``bench/`` use it)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

DEFAULT_COLUMNS = ("test_clean_acc", "test_natural_acc", "test_recon_acc", "test_corruption_mean_acc",
                   "test_blurred_acc", "test_deepfool_score", "test_pixel_pgd_acc", "test_escaped_fraction",
                   "trial_seconds")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], cell: Callable[[Any], str] = str) -> str:
    """A Markdown table: one header line, the separator, one line per row (each value through
    ``cell``); ends in a newline."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def fmt_metric(v: Any) -> str:
    """A metric cell: four decimals, whole numbers from 10 on (seconds), ``-`` for none."""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.0f}"
    return "-" if v is None else str(v)


def results_table(rows: Dict[str, Dict[str, Any]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """One row per method; columns are metric keys (prefix ``test_`` dropped in the header)."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    return markdown_table(["method"] + [c.removeprefix("test_") for c in cols],
                          [[name] + [r.get(c) for c in cols] for name, r in rows.items()], fmt_metric)


__all__ = ["markdown_table", "fmt_metric", "results_table", "DEFAULT_COLUMNS"]
