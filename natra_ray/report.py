"""Markdown tables of results (pure formatting; shared by the jobs and the benchmark)."""
from __future__ import annotations

from typing import Any, Dict, Sequence

DEFAULT_COLUMNS = ("test_clean_acc", "test_natural_acc", "test_recon_acc", "test_corruption_mean_acc",
                   "test_blurred_acc", "test_deepfool_score", "test_pixel_pgd_acc", "test_escaped_fraction",
                   "trial_seconds")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.0f}"
    return "-" if v is None else str(v)


def results_table(rows: Dict[str, Dict[str, Any]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """One row per method; columns are metric keys (prefix ``test_`` dropped in the header)."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    head = "| method | " + " | ".join(c.removeprefix("test_") for c in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
