"""Latent-space objects shared by training, evaluation and the explorer (no training here).

- ``lce_decode``: NaTra Sec. 3.3 / mGANprior composition. N codes per image run through the
  generator head up to layer l, their feature maps are weighted channel-wise by one learned
  importance vector per code and summed, then the rest of the generator runs.
- ``Directions``: a basis of latent directions (rows of ``vectors``) with per-direction
  scales, and the layer-wise edit D(u_i, a-b) of Sec. 3.4 on W+.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch

from natra_ray.checkpoints import load_tensors, save_tensors
from natra_ray.models.generator import Generator


def lce_decode(G: Generator, ws: torch.Tensor, alpha: torch.Tensor, layer: int) -> torch.Tensor:
    """ws (B, N, num_ws, w_dim), alpha (B, N, C_l) -> image (B, C, H, W) in [-1, 1].

    x = g_r^l( sum_n alpha_n * g_h^l(w_n) ). The rest of the generator takes the style
    inputs of the first code for layers >= l (mGANprior composes only the features; which
    code drives the later styles is our choice, made so N = 1 is exactly plain inversion).
    """
    b, n = ws.shape[:2]
    if n == 1 and layer == 0:
        return G.synthesis(ws[:, 0])
    feats = G.head(ws.flatten(0, 1), layer)  # (B*N, C, H, W)
    feats = feats.view(b, n, *feats.shape[1:])
    composed = (feats * alpha[..., None, None]).sum(1)  # (B, C, H, W)
    return G.rest(composed, ws[:, 0], layer)


@dataclass
class Directions:
    """``vectors`` (K, w_dim) unit rows; ``scales`` (K,) the std of the data along each, so an
    edit strength of 1 means "one standard deviation" whatever the estimator."""

    vectors: torch.Tensor
    scales: torch.Tensor
    estimator: str
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def offset(self, coeffs: torch.Tensor) -> torch.Tensor:
        """coeffs (B, k) for the first k directions -> latent offset (B, w_dim) = V r."""
        k = coeffs.shape[1]
        return (coeffs * self.scales[:k].to(coeffs)) @ self.vectors[:k].to(coeffs)

    def edit(self, ws: torch.Tensor, coeffs: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """D(u, a-b): add ``offset(coeffs)`` to the style inputs start..end (inclusive) only.

        ws (B, num_ws, w_dim) or LCE codes (B, N, num_ws, w_dim) (every code moves alike)."""
        num_ws = ws.shape[-2]
        if not (0 <= start <= end < num_ws):
            raise ValueError(f"edit layer range {start}..{end} is invalid for {num_ws} style inputs "
                             f"(valid: 0 <= start <= end <= {num_ws - 1})")
        mask = torch.zeros(num_ws, 1, device=ws.device, dtype=ws.dtype)
        mask[start:end + 1] = 1
        delta = self.offset(coeffs)  # (B, w_dim)
        delta = delta[:, None, :] * mask  # (B, num_ws, w_dim)
        if ws.dim() == 4:
            delta = delta[:, None]
        return ws + delta

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, "directions", {"vectors": self.vectors, "scales": self.scales,
                                                 "estimator": self.estimator, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        d = load_tensors(path, "directions")
        return cls(d["vectors"], d["scales"], d["estimator"], d.get("meta", {}))


def resolve_layer_range(G: Generator, start: int, end: int) -> tuple[int, int]:
    """Config convention: end = -1 means the last style input."""
    end = G.num_ws - 1 if end < 0 else end
    G.ws_of_layers(start, end)  # raises a clear error when invalid
    return start, end
