"""A small convolutional VAE (Kingma & Welling 2014) for ``vae_mixup`` (paper 002 Sec. 2.2).

Encoder: stride-2 3x3 convs from R x R down to 4 x 4 (width ``channels``, doubling per step,
at most 8x), then linear heads for the posterior mean and log-variance of a ``z_dim``-dim
Gaussian. Decoder: the mirror image with transposed convs. Images are float (B, C, R, R) in
[0, 1]; the decoder's pixels are Bernoulli means (``decode`` returns the sigmoid,
``decode_logits`` the logits the ELBO uses). No BatchNorm, so train and eval mode agree and
encoding one image never depends on the rest of its batch.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natra_ray.models.registries import VAES


class ConvVAE(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 32, z_dim: int = 16, channels: int = 32) -> None:
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"ConvVAE needs a power-of-two image_size >= 8; got {image_size}")
        n_down = int(math.log2(image_size)) - 2  # R -> 4
        widths = [channels * min(2 ** i, 8) for i in range(n_down)]
        enc, c = [], in_channels
        for w in widths:
            enc += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = w
        self.encoder = nn.Sequential(*enc, nn.Flatten())  # (B, c * 16)
        self.flat = c * 16
        self.mu = nn.Linear(self.flat, z_dim)
        self.logvar = nn.Linear(self.flat, z_dim)
        self.fc = nn.Linear(z_dim, self.flat)
        dec = []
        for w in reversed([in_channels] + widths[:-1]):
            dec += [nn.LeakyReLU(0.2), nn.ConvTranspose2d(c, w, 4, stride=2, padding=1)]
            c = w
        self.decoder = nn.Sequential(*dec)  # (B, C, R, R) logits
        self.top_channels, self.z_dim = widths[-1], z_dim

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, C, R, R) in [0, 1] -> posterior mean and log-variance, each (B, z_dim)."""
        h = self.encoder(x * 2.0 - 1.0)
        return self.mu(h), self.logvar(h).clamp(-12.0, 8.0)

    def decode_logits(self, z: Tensor) -> Tensor:
        """z (B, z_dim) -> Bernoulli logits (B, C, R, R)."""
        return self.decoder(self.fc(z).view(-1, self.top_channels, 4, 4))

    def decode(self, z: Tensor) -> Tensor:
        """z (B, z_dim) -> image (B, C, R, R) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Reparameterised pass: (decoder logits, mu, logvar) with z = mu + sigma * eps."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=generator.device if generator else mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps.to(mu)
        return self.decode_logits(z), mu, logvar


def elbo_terms(x: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-image negative ELBO terms (B,), (B,): Bernoulli reconstruction -log p(x|z) summed over
    pixels (continuous targets in [0, 1], as usual for MNIST-like data) and the closed-form
    KL(N(mu, sigma^2) || N(0, I)) (Kingma & Welling 2014, Appendix B)."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return recon, kl


@VAES.register("conv_vae")
def conv_vae(in_channels: int = 1, image_size: int = 32, z_dim: int = 16, channels: int = 32) -> ConvVAE:
    """The VAE sizes come from the ``vae`` config section and the data's shape."""
    return ConvVAE(in_channels, image_size, z_dim, channels)
