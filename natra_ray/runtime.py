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


# At default verbosity these loggers show warnings only: libraries' info chatter, and our own
# per-step logs, which progress bars and stage lines (natra_ray.progress) replace.
QUIET_LOGGERS = {"ray": logging.WARNING, "mlflow": logging.ERROR, "alembic": logging.WARNING,
                 "optuna": logging.WARNING, "tensorboardX": logging.WARNING, "urllib3": logging.WARNING,
                 "matplotlib": logging.WARNING, "numba": logging.WARNING,
                 "natra_ray.cache": logging.WARNING, "natra_ray.data": logging.WARNING,
                 "natra_ray.stages": logging.WARNING}


class OncePerProcess(logging.Filter):
    """Passes each distinct (logger, level, message) once: a warning repeated by every stage
    that hits the same cause says it once."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def setup_logging(level: int = logging.INFO, verbose: bool | None = None) -> None:
    """Log format and levels of this process. ``verbose`` (default: ``NATRA_VERBOSE``) keeps
    every library's info logs and repeated messages; otherwise see ``QUIET_LOGGERS``."""
    import warnings

    from natra_ray.progress import verbose as env_verbose

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if env_verbose() if verbose is None else verbose:
        return
    for name, lvl in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(lvl)
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, OncePerProcess) for f in h.filters):
            h.addFilter(OncePerProcess())
    # MLflow's model logging traces the classifier with torch.jit, whose deprecation notice is
    # about MLflow's code, not ours: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=FutureWarning)
