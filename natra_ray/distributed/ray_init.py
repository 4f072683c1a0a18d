"""Joining or starting Ray; the hosts the dashboard and UIs bind to.

Nothing here imports Ray at module level: the explorer and the MLflow UI helpers use the host
checks without it.
"""
from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1; IPv6 may come in brackets)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_host(host: str, what: str) -> str:
    """``host`` for a UI/dashboard to listen on; anything but loopback is an explicit choice that
    gets a warning (it lets every machine that can reach this one use the service)."""
    if not is_loopback(host):
        log.warning("%s will listen on %s, not loopback: anyone who can reach this machine can use it; "
                    "prefer an SSH tunnel (ssh -L) to a loopback-bound %s", what, host, what)
    return host


def init_ray(cfg) -> None:
    """Join the cluster a job was submitted to, or start a local one (dashboard on loopback:
    Train-in-Tune needs it, and exposing it is a deliberate act, see the README)."""
    import os

    import ray

    from natra_ray.distributed import console

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`, or by the user ("auto")
        # The cluster's workers do not inherit this process's environment: the console settings
        # travel in the job's runtime env.
        env = console.worker_env()
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                     runtime_env={"env_vars": env} if env else None)
        except ValueError:  # the submitted job sets one of them itself: its own value stands
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # address="local": a fresh local instance. Without it ray.init() would try to join
        # whatever cluster /tmp/ray/ray_current_cluster names, even a dead one (hangs).
        ray.init(address="local", include_dashboard=True,
                 dashboard_host=bind_host(cfg.tune.dashboard_host, "the Ray dashboard"),
                 log_to_driver=True, configure_logging=False)
    console.reclaim_signals()


__all__ = ["bind_host", "init_ray", "is_loopback"]
