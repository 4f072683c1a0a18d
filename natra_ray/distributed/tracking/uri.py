"""Which MLflow store: the tracking URI (validated, given, or the default SQLite file under the
storage root), the experiment name, the artifact root, reachability checks before any compute,
and how to open the store's UI.

Nothing here imports ``mlflow`` (only :func:`runs_page_url` asks the store something), so a bad
URI fails in milliseconds, before any compute.
"""
from __future__ import annotations

import os
import re
import shlex
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from natra_ray.distributed.tracking.values import TrackingError, _client, _retry
from natra_ray.workflow.layout import StorageLayout

if TYPE_CHECKING:  # pragma: no cover
    from natra_ray.config import Config

SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


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
    return rest.removeprefix("/")


def validate_tracking_uri(uri: str, source: str = "tracking.uri") -> str:
    """Check a tracking URI's form (not reachability); returns it stripped. ``source`` names
    where it came from, for the message.

    Plain-folder stores (``./mlruns``, ``file:``) are refused: MLflow 3 refuses them itself.
    Relative and in-memory SQLite files are refused because every Ray worker runs in another
    directory (and ``ray job submit`` in a temporary copy that disappears)."""
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


def given_tracking_uri(cfg: Config) -> str | None:
    """The URI the user chose (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``), validated; None
    when neither is set. Writes nothing, so it can be checked before any compute."""
    if cfg.tracking.uri.strip():
        return validate_tracking_uri(cfg.tracking.uri, "config key tracking.uri")
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return validate_tracking_uri(env, "$MLFLOW_TRACKING_URI") if env else None


def resolve_tracking_uri(cfg: Config) -> str:
    """``given_tracking_uri`` or else ``sqlite:///<storage>/mlflow.db`` (absolute, folder
    created). Raises :class:`TrackingError` for a URI MLflow or Ray cannot use.

    Always an explicit, absolute URI: with none at all MLflow 3 defaults to ``sqlite:///mlflow.db``
    *relative to the current directory*, which under ``ray job submit`` is a temporary copy that
    disappears."""
    given = given_tracking_uri(cfg)
    if given:
        return given
    layout = StorageLayout.from_config(cfg.tune.storage_path)
    layout.root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{layout.mlflow_db}"  # the root is absolute: "sqlite:////abs/.../mlflow.db"


def experiment_name(cfg: Config) -> str:
    """``tracking.experiment`` or, when empty, ``tune.name``."""
    return cfg.tracking.experiment.strip() or cfg.tune.name


def default_artifact_root(uri: str) -> Path | None:
    """``<db folder>/mlartifacts`` for an SQLite store; ``None`` (the server decides) otherwise.

    Multi-node clusters: a ``file://`` artifact location lives on the head node's disk; trials on
    other nodes would write to *their* local disk. Use an MLflow server with proxied artifacts on
    an address the other nodes reach (``ray_cluster.yaml``: the head's private address, with
    ``MLFLOW_TRACKING_URI`` set for every job started on the head)."""
    if _scheme(uri) == "sqlite":
        # the store's folder read as a storage root: its mlartifacts/ beside its mlflow.db
        return StorageLayout(Path(_sqlite_path(uri)).parent).mlartifacts
    return None


# --------------------------------------------------------------------------- reachability
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
    except Exception as e:  # noqa: BLE001 - whatever the driver raises, the database is unreachable
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


# --------------------------------------------------------------------------- the UI
def open_ui_command(uri: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The command that opens the MLflow UI for ``uri``, bound to loopback by default (reach it
    from another machine with ``ssh -L 5000:127.0.0.1:5000 <head>``). For a server URI the UI is
    already running: the URI itself is returned. Any other ``host`` is logged as a warning."""
    scheme = _scheme(uri)
    if scheme in ("http", "https", "databricks"):
        return uri
    from natra_ray.distributed.ray_init import bind_host

    host = bind_host(host, "the MLflow UI")
    return (f"mlflow ui --backend-store-uri {shlex.quote(uri)} "
            f"--host {shlex.quote(host)} --port {int(port)}")


# Why: MLflow 3.17's UI opens every experiment on its GenAI pages (traces, tokens) unless the URL
# asks for the Model training view (the switch's state; the experiment kind tag does not decide it).
RUNS_VIEW_QUERY = "workflowType=machine_learning"


def runs_page_url(uri: str, run_id: str, host: str = "127.0.0.1", port: int = 5000) -> str | None:
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


__all__ = [
    "RUNS_VIEW_QUERY",
    "SUPPORTED_SCHEMES",
    "check_tracking",
    "default_artifact_root",
    "experiment_name",
    "given_tracking_uri",
    "open_ui_command",
    "resolve_tracking_uri",
    "runs_page_url",
    "validate_tracking_uri",
]
