"""Checkpoints that carry their own architecture and config, and never unpickle code.

A checkpoint is a plain dict saved with ``torch.save``::

    {"format_version": 1, "kind": "generator", "name": "style", "kwargs": {...},
     "state_dict": {...}, "config": {...}, "extra": {...}}

``kind`` names a registry (generator, discriminator, encoder, classifier), ``name`` and
``kwargs`` rebuild the module through it, so loading needs no flags repeated. Loading always
uses ``torch.load(weights_only=True)``: a file crafted to execute code when unpickled is
refused instead of run.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
from torch import nn

from natra_ray.config import plain

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used: wrong architecture, wrong shape, unknown version, unsafe."""


def save_checkpoint(
    path: str | Path,
    module: nn.Module,
    *,
    kind: str,
    name: str,
    kwargs: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename) so a killed writer never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "kwargs": plain(dict(kwargs)),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "config": plain(dict(config or {})),
        "extra": plain(dict(extra or {})),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_tensors(path: str | Path, kind: str, payload: Mapping[str, Any]) -> Path:
    """Atomically save a plain dict of tensors/values (directions, latent codes, ...) with its
    ``kind`` and the format version, loadable by ``load_tensors`` without unpickling code."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format_version": FORMAT_VERSION, "kind": kind, **_plain_keep_tensors(payload)}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _plain_keep_tensors(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {str(k): _plain_keep_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_keep_tensors(v) for v in obj]
    return obj


def load_tensors(path: str | Path, kind: str, mmap: bool = False) -> Dict[str, Any]:
    """Load a ``save_tensors`` file safely; checks its kind and format version. ``mmap``: the
    tensors stay in the file's pages (read on first touch, shared by every process of the node
    that maps it) instead of being copied into this process's memory."""
    d = _safe_load(Path(path), mmap)
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} file")
    _check_version(Path(path), d.get("format_version"))
    return d


def _safe_load(path: Path, mmap: bool = False) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects that are not plain tensors/containers "
            f"(loading it would run code from the file). Details: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {e}") from None


def _check_version(path: Path, version: Any) -> None:
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this natra_ray reads versions "
            f"1..{FORMAT_VERSION}. Upgrade natra_ray to read it."
        )


def read_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Load the raw checkpoint dict safely and check its format version."""
    path = Path(path)
    ckpt = _safe_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a natra_ray checkpoint (no 'state_dict' entry)")
    _check_version(path, ckpt.get("format_version"))
    return ckpt


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict`` that names the first missing / unexpected / mis-shaped tensor."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{source} does not match the model architecture: " + "; ".join(parts))
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(state[k].shape)} but the model expects "
                f"{tuple(v.shape)} (checkpoint of a different architecture or size?)"
            )
    module.load_state_dict(state, strict=True)


def load_module(
    path: str | Path,
    *,
    kind: str,
    factory: Callable[..., nn.Module],
    **override_kwargs: Any,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a module from the checkpoint alone: ``factory(name, **kwargs)`` then load weights.

    ``override_kwargs`` are compared against the stored ones: asking for a model of a
    different shape than the file holds is the wrong-architecture error, named precisely.
    """
    ckpt = read_checkpoint(path)
    if ckpt.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {ckpt.get('kind')!r}, not a {kind!r}")
    kwargs = dict(ckpt.get("kwargs", {}))
    for k, v in override_kwargs.items():
        if k in kwargs and kwargs[k] != v:
            raise CheckpointError(
                f"{path}: the {kind} was saved with {k}={kwargs[k]!r} but {k}={v!r} was asked for"
            )
        kwargs[k] = v
    module = factory(ckpt["name"], **kwargs)
    load_state_strict(module, ckpt["state_dict"], source=str(path))
    return module, ckpt
