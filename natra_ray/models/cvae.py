"""Conditional VAE over perturbations (paper 001 Sec. 5, after Wong & Kolter 2020).

Three networks, each a plain module:

* recognition (encoder) ``P(x, x') -> (mu, logvar)`` of the latent z that encodes the
  perturbation taking x to x';
* prior ``p(z | x) -> (mu_p, logvar_p)``;
* generator (decoder) ``Q(x, z) -> x'`` (logits; ``decode`` applies the sigmoid).

The learned perturbation set of x is Wong & Kolter's
``S(x) = {Q(x, mu_p(x) + sigma_p(x) * u) : ||u||_2 <= eps}``: a ball in the prior's
standardised coordinates u (``perturb``). ``latent_dim`` goes down to 1 (paper 001 Sec. 5.1:
one number for a rotation angle).

Architectures live in ``CVAES`` (``create_cvae("fc", ...)``); checkpoints store the name and
kwargs (``natra_ray.checkpoints``, kind ``"cvae"``), so loading needs no flags repeated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natra_ray.registry import Registry

CVAES: Registry[nn.Module] = Registry("cvae architecture")

Gaussian = Tuple[Tensor, Tensor]  # (mu, logvar), each (B, k)


@dataclass
class CvaeOutput:
    """One forward pass on pairs (x, x'); every tensor has batch size B."""

    logits: Tensor  # (B, C, H, W) decoder logits of x' from z ~ q(z | x, x')
    mu: Tensor  # (B, k) recognition mean
    logvar: Tensor  # (B, k)
    mu_p: Tensor  # (B, k) prior mean p(z | x)
    logvar_p: Tensor  # (B, k)


class _GaussianHead(nn.Module):
    """features (B, F) -> (mu, logvar) (B, k); logvar starts at 0 (unit variance)."""

    def __init__(self, features: int, latent_dim: int) -> None:
        super().__init__()
        self.mu = nn.Linear(features, latent_dim)
        self.logvar = nn.Linear(features, latent_dim)
        nn.init.zeros_(self.logvar.weight)
        nn.init.zeros_(self.logvar.bias)

    def forward(self, h: Tensor) -> Gaussian:
        # clamped: exp(logvar) in the KL must not overflow on an early bad step
        return self.mu(h), self.logvar(h).clamp(-12.0, 8.0)


class CVAE(nn.Module):
    """P, p and Q behind one interface; subclasses provide the three feature networks."""

    latent_dim: int

    # --- to implement
    def prior_features(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, F)
        raise NotImplementedError

    def recognition_features(self, x: Tensor, x_prime: Tensor) -> Tensor:  # -> (B, F)
        raise NotImplementedError

    def decode_logits(self, x: Tensor, z: Tensor) -> Tensor:  # (B, C, H, W), (B, k) -> logits
        raise NotImplementedError

    # --- shared
    def prior(self, x: Tensor) -> Gaussian:
        return self.prior_head(self.prior_features(x))

    def posterior(self, x: Tensor, x_prime: Tensor) -> Gaussian:
        return self.recognition_head(self.recognition_features(x, x_prime))

    def decode(self, x: Tensor, z: Tensor) -> Tensor:
        """Q(x, z): the perturbed image in [0, 1]."""
        return torch.sigmoid(self.decode_logits(x, z))

    def forward(self, x: Tensor, x_prime: Tensor, sample: bool = True) -> CvaeOutput:
        """Encode (x, x'), draw z ~ q (the mean when ``sample`` is False), decode."""
        mu, logvar = self.posterior(x, x_prime)
        mu_p, logvar_p = self.prior(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return CvaeOutput(self.decode_logits(x, z), mu, logvar, mu_p, logvar_p)

    def prior_point(self, x: Tensor, u: Tensor) -> Tensor:
        """z = mu_p(x) + sigma_p(x) * u: standardised prior coordinates u (B, k) -> z (B, k)."""
        mu_p, logvar_p = self.prior(x)
        return mu_p + torch.exp(0.5 * logvar_p) * u

    def perturb(self, x: Tensor, u: Tensor) -> Tensor:
        """A member of the perturbation set S(x): Q(x, mu_p + sigma_p * u), in [0, 1]."""
        return self.decode(x, self.prior_point(x, u))


class FcCVAE(CVAE):
    """Paper 001's architecture (one hidden ReLU layer per network, on flattened images)."""

    def __init__(self, image_size: int = 32, channels: int = 1, latent_dim: int = 1, hidden: int = 512) -> None:
        super().__init__()
        self.shape = (channels, image_size, image_size)
        d = channels * image_size * image_size
        self.latent_dim = latent_dim
        self.prior_net = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU())
        self.recog_net = nn.Sequential(nn.Linear(2 * d, hidden), nn.ReLU())
        self.dec_net = nn.Sequential(nn.Linear(d + latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.prior_head = _GaussianHead(hidden, latent_dim)
        self.recognition_head = _GaussianHead(hidden, latent_dim)

    def prior_features(self, x: Tensor) -> Tensor:
        return self.prior_net(x)

    def recognition_features(self, x: Tensor, x_prime: Tensor) -> Tensor:
        return self.recog_net(torch.cat([x.flatten(1), x_prime.flatten(1)], 1))  # (B, 2D)

    def decode_logits(self, x: Tensor, z: Tensor) -> Tensor:
        return self.dec_net(torch.cat([x.flatten(1), z], 1)).view(-1, *self.shape)


def _down(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2))


def _up(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2))


class ConvCVAE(CVAE):
    """Strided-conv encoders to 4x4; the decoder encodes x to 4x4 features, adds z through a
    linear map and upsamples back (global, so it can move pixels as far as a rotation does)."""

    def __init__(self, image_size: int = 32, channels: int = 1, latent_dim: int = 1, hidden: int = 32) -> None:
        super().__init__()
        n = int(math.log2(image_size)) - 2  # downsamplings to 4x4
        if 2 ** (n + 2) != image_size or n < 1:
            raise ValueError(f"conv CVAE needs a power-of-two image size >= 8; got {image_size}")
        chs: List[int] = [min(hidden * 2 ** i, 8 * hidden) for i in range(n + 1)]
        self.latent_dim, self.top = latent_dim, chs[-1]

        def encoder(cin: int) -> nn.Module:
            return nn.Sequential(_down(cin, chs[1]), *[_down(chs[i], chs[i + 1]) for i in range(1, n)], nn.Flatten())

        feat = chs[-1] * 16
        self.prior_net, self.recog_net, self.dec_enc = encoder(channels), encoder(2 * channels), encoder(channels)
        self.z_in = nn.Linear(latent_dim, feat)
        self.dec_up = nn.Sequential(*[_up(chs[i + 1], chs[i]) for i in range(n - 1, 0, -1)],
                                    nn.ConvTranspose2d(chs[1], channels, 4, stride=2, padding=1))
        self.prior_head = _GaussianHead(feat, latent_dim)
        self.recognition_head = _GaussianHead(feat, latent_dim)

    def prior_features(self, x: Tensor) -> Tensor:
        return self.prior_net(x * 2 - 1)

    def recognition_features(self, x: Tensor, x_prime: Tensor) -> Tensor:
        return self.recog_net(torch.cat([x, x_prime], 1) * 2 - 1)

    def decode_logits(self, x: Tensor, z: Tensor) -> Tensor:
        h = F.leaky_relu(self.dec_enc(x * 2 - 1) + self.z_in(z), 0.2)  # (B, top * 16)
        return self.dec_up(h.view(-1, self.top, 4, 4))


@CVAES.register("fc")
def fc(image_size: int = 32, channels: int = 1, latent_dim: int = 1, hidden: int = 512) -> FcCVAE:
    return FcCVAE(image_size, channels, latent_dim, hidden)


@CVAES.register("conv")
def conv(image_size: int = 32, channels: int = 1, latent_dim: int = 1, hidden: int = 32) -> ConvCVAE:
    return ConvCVAE(image_size, channels, latent_dim, hidden)


def create_cvae(name: str, **kwargs: object) -> CVAE:
    return CVAES.create(name, **kwargs)  # type: ignore[return-value]


def list_cvaes() -> List[str]:
    return CVAES.names()
