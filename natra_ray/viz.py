"""Image grids as PNG (PIL only, so the explorer and stages share it without torchvision)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """images (N, C, H, W) in [0, 1] -> uint8 (H', W', C') mosaic with ``nrow`` images per row."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad) * 0.5
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if upscale > 1:
        arr = arr.repeat(upscale, 0).repeat(upscale, 1)
    return arr


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 2) -> Path:
    """Write a PNG grid of ``images`` (N, C, H, W) in [0, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = grid_array(images, nrow, upscale=upscale)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
    return path


def save_rows(rows: Sequence[torch.Tensor], path: str | Path, upscale: int = 2) -> Path:
    """One row per tensor (each (K, C, H, W)); e.g. images x edit strengths (paper Fig. 2)."""
    k = rows[0].shape[0]
    return save_grid(torch.cat(list(rows)), path, nrow=k, upscale=upscale)
