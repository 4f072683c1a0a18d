"""Small process-level helpers: device choice, seeding, logging. No Ray, no MLflow."""
from __future__ import annotations

import logging
import random
from typing import Any, Callable, Dict

import numpy as np
import torch

# Stages report metrics through a callback they are given (the Ray layer passes one that
# forwards to Tune/MLflow); stages never import a tracker themselves.
Reporter = Callable[[Dict[str, Any]], None]


def null_reporter(metrics: Dict[str, Any]) -> None:
    """The default reporter: metrics go nowhere (stages still log progress)."""


def resolve_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible; use device=auto or cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
