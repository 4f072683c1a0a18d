"""Where a finished sweep's trial time went: training, validation, evaluation, and the rest.

Reads what a sweep left under its storage root (no compute): each Tune trial's ``result.json``
(per epoch ``epoch_seconds`` and ``val_seconds``, the final report's ``test_eval_seconds``,
``trial_seconds`` timed by ``run_trial``, and Tune's ``time_total_s``) and each reference
classifier's result file and checkpoint history. "Other" is the trial's wall minus its work:
loading its inputs, building the latent sources, checkpoints, MLflow logging, Tune's reporting.
It does not see the Ray worker's start before the trial function runs.

    .venv/bin/python bench/bench_trials.py                        # the cpu make run's sweep
    .venv/bin/python bench/bench_trials.py --storage /tmp/x/natra_ray_results --sweep natra
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchlib  # noqa: E402


def _tune_trial(d: Path) -> Dict[str, Any] | None:
    rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
    if not rows:
        return None
    epochs = [r for r in rows if "epoch_seconds" in r and "test_eval_seconds" not in r]
    last = rows[-1]
    return {"trial": d.name.split("_")[2], "kind": last.get("robust.method") or json.loads((d / "params.json").read_text()).get("robust.method"),
            "epochs": len(epochs), "train": sum(r["epoch_seconds"] for r in epochs),
            "val": sum(r.get("val_seconds", 0.0) for r in epochs), "eval": last.get("test_eval_seconds", 0.0),
            "wall": last["time_total_s"], "finished": "test_eval_seconds" in last}


def _reference(row_file: Path, trials_dir: Path) -> Dict[str, Any]:
    from natra_ray.checkpoints import read_checkpoint

    row = json.loads(row_file.read_text())
    ck = read_checkpoint(trials_dir / row["trial_id"] / "classifier.pt")
    history = (ck.get("extra") or {}).get("history") or ck.get("history") or []
    return {"trial": row["trial_id"], "kind": row["robust.method"], "epochs": len(history),
            "train": sum(h["epoch_seconds"] for h in history), "val": sum(h.get("val_seconds", 0.0) for h in history),
            "eval": row.get("test_eval_seconds", 0.0), "wall": row["trial_seconds"], "finished": True}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", default=os.path.expanduser("~/natra_ray_results"))
    p.add_argument("--sweep", default="natra", help="tune.name of the sweep")
    args = p.parse_args()
    info = benchlib.start()
    root = Path(args.storage)
    rows: List[Dict[str, Any]] = []
    for d in sorted((root / "tune" / args.sweep).glob("*/result.json")):
        r = _tune_trial(d.parent)
        if r:
            rows.append({**r, "runs as": "Tune trial (inline)"})
    for f in sorted((root / "sweeps" / args.sweep / "references").glob("*.json")):
        rows.append({**_reference(f, root / "trials"), "runs as": "Ray task (reference)"})
    if not rows:
        raise SystemExit(f"error: no trials under {root / 'tune' / args.sweep}; run the sweep first (make run)")
    table = []
    for r in rows:
        work = r["train"] + r["val"] + r["eval"]
        r["other"] = r["wall"] - work
        table.append([r["trial"], r["kind"], r["runs as"], r["epochs"], r["wall"], r["train"], r["val"], r["eval"],
                      r["other"], "yes" if r["finished"] else "stopped by ASHA"])
    done = [r for r in rows if r["finished"]]
    body = (f"The sweep `{args.sweep}` under `{root}` (read after it ended; seconds). 'other' = wall minus "
            "training, validation and evaluation: the trial's own non-work, before Ray's worker start.\n\n"
            + benchlib.md_table(["trial", "method", "runs as", "epochs", "wall s", "training s", "validation s",
                                 "evaluation s", "other s", "to the end"], table)
            + f"\n\nNon-work per finished trial: max {max(r['other'] for r in done):.1f} s, "
              f"mean {sum(r['other'] for r in done) / len(done):.1f} s (goal <= 15 s).\n")
    benchlib.write_results("trials", "full", body, {"rows": rows}, info)


if __name__ == "__main__":
    main()
