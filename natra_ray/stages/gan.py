"""GAN pretraining: produces the "well-trained generator" NaTra assumes (METHOD.md Sec. 1).

Public GAN weights cannot be downloaded on our machines, so this stage trains one on the
target data (non-saturating loss + lazy R1, StyleGAN2; or WGAN-GP, lecture notes Sec. on
WGAN), keeps an EMA copy of the generator (the one every later stage uses) and writes
sample grids. ``gan.checkpoint`` skips training and loads an external generator instead.

Losses are tiny pure functions (rosinality's style); ``GanTrainer`` holds the models and
optimisers and does one D / G step at a time, so the Ray Train worker loop can drive it too.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from natra_ray.checkpoints import load_module, read_checkpoint, save_checkpoint
from natra_ray.config import Config
from natra_ray.data import ImageDataset
from natra_ray.models import Generator, create_discriminator, create_generator, create_model, from_unit, to_unit
from natra_ray.runtime import Reporter, null_reporter, resolve_device
from natra_ray.viz import save_grid

log = logging.getLogger(__name__)

EMA_RAMPUP = 0.05  # EMA horizon <= 5% of images seen so far (StyleGAN2-ADA): early EMA tracks G


# --------------------------------------------------------------------------- losses
def d_logistic_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake_pred).mean() + F.softplus(-real_pred).mean()


def g_nonsaturating_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_pred).mean()


def d_r1_penalty(real_pred: torch.Tensor, real_img: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 on real images (Mescheder et al. 2018); real_img needs grad."""
    (grad,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def d_wgan_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    return fake_pred.mean() - real_pred.mean()


def g_wgan_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    return -fake_pred.mean()


def wgan_gradient_penalty(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """(||grad D(x_hat)|| - 1)^2 at random interpolates (Gulrajani et al. 2017)."""
    a = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


@torch.no_grad()
def accumulate(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model; buffers (w_avg) are copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


# --------------------------------------------------------------------------- models
def generator_kwargs(cfg: Config) -> Dict[str, Any]:
    g = cfg.gan
    return dict(resolution=cfg.data.image_size, img_channels=cfg.data.channels, z_dim=g.z_dim,
                w_dim=g.w_dim, mapping_layers=g.mapping_layers, channels=g.channels,
                mapping_lr_mult=g.mapping_lr_mult, upsample=g.upsample)


def discriminator_kwargs(cfg: Config) -> Dict[str, Any]:
    return dict(resolution=cfg.data.image_size, img_channels=cfg.data.channels, channels=cfg.gan.d_channels)


def load_generator(path: str | Path, cfg: Config | None = None) -> Generator:
    """Load a generator checkpoint; with ``cfg`` also check it fits the data's image shape."""
    g, _ = load_module(path, kind="generator", factory=lambda name, **kw: create_model("generator", name, **kw))
    if cfg is not None and (g.resolution, g.img_channels) != (cfg.data.image_size, cfg.data.channels):
        raise ValueError(
            f"generator {path} makes {g.img_channels}x{g.resolution}x{g.resolution} images but the data "
            f"is {cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}; set data.image_size / "
            f"data.channels to match or use another checkpoint"
        )
    return g.eval().requires_grad_(False)


class GanTrainer:
    """Models + optimisers + one-step updates. Images fed in are in [0, 1]."""

    def __init__(self, cfg: Config, device: torch.device | None = None,
                 grad_sync: Optional[Callable[[nn.Module], None]] = None) -> None:
        self.cfg, g = cfg, cfg.gan
        # Called between backward and the optimiser step; the Ray Train worker passes an
        # all-reduce here to make the update data-parallel.
        self.grad_sync = grad_sync or (lambda module: None)
        self.device = device or resolve_device(cfg.device)
        self.g_name, self.g_kwargs = g.generator, generator_kwargs(cfg)
        self.G: Generator = create_generator(g.generator, **self.g_kwargs).to(self.device)
        self.D = create_discriminator(g.discriminator, **discriminator_kwargs(cfg)).to(self.device)
        self.G_ema: Generator = copy.deepcopy(self.G).eval().requires_grad_(False)
        # Lazy R1: the Adam betas/lr are rescaled so the penalty's less frequent steps
        # amount to the same optimisation (StyleGAN2 Appendix B).
        ratio = g.r1_every / (g.r1_every + 1) if g.loss == "ns_r1" else 1.0
        # (The mapping network's 100x slower learning lives in its EqualLinear lr_mult.)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=g.lr, betas=(g.beta1, g.beta2))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=g.lr * ratio,
                                      betas=(g.beta1 ** ratio, g.beta2 ** ratio))
        self.step = 0
        self.images_seen = 0

    def _fake(self, n: int) -> torch.Tensor:
        g = self.cfg.gan
        z = torch.randn(n, self.G.z_dim, device=self.device)
        ws = self.G.broadcast(self.G.mapping(z))
        if g.style_mixing > 0 and torch.rand(()) < g.style_mixing:
            # Style mixing regularisation: decorrelates layers, which makes per-layer edits
            # (NaTra's D(u_i, a-b)) meaningful.
            w2 = self.G.mapping(torch.randn(n, self.G.z_dim, device=self.device))
            cut = int(torch.randint(1, self.G.num_ws, ()))
            ws = torch.cat([ws[:, :cut], w2.unsqueeze(1).expand(-1, self.G.num_ws - cut, -1)], dim=1)
        return self.G.synthesis(ws)

    def d_step(self, real: torch.Tensor) -> Dict[str, float]:
        """One discriminator update on a real batch in [0, 1]."""
        g = self.cfg.gan
        real = from_unit(real.to(self.device))
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        with torch.no_grad():
            fake = self._fake(real.shape[0])
        out: Dict[str, float] = {}
        if g.loss == "ns_r1":
            loss = d_logistic_loss(self.D(real), self.D(fake))
            out["d_loss"] = float(loss.detach())
            if g.r1_gamma > 0 and self.step % g.r1_every == 0:
                real_r = real.detach().requires_grad_(True)
                r1 = d_r1_penalty(self.D(real_r), real_r)
                loss = loss + g.r1_gamma / 2 * r1 * g.r1_every
                out["r1"] = float(r1.detach())
        else:
            loss = d_wgan_loss(self.D(real), self.D(fake))
            out["d_loss"] = float(loss.detach())
            gp = wgan_gradient_penalty(self.D, real, fake)
            loss = loss + g.gp_lambda * gp
            out["gp"] = float(gp.detach())
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.grad_sync(self.D)
        self.opt_d.step()
        return out

    def g_step(self, batch_size: int) -> Dict[str, float]:
        """One generator update, then the EMA and w_avg updates."""
        g = self.cfg.gan
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        fake_pred = self.D(self._fake(batch_size))
        loss = g_nonsaturating_loss(fake_pred) if g.loss == "ns_r1" else g_wgan_loss(fake_pred)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.grad_sync(self.G)
        self.opt_g.step()
        with torch.no_grad():
            w = self.G.mapping(torch.randn(batch_size, self.G.z_dim, device=self.device))
            self.G.w_avg.lerp_(w.mean(0), 1 - 0.995)
        self.images_seen += batch_size
        half_life = min(g.ema_half_life_images, self.images_seen * EMA_RAMPUP)
        accumulate(self.G_ema, self.G, 0.5 ** (batch_size / max(half_life, 1e-8)))
        return {"g_loss": float(loss.detach())}

    def train_step(self, real: torch.Tensor) -> Dict[str, float]:
        out = {}
        for _ in range(self.cfg.gan.n_critic):
            out.update(self.d_step(real))
        out.update(self.g_step(real.shape[0]))
        self.step += 1
        return out

    # ---- resumable state (used by the Ray Train worker for fault tolerance)
    def state_dict(self) -> Dict[str, Any]:
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "step": self.step, "images_seen": self.images_seen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])

    def save_generator(self, path: Path, config: Dict[str, Any]) -> Path:
        return save_checkpoint(path, self.G_ema, kind="generator", name=self.g_name, kwargs=self.g_kwargs,
                               config=config, extra={"step": self.step, "images_seen": self.images_seen})

    @torch.no_grad()
    def samples(self, z: torch.Tensor) -> torch.Tensor:
        return to_unit(self.G_ema(z.to(self.device)))


@dataclass
class GanArtifacts:
    generator_path: Path
    sample_grids: List[Path] = field(default_factory=list)
    metrics: Dict[str, float] = field(default_factory=dict)


# out_dir -> (trained GanTrainer, metrics). The default trains in this process; the Ray layer
# passes one that runs the same GanTrainer data-parallel in a TorchTrainer.
Fit = Callable[[Path], "tuple[GanTrainer, Dict[str, float]]"]


def fixed_z(cfg: Config, z_dim: int) -> torch.Tensor:
    """The 64 latents every sample grid of a run shows (so grids are comparable over steps)."""
    return torch.randn(64, z_dim, generator=torch.Generator().manual_seed(cfg.seed))


def train_in_process(cfg: Config, data: ImageDataset, out_dir: Path, report: Reporter = null_reporter,
                     trainer: Optional[GanTrainer] = None) -> "tuple[GanTrainer, Dict[str, float]]":
    """The GAN loop: seeded epochs over ``data``, a grid every ``gan.sample_every`` steps."""
    g = cfg.gan
    tr = trainer or GanTrainer(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    z_fixed = fixed_z(cfg, tr.G.z_dim)
    n = len(data)
    if n < g.batch_size:
        raise ValueError(f"the dataset has {n} images, fewer than gan.batch_size={g.batch_size}")
    t0, last = time.time(), {}
    perm = torch.randperm(n, generator=gen)
    cursor = 0
    while tr.step < g.steps:
        if cursor + g.batch_size > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        real = data.images[perm[cursor:cursor + g.batch_size]]
        cursor += g.batch_size
        last = tr.train_step(real)
        check_finite(last, tr.step, out_dir)
        if tr.step % 50 == 0 or tr.step == g.steps:
            report({**last, "step": tr.step, "images_per_s": tr.images_seen / (time.time() - t0)})
        if g.sample_every and (tr.step % g.sample_every == 0 or tr.step == g.steps):
            save_grid(tr.samples(z_fixed), out_dir / "samples" / f"step_{tr.step:06d}.png", nrow=8)
            log.info("gan step %d/%d %s (%.0f s)", tr.step, g.steps,
                     " ".join(f"{k}={v:.3f}" for k, v in last.items()), time.time() - t0)
    return tr, {**{f"gan_{k}": v for k, v in last.items()}, "gan_seconds": time.time() - t0}


def check_finite(losses: Dict[str, float], step: int, out_dir: Path) -> None:
    if not all(math.isfinite(v) for v in losses.values()):
        raise FloatingPointError(
            f"GAN losses diverged at step {step}: {losses}; lower gan.lr or raise gan.r1_gamma "
            f"(samples so far are in {out_dir / 'samples'})")


def run(cfg: Config, data: ImageDataset, out_dir: str | Path, report: Reporter = null_reporter,
        trainer: Optional[GanTrainer] = None, fit: Optional[Fit] = None) -> GanArtifacts:
    """Pretrain (or load) the generator; writes ``generator.pt`` and sample grids to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = cfg.gan
    if g.checkpoint:
        gen = load_generator(g.checkpoint, cfg)
        path = save_checkpoint(out_dir / "generator.pt", gen, kind="generator",
                               name=read_checkpoint(g.checkpoint)["name"],
                               kwargs=read_checkpoint(g.checkpoint)["kwargs"], config=cfg.to_dict(),
                               extra={"source": str(g.checkpoint)})
        grid = save_grid(to_unit(gen(gen.sample_z(64, torch.Generator().manual_seed(0)))), out_dir / "samples" / "final.png", nrow=8)
        log.info("loaded external generator %s (no pretraining)", g.checkpoint)
        return GanArtifacts(path, [grid], {})

    if fit is not None:
        tr, metrics = fit(out_dir)
    else:
        tr, metrics = train_in_process(cfg, data, out_dir, report, trainer)
    tr.G_ema.to("cpu")
    save_grid(to_unit(tr.G_ema(fixed_z(cfg, tr.G.z_dim))), out_dir / "samples" / "final.png", nrow=8)
    path = tr.save_generator(out_dir / "generator.pt", cfg.to_dict())
    grids = sorted((out_dir / "samples").glob("step_*.png")) + [out_dir / "samples" / "final.png"]
    return GanArtifacts(path, grids, metrics)
