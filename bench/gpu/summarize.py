"""summary.md of a bench/gpu/run.sh run: per phase its exit code, seconds and the GPU's mean /
max utilisation and memory (from nvidia_smi.csv, sampled every 0.5 s), then the images/s and
NaTra/standard ratios the benchmarks wrote (bench/*.json).

    python bench/gpu/summarize.py $OUT
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import List, Tuple


def samples(path: Path) -> List[Tuple[float, float, float]]:
    """(unix time, utilisation %, memory MiB) per nvidia-smi line."""
    out = []
    for row in csv.reader(path.open()) if path.exists() else []:
        try:
            t = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((t, float(row[2]), float(row[3])))
        except (ValueError, IndexError):
            continue
    return out


def phase_rows(out: Path) -> List[List[str]]:
    smi = samples(out / "nvidia_smi.csv")
    rows = []
    for name, t0, t1, rc in csv.reader((out / "phases.csv").open()):
        t0f, t1f = float(t0), float(t1)
        inside = [s for s in smi if t0f <= s[0] <= t1f]
        util = [s[1] for s in inside] or [float("nan")]
        mem = [s[2] for s in inside] or [float("nan")]
        rows.append([name, rc, f"{t1f - t0f:.0f}", f"{statistics.mean(util):.0f}", f"{max(util):.0f}",
                     f"{max(mem):.0f}", str(len(inside))])
    return rows


def bench_lines(out: Path) -> List[str]:
    lines = []
    for f in sorted((out / "bench").glob("*.json")):
        d = json.loads(f.read_text())["data"]
        for r in d.get("rows", []):
            lines.append(f"- {f.stem}: {r['label']}: {r['ratio']:.2f}x standard, {r['images_per_s_augmented']:.0f} "
                         f"images/s (standard {r['images_per_s_standard']:.0f})")
        t = d.get("timing")
        if t:
            for k, m in t["last_metrics"].items():
                lines.append(f"- {f.stem}: {k}: {t['ratio'][k]:.2f}x a standard epoch, "
                             f"{m.get('train_images_per_s', 0):.0f} images/s (last epoch)")
    return lines


def table(headers: List[str], rows: List[List[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def main(out: Path) -> str:
    gpu = next((r[1].strip() for r in csv.reader((out / "nvidia_smi.csv").open()) if len(r) > 1), "?") \
        if (out / "nvidia_smi.csv").exists() else "?"
    text = [f"GPU: {gpu}", "", table(["phase", "rc", "s", "GPU util % (mean)", "GPU util % (max)",
                                      "memory MiB (max)", "samples"], phase_rows(out)), "", *bench_lines(out)]
    return "\n".join(text)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
