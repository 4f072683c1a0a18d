"""Command-line plumbing shared by the jobs: profile + YAML + ``section.key=value`` overrides."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

from natra_ray.config import Config, ConfigError, list_profiles, load_config
from natra_ray.distributed.ray_init import bind_host, is_loopback  # re-exported for the jobs
from natra_ray.workflow.layout import StorageLayout


def default_profile() -> str:
    """``cpu`` without a GPU (a complete run in <= 20 min on 2 cores); ``paper`` with one."""
    try:
        import torch

        return "paper" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def add_config_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--profile", default=None,
                   help=f"one of {', '.join(list_profiles())} (default: cpu without a GPU, paper with one)")
    p.add_argument("--config", default=None, help="a YAML file with config sections to merge in")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. gan.steps=500 robust.eps=0.3")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.profile or default_profile(), args.config, args.overrides)


def check_inputs(cfg: Config) -> None:
    """The files a job reads, checked before Ray starts or anything is written: an external
    generator checkpoint (safe load, kind, weights against its architecture, image shape against
    the data) and the dataset (every image decoded once, splits non-empty). Raises
    ``CheckpointError`` or ``DatasetError`` with one line naming the problem."""
    from natra_ray.checkpoints import CheckpointError
    from natra_ray.data import check_dataset

    if cfg.gan.checkpoint:
        from natra_ray.stages.gan import load_generator

        try:
            load_generator(cfg.gan.checkpoint, cfg)
        except CheckpointError:
            raise
        except ValueError as e:  # the generator's image shape does not fit the data
            raise CheckpointError(f"gan.checkpoint: {e}") from None
    check_dataset(cfg.data)


def parse_job_args(p: argparse.ArgumentParser, argv=None,
                   presets: Optional[Callable[[argparse.Namespace], Sequence[str]]] = None
                   ) -> "tuple[argparse.Namespace, Config]":
    """Parse a job's arguments, build its config and check its input files (``check_inputs``);
    a bad config, dataset or checkpoint is one line on stderr and exit 2, before any compute.
    ``presets(args)``: overrides a job flag stands for (``jobs/benchmark.py --budget full``),
    applied before the command line's own, so an explicit ``section.key=value`` still wins."""
    args = p.parse_args(argv)
    if presets is not None:
        args.overrides = [*presets(args), *args.overrides]
    from natra_ray.runtime import setup_logging

    setup_logging()
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        fail(str(e))
    from natra_ray.checkpoints import CheckpointError
    from natra_ray.data import DatasetError

    try:
        check_inputs(cfg)
    except (DatasetError, CheckpointError) as e:
        fail(str(e))
    return args, cfg


def layout(cfg: Config) -> StorageLayout:
    """Where this config's runs, caches, sweeps and reports live (``workflow/layout.py``)."""
    return StorageLayout.from_config(cfg.tune.storage_path)


def storage_root(cfg: Config) -> Path:
    """The absolute storage root (``layout(cfg).root``)."""
    return layout(cfg).root


def fail(msg: str, code: int = 2) -> NoReturn:
    """One clear line on stderr and a non-zero exit (bad input is not a stack trace). A message
    with several lines keeps the problem on the first; the rest (ways to fix it) follow."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


__all__ = ["add_config_args", "config_from_args", "layout", "storage_root", "fail", "ConfigError", "default_profile",
           "parse_job_args", "check_inputs", "bind_host", "is_loopback"]
