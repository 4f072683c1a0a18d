"""Talking to MLflow safely: the package's one error, values cleaned to what MLflow accepts,
retries of transient store errors, and the one patch of MLflow's private globals.

Nothing here imports ``mlflow`` at import time; the client and the patch import it when used.
"""
from __future__ import annotations

import contextlib
import logging
import numbers
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")

# MLflow limits (mlflow.utils.validation)
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

# MLflow error codes that no retry can fix.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND", "ENDPOINT_NOT_FOUND",
    "FEATURE_DISABLED",
}


class TrackingError(ValueError):
    """The tracking store is misconfigured, unreachable, or refused data we must not lose."""


# --------------------------------------------------------------------------- the client and retries
def _client(uri: str):
    """An explicit ``MlflowClient`` for ``uri`` (tracking and registry). Everything but the few
    calls of :func:`_fluent_target` goes through one: MLflow's fluent API keeps a global
    "active run" and URI, which would fight Ray's or a user's own ``mlflow.start_run``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(e: BaseException | None) -> str:
    return str(getattr(e, "error_code", "") or "")


def _one_line(e: BaseException, limit: int = 400) -> str:
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {(text[0] if text else '')[:limit]}"


def lost_insert_race(e: BaseException) -> bool:
    """Whether ``e`` is a unique-key violation: MLflow's SQL store looks a shared row up (a
    dataset, by experiment, name and digest) and inserts it when absent, without a lock, so two
    trials logging the same data at once can both insert. The loser's retry finds the winner's
    row. Elsewhere the same error means a real conflict, so only callers that know the row is
    shared pass this as ``_retry``'s ``retry_if``."""
    text = str(getattr(e, "message", None) or e)
    return "UNIQUE constraint failed" in text or "duplicate key value" in text or "Duplicate entry" in text


def _retry(fn: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 0.5,
           retry_if: Callable[[BaseException], bool] | None = None) -> T:
    """Run ``fn``; retry transient failures (locked SQLite, network, 5xx) with exponential backoff;
    raise :class:`TrackingError` naming ``what`` when it still fails or the error is permanent.
    ``retry_if``: errors MLflow reports as permanent that this call knows to be transient."""
    for i in range(attempts):
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as e:  # MLflow raises many types; classify below
            permanent = _error_code(e) in _PERMANENT_CODES and not (retry_if is not None and retry_if(e))
            if permanent or i == attempts - 1:
                tries = "" if permanent else f" after {attempts} attempts"
                raise TrackingError(f"MLflow refused to {what}{tries}: {_one_line(e)}") from e
            delay = base_delay * 2 ** i
            log.warning("MLflow could not %s (%s); retrying in %.1fs", what, _one_line(e, 200), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- values MLflow accepts
_KEY_BAD = re.compile(r"[^/\w.\- ]")


def sanitize_key(key: Any) -> str:
    """A param/metric/tag key MLflow accepts on every platform: characters other than
    alphanumerics, ``_ - . / space`` become ``_``; keys that would not be unique as file paths
    (``a//b``, ``/a``, ``../a``, ``a/``) lose their slashes; at most 250 characters."""
    k = _KEY_BAD.sub("_", str(key))
    if k and (posixpath.normpath(k) != k or k.startswith(("/", ".."))):
        k = k.replace("/", "_")
        if k.startswith(".."):
            k = "_" + k
    if k in ("", "."):
        k = "_" + k
    return k[:MAX_KEY]


def _param_value(v: Any) -> str:
    s = str(v)
    if len(s) > MAX_PARAM_VALUE:
        log.warning("MLflow param value truncated to %d characters (was %d)", MAX_PARAM_VALUE, len(s))
        s = s[:MAX_PARAM_VALUE]
    return s


def sanitized_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Keys sanitized (two raw keys that collapse onto one both survive, as ``k`` and ``k_2``),
    values as strings of at most 6000 characters."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = sanitize_key(k)
        n = 2
        while key in out:  # two raw keys collapsed onto one sanitized key: keep both
            key = f"{sanitize_key(k)[:MAX_KEY - 4]}_{n}"
            n += 1
        out[key] = _param_value(v)
    return out


def as_number(v: Any) -> float | None:
    """A float for numeric values (Python/NumPy scalars, bools as 0/1, one-element arrays or
    tensors); ``None`` for anything else (strings, dicts, None...)."""
    if isinstance(v, numbers.Real):
        return float(v)
    if hasattr(v, "numel") and hasattr(v, "item"):  # torch.Tensor without importing torch
        if v.numel() == 1 and not v.is_complex():
            return float(v.item())
        return None
    if isinstance(v, np.ndarray) and v.size == 1 and np.issubdtype(v.dtype, np.number) \
            and not np.iscomplexobj(v):
        return float(v.reshape(()))
    return None


def tag_value(s: str) -> str:
    """At most 8000 characters, keeping the end: the exception line is the last line of a traceback."""
    return s if len(s) <= MAX_TAG_VALUE else "..." + s[-(MAX_TAG_VALUE - 3):]


def filter_quote(value: str) -> str | None:
    """``value`` quoted for an MLflow search filter; ``None`` when it holds both quote characters
    (MLflow's filter grammar has no escape)."""
    for q in ("'", '"'):
        if q not in value:
            return f"{q}{value}{q}"
    return None


# --------------------------------------------------------------------------- MLflow's private globals
# Why: ``mlflow.pytorch.log_model(..., run_id=...)``, ``mlflow.register_model`` and
# ``mlflow.pytorch.load_model`` have no client form. They read the *global* tracking/registry URI
# (so without this they would write to whatever ``$MLFLOW_TRACKING_URI`` or MLflow 3's default,
# ``sqlite:///mlflow.db`` relative to the cwd, says), and ``log_model`` files its LoggedModel
# under the *active* experiment (the ``Default`` one, with a cwd-relative artifact folder) even
# with an explicit ``run_id`` (mlflow 3.17). MLflow's setters export ``$MLFLOW_TRACKING_URI`` /
# ``$MLFLOW_REGISTRY_URI`` too, and the public getters answer MLflow's default when nothing is
# set, so the previous state is read from and restored into MLflow's private module globals
# (``_tracking_uri``, ``_registry_uri``, ``_active_experiment_id``). The lock makes the swap
# atomic between the threads of one process.
_FLUENT_LOCK = threading.RLock()


@contextlib.contextmanager
def _fluent_target(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's *global* (fluent) tracking/registry URI and active experiment at ours for
    the duration of a call that only reads them (``log_model``, ``register_model``, ``load_model``),
    then restore the previous state, including ``$MLFLOW_TRACKING_URI``."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as reg_utils
    from mlflow.tracking._tracking_service import utils as trk_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # the setters export these too
    with _FLUENT_LOCK:
        old_uri = getattr(trk_utils, "_tracking_uri", None)
        old_reg = getattr(reg_utils, "_registry_uri", None)
        old_env = {k: os.environ.get(k) for k in env_keys}
        old_exp = getattr(fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        if experiment_id is not None:
            fluent._active_experiment_id = experiment_id
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old_uri)
            reg_utils._registry_uri = old_reg
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if experiment_id is not None:
                fluent._active_experiment_id = old_exp


__all__ = ["TrackingError", "sanitize_key"]
