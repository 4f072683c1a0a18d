"""Label preservation: how often the images NaTra trains on still show their labelled class.

NaTra trains on ``dec(edit(enc(x)))`` with ``x``'s label. When the inversion or the edit leaves
the class (a sandal reconstructed as a boot-shaped blob), that is a mislabelled training image,
and nothing else measures how often it happens. This module does, with a *reference classifier*
as the labeller: the profile's classifier trained plainly (``robust.method=none``) for a small
fixed budget (``REFERENCE_EPOCHS``) on the real training split. On (at most ``MAX_IMAGES`` of)
the validation split it reports the share of

- reconstructions ``dec(enc(x))`` (the cached val codes, decoded as a trial decodes them), and
- random edits at the training budget: coefficients ``r ~ N(0, robust.eps^2)`` along the first
  ``robust.num_directions`` directions on layers ``robust.layer_start..layer_end`` (how the
  Random baseline, ``augment.latent.random_latent``, edits), and
- corner edits ``r = robust.eps * s``, ``s`` random signs: the vertices of the l_inf ball, where
  the attacks end up and where the pool mode decodes its members (augment/pool.py),

that the reference assigns to the true class, among the images it gets right on the real image
(``label_kept_recon``, ``label_kept_edit``, ``label_kept_corner``; ``*_all`` over every image).

Both the reference (``reference_key``: training data, classifier, its training settings and
budget) and the numbers (``labels_key``: the upstream entries, codes, edit settings, reference)
live in the stage cache, so a rerun costs nothing. No Ray, no MLflow.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from natra_ray import cache, progress
from natra_ray.augment import method_needs
from natra_ray.augment.pool import random_signs
from natra_ray.checkpoints import load_module
from natra_ray.config import Config
from natra_ray.data import ImageDataset
from natra_ray.models import create_classifier
from natra_ray.runtime import Reporter, null_reporter, resolve_device
from natra_ray.stages import robust
from natra_ray.stages.lce import LatentCodes
from natra_ray.workflow.layout import StorageLayout
from natra_ray.workflow.trial import latent_source
from natra_ray.workflow.upstream import UPSTREAM_SEED, Upstream, _training_data, coded_part, codes_path

REFERENCE_EPOCHS = 2  # enough for a labeller well above chance; the key holds it
MAX_IMAGES = 512  # validation images measured (a few hundred decodes)
EDIT_SEED = 0  # the random edits' coefficients: the same draws in every run
BATCH = 128
REFERENCE_STAGE, LABELS_STAGE = "label-reference", "labels"
KEYS = ("label_kept_recon", "label_kept_edit", "label_kept_corner", "reference_val_acc")


# --------------------------------------------------------------------------- the reference classifier
def reference_config(cfg: Config, epochs: int = REFERENCE_EPOCHS) -> Config:
    """Plain training of the profile's classifier at the reference's budget and the upstream seed."""
    return cfg.replace(seed=UPSTREAM_SEED, **{"robust.method": "none", "robust.epochs": epochs})


def reference_key(cfg: Config, epochs: int = REFERENCE_EPOCHS) -> str:
    """Once per (training data, classifier, its plain-training settings, budget)."""
    r = cfg.robust
    return cache.content_key({
        "data": _training_data(cfg),
        "classifier": {"name": r.classifier, "width": r.classifier_width, "depth": r.classifier_depth},
        "training": {"batch_size": r.batch_size, "lr": r.lr, "momentum": r.momentum, "weight_decay": r.weight_decay},
        "epochs": epochs, "seed": UPSTREAM_SEED})


def reference_classifier(cfg: Config, layout: StorageLayout, splits: Mapping[str, ImageDataset],
                         epochs: int = REFERENCE_EPOCHS, report: Reporter = null_reporter) -> Path:
    """The cache entry holding the reference's ``classifier.pt`` (trained on first use); its
    manifest's summary has ``reference_val_acc`` on the whole validation split."""
    rcfg = reference_config(cfg, epochs)

    def produce(out: Path) -> Dict[str, Any]:
        train, val = splits["train"], splits["val"]
        with torch.random.fork_rng(devices=[]):  # the same initial weights whoever asks, RNG left as it was
            torch.manual_seed(rcfg.seed)
            state = robust.train(rcfg, train, val, report=report, device=resolve_device(cfg.device))
        robust.save_classifier(out / "classifier.pt", state.bare, rcfg, len(train.class_names),
                               extra={"history": state.history, "method": "none"})
        return {"reference_val_acc": float(state.history[-1]["val_acc"]), "reference_epochs": epochs}

    key, title = reference_key(cfg, epochs), f"label-preservation reference classifier ({epochs} epochs, plain)"
    entry = cache.entry_dir(layout.cache, REFERENCE_STAGE, key)
    if cache.is_complete(entry):
        progress.cached(title, entry)
        return entry
    with progress.stage(title) as st:
        st.out = cache.cached(layout.cache, REFERENCE_STAGE, key, produce,
                              meta={"robust": reference_config(cfg, epochs).to_dict()["robust"]})
    return st.out


# --------------------------------------------------------------------------- label preservation
def _ident(path: Path) -> str:
    """A file as a key sees it: ``<entry>/<file>`` inside a finished cache entry (content-addressed,
    wherever the storage root lies), else its absolute path."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if cache.is_complete(path.parent) else str(path.resolve())


def labels_key(cfg: Config, up: Upstream, codes: Path, reference: Path, n: int) -> str:
    """Once per (upstream entries, codes, edit budget and layers, reference, images measured)."""
    r = cfg.robust
    return cache.content_key({
        "upstream": {k: Path(v).name for k, v in up.entries.items()},
        "generator": _ident(up.generator_path), "directions": _ident(up.directions_path), "codes": _ident(codes),
        "edit": {"eps": r.eps, "num_directions": r.num_directions, "layers": [r.layer_start, r.layer_end],
                 "seed": EDIT_SEED, "corners": True},
        "reference": Path(reference).name, "n": n})


def _share(ok: torch.Tensor, among: Optional[torch.Tensor] = None) -> float:
    if among is not None:
        ok = ok[among]
    return float(ok.float().mean()) if ok.numel() else math.nan


def label_preservation(cfg: Config, upstream: Upstream, layout: StorageLayout, splits: Mapping[str, ImageDataset],
                       codes: Optional[Path] = None, max_images: int = MAX_IMAGES,
                       epochs: int = REFERENCE_EPOCHS, report: Reporter = null_reporter) -> Dict[str, float]:
    """``{"label_kept_recon", "label_kept_edit", "reference_val_acc", ...}`` for ``cfg``'s method,
    LCE count and edit budget (see the module docstring). ``codes``: the val split's codes file
    (default: the cached ones a trial of ``cfg`` decodes, encoded on first use)."""
    val = splits["val"]
    n = min(len(val), max_images)
    if codes is None:  # the codes the trials' validation attack reads, so nothing is encoded twice
        n_codes = method_needs(cfg.robust.method).lce_codes(cfg.encoder.lce_codes)
        coded = coded_part(cfg, "val", val)
        codes, n = codes_path(cfg, upstream, layout, "val", coded, n_codes), min(n, len(coded))
    ref_entry = reference_classifier(cfg, layout, splits, epochs, report)
    ref_acc = float(cache.read_manifest(ref_entry)["summary"]["reference_val_acc"])
    eps = float(cfg.robust.eps)

    def produce(out: Path) -> Dict[str, Any]:
        dev = resolve_device(cfg.device)
        ref, _ = load_module(ref_entry / "classifier.pt", kind="classifier", factory=create_classifier)
        ref.to(dev).eval()
        src = latent_source(cfg, upstream, LatentCodes.load(codes).subset(slice(0, n)), dev)
        x, y = val.images[:n], val.labels[:n]
        gen = torch.Generator().manual_seed(EDIT_SEED)
        real, recon, edit, corner = [], [], [], []
        with torch.no_grad():
            for i in range(0, n, BATCH):
                idx = torch.arange(i, min(i + BATCH, n))
                r = torch.randn(len(idx), src.num_directions, generator=gen) * eps
                real.append(ref(x[idx].to(dev)).argmax(1).cpu())
                recon.append(ref(src.reconstruct(idx)).argmax(1).cpu())
                edit.append(ref(src.decode(*src.codes(idx), r.to(dev))).argmax(1).cpu())
                s = random_signs(*r.shape, gen)  # a corner, as the pool mode proposes one
                corner.append(ref(src.decode(*src.codes(idx), (s * eps).to(dev))).argmax(1).cpu())
        real_ok, recon_ok, edit_ok, corner_ok = (torch.cat(p) == y for p in (real, recon, edit, corner))
        return {"label_kept_recon": _share(recon_ok, real_ok), "label_kept_edit": _share(edit_ok, real_ok),
                "label_kept_corner": _share(corner_ok, real_ok),
                "label_kept_recon_all": _share(recon_ok), "label_kept_edit_all": _share(edit_ok),
                "label_kept_corner_all": _share(corner_ok),
                "reference_acc_measured": _share(real_ok), "label_images": n, "label_eps": eps}

    key = labels_key(cfg, upstream, codes, ref_entry, n)
    entry = cache.cached(layout.cache, LABELS_STAGE, key, produce,
                         meta={"eps": eps, "layers": [cfg.robust.layer_start, cfg.robust.layer_end],
                               "num_directions": cfg.robust.num_directions, "codes": _ident(codes)})
    return {**{k: float(v) for k, v in cache.read_manifest(entry)["summary"].items()}, "reference_val_acc": ref_acc}


def describe(m: Mapping[str, float]) -> str:
    """The one line a sweep prints."""
    n = int(m["label_images"])
    right = round(m["reference_acc_measured"] * n)
    return (f"label preservation: reconstructions {m['label_kept_recon']:.2f}, edits at eps={m['label_eps']:.2g} "
            f"{m['label_kept_edit']:.2f}, at its corners {m['label_kept_corner']:.2f} (reference classifier val acc {m['reference_val_acc']:.2f}; shares of "
            f"the {right} of {n} val images it gets right)")


__all__ = ["REFERENCE_EPOCHS", "MAX_IMAGES", "KEYS", "reference_config", "reference_key", "reference_classifier",
           "labels_key", "label_preservation", "describe"]
