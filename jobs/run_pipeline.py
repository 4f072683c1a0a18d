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

from natra_ray.cli import add_config_args, fail, parse_job_args, storage_root  # noqa: E402
from natra_ray.config import ConfigError  # noqa: E402
from natra_ray.data import DatasetError  # noqa: E402
from natra_ray.report import results_table  # noqa: E402


def main(argv=None) -> int:
    p = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--methods", nargs="+", default=["none", "natra"], help="augmentation methods to compare")
    args, cfg = parse_job_args(p, argv)
    from natra_ray.stages import pipeline  # after arg checks: imports torch and friends

    root = storage_root(cfg)
    t0 = time.time()
    try:
        results = pipeline.run_chain(cfg, root, args.methods, report=lambda m: None)
    except (DatasetError, ConfigError, FloatingPointError) as e:
        fail(str(e))
    out = root / "reports" / f"pipeline-{cfg.profile}-s{cfg.seed}"
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
