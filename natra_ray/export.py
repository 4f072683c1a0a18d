"""A trained classifier as a self-contained program that takes the dataset's own images.

The classifiers train on what the data loader makes of the images (Fashion-MNIST's 28 px
zero-padded to 32 px). A user holds the dataset's images, not the loader's output, and a
convolutional net with adaptive pooling silently accepts either size, scoring some ten
points worse on the unpadded one. :class:`NativeInputClassifier` therefore takes images at
the dataset's native size, applies the loader's own preprocessing (``data.datasets.preprocess``:
one rule for training and serving) and returns the logits; any other shape is refused.

:func:`export_classifier` turns it into a ``torch.export`` program (weights and graph, no
Python classes of this package), which MLflow saves as ``pt2``: loading it needs torch, not
natra_ray. The exported graph checks the input shape itself; its message names the input
``images`` and the size it expects (``Guard failed: images.size()[2] == 28``).

No Ray and no MLflow in here.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from natra_ray.data.datasets import InputSpec, preprocess


class InputShapeError(ValueError):
    """Images of another shape than the model takes."""


def input_shape_message(got: Tuple[int, ...], spec: InputSpec) -> str:
    c, h, w = spec.shape
    what = (f"the model pads them to {spec.image_size}x{spec.image_size} itself, as the training pipeline does"
            if spec.shape != spec.model_shape else "the size it was trained on")
    return (f"classifier input must be float images in [0, 1] of shape (N, {c}, {h}, {w}): the dataset's "
            f"native {h}x{w} px, {c} channel(s) ({what}); got shape {tuple(got)}")


class NativeInputClassifier(nn.Module):
    """Images ``(N, *spec.shape)`` float in [0, 1] -> the loader's preprocessing -> ``classifier``
    -> logits ``(N, classes)``. In eager mode a wrong shape raises :class:`InputShapeError`."""

    def __init__(self, classifier: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.classifier = classifier
        self.spec = spec

    def forward(self, images: Tensor) -> Tensor:  # the name shows in the exported graph's shape errors
        if images.dim() != 4 or tuple(images.shape[1:]) != self.spec.shape:
            raise InputShapeError(input_shape_message(tuple(images.shape), self.spec))
        return self.classifier(preprocess(images, self.spec))


def export_classifier(model: nn.Module, example: Tensor) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``model`` (eval mode, CPU) on ``example`` with a dynamic batch size, the
    way ``mlflow.pytorch.log_model(..., serialization_format="pt2")`` exports it (``Dim.AUTO``
    on the batch axis; ``example`` needs >= 2 images, since export fixes a batch axis of 1)."""
    if example.dim() != 4 or example.shape[0] < 2:
        raise ValueError(f"export needs an example batch of >= 2 images (N, C, H, W); got {tuple(example.shape)}")
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


__all__ = ["InputShapeError", "NativeInputClassifier", "export_classifier", "input_shape_message"]
