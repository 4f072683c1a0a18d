"""Mixed precision, one switch (``robust.precision``): fp32, or bf16 / fp16 autocast.

What runs under autocast: decoding (``LatentSource.decode``: every latent attack and random
decode) and the classifier's forward passes in training and in the latent attacks. Losses are
taken on float32 logits, and the optimiser, the APT budgets and the latent codes stay float32,
so only the big convolutions and matmuls change precision. fp16's 5-bit exponent underflows
small gradients, so its training steps go through a ``GradScaler``; bf16 has fp32's range and
needs none. CPU autocast supports bf16 (slowly: it is there so a CPU test covers the path).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None = plain float32)."""
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[precision]


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """``torch.autocast`` on ``device``'s type with ``precision``'s dtype; fp32: no autocast."""
    dtype = dtype_of(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is on for fp16 only (disabled, its calls pass the loss and step through)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


__all__ = ["DTYPES", "dtype_of", "autocast", "grad_scaler"]
