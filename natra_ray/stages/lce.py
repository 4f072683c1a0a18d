"""LCE: Latent Codes Expansion (NaTra Sec. 3.3, after mGANprior, Gu et al. 2020).

Each image is inverted into N W+ codes; each runs through the generator head up to layer l,
the feature maps are weighted channel-wise by one importance vector alpha_n (C_l values) per
code and summed, and the rest of the generator renders the sum (``models.latent.lce_decode``).

Initialisation (our choice; the paper does not state one): code 0 is the BIES encoder's
inversion, codes 1..N-1 are that inversion plus small Gaussian noise (``LCE_INIT_NOISE`` times
the spread of G's w distribution) and alpha = (1, 0, ..., 0). So at step 0 the composition is
*exactly* the plain inversion, and it is not a degenerate saddle: dL/dalpha_n (n > 0) is the
channel-wise correlation of the loss gradient with code n's features, non-zero in general, so
the extra alphas move at the first step and then pass gradient to their codes; the noise makes
the extra codes differ so they do not move in lockstep. Codes and alphas are then optimised
per image with Adam on the Eq. 9 image loss; the best iterate per image is kept, so LCE never
ends worse than plain inversion under that objective.

N = 1 is NaTra-OL: the encoder's codes with alpha = 1 and no optimisation at all.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from natra_ray import progress
from natra_ray.checkpoints import load_tensors, save_tensors
from natra_ray.config import Config, EncoderConfig
from natra_ray.losses import image_loss, unit
from natra_ray.models import Generator, to_unit
from natra_ray.models.latent import lce_decode

log = logging.getLogger(__name__)

LCE_INIT_NOISE = 0.1  # std of the extra codes' init noise, in units of G's w spread
W_SPREAD_SAMPLES = 512  # z samples used to measure that spread
ENCODE_BATCH = 256  # images per inversion batch; batch i's init noise is seeded with i


@torch.no_grad()
def w_spread(G: Generator, n: int = W_SPREAD_SAMPLES, seed: int = 0) -> float:
    """Std of G's w around w_avg over ``n`` seeded samples (a scale for init noise)."""
    w = G.mapping(G.sample_z(n, torch.Generator().manual_seed(seed)))  # (n, w_dim)
    return float((w - G.w_avg).std())


def _check_layer(G: Generator, codes: int, layer: int) -> None:
    if codes < 1:
        raise ValueError(f"LCE needs at least one code (encoder.lce_codes >= 1); got {codes}")
    lo = 0 if codes == 1 else 1
    if not lo <= layer <= G.num_layers:
        raise ValueError(
            f"LCE composition layer {layer} is invalid for this generator with {codes} codes: use "
            f"{lo}..{G.num_layers} (encoder.lce_layer; layer 0 is the constant input, where all "
            f"codes' features coincide)")


def invert(G: Generator, E: nn.Module, x: torch.Tensor, codes: int, layer: int, steps: int, lr: float,
           perceptual: Optional[nn.Module], gamma1: float, gamma2: float, *,
           noise_scale: Optional[float] = None, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, H, W) in [0, 1] -> (ws (B, N, num_ws, w_dim), alpha (B, N, C_l)).

    ``noise_scale`` = std of the extra codes' init noise (default LCE_INIT_NOISE * w_spread(G)).
    ``perceptual=None`` drops the LPIPS term. The encoder runs without grad; only the codes and
    alphas of this batch are optimised (G and E stay frozen).
    """
    _check_layer(G, codes, layer)
    b = x.shape[0]
    c_l = G.layer_shape(layer)[0]
    with torch.no_grad():
        w0 = E(x)  # (B, num_ws, w_dim)
    if codes == 1:  # NaTra-OL: plain inversion, exactly (lce_decode(N=1, alpha=1) == G(w0))
        return w0[:, None].clone(), torch.ones(b, 1, c_l, device=w0.device, dtype=w0.dtype)

    if noise_scale is None:
        noise_scale = LCE_INIT_NOISE * w_spread(G)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(b, codes - 1, *w0.shape[1:], generator=gen).to(w0) * noise_scale
    ws = torch.cat([w0[:, None], w0[:, None] + noise], 1).requires_grad_(True)  # (B, N, num_ws, w_dim)
    alpha = torch.zeros(b, codes, c_l, device=w0.device, dtype=w0.dtype)  # (B, N, C_l)
    alpha[:, 0] = 1.0
    alpha.requires_grad_(True)
    opt = torch.optim.Adam([ws, alpha], lr=lr)

    best_loss = torch.full((b,), float("inf"), device=w0.device)
    best_ws, best_alpha = ws.detach().clone(), alpha.detach().clone()
    for t in range(steps + 1):
        last = t == steps  # the last pass only scores the final iterate
        with torch.set_grad_enabled(not last):
            total, _ = image_loss(x, unit(lce_decode(G, ws, alpha, layer)), perceptual, gamma1, gamma2)  # (B,)
        with torch.no_grad():
            better = total.detach() < best_loss  # (B,)
            best_loss = torch.where(better, total.detach(), best_loss)
            best_ws[better] = ws.detach()[better]
            best_alpha[better] = alpha.detach()[better]
        if last:
            break
        if not torch.isfinite(total).all():
            raise FloatingPointError(f"LCE loss became non-finite at step {t}; lower encoder.lce_lr")
        opt.zero_grad(set_to_none=True)
        # Sum, not mean: each image's codes get the gradient of its own loss, whatever B is.
        total.sum().backward()
        opt.step()
    return best_ws, best_alpha


@dataclass
class LatentCodes:
    """LCE codes of a whole dataset, on CPU: ws (M, N, num_ws, w_dim), alpha (M, N, C_l)."""

    ws: torch.Tensor
    alpha: torch.Tensor
    layer: int
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ws.shape[0])

    @property
    def codes(self) -> int:
        return int(self.ws.shape[1])

    def subset(self, idx: Any) -> "LatentCodes":
        return LatentCodes(self.ws[idx], self.alpha[idx], self.layer, dict(self.meta))

    @classmethod
    def concat(cls, parts: "list[LatentCodes]", seconds: float) -> "LatentCodes":
        """The codes of consecutive shards as one split's; the meta of the first shard (its
        settings, and the reconstruction metrics of the split's first images), the speed of
        the whole encoding (``seconds`` of wall time)."""
        n = sum(len(p) for p in parts)
        meta = {**parts[0].meta, "seconds": seconds, "images_per_s": n / max(seconds, 1e-9), "shards": len(parts)}
        return cls(torch.cat([p.ws for p in parts]), torch.cat([p.alpha for p in parts]), parts[0].layer, meta)

    def decode(self, G: Generator, idx: Any = slice(None)) -> torch.Tensor:
        """Images in [0, 1] of the examples at ``idx`` (on G's device)."""
        dev = G.w_avg.device
        return to_unit(lce_decode(G, self.ws[idx].to(dev), self.alpha[idx].to(dev), self.layer))

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, "latent_codes", {"ws": self.ws, "alpha": self.alpha,
                                                   "layer": int(self.layer), "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False) -> "LatentCodes":
        """``mmap``: rows are read from the file when indexed (a Train worker reads its shard's
        rows only, and the workers of one node share one copy in the page cache)."""
        d = load_tensors(path, "latent_codes", mmap=mmap)
        return cls(d["ws"], d["alpha"], int(d["layer"]), d.get("meta", {}))


def shard_ranges(n: int, shards: int, align: int = ENCODE_BATCH) -> list:
    """``[(start, stop), ...]``: ``n`` images in at most ``shards`` consecutive pieces whose starts
    are multiples of ``align`` (a multiple of ``ENCODE_BATCH``, so every shard inverts the same
    batches, with the same seeds, as one pass over all images does)."""
    size = -(-max(1, -(-n // max(1, shards))) // align) * align
    return [(a, min(a + size, n)) for a in range(0, n, size)] or [(0, 0)]


def encode_dataset(G: Generator, E: nn.Module, images: torch.Tensor, cfg: Config | EncoderConfig,
                   batch_size: int = ENCODE_BATCH, perceptual: Optional[nn.Module] = None,
                   desc: str = "encoding", first_batch: int = 0) -> LatentCodes:
    """Invert every image (M, C, H, W) in [0, 1] with ``encoder.lce_*`` settings, in batches.

    ``cfg``: a Config or its EncoderConfig. Runs on G's device; results land on CPU.
    ``first_batch``: the index of the first batch within the whole split, when ``images`` is a
    shard of it (batch i's init noise is seeded with i: a shard's codes are the split's).
    """
    e = cfg.encoder if isinstance(cfg, Config) else cfg
    G.eval().requires_grad_(False)
    E.eval().requires_grad_(False)
    _check_layer(G, e.lce_codes, e.lce_layer)
    dev = G.w_avg.device
    if e.lce_codes > 1 and perceptual is None and e.gamma2 > 0:
        log.info("LCE without a perceptual module: optimising the pixel term only")
    scale = LCE_INIT_NOISE * w_spread(G) if e.lce_codes > 1 else 0.0
    t0 = time.time()
    ws_all, alpha_all = [], []
    pbar = progress.bar(len(images), desc, unit="img")
    for i, start in enumerate(range(0, len(images), batch_size)):
        x = images[start:start + batch_size].to(dev)
        ws, alpha = invert(G, E, x, e.lce_codes, e.lce_layer, e.lce_steps, e.lce_lr, perceptual,
                           e.gamma1, e.gamma2, noise_scale=scale, seed=first_batch + i)
        ws_all.append(ws.cpu())
        alpha_all.append(alpha.cpu())
        pbar.update(len(x))
        if e.lce_codes > 1:
            log.info("LCE %d/%d images (%.1f images/s)", start + len(x), len(images),
                     (start + len(x)) / (time.time() - t0))
    pbar.close()
    seconds = time.time() - t0
    meta = {"codes": e.lce_codes, "layer": e.lce_layer, "steps": e.lce_steps if e.lce_codes > 1 else 0,
            "lr": e.lce_lr, "gamma1": e.gamma1, "gamma2": e.gamma2 if perceptual is not None else 0.0,
            "lpips_pretrained": bool(getattr(perceptual, "pretrained", False)),
            "seconds": seconds, "images_per_s": len(images) / max(seconds, 1e-9)}
    return LatentCodes(torch.cat(ws_all), torch.cat(alpha_all), e.lce_layer, meta)


@torch.no_grad()
def recon_metrics(G: Generator, codes: LatentCodes, images: torch.Tensor,
                  perceptual: Optional[nn.Module] = None, batch_size: int = 256) -> Dict[str, float]:
    """Mean pixel MSE (and LPIPS with ``perceptual``) of the LCE reconstructions vs ``images``."""
    if len(codes) != len(images):
        raise ValueError(f"{len(codes)} latent codes for {len(images)} images")
    dev = G.w_avg.device
    sums: Dict[str, float] = {}
    for start in range(0, len(images), batch_size):
        idx = slice(start, start + batch_size)
        x = images[idx].to(dev)
        _, parts = image_loss(x, codes.decode(G, idx), perceptual, 1.0, 1.0)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    return {k: v / len(images) for k, v in sums.items()}
