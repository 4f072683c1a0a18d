"""What every trial of one upstream config shares, computed once and cached by its config key:
the GAN, BIES (encoder + shifted generator), the directions, each split's latent codes and the
extra models some augmentation methods need (a VAE, a CVAE).

Upstream stages run with ``UPSTREAM_SEED`` rather than ``cfg.seed``: the seed a benchmark or
sweep varies is the classifier's, and every seed must see the same generator and encoder.

Each stage's key covers exactly the config its output depends on (``upstream_keys``,
``codes_key``, ``extra_model_key``), so a sweep over eps/rho/c never retrains the encoder. The
same rules say which config keys a sweep's trial applies itself (``applied_per_trial``) and
which it takes from the upstream the sweep shares (``upstream_stage``): what a search space may
sample.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from natra_ray import cache, progress
from natra_ray.augment import method_needs
from natra_ray.config import Config
from natra_ray.data import ImageDataset, load_dataset
from natra_ray.losses import Perceptual
from natra_ray.runtime import Reporter, null_reporter, resolve_device
from natra_ray.stages import bies, directions, gan, lce
from natra_ray.stages import cvae as cvae_stage
from natra_ray.stages import vae as vae_stage
from natra_ray.workflow.layout import StorageLayout

UPSTREAM_SEED = 0
SPLITS = ("train", "val", "test")

# Data fields that do not change the training images (the test split, the download switch).
NOT_TRAINING_DATA = ("test_subset", "download")
# Config keys removed since cache entries were first keyed, with the only value they ever had:
# the keys that hashed them still do, so every entry made before their removal stays valid.
RETIRED_KEYS = {"data.num_workers": 0, "robust.clean_weight": 1.0}
# Config keys added since, with their defaults: a key at its default stays out of every key, so
# the entries made before it existed stay valid (and a changed value keys new ones).
ADDED_KEYS = {"data.image_column": "image", "data.label_column": "label", "robust.precision": "fp32",
              "eval.corruption_severity": "every", "robust.two_pass_norm": "batch"}


def drop_added_defaults(flat: Mapping[str, Any], section: str = "") -> Dict[str, Any]:
    """``flat`` (``{"section.key": value}``, or one section's ``{key: value}`` when ``section`` names
    it) without the ``ADDED_KEYS`` that hold their default."""
    prefix = f"{section}." if section else ""
    return {k: v for k, v in flat.items() if ADDED_KEYS.get(prefix + k, object()) != v}


def keyed_dict(cfg: Config) -> Dict[str, Any]:
    """``cfg.to_dict()`` as the cache keys see it (with ``RETIRED_KEYS`` back in place)."""
    d = cfg.to_dict()
    d["data"] = drop_added_defaults(d["data"], "data")
    for dotted, value in RETIRED_KEYS.items():
        section, key = dotted.split(".")
        d[section] = {**d[section], key: value}
    return d


def _training_data(cfg: Config) -> Dict[str, Any]:
    data = drop_added_defaults(cfg.to_dict()["data"], "data")
    return {k: v for k, v in data.items() if k not in NOT_TRAINING_DATA}


def _is_lce(encoder_field: str) -> bool:
    """The encoder's LCE settings key the codes (``codes_key``), not BIES."""
    return encoder_field.startswith("lce_")


def _lce_free(enc: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in enc.items() if not _is_lce(k)}


def upstream_keys(cfg: Config) -> Dict[str, str]:
    """The GAN, BIES and directions keys; each covers the one before it."""
    d = cfg.to_dict()
    gan_k = cache.content_key({"data": _training_data(cfg), "gan": d["gan"], "seed": UPSTREAM_SEED})
    bies_k = cache.content_key({"up": gan_k, "encoder": _lce_free(d["encoder"])})
    dir_k = cache.content_key({"up": bies_k, "directions": d["directions"]})
    return {"gan": gan_k, "bies": bies_k, "directions": dir_k}


# --------------------------------------------------------------------------- shared or per trial
# A sweep prepares the upstream once, from its base config, before any trial starts; every trial
# decodes with that one. So the config ``upstream_keys`` covers is fixed for the whole sweep
# (a trial that sampled it would log its value and silently use the base one), and a search space
# may only sample what a trial applies itself:
#   robust.*            the classifier, its method and training (workflow.trial.run_trial)
#   vae.*, cvae.*       the extra models its method trains on (extra_model_key, cached)
#   encoder.lce_*       its latent codes (codes_key, cached per LCE setting)
#   data.test_subset, data.download    the splits it loads (NOT_TRAINING_DATA: in no upstream key)
#   seed, device        the classifier's seed (the upstream's is UPSTREAM_SEED) and device
# Everything else is either an upstream key (the rest of data, gan, encoder; directions), the
# evaluation every trial is scored by (eval: one fixed attack and shift suite, or a trial could
# sample itself an easier test), or a setting of the sweep itself (tune, tracking, benchmark,
# profile), read once from the base config.
UPSTREAM_SECTIONS = {"data": "gan", "gan": "gan", "encoder": "bies", "directions": "directions"}
TRIAL_SECTIONS = ("robust", "vae", "cvae")
SCORING_SECTIONS = ("eval",)
TRIAL_TOP_KEYS = ("seed", "device")


def upstream_stage(key: str) -> Optional[str]:
    """The shared stage (``"gan"``, ``"bies"`` or ``"directions"``) whose cache key covers the
    config key ``key`` (``"section.field"``), or None when no upstream key does."""
    section, _, name = key.partition(".")
    stage = UPSTREAM_SECTIONS.get(section)
    if stage is None or (section == "data" and name in NOT_TRAINING_DATA) or (section == "encoder" and _is_lce(name)):
        return None
    return stage


def applied_per_trial(key: str) -> bool:
    """Does a sweep's trial apply config key ``key`` from its own (sampled) config?"""
    section, dot, _ = key.partition(".")
    if not dot:
        return key in TRIAL_TOP_KEYS
    return section in TRIAL_SECTIONS or (section in UPSTREAM_SECTIONS and upstream_stage(key) is None)


@dataclass(frozen=True)
class Upstream:
    """The files a trial decodes with, and the cache entries they live in."""

    generator_path: Path  # the shifted generator (what decoding uses)
    encoder_path: Path
    directions_path: Path
    entries: Mapping[str, Path]  # stage -> cache entry
    metrics: Mapping[str, float]

    def tags(self) -> Dict[str, str]:
        """Which cache entries a trial used (the explorer's --run-id follows these to the files)."""
        return {f"natra.upstream.{k}": Path(v).name for k, v in self.entries.items()}


def _cached_stage(title: str, layout: StorageLayout, stage: str, key: str,
                  produce: Callable[[Path], Dict[str, Any]], meta: Optional[Dict[str, Any]] = None) -> Path:
    """``cache.cached`` with the stage's start and end lines (or one line when it is cached)."""
    entry = cache.entry_dir(layout.cache, stage, key)
    if cache.is_complete(entry):
        progress.cached(title, entry)
        return entry
    with progress.stage(title) as st:
        st.out = cache.cached(layout.cache, stage, key, produce, meta=meta)
    return st.out


def _summary_numbers(entry: Path) -> Dict[str, float]:
    return {k: v for k, v in cache.read_manifest(entry)["summary"].items() if isinstance(v, (int, float))}


def prepare_upstream(cfg: Config, layout: StorageLayout, train: ImageDataset, report: Reporter = null_reporter,
                     gan_fit: Optional[Callable[[Config], gan.Fit]] = None,
                     bies_fit: Optional[Callable[[Config], bies.Fit]] = None) -> Upstream:
    """GAN, BIES + shift and directions, each computed once per upstream config.

    ``gan_fit`` / ``bies_fit`` replace the in-process training loops (the Ray layer passes
    TorchTrainer-backed ones); caching, checkpoints and grids stay here either way."""
    ucfg, keys = cfg.replace(seed=UPSTREAM_SEED), upstream_keys(cfg)
    layout.cache.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()

    def gan_stage(out: Path) -> Dict[str, Any]:
        return gan.run(ucfg, train, out, report, fit=gan_fit(ucfg) if gan_fit else None).metrics

    gan_dir = _cached_stage(f"GAN ({cfg.gan.steps} steps)", layout, "gan", keys["gan"], gan_stage,
                            meta={"data": d["data"], "gan": d["gan"]})

    def bies_stage(out: Path) -> Dict[str, Any]:
        return bies.run(ucfg, gan_dir / "generator.pt", train, out, report,
                        fit=bies_fit(ucfg) if bies_fit else None).metrics

    bies_dir = _cached_stage(f"BIES (encoder {cfg.encoder.steps} + shift {cfg.encoder.shift_steps} steps)", layout,
                             "bies", keys["bies"], bies_stage, meta={"encoder": _lce_free(d["encoder"])})

    def dir_stage(out: Path) -> Dict[str, Any]:
        G = gan.load_generator(bies_dir / "generator_shifted.pt")
        E = bies.load_encoder(bies_dir / "encoder.pt", G)
        with torch.no_grad():
            ws = E(train.images[: ucfg.directions.grid_images])
        return directions.run(ucfg, bies_dir / "generator_shifted.pt", out, report, inversion_ws=ws).metrics

    dir_dir = _cached_stage("directions", layout, "directions", keys["directions"], dir_stage,
                            meta={"directions": d["directions"]})
    metrics: Dict[str, float] = {}
    for entry in (gan_dir, bies_dir, dir_dir):
        metrics.update(_summary_numbers(entry))
    return Upstream(bies_dir / "generator_shifted.pt", bies_dir / "encoder.pt", dir_dir / "directions.pt",
                    {"gan": gan_dir, "bies": bies_dir, "directions": dir_dir}, metrics)


def load_splits(cfg: Config) -> Dict[str, ImageDataset]:
    # Drawn with a fixed seed: every model and seed is trained on, and scored on, the same images.
    return {name: load_dataset(cfg.data, name, seed=UPSTREAM_SEED) for name in SPLITS}


# --------------------------------------------------------------------------- latent codes
def codes_key(cfg: Config, up: Upstream, split: str, n_images: int, n_codes: int) -> str:
    """Once per (encoder, LCE settings, split) and shared by every trial and epoch."""
    enc = dataclasses.replace(cfg.encoder, lce_codes=n_codes)
    return cache.content_key({"bies": up.encoder_path.parent.name,
                              "lce": {k: v for k, v in dataclasses.asdict(enc).items() if _is_lce(k)},
                              "split": split, "data": keyed_dict(cfg)["data"], "n": n_images})


def coded_part(cfg: Config, split: str, ds: ImageDataset) -> ImageDataset:
    """The images of a split a trial needs latent codes of: every training image (each one is
    attacked while training), the first ``eval.max_examples`` of val and test (only the latent
    attacks read them: encoding all 10k test images with LCE would cost more than the trial)."""
    if split == "train" or len(ds) <= cfg.eval.max_examples:
        return ds
    return ds.subset(slice(0, cfg.eval.max_examples))


# encode(cfg, upstream, images, n_codes, desc) -> the codes of ``images`` (a whole split). In
# process by default; the Ray layer passes one that shards the split over GPU tasks
# (distributed/remote_stages.py). The cache around it (``codes_path``) is the same either way.
Encode = Callable[[Config, Upstream, torch.Tensor, int, str], lce.LatentCodes]
RECON_IMAGES = 512  # the first images of a split whose reconstructions are scored (a multiple of lce.ENCODE_BATCH)


def encode_in_process(cfg: Config, up: Upstream, images: torch.Tensor, n_codes: int, desc: str = "encoding",
                      first_batch: int = 0) -> lce.LatentCodes:
    """LCE of ``images`` on this process's device, with ``n_codes`` codes each. The shard that
    starts the split (``first_batch`` 0) also scores the reconstructions of its first
    ``RECON_IMAGES`` images (``recon_*`` in the codes' meta)."""
    dev = resolve_device(cfg.device)
    G = gan.load_generator(up.generator_path).to(dev)
    E = bies.load_encoder(up.encoder_path, G).to(dev)
    perc = Perceptual.from_config(cfg.encoder).to(dev) if n_codes > 1 else None
    enc = dataclasses.replace(cfg.encoder, lce_codes=n_codes)
    codes = lce.encode_dataset(G, E, images, enc, perceptual=perc, desc=desc, first_batch=first_batch)
    if first_batch == 0:
        recon = lce.recon_metrics(G, codes.subset(slice(0, RECON_IMAGES)), images[:RECON_IMAGES], perc)
        codes.meta.update({f"recon_{k}": v for k, v in recon.items()})
    return codes


def codes_path(cfg: Config, up: Upstream, layout: StorageLayout, split: str, ds: ImageDataset, n_codes: int,
               encode: Encode = encode_in_process) -> Path:
    """The cached latent codes (``lce.LatentCodes``) of split ``split``, encoded on first use."""

    def produce(tmp: Path) -> Dict[str, Any]:
        codes = encode(cfg, up, ds.images, n_codes, f"encoding {split}")
        codes.save(tmp / "codes.pt")
        return {k: v for k, v in codes.meta.items() if isinstance(v, (int, float))}

    title = f"encoding the {split} split ({len(ds)} images, {n_codes} code(s) each)"
    return _cached_stage(title, layout, f"codes-{split}", codes_key(cfg, up, split, len(ds), n_codes), produce) / "codes.pt"


# --------------------------------------------------------------------------- extra models
_EXTRA_STAGES = {"vae": (vae_stage.run, vae_stage.load_vae), "cvae": (cvae_stage.run, cvae_stage.load_cvae)}


def extra_model_key(cfg: Config, kind: str) -> str:
    """Once per (training data, the model's own config section)."""
    return cache.content_key({"data": _training_data(cfg), kind: cfg.to_dict()[kind], "seed": UPSTREAM_SEED})


def extra_model_paths(cfg: Config, layout: StorageLayout, train: ImageDataset,
                      report: Reporter = null_reporter) -> Dict[str, Path]:
    """The models ``robust.method`` needs besides the latent source (``{"vae": .../vae.pt}`` for
    vae_mixup, ``{"cvae": ...}`` for cvae), each trained on ``train`` once and cached; a CVAE's
    manifest holds its held-out closure metrics."""
    ucfg, dev = cfg.replace(seed=UPSTREAM_SEED), resolve_device(cfg.device)
    paths = {}
    for kind in method_needs(cfg.robust.method).extra_models:
        def produce(out: Path, kind: str = kind) -> Dict[str, Any]:
            data = cvae_stage.build_pairs(ucfg, train.images) if kind == "cvae" else train
            return _EXTRA_STAGES[kind][0](ucfg, data, out, report, device=dev).metrics

        entry = cache.cached(layout.cache, kind, extra_model_key(cfg, kind), produce, meta={kind: cfg.to_dict()[kind]})
        paths[kind] = entry / f"{kind}.pt"
    return paths


def load_extra_models(paths: Mapping[str, Path], device: torch.device) -> Dict[str, Any]:
    """The models of ``extra_model_paths`` on ``device``: what ``AugmentContext.extra`` holds."""
    return {k: _EXTRA_STAGES[k][1](p).to(device) for k, p in paths.items()}


__all__ = ["UPSTREAM_SEED", "SPLITS", "Upstream", "upstream_keys", "upstream_stage", "applied_per_trial",
           "prepare_upstream", "load_splits", "codes_key", "coded_part", "codes_path", "Encode", "encode_in_process",
           "extra_model_key", "extra_model_paths", "load_extra_models", "keyed_dict", "RETIRED_KEYS", "ADDED_KEYS",
           "drop_added_defaults"]
