"""Benchmark 7: a NaTra training epoch vs a standard epoch (issue 19, point 1), and what the
fast mode gives up in attack strength.

Timing: whole epochs of ``stages.robust.train_epoch`` on the same classifier and the same
Fashion-MNIST training images (the ``cpu`` profile's split via ``natra_ray.data.load_dataset``),
one torch thread, interleaved round by round (standard, pool, pool with ``loss`` selection,
exact, standard, ...) so machine noise hits every variant alike:

* ``standard``: ``robust.method=none``;
* ``pool``: ``robust.method=natra``, ``robust.natra_mode=pool`` (augment/pool.py) as configured
  (``pool_select=gradient``, the fast mode), and the same with ``pool_select=loss``;
* ``exact``: ``robust.natra_mode=exact``, the K-step latent PGD of Eq. 6.

Every variant keeps its own classifier, APT budgets and pool across rounds, so round j is its
j-th epoch: the first epoch (an example's first visit decodes one pool member) is reported on
its own, and ``ratio`` is the median over the later rounds of pool epoch / standard epoch of the
same round. The latent source is the ``cpu`` profile's trained upstream and training codes from
the stage cache when they are there (``make run``), else a freshly initialised generator of the
profile's architecture with random codes - the same cost, which the output says.

The full mode also compares attack strength: at the same budget (the cpu profile's robust.*),
it trains a classifier per seed with the exact mode and with the pool mode (and a standard
one as the floor), then scores all of them with the exact K-step latent PGD
(``stages.robust.natural_accuracy`` at ``eval.natural_eps`` / ``eval.natural_steps``) on test
images, and prints each accuracy and pool - exact. It needs the trained upstream (computed and
cached first when missing: ~11 min on two idle cores).

    .venv/bin/python bench/bench_epoch.py --quick     # 1,024 training images, < 2 min
    .venv/bin/python bench/bench_epoch.py             # whole cpu train split + the strength comparison
    .venv/bin/python bench/bench_epoch.py --set robust.pool_size=4 robust.pool_refresh=8 ...
    .venv/bin/python bench/bench_epoch.py --quick --device cuda --precision bf16   # -> results/epoch_cuda_bf16.*

The last line printed is ``ratio=<pool epoch / standard epoch>``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from natra_ray import cache  # noqa: E402
from natra_ray.augment.latent import LatentSource  # noqa: E402
from natra_ray.config import Config, load_config  # noqa: E402
from natra_ray.data import ImageDataset, load_dataset  # noqa: E402
from natra_ray.stages import robust  # noqa: E402
from natra_ray.workflow.layout import StorageLayout  # noqa: E402
from natra_ray.workflow.upstream import UPSTREAM_SEED, Upstream, codes_key, upstream_keys  # noqa: E402

QUICK_IMAGES = 1024


def parse_set(items: List[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for it in items:
        k, _, v = it.partition("=")
        out[k] = yaml.safe_load(v)
    return out


# --------------------------------------------------------------------------- inputs
def cached_upstream(cfg: Config) -> Optional[Upstream]:
    """The cpu profile's trained upstream from the stage cache, or None when it is not complete."""
    layout = StorageLayout.from_config(cfg.tune.storage_path)
    keys = upstream_keys(cfg)
    entries = {s: cache.entry_dir(layout.cache, s, keys[s]) for s in ("gan", "bies", "directions")}
    if not all(cache.is_complete(e) for e in entries.values()):
        return None
    return Upstream(entries["bies"] / "generator_shifted.pt", entries["bies"] / "encoder.pt",
                    entries["directions"] / "directions.pt", entries, {})


def cached_codes(cfg: Config, up: Upstream, split: str, n_images: int) -> Optional[Path]:
    layout = StorageLayout.from_config(cfg.tune.storage_path)
    entry = cache.entry_dir(layout.cache, f"codes-{split}", codes_key(cfg, up, split, n_images, cfg.encoder.lce_codes))
    return entry / "codes.pt" if cache.is_complete(entry) else None


def prepared(cfg: Config, split: str, ds: ImageDataset) -> Tuple[Upstream, Path]:
    """The trained upstream and the codes of ``ds``, computed into the stage cache when missing."""
    from natra_ray.workflow.upstream import codes_path, prepare_upstream

    layout = StorageLayout.from_config(cfg.tune.storage_path)
    train = load_dataset(cfg.data, "train", seed=UPSTREAM_SEED)
    up = prepare_upstream(cfg, layout, train)
    return up, codes_path(cfg, up, layout, split, ds, cfg.encoder.lce_codes)


DEVICE = torch.device("cpu")  # --device: where G, the budgets and the classifier live


def source_for(cfg: Config, up: Upstream, codes: Path, n: int) -> LatentSource:
    from natra_ray.stages.lce import LatentCodes
    from natra_ray.workflow.trial import latent_source

    c = LatentCodes.load(codes)
    src = latent_source(cfg, up, c, DEVICE)
    src.ws, src.alpha, src.eps = src.ws[:n], src.alpha[:n], src.eps[:n].clone()
    return src


def training_inputs(cfg: Config, n: int) -> Tuple[ImageDataset, Callable[[], LatentSource], str]:
    """The first ``n`` training images and a maker of fresh latent sources over them (one per
    variant: its own APT budgets and pool), with the upstream's description."""
    train = load_dataset(cfg.data, "train", seed=UPSTREAM_SEED)
    n = min(n, len(train)) if n else len(train)
    ds = ImageDataset(train.images[:n], train.labels[:n], train.class_names)
    up = cached_upstream(cfg)
    codes = cached_codes(cfg, up, "train", len(train)) if up is not None else None
    if up is not None and codes is not None:
        return ds, lambda: source_for(cfg, up, codes, n), f"the trained cpu-profile upstream ({up.entries['bies'].name})"
    return (ds, lambda: benchlib.random_latent_source(cfg, n, cfg.encoder.lce_codes, device=DEVICE),
            "a freshly initialised generator of the cpu profile's architecture with random codes (no trained "
            "upstream in the stage cache: a stand-in for timing only)")


# --------------------------------------------------------------------------- timing
class Variant:
    """One classifier training epoch after epoch: its own state, budgets and pool."""

    def __init__(self, name: str, cfg: Config, ds: ImageDataset, make_src: Callable[[], LatentSource], seed: int = 0):
        self.name, self.cfg, self.ds = name, cfg, ds
        self.src = make_src() if cfg.robust.method != "none" else None
        torch.manual_seed(seed)
        self.state = robust.make_state(cfg, len(ds.class_names), max(1, len(ds) // cfg.robust.batch_size), DEVICE)
        self.gen = torch.Generator().manual_seed(seed)
        self.metrics: List[Dict[str, float]] = []

    def epoch(self) -> None:
        self.metrics.append(robust.train_epoch(self.cfg, self.state, self.ds, self.src, self.gen))


def time_epochs(variants: List[Variant], rounds: int) -> Dict[str, List[float]]:
    """Seconds of each variant's epochs, interleaved: round j runs every variant's j-th epoch."""
    out: Dict[str, List[float]] = {v.name: [] for v in variants}
    for j in range(rounds):
        for v in variants:
            t = time.perf_counter()
            v.epoch()
            out[v.name].append(time.perf_counter() - t)
        print(f"round {j + 1}/{rounds}: " + ", ".join(f"{k} {s[-1]:.2f}s" for k, s in out.items()), flush=True)
    return out


def paired(num: List[float], den: List[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


# --------------------------------------------------------------------------- strength
STRENGTH_KINDS = {"exact": {"robust.natra_mode": "exact"}, "pool": {},  # pool: the fast mode as configured
                  # the pool with the transformed half under the running BatchNorm statistics
                  "pool_running": {"robust.two_pass_norm": "running"},
                  # twice the fresh decodes (one per example per epoch at P=4): the cost/strength trade
                  "pool_r4": {"robust.pool_refresh": 4},
                  "fraction": {"robust.natra_mode": "fraction"}, "standard": {"robust.method": "none"}}


def strength_row(cfg: Config, kind: str, seed: int, epochs: int, eval_images: int, threads: int = 1,
                 train_images: int = 0) -> Dict[str, Any]:
    """One classifier of ``kind`` trained ``epochs`` epochs with ``seed`` on the whole training
    split (or its first ``train_images``), scored by the exact K-step latent PGD on the first
    ``eval_images`` test images (the upstream and the codes come from the stage cache, which
    ``strength`` fills first)."""
    torch.set_num_threads(threads)
    ecfg = cfg.replace(**{"data.test_subset": eval_images})
    test = load_dataset(ecfg.data, "test", seed=UPSTREAM_SEED)
    up, test_codes = prepared(ecfg, "test", test)
    train = load_dataset(cfg.data, "train", seed=UPSTREAM_SEED)
    _, train_codes = prepared(cfg, "train", train)
    if train_images:
        train = ImageDataset(train.images[:train_images], train.labels[:train_images], train.class_names)
    test_src = source_for(cfg, up, test_codes, len(test))
    kcfg = cfg.replace(**{**STRENGTH_KINDS[kind], "robust.epochs": epochs, "seed": seed})
    v = Variant(kind, kcfg, train, lambda: source_for(kcfg, up, train_codes, len(train)), seed=seed)
    t = time.perf_counter()
    for _ in range(epochs):
        v.epoch()
    secs = time.perf_counter() - t
    model = v.state.bare.eval()
    e = cfg.eval
    nat = robust.natural_accuracy(model, test_src, test.labels, e.natural_eps, e.natural_steps, seed=0)
    clean = robust.accuracy(model, test.images, test.labels)
    last = v.metrics[-1]
    print(f"seed {seed} {kind}: natural {nat:.4f} clean {clean:.4f} ({secs:.0f} s; last epoch: eps_mean "
          f"{last.get('eps_mean', 0):.3f} adv_fooled {last.get('adv_fooled', 0):.3f})", flush=True)
    return {"seed": seed, "kind": kind, "natural_acc": nat, "clean_acc": clean, "train_seconds": secs,
            "eps_mean_end": float(v.src.eps.mean()) if v.src is not None else 0.0, "last_epoch": last}


def strength(cfg: Config, seeds: List[int], eval_images: int, epochs: int,
             only: Tuple[str, ...] = tuple(STRENGTH_KINDS), workers: int = 1, train_images: int = 0) -> Dict[str, Any]:
    """Per seed: classifiers trained with the exact mode, the pool mode and none (standard),
    each scored by the exact K-step latent PGD on ``eval_images`` test images. ``workers``
    processes of one thread each train them side by side (the exact ones first: the longest)."""
    ecfg = cfg.replace(**{"data.test_subset": eval_images})
    prepared(ecfg, "test", load_dataset(ecfg.data, "test", seed=UPSTREAM_SEED))  # into the cache, once
    prepared(cfg, "train", load_dataset(cfg.data, "train", seed=UPSTREAM_SEED))
    kinds = [k for k in STRENGTH_KINDS if k in only]
    jobs = sorted(((seed, kind) for seed in seeds for kind in kinds), key=lambda j: j[1] != "exact")
    if workers <= 1:
        rows = [strength_row(cfg, kind, seed, epochs, eval_images, torch.get_num_threads(), train_images)
                for seed, kind in jobs]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(strength_row, cfg, kind, seed, epochs, eval_images, 1, train_images)
                       for seed, kind in jobs]
            rows = [f.result() for f in futures]
    rows.sort(key=lambda r: (r["seed"], kinds.index(r["kind"])))
    if not {"exact", "pool"} <= set(kinds):
        return {"rows": rows}

    def acc(seed: int, kind: str) -> float:
        return next(r["natural_acc"] for r in rows if r["seed"] == seed and r["kind"] == kind)

    fast = [k for k in kinds if k not in ("exact", "standard")]
    diffs = {k: [acc(s, k) - acc(s, "exact") for s in seeds] for k in fast}
    train_images = train_images or len(load_dataset(cfg.data, "train", seed=UPSTREAM_SEED))
    return {"rows": rows, "diffs": diffs, "eval_images": eval_images, "epochs": epochs, "workers": workers,
            "train_images": train_images, "natural_eps": cfg.eval.natural_eps, "natural_steps": cfg.eval.natural_steps}


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} training images, timing only (< 2 min)")
    ap.add_argument("--rounds", type=int, default=0, help="epochs per variant (default 4)")
    ap.add_argument("--images", type=int, default=0, help="training images timed (default: quick 1024, full all)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="full mode: strength seeds")
    ap.add_argument("--eval-images", type=int, default=1000, help="full mode: test images the PGD scores")
    ap.add_argument("--epochs", type=int, default=0, help="full mode: training epochs (default robust.epochs)")
    ap.add_argument("--no-strength", action="store_true", help="full mode without the strength comparison")
    ap.add_argument("--no-timing", action="store_true", help="full mode: the strength comparison only")
    ap.add_argument("--kinds", nargs="*", default=["exact", "pool", "pool_running", "fraction", "standard"],
                    help="full mode: the classifiers trained per seed")
    ap.add_argument("--workers", type=int, default=1,
                    help="full mode: classifiers trained at once, one thread each (2 on two idle cores)")
    ap.add_argument("--train-images", type=int, default=0,
                    help="full mode: train the strength classifiers on the first N training images (default all)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (robust.pool_size=4)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the classifier, G and the budgets live")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="robust.precision")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default 1 on the cpu, 4 otherwise)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    info = benchlib.start(args.threads or (1 if DEVICE.type == "cpu" else 4))
    t_start = time.time()
    base = load_config("cpu", overrides={"robust.method": "natra", "robust.natra_mode": "pool", "device": args.device,
                                         "robust.precision": args.precision, **parse_set(args.set)})
    r = base.robust
    data: Dict[str, Any] = {"pool": {"natra_mode": r.natra_mode, "pool_size": r.pool_size,
                                     "pool_refresh": r.pool_refresh, "pool_select": r.pool_select},
                            "overrides": args.set}
    if not args.no_timing:
        rounds = args.rounds or 4
        tcfg = base.replace(**{"robust.epochs": rounds})  # the LR schedule spans the timed epochs
        ds, make_src, upstream = training_inputs(tcfg, args.images or (QUICK_IMAGES if args.quick else 0))
        print(f"timing {len(ds)} training images with {upstream}", flush=True)
        variants = [Variant("standard", tcfg.replace(**{"robust.method": "none"}), ds, make_src),
                    Variant("pool", tcfg, ds, make_src),
                    Variant("pool_loss", tcfg.replace(**{"robust.pool_select": "loss"}), ds, make_src),
                    Variant("fraction", tcfg.replace(**{"robust.natra_mode": "fraction"}), ds, make_src),
                    Variant("exact", tcfg.replace(**{"robust.natra_mode": "exact"}), ds, make_src)]
        Variant("warm-up", variants[0].cfg, ds, make_src).epoch()  # allocator and kernels, untimed
        secs = time_epochs(variants, rounds)
        std = secs["standard"]
        later = slice(1, None) if rounds > 1 else slice(0, None)
        data["timing"] = {
            "images": len(ds), "rounds": rounds, "upstream": upstream, "seconds": secs,
            "ratio": {k: paired(v[later], std[later]) for k, v in secs.items()},
            "first_epoch_ratio": {k: v[0] / std[0] for k, v in secs.items()},
            "run_ratio": {k: sum(v) / sum(std) for k, v in secs.items()},
            "last_metrics": {v.name: v.metrics[-1] for v in variants},
            "pool_bytes_per_10k": (variants[1].src.pool.nbytes / len(ds) * 10_000) if variants[1].src.pool else 0}
    if not args.quick and not args.no_strength:
        data["strength"] = strength(base, args.seeds, args.eval_images, args.epochs or base.robust.epochs,
                                    tuple(args.kinds), args.workers, args.train_images)
        if "diffs" not in data["strength"]:  # an exploration run: print its rows, write no results
            print(data["strength"]["rows"])
            return
    data["seconds"] = time.time() - t_start
    data["device"], data["precision"] = str(DEVICE), args.precision
    name = "epoch" if DEVICE.type == "cpu" and args.precision == "fp32" else f"epoch_{DEVICE.type}_{args.precision}"
    benchlib.write_results(name, "quick" if args.quick else "full", render(data, base), data, info)
    if "timing" in data:
        print(f"ratio={data['timing']['ratio']['pool']:.2f}")


def render(d: Dict[str, Any], cfg: Config) -> str:
    p = d["pool"]
    out = [f"Pool mode as configured: pool_size P={p['pool_size']}, pool_refresh R={p['pool_refresh']} "
           f"(~{p['pool_size'] / p['pool_refresh']:.2g} decodes per example per epoch), pool_select={p['pool_select']}; "
           f"exact mode: K={cfg.robust.pgd_steps} latent PGD steps; batch {cfg.robust.batch_size}, "
           f"small_cnn width {cfg.robust.classifier_width}, LCE codes {cfg.encoder.lce_codes}; "
           f"device {d.get('device', 'cpu')}, robust.precision={d.get('precision', 'fp32')}."
           + (f" Overrides: {' '.join(d['overrides'])}." if d["overrides"] else "")]
    t = d.get("timing")
    if t:
        labels = {"standard": "standard (`none`)", "pool": f"NaTra pool ({p['pool_select']})",
                  "pool_loss": "NaTra pool (loss)", "fraction": f"NaTra fraction ({cfg.robust.adv_fraction:g} of the batch)",
                  "exact": "NaTra exact (Eq. 6)"}
        rows = []
        for k, s in t["seconds"].items():
            m = t["last_metrics"][k]
            rows.append([labels[k], statistics.median(s[1:] or s), f"{t['ratio'][k]:.2f}x",
                         f"{t['first_epoch_ratio'][k]:.2f}x", f"{t['run_ratio'][k]:.2f}x",
                         m.get("pool_decodes", 0.0) if k.startswith("pool")
                         else (f"{cfg.robust.pgd_steps + 1} ({cfg.robust.pgd_steps} through G's gradient)"
                               if k == "exact" else (f"{cfg.robust.adv_fraction * (cfg.robust.pgd_steps + 1):.2g}"
                                                     if k == "fraction" else 0)),
                         m.get("pool_members", "-"), m.get("adv_fooled", "-"),
                         f"{m.get('train_images_per_s', 0.0):.0f}"])
        out += ["", f"{t['images']} training images, {t['rounds']} epochs per variant, interleaved; latent source: "
                f"{t['upstream']}.", ""]
        out.append(benchlib.md_table(["epoch", "s (median, epochs 2+)", "vs standard (epochs 2+)", "epoch 1",
                                      "all epochs", "decodes / example (last epoch)", "pool members (last)",
                                      "adv fooled (last)", "images/s (last)"], rows))
        out.append("")
        out.append(f"Pool memory: {t['pool_bytes_per_10k'] / 2**20:.1f} MiB per 10k training images "
                   f"(uint8 members + coefficients).")
    s = d.get("strength")
    if s:
        out += ["", f"Attack strength: each classifier trained {s['epochs']} epochs on {s['train_images']} images, "
                f"scored by the exact latent PGD ({s['natural_steps']} steps, eps {s['natural_eps']}) on "
                f"{s['eval_images']} test images.", ""]
        rows = []
        seeds = sorted({r["seed"] for r in s["rows"]})
        for kind in STRENGTH_KINDS:
            rs = [r for r in s["rows"] if r["kind"] == kind]
            if not rs:
                continue
            nat = [r["natural_acc"] for r in rs]
            rows.append([kind, *[f"{100 * x:.1f}" for x in nat], f"{100 * statistics.mean(nat):.1f}",
                         f"{100 * statistics.mean(r['clean_acc'] for r in rs):.1f}",
                         statistics.mean(r["train_seconds"] for r in rs)])
        for k, dif in s["diffs"].items():
            rows.append([f"{k} - exact", *[f"{100 * x:+.1f}" for x in dif], f"{100 * statistics.mean(dif):+.1f}",
                         "", ""])
        out.append(benchlib.md_table(["classifier", *[f"natural acc % (seed {x})" for x in seeds], "mean",
                                      "clean acc % (mean)", "train s (mean)"], rows))
    return "\n".join(out)


if __name__ == "__main__":
    main()
