"""Benchmark every augmentation method on the same data, classifier, budget and seeds (Ray).

    python jobs/benchmark.py                                  # cpu profile: every method x 3 seeds
    python jobs/benchmark.py --profile smoke --methods none mixup --seeds 0 1
    python jobs/benchmark.py --name cmp2 benchmark.epochs=2   # another budget, its own results
    python jobs/benchmark.py --fresh                          # drop finished runs, start over
    python jobs/benchmark.py --budget full                    # the head-to-head: all data, 5 epochs, 8 methods x 3 seeds

Rerunning the same command resumes: finished method x seed runs are kept, the rest run.
Writes <storage>/benchmarks/<name>/report.md (mean ± std per method, the Latent-Mixup paper's
Fashion-MNIST rows beside ours) and chart.png; everything goes to MLflow (experiment
natra-benchmark unless tracking.experiment is set: one parent run, a child per method x seed).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from natra_ray.cli import add_config_args, fail, parse_job_args  # noqa: E402
from natra_ray.config import ConfigError  # noqa: E402
from natra_ray.config_sections import BENCHMARK_BUDGETS  # noqa: E402


def main(argv=None) -> int:
    p = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--methods", nargs="+", default=None,
                   help="augmentation methods to compare (default: benchmark.methods, else every registered one)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="classifier seeds (default: benchmark.seeds)")
    p.add_argument("--name", default=None, help="benchmark name: results under <storage>/benchmarks/<name>/ "
                                                "(default: benchmark.name)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep finished method x seed runs and run the rest (default); --no-resume = --fresh")
    p.add_argument("--fresh", action="store_true", help="delete this benchmark's earlier results and start over")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output and every stage's step logs "
                                                          "(also: NATRA_VERBOSE=1)")
    p.add_argument("--budget", choices=sorted(BENCHMARK_BUDGETS), default="profile",
                   help="profile = the profile's benchmark section; full = every training image, 5 epochs, "
                        "none classic pgd mixup natra natra+classic natra_oa natra_ol x 3 seeds "
                        "(its own --name 'full'; overrides on the command line still win)")
    args, cfg = parse_job_args(p, argv, presets=lambda a: BENCHMARK_BUDGETS[a.budget])
    if args.name is not None:
        if not args.name or "/" in args.name or args.name.startswith("."):
            fail(f"--name must be a plain folder name; got {args.name!r}")
        cfg = cfg.replace(**{"benchmark.name": args.name})

    from natra_ray.cli import layout
    from natra_ray.data import DatasetError
    from natra_ray.distributed import console
    from natra_ray.distributed.benchmark import run_benchmark
    from natra_ray.distributed.tracking import TrackingError, open_ui_command, runs_page_url

    # From the command line this process's environment is the run's own (the LPIPS notice marks it).
    console.setup_driver(args.verbose, cfg.encoder if argv is None else None)
    t0 = time.time()
    try:
        out = run_benchmark(cfg, methods=args.methods, seeds=args.seeds, resume=args.resume and not args.fresh)
    except (ConfigError, DatasetError, TrackingError) as e:
        fail(str(e))
    except (KeyboardInterrupt, SystemExit) as e:
        if not console.is_interrupt(e):
            raise  # rerunning the same command resumes: finished runs are kept
        kept = console.kept_summary(layout(cfg))
        args_back = [a for a in (sys.argv[1:] if argv is None else list(argv)) if a not in ("--fresh", "--no-resume")]
        return console.end_interrupted(f"{kept}, finished runs in {layout(cfg).benchmark(cfg.benchmark.name)}",
                                       console.resume_command("jobs/benchmark.py", args_back, flag=None))
    print()
    head = out.report_path.read_text().split("\n## Corruption suite")[0].split("\n## Reference")[0]
    print("\n".join(line for line in head.splitlines() if not line.startswith("![")).rstrip())
    print()
    print(f"{len(out.rows)} runs finished ({len(out.skipped)} from earlier invocations), {len(out.failed)} failed, "
          f"in {time.time() - t0:.0f} s")
    for f in out.failed:
        print(f"  failed: {f['run']}: {f['error']}")
    print(f"report:  {out.report_path}")
    print(f"chart:   {out.chart_path}")
    print(f"MLflow tracking URI: {out.tracking_uri}  (parent run {out.parent_run_id})")
    print(f"open the UI with:    {open_ui_command(out.tracking_uri)}")
    page = runs_page_url(out.tracking_uri, out.parent_run_id)
    if page:  # the Model training view: MLflow 3's UI opens experiments on its GenAI pages otherwise
        print(f"then open:           {page}")
    return 0 if not out.failed and len(out.rows) == len(out.setup.get("methods", [])) * len(out.setup.get("seeds", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
