"""The NaTra chain in one process: GAN -> BIES + shift -> directions -> codes -> robust
training -> evaluation. Each upstream stage is cached by the config that produced it, so a
second run (or a second Tune trial) with the same upstream config reuses it.

Upstream stages run with ``UPSTREAM_SEED`` rather than ``cfg.seed``: the seed a benchmark or
sweep varies is the classifier's, and every seed must see the same generator and encoder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from natra_ray import cache, progress
from natra_ray.augment import VAE_METHODS, needs_latent
from natra_ray.augment.cvae import needs_cvae
from natra_ray.augment.latent import LatentSource, lce_codes_for
from natra_ray.config import Config
from natra_ray.data import ImageDataset, load_dataset
from natra_ray.losses import Perceptual
from natra_ray.models.latent import Directions, resolve_layer_range
from natra_ray.runtime import Reporter, null_reporter, resolve_device
from natra_ray.stages import bies, directions, evaluate, gan, lce, robust
from natra_ray.stages import cvae as cvae_stage
from natra_ray.stages import vae as vae_stage

log = logging.getLogger(__name__)

UPSTREAM_SEED = 0


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lce_free(enc: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in enc.items() if not k.startswith("lce_")}


# Data fields that do not change the training images (the test split, loader settings).
_NOT_TRAINING_DATA = ("test_subset", "num_workers", "download")


def upstream_keys(cfg: Config) -> Dict[str, str]:
    """Cache keys: each stage's key covers exactly the config its output depends on."""
    d = cfg.to_dict()
    data = {k: v for k, v in d["data"].items() if k not in _NOT_TRAINING_DATA}
    gan_k = _hash({"data": data, "gan": d["gan"], "seed": UPSTREAM_SEED})
    bies_k = _hash({"up": gan_k, "encoder": _lce_free(d["encoder"])})
    dir_k = _hash({"up": bies_k, "directions": d["directions"]})
    return {"gan": gan_k, "bies": bies_k, "directions": dir_k}


@dataclass
class Upstream:
    generator_path: Path  # the shifted generator (what decoding uses)
    encoder_path: Path
    directions_path: Path
    dirs: Dict[str, Path]  # stage -> cache entry
    metrics: Dict[str, float]


def _upstream_cfg(cfg: Config) -> Config:
    return cfg.replace(seed=UPSTREAM_SEED)


def _cached_stage(title: str, croot: Path, stage: str, key: str, produce: Callable[[Path], Dict[str, Any]],
                  meta: Optional[Dict[str, Any]] = None) -> Path:
    """``cache.cached`` with the stage's start and end lines (or one line when it is cached)."""
    entry = cache.entry_dir(croot, stage, key)
    if cache.is_complete(entry):
        progress.cached(title, entry)
        return entry
    with progress.stage(title) as st:
        st.out = cache.cached(croot, stage, key, produce, meta=meta)
    return st.out


def prepare_upstream(cfg: Config, root: Path, train: ImageDataset, report: Reporter = null_reporter,
                     gan_fit: Optional[Callable[[Config], gan.Fit]] = None,
                     bies_fit: Optional[Callable[[Config], bies.Fit]] = None) -> Upstream:
    """GAN, BIES + shift and directions, each computed once per upstream config.

    ``gan_fit`` / ``bies_fit`` replace the in-process training loops (the Ray layer passes
    TorchTrainer-backed ones); caching, checkpoints and grids stay here either way."""
    ucfg, keys, croot = _upstream_cfg(cfg), upstream_keys(cfg), Path(root) / "cache"
    croot.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()

    def gan_stage(out: Path) -> Dict[str, Any]:
        return gan.run(ucfg, train, out, report, fit=gan_fit(ucfg) if gan_fit else None).metrics

    gan_dir = _cached_stage(f"GAN ({cfg.gan.steps} steps)", croot, "gan", keys["gan"], gan_stage,
                            meta={"data": d["data"], "gan": d["gan"]})

    def bies_stage(out: Path) -> Dict[str, Any]:
        return bies.run(ucfg, gan_dir / "generator.pt", train, out, report,
                        fit=bies_fit(ucfg) if bies_fit else None).metrics

    bies_dir = _cached_stage(f"BIES (encoder {cfg.encoder.steps} + shift {cfg.encoder.shift_steps} steps)", croot,
                             "bies", keys["bies"], bies_stage, meta={"encoder": _lce_free(d["encoder"])})

    def dir_stage(out: Path) -> Dict[str, Any]:
        G = gan.load_generator(bies_dir / "generator_shifted.pt")
        E = bies.load_encoder(bies_dir / "encoder.pt", G)
        with torch.no_grad():
            ws = E(train.images[: ucfg.directions.grid_images])
        return directions.run(ucfg, bies_dir / "generator_shifted.pt", out, report, inversion_ws=ws).metrics

    dir_dir = _cached_stage("directions", croot, "directions", keys["directions"], dir_stage,
                            meta={"directions": d["directions"]})
    metrics: Dict[str, float] = {}
    for p in (gan_dir, bies_dir, dir_dir):
        metrics.update({k: v for k, v in cache.read_manifest(p)["summary"].items() if isinstance(v, (int, float))})
    return Upstream(bies_dir / "generator_shifted.pt", bies_dir / "encoder.pt", dir_dir / "directions.pt",
                    {"gan": gan_dir, "bies": bies_dir, "directions": dir_dir}, metrics)


def codes_path(cfg: Config, up: Upstream, root: Path, name: str, ds: ImageDataset, n_codes: int) -> Path:
    """Path of the cached latent codes of split ``name``; computed once per (encoder, LCE
    settings, split) and shared by every trial and epoch."""
    enc = dataclasses.replace(cfg.encoder, lce_codes=n_codes)
    key = _hash({"bies": up.encoder_path.parent.name,
                 "lce": {k: v for k, v in dataclasses.asdict(enc).items() if k.startswith("lce_")},
                 "split": name, "data": cfg.to_dict()["data"], "n": len(ds)})
    dev = resolve_device(cfg.device)

    def produce(tmp: Path) -> Dict[str, Any]:
        G = gan.load_generator(up.generator_path).to(dev)
        E = bies.load_encoder(up.encoder_path, G).to(dev)
        perc = Perceptual.from_config(cfg.encoder).to(dev) if n_codes > 1 else None
        codes = lce.encode_dataset(G, E, ds.images, enc, perceptual=perc, desc=f"encoding {name}")
        codes.save(tmp / "codes.pt")
        return {**{k: v for k, v in codes.meta.items() if isinstance(v, (int, float))},
                **{f"recon_{k}": v for k, v in lce.recon_metrics(G, codes.subset(slice(0, 512)), ds.images[:512], perc).items()}}

    return _cached_stage(f"encoding the {name} split ({len(ds)} images, {n_codes} code(s) each)",
                         Path(root) / "cache", f"codes-{name}", key, produce) / "codes.pt"


def encode_splits(cfg: Config, up: Upstream, root: Path, splits: Dict[str, ImageDataset],
                  n_codes: int) -> Dict[str, lce.LatentCodes]:
    """Latent codes of each split (cached, see ``codes_path``) - never recomputed per epoch."""
    return {name: lce.LatentCodes.load(codes_path(cfg, up, root, name, ds, n_codes)) for name, ds in splits.items()}


def latent_source(cfg: Config, up: Upstream, codes: lce.LatentCodes, eps0: float) -> LatentSource:
    dev = resolve_device(cfg.device)
    G = gan.load_generator(up.generator_path).to(dev)
    dirs = Directions.load(up.directions_path)
    start, end = resolve_layer_range(G, cfg.robust.layer_start, cfg.robust.layer_end)
    return LatentSource(G, codes.ws, codes.alpha, codes.layer, dirs, cfg.robust.num_directions,
                        (start, end), torch.full((len(codes),), float(eps0)))


def load_splits(cfg: Config) -> Dict[str, ImageDataset]:
    # The test split is drawn with a fixed seed: every model and seed is scored on the same images.
    return {"train": load_dataset(cfg.data, "train", seed=UPSTREAM_SEED),
            "val": load_dataset(cfg.data, "val", seed=UPSTREAM_SEED),
            "test": load_dataset(cfg.data, "test", seed=UPSTREAM_SEED)}


def cvae_path(cfg: Config, root: Path, train: ImageDataset, report: Reporter = null_reporter) -> Path:
    """The CVAE behind ``robust.method=cvae`` (paper 001), trained on bundles of ``train`` once per
    (training data, ``cvae`` section) and cached; its manifest holds the held-out closure metrics."""
    d = cfg.to_dict()
    key = _hash({"data": {k: v for k, v in d["data"].items() if k not in _NOT_TRAINING_DATA},
                 "cvae": d["cvae"], "seed": UPSTREAM_SEED})

    def produce(out: Path) -> Dict[str, Any]:
        ucfg = _upstream_cfg(cfg)
        pairs = cvae_stage.build_pairs(ucfg, train.images)
        return cvae_stage.run(ucfg, pairs, out, report, device=resolve_device(cfg.device)).metrics

    return cache.cached(Path(root) / "cache", "cvae", key, produce, meta={"cvae": d["cvae"]}) / "cvae.pt"


def method_extra_paths(cfg: Config, root: Path, train: ImageDataset, report: Reporter = null_reporter) -> Dict[str, Path]:
    """Files of the models ``robust.method`` needs besides the latent source, each trained once
    per (training data, its config section) and cached: ``{"vae": .../vae.pt}`` for vae_mixup."""
    if needs_cvae(cfg.robust.method):
        return {"cvae": cvae_path(cfg, root, train, report)}
    if cfg.robust.method not in VAE_METHODS:
        return {}
    d = cfg.to_dict()
    key = _hash({"data": {k: v for k, v in d["data"].items() if k not in _NOT_TRAINING_DATA},
                 "vae": d["vae"], "seed": UPSTREAM_SEED})

    def produce(out: Path) -> Dict[str, Any]:
        return vae_stage.run(_upstream_cfg(cfg), train, out, report, device=resolve_device(cfg.device)).metrics

    return {"vae": cache.cached(Path(root) / "cache", "vae", key, produce, meta={"vae": d["vae"]}) / "vae.pt"}


def load_method_extra(paths: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The models of ``method_extra_paths`` on ``device``: what ``AugmentContext.extra`` holds."""
    loaders = {"vae": vae_stage.load_vae, "cvae": cvae_stage.load_cvae}
    return {k: loaders[k](p).to(device) for k, p in paths.items()}


def run_trial(cfg: Config, root: Path, out_dir: Path, report: Reporter = null_reporter,
              splits: Optional[Dict[str, ImageDataset]] = None, up: Optional[Upstream] = None) -> Dict[str, Any]:
    """One classifier: train ``robust.method``, then the evaluation suite. Returns metrics."""
    t0 = time.time()
    splits = splits or load_splits(cfg)
    root, out_dir = Path(root), Path(out_dir)
    metrics: Dict[str, Any] = {}
    if up is None:
        up = prepare_upstream(cfg, root, splits["train"], report)
    n_codes = lce_codes_for(cfg.robust.method, cfg.encoder.lce_codes)
    codes = encode_splits(cfg, up, root, splits, n_codes)
    src = {k: latent_source(cfg, up, c, cfg.robust.eps) for k, c in codes.items()}
    n_eval = min(len(splits["test"]), cfg.eval.max_examples)
    test_src = dataclasses.replace(src["test"], ws=src["test"].ws[:n_eval], alpha=src["test"].alpha[:n_eval])
    val_src = src["val"]
    extra_paths = method_extra_paths(cfg, root, splits["train"], report)
    for p in extra_paths.values():
        metrics.update({k: v for k, v in cache.read_manifest(p.parent)["summary"].items() if isinstance(v, (int, float))})
    art = robust.run(cfg, splits["train"], splits["val"], out_dir,
                     latent=src["train"] if needs_latent(cfg.robust.method) else None,
                     val_latent=val_src, report=report, device=resolve_device(cfg.device),
                     extra=load_method_extra(extra_paths, resolve_device(cfg.device)))
    metrics.update(art.history[-1])
    metrics.update(evaluate.run(cfg, art.model, splits["test"], test_src, out_dir))
    metrics["trial_seconds"] = time.time() - t0
    metrics["classifier_path"] = str(art.classifier_path)
    return metrics


def run_chain(cfg: Config, root: Path, methods: List[str], report: Reporter = null_reporter) -> Dict[str, Dict[str, Any]]:
    """Upstream once, then each method trained and evaluated on the same data and seed."""
    splits = load_splits(cfg)
    up = prepare_upstream(cfg, root, splits["train"], report)
    results: Dict[str, Dict[str, Any]] = {"upstream": dict(up.metrics)}
    for m in methods:
        mcfg = cfg.replace(**{"robust.method": m})
        out = Path(root) / "runs" / f"{cfg.profile}-{m}-{mcfg.key('robust', 'eval')}-s{cfg.seed}"
        results[m] = run_trial(mcfg, root, out, report, splits, up)
    return results
