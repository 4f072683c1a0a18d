"""The model registries. Model modules register into these; ``natra_ray.models`` re-exports
``create_*`` / ``list_*`` after importing every model module (so registration has happened)."""
from __future__ import annotations

from torch import nn

from natra_ray.registry import Registry

GENERATORS: Registry[nn.Module] = Registry("generator")
DISCRIMINATORS: Registry[nn.Module] = Registry("discriminator")
ENCODERS: Registry[nn.Module] = Registry("encoder")
CLASSIFIERS: Registry[nn.Module] = Registry("classifier")
VAES: Registry[nn.Module] = Registry("vae")
