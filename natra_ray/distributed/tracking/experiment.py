"""Where a job's runs go, found again on every invocation: the experiment (created once, with an
absolute artifact location and the kind tag the UI needs) and, for a resumable job (sweep,
benchmark), the record of which parent run in which store an earlier invocation started.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from natra_ray.distributed.tracking.uri import (
    _scheme,
    _sqlite_path,
    check_tracking,
    default_artifact_root,
    validate_tracking_uri,
)
from natra_ray.distributed.tracking.values import (
    TrackingError,
    _client,
    _error_code,
    _retry,
)

log = logging.getLogger(__name__)

# Which view the MLflow 3 UI opens an experiment on. Without the tag it guesses, and opens ours on
# the GenAI overview (traces, tokens); "custom_model_development" is the UI's value for training
# runs (the values are in the UI bundle, mlflow/server/js: GENAI_DEVELOPMENT, CUSTOM_MODEL_DEVELOPMENT...).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """The id of experiment ``name``, created if missing (idempotent and race-safe: if another
    process creates it first, that one is returned). ``artifact_root`` is the experiment's
    artifact location; ``None`` means ``<db folder>/mlartifacts`` for SQLite (MLflow's own default
    would be relative to the cwd) and the server's choice otherwise. A deleted experiment of
    that name is restored. New and existing experiments get the kind tag that makes the UI open
    them on their training runs.

    Why the artifact location is always set: an experiment created in an SQLite store without one
    puts artifacts in ``./mlruns/<id>`` relative to whatever the cwd was. Why it is called once,
    by the driver, before any trial: concurrent creation of an experiment races, and so does the
    schema creation of concurrent first openings of a fresh SQLite file."""
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
            except Exception as e:
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


def recorded_parent_run(folder: str | os.PathLike, uri: str, what: str, start_over: str) -> str | None:
    """The parent run id an earlier invocation saved in ``folder``, to reopen in store ``uri``;
    ``None`` when there is none. A record from another store raises :class:`TrackingError` naming
    both stores (``what``: e.g. "benchmark 'x'"; ``start_over``: how to begin afresh instead).
    Deletes nothing; the store is queried only for an older record that lacks its URI."""
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PARENT_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"tracking_uri": uri, "parent_run_id": run_id}) + "\n")
    os.replace(tmp, folder / PARENT_RECORD)
    (folder / _PLAIN_PARENT_RECORD).unlink(missing_ok=True)


__all__ = ["EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "PARENT_RECORD", "ensure_experiment", "recorded_parent_run",
           "save_parent_run"]
