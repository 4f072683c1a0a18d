"""BIES: Batch Inverse Encoding and Shifting (NaTra Sec. 3.2, METHOD.md Sec. 2).

1. ``train_encoder``: the generator is frozen; every iteration updates the encoder twice,
   (a) latent reconstruction on generated images, ``|| w - E(G(w)) ||^2`` (Eq. 8), and
   (b) image reconstruction on real images, ``gamma1 * MSE + gamma2 * LPIPS`` of
   ``x`` vs ``G(E(x))`` (Eq. 9).
2. ``shift_generator``: the encoder is frozen; a copy of G is fine-tuned on the target images
   with the same image loss (Eq. 10), pulling the generator's manifold toward the data.

The paper inverts into Z; our encoder predicts W+ (one w per style input), the space every
later stage edits (GANSpace / NaTra Sec. 3.3-3.4 work on W / W+), so Eq. 8 is applied in W+.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from natra_ray import progress
from natra_ray.checkpoints import load_module, read_checkpoint, save_checkpoint
from natra_ray.config import Config
from natra_ray.data import ImageDataset
from natra_ray.losses import Perceptual, finite_or_raise, image_loss, latent_loss, unit
from natra_ray.models import Generator, create_model, to_unit
from natra_ray.runtime import Reporter, null_reporter, resolve_device
from natra_ray.stages.gan import load_generator
from natra_ray.viz import save_rows

log = logging.getLogger(__name__)

REPORT_EVERY = 25  # steps between report() calls (every step goes to ``history`` if given)
HELDOUT_SIZE = 64  # fixed held-out batch for the before/after-shift metrics and the grid
GRID_IMAGES = 8  # columns of the reconstruction grid

GradSync = Callable[[nn.Module], None]  # called between backward and step (data-parallel workers)
Shard = Tuple[int, int]  # (rank, world): this worker's slice of every batch


def _no_sync(module: nn.Module) -> None:
    return None


# --------------------------------------------------------------------------- models
def encoder_kwargs(cfg: Config, G: Generator) -> Dict[str, Any]:
    """Encoder sizes: image shape and W+ shape come from the generator it inverts."""
    return dict(resolution=G.resolution, img_channels=G.img_channels, num_ws=G.num_ws,
                w_dim=G.w_dim, channels=cfg.encoder.channels)


def build_encoder(cfg: Config, G: Generator) -> nn.Module:
    """A fresh encoder (initialised from ``cfg.seed``, the caller's RNG untouched) whose
    output starts at G's average w (its ``w_avg`` buffer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        E = create_model("encoder", cfg.encoder.encoder, **encoder_kwargs(cfg, G))
    with torch.no_grad():
        E.w_avg.copy_(G.w_avg.detach().cpu())
    return E


def load_encoder(path: str | Path, G: Optional[Generator] = None) -> nn.Module:
    """Load an encoder checkpoint (frozen, eval); with ``G`` check it inverts into G's W+."""
    E, _ = load_module(path, kind="encoder", factory=lambda name, **kw: create_model("encoder", name, **kw))
    if G is not None and (E.num_ws, E.w_dim) != (G.num_ws, G.w_dim):
        raise ValueError(f"encoder {path} predicts W+ of shape ({E.num_ws}, {E.w_dim}) but the generator "
                         f"takes ({G.num_ws}, {G.w_dim}); use the encoder trained for this generator")
    return E.eval().requires_grad_(False)


def _device_of(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _check_data(G: Generator, data: ImageDataset) -> None:
    shape = tuple(data.images.shape[1:])
    want = (G.img_channels, G.resolution, G.resolution)
    if shape != want:
        raise ValueError(f"the data images are {shape} but the generator makes {want}; set "
                         f"data.image_size / data.channels to match the generator")


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless seeded epochs of shuffled index batches (the last partial batch is dropped)."""
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):
            yield perm[i:i + bs]


def mixed_ws(G: Generator, n: int, mixing_prob: float, gen: torch.Generator) -> torch.Tensor:
    """Sampled W+ codes (n, num_ws, w_dim); with probability ``mixing_prob`` per example the
    styles switch to a second w at a random cut (StyleGAN style mixing). Real images inverted
    into W+ are not confined to W (all rows equal), so Eq. 8 on mixed codes teaches the encoder
    to predict per-layer styles; mixed codes are in-distribution for a G trained with mixing."""
    dev = G.w_avg.device
    ws = G.broadcast(G.mapping(G.sample_z(n, gen)))  # (n, num_ws, w_dim)
    if mixing_prob <= 0 or G.num_ws < 2:
        return ws
    w2 = G.mapping(G.sample_z(n, gen))  # (n, w_dim)
    cut = torch.randint(1, G.num_ws, (n,), generator=gen).to(dev)  # (n,)
    mix = torch.rand(n, generator=gen).to(dev) < mixing_prob  # (n,)
    later = torch.arange(G.num_ws, device=dev)[None, :] >= cut[:, None]  # (n, num_ws)
    use2 = (later & mix[:, None])[..., None]  # (n, num_ws, 1)
    return torch.where(use2, w2[:, None, :].expand_as(ws), ws)


# --------------------------------------------------------------------------- stage parts
def train_encoder(cfg: Config, G: Generator, data: ImageDataset, report: Reporter = null_reporter,
                  *, perceptual: Optional[nn.Module] = None,
                  history: Optional[List[Dict[str, float]]] = None,
                  grad_sync: GradSync = _no_sync, shard: Shard = (0, 1)) -> nn.Module:
    """Train an encoder into G's W+ with G frozen (G is set to eval / no-grad in place).

    ``perceptual`` defaults to ``Perceptual.from_config(cfg.encoder)`` when gamma2 > 0.
    ``history`` (optional) receives one dict of losses per step.
    Data-parallel use (the Ray Train worker): every worker draws the same seeded batch and
    keeps its ``shard`` of it; ``grad_sync`` averages the gradients before each step.
    """
    rank, world = shard
    e = cfg.encoder
    _check_data(G, data)
    G.eval().requires_grad_(False)
    dev = _device_of(G)
    if perceptual is None and e.gamma2 > 0:
        perceptual = Perceptual.from_config(e).to(dev)
    E = build_encoder(cfg, G).to(dev).train()
    opt = torch.optim.Adam(E.parameters(), lr=e.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(len(data), e.batch_size, gen)
    hint = "lower encoder.lr or check the generator checkpoint (do its samples look right?)"
    t0, window = time.time(), []
    pbar = progress.bar(e.steps, "BIES encoder", unit="step", enabled=rank == 0)
    for step in range(1, e.steps + 1):
        # (a) Eq. 8 on generated images: the generator is the teacher, its codes the labels.
        with torch.no_grad():
            w_true = mixed_ws(G, e.batch_size, cfg.gan.style_mixing, gen)[rank::world]  # (B, num_ws, w_dim)
            x_gen = to_unit(G.synthesis(w_true))  # (B, C, H, W) in [0, 1] like the data
        l_lat = e.latent_weight * latent_loss(w_true, E(x_gen))
        opt.zero_grad(set_to_none=True)
        l_lat.backward()
        grad_sync(E)
        opt.step()
        # (b) Eq. 9 on real images: gradients pass through the frozen G into E.
        x = data.images[next(batches)[rank::world]].to(dev)
        total, parts = image_loss(x, unit(G.synthesis(E(x))), perceptual, e.gamma1, e.gamma2)
        l_img = total.mean()
        opt.zero_grad(set_to_none=True)
        l_img.backward()
        grad_sync(E)
        opt.step()

        rec = {"latent_loss": finite_or_raise(l_lat.item(), f"BIES Eq. 8 loss at step {step}", hint),
               "image_loss": finite_or_raise(l_img.item(), f"BIES Eq. 9 loss at step {step}", hint),
               **{k: float(v.mean()) for k, v in parts.items()}}
        if history is not None:
            history.append({"step": step, **rec})
        window.append(rec)
        pbar.update(1)
        if step % REPORT_EVERY == 0 or step == e.steps:
            avg = {f"bies_{k}": sum(r[k] for r in window) / len(window) for k in rec}
            report({**avg, "bies_step": step, "bies_images_per_s": 2 * step * len(x) / (time.time() - t0)})
            log.info("bies step %d/%d %s", step, e.steps, " ".join(f"{k}={v:.4f}" for k, v in avg.items()))
            window = []
    pbar.close()
    return E.eval().requires_grad_(False)


def shift_generator(cfg: Config, G: Generator, E: nn.Module, data: ImageDataset,
                    report: Reporter = null_reporter, *, perceptual: Optional[nn.Module] = None,
                    history: Optional[List[Dict[str, float]]] = None,
                    grad_sync: GradSync = _no_sync, shard: Shard = (0, 1)) -> Generator:
    """Eq. 10: fine-tune a copy of G on ``data`` with the encoder frozen; G is left untouched.

    Each image's code E(x) is fixed (no grad); only the generator's weights move, which drags
    the nearest point of its manifold toward the target image.
    """
    e = cfg.encoder
    rank, world = shard
    _check_data(G, data)
    dev = _device_of(G)
    if perceptual is None and e.gamma2 > 0:
        perceptual = Perceptual.from_config(e).to(dev)
    E.eval().requires_grad_(False)
    Gs: Generator = copy.deepcopy(G).train().requires_grad_(True)
    # The mapping network never runs here (codes come from E), so it gets no gradient and
    # Adam leaves it (and w_avg, a buffer) unchanged.
    opt = torch.optim.Adam([p for p in Gs.parameters() if p.requires_grad], lr=e.shift_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batches = _batches(len(data), e.batch_size, gen)
    hint = "lower encoder.shift_lr"
    window: List[Dict[str, float]] = []
    pbar = progress.bar(e.shift_steps, "BIES shift", unit="step", enabled=rank == 0)
    for step in range(1, e.shift_steps + 1):
        x = data.images[next(batches)[rank::world]].to(dev)
        with torch.no_grad():
            w = E(x)  # (B, num_ws, w_dim), fixed per image
        total, parts = image_loss(x, unit(Gs.synthesis(w)), perceptual, e.gamma1, e.gamma2)
        loss = total.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_sync(Gs)
        opt.step()
        rec = {"image_loss": finite_or_raise(loss.item(), f"shift (Eq. 10) loss at step {step}", hint),
               **{k: float(v.mean()) for k, v in parts.items()}}
        if history is not None:
            history.append({"step": step, **rec})
        window.append(rec)
        pbar.update(1)
        if step % REPORT_EVERY == 0 or step == e.shift_steps:
            avg = {f"shift_{k}": sum(r[k] for r in window) / len(window) for k in rec}
            report({**avg, "shift_step": step})
            log.info("shift step %d/%d %s", step, e.shift_steps, " ".join(f"{k}={v:.4f}" for k, v in avg.items()))
            window = []
    pbar.close()
    return Gs.eval().requires_grad_(False)


@torch.no_grad()
def reconstruct(G: Generator, E: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) in [0, 1] -> G(E(x)) in [0, 1] (plain single-code inversion)."""
    return to_unit(G.synthesis(E(x)))


@torch.no_grad()
def recon_error(G: Generator, E: nn.Module, x: torch.Tensor,
                perceptual: Optional[nn.Module]) -> Dict[str, float]:
    """Mean pixel MSE (and LPIPS when given) of G(E(x)) vs x."""
    _, parts = image_loss(x, reconstruct(G, E, x), perceptual, 1.0, 1.0)
    return {k: float(v.mean()) for k, v in parts.items()}


def split_heldout(data: ImageDataset, seed: int) -> Tuple[ImageDataset, ImageDataset]:
    """(train part, fixed held-out batch): at most HELDOUT_SIZE images and a fifth of the data,
    chosen by a seeded permutation, never trained on (the before/after metrics use them)."""
    n = len(data)
    k = max(1, min(HELDOUT_SIZE, n // 5))
    if n - k < 1:
        raise ValueError(f"BIES needs at least 2 images (got {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    return data.subset(perm[k:]), data.subset(perm[:k])


# --------------------------------------------------------------------------- the stage
@dataclass
class BiesArtifacts:
    encoder_path: Path
    shifted_generator_path: Path
    recon_grid_path: Path
    metrics: Dict[str, float] = field(default_factory=dict)


# (G, training part of the data) -> (encoder, shifted generator, {"bies_encoder_seconds": ..,
# "bies_shift_seconds": ..}). The default fits in this process; the Ray layer passes one that
# runs the same two functions data-parallel in a TorchTrainer.
Fit = Callable[[Generator, ImageDataset], Tuple[nn.Module, Generator, Dict[str, float]]]


def fit_in_process(cfg: Config, report: Reporter = null_reporter, perceptual: Optional[nn.Module] = None) -> Fit:
    def fit(G: Generator, train: ImageDataset) -> Tuple[nn.Module, Generator, Dict[str, float]]:
        t0 = time.time()
        E = train_encoder(cfg, G, train, report, perceptual=perceptual)
        t1 = time.time()
        Gs = shift_generator(cfg, G, E, train, report, perceptual=perceptual)
        return E, Gs, {"bies_encoder_seconds": t1 - t0, "bies_shift_seconds": time.time() - t1}
    return fit


def run(cfg: Config, generator_path: str | Path, data: ImageDataset, out_dir: str | Path,
        report: Reporter = null_reporter, fit: Optional[Fit] = None) -> BiesArtifacts:
    """Train the encoder, shift the generator; write ``encoder.pt``, ``generator_shifted.pt``
    and ``recon.png`` (rows: originals / before shift / after shift) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(cfg.device)
    G = load_generator(generator_path, cfg).to(dev)
    g_ckpt = read_checkpoint(generator_path)
    perceptual = Perceptual.from_config(cfg.encoder).to(dev)
    train, held = split_heldout(data, cfg.seed)
    x_h = held.images.to(dev)

    E, Gs, times = (fit or fit_in_process(cfg, report, perceptual))(G, train)
    E, Gs = E.to(dev).eval().requires_grad_(False), Gs.to(dev).eval().requires_grad_(False)
    before = recon_error(G, E, x_h, perceptual)
    rec_before = reconstruct(G, E, x_h[:GRID_IMAGES])
    after = recon_error(Gs, E, x_h, perceptual)
    rec_after = reconstruct(Gs, E, x_h[:GRID_IMAGES])

    extra = {"generator": str(generator_path), "lpips_pretrained": perceptual.pretrained,
             "lpips_net": cfg.encoder.lpips_net}
    enc_path = save_checkpoint(out_dir / "encoder.pt", E, kind="encoder", name=cfg.encoder.encoder,
                               kwargs=encoder_kwargs(cfg, G), config=cfg.to_dict(), extra=extra)
    gen_path = save_checkpoint(out_dir / "generator_shifted.pt", Gs, kind="generator", name=g_ckpt["name"],
                               kwargs=g_ckpt["kwargs"], config=cfg.to_dict(),
                               extra={**extra, "shifted_from": str(generator_path),
                                      "shift_steps": cfg.encoder.shift_steps})
    grid = save_rows([x_h[:GRID_IMAGES].cpu(), rec_before.cpu(), rec_after.cpu()], out_dir / "recon.png")
    metrics = {**{f"bies_recon_{k}_before_shift": v for k, v in before.items()},
               **{f"bies_recon_{k}_after_shift": v for k, v in after.items()},
               "lpips_pretrained": float(perceptual.pretrained),
               **times,
               "bies_heldout_images": float(len(held))}
    report(metrics)
    log.info("BIES done: held-out MSE %.4f -> %.4f after shifting (LPIPS pretrained: %s)",
             before["mse"], after["mse"], perceptual.pretrained)
    return BiesArtifacts(enc_path, gen_path, grid, metrics)
