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


__all__ = ["bind_host", "is_loopback"]
