"""Command-line plumbing shared by the jobs: profile + YAML + ``section.key=value`` overrides."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from natra_ray.config import Config, ConfigError, list_profiles, load_config


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


def parse_job_args(p: argparse.ArgumentParser, argv=None) -> "tuple[argparse.Namespace, Config]":
    """Parse a job's arguments and build its config; a bad config is one line and exit 2."""
    args = p.parse_args(argv)
    from natra_ray.runtime import setup_logging

    setup_logging()
    try:
        return args, config_from_args(args)
    except ConfigError as e:
        fail(str(e))


def storage_root(cfg: Config) -> Path:
    """Absolute storage root. A job sent with ``ray job submit`` runs in a temporary copy of the
    working directory, so a relative default would silently vanish: default to the home dir."""
    root = cfg.tune.storage_path or os.environ.get("NATRA_STORAGE") or str(Path.home() / "natra_ray_results")
    return Path(root).expanduser().resolve()


def fail(msg: str, code: int = 2) -> "NoReturn":  # type: ignore[name-defined]
    """One clear line on stderr and a non-zero exit (bad input is not a stack trace)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


__all__ = ["add_config_args", "config_from_args", "storage_root", "fail", "ConfigError", "default_profile", "parse_job_args"]
