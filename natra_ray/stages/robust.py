"""Robust classifier training (NaTra Eq. 1 outer minimisation), any augmentation method.

``train`` is the single-process loop; ``TrainState`` makes an epoch resumable so the Ray
Train worker (and its FailureConfig) can checkpoint and restart it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from natra_ray.augment import AugmentContext, Batch, create_method, soft_cross_entropy
from natra_ray.augment.latent import LatentSource, latent_attack
from natra_ray.augment.pool import TwoPass
from natra_ray.attacks import _eval_mode
from natra_ray.checkpoints import save_checkpoint
from natra_ray.config import Config
from natra_ray.data import ImageDataset
from natra_ray.data.shifts import shift_suite
from natra_ray.models import create_classifier
from natra_ray import progress
from natra_ray.precision import autocast, grad_scaler
from natra_ray.runtime import Reporter, null_reporter

log = logging.getLogger(__name__)


def classifier_kwargs(cfg: Config, num_classes: int) -> Dict[str, Any]:
    r = cfg.robust
    return dict(in_channels=cfg.data.channels, num_classes=num_classes, image_size=cfg.data.image_size,
                width=r.classifier_width, depth=r.classifier_depth)


def build_classifier(cfg: Config, num_classes: int) -> nn.Module:
    return create_classifier(cfg.robust.classifier, **classifier_kwargs(cfg, num_classes))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Clean accuracy in eval mode, batched."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(1, len(x))


def natural_accuracy(model: nn.Module, src: LatentSource, y: torch.Tensor, eps: float, steps: int,
                     batch_size: int = 256, seed: int = 0) -> float:
    """Accuracy under the worst edit within eps along the directions (latent PGD, Eq. 6)."""
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(y), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(y)))
        adv = latent_attack(model, src, idx, y[idx], eps, steps, None, gen)  # logits in eval mode
        correct += int((adv.logits.argmax(1).cpu() == y[idx]).sum())
    return correct / max(1, len(y))


@dataclass
class TrainState:
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    # robust.precision=fp16's loss scaling (a disabled scaler passes every call through)
    scaler: Optional[torch.amp.GradScaler] = None

    @property
    def bare(self) -> nn.Module:
        """The classifier without a DDP wrapper (checkpoints never carry 'module.' prefixes)."""
        return getattr(self.model, "module", self.model)

    def state_dict(self, latent: Optional[LatentSource]) -> Dict[str, Any]:
        return {"model": self.bare.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "epoch": self.epoch, "history": self.history,
                "eps": latent.eps.detach().cpu().clone() if latent is not None else torch.zeros(0),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None and self.scaler.is_enabled() else {})}

    def load_state_dict(self, s: Dict[str, Any], latent: Optional[LatentSource]) -> None:
        self.bare.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        self.epoch, self.history = int(s["epoch"]), list(s["history"])
        if latent is not None and s["eps"].numel():
            latent.eps.copy_(s["eps"])
        if self.scaler is not None and self.scaler.is_enabled() and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])


def make_state(cfg: Config, num_classes: int, steps_per_epoch: int, device: torch.device) -> TrainState:
    r = cfg.robust
    model = build_classifier(cfg, num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                          nesterov=r.momentum > 0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=max(1, r.epochs * steps_per_epoch),
                                                pct_start=0.15)
    return TrainState(model, opt, sched, scaler=grad_scaler(device, r.precision))


def _loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, precision: str, **kw: Any) -> tuple:
    """(mean soft cross-entropy, logits): the forward under ``precision``'s autocast, the loss
    on float32 logits (a low-precision log-softmax loses the small probabilities)."""
    with autocast(x.device, precision):
        logits = model(x, **kw).float()
    return soft_cross_entropy(logits, target).mean(), logits


def _two_pass(model: nn.Module, aug: TwoPass, dev: torch.device, precision: str = "fp32",
              scaler: Optional[torch.amp.GradScaler] = None, second_norm: str = "batch") -> torch.Tensor:
    """Backward the loss of a ``TwoPass`` batch (augment/pool.py) in two passes: its first half,
    whose input gradient picks the second half, then that half. The loss is the mean of the two
    halves' mean losses: with as many rows in each, the one-pass mean over all rows, and with a
    second half of a fraction of the rows, an unbiased estimate of it. Under DDP the first
    backward does not all-reduce (``no_sync``), the second reduces both.

    ``second_norm`` (``robust.two_pass_norm``) is how BatchNorm treats the second half.
    ``batch`` (the default): over its own rows, as over any batch. A shift that the
    transformation makes in every row (darker, thicker, lower contrast) is then cancelled in
    training, while an attacked test image meets the running statistics. ``running``: the
    running statistics, which only the clean half updates, so the transformed images are
    normalised as they are at test time. On 3,600 images ``running`` gained 2 points of clean
    accuracy. On the whole training split it lost 3, with the same latent robustness
    (BENCHMARKS.md section 7), so it is not the default. One concatenated pass would mix the
    halves' statistics, but it would cost the first half's passes again."""
    x1 = aug.x.to(dev).detach().requires_grad_(True)
    t1 = aug.target.to(dev)
    sync_later = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
    scale = scaler.scale if scaler is not None else (lambda t: t)
    with sync_later:
        l1, _ = _loss(model, x1, t1, precision, **aug.forward_kwargs)
        l1 = l1 / 2
        scale(l1).backward()
    # fp16 scaled the loss, so the input gradient too: the second half is chosen on the true one
    grad = x1.grad if scaler is None or not scaler.is_enabled() else x1.grad / scaler.get_scale()
    half = aug.second(grad)
    x2 = half.x.to(dev)
    # "running": BatchNorm in eval mode only (dropout, if any, stays on)
    with _eval_mode(model, only=nn.modules.batchnorm._BatchNorm) if second_norm == "running" \
            else contextlib.nullcontext():
        l2, logits = _loss(model, x2, half.target.to(dev), precision, **half.forward_kwargs)
    l2 = l2 / 2
    scale(l2).backward()
    aug.info.update(half.info)
    if aug.seen is not None:
        aug.info.update(aug.seen(logits.detach()))
    return l1.detach() + l2.detach()


def train_epoch(cfg: Config, state: TrainState, data: ImageDataset, latent: Optional[LatentSource],
                generator: torch.Generator, batches: Optional[Callable[[], Any]] = None,
                extra: Optional[Dict[str, Any]] = None, on_batch: Callable[[], Any] = lambda: None) -> Dict[str, float]:
    """One epoch of ``robust.method`` over ``data`` (or over the ``batches()`` iterator of
    ``Batch`` objects, which is how the Ray Data stream feeds a Train worker). ``extra`` holds
    the models a method needs besides the latent source (``{"vae": ...}`` for vae_mixup)."""
    r = cfg.robust
    method = create_method(r.method)
    model, dev = state.model, next(state.model.parameters()).device
    # Attacks run on the bare module: under DDP, a forward through the wrapper whose backward
    # never reaches the parameters (gradients w.r.t. the input only) would desync its reducer.
    ctx = AugmentContext(getattr(model, "module", model), r, len(data.class_names), generator, latent, dict(extra or {}))
    if batches is None:
        perm = torch.randperm(len(data), generator=generator)

        def batches():
            for i in range(0, len(perm) - r.batch_size + 1, r.batch_size):  # drop_last: BN-safe
                idx = perm[i:i + r.batch_size]
                yield Batch(data.images[idx], data.labels[idx], idx)

    model.train()
    scaler = state.scaler if state.scaler is not None else grad_scaler(dev, "fp32")
    t0, n, total, infos = time.time(), 0, 0.0, {}
    for b in batches():
        on_batch()
        aug = method(ctx, b)
        state.opt.zero_grad(set_to_none=True)
        if isinstance(aug, TwoPass):
            loss = _two_pass(model, aug, dev, r.precision, scaler, r.two_pass_norm)
        else:
            loss, _ = _loss(model, aug.x.to(dev), aug.target.to(dev), r.precision, **aug.forward_kwargs)
            scaler.scale(loss).backward()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(
                f"classifier loss became {float(loss.detach())} in epoch {state.epoch + 1} "
                f"(robust.lr={r.lr}); lower robust.lr - the last finished epoch's checkpoint is kept")
        scaler.step(state.opt)  # fp16: skipped when the scaled gradients overflowed
        scaler.update()
        state.sched.step()
        n += b.x.shape[0]
        total += float(loss.detach()) * b.x.shape[0]
        for k, v in aug.info.items():
            infos[k] = infos.get(k, 0.0) + v * b.x.shape[0]
    state.epoch += 1
    secs = time.time() - t0
    out = {"epoch": state.epoch, "train_loss": total / max(1, n), "epoch_seconds": secs,
           "train_images_per_s": n / max(secs, 1e-9), **{k: v / max(1, n) for k, v in infos.items()}}
    return out


def shift_accuracies(cfg: Config, model: nn.Module, val: ImageDataset) -> Dict[str, float]:
    """``val_shift_<name>_acc`` (mean over ``eval.shift_severities``) and ``val_shift_mean_acc``
    (mean over the shifts) on the first ``eval.shift_examples`` validation images, shifted with
    the suite's fixed seed (``natra_ray.data.shifts``): the same images for every trial."""
    e = cfg.eval
    n = len(val) if e.shift_examples == 0 else min(len(val), e.shift_examples)
    x, y = val.images[:n], val.labels[:n]
    per: Dict[str, List[float]] = {}
    for name, _, xs in shift_suite(x, e.shifts, e.shift_severities, e.shift_seed):
        per.setdefault(name, []).append(accuracy(model, xs, y))
    out = {f"val_shift_{name}_acc": sum(a) / len(a) for name, a in per.items()}
    out["val_shift_mean_acc"] = sum(out.values()) / len(out)
    return out


def objective(m: Dict[str, float]) -> float:
    """``val_objective``, the default ``tune.metric``: clean and shifted validation accuracy,
    equally weighted, ``(val_acc + val_shift_mean_acc) / 2`` (README, "The objective")."""
    return (m["val_acc"] + m["val_shift_mean_acc"]) / 2.0


def val_metrics(cfg: Config, model: nn.Module, val: ImageDataset, val_latent: Optional[LatentSource]) -> Dict[str, float]:
    """Validation metrics (Tune optimises these; the test split is never used for selection):
    ``val_acc``, the shift suite (``shift_accuracies``), ``val_objective`` (``objective``) and,
    given ``val_latent``, ``val_natural_acc``. Pass the *evaluation* source
    (``workflow.trial.eval_source``: the fixed ``eval.natural_*`` attack), never the trial's
    training one, or a trial that narrows ``robust.*`` is scored against an easier attack."""
    m = {"val_acc": accuracy(model, val.images, val.labels), **shift_accuracies(cfg, model, val)}
    m["val_objective"] = objective(m)
    if val_latent is not None:  # codes of the first eval.max_examples only (workflow.upstream.coded_part)
        m["val_natural_acc"] = natural_accuracy(model, val_latent, val.labels[:len(val_latent.ws)],
                                                cfg.eval.natural_eps, cfg.eval.natural_steps, seed=cfg.seed)
    return m


@dataclass
class RobustArtifacts:
    classifier_path: Path
    history: List[Dict[str, float]]
    model: nn.Module


def train(cfg: Config, train: ImageDataset, val: ImageDataset, latent: Optional[LatentSource] = None,
          val_latent: Optional[LatentSource] = None, report: Reporter = null_reporter,
          device: torch.device | None = None, extra: Optional[Dict[str, Any]] = None) -> TrainState:
    """Train ``robust.method`` for ``robust.epochs`` in this process; ``report`` gets each epoch's
    training and validation metrics."""
    device = device or (latent.device if latent is not None else torch.device("cpu"))
    num_classes = len(train.class_names)
    steps = len(train) // cfg.robust.batch_size
    if steps == 0:
        raise ValueError(f"the training split has {len(train)} images, fewer than robust.batch_size")
    state = make_state(cfg, num_classes, steps, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress.bar(cfg.robust.epochs * steps, f"training {cfg.robust.method} ({cfg.robust.epochs} epochs)", unit="batch")
    while state.epoch < cfg.robust.epochs:
        m = train_epoch(cfg, state, train, latent, gen, extra=extra, on_batch=lambda: bar.update(1))
        t0 = time.time()
        m.update(val_metrics(cfg, state.model, val, val_latent))
        m["val_seconds"] = time.time() - t0  # with epoch_seconds: a trial's work, the rest overhead
        state.history.append(m)
        report(m)
        log.info("robust[%s] epoch %d: %s", cfg.robust.method, state.epoch,
                 " ".join(f"{k}={v:.4g}" for k, v in m.items() if k != "epoch"))
    bar.close()
    return state


def run(cfg: Config, train_set: ImageDataset, val: ImageDataset, out_dir: str | Path,
        latent: Optional[LatentSource] = None, val_latent: Optional[LatentSource] = None,
        report: Reporter = null_reporter, device: torch.device | None = None,
        extra: Optional[Dict[str, Any]] = None) -> RobustArtifacts:
    """``train``, then save the classifier checkpoint in ``out_dir``."""
    state = train(cfg, train_set, val, latent, val_latent, report, device, extra)
    path = save_classifier(Path(out_dir) / "classifier.pt", state.model, cfg, len(train_set.class_names),
                           extra={"history": state.history, "method": cfg.robust.method})
    return RobustArtifacts(path, state.history, state.model)


def save_classifier(path: Path, model: nn.Module, cfg: Config, num_classes: int,
                    extra: Dict[str, Any] | None = None) -> Path:
    """``classifier.pt`` (natra_ray checkpoint) plus ``classifier.torchscript.pt``: a TorchScript
    program that loads with plain ``torch.jit.load`` - no natra_ray code needed. Both take float
    images in [0, 1] of shape (B, C, H, W) at the dataset's resolution and return logits."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    example = torch.rand(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size,
                         device=next(model.parameters()).device)
    with torch.no_grad():
        scripted = torch.jit.trace(model, example, check_trace=False)
    scripted.save(str(Path(path).with_suffix(".torchscript.pt")))
    model.train(was)
    return save_checkpoint(path, model, kind="classifier", name=cfg.robust.classifier,
                           kwargs=classifier_kwargs(cfg, num_classes), config=cfg.to_dict(), extra=extra)
