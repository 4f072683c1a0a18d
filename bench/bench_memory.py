"""Benchmark 5: peak memory (RSS) of NaTra training, and its growth with batch size and LCE codes.

Each configuration runs in a fresh child process (peak RSS is per process and never goes
down), which reports ``ru_maxrss`` plus its RSS after setup (imports, data, codes, models):

* ``step`` children: the ``cpu`` profile's training set size (its images and codes, random
  weights) and a few real NaTra training steps (``stages.robust.train_epoch``),
  at a grid of ``robust.batch_size`` and ``encoder.lce_codes``;
* the full mode adds the ``cpu`` profile's whole single-process trial
  (``workflow.trial.run_trial``: 2 epochs of NaTra + the evaluation suite), which reads the
  trained upstream and codes from the stage cache and is skipped when they are absent.

A Tune trial runs this work inside Ray processes (trial driver, Train worker, Data actor), each
with its own interpreter; their baseline is reported by ``bench_sweep``/``bench_stream`` runs,
not here.

    .venv/bin/python bench/bench_memory.py --quick   # B in {64,128,256} x N=2, N in {1,4} x B=128
    .venv/bin/python bench/bench_memory.py           # + B=512, N=8, and the whole cpu trial
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

def train_images() -> int:
    """Size of the cpu profile's training split (train_subset minus the validation fraction)."""
    from natra_ray.config import load_config

    d = load_config("cpu").data
    return d.train_subset - int(round(d.train_subset * d.val_fraction))


def rss_mb() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_step(batch: int, codes: int, steps: int) -> Dict[str, float]:
    import torch

    from natra_ray.augment import Batch
    from natra_ray.config import load_config
    from natra_ray.stages import robust

    torch.set_num_threads(1)
    imports = rss_mb()
    cfg = load_config("cpu").replace(**{"robust.batch_size": batch, "encoder.lce_codes": codes})
    n = train_images()
    src = benchlib.random_latent_source(cfg, n, codes)
    x = torch.rand(n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    y = torch.randint(0, 10, (n,))
    state = robust.make_state(cfg, 10, 100_000, torch.device("cpu"))

    class _Data:
        class_names = [str(i) for i in range(10)]

    gen = torch.Generator().manual_seed(0)
    setup = rss_mb()
    peak_setup = peak_mb()

    def batches():
        for _ in range(steps):
            idx = torch.randperm(n, generator=gen)[:batch]
            yield Batch(x[idx], y[idx], idx)

    robust.train_epoch(cfg, state, _Data(), src, gen, batches)
    return {"rss_after_imports_mb": imports, "rss_after_setup_mb": setup, "peak_after_setup_mb": peak_setup, "peak_mb": peak_mb(),
            "codes_mb": (src.ws.numel() + src.alpha.numel()) * 4 / 2 ** 20, "train_images": n}


def child_trial() -> Dict[str, Any]:
    import torch

    from natra_ray import cache
    from natra_ray.cli import layout
    from natra_ray.config import load_config
    from natra_ray.workflow.recorder import NullRecorder
    from natra_ray.workflow.trial import in_process_fit, run_trial, trial_inputs
    from natra_ray.workflow.upstream import load_splits, prepare_upstream, upstream_keys

    torch.set_num_threads(1)
    cfg = load_config("cpu")
    store = layout(cfg)
    keys = upstream_keys(cfg)
    if not all(cache.is_complete(cache.entry_dir(store.cache, s, k)) for s, k in keys.items()):
        return {"skipped": f"no trained cpu-profile upstream in {store.cache} (run the cpu chain first)"}
    t = time.time()
    with tempfile.TemporaryDirectory(prefix="natra-bench-mem-") as out:
        splits = load_splits(cfg)
        up = prepare_upstream(cfg, store, splits["train"])
        m = run_trial(cfg, trial_inputs(cfg, store, up, splits), Path(out), in_process_fit, NullRecorder()).metrics
    return {"peak_mb": peak_mb(), "seconds": time.time() - t, "test_clean_acc": m.get("test_clean_acc")}


def run_child(args: List[str], timeout: float) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", *args]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.time() - t
    return res


def slope(points: List[tuple]) -> float:
    """Least-squares slope of (x, y) points."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 step configurations, no whole trial (< 2 min)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help="NaTra steps per configuration")
    args = ap.parse_args()
    if args.child is not None:
        kind = args.child[0]
        res = child_trial() if kind == "trial" else child_step(int(args.child[1]), int(args.child[2]), args.steps)
        print(json.dumps(res))
        return
    info = benchlib.start(1)
    t_start = time.time()
    batches = [64, 128, 256] + ([] if args.quick else [512])
    codes = [1, 2, 4] + ([] if args.quick else [8])
    grid = sorted({(b, 2) for b in batches} | {(128, n) for n in codes})
    rows: Dict[str, Any] = {}
    for b, n in grid:
        rows[f"{b}x{n}"] = {"batch": b, "codes": n, **run_child(["step", str(b), str(n), "--steps", str(args.steps)], 600)}
        print(f"B={b} N={n}: {rows[f'{b}x{n}']}", flush=True)
    trial: Optional[Dict[str, Any]] = None if args.quick else run_child(["trial"], 1800)
    data = {"steps": args.steps, "grid": rows, "trial": trial,
            "seconds": time.time() - t_start}
    data["mb_per_batch_image"] = slope([(r["batch"], r["peak_mb"]) for r in rows.values() if r["codes"] == 2 and "peak_mb" in r])
    data["mb_per_code_at_b128"] = slope([(r["codes"], r["peak_mb"]) for r in rows.values() if r["batch"] == 128 and "peak_mb" in r])
    benchlib.write_results("memory", "quick" if args.quick else "full", render(data), data, info)


def render(d: Dict[str, Any]) -> str:
    head = ["batch", "LCE codes", "RSS after imports MiB", "RSS after setup MiB", "peak RSS MiB", "peak - setup MiB", "codes in memory MiB"]
    rows = [[r["batch"], r["codes"], r.get("rss_after_imports_mb", "-"), r.get("rss_after_setup_mb", "-"), r.get("peak_mb", r.get("error", "-")),
             (r["peak_mb"] - r["rss_after_setup_mb"]) if "peak_mb" in r else "-", r.get("codes_mb", "-")]
            for r in d["grid"].values()]
    n = next((r["train_images"] for r in d["grid"].values() if "train_images" in r), "?")
    lines = [f"NaTra training steps (cpu profile: K=2 PGD steps, 8 directions, {n} training images and their "
             f"codes held in memory, small_cnn width 16), {d['steps']} steps per child process.", "",
             benchlib.md_table(head, rows), "",
             f"Growth: {d['mb_per_batch_image']:.2f} MiB per extra image in the batch (2 codes); "
             f"{d['mb_per_code_at_b128']:.1f} MiB per extra LCE code at batch 128 (least-squares slopes of peak RSS)."]
    t = d.get("trial")
    if t:
        if "peak_mb" in t:
            lines.append(f"\nThe cpu profile's whole single-process trial (workflow.trial.run_trial: 2 NaTra epochs + evaluation): "
                         f"peak RSS {t['peak_mb']:.0f} MiB ({t['seconds']:.0f} s).")
        else:
            lines.append(f"\nWhole cpu trial: {t.get('skipped') or t.get('error')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
