"""Peak memory of one Ray Train classifier worker, and what it would be at the paper's sizes.

A real ``fit_robust`` (the sweep's Train run) on a local Ray instance: the cpu profile's
generator with random weights, random LCE codes at the paper's count (``encoder.lce_codes=10``)
saved as the stage cache saves them, NaTra training for one epoch. A thread reads the peak RSS
(``VmHWM``) of every Train worker process from ``/proc`` while it runs, so the same script
measures any version of the worker loop (run it with another tree first on ``PYTHONPATH`` to
compare). The last lines scale the measured codes share to the paper profile's sizes.

    PYTHONPATH=. .venv/bin/python bench/bench_worker_memory.py [--workers 1 2] [--train 1500]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import torch


def _status_mb(pid: int) -> Dict[str, float]:
    """VmHWM (peak RSS), RssAnon and RssFile of ``pid`` in MiB (empty when it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def _train_workers() -> List[int]:
    """PIDs of this local instance's Train workers: descendants of this driver (``address="local"``
    starts the raylet as our child) whose title Ray set to ``ray::RayTrainWorker...``."""
    children: Dict[int, List[int]] = {}
    titles: Dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            titles[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        if titles.get(pid, "").startswith("ray::RayTrainWorker"):
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _watch(stop: threading.Event, peaks: Dict[int, Dict[str, float]]) -> None:
    while not stop.is_set():
        for pid in _train_workers():
            now = _status_mb(pid)
            if now:
                last = peaks.setdefault(pid, {})
                if now.get("VmHWM", 0) >= last.get("VmHWM", 0):
                    last.update(now)  # the breakdown at the highest peak seen
        stop.wait(0.5)


def job_files(cfg, tmp: Path, splits) -> Dict[str, Path]:
    """Generator, directions and codes files of ``cfg``'s sizes (random weights and codes)."""
    from natra_ray.checkpoints import save_checkpoint
    from natra_ray.models import create_generator
    from natra_ray.models.latent import Directions
    from natra_ray.stages.gan import generator_kwargs
    from natra_ray.stages.lce import LatentCodes

    G = create_generator(cfg.gan.generator, **generator_kwargs(cfg))
    g = save_checkpoint(tmp / "g.pt", G, kind="generator", name=cfg.gan.generator, kwargs=generator_kwargs(cfg))
    k = cfg.directions.num_directions
    q, _ = torch.linalg.qr(torch.randn(G.w_dim, k))
    Directions(q.t().contiguous(), torch.ones(k), "random").save(tmp / "dirs.pt")
    n_codes, c_l = cfg.encoder.lce_codes, G.layer_shape(cfg.encoder.lce_layer)[0]
    codes = {}
    for name, ds in splits.items():
        with torch.no_grad():
            ws = G.broadcast(G.mapping(G.sample_z(len(ds))))[:, None].repeat(1, n_codes, 1, 1)
        alpha = torch.zeros(len(ds), n_codes, c_l)
        alpha[:, 0] = 1
        codes[name] = LatentCodes(ws, alpha, cfg.encoder.lce_layer).save(tmp / f"codes-{name}.pt")
    return {"generator": Path(g), "directions": tmp / "dirs.pt", **{f"codes-{k}": Path(v) for k, v in codes.items()}}


def measure(workers: int, train_subset: int) -> Dict[str, float]:

    from natra_ray.config import load_config
    from natra_ray.distributed.train import RobustJob, diverged_file, fit_robust
    from natra_ray.workflow.upstream import load_splits

    cfg = load_config("cpu", overrides={"data.train_subset": train_subset, "data.test_subset": 256,
                                        "encoder.lce_codes": 10, "robust.epochs": 1, "robust.pgd_steps": 1,
                                        "tune.train_workers": workers, "tune.data_stream": False,
                                        "eval.shift_examples": 64})
    splits = load_splits(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench-worker-mem-"))
    files = job_files(cfg, tmp, splits)
    codes_mb = {k: files[f"codes-{k}"].stat().st_size / 2**20 for k in splits}
    job = RobustJob(cfg, files["generator"], files["directions"], {k: files[f"codes-{k}"] for k in splits}, {},
                    stream=False, diverged_file=diverged_file(tmp / "ray", "mem"), title="memory")
    peaks: Dict[int, Dict[str, float]] = {}
    stop = threading.Event()
    t = threading.Thread(target=_watch, args=(stop, peaks), daemon=True)
    t.start()
    t0 = time.time()
    result = fit_robust(job, "mem", tmp / "ray")
    stop.set()
    t.join(timeout=5)
    assert result.error is None, result.error
    return {"workers": workers, "train_images": len(splits["train"]), "val_images": len(splits["val"]),
            "codes_train_mb": codes_mb["train"], "codes_val_mb": codes_mb["val"], "codes_test_mb": codes_mb["test"],
            **{f"worker_{k}_mb": max((p.get(k, 0.0) for p in peaks.values()), default=float("nan"))
               for k in ("VmHWM", "RssAnon", "RssFile")},
            "reported_peak_rss_mb": float(result.metrics.get("worker_peak_rss_mb", float("nan"))),
            "seconds": time.time() - t0}


def paper_codes_gib() -> Dict[str, float]:
    """The paper profile's codes per split (float32): ws (N, M, num_ws, w_dim) + alpha (N, M, C_l)."""
    from natra_ray.config import load_config
    from natra_ray.models.generator import num_style_inputs

    cfg = load_config("paper")
    per_image = cfg.encoder.lce_codes * (num_style_inputs(cfg.data.image_size) * cfg.gan.w_dim + cfg.gan.channels) * 4
    n_train_all = 60000
    val = int(round(n_train_all * cfg.data.val_fraction))
    sizes = {"train": n_train_all - val, "val": val, "test": 10000}
    return {k: n * per_image / 2**30 for k, n in sizes.items()} | {"per_image_kib": per_image / 1024}


def main(argv: List[str] | None = None) -> None:
    import ray

    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--train", type=int, default=1500, help="data.train_subset (train + val)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [measure(w, args.train) for w in args.workers]
    for r in rows:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))
    print(json.dumps({"paper_codes_gib": {k: round(v, 2) for k, v in paper_codes_gib().items()}}))


if __name__ == "__main__":
    main()
