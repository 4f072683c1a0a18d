"""One small registry type shared by generators, classifiers, augmentations, attacks, ...

Registries are plain name -> factory maps (as in perturbation_learning), with the timm-style
``register`` decorator and a ``create`` that fails with the list of known names.

An entry may carry metadata next to its factory, as timm's model entries carry their
pretrained configs: ``@REG.register("name", needs=...)`` stores the keyword arguments, and
``REG.meta("name")`` returns them (read-only; empty for an entry registered without any).
The augmentation methods use it to say what they need (``natra_ray.augment.Needs``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name no factory was registered under; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories. ``kind`` is used in error messages ("generator", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._meta: dict[str, Mapping[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@REG.register("name", **meta)`` (the name defaults to the function's);
        ``meta`` is the entry's metadata, returned by ``meta(name)``."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._factories:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._factories[key] = fn
            self._meta[key] = MappingProxyType(dict(meta))
            return fn

        return deco

    def _unknown(self, name: str) -> UnknownNameError:
        return UnknownNameError(f"unknown {self.kind} {name!r}; known names are: {', '.join(self.names())}")

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            raise self._unknown(name) from None

    def meta(self, name: str) -> Mapping[str, Any]:
        """The metadata ``name`` was registered with (read-only; empty when none was given)."""
        try:
            return self._meta[name]
        except KeyError:
            raise self._unknown(name) from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
