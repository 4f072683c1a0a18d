"""MLflow tracking for Tune sweeps: one parent run per sweep, one child run per trial.

This is the only module of the project that imports ``mlflow`` (lazily: resolving and checking
a URI costs no MLflow import, so a bad URI fails in milliseconds, before any compute).

Layout of a sweep in the store::

    experiment  (tracking.experiment or tune.name; artifact location set explicitly)
      parent run  "<sweep name>"          tags natra.role=sweep, params = the flat config
        child run "<trial id>"            tags mlflow.parentRunId=<parent>, natra.trial_id=<id>
        child run ...

Things about MLflow 3.x this module works around (all measured with mlflow 3.17):

* Plain-folder stores (``./mlruns``, ``file:``) are refused by MLflow itself; and with no URI
  at all MLflow 3 defaults to ``sqlite:///mlflow.db`` *relative to the current directory*,
  which under ``ray job submit`` is a temporary copy that disappears. Hence
  :func:`resolve_tracking_uri` always yields an explicit, absolute URI.
* An experiment created in an SQLite store without an artifact location puts artifacts in
  ``./mlruns/<id>`` relative to whatever the cwd was: :func:`ensure_experiment` always sets an
  absolute one (``<db folder>/mlartifacts`` by default).
* Concurrent experiment creation races, and concurrent first opening of a fresh SQLite file
  races on schema creation: the Tune driver calls :func:`ensure_experiment` once, before trials.
* ``mlflow.pytorch.log_model(..., run_id=...)`` still files the LoggedModel under the *active*
  experiment (the ``Default`` one, with a cwd-relative artifact folder) unless told otherwise,
  and uses the *global* tracking URI: :meth:`TrialTracker.log_classifier` sets both for the call.
* Everything else goes through an explicit ``MlflowClient(uri)``: no global "active run" state,
  so a tracker never fights Ray's or a user's own ``mlflow.start_run``.

Multi-node clusters: a ``file://`` artifact location lives on the head node's disk; trials on
other nodes would write to *their* local disk. Use an MLflow server with proxied artifacts
on an address the other nodes reach (``ray_cluster.yaml``: the head's private address, with
``MLFLOW_TRACKING_URI`` set for every job started on the head).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import numbers
import os
import posixpath
import re
import shlex
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Mapping, Optional, TypeVar

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from natra_ray.config import Config

log = logging.getLogger(__name__)

T = TypeVar("T")

SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "natra.trial_id"
ROLE_TAG = "natra.role"
ATTEMPT_TAG = "natra.attempt"
FAILURE_TAG = "natra.failure_reason"
CLASSIFIER_NAME = "classifier"
# Which view the MLflow 3 UI opens an experiment on. Without the tag it guesses, and opens ours on
# the GenAI overview (traces, tokens); "custom_model_development" is the UI's value for training
# runs (the values are in the UI bundle, mlflow/server/js: GENAI_DEVELOPMENT, CUSTOM_MODEL_DEVELOPMENT...).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow limits (mlflow.utils.validation)
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_TAG_VALUE = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow error codes that no retry can fix.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND", "ENDPOINT_NOT_FOUND",
    "FEATURE_DISABLED",
}


class TrackingError(ValueError):
    """The tracking store is misconfigured, unreachable, or refused data we must not lose."""


# --------------------------------------------------------------------------- URIs
def _scheme(uri: str) -> str:
    """``postgresql+psycopg2://...`` -> ``postgresql``; ``databricks`` -> ``databricks``; a bare
    path -> ``""`` (MLflow would treat it as a plain-folder store)."""
    if uri == "databricks" or uri.startswith("databricks://"):
        return "databricks"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    if not m or len(m.group(1)) == 1:  # "C:\..." is a Windows path, not a scheme
        return ""
    return m.group(1).split("+", 1)[0].lower()


def _sqlite_path(uri: str) -> str:
    """The database path of an ``sqlite://`` URI (``""`` or ``":memory:"`` for in-memory)."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    rest = rest.split("?", 1)[0]
    # sqlite:///rel.db -> "/rel.db" -> "rel.db"; sqlite:////abs.db -> "//abs.db" -> "/abs.db"
    return rest[1:] if rest.startswith("/") else rest


def validate_tracking_uri(uri: str, source: str = "tracking.uri") -> str:
    """Check a tracking URI's form (not reachability); returns it stripped. ``source`` names
    where it came from, for the message."""
    uri = uri.strip()
    scheme = _scheme(uri)
    supported = ", ".join(SUPPORTED_SCHEMES)
    if scheme in ("", "file"):
        raise TrackingError(
            f"MLflow tracking URI {uri!r} (from {source}) is a plain-folder store, which MLflow 3 refuses "
            f"(and whose concurrent writes from parallel trials are unsafe); use an absolute SQLite file "
            f"such as 'sqlite:////abs/path/mlflow.db' or a server 'http://host:5000'; supported schemes: {supported}")
    if scheme not in SUPPORTED_SCHEMES:
        raise TrackingError(
            f"MLflow tracking URI {uri!r} (from {source}) has unsupported scheme {scheme!r}; "
            f"supported schemes: {supported}")
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if path in ("", ":memory:"):
            raise TrackingError(
                f"MLflow tracking URI {uri!r} (from {source}) is an in-memory SQLite database, which each "
                f"Ray worker process would see empty; use an absolute file such as 'sqlite:////abs/path/mlflow.db'")
        if not os.path.isabs(path):
            raise TrackingError(
                f"MLflow tracking URI {uri!r} (from {source}) is a relative SQLite path; it must be absolute "
                f"(four slashes: 'sqlite:////abs/path/mlflow.db') because `ray job submit` runs the driver in a "
                f"temporary copy of the working directory and Ray workers run in other directories, so a "
                f"relative database would be scattered and then vanish")
    return uri


def given_tracking_uri(cfg: "Config") -> Optional[str]:
    """The URI the user chose (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``), validated; None
    when neither is set. Writes nothing, so it can be checked before any compute."""
    if cfg.tracking.uri.strip():
        return validate_tracking_uri(cfg.tracking.uri, "config key tracking.uri")
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return validate_tracking_uri(env, "$MLFLOW_TRACKING_URI") if env else None


def resolve_tracking_uri(cfg: "Config") -> str:
    """``given_tracking_uri`` or else ``sqlite:///<storage>/mlflow.db`` (absolute, folder
    created). Raises :class:`TrackingError` for a URI MLflow or Ray cannot use."""
    given = given_tracking_uri(cfg)
    if given:
        return given
    from natra_ray.cli import storage_root

    root = storage_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"  # root is absolute: "sqlite:////abs/.../mlflow.db"


def experiment_name(cfg: "Config") -> str:
    """``tracking.experiment`` or, when empty, ``tune.name``."""
    return cfg.tracking.experiment.strip() or cfg.tune.name


def default_artifact_root(uri: str) -> Optional[Path]:
    """``<db folder>/mlartifacts`` for an SQLite store; ``None`` (the server decides) otherwise."""
    if _scheme(uri) == "sqlite":
        return Path(_sqlite_path(uri)).parent / "mlartifacts"
    return None


def _http_check(uri: str, timeout_s: float) -> None:
    import requests

    base = uri.rstrip("/")
    hint = ("start it with `mlflow server --backend-store-uri sqlite:////abs/path/mlflow.db "
            "--host 127.0.0.1 --port 5000` or unset MLFLOW_TRACKING_URI (and tracking.uri) "
            "to use the local SQLite store")
    last = ""
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            r = requests.get(base + path, timeout=timeout_s)
        except requests.RequestException as e:
            raise TrackingError(
                f"MLflow tracking server at {uri} is unreachable: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}; {hint}") from None
        if r.status_code in (401, 403):
            raise TrackingError(
                f"MLflow tracking server at {uri} refused access (HTTP {r.status_code}); set "
                f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
        if r.status_code < 400:
            return
        last = f"HTTP {r.status_code} on GET {path}"
    raise TrackingError(f"MLflow tracking server at {uri} is unreachable: {last}; {hint}")


def _sqlite_check(uri: str, timeout_s: float) -> None:
    path = Path(_sqlite_path(uri))
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingError(f"MLflow SQLite store {uri}: cannot create folder {folder}: {e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(f"MLflow SQLite store {uri}: folder {folder} is not writable "
                            "(SQLite needs to create its journal next to the database)")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise TrackingError(f"MLflow SQLite store {uri}: database file {path} is not readable and writable")
    try:
        con = sqlite3.connect(str(path), timeout=timeout_s)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise TrackingError(f"MLflow SQLite store {uri}: cannot open database {path}: {e}") from None


def _sql_server_check(uri: str, timeout_s: float) -> None:
    import sqlalchemy

    scheme = _scheme(uri)
    connect_args = {"mssql": {"timeout": int(timeout_s)}}.get(scheme, {"connect_timeout": int(timeout_s)})
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    except ModuleNotFoundError as e:
        raise TrackingError(f"MLflow tracking URI {uri!r} needs the database driver {e.name!r}, "
                            "which is not installed; pip install it") from None
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as e:
        raise TrackingError(f"MLflow tracking database at {uri} is unreachable: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}; check the server and credentials, or unset "
                            "MLFLOW_TRACKING_URI to use the local SQLite store") from None
    finally:
        engine.dispose()


def check_tracking(uri: str, timeout_s: float = 10) -> None:
    """Verify, before any compute, that the store is reachable; raises :class:`TrackingError`.

    http(s): a GET on ``/health`` (then the REST search endpoint) with ``timeout_s``. sqlite: the
    folder is writable and the database opens. postgresql/mysql/mssql: a connection succeeds.
    databricks: only the form is checked (credentials live in the Databricks config)."""
    uri = validate_tracking_uri(uri)
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        _http_check(uri, timeout_s)
    elif scheme == "sqlite":
        _sqlite_check(uri, timeout_s)
    elif scheme in _DB_SCHEMES:
        _sql_server_check(uri, timeout_s)


def open_ui_command(uri: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The command that opens the MLflow UI for ``uri``, bound to loopback by default (reach it
    from another machine with ``ssh -L 5000:127.0.0.1:5000 <head>``). For a server URI the UI is
    already running: the URI itself is returned. Any other ``host`` is logged as a warning."""
    scheme = _scheme(uri)
    if scheme in ("http", "https", "databricks"):
        return uri
    from natra_ray.cli import bind_host

    host = bind_host(host, "the MLflow UI")
    return (f"mlflow ui --backend-store-uri {shlex.quote(uri)} "
            f"--host {shlex.quote(host)} --port {int(port)}")


# MLflow 3.17's UI opens every experiment on its GenAI pages (traces, tokens) unless the URL asks
# for the Model training view (the switch's state; the experiment kind tag does not decide it).
RUNS_VIEW_QUERY = "workflowType=machine_learning"


def runs_page_url(uri: str, run_id: str, host: str = "127.0.0.1", port: int = 5000) -> Optional[str]:
    """The MLflow UI page of the training runs of run ``run_id``'s experiment (e.g. a sweep's
    parent run): on the server of an ``http(s)`` store, or on the ``mlflow ui`` of
    :func:`open_ui_command` for a database store; ``None`` for Databricks (its workspace has its
    own pages)."""
    scheme = _scheme(uri)
    if scheme == "databricks":
        return None
    experiment_id = _retry(lambda: _client(uri).get_run(run_id).info.experiment_id, f"fetch run {run_id}")
    base = uri.rstrip("/") if scheme in ("http", "https") else f"http://{host}:{int(port)}"
    return f"{base}/#/experiments/{experiment_id}/runs?{RUNS_VIEW_QUERY}"


# --------------------------------------------------------------------------- helpers
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(e: BaseException) -> str:
    return str(getattr(e, "error_code", "") or "")


def _one_line(e: BaseException, limit: int = 400) -> str:
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {(text[0] if text else '')[:limit]}"


def _retry(fn: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Run ``fn``; retry transient failures (locked SQLite, network, 5xx) with exponential backoff;
    raise :class:`TrackingError` naming ``what`` when it still fails or the error is permanent."""
    for i in range(attempts):
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow raises many types; classify below
            code = _error_code(e)
            if code in _PERMANENT_CODES or i == attempts - 1:
                tries = "" if code in _PERMANENT_CODES else f" after {attempts} attempts"
                raise TrackingError(f"MLflow refused to {what}{tries}: {_one_line(e)}") from e
            delay = base_delay * 2 ** i
            log.warning("MLflow could not %s (%s); retrying in %.1fs", what, _one_line(e, 200), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


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


def _sanitized_params(params: Mapping[str, Any]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for k, v in params.items():
        key = sanitize_key(k)
        n = 2
        while key in out:  # two raw keys collapsed onto one sanitized key: keep both
            key = f"{sanitize_key(k)[:MAX_KEY - 4]}_{n}"
            n += 1
        out[key] = _param_value(v)
    return out


def _as_number(v: Any) -> Optional[float]:
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


def _tag_value(s: str) -> str:
    # keep the end: the exception line is the last line of a traceback
    return s if len(s) <= MAX_TAG_VALUE else "..." + s[-(MAX_TAG_VALUE - 3):]


def _filter_quote(value: str) -> Optional[str]:
    for q in ("'", '"'):
        if q not in value:
            return f"{q}{value}{q}"
    return None


_FLUENT_LOCK = threading.RLock()


@contextlib.contextmanager
def _fluent_target(uri: str, experiment_id: Optional[str] = None) -> Iterator[None]:
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


# --------------------------------------------------------------------------- experiments
def ensure_experiment(uri: str, name: str, artifact_root: Optional[Path] = None) -> str:
    """The id of experiment ``name``, created if missing (idempotent and race-safe: if another
    process creates it first, that one is returned). ``artifact_root`` is the experiment's
    artifact location; ``None`` means ``<db folder>/mlartifacts`` for SQLite (MLflow's own default
    would be relative to the cwd) and the server's choice otherwise. A deleted experiment of
    that name is restored. New and existing experiments get the kind tag that makes the UI open
    them on their training runs."""
    uri = validate_tracking_uri(uri)
    if not name or not name.strip():
        raise TrackingError("MLflow experiment name is empty; set tracking.experiment or tune.name")
    client = _client(uri)
    root = artifact_root if artifact_root is not None else default_artifact_root(uri)
    location = None
    if root is not None:
        root = Path(root).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception as e:  # noqa: BLE001
                if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(name)  # lost the race: use the winner's
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r (id %s) was deleted; restoring it", name, exp.experiment_id)
            client.restore_experiment(exp.experiment_id)
        if location is not None and exp.artifact_location.rstrip("/") != location.rstrip("/"):
            log.info("MLflow experiment %r keeps its artifact location %s (not %s)",
                     name, exp.artifact_location, location)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # older, or kind inferred by the UI
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    return _retry(get_or_create, f"create or fetch experiment {name!r} in {uri}")


# --------------------------------------------------------------------------- runs
class _RunLogger:
    """Logging shared by the parent and the trial runs (an explicit client; no global run)."""

    uri: str
    experiment_id: str
    run_id: Optional[str]

    @property
    def client(self):
        c = self.__dict__.get("_client")
        if c is None:
            c = self.__dict__["_client"] = _client(self.uri)
        return c

    def __getstate__(self) -> Dict[str, Any]:  # picklable: plain values only
        return {k: v for k, v in self.__dict__.items() if k != "_client"}

    def _need_run(self) -> str:
        if not self.run_id:
            raise TrackingError(f"{type(self).__name__}: no run started yet (call start first)")
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> Dict[str, str]:
        """Log a flat dict (values become strings of at most 6000 characters, keys sanitized).
        Params already logged with the same value are skipped; a different value for a logged
        param raises :class:`TrackingError` (a resumed run must not silently change its config).
        Returns what was logged."""
        from mlflow.entities import Param

        run_id = self._need_run()
        wanted = _sanitized_params(params)
        existing = _retry(lambda: self.client.get_run(run_id).data.params, f"read params of run {run_id}")
        clash = {k: (existing[k], v) for k, v in wanted.items() if k in existing and existing[k] != v}
        if clash:
            shown = "; ".join(f"{k}: logged {a!r}, now {b!r}" for k, (a, b) in list(clash.items())[:5])
            raise TrackingError(f"MLflow run {run_id} already has different values for {len(clash)} "
                                f"param(s) ({shown}); start a new run instead of resuming this one")
        new = {k: v for k, v in wanted.items() if k not in existing}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            chunk = items[i:i + _PARAMS_PER_BATCH]
            _retry(lambda: self.client.log_batch(run_id, params=chunk), f"log params to run {run_id}")
        return new

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> Dict[str, float]:
        """Log the numeric values of ``metrics`` at ``step`` (non-numeric values such as strings
        or nested dicts are skipped; bools count as 0/1). Transient store errors are retried with
        backoff; if the values still cannot be stored, :class:`TrackingError` is raised - numeric
        metrics are never dropped silently. Returns what was logged."""
        from mlflow.entities import Metric

        run_id = self._need_run()
        ts = int(time.time() * 1000)  # fixed across retries: a repeated batch is the same rows
        values: Dict[str, float] = {}
        for k, v in metrics.items():
            x = _as_number(v)
            if x is not None:
                values[sanitize_key(k)] = x
        items = [Metric(k, x, ts, int(step or 0)) for k, x in values.items()]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            chunk = items[i:i + _METRICS_PER_BATCH]
            _retry(lambda: self.client.log_batch(run_id, metrics=chunk),
                   f"log {len(chunk)} metric(s) at step {step} to run {run_id}")
        return values

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        run_id = self._need_run()
        items = [RunTag(sanitize_key(k), _tag_value(str(v))) for k, v in tags.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            chunk = items[i:i + _PARAMS_PER_BATCH]
            _retry(lambda: self.client.log_batch(run_id, tags=chunk), f"set tags on run {run_id}")

    def log_dataset(self, card: Mapping[str, Any], context: str = "training") -> None:
        """Record the data the run used as an MLflow dataset input (the runs table's Dataset
        column: ``name (digest)`` and ``context``). ``card``: ``data.datasets.dataset_card``:
        name, source folder, digest, split sizes, native image shape, classes; the split sizes
        and classes go into the dataset's profile, the image and label shapes into its schema.
        Logging the same card again (a resumed run) adds nothing."""
        import json

        from mlflow.data.schema import TensorDatasetSchema
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types.schema import Schema, TensorSpec
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        run_id = self._need_run()
        sizes = {str(k): int(v) for k, v in dict(card.get("split_sizes") or {}).items()}
        schema = TensorDatasetSchema(
            features=Schema([TensorSpec(np.dtype(np.float32), (-1, *map(int, card["input_shape"])), "images")]),
            targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")]))
        profile = {"num_rows": sum(sizes.values()), **{f"{k}_rows": v for k, v in sizes.items()},
                   "num_classes": len(card.get("classes") or []), "classes": list(card.get("classes") or [])}
        # MLflow's local-file source, as LocalArtifactDatasetSource writes it (resolving a path to a
        # source class instead warns that two registered classes match)
        source = json.dumps({"uri": str(card["source"])})
        dataset = Dataset(name=str(card["name"]), digest=str(card["digest"])[:36], source_type="local", source=source,
                          schema=json.dumps(schema.to_dict()), profile=json.dumps(profile))
        item = DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        _retry(lambda: self.client.log_inputs(run_id, datasets=[item]), f"log the dataset input of run {run_id}")

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload one file (into ``artifact_path`` folder of the run, if given)."""
        run_id = self._need_run()
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"artifact {p} does not exist or is not a file")
        _retry(lambda: self.client.log_artifact(run_id, str(p), artifact_path),
               f"upload artifact {p} to run {run_id}")

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a folder's contents (recursively)."""
        run_id = self._need_run()
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"artifact folder {d} does not exist or is not a folder")
        _retry(lambda: self.client.log_artifacts(run_id, str(d), artifact_path),
               f"upload artifact folder {d} to run {run_id}")

    def _terminate(self, status: str, reason: Optional[str]) -> None:
        status = status.upper()
        if status not in _END_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(_END_STATUSES)}; got {status!r}")
        run_id = self._need_run()
        if status != "FINISHED":
            self.set_tags({FAILURE_TAG: reason or f"{status.lower()} (no reason given)"})
        elif FAILURE_TAG in _retry(lambda: self.client.get_run(run_id).data.tags, f"read run {run_id}"):
            # an earlier attempt failed, this one (resumed/retried) finished: keep the run truthful
            _retry(lambda: self.client.delete_tag(run_id, FAILURE_TAG), f"clear failure tag on {run_id}")
        _retry(lambda: self.client.set_terminated(run_id, status), f"end run {run_id} as {status}")

    def _reopen(self, run_id: str) -> Any:
        run = _retry(lambda: self.client.get_run(run_id), f"fetch run {run_id}")
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow run {run_id} was deleted; it cannot be resumed")
        if run.info.experiment_id != self.experiment_id:
            raise TrackingError(f"MLflow run {run_id} belongs to experiment {run.info.experiment_id}, "
                                f"not {self.experiment_id}; it cannot be resumed here")
        if run.info.status != "RUNNING":
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"), f"reopen run {run_id}")
        attempt = int(run.data.tags.get(ATTEMPT_TAG, "1")) + 1
        self.run_id = run_id
        self.set_tags({ATTEMPT_TAG: attempt})
        return run


class SweepTracker(_RunLogger):
    """The Tune driver's side: one parent run per sweep.

    >>> sweep = SweepTracker.from_config(cfg)            # resolves, checks, creates the experiment
    >>> parent = sweep.start_parent(cfg.tune.name, cfg.flat())
    >>> spec = sweep.trial_spec()                        # plain values, put into the trainable
    >>> ... TrialTracker.from_spec(spec, trial_id, params) inside each trial ...
    >>> sweep.finish("FINISHED")
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: Optional[str] = None):
        self.uri = validate_tracking_uri(uri)
        self.experiment_id = str(experiment_id)
        self.run_id = parent_run_id

    @classmethod
    def from_config(cls, cfg: "Config", check: bool = True, timeout_s: float = 10) -> "SweepTracker":
        """Resolve the URI, check the store (unless ``check=False``) and ensure the experiment
        (artifacts under ``<storage>/mlartifacts`` for a local SQLite store)."""
        from natra_ray.cli import storage_root

        uri = resolve_tracking_uri(cfg)
        if check:
            check_tracking(uri, timeout_s)
        root = storage_root(cfg) / "mlartifacts" if _scheme(uri) == "sqlite" else None
        return cls(uri, ensure_experiment(uri, experiment_name(cfg), root))

    @property
    def parent_run_id(self) -> Optional[str]:
        return self.run_id

    def start_parent(self, run_name: str, params: Optional[Mapping[str, Any]] = None,
                     tags: Optional[Mapping[str, Any]] = None,
                     parent_run_id: Optional[str] = None) -> str:
        """Create the sweep's parent run, or (``parent_run_id`` given, e.g. on ``--resume``)
        reopen that existing run. Logs ``params`` (idempotently) and ``tags``; returns its id."""
        if parent_run_id:
            self._reopen(parent_run_id)
        else:
            all_tags = {ROLE_TAG: "sweep", ATTEMPT_TAG: "1", **{k: str(v) for k, v in (tags or {}).items()}}
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags),
                         f"create parent run {run_name!r}")
            self.run_id = run.info.run_id
        if parent_run_id and tags:
            self.set_tags(tags)
        if params:
            self.log_params(params)
        return self.run_id  # type: ignore[return-value]

    def log_parent_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> Dict[str, float]:
        return self.log_metrics(metrics, step)

    def log_parent_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.log_artifact(path, artifact_path)

    def trial_spec(self) -> Dict[str, str]:
        """Plain values a trial needs to build its :class:`TrialTracker` (put it in the trainable)."""
        return {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": self._need_run()}

    def trial_tracker(self, trial_id: str, params: Optional[Mapping[str, Any]] = None,
                      run_name: Optional[str] = None) -> "TrialTracker":
        return TrialTracker.from_spec(self.trial_spec(), trial_id, params, run_name)

    def child_runs(self):
        """The child runs of the parent, as a pandas DataFrame (``mlflow.search_runs``)."""
        import mlflow

        with _fluent_target(self.uri):
            return mlflow.search_runs(experiment_ids=[self.experiment_id],
                                      filter_string=f"tags.`{PARENT_TAG}` = '{self._need_run()}'")

    def finish(self, status: str = "FINISHED", reason: Optional[str] = None) -> None:
        """End the parent run (``FAILED``/``KILLED`` record ``reason`` as ``natra.failure_reason``)."""
        self._terminate(status, reason)


# --------------------------------------------------------------------------- which store a parent run is in
# A resumable job (sweep, benchmark) keeps its parent run id in its folder under the storage root,
# which outlives any one tracking URI: the record names the store too, so a resume pointed at
# another store is refused with what to do, instead of MLflow's "run not found".
PARENT_RECORD = "mlflow_parent.json"
_PLAIN_PARENT_RECORD = "mlflow_parent_run_id"  # the older record: the run id alone


def _store_key(uri: str) -> str:
    """One spelling per store: an SQLite file by its real path, anything else as written."""
    uri = uri.strip()
    if _scheme(uri) == "sqlite":
        return "sqlite:///" + os.path.realpath("/" + _sqlite_path(uri).lstrip("/"))
    return uri.rstrip("/")


def recorded_parent_run(folder: str | os.PathLike, uri: str, what: str, start_over: str) -> Optional[str]:
    """The parent run id an earlier invocation saved in ``folder``, to reopen in store ``uri``;
    ``None`` when there is none. A record from another store raises :class:`TrackingError` naming
    both stores (``what``: e.g. "benchmark 'x'"; ``start_over``: how to begin afresh instead).
    Deletes nothing; the store is queried only for an older record that lacks its URI."""
    import json

    folder = Path(folder)
    record, plain = folder / PARENT_RECORD, folder / _PLAIN_PARENT_RECORD
    if record.is_file():
        try:
            data = json.loads(record.read_text())
            run_id, old_uri = str(data["parent_run_id"]), str(data["tracking_uri"])
        except (ValueError, KeyError, TypeError):
            raise TrackingError(f"{record} is not a parent-run record ({{\"tracking_uri\", \"parent_run_id\"}}); "
                                f"restore it, or delete it to start a new MLflow parent run") from None
        if _store_key(old_uri) != _store_key(uri):
            raise TrackingError(f"the {what} was started with MLflow store {old_uri} (parent run {run_id}); this run "
                                f"uses {uri}. Use the same tracking URI to resume, or {start_over}")
        return run_id
    if not plain.is_file() or not plain.read_text().strip():
        return None
    run_id = plain.read_text().strip()
    check_tracking(uri)  # an unreachable server says so, rather than "could not fetch the run"
    try:
        _retry(lambda: _client(uri).get_run(run_id), f"fetch run {run_id}")
    except TrackingError as e:
        if _error_code(e.__cause__) != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(f"the {what} was started with another MLflow store: its parent run {run_id} is not in "
                            f"{uri}. Use the tracking URI it was started with to resume, or {start_over}") from None
    return run_id


def save_parent_run(folder: str | os.PathLike, uri: str, run_id: str) -> None:
    """Record ``run_id`` and its store in ``folder`` (write-then-rename: a killed writer never
    leaves a half record) for :func:`recorded_parent_run`."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PARENT_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"tracking_uri": uri, "parent_run_id": run_id}) + "\n")
    os.replace(tmp, folder / PARENT_RECORD)
    (folder / _PLAIN_PARENT_RECORD).unlink(missing_ok=True)


class TrialTracker(_RunLogger):
    """One trial's child run. Built from plain values, so it pickles into a Ray worker; the MLflow
    client is created lazily in the process that uses it. Also a context manager::

        with TrialTracker(uri, exp_id, parent_id, trial_id, params) as t:
            t.log_metrics({"val_acc": 0.9}, step=1)
        # -> FINISHED, or FAILED with the exception as natra.failure_reason
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                 params: Optional[Mapping[str, Any]] = None, run_name: Optional[str] = None):
        if not trial_id:
            raise ValueError("TrialTracker needs a non-empty trial_id (it identifies the child run)")
        self.uri = validate_tracking_uri(uri)
        self.experiment_id = str(experiment_id)
        self.parent_run_id = parent_run_id
        self.trial_id = str(trial_id)
        self.params = dict(params or {})
        self.run_name = run_name or self.trial_id
        self.run_id: Optional[str] = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, str], trial_id: str, params: Optional[Mapping[str, Any]] = None,
                  run_name: Optional[str] = None) -> "TrialTracker":
        return cls(spec["uri"], spec["experiment_id"], spec["parent_run_id"], trial_id, params, run_name)

    def _find_existing(self) -> Optional[Any]:
        parent_q = _filter_quote(self.parent_run_id)
        trial_q = _filter_quote(self.trial_id)
        flt = f"tags.`{PARENT_TAG}` = {parent_q}"
        if trial_q is not None:
            flt += f" and tags.`{TRIAL_TAG}` = {trial_q}"
        runs = _retry(lambda: self.client.search_runs([self.experiment_id], filter_string=flt,
                                                      max_results=1000),
                      f"search child runs of {self.parent_run_id}")
        runs = [r for r in runs if r.data.tags.get(TRIAL_TAG) == self.trial_id]
        if not runs:
            return None
        runs.sort(key=lambda r: r.info.start_time or 0)
        if len(runs) > 1:
            log.warning("%d MLflow runs carry trial id %s under parent %s; reusing the oldest, %s",
                        len(runs), self.trial_id, self.parent_run_id, runs[0].info.run_id)
        return runs[0]

    def start(self) -> str:
        """Create the child run, or reuse the one this trial id already has under the parent (a
        retried or resumed trial), reopening it; logs the params. Returns the run id."""
        existing = self._find_existing()
        if existing is not None:
            self._reopen(existing.info.run_id)
            log.info("MLflow: trial %s resumes run %s", self.trial_id, self.run_id)
        else:
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: self.trial_id, ROLE_TAG: "trial",
                    ATTEMPT_TAG: "1"}
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags),
                         f"create run for trial {self.trial_id}")
            self.run_id = run.info.run_id
        if self.params:
            self.log_params(self.params)
        return self.run_id  # type: ignore[return-value]

    def log_classifier(self, model: "torch.nn.Module", input_example: Any, input_spec: Any = None,
                       max_examples: int = 4) -> str:
        """Log ``model`` as the MLflow model ``classifier`` of this run and return its model URI.

        What is logged takes the dataset's own images: ``input_spec`` (a
        ``data.datasets.InputSpec``, e.g. ``input_spec(cfg.data)``) says their native shape and
        the preprocessing the loader applies (Fashion-MNIST: 1x28x28, zero-padded to 32), which
        becomes part of the model (``natra_ray.export.NativeInputClassifier``); ``None`` means the
        example is already at the model's size. ``input_example``: float32 images in [0, 1] at
        that native shape, (B, C, H, W); the signature (tensor (-1, C, H, W) -> logits
        (-1, classes)) is inferred from a CPU eval copy. The model is saved as a ``torch.export``
        program (MLflow's ``pt2``): loading it needs torch and MLflow, not natra_ray, and it
        refuses any other image shape."""
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        from natra_ray.data.datasets import InputSpec
        from natra_ray.export import NativeInputClassifier, input_shape_message

        run_id = self._need_run()
        if isinstance(input_example, torch.Tensor):
            input_example = input_example.detach().cpu().numpy()
        x = np.asarray(input_example)
        if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or not len(x):
            raise ValueError(f"log_classifier: input_example must be float images of shape (B, C, H, W); "
                             f"got dtype {x.dtype}, shape {x.shape}")
        spec = input_spec if input_spec is not None else InputSpec.identity(*x.shape[1:])
        if tuple(x.shape[1:]) != spec.shape:
            raise ValueError(f"log_classifier: input_example: {input_shape_message(x.shape, spec)}")
        x = np.ascontiguousarray(x[:max(2, max_examples)], dtype=np.float32)
        if len(x) == 1:  # torch.export fixes a batch axis of size 1: show it two images
            x = np.concatenate([x, x])
        if float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise ValueError(f"log_classifier: input_example must lie in [0, 1] (the classifier's input "
                             f"range); got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
        served = NativeInputClassifier(copy.deepcopy(model).to("cpu"), spec).eval()
        with torch.no_grad():
            logits = served(torch.from_numpy(x)).detach().cpu().numpy()
        signature = infer_signature(x, logits)
        metadata = {"natra.input_shape": list(spec.shape), "natra.model_input_shape": list(spec.model_shape),
                    "natra.preprocessing": ("zero-pad 28 -> 32 px, centered" if spec.pad_28_to_32
                                            else "none" if spec.shape == spec.model_shape else "bilinear resize")}

        def log_it() -> str:
            with _fluent_target(self.uri, self.experiment_id):
                info = mlflow.pytorch.log_model(
                    served, name=CLASSIFIER_NAME, input_example=x, signature=signature, run_id=run_id,
                    serialization_format="pt2", metadata=metadata,
                    # explicit pins skip MLflow's slow requirement inference (a subprocess that
                    # re-imports the model) and are what a loader needs: the program needs no natra_ray
                    pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                )
            return info.model_uri

        return _retry(log_it, f"log the classifier of trial {self.trial_id} (run {run_id})", attempts=2)

    def end(self, status: str = "FINISHED", reason: Optional[str] = None) -> None:
        """End the run: ``FINISHED``, or ``FAILED``/``KILLED`` with ``reason`` recorded as the tag
        ``natra.failure_reason``."""
        self._terminate(status, reason)

    def __enter__(self) -> "TrialTracker":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.end("FINISHED")
        else:
            kind = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                self.end(kind, f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - never mask the trial's own exception
                log.exception("MLflow: could not record the failure of trial %s", self.trial_id)


# --------------------------------------------------------------------------- models
def register_best(uri: str, run_id: str, model_name: str, alias: Optional[str] = "best",
                  await_s: int = 300) -> int:
    """Register ``runs:/<run_id>/classifier`` as a new version of ``model_name`` in the Model
    Registry (created on first use) and point ``alias`` at it (``models:/<name>@best``; ``None``
    skips). Returns the version number."""
    import mlflow

    uri = validate_tracking_uri(uri)
    model_uri = f"runs:/{run_id}/{CLASSIFIER_NAME}"

    def register() -> int:
        with _fluent_target(uri):
            mv = mlflow.register_model(model_uri, model_name, await_registration_for=await_s)
        return int(mv.version)

    try:
        version = register()
    except Exception as e:  # noqa: BLE001
        # mlflow 3.17 raises "Unable to find a logged_model" with error_code INTERNAL_ERROR (it passes
        # the code as a string, which MlflowException does not recognise), so match the text too
        if _error_code(e) in ("NOT_FOUND", "RESOURCE_DOES_NOT_EXIST") or "Unable to find a logged_model" in str(e):
            raise TrackingError(f"cannot register {model_uri} as {model_name!r}: the run has no logged "
                                f"classifier (was log_classifier called?): {_one_line(e)}") from e
        raise TrackingError(f"cannot register {model_uri} as {model_name!r}: {_one_line(e)}") from e
    if alias:
        _retry(lambda: _client(uri).set_registered_model_alias(model_name, alias, str(version)),
               f"set alias {alias!r} on {model_name} v{version}")
    return version


def load_classifier(model_uri: str, uri: Optional[str] = None, map_location: Any = None) -> "torch.nn.Module":
    """Load a classifier logged by :meth:`TrialTracker.log_classifier` (``models:/m-...``,
    ``runs:/<run>/classifier``, ``models:/<name>/<version>``, ``models:/<name>@best``) in eval
    mode. ``uri`` is the tracking store to resolve it against (default: MLflow's global one).
    A ``pt2`` classifier comes back as the exported program's module: it takes images at the
    dataset's native size (``natra.input_shape`` in the model's metadata)."""
    import mlflow.pytorch
    import torch

    kwargs = {"map_location": map_location} if map_location is not None else {}
    ctx = _fluent_target(validate_tracking_uri(uri)) if uri else contextlib.nullcontext()
    with ctx:
        model = mlflow.pytorch.load_model(model_uri, **kwargs)
    if isinstance(model, torch.fx.GraphModule):  # a torch.export program: exported in eval mode, no .eval()
        return model
    return model.eval()


def fetch_trial_files(uri: str, run_id: str, dst: str | os.PathLike) -> Dict[str, Any]:
    """What the direction explorer needs from a trial's run: downloads its ``classifier.pt`` into
    ``dst`` and returns ``{"classifier": path, "upstream": [cache entry names], "params": {...}}``;
    the upstream names are the folders the trial logged its GAN / BIES / directions previews under
    (``upstream/<stage>-<key>/``), i.e. the cache entries holding its generator, encoder and
    directions."""
    uri = validate_tracking_uri(uri)
    client = _client(uri)
    run = _retry(lambda: client.get_run(run_id), f"fetch run {run_id}")
    listed = _retry(lambda: client.list_artifacts(run_id, "upstream"), f"list the artifacts of run {run_id}")
    top = {posixpath.basename(a.path) for a in _retry(lambda: client.list_artifacts(run_id), f"list run {run_id}")}
    if "classifier.pt" not in top:
        raise TrackingError(f"MLflow run {run_id} has no classifier.pt artifact (is it a finished trial run? "
                            f"its artifacts: {', '.join(sorted(top)) or 'none'})")
    Path(dst).mkdir(parents=True, exist_ok=True)
    path = _retry(lambda: client.download_artifacts(run_id, "classifier.pt", str(dst)),
                  f"download classifier.pt of run {run_id}")
    tagged = sorted(v for k, v in run.data.tags.items() if k.startswith("natra.upstream."))  # set by the sweep
    return {"classifier": Path(path),
            "upstream": tagged or sorted(posixpath.basename(a.path) for a in listed if a.is_dir),
            "params": dict(run.data.params), "experiment_id": run.info.experiment_id}


__all__ = [
    "TrackingError", "SUPPORTED_SCHEMES", "given_tracking_uri", "resolve_tracking_uri", "validate_tracking_uri", "check_tracking",
    "experiment_name", "default_artifact_root", "ensure_experiment", "SweepTracker", "TrialTracker",
    "recorded_parent_run", "save_parent_run",
    "register_best", "load_classifier", "open_ui_command", "runs_page_url", "sanitize_key", "fetch_trial_files",
]
