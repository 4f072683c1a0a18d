"""Models behind registries: ``create_generator("style", ...)``, ``list_classifiers()``, ...

Importing this package imports every model module, which registers its factories.
"""
from __future__ import annotations

from typing import Any, List

from torch import nn

from natra_ray.models import classifiers, discriminator, encoder, generator, vae  # noqa: F401  (registration)
from natra_ray.models.generator import Generator, from_unit, to_unit
from natra_ray.models.registries import CLASSIFIERS, DISCRIMINATORS, ENCODERS, GENERATORS, VAES

REGISTRIES = {"generator": GENERATORS, "discriminator": DISCRIMINATORS,
              "encoder": ENCODERS, "classifier": CLASSIFIERS, "vae": VAES}


def create_model(kind: str, name: str, **kwargs: Any) -> nn.Module:
    """Build any registered model; ``kind`` is a key of ``REGISTRIES`` (used by checkpoints)."""
    if kind not in REGISTRIES:
        raise ValueError(f"unknown model kind {kind!r}; known kinds are: {', '.join(REGISTRIES)}")
    return REGISTRIES[kind].create(name, **kwargs)


def create_generator(name: str, **kwargs: Any) -> Generator:
    return GENERATORS.create(name, **kwargs)  # type: ignore[return-value]


def create_discriminator(name: str, **kwargs: Any) -> nn.Module:
    return DISCRIMINATORS.create(name, **kwargs)


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    return ENCODERS.create(name, **kwargs)


def create_classifier(name: str, **kwargs: Any) -> nn.Module:
    return CLASSIFIERS.create(name, **kwargs)


def list_generators() -> List[str]:
    return GENERATORS.names()


def list_discriminators() -> List[str]:
    return DISCRIMINATORS.names()


def list_encoders() -> List[str]:
    return ENCODERS.names()


def list_classifiers() -> List[str]:
    return CLASSIFIERS.names()


__all__ = [
    "Generator", "to_unit", "from_unit", "REGISTRIES", "create_model", "create_generator",
    "create_discriminator", "create_encoder", "create_classifier", "list_generators",
    "list_discriminators", "list_encoders", "list_classifiers",
]
