"""Evaluation suite (METHOD.md Sec. 8): clean, natural-transformation (worst case and fixed
strengths), MNIST-C-style corruptions, blurred accuracy and DeepFool score (paper 002),
pixel PGD, and the escaped examples (correct on the original, fooled by a transformation).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from natra_ray.attacks import accuracy_under, deepfool_score, pgd_linf
from natra_ray.augment.latent import LatentSource, latent_attack
from natra_ray.config import Config
from natra_ray.data import ImageDataset
from natra_ray.data.corruptions import apply_corruption
from natra_ray.stages.robust import accuracy
from natra_ray.viz import save_grid

log = logging.getLogger(__name__)

NATURAL_BATCH = 256  # examples per latent attack / decode call


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def corruption_accuracies(cfg: Config, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """acc per corruption x severity, per corruption (mean over severities) and the mean.

    ``eval.corruption_severity=every``: every image at every severity (corruptions x severities
    forward passes of the test split). ``one_per_image``: every image once per corruption, at the
    severity a fixed seeded draw gives it (an equal share of the images per severity), so each
    corruption still scores all the images at a third of the cost with three severities - the
    forward passes of 10k images dominate a CPU trial's evaluation."""
    e = cfg.eval
    out: Dict[str, float] = {}
    per_corruption = []
    if e.corruption_severity == "one_per_image":
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 1000 + 999))
        share = {s: order[i::len(e.severities)].sort().values for i, s in enumerate(e.severities)}
    else:
        share = {s: None for s in e.severities}
    for name in e.corruptions:
        accs = []
        for s, rows in share.items():
            xs, ys = (x, y) if rows is None else (x[rows], y[rows])
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + s)  # same corrupted set for every model
            xc = apply_corruption(name, xs, s, generator=gen)
            a = float((_predict(model, xc) == ys).float().mean())
            out[f"corruption_{name}_s{s}_acc"] = a
            accs.append(a)
        out[f"corruption_{name}_acc"] = sum(accs) / len(accs)
        per_corruption.append(out[f"corruption_{name}_acc"])
    out["corruption_mean_acc"] = sum(per_corruption) / max(1, len(per_corruption))
    return out


def natural_attack_metrics(cfg: Config, model: nn.Module, src: LatentSource, x: torch.Tensor, y: torch.Tensor,
                           out_dir: Optional[Path]) -> Dict[str, float]:
    """The worst case within eval.natural_eps (``natural_acc``) and the escaped examples.
    ``src`` is the evaluation source (``workflow.trial.eval_source``: the fixed ``eval.natural_*``
    layer range and directions), so every trial is scored against the same attack."""
    e = cfg.eval
    gen = torch.Generator().manual_seed(cfg.seed)
    clean_pred = _predict(model, x)
    adv_pred, adv_imgs = [], []
    for i in range(0, len(y), NATURAL_BATCH):
        idx = torch.arange(i, min(i + NATURAL_BATCH, len(y)))
        adv = latent_attack(model, src, idx, y[idx], e.natural_eps, e.natural_steps, None, gen)
        adv_pred.append(adv.logits.argmax(1).cpu())
        adv_imgs.append(adv.x.cpu())
    adv_pred_t, adv = torch.cat(adv_pred), torch.cat(adv_imgs)
    out: Dict[str, float] = {"natural_acc": float((adv_pred_t == y).float().mean())}
    escaped = (clean_pred == y) & (adv_pred_t != y)
    out["escaped_count"] = int(escaped.sum())
    out["escaped_fraction"] = float(escaped.float().mean())
    if out_dir is not None and int(escaped.sum()) > 0:
        sel = escaped.nonzero().flatten()[:16]
        pairs = torch.stack([x[sel], adv[sel]], dim=1).flatten(0, 1)  # original, transformed, ...
        save_grid(pairs, out_dir / "escaped_examples.png", nrow=8)
    return out


@torch.no_grad()
def natural_fixed_metrics(cfg: Config, model: nn.Module, src: LatentSource, y: torch.Tensor) -> Dict[str, float]:
    """Reconstruction accuracy and fixed-strength edits along each direction (no randomness)."""
    bs = NATURAL_BATCH
    # Reconstruction accuracy separates "the classifier dislikes GAN images" from robustness.
    recon = torch.cat([src.reconstruct(torch.arange(i, min(i + bs, len(y)))).cpu() for i in range(0, len(y), bs)])
    out = {"recon_acc": float((_predict(model, recon) == y).float().mean())}
    k = src.num_directions
    for s in cfg.eval.fixed_strengths:
        accs = []
        for d in range(k):
            coeffs = torch.zeros(len(y), k)
            coeffs[:, d] = s
            preds = []
            for i in range(0, len(y), bs):
                idx = torch.arange(i, min(i + bs, len(y)))
                preds.append(_predict(model, src.decode(*src.codes(idx), coeffs[idx].to(src.device))))
            accs.append(float((torch.cat(preds) == y).float().mean()))
        out[f"fixed_s{s:+g}_mean_acc"] = sum(accs) / k
        out[f"fixed_s{s:+g}_min_acc"] = min(accs)
    return out


def natural_metrics(cfg: Config, model: nn.Module, src: LatentSource, x: torch.Tensor, y: torch.Tensor,
                    out_dir: Optional[Path]) -> Dict[str, float]:
    """Worst case within eval.natural_eps, fixed-strength edits per direction, escaped examples."""
    return {**natural_attack_metrics(cfg, model, src, x, y, out_dir), **natural_fixed_metrics(cfg, model, src, y)}


# The suite in parts that share nothing but the model and the data (each draws its randomness from
# its own seeded generator), so the parts can run apart - in parallel, on other devices - and give
# the numbers they give together. "natural_*" need the latent source.
PARTS = ("clean", "corruptions", "deepfool", "pixel_pgd", "natural_attack", "natural_fixed")
LATENT_PARTS = ("natural_attack", "natural_fixed")


def run_part(cfg: Config, model: nn.Module, test: ImageDataset, test_latent: Optional[LatentSource], part: str,
             out_dir: Optional[Path] = None) -> Dict[str, float]:
    """One part of the suite, keys unprefixed: clean, blurred and corruption accuracy on every test
    image (forward passes: cheap, and a 300-image estimate moves by +-2.5 points), the attacks
    (DeepFool, pixel PGD, the latent ones) on its first ``eval.max_examples``."""
    model.eval()
    n = min(len(test), cfg.eval.max_examples)
    x, y = test.images[:n], test.labels[:n]
    dev = next(model.parameters()).device
    if part == "clean":
        blurred = _predict(model, apply_corruption("blur5", test.images, 1))
        return {"clean_acc": accuracy(model, test.images, test.labels),
                "blurred_acc": float((blurred == test.labels).float().mean())}
    if part == "corruptions":
        return corruption_accuracies(cfg, model, test.images, test.labels)
    if part == "deepfool":
        return {"deepfool_score": deepfool_score(model, x.to(dev), max_iter=cfg.eval.deepfool_steps)}
    if part == "pixel_pgd":
        # seeded random starts, as the corruptions' and the latent attack's: a model scores the same every time
        return {"pixel_pgd_acc": accuracy_under(pgd_linf, model, x.to(dev), y.to(dev), eps=cfg.robust.pixel_eps,
                                                steps=cfg.eval.pixel_pgd_steps,
                                                generator=torch.Generator().manual_seed(cfg.seed))}
    if part not in LATENT_PARTS:
        raise ValueError(f"unknown evaluation part {part!r}; known: {', '.join(PARTS)}")
    if test_latent is None:
        raise ValueError(f"evaluation part {part!r} needs the test split's latent source")
    if part == "natural_attack":
        return natural_attack_metrics(cfg, model, test_latent, x, y, out_dir)
    return natural_fixed_metrics(cfg, model, test_latent, y)


def parts_for(test_latent_given: bool) -> tuple:
    """The parts a suite runs: all, or those without the latent source."""
    return PARTS if test_latent_given else tuple(p for p in PARTS if p not in LATENT_PARTS)


def run(cfg: Config, model: nn.Module, test: ImageDataset, test_latent: Optional[LatentSource] = None,
        out_dir: str | Path | None = None, prefix: str = "test_") -> Dict[str, float]:
    """All metrics on the test split, keys prefixed: clean, blurred and corruption accuracy on
    every test image (forward passes: cheap, and a 300-image estimate moves by +-2.5 points), the
    attacks (DeepFool, pixel PGD, the latent attack) on its first ``eval.max_examples``."""
    t0 = time.time()
    out_dir = Path(out_dir) if out_dir is not None else None
    m: Dict[str, float] = {}
    for part in parts_for(test_latent is not None):
        m.update(run_part(cfg, model, test, test_latent, part, out_dir))
    m["eval_seconds"] = time.time() - t0
    return {f"{prefix}{k}": v for k, v in m.items()}
