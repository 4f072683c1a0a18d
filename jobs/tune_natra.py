"""The main job: search NaTra's hyperparameters with Ray Tune + Optuna, track in MLflow.

    python jobs/tune_natra.py                         # local Ray, Fashion-MNIST, cpu profile
    ray job submit -- python jobs/tune_natra.py --profile paper --num-samples 64
    python jobs/tune_natra.py --resume                # continue an interrupted sweep
    python jobs/tune_natra.py --profile smoke tune.search_space=smoke robust.epochs=1
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from natra_ray.cli import add_config_args, fail, parse_job_args  # noqa: E402
from natra_ray.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    p = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--num-samples", type=int, default=None, help="trials to run (default: tune.num_samples)")
    p.add_argument("--resume", action="store_true", help="continue the sweep tune.name where it stopped "
                                                         "(with nothing to continue: a fresh sweep)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output and every stage's step logs "
                                                          "(also: NATRA_VERBOSE=1)")
    args, cfg = parse_job_args(p, argv)
    if args.num_samples is not None and args.num_samples < 1:
        fail("--num-samples must be >= 1")

    from natra_ray.cli import layout
    from natra_ray.data import DatasetError
    from natra_ray.distributed import console
    from natra_ray.distributed.tracking import TrackingError, open_ui_command, runs_page_url
    from natra_ray.distributed.references import REFERENCE_STATUS
    from natra_ray.distributed.tune import run_sweep

    # From the command line this process's environment is the run's own (the LPIPS notice marks it).
    console.setup_driver(args.verbose, cfg.encoder if argv is None else None)
    t0 = time.time()
    try:
        out = run_sweep(cfg, resume=args.resume, num_samples=args.num_samples)
    except (ConfigError, DatasetError, TrackingError) as e:
        fail(str(e))
    except (KeyboardInterrupt, SystemExit) as e:
        if not console.is_interrupt(e):
            raise
        job = "jobs/tune_natra.py"
        return console.end_interrupted(console.kept_summary(layout(cfg), cfg.tune.name),
                                       console.resume_command(job, sys.argv[1:] if argv is None else list(argv)))
    print()
    print(out.table_path.read_text())
    count = Counter(r["status"] for r in out.rows)  # the table's rows: trials and the reference classifiers
    n_done, n_refs = count.pop("DONE", 0), count.pop(REFERENCE_STATUS, 0)
    ended = "".join(f", {n} {status.lower()}" for status, n in sorted(count.items()))  # STOPPED = cut by ASHA
    print(f"{n_done + sum(count.values())} trials ({n_done} finished{ended}) and {n_refs} reference classifiers "
          f"in {time.time() - t0:.0f} s; table: {out.table_path}")
    if out.best:
        print(f"best trial {out.best.get('trial_id')}: " + ", ".join(
            f"{k}={out.best[k]:.4f}" for k in ("val_objective", "val_shift_mean_acc", "test_clean_acc", "test_natural_acc",
                                               "test_corruption_mean_acc") if isinstance(out.best.get(k), float)))
    if out.label_preservation:
        from natra_ray.workflow.labels import describe

        print(describe(out.label_preservation))
    print(f"MLflow tracking URI: {out.tracking_uri}  (parent run {out.parent_run_id})")
    print(f"open the UI with:    {open_ui_command(out.tracking_uri)}")
    page = runs_page_url(out.tracking_uri, out.parent_run_id)
    if page:  # the Model training view: MLflow 3's UI opens experiments on its GenAI pages otherwise
        print(f"then open:           {page}")
    return 0 if n_done else 1


if __name__ == "__main__":
    sys.exit(main())
