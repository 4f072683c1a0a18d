"""Copy the tables in ``bench/results/<name>.md`` into ``BENCHMARKS.md``.

``BENCHMARKS.md`` marks each benchmark's measured block with ``<!-- results:<name> -->`` and
``<!-- /results:<name> -->``; everything between the two markers is replaced by the current
``bench/results/<name>.md`` (which starts with the exact command that produced it). The prose
around the markers (analysis, causes, fixes) is written by hand and left alone.

    .venv/bin/python bench/collect.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DOC = BENCH.parent / "BENCHMARKS.md"


def fill(doc: str, results: Path) -> str:
    """``doc`` with every marked block replaced by its results file (missing ones say so)."""
    def repl(m: re.Match) -> str:
        name = m.group(1)
        f = results / f"{name}.md"
        script, full = name.removesuffix("_full"), name.endswith("_full")
        cmd = f".venv/bin/python bench/bench_{script}.py{'' if full else ' --quick'}"
        body = f.read_text().strip() if f.is_file() else f"({'full mode ' if full else ''}not run for this page: `{cmd}`)"
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", repl, doc, flags=re.S)


def main() -> None:
    if not DOC.is_file():
        sys.exit(f"error: {DOC} does not exist; it holds the markers this script fills")
    DOC.write_text(fill(DOC.read_text(), BENCH / "results"))
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
