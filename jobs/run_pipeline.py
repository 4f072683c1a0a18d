"""Run the whole NaTra chain in one process (no Ray): GAN -> BIES -> directions -> robust
training of each method -> evaluation table. The single-process reference for the Ray layer.

    python jobs/run_pipeline.py --profile cpu --methods none natra
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from natra_ray.cli import add_config_args, fail, parse_job_args  # noqa: E402
from natra_ray.config import ConfigError  # noqa: E402
from natra_ray.data import DatasetError  # noqa: E402
from natra_ray.report import results_table  # noqa: E402


def run_chain(cfg, layout, methods):
    """Upstream once, then each method trained and evaluated on the same data and seed."""
    from natra_ray.workflow.recorder import NullRecorder
    from natra_ray.workflow.trial import in_process_fit, run_trial, trial_inputs
    from natra_ray.workflow.upstream import load_splits, prepare_upstream

    splits = load_splits(cfg)
    up = prepare_upstream(cfg, layout, splits["train"])
    results = {"upstream": dict(up.metrics)}
    for m in methods:
        mcfg = cfg.replace(**{"robust.method": m})
        out = layout.runs / f"{cfg.profile}-{m}-{mcfg.key('robust', 'eval')}-s{cfg.seed}"
        res = run_trial(mcfg, trial_inputs(mcfg, layout, up, splits), out, in_process_fit, NullRecorder())
        results[m] = {**res.metrics, "classifier_path": str(res.classifier_path)}
    return results


def main(argv=None) -> int:
    p = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--methods", nargs="+", default=["none", "natra"], help="augmentation methods to compare")
    args, cfg = parse_job_args(p, argv)
    from natra_ray.workflow.layout import StorageLayout  # after arg checks: the workflow imports torch

    layout = StorageLayout.from_config(cfg.tune.storage_path)
    t0 = time.time()
    try:
        results = run_chain(cfg, layout, args.methods)
    except (DatasetError, ConfigError, FloatingPointError) as e:
        fail(str(e))
    out = layout.reports / f"pipeline-{cfg.profile}-s{cfg.seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    table = results_table({m: r for m, r in results.items() if m != "upstream"})
    (out / "results.md").write_text(table)
    print(table)
    print(f"\nupstream: {json.dumps(results['upstream'], default=str)}")
    print(f"wrote {out}/results.md and results.json in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
