"""VAE stage: train the small conv VAE behind ``vae_mixup`` on the training images.

Paper 002 Sec. 2.2 trains "a VAE the standard way on the dataset of interest using the
standard loss": the negative ELBO, Bernoulli reconstruction + KL (``elbo_terms``), Adam, batches
drawn with the config's seed. Ray-free; the pipeline caches the result per (data, vae) config.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch

from natra_ray.checkpoints import load_module, save_checkpoint
from natra_ray.config import Config
from natra_ray.data import ImageDataset
from natra_ray.models import create_model
from natra_ray.models.vae import ConvVAE, elbo_terms
from natra_ray.runtime import Reporter, null_reporter

log = logging.getLogger(__name__)

VAE_NAME = "conv_vae"


def vae_kwargs(cfg: Config) -> Dict[str, Any]:
    return dict(in_channels=cfg.data.channels, image_size=cfg.data.image_size, z_dim=cfg.vae.z_dim,
                channels=cfg.vae.channels)


def load_vae(path: str | Path) -> ConvVAE:
    """The trained VAE, frozen and in eval mode."""
    vae, _ = load_module(path, kind="vae", factory=lambda name, **kw: create_model("vae", name, **kw))
    return vae.eval().requires_grad_(False)  # type: ignore[return-value]


@torch.no_grad()
def recon_mse(vae: ConvVAE, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean squared error of decode(posterior mean) against the images."""
    dev = next(vae.parameters()).device
    err, n = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(dev)
        err += float(((vae.decode(vae.encode(x)[0]) - x) ** 2).mean(dim=(1, 2, 3)).sum())
        n += x.shape[0]
    return err / max(1, n)


@dataclass
class VaeArtifacts:
    vae_path: Path
    metrics: Dict[str, float] = field(default_factory=dict)


def run(cfg: Config, data: ImageDataset, out_dir: str | Path, report: Reporter = null_reporter,
        device: torch.device | None = None) -> VaeArtifacts:
    """Train for ``vae.steps`` Adam steps; writes ``vae.pt`` (a natra_ray checkpoint) to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    v = cfg.vae
    if len(data) < v.batch_size:
        raise ValueError(f"the dataset has {len(data)} images, fewer than vae.batch_size={v.batch_size}")
    device = device or torch.device("cpu")
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG left alone
        torch.manual_seed(cfg.seed)
        model = create_model("vae", VAE_NAME, **vae_kwargs(cfg)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=v.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, last = time.time(), {}
    for step in range(1, v.steps + 1):
        x = data.images[torch.randint(len(data), (v.batch_size,), generator=gen)].to(device)
        logits, mu, logvar = model(x, generator=gen)
        recon, kl = elbo_terms(x, logits, mu, logvar)
        loss = (recon + kl).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"VAE loss became {value} at step {step}; lower vae.lr (now {v.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = {"vae_neg_elbo": value, "vae_recon": float(recon.detach().mean()), "vae_kl": float(kl.detach().mean())}
        if step % 100 == 0 or step == v.steps:
            report({**last, "step": step})
            log.info("vae step %d/%d %s", step, v.steps, " ".join(f"{k}={x:.2f}" for k, x in last.items()))
    model.eval()
    metrics = {**last, "vae_recon_mse": recon_mse(model, data.images[:512]), "vae_seconds": time.time() - t0}
    path = save_checkpoint(out_dir / "vae.pt", model, kind="vae", name=VAE_NAME, kwargs=vae_kwargs(cfg),
                           config=cfg.to_dict(), extra={"metrics": metrics})
    return VaeArtifacts(path, metrics)
