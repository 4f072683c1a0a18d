"""Benchmark 4: the Ray Data latent stream vs generating the same images in the training loop.

The stream is ``distributed/data.py``'s ``training_stream``: rows {image, label, idx} through the
``LatentAugmenter`` actor, which decodes each example's reconstruction ``x_rec`` and a random
natural transformation ``x_rand`` from the cached latent codes. The consumer here is this
process, iterating ``iter_torch_batches(batch_size=128, drop_last=True)`` exactly as the Train
worker iterates its shard (one worker, so its shard is the whole stream).

Measured, at the ``cpu`` profile's sizes with random weights:

* images/s the actor's work yields when called in-process (no Ray), and images/s the stream
  delivers to a consumer that does nothing else;
* the same with an actor that skips ``x_rec`` (no trainer reads it: the cheap fix measured);
* the worker's step time (``stages.robust.train_epoch``, timed between consecutive batches, so
  fetching the next batch is inside it; mean = epoch time / steps) fed by the stream vs fed the
  very same batches precomputed in memory, and vs generating ``x_rand`` in the training loop;
* the stream as shipped (the whole split is one Arrow block, so the actor's output reaches the
  consumer only when the block is done) vs the proposed fix (one block per batch, no ``x_rec``). Method
  ``random_latent`` is the one that consumes ``x_rand``; the full mode adds ``natra`` (the
  sweep's method, which reads only the images), where the actor's decoding is pure extra CPU.

Goal: stream step time <= 1.05 x precomputed step time.

    .venv/bin/python bench/bench_stream.py --quick   # 1024 images, random_latent (< 2 min)
    .venv/bin/python bench/bench_stream.py           # one cpu-profile epoch, random_latent and natra
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from natra_ray.augment import Batch  # noqa: E402
from natra_ray.checkpoints import save_checkpoint  # noqa: E402
from natra_ray.config import Config, load_config  # noqa: E402
from natra_ray.data import ImageDataset, load_dataset  # noqa: E402
from natra_ray.distributed import data as rdata  # noqa: E402
from natra_ray.stages import lce, robust  # noqa: E402
from natra_ray.stages.gan import generator_kwargs  # noqa: E402

BATCH = 128


class NoRecAugmenter(rdata.LatentAugmenter):
    """The actor without the ``x_rec`` decode (nothing downstream reads it): the fix, measured."""

    @torch.no_grad()
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from natra_ray.models.generator import to_unit
        from natra_ray.models.latent import lce_decode

        idx = torch.as_tensor(batch["idx"])
        ws, alpha = self.codes.ws[idx].to(self.device), self.codes.alpha[idx].to(self.device)
        r = torch.randn(len(idx), self.cfg.robust.num_directions, generator=self.gen).to(self.device) * self.cfg.robust.eps
        batch["x_rand"] = to_unit(lce_decode(self.G, self.dirs.edit(ws, r, *self.range), alpha, self.codes.layer)).cpu().numpy()
        return batch


def write_artifacts(cfg: Config, src: Any, out: Path) -> Dict[str, Path]:
    """Generator checkpoint, directions and codes files, as the upstream stages write them."""
    g = save_checkpoint(out / "generator.pt", src.G, kind="generator", name=cfg.gan.generator,
                        kwargs=generator_kwargs(cfg), config=cfg.to_dict())
    d = src.directions.save(out / "directions.pt")
    c = lce.LatentCodes(src.ws, src.alpha, src.layer).save(out / "codes.pt")
    return {"generator_path": g, "directions_path": d, "codes_path": c}


FEEDS = ("shipped", "per-batch blocks", "per-batch blocks, no x_rec")


def stream(ds: ImageDataset, cfg: Config, paths: Dict[str, Path], variant: str = "shipped") -> Any:
    """``training_stream`` as shipped, or the proposed fixes: the split cut into one input block
    per batch (``from_arrow`` of a list of slices) so the actor's output reaches the consumer
    batch by batch, and optionally the actor without the unused ``x_rec``."""
    if variant == "shipped":
        return rdata.training_stream(ds, cfg.to_dict(), batch_size=BATCH, **paths)
    import ray

    n = len(ds)
    table = rdata._to_arrow({"image": ds.images.numpy(), "label": ds.labels.numpy().astype(np.int64),
                             "idx": np.arange(n, dtype=np.int64)})
    fn_cls = NoRecAugmenter if variant.endswith("no x_rec") else rdata.LatentAugmenter
    return ray.data.from_arrow([table.slice(i, BATCH) for i in range(0, n, BATCH)]).map_batches(
        fn_cls, fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), **{k: str(v) for k, v in paths.items()}},
        batch_size=BATCH, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)


def stream_batches(ds: Any) -> Iterator[Batch]:
    """What ``robust_worker_loop`` makes of its shard."""
    for b in ds.iter_torch_batches(batch_size=BATCH, drop_last=True):
        yield Batch(b["image"].float(), b["label"].long(), b["idx"].long(), x_rand=b["x_rand"].float())


def timed(batches: Callable[[], Iterator[Batch]], stamps: List[float]) -> Callable[[], Iterator[Batch]]:
    """Wrap a batch iterator so each hand-over is time-stamped (step time = stamp gaps)."""
    def gen() -> Iterator[Batch]:
        for b in batches():
            stamps.append(time.perf_counter())
            yield b
        stamps.append(time.perf_counter())
    return gen


def epoch_steps(cfg: Config, src: Any, data: ImageDataset, batches: Callable[[], Iterator[Batch]]) -> List[float]:
    """Step times (s) of one ``train_epoch`` over ``batches``; the first includes the wait for
    the first batch (for a stream: actor start and, when the stream is not pipelined, the
    decoding of everything before it)."""
    state = robust.make_state(cfg, 10, 100_000, torch.device("cpu"))
    stamps: List[float] = [time.perf_counter()]
    robust.train_epoch(cfg, state, data, src, torch.Generator().manual_seed(0), timed(batches, stamps))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # wait for batch 1, then step i + fetch i+1, last step
    return [gaps[0] + gaps[1]] + gaps[2:]  # one time per step; they sum to the epoch


def delivery(ds: Any) -> Dict[str, float]:
    """A do-nothing consumer: seconds to the first batch, and images/s over the whole pass."""
    n, t0, first = 0, time.perf_counter(), None
    for b in ds.iter_torch_batches(batch_size=BATCH, drop_last=True):
        first = first if first is not None else time.perf_counter() - t0
        n += len(b["idx"])
    total = time.perf_counter() - t0
    return {"first_batch_s": first or float("nan"), "total_s": total, "images_per_s": n / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024 images, random_latent only (< 2 min)")
    ap.add_argument("--images", type=int, default=0, help="training images streamed (1024 quick; full: the cpu profile's training split)")
    args = ap.parse_args()
    info = benchlib.start(1)
    t_start = time.time()
    d = load_config("cpu").data
    n = args.images or (1024 if args.quick else d.train_subset - int(round(d.train_subset * d.val_fraction)))
    base = load_config("cpu")
    data = load_dataset(base.data, "train").subset(slice(0, n))
    src = benchlib.random_latent_source(base, n, base.encoder.lce_codes)
    out: Dict[str, Any] = {"images": n, "batch": BATCH}

    # In-process: the actor's own work, no Ray.
    tmp = Path(tempfile.mkdtemp(prefix="natra-bench-stream-"))
    paths = write_artifacts(base, src, tmp)
    actor = rdata.LatentAugmenter(base.to_dict(), **{k: str(v) for k, v in paths.items()})
    norec = NoRecAugmenter(base.to_dict(), **{k: str(v) for k, v in paths.items()})
    np_batch = {"image": data.images[:BATCH].numpy(), "label": data.labels[:BATCH].numpy(), "idx": np.arange(BATCH)}
    t = benchlib.interleaved({"actor": lambda: actor(dict(np_batch)), "norec": lambda: norec(dict(np_batch))}, rounds=5)
    out["inprocess_images_per_s"] = BATCH / t["actor"].median
    out["inprocess_norec_images_per_s"] = BATCH / t["norec"].median

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    out["ray_init_s"] = time.perf_counter() - t0
    try:
        out["delivery"] = {v: delivery(stream(data, base, paths, v)) for v in FEEDS}
        again = stream(data, base, paths)  # one dataset iterated twice, as a worker does per epoch
        out["delivery"]["shipped, 1st pass of one dataset"] = delivery(again)
        out["delivery"]["shipped, 2nd pass of the same dataset"] = delivery(again)
        print(f"delivery: {out['delivery']}", flush=True)
        out["methods"] = {}
        for method in (["random_latent"] if args.quick else ["random_latent", "natra"]):
            cfg = base.replace(**{"robust.method": method})
            pre = list(stream_batches(stream(data, cfg, paths)))  # the same batches, precomputed

            def inloop() -> Iterator[Batch]:  # x_rand generated by the method, in the loop
                for b in pre:
                    yield Batch(b.x, b.y, b.idx)

            feeds: Dict[str, Callable[[], Iterator[Batch]]] = {"precomputed": lambda: iter(pre)}
            feeds.update({f"stream ({v})": (lambda v=v: stream_batches(stream(data, cfg, paths, v)))
                          for v in (FEEDS[0], FEEDS[2])})
            if method == "random_latent":
                feeds["in-loop generation"] = inloop
            steps: Dict[str, List[List[float]]] = {k: [] for k in feeds}
            for _ in range(1):  # feeds in turn: load drifts hit all alike
                for k, f in feeds.items():
                    steps[k].append(epoch_steps(cfg, src, data, f))
            out["methods"][method] = summarize(steps)
            print(f"{method}: {out['methods'][method]['mean_vs_precomputed']}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    out["seconds"] = time.time() - t_start
    benchlib.write_results("stream", "quick" if args.quick else "full", render(out), out, info)


def summarize(steps: Dict[str, List[List[float]]]) -> Dict[str, Any]:
    """Per feed: mean step time (epoch time / steps, what the worker experiences), median step
    time, the first step (includes waiting for the first batch), each vs precomputed."""
    mean = {k: statistics.mean(s for ep in v for s in ep) for k, v in steps.items()}
    med = {k: statistics.median(s for ep in v for s in ep[1:]) for k, v in steps.items()}
    first = {k: statistics.mean(ep[0] for ep in v) for k, v in steps.items()}
    return {"steps": steps, "mean_s": mean, "median_s": med, "first_s": first,
            "mean_vs_precomputed": {k: v / mean["precomputed"] for k, v in mean.items()}}


def render(d: Dict[str, Any]) -> str:
    lines = [f"{d['images']} Fashion-MNIST training images, batches of {d['batch']}, cpu-profile generator "
             f"(random weights) with 2 LCE codes per image. ray.init: {d['ray_init_s']:.1f} s.", "",
             f"LatentAugmenter called in-process (no Ray): {d['inprocess_images_per_s']:.0f} images/s with x_rec + x_rand, "
             f"{d['inprocess_norec_images_per_s']:.0f} images/s with x_rand only.", "",
             benchlib.md_table(["Ray Data stream to an idle consumer", "first batch after s", "whole pass s", "images/s"],
                               [[v, r["first_batch_s"], r["total_s"], r["images_per_s"]] for v, r in d["delivery"].items()]),
             ""]
    rows = []
    for method, m in d["methods"].items():
        for feed in m["mean_s"]:
            rows.append([method, feed, 1e3 * m["mean_s"][feed], 1e3 * m["median_s"][feed], 1e3 * m["first_s"][feed],
                         BATCH / m["mean_s"][feed], f"{m['mean_vs_precomputed'][feed]:.3f}"])
    lines += [benchlib.md_table(["method", "batches from", "mean step ms", "median step ms (2nd on)", "first step ms",
                                 "images/s", "mean step vs precomputed"], rows), "",
              "Goal: stream <= 1.05 x precomputed (mean step time = epoch time / steps). "
              + "; ".join(f"{k}, {feed}: {v['mean_vs_precomputed'][feed]:.2f}x" for k, v in d["methods"].items()
                          for feed in v["mean_s"] if feed.startswith("stream")) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
